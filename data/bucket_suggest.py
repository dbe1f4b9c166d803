"""Buckets made for a dataset: ``python -m data.buckets suggest SHARDS > buckets.json``.

    python -m data.buckets suggest SHARDS [--budget 4096] [--codec pixel] [--patch 1,2,2] [--fps 16]
        [--durations 3] [--min-clips 8] [--aspects 3] [--resolution R] [--max-batch 256] [--prefix train]

Uses only the shards' ``{key}.json`` metadata (the shards are read through, nothing is decoded; a
sample the loader would skip is skipped here too) and derives a bucket file for ``data.bucket_file``:

- **aspect ratios**: the clips' ratios grouped (within 10%), the ``--aspects`` most common groups; each
  group's size is its median clip area (or ``--resolution`` R: area R²) at the group's median ratio,
  height and width rounded to what the codec and the patch take;
- **durations**: each clip's longest frame count the codec and the temporal patch take (at
  ``min(--fps, its own fps)``, as the loader samples it), and from those the ``--durations`` lengths
  (at most one per ``--min-clips`` clips, so a small set fills its batches) at evenly spaced ranks, the
  shortest always among them, so every clip long enough for any bucket gets one;
- **batch sizes**: ``--budget`` tokens per batch over the tokens of one sample (at least 1), so
  ``batch × tokens ≤ budget``; a length whose single sample is over the budget is cut to one that fits.

Every bucket is checked with :func:`data.buckets.check_bucket` (the rule the trainer and the dry run
apply), each clip is placed with :func:`data.buckets.assign` (the loader's rule), buckets no clip
lands in are left out, and stderr says how many clips each bucket takes and how many fit none (why).
Latent shards (``data.encode``) carry their bucket: those buckets are listed with budget batch sizes.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import math
import statistics
import sys
from dataclasses import dataclass

from data.buckets import (
    Bucket,
    BucketConfig,
    Compression,
    assign,
    available_frames,
    check_bucket,
    latent_tokens,
)
from data.pipeline import DataConfig, limits, list_shards
from data.reader import read_shard
from data.stream import Errors, validate

ASPECT_TOLERANCE = math.log(1.1)  # ratios within 10% of each other are one group (1.33 and 1.4: one)


@dataclass(frozen=True)
class Clip:
    """What the suggestion uses of a sample: its key and parsed ``{key}.json``."""

    key: str
    meta: dict

    @property
    def image(self) -> bool:
        return self.meta["kind"] == "image" or self.meta.get("frames", 1) == 1

    @property
    def aspect(self) -> float:
        return self.meta["width"] / self.meta["height"]


@dataclass
class Suggestion:
    """The bucket file and what it makes of the clips."""

    buckets: BucketConfig
    counts: dict[Bucket, int]  # clips each bucket takes
    unfit: dict[str, list[str]]  # reason → keys of the clips no bucket takes
    notes: list[str]  # over-budget buckets and the like, for stderr


def read_clips(spec: str, prefix: str = "train") -> tuple[list[Clip], dict]:
    """The samples of the shards ``spec`` names (a directory, glob or list, as ``data.shards``), with
    the loader's checks; and the summary of what was skipped."""
    cfg = DataConfig(shards=spec, prefix=prefix)
    lim, errors, seen, clips = limits(cfg), Errors(), set(), []
    for shard in list_shards(cfg, key="SHARDS"):
        errors.shards += 1
        for raw in read_shard(shard, errors, lim):
            sample = validate(raw, errors, seen, lim)
            if sample is not None:
                clips.append(Clip(sample["__key__"], sample["__meta__"]))
    return clips, errors.summary()


def frames_ok(frames: int, comp: Compression, patch: tuple[int, int, int]) -> bool:
    """Whether ``check_bucket`` accepts ``frames`` for this codec and patch (at a side it always takes)."""
    side = comp.spatial * math.lcm(patch[1], patch[2])
    return not check_bucket(Bucket(frames, side, side, 1), comp, patch)


def valid_lengths(
    comp: Compression, patch: tuple[int, int, int], upto: int, fits=lambda f: True
) -> list[int]:
    """Frame counts > 1 up to ``upto`` that the codec and patch take, ending at the first that does not
    ``fit`` (the budget) once there is one."""
    out: list[int] = []
    for f in range(2, upto + 1):
        if out and not fits(f):
            break
        if frames_ok(f, comp, patch):
            out.append(f)
    return out


def aspect_groups(clips: list[Clip], most: int) -> list[list[Clip]]:
    """The ``most`` largest groups of clips whose aspect ratios lie within 10% of the group's first."""
    groups: list[list[Clip]] = []
    for clip in sorted(clips, key=lambda c: c.aspect):
        if groups and math.log(clip.aspect / groups[-1][0].aspect) <= ASPECT_TOLERANCE:
            groups[-1].append(clip)
        else:
            groups.append([clip])
    return sorted(groups, key=len, reverse=True)[:most]


