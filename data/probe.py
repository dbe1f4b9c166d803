"""The probe: read back from the pixels what a built-in-dataset caption asks for, and score it.

    python -m data.probe score PATHS… [--per-clip]

For videos (and stills) whose captions follow :mod:`data.synthetic`'s grammar ("a red circle moves slowly
from left to right on a white background", "a red circle on a blue background"), :func:`measure` recovers
the object's colour, the background colour, the shape, the direction and the speed of motion from the
pixels alone, and :func:`score` compares them with the caption: an accuracy per attribute, ``overall``
(their mean) and temporal-quality numbers. The built-in dataset has ground truth for every clip, so the
probe itself is verified end to end (``tests/data/test_probe.py``): ≥ 95% on every attribute for held-out
dataset clips at their own size and squashed to the demo's 32×32, near chance with the captions shuffled
and on noise.

How the pixels are read (all in CIELAB, where a distance is a perceived colour difference, so a dark
blue and a black are as far apart as they look), after :func:`reduce_frames`: a frame whose shorter side
is 256 px or more is area-averaged by the integer factor ``min(H, W) // 128`` (a video as it is decoded,
so 1080p never sits in memory at full size; clips up to 255 px are read as they are), a clip longer than
:data:`MAX_FRAMES` frames is read at that many evenly spaced frames, and what is still beyond
:data:`MAX_PIXELS` is refused (skipped, named). Every reading below is a ratio of the frame, so the
reduction does not change it:

* background: the per-channel median of the border pixels over all frames (the object covers a small
  part of the border at most); its name is the nearest palette colour (black, white and gray included).
* object: pixels farther from the background than half the clip's contrast (the 99th percentile of the
  distance), the largest connected blob per frame. No object is ``found`` when the contrast is too low,
  the blob is missing in most frames, too large to be one shape (noise), or the rest of the frame is not
  a plain background. Its colour is the median of the blob's inner half (the pixels farthest from the
  background, so blurred edges do not pull it towards the background), named by the palette colour
  (other than the background's: the grammar never draws both in one colour) it lies closest to, allowing
  for an object blended up to 40% towards the background (:data:`FAINT`).
* shape: from the blob's fill of its bounding box (circle π/4, square 1, triangle 1/2) and the vertical
  offset of its centroid from the box centre (a triangle's lies 1/6 of its height below; a circle's and a
  square's at the centre). Both are invariant to scaling either axis, so a squashed frame reads the same.
* direction and speed: the least-squares slope of the centroid track times (T − 1) is the net
  displacement; the direction is the one of ``data.synthetic.DIRECTIONS`` it points along most, the speed
  the nearest of ``data.synthetic.SPEEDS`` to the displacement as a fraction of the centre's travel range
  along that axis (the frame's extent minus the blob's). Below :data:`MIN_MOTION` of the range, or for a
  still, there is no motion (None).

Temporal numbers (per clip; :func:`score` averages them over the clips where they are defined):

* ``jerk``: the mean norm of the centroid track's third difference, in units of the frame's shorter
  side (0 for a constant velocity; a track that jumps scores high), over runs of at least 4
  consecutive frames with the object (a frame where it is missed is not a jump; ``area_cv`` counts it);
  for a clip read at :data:`MAX_FRAMES` of its frames, per kept frame.
* ``area_cv``: the coefficient of variation (std / mean) of the object's area over the frames (a frame
  without the object counts area 0), 0 for a shape of constant size.
* ``flicker``: the mean absolute frame-to-frame change of the pixels outside the object (its mask in
  both frames, grown by one pixel), as a fraction of 255.

Scoring rules: direction and speed are scored over moving clips only (a caption with a motion); a clip
where no object is found counts as wrong for colour, shape, direction and speed (never dropped); captions
outside the grammar are ``skipped`` (counted); case, a byte-order mark, extra whitespace and a final
period do not matter (:func:`normalize_caption`). :func:`score_paths` reads a folder as it is: every
media file with a sidecar ``.txt`` caption (the layout of ``data.synthetic`` raw files, ``launch.sample``
and a run's training samples), each file once however often it is named. A media file without a
caption, with a caption that is not UTF-8 text or outside the grammar, one that cannot be decoded
(frames changing size mid-stream included) or is too large, and an entry with a media extension that is
no file (a folder, a broken link) are skipped, counted and named on stderr; a missing path, a folder
without media, or nothing scorable at all is an error naming the path (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import av
import numpy as np
from scipy import ndimage

from data.synthetic import COLOURS, DIRECTIONS, SHAPES, SPEEDS
from data.video import (
    DEFAULT_MAX_PIXELS,
    MediaError,
    check_pixels,
    media_kind,
    open_image,
    open_video,
    video_stream,
)

ATTRIBUTES = ("color", "background", "shape", "direction", "speed")
"""The scored attributes, in report order (``color``: the issue's spelling of the object's colour)."""
TEMPORAL = ("jerk", "area_cv", "flicker")
"""The temporal numbers of a clip (see the module docstring)."""
MIN_CONTRAST = 12.0
"""CIELAB distance below which no object stands out from the background (palette pairs are ≥ 30 apart)."""
MIN_MOTION = 0.15
"""Net displacement, as a fraction of the travel range, below which a clip shows no motion (the grammar's
slowest motion crosses 0.4 of it)."""
FAINT = 0.6
"""Faintest object colour still named as its palette colour: the share of the way from the background."""
MAX_AREA = 0.3
"""Largest share of the frame one shape may cover (the grammar's circle covers ≤ 6%): more is noise."""
MIN_PLAIN = 0.85
"""Share of the pixels outside the object that must be close to the background for an object to count."""
REDUCE_SIDE = 128
"""Frames are area-averaged by the integer factor ``min(H, W) // REDUCE_SIDE`` before they are read (no
change up to 255 px: the demo's 32 px and the dataset's 64–128 px clips are read as they are); every
reading is a ratio (fill, travel as a share of the frame), so it does not depend on the size."""
MAX_FRAMES = 64
"""A longer clip is read at this many evenly spaced frames (the jerk is then per kept frame)."""
MAX_PIXELS = 1 << 24
"""Pixels (frames × height × width, after :func:`reduce_frames`) the probe reads at most: its CIELAB
arrays take ~75 bytes a pixel, so ~1.2 GB. Only a frame wider than ~4:1 gets there; it is refused."""
MAX_DECODED = 1 << 27
"""Pixels a video may decode to (after the spatial reduction, before :data:`MAX_FRAMES` picks frames):
~400 MB, an hour of 1080p at 25 fps is beyond it (refused as too long)."""

_grammar = re.compile(
    r"a (?P<colour>\w+) (?P<shape>\w+)(?: moves (?P<speed>\w+) (?P<direction>from \w+ to \w+))?"
    r" on a (?P<background>\w+) background"
)


class ProbeError(ValueError):
    """A path that cannot be scored at all (missing, an empty folder, nothing scorable)."""


def normalize_caption(caption: str) -> str:
    """A caption as the grammar is matched against it: a leading UTF-8 byte-order mark dropped (text read
    as UTF-8 rather than ``utf-8-sig`` keeps it), case folded, every run of whitespace (NBSP, tabs,
    newlines included) one space, the ends stripped, and one trailing period dropped."""
    text = " ".join(caption.strip().lstrip("\ufeff").casefold().split())
    return text.removesuffix(".").rstrip()


def parse_caption(caption: str) -> dict | None:
    """``{"colour", "background", "shape", "direction", "speed"}`` for a caption in
    :func:`data.synthetic.describe`'s grammar (direction and speed None for a still), None otherwise
    (a word outside the dataset's vocabulary, another sentence). The caption is read as
    :func:`normalize_caption` writes it: case, a byte-order mark, extra whitespace and a final period do
    not matter."""
    m = _grammar.fullmatch(normalize_caption(caption))
    if m is None:
        return None
    out = m.groupdict()
    ok = out["colour"] in COLOURS and out["background"] in COLOURS and out["shape"] in SHAPES
    if out["direction"] is not None:
        ok = ok and out["direction"] in DIRECTIONS and out["speed"] in SPEEDS
    return out if ok else None


def _lab(rgb: np.ndarray) -> np.ndarray:
    """…×3 sRGB (0–255) → …×3 CIELAB (D65)."""
    c = np.asarray(rgb, np.float32) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]], np.float32)
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883], np.float32)
    d = 6 / 29
    f = np.where(xyz > d**3, np.cbrt(xyz), xyz / (3 * d * d) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


_NAMES = list(COLOURS)
_PALETTE = _lab(np.array([COLOURS[n] for n in _NAMES], np.float32))  # 10, 3


def _nearest_colour(lab: np.ndarray, exclude: str | None = None) -> str:
    d = np.linalg.norm(_PALETTE - lab, axis=-1)
    if exclude is not None:
        d[_NAMES.index(exclude)] = np.inf
    return _NAMES[int(np.argmin(d))]


def _object_colour(lab: np.ndarray, background: str) -> str:
    """The palette colour P (not the background B) for which ``lab`` lies closest to the segment from
    B + FAINT·(P − B) to P: a faint object (a generative model's, blended towards its background) still
    reads as its own colour, not as whichever palette entry lies between the two."""
    b = _PALETTE[_NAMES.index(background)]
    seg = _PALETTE - b  # 10, 3
    alpha = np.clip(((lab - b) * seg).sum(-1) / np.maximum((seg * seg).sum(-1), 1e-6), FAINT, 1.0)
    d = np.linalg.norm(b + alpha[:, None] * seg - lab, axis=-1)
    d[_NAMES.index(background)] = np.inf
    return _NAMES[int(np.argmin(d))]


def _blob(mask: np.ndarray) -> np.ndarray | None:
    """The largest 8-connected component of an H×W bool mask, or None when the mask is empty."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (1 + int(np.argmax(sizes)))


def _geometry(blob: np.ndarray) -> dict:
    """Area, centroid (pixel centres at +0.5), bounding-box extent, fill and vertical asymmetry."""
    ys, xs = np.nonzero(blob)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
    bh, bw = y1 - y0, x1 - x0
    return {
        "area": len(ys),
        "centre": (cx, cy),
        "extent": (bw, bh),
        "fill": len(ys) / (bw * bh),
        "asym": (cy - (y0 + y1) / 2) / bh,
    }


def _shape(fill: float, asym: float) -> str:
    # a triangle is the only shape heavier at the bottom; a square fills its box, a circle π/4 of it
    if asym > 0.07 or fill < 0.62:
        return "triangle"
    return "square" if fill > 0.89 else "circle"


def _motion(track: np.ndarray, idx: np.ndarray, t: int, size: tuple[int, int], extent) -> tuple:
    """(direction, speed, fraction of the travel range) from the centroid track over frames ``idx``."""
    if t < 2 or len(idx) < 2:
        return None, None, 0.0
    slope = np.polyfit(idx.astype(np.float64), track, 1)[0]  # 2: px per frame in x and y
    disp = slope * (t - 1)
    names = list(DIRECTIONS)
    direction = names[int(np.argmax([np.dot(disp, DIRECTIONS[n]) for n in names]))]
    axis = 0 if DIRECTIONS[direction][0] else 1
    travel = max(size[axis] - extent[axis], 1.0)  # the centre's range: the frame minus the shape
    frac = float(abs(disp[axis]) / travel)
    if frac < MIN_MOTION:
        return None, None, frac
    speed = min(SPEEDS, key=lambda s: abs(SPEEDS[s] - frac))
    return direction, speed, frac


def _area_average(frame: np.ndarray, k: int) -> np.ndarray:
    """An H×W×3 uint8 frame averaged over k×k blocks (the last H mod k rows, W mod k columns dropped)."""
    h, w = frame.shape[0] // k, frame.shape[1] // k
    blocks = frame[: h * k, : w * k].reshape(h, k, w, k, 3)  # h, k, w, k, 3
    total = blocks.sum(axis=(1, 3), dtype=np.uint32)  # h, w, 3
    return ((total + k * k // 2) // (k * k)).astype(np.uint8)


def reduce_frames(frames: np.ndarray) -> np.ndarray:
    """The frames the probe reads: at most :data:`MAX_FRAMES` of them, evenly spaced (first and last
    kept), each area-averaged by ``min(H, W) // REDUCE_SIDE`` (the input itself when nothing changes).
    Idempotent: a reduced clip's shorter side is 128–255 px, which is reduced no further.

    Raises:
        ValueError: more than :data:`MAX_PIXELS` pixels left to read.
    """
    t, h, w = frames.shape[:3]
    if t > MAX_FRAMES:
        frames = frames[np.linspace(0, t - 1, MAX_FRAMES).round().astype(int)]
    k = min(h, w) // REDUCE_SIDE
    if k > 1:
        frames = np.stack([_area_average(f, k) for f in frames])  # one frame at a time: bounded memory
    if frames.shape[0] * frames.shape[1] * frames.shape[2] > MAX_PIXELS:
        raise ValueError(
            f"{t}×{h}×{w} frames are too large for the probe: {frames.shape[0]}×{frames.shape[1]}×"
            f"{frames.shape[2]} after reduction, more than MAX_PIXELS={MAX_PIXELS}"
        )
    return frames


def measure(frames: np.ndarray) -> dict:
    """What the pixels of one clip show.

    Args:
        frames: T×H×W×3 uint8 (T = 1 for a still), read as :func:`reduce_frames` returns them (at most
            :data:`MAX_FRAMES` frames, the shorter side below 256 px).

    Returns:
        ``found`` (an object was seen), ``color``, ``background``, ``shape``, ``direction``, ``speed``
        (direction and speed None for a still or when no motion can be measured; colour and shape None
        when nothing was found), ``travel`` (the net displacement as a fraction of the travel range),
        ``fill``, ``asym``, and the temporal numbers ``jerk``, ``area_cv``, ``flicker`` (None where
        undefined; see the module docstring).

    Raises:
        ValueError: not T×H×W×3 uint8, or too many pixels even reduced (:func:`reduce_frames`).
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] < 1:
        raise ValueError(f"measure() takes T×H×W×3 uint8 frames, got {frames.shape} {frames.dtype}")
    frames = reduce_frames(frames)
    t, h, w, _ = frames.shape
    lab = _lab(frames)  # T, H, W, 3
    border = np.concatenate(
        [frames[:, 0].reshape(-1, 3), frames[:, -1].reshape(-1, 3)]
        + [frames[:, :, 0].reshape(-1, 3), frames[:, :, -1].reshape(-1, 3)]
    )
    bg_lab = _lab(np.median(border, axis=0))
    background = _nearest_colour(bg_lab)
    dist = np.linalg.norm(lab - bg_lab, axis=-1)  # T, H, W
    contrast = float(np.percentile(dist, 99))
    thr = max(contrast / 2, MIN_CONTRAST / 2)
    masks = np.zeros((t, h, w), bool)
    geo: dict[int, dict] = {}
    min_area = max(3, 0.002 * h * w)
    for f in range(t):
        blob = _blob(dist[f] > thr)
        if blob is not None and blob.sum() >= min_area:
            masks[f], geo[f] = blob, _geometry(blob)
    outside = ~ndimage.binary_dilation(masks, structure=np.ones((1, 3, 3), bool))
    plain = float((dist[outside] <= thr).mean()) if outside.any() else 0.0
    areas = np.array([geo[f]["area"] if f in geo else 0 for f in range(t)], np.float64)
    found = (
        contrast >= MIN_CONTRAST
        and len(geo) * 2 >= t  # seen in at least half the frames
        and float(np.median(areas[areas > 0])) <= MAX_AREA * h * w
        and plain >= MIN_PLAIN
    )
    out = {"found": bool(found), "background": background, "contrast": contrast, "plain": plain}
    out.update(color=None, shape=None, direction=None, speed=None, travel=None, fill=None, asym=None)
    out.update(jerk=None, area_cv=None, flicker=_flicker(frames, masks))
    if not found:
        return out
    inner = dist[masks] >= np.median(dist[masks])  # the blob's core, away from blurred edges
    colour_lab = _lab(np.median(frames[masks][inner], axis=0))
    idx = np.array(sorted(geo))
    fill = float(np.median([geo[f]["fill"] for f in idx]))
    asym = float(np.median([geo[f]["asym"] for f in idx]))
    extent = np.median([geo[f]["extent"] for f in idx], axis=0)
    track = np.array([geo[f]["centre"] for f in idx])  # found frames, 2: (x, y) in px
    direction, speed, frac = _motion(track, idx, t, (w, h), extent)
    out.update(
        color=_object_colour(colour_lab, background),
        shape=_shape(fill, asym),
        direction=direction,
        speed=speed,
        travel=frac,
        fill=fill,
        asym=asym,
    )
    out["jerk"] = _jerk(track, idx, min(h, w))
    if t > 1:
        out["area_cv"] = float(areas.std() / areas.mean())
    return out


