"""The built-in dataset: captioned moving-shape clips, encoded as real H.264 and sharded.

    python -m data.synthetic OUT_DIR --num 512 --seed 0 [--val-num 32] [--image-fraction 0.15]
        [--frames 8,48] [--fps 8] [--size 32x32]

Each clip shows one shape (circle, square, triangle) in one colour crossing a plain background in one
direction at one speed, and its caption says exactly that ("a red circle moves quickly from left to
right on a blue background"). Durations are 8–48 frames at 8–30 fps, sizes span several aspect
ratios; a fraction are still images ("a red circle on a blue background"). Everything is derived
from (seed, index), so a seed always gives the same shards. Clips go through ``data.shards``
like any user data: ``OUT_DIR/train-*.tar`` + ``index.json`` (and ``val-*.tar`` with ``--val-num``).

``--fps`` and ``--size`` pin the frame rate and the frame size (the CPU demo uses ``--frames 8,8 --fps 8
--size 32x32``: every clip is exactly one 8-frame, 32×32 training sample at the trainer's 8 fps, so the
whole motion the caption names is in it, uncropped). They replace the drawn value after the draw, so
every other attribute of a (seed, index) stays what it is without them.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from data.shards import list_sources, write_shards
from data.video import encode_h264

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "gray": (128, 128, 128),
    "cyan": (40, 200, 210),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {  # unit motion (dx, dy) in image coordinates
    "from left to right": (1, 0),
    "from right to left": (-1, 0),
    "from top to bottom": (0, 1),
    "from bottom to top": (0, -1),
}
SPEEDS = {"slowly": 0.4, "quickly": 0.9}  # fraction of the frame crossed during the clip
SIZES = [
    (64, 64),
    (96, 96),
    (96, 64),
    (64, 96),
    (112, 64),
    (64, 112),
    (128, 96),
    (96, 72),
    (128, 72),
]  # (W, H)
FPS = (8, 12, 15, 24, 30)


def shape_mask(shape: str, h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    """H×W bool mask of a shape of radius ``r`` centred at (cx, cy)."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(xs - cx) <= r) & (np.abs(ys - cy) <= r)
    # an upward triangle: inside the band under its apex and between its two slanted sides
    top, bottom = cy - r, cy + r
    half = (ys - top) / (2 * r) * r
    return (ys >= top) & (ys <= bottom) & (np.abs(xs - cx) <= half)


def describe(
    rng: np.random.Generator,
    still: bool,
    frames: tuple[int, int] = (8, 48),
    scale: int = 1,
    fps: int | None = None,
    size: tuple[int, int] | None = None,
) -> dict:
    """Random attributes of one sample and its caption.

    Args:
        rng: the sample's generator (everything is drawn from it, in a fixed order).
        still: a still image (no motion, no frames, no fps).
        frames: inclusive clip length range.
        scale: multiplies the drawn size.
        fps: if set, every clip's frame rate (the rate is still drawn, so later draws do not move).
        size: if set, every sample's (width, height) instead of the drawn ``scale``·size.
    """
    fg, bg = rng.choice(list(COLOURS), size=2, replace=False)
    shape = str(rng.choice(SHAPES))
    w, h = (scale * v for v in SIZES[rng.integers(len(SIZES))])
    if size is not None:
        w, h = size
    spec = {"shape": shape, "colour": str(fg), "background": str(bg), "width": w, "height": h}
    if still:
        spec["caption"] = f"a {fg} {shape} on a {bg} background"
        return spec
    direction = str(rng.choice(list(DIRECTIONS)))
    speed = str(rng.choice(list(SPEEDS)))
    spec.update(
        direction=direction,
        speed=speed,
        frames=int(rng.integers(frames[0], frames[1] + 1)),
        fps=int(rng.choice(FPS)),
    )
    if fps is not None:
        spec["fps"] = fps
    spec["caption"] = f"a {fg} {shape} moves {speed} {direction} on a {bg} background"
    return spec


def render(spec: dict, rng: np.random.Generator) -> np.ndarray:
    """T×H×W×3 uint8 frames (T = 1 for a still) for a spec from :func:`describe`."""
    w, h = spec["width"], spec["height"]
    r = 0.14 * min(w, h)
    frames = spec.get("frames", 1)
    dx, dy = DIRECTIONS.get(spec.get("direction"), (0, 0))
    travel = SPEEDS.get(spec.get("speed"), 0.0)
    # start so the whole path stays in frame; the cross-axis position is random
    along0 = 0.5 - travel / 2
    cross = rng.uniform(0.3, 0.7)
    out = np.empty((frames, h, w, 3), np.uint8)
    for f in range(frames):
        p = along0 + travel * (f / max(frames - 1, 1))
        u = p if (dx + dy) > 0 else 1 - p  # position along the motion axis, in [0, 1]
        # map [0, 1] to centres that keep the whole shape in frame
        cx, cy = (r + u * (w - 2 * r), cross * h) if dx else (cross * w, r + u * (h - 2 * r))
        if not dx and not dy:
            cx, cy = cross * w, rng.uniform(0.3, 0.7) * h
        out[f] = COLOURS[spec["background"]]
        out[f][shape_mask(spec["shape"], h, w, cx, cy, r)] = COLOURS[spec["colour"]]
    return out