def group_size(
    group: list[Clip], comp: Compression, patch: tuple[int, int, int], resolution: int | None
) -> tuple[int, int]:
    """(height, width) of a group's buckets: its median area (or ``resolution``²) at its median ratio,
    each side rounded to a multiple of the codec's spatial factor × the patch."""
    aspect = statistics.median_low(c.aspect for c in group)
    area = (
        resolution**2
        if resolution
        else statistics.median_low(c.meta["width"] * c.meta["height"] for c in group)
    )
    step_h, step_w = comp.spatial * patch[1], comp.spatial * patch[2]
    h = max(step_h, round(math.sqrt(area / aspect) / step_h) * step_h)
    w = max(step_w, round(math.sqrt(area * aspect) / step_w) * step_w)
    return h, w


def suggest(
    clips: list[Clip],
    comp: Compression,
    patch: tuple[int, int, int],
    budget: int,
    fps: float = 16.0,
    durations: int = 3,
    aspects: int = 3,
    resolution: int | None = None,
    max_batch: int = 256,
    min_clips: int = 8,
) -> Suggestion:
    """Buckets for ``clips`` (see the module doc)."""
    notes: list[str] = []

    def batch(f: int, h: int, w: int) -> int:
        tokens = latent_tokens(f, h, w, comp, patch)
        if tokens > budget:
            notes.append(f"bucket {f}x{h}x{w}: one sample is {tokens} tokens, over --budget {budget}")
        return max(1, min(max_batch, budget // tokens))

    latent = [c for c in clips if "bucket" in c.meta]
    shapes = {tuple(int(v) for v in c.meta["bucket"].split("x")) for c in latent}
    buckets = {Bucket(f, h, w, batch(f, h, w)) for f, h, w in shapes}
    raw = [c for c in clips if "bucket" not in c.meta]
    videos, images = [c for c in raw if not c.image], [c for c in raw if c.image]
    if images and frames_ok(1, comp, patch):
        for group in aspect_groups(images, aspects):
            h, w = group_size(group, comp, patch, resolution)
            buckets.add(Bucket(1, h, w, batch(1, h, w)))
    if videos:
        buckets |= _video_buckets(
            videos, comp, patch, budget, fps, durations, aspects, resolution, min_clips, batch
        )
    cfg = BucketConfig(sorted(buckets, key=lambda b: (b.frames, b.height * b.width, b.aspect)), fps=fps)
    problems = [p for b in cfg.buckets for p in check_bucket(b, comp, patch)]
    if problems:  # made to suit the codec and patch: a problem here is a bug of this module
        raise RuntimeError(problems[0])
    counts, unfit = _place(clips, cfg, comp, patch, fps)
    # a bucket no clip lands in changes no other clip's place (assign picks among the candidates)
    cfg.buckets = [b for b in cfg.buckets if counts[b]]
    return Suggestion(cfg, {b: counts[b] for b in cfg.buckets}, unfit, sorted(set(notes)))


def _video_buckets(
    videos, comp, patch, budget, fps, durations, aspects, resolution, min_clips, batch
) -> set[Bucket]:
    """Each aspect group's size × the chosen lengths, each length cut to what fits the budget there."""
    sizes = [group_size(g, comp, patch, resolution) for g in aspect_groups(videos, aspects)]
    available = [available_frames(c.meta, min(fps, c.meta.get("fps") or fps)) for c in videos]
    h0, w0 = min(sizes, key=lambda s: s[0] * s[1])  # no longer length fits the budget at a larger size
    fits = lambda f: latent_tokens(f, h0, w0, comp, patch) <= budget  # noqa: E731
    lengths = valid_lengths(comp, patch, max(available), fits)
    if not lengths:
        return set()
    caps = {}  # per size, the longest length whose one sample fits the budget (else the shortest)
    for h, w in sizes:
        fitting = [f for f in lengths if latent_tokens(f, h, w, comp, patch) <= budget]
        caps[h, w] = fitting[-1] if fitting else lengths[0]

    natural = []  # each clip's longest usable length, cut to its group's budget cap
    for c, n in zip(videos, available, strict=True):
        usable = bisect.bisect_right(lengths, n)
        if usable:
            size = min(sizes, key=lambda s: abs(math.log(s[1] / s[0] / c.aspect)))
            natural.append(min(lengths[usable - 1], caps[size]))
    if not natural:
        return set()
    natural.sort()
    durations = max(1, min(durations, len(natural) // min_clips))  # few clips: fuller batches
    picks = {natural[i * len(natural) // durations] for i in range(durations)}
    shapes = {(min(f, caps[h, w]), h, w) for f in picks for h, w in sizes}
    return {Bucket(f, h, w, batch(f, h, w)) for f, h, w in shapes}


def _place(clips, cfg: BucketConfig, comp, patch, fps) -> tuple[collections.Counter, dict[str, list[str]]]:
    """Clips per bucket by the loader's :func:`assign`; the rest by why they fit none."""
    counts: collections.Counter = collections.Counter()
    unfit: dict[str, list[str]] = collections.defaultdict(list)
    shortest = min((b.frames for b in cfg.buckets if b.frames > 1), default=None)
    for c in clips:
        a = assign(c.meta, cfg)
        if a is not None:
            counts[a.bucket] += 1
        elif "bucket" in c.meta:
            unfit[f"latent bucket {c.meta['bucket']} not configured"].append(c.key)
        elif c.image:
            ok = frames_ok(1, comp, patch)
            unfit[
                "a still" if ok else f"a still, and no 1-frame bucket suits this codec and patch {patch}"
            ].append(c.key)
        elif shortest is None:
            unfit["no clip is long enough for any frame count the codec and patch take"].append(c.key)
        else:
            unfit[f"shorter than {shortest} frames at {fps:g} fps"].append(c.key)
    return counts, dict(unfit)


def bucket_file(s: Suggestion, comment: str) -> str:
    """The JSON text of a bucket file (:func:`data.buckets.load_bucket_file`), one bucket a line."""
    rows = ",\n".join(f"    [{b.frames}, {b.height}, {b.width}, {b.batch_size}]" for b in s.buckets.buckets)
    head = json.dumps({"comment": comment, "fps": s.buckets.fps, "image_ratio": None}, indent=2)[:-2]
    return f'{head},\n  "buckets": [\n{rows}\n  ]\n}}\n'


def _patch(text: str) -> tuple[int, int, int]:
    try:
        pt, ph, pw = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected T,H,W (e.g. 1,2,2)") from None
    if min(pt, ph, pw) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: each patch size must be >= 1")
    return pt, ph, pw


def _positive(kind):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"{text!r}: must be > 0")
        return v

    return parse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "suggest",
        help="print a bucket file (JSON) for data.bucket_file, made from the shards' own clips",
        description="Print a bucket file made for the shards' clips (durations, aspect ratios, sizes) on "
        "stdout, and how many clips each bucket takes on stderr.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("shards", help="shard directory, glob or comma-separated .tar files (as data.shards)")
    p.add_argument("--prefix", default="train", help="shard name prefix in a directory (train, val)")
    p.add_argument("--budget", type=_positive(int), default=4096, help="tokens per batch (per GPU)")
    p.add_argument("--codec", default="pixel", help="data.codec: pixel, a local VAE folder or latents:C,T,S")
    p.add_argument("--patch", type=_patch, default=(1, 2, 2), help="model.arch.patch_size as T,H,W")
    p.add_argument("--fps", type=_positive(float), default=16.0, help="frame rate clips are sampled at")
    p.add_argument("--durations", type=_positive(int), default=3, help="clip lengths (frame counts)")
    p.add_argument("--aspects", type=_positive(int), default=3, help="aspect ratios")
    p.add_argument("--resolution", type=_positive(int), help="bucket area R×R (default: the clips' own)")
    p.add_argument("--max-batch", type=_positive(int), default=256, help="largest batch size")
    p.add_argument(
        "--min-clips", type=_positive(int), default=8, help="at most one clip length per this many clips"
    )


def run(a: argparse.Namespace) -> int:
    from data.encoders import codec_geometry  # torch and the codecs: only for this command

    try:
        comp, _ = codec_geometry(a.codec)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
        return _fail(f"--codec {a.codec}: {e}")
    try:
        clips, summary = read_clips(a.shards, a.prefix)
    except (OSError, ValueError) as e:
        return _fail(str(e))
    if not clips:
        return _fail(f"{a.shards}: no usable sample (skipped: {summary['skipped'] or 'none'})")
    s = suggest(
        clips, comp, a.patch, a.budget, a.fps, a.durations, a.aspects, a.resolution, a.max_batch, a.min_clips
    )
    if not s.buckets.buckets:
        why = "; ".join(f"{len(k)} {r}" for r, k in s.unfit.items())
        return _fail(f"{a.shards}: no bucket fits any clip ({why})")
    comment = (
        f"python -m data.buckets suggest: {len(clips)} clips; codec {a.codec}, patch "
        f"{','.join(map(str, a.patch))}, {a.budget} tokens a batch. [frames, height, width, batch]"
    )
    sys.stdout.write(bucket_file(s, comment))
    _report(s, clips, summary, comp, a.patch, a.budget)
    return 0


def _report(s: Suggestion, clips, summary, comp, patch, budget) -> None:
    err = sys.stderr
    print(
        f"{len(clips)} clips read (skipped: {summary['skipped'] or 'none'}); "
        f"{len(s.buckets.buckets)} buckets:",
        file=err,
    )
    for b in s.buckets.buckets:
        tokens = latent_tokens(b.frames, b.height, b.width, comp, patch)
        print(
            f"  {b.name:>14}  batch {b.batch_size:>3}  ({tokens} tokens a sample, {tokens * b.batch_size} a "
            f"batch)  {s.counts[b]} clip{'s' * (s.counts[b] != 1)}",
            file=err,
        )
    fit_none = sum(len(keys) for keys in s.unfit.values())
    print(f"fit no bucket: {fit_none}", file=err)
    for reason, keys in s.unfit.items():
        print(f"  {len(keys)} {reason} (e.g. {keys[0]})", file=err)
    for note in s.notes:
        print(f"note: {note}", file=err)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