def _jerk(track: np.ndarray, idx: np.ndarray, side: int) -> float | None:
    """Mean norm of the centroid track's third difference over runs of ≥ 4 consecutive frames with the
    object (a frame where it was missed is a gap, not a jump), in units of the frame's shorter side."""
    runs = np.split(np.arange(len(idx)), np.nonzero(np.diff(idx) != 1)[0] + 1)
    jumps = [np.linalg.norm(np.diff(track[r], n=3, axis=0), axis=-1) for r in runs if len(r) >= 4]
    return float(np.concatenate(jumps).mean() / side) if jumps else None


def _flicker(frames: np.ndarray, masks: np.ndarray) -> float | None:
    """Mean |frame-to-frame change| / 255 outside the object (both frames' masks, grown by a pixel)."""
    if frames.shape[0] < 2:
        return None
    grown = ndimage.binary_dilation(masks, structure=np.ones((1, 3, 3), bool))
    keep = ~(grown[1:] | grown[:-1])  # T-1, H, W
    if not keep.any():
        return None
    change = np.abs(np.diff(frames.astype(np.int16), axis=0)).mean(-1)  # T-1, H, W
    return float(change[keep].mean() / 255)


def _truth_correct(truth: dict, seen: dict) -> dict:
    """Per attribute: True/False, or None where the caption does not ask (motion of a still)."""
    moving = truth["direction"] is not None
    return {
        "color": bool(seen["found"] and seen["color"] == truth["colour"]),
        "background": seen["background"] == truth["background"],
        "shape": bool(seen["found"] and seen["shape"] == truth["shape"]),
        "direction": bool(seen["found"] and seen["direction"] == truth["direction"]) if moving else None,
        "speed": bool(seen["found"] and seen["speed"] == truth["speed"]) if moving else None,
    }


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def score(clips: Iterable[tuple[np.ndarray, str]], per_clip: bool = False) -> dict:
    """Probe accuracy of clips against their captions.

    Args:
        clips: (T×H×W×3 uint8 frames, caption) pairs.
        per_clip: also return ``clips``: per clip its caption, what was measured and what was right.

    Returns:
        A JSON-able dict: ``n`` (clips scored), ``n_moving``, ``skipped`` (captions outside the
        grammar), ``accuracy`` per attribute (``color``, ``background``, ``shape`` over all clips,
        ``direction`` and ``speed`` over moving clips; None without any), ``overall`` (the mean of the
        five, of those defined), ``found`` (share of clips where an object was seen) and ``temporal``
        (``jerk``, ``area_cv``, ``flicker`` averaged over the clips where defined).
    """
    rows, skipped = [], 0
    for frames, caption in clips:
        truth = parse_caption(caption)
        if truth is None:
            skipped += 1
            continue
        seen = measure(frames)
        rows.append({"caption": caption, "measured": seen, "correct": _truth_correct(truth, seen)})
    out = summarize(rows)
    out["skipped"] = skipped
    if per_clip:
        out["clips"] = rows
    return out


