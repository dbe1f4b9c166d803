"""Variable-duration, variable-resolution buckets.

A bucket is a pixel-space clip shape (frames, height, width) with a per-data-parallel-rank batch size;
every batch is one bucket, so nothing is padded. :func:`buckets_from_budget` derives batch sizes that
keep the latent tokens per batch about constant; :func:`assign` maps a sample (from its ``json``
metadata alone, so resuming can skip batches without decoding) to the longest bucket its duration
covers at the target frame rate, at the nearest aspect ratio. Durations are never stretched: a clip is
sampled at ``min(target fps, source fps)``, and that rate travels with the sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Bucket:
    """A batch shape in pixels (frames = 1 for images) and its batch size per data-parallel rank."""

    frames: int
    height: int
    width: int
    batch_size: int

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @property
    def name(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"


@dataclass(frozen=True)
class Compression:
    """How a codec/VAE shrinks pixels into latents (Wan VAE: 4×8×8, causal: 1 + (F-1)/4 frames)."""

    temporal: int = 4
    spatial: int = 8
    causal: bool = True

    def __post_init__(self) -> None:
        for name in ("temporal", "spatial"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"codec {name} compression {v!r}: must be a whole number ≥ 1")

    def latent_frames(self, frames: int) -> int:
        if frames == 1:
            return 1
        return 1 + (frames - 1) // self.temporal if self.causal else frames // self.temporal

    def valid_frames(self, frames: int) -> bool:
        if frames == 1:
            return True
        return (frames - 1) % self.temporal == 0 if self.causal else frames % self.temporal == 0


@dataclass
class BucketConfig:
    """The bucket set and how samples are matched to it."""

    buckets: list[Bucket] = field(default_factory=list)
    """Explicit buckets (or use :func:`buckets_from_budget`)."""
    fps: float = 16.0
    """Target frame rate clips are sampled at (lower-fps sources keep their own rate)."""
    image_ratio: float | None = None
    """Preferred share of image batches in joint training (None: as they come in the data)."""

    def __post_init__(self) -> None:
        for b in self.buckets:
            if b.batch_size < 1 or min(b.frames, b.height, b.width) < 1:
                raise ValueError(f"bucket {b.name}: batch_size={b.batch_size} and sizes must be >= 1")


def load_bucket_file(path: str) -> BucketConfig:
    """A bucket file: JSON ``{"fps": 16, "image_ratio": null, "buckets": [[F, H, W, batch], …]}``."""
    import json

    def whole(v) -> int:  # 1.5 or true are typos, not 1
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{v!r} is not a whole number")
        return v

    def number(v, key: str) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"{key}={v!r} is not a number")
        return float(v)

    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        buckets = [Bucket(*(whole(v) for v in b)) for b in spec["buckets"]]
        ratio = spec.get("image_ratio")
        ratio = None if ratio is None else number(ratio, "image_ratio")
        return BucketConfig(buckets, fps=number(spec.get("fps", 16.0), "fps"), image_ratio=ratio)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(
            f"data.bucket_file={path}: {e} (expected {{'fps', 'buckets': [[F, H, W, batch]]}})"
        ) from e


def parse_ratio(ratio: str) -> float:
    """'16:9' → 16/9."""
    w, h = ratio.split(":")
    return float(w) / float(h)


def latent_tokens(
    frames: int, height: int, width: int, comp: Compression, patch: tuple[int, int, int]
) -> int:
    """Transformer tokens of one clip after the codec and the patchifier."""
    pt, ph, pw = patch
    lt = comp.latent_frames(frames)
    return math.ceil(lt / pt) * (height // comp.spatial // ph) * (width // comp.spatial // pw)


def latent_size(bucket: Bucket, comp: Compression) -> tuple[int, int, int]:
    """Latent (t, h, w) of a ``bucket`` clip after the codec (exact only when :func:`check_bucket`
    finds nothing: a causal VAE keeps 1 + (F-1)//temporal frames of any F, and h, w round down)."""
    return comp.latent_frames(bucket.frames), bucket.height // comp.spatial, bucket.width // comp.spatial


def _neighbours(value: int, step: int, offset: int = 0) -> str:
    """The valid values around ``value`` on the grid ``offset + k·step`` (k ≥ 0 above offset)."""
    below = offset + (value - offset) // step * step
    return " or ".join(str(v) for v in (below, below + step) if v > offset or (offset and v == offset))


def check_bucket(bucket: Bucket, comp: Compression, patch: tuple[int, int, int]) -> list[str]:
    """Why ``bucket`` does not suit a codec of compression ``comp`` and a model with spacetime patch
    ``patch`` (pt, ph, pw): one sentence per problem, each naming the bucket; empty when it suits.

    The codec must take the clip whole: a causal VAE encodes 1 + k·temporal frames (it would
    silently drop the rest), a non-causal codec k·temporal (so a single frame only when temporal is
    1). The latent height and width must be whole and divisible by the patch (H, W multiples of
    spatial × patch), and so must the latent frames.
    """
    pt, ph, pw = patch
    f, s, t = bucket.frames, comp.spatial, comp.temporal
    out = []
    if comp.causal and (f - 1) % t:
        out.append(
            f"bucket {bucket.name}: {f} frames: the causal codec (temporal {t}) encodes 1 + {t}k frames "
            f"and would silently keep {1 + (f - 1) // t * t} (use {_neighbours(f, t, offset=1)})"
        )
    elif not comp.causal and f % t:
        out.append(
            f"bucket {bucket.name}: {f} frame{'s' if f > 1 else ''} is not a multiple of the codec's "
            f"temporal compression {t} (use {_neighbours(f, t)})"
        )
    elif comp.latent_frames(f) % pt:
        out.append(
            f"bucket {bucket.name}: {comp.latent_frames(f)} latent frames are not divisible by the "
            f"temporal patch {pt} (model.arch.patch_size)"
        )
    for side, size, p in (("height", bucket.height, ph), ("width", bucket.width, pw)):
        if size % (s * p):
            out.append(
                f"bucket {bucket.name}: {side} {size} is not a multiple of {s * p} (codec spatial {s} × "
                f"patch {p}; use {_neighbours(size, s * p)})"
            )
    return out


def buckets_from_budget(
    token_budget: int,
    resolutions: tuple[int, ...] = (256, 512),
    aspect_ratios: tuple[str, ...] = ("1:1", "16:9", "9:16", "4:3", "3:4"),
    frame_counts: tuple[int, ...] = (1, 17, 33, 49),
    compression: Compression = Compression(),  # noqa: B008 (frozen dataclass)
    patch: tuple[int, int, int] = (1, 2, 2),
    max_batch: int = 256,
) -> list[Bucket]:
    """Buckets whose batch size keeps ``batch × tokens ≈ token_budget``.

    Args:
        token_budget: transformer tokens per batch per data-parallel rank.
        resolutions: base sides R; each aspect ratio a gets width ≈ R·√a, height ≈ R/√a (area ≈ R²),
            rounded to a multiple of ``compression.spatial × patch``.
        aspect_ratios: "W:H" strings.
        frame_counts: clip lengths in pixel frames (1 = images); each must suit the codec
            (1 + 4k for a causal 4× VAE).
        compression: the codec's compression (``Compression(1, 4, False)`` for the pixel codec).
        patch: the model's (pt, ph, pw).
        max_batch: cap on the batch size of tiny buckets.

    Buckets whose single sample exceeds the budget are left out.
    """
    step = compression.spatial * max(patch[1], patch[2])
    out = []
    for frames in frame_counts:
        if not compression.valid_frames(frames):
            raise ValueError(
                f"frame count {frames} does not suit the codec (temporal {compression.temporal})"
            )
        for res in resolutions:
            for ratio in aspect_ratios:
                a = parse_ratio(ratio)
                w = max(step, round(res * math.sqrt(a) / step) * step)
                h = max(step, round(res / math.sqrt(a) / step) * step)
                tokens = latent_tokens(frames, h, w, compression, patch)
                batch = min(max_batch, token_budget // tokens)
                if batch >= 1:
                    out.append(Bucket(frames, h, w, batch))
    return sorted(set(out), key=lambda b: (b.frames, b.height * b.width, b.aspect))


@dataclass(frozen=True)
class Assignment:
    """Where a sample goes: its bucket, the frame rate to sample at and the usable window."""

    bucket: Bucket
    fps: float
    window: tuple[float, float]  # (start, last frame time) in seconds the clip is taken from


def usable_window(meta: dict, fps: float) -> tuple[float, float]:
    """(start, last): the clip window, ending at the last source frame's timestamp."""
    src_fps = meta.get("fps") or fps
    start = float(meta.get("start", 0.0))
    last = min(float(meta.get("end", meta.get("duration", 0.0))), (meta["frames"] - 1) / src_fps + 1e-6)
    return start, last


def available_frames(meta: dict, fps: float) -> int:
    """Frames a video provides when sampled at ``fps`` inside its window (never stretched)."""
    start, last = usable_window(meta, fps)
    if last < start:
        return 0
    return int(math.floor((last - start) * fps + 1e-6)) + 1


def assign(meta: dict, cfg: BucketConfig) -> Assignment | None:
    """The bucket for a sample, from its metadata; None if no bucket fits (too short or no match).

    Images (and 1-frame videos) go to 1-frame buckets. A video goes to the longest bucket with
    frames ≤ what its duration covers at the target rate, among buckets of the nearest aspect ratio; within
    those, the largest area not above the source's (to avoid upscaling), else the smallest.
    """
    if "bucket" in meta:  # an encoded (latent) sample: its shape is fixed, so only its own bucket fits
        f, h, w = (int(v) for v in meta["bucket"].split("x"))
        match = [b for b in cfg.buckets if (b.frames, b.height, b.width) == (f, h, w)]
        return Assignment(match[0], float(meta.get("fps") or cfg.fps), (0.0, 0.0)) if match else None
    image = meta["kind"] == "image" or meta.get("frames", 1) == 1
    fps = min(cfg.fps, meta.get("fps") or cfg.fps)
    if image:
        candidates = [b for b in cfg.buckets if b.frames == 1]
        n_avail = 1
    else:
        n_avail = available_frames(meta, fps)
        candidates = [b for b in cfg.buckets if 1 < b.frames <= n_avail]
    if not candidates:
        return None
    aspect = meta["width"] / meta["height"]
    best = min(abs(math.log(b.aspect / aspect)) for b in candidates)
    candidates = [b for b in candidates if abs(math.log(b.aspect / aspect)) <= best + 1e-9]
    longest = max(b.frames for b in candidates)
    candidates = [b for b in candidates if b.frames == longest]
    area = meta["width"] * meta["height"]
    fitting = [b for b in candidates if b.width * b.height <= area]
    bucket = (
        max(fitting, key=lambda b: b.width * b.height)
        if fitting
        else min(candidates, key=lambda b: b.width * b.height)
    )
    return Assignment(bucket, fps, (0.0, 0.0) if image else usable_window(meta, fps))


def clip_start(assignment: Assignment, u: float) -> float:
    """Clip start in the window for a uniform draw ``u`` ∈ [0, 1) (0 for images)."""
    b = assignment.bucket
    if b.frames == 1:
        return assignment.window[0]
    needed = (b.frames - 1) / assignment.fps
    slack = max(0.0, assignment.window[1] - assignment.window[0] - needed - 1e-4)
    return assignment.window[0] + u * slack


def main(argv: list[str] | None = None) -> int:
    """``python -m data.buckets suggest SHARDS … > buckets.json`` (:mod:`data.bucket_suggest`)."""
    import argparse

    from data import bucket_suggest

    p = argparse.ArgumentParser(
        prog="python -m data.buckets", description="Bucket files for data.bucket_file."
    )
    sub = p.add_subparsers(dest="command", required=True)
    bucket_suggest.add_parser(sub)
    return bucket_suggest.run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