def write_raw(
    folder: Path,
    num: int,
    seed: int,
    image_fraction: float,
    start: int = 0,
    frames=(8, 48),
    scale: int = 1,
    fps: int | None = None,
    size: tuple[int, int] | None = None,
) -> None:
    """Render ``num`` samples into ``folder`` as media files with sidecar captions (``frames``,
    ``scale``, ``fps``, ``size``: see :func:`describe`)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + num):
        rng = np.random.default_rng([seed, i])
        still = rng.random() < image_fraction
        spec = describe(rng, still, frames, scale, fps, size)
        pixels = render(spec, rng)
        if still:
            buf = io.BytesIO()
            fmt = "png" if rng.random() < 0.5 else "jpeg"
            Image.fromarray(pixels[0]).save(buf, format=fmt)
            path = folder / f"synthetic_{i:07d}.{'png' if fmt == 'png' else 'jpg'}"
            path.write_bytes(buf.getvalue())
        else:
            path = folder / f"synthetic_{i:07d}.mp4"
            path.write_bytes(encode_h264(pixels, spec["fps"]))
        path.with_suffix(".txt").write_text(spec["caption"], encoding="utf-8")


def generate(
    out_dir: Path,
    num: int,
    seed: int = 0,
    val_num: int = 0,
    image_fraction: float = 0.15,
    samples_per_shard: int = 64,
    processes: int = 1,
    frames: tuple[int, int] = (8, 48),
    scale: int = 1,
    fps: int | None = None,
    size: tuple[int, int] | None = None,
) -> dict:
    """Render and shard the dataset; returns the train index (``frames``, ``scale``, ``fps``, ``size``:
    see :func:`describe`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".raw-") as tmp:
        for prefix, count, start in (("train", num, 0), ("val", val_num, num)):
            if count == 0:
                continue
            raw = Path(tmp) / prefix
            write_raw(raw, count, seed, image_fraction, start, frames, scale, fps, size)
            index = write_shards(
                list_sources(raw), out_dir, prefix=prefix, max_samples=samples_per_shard, processes=processes
            )
            if prefix == "train":
                train_index = index
            shutil.rmtree(raw)
    return train_index


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data.synthetic", description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--num", type=int, default=512, help="training samples")
    p.add_argument("--val-num", type=int, default=0, help="held-out samples (val-*.tar)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-fraction", type=float, default=0.15, help="share of still images")
    p.add_argument("--samples-per-shard", type=int, default=64)
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--frames", default="8,48", help="clip length range MIN,MAX in frames")
    p.add_argument("--scale", type=int, default=1, help="multiply every resolution (1: 64–128 px)")
    p.add_argument("--fps", type=int, default=None, help="every clip's frame rate (default: drawn, 8–30)")
    p.add_argument("--size", default=None, help="every sample's WIDTHxHEIGHT (default: drawn, 64–128 px)")
    a = p.parse_args(argv)
    frames = tuple(int(v) for v in a.frames.split(","))
    if a.num < 1:
        p.error("--num must be at least 1")
    if a.fps is not None and a.fps < 1:
        p.error(f"--fps {a.fps}: must be at least 1")
    size = None
    if a.size is not None:
        try:
            size = tuple(int(v) for v in a.size.lower().split("x"))
        except ValueError:
            size = ()
        if len(size) != 2 or min(size) < 8 or any(v % 2 for v in size):
            p.error(f"--size {a.size!r}: expected WIDTHxHEIGHT, even numbers ≥ 8 (H.264 needs even sizes)")
    index = generate(
        a.out_dir,
        a.num,
        a.seed,
        a.val_num,
        a.image_fraction,
        a.samples_per_shard,
        a.processes,
        frames,
        a.scale,
        a.fps,
        size,
    )
    print(
        json.dumps(
            {
                "out_dir": str(a.out_dir),
                "shards": len(index["shards"]),
                "samples": index["samples"],
                "kinds": index["kinds"],
                "skipped": index["skipped_total"],
            }
        )
    )


if __name__ == "__main__":
    main()