def summarize(rows: list[dict]) -> dict:
    """:func:`score`'s summary of per-clip rows (``score(..., per_clip=True)["clips"]``, possibly
    gathered from several processes and put back in order): ``n``, ``n_moving``, ``accuracy``,
    ``overall``, ``found``, ``temporal``."""
    accuracy = {a: _mean([r["correct"][a] for r in rows]) for a in ATTRIBUTES}
    return {
        "n": len(rows),
        "n_moving": sum(r["correct"]["direction"] is not None for r in rows),
        "accuracy": accuracy,
        "overall": _mean(accuracy.values()),
        "found": _mean([float(r["measured"]["found"]) for r in rows]),
        "temporal": {k: _mean([r["measured"][k] for r in rows]) for k in TEMPORAL},
    }


def read_media(path: Path, full: bool = False) -> np.ndarray:
    """T×H×W×3 uint8 frames of a video, or 1×H×W×3 of a still, each frame area-averaged as
    :func:`reduce_frames` does as it is decoded (so a long high-resolution video never sits in memory at
    its full size; ``full``: at the source size).

    Raises:
        MediaError: undecodable, no frames, frames of different sizes in one video, more than
            :data:`MAX_DECODED` pixels.
    """
    data = path.read_bytes()
    kind = media_kind(path.suffix)
    if kind == "image":
        with open_image(data, 1 << 26) as im:
            frame = np.asarray(im.convert("RGB"))
        k = 1 if full else min(frame.shape[:2]) // REDUCE_SIDE
        return (_area_average(frame, k) if k > 1 else frame)[None]
    frames, first, pixels = [], None, 0
    try:
        with open_video(data, path.suffix) as container:
            stream = video_stream(container, DEFAULT_MAX_PIXELS)
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                if frame.pts is None:  # as decode_all_frames: a frame without a time is left out
                    continue
                if first is None:  # the declared size was checked; the decoded one may differ
                    check_pixels(frame.width, frame.height, DEFAULT_MAX_PIXELS, video=True)
                    first = (frame.height, frame.width)
                elif (frame.height, frame.width) != first:
                    size = f"{frame.width}×{frame.height}, the first {first[1]}×{first[0]}"
                    raise MediaError("frame_size_changes", f"frame {len(frames)} is {size}")
                rgb = frame.to_ndarray(format="rgb24")
                k = 1 if full else min(first) // REDUCE_SIDE
                frames.append(_area_average(rgb, k) if k > 1 else rgb)
                pixels += frames[-1].shape[0] * frames[-1].shape[1]
                if pixels > MAX_DECODED and not full:
                    raise MediaError("too_long", f"more than {MAX_DECODED} pixels after reduction")
    except av.error.FFmpegError as e:
        raise MediaError("undecodable", str(e)) from e
    if not frames:
        raise MediaError("undecodable", "no frames")
    return np.stack(frames)


def _why_not_a_file(f: Path) -> str:
    if f.is_dir():
        return "a folder with a media file's name, not a file"
    if f.is_symlink() and not f.exists():
        return "a symbolic link whose target does not exist"
    return "not a regular file"


def _media_files(paths: list[str | Path]) -> tuple[list[Path], dict[str, str]]:
    """The media files under ``paths`` (each file once, by its resolved path, in the order given) and
    the entries inside folders that carry a media extension but are no file (named, with the reason)."""
    files, bad, seen = [], {}, set()

    def add(f: Path) -> None:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            files.append(f)

    for p in map(Path, paths):
        if p.is_dir():
            entries = sorted(f for f in p.rglob("*") if media_kind(f.suffix))
            if not entries:
                raise ProbeError(f"{p}: no video or image files in this folder")
            for f in entries:
                if f.is_file():
                    add(f)
                else:
                    bad[str(f)] = _why_not_a_file(f)
        elif p.is_file():
            if not media_kind(p.suffix):
                raise ProbeError(f"{p}: not a video or image file (by its extension)")
            add(p)
        else:
            raise ProbeError(f"{p}: no such file or folder")
    return files, bad


def _caption(f: Path) -> tuple[str | None, str | None]:
    """(caption, None) from ``f``'s sidecar ``.txt``, or (None, why it cannot be used)."""
    txt = f.with_suffix(".txt")
    if not txt.is_file():
        return None, f"no caption ({txt.name} is missing)"
    try:
        caption = txt.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError:
        return None, f"caption is not UTF-8 text ({txt.name})"
    except OSError as e:
        return None, f"cannot read the caption {txt.name}: {e.strerror or e}"
    if parse_caption(caption) is None:
        return None, f"caption not in the built-in dataset's grammar: {caption[:80]!r}"
    return caption, None


def score_paths(paths: list[str | Path], per_clip: bool = False) -> dict:
    """:func:`score` of media files and folders (searched recursively), each file's caption read from
    its sidecar ``.txt``; a file named twice (or reached twice through a link) is scored once. Files
    without a usable caption (missing, not UTF-8, outside the grammar), undecodable ones, ones too large
    for the probe and entries with a media extension that are no file (a folder, a broken link) are
    skipped: counted in ``skipped`` and named with the reason in ``skipped_files`` (and on stderr).

    Raises:
        ProbeError: a path that does not exist, a folder without media files, nothing scorable.
    """
    files, bad = _media_files(paths)

    def clips():
        for f in files:
            caption, why = _caption(f)
            if why is not None:
                bad[str(f)] = why
                continue
            try:
                frames = reduce_frames(read_media(f))
            except (MediaError, OSError) as e:
                bad[str(f)] = f"cannot decode: {e}"
                continue
            except ValueError as e:  # reduce_frames: too many pixels even reduced
                bad[str(f)] = str(e)
                continue
            yield frames, caption

    out = score(clips(), per_clip=per_clip)
    for path, why in bad.items():
        print(f"probe: skipped {path}: {why}", file=sys.stderr)
    if per_clip:
        scored = [f for f in files if str(f) not in bad]
        for row, f in zip(out["clips"], scored, strict=True):
            row["path"] = str(f)
    out["skipped"] = len(bad)
    out["skipped_files"] = bad
    if out["n"] == 0:
        raise ProbeError(f"{', '.join(map(str, paths))}: nothing could be scored ({len(bad)} skipped)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.probe", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="score media files / folders against their sidecar .txt captions")
    s.add_argument("paths", nargs="+", help="mp4/png/jpg files or folders (searched recursively)")
    s.add_argument("--per-clip", action="store_true", help="also list each clip's measurements")
    a = p.parse_args(argv)
    try:
        result = score_paths(a.paths, per_clip=a.per_clip)
    except ProbeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
