"""The per-worker sample stream: shards → validated samples → shuffled → bucketed batches → decoded.

Everything up to batch formation uses only tar members and ``{key}.json`` metadata, and every random
choice comes from a generator seeded by (seed, epoch, dp_rank, worker) or (seed, epoch, key). So a
worker's sequence of batches is a pure function of those numbers, and resuming can re-form and skip the
batches already consumed without decoding a single frame.

Bad input costs only its sample: each skip is counted by reason with its shard and key. Any exception
while checking or decoding one sample (not KeyboardInterrupt, SystemExit or MemoryError) is such a skip.
"""

from __future__ import annotations

import collections
import io
import logging
import math
import re
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from data.batch import Batch, collate
from data.buckets import Assignment, BucketConfig, Compression, assign, clip_start
from data.meta import parse_meta
from data.reader import KNOWN_EXTS, Limits, Shard, read_shard
from data.video import IMAGE_EXTS, VIDEO_EXTS, MediaError, decode_clip, decode_image

log = logging.getLogger(__name__)

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
LATENT_EXTS = ("latent.npy",)
# what costs a whole shard (or its rest): refused unread, or broken while reading
SHARD_LOSSES = ("compressed_tar", "truncated_tar", "bad_tar")
# The share of lost shards is taken over at least this many, so that one lost shard alone stays under
# the default 5% (1/20) wherever it falls in the order, while two lost among a few shards do not.
MIN_SHARDS_FOR_THRESHOLD = 20


@dataclass
class Errors:
    """Skipped samples by reason, with where they came from."""

    seen: int = 0  # samples read (each ends delivered, skipped or filtered)
    skipped_samples: int = 0  # skips that cost a sample (not a shard or a stray member)
    counts: collections.Counter = field(default_factory=collections.Counter)
    filtered: collections.Counter = field(default_factory=collections.Counter)  # fine samples no bucket fits
    by_shard: collections.Counter = field(default_factory=collections.Counter)
    examples: dict = field(default_factory=dict)  # reason → "shard:key" of the first one
    decoded: int = 0  # samples decoded, and the seconds it took (for benchmarks.dataloader)
    decode_s: float = 0.0
    shards: int = 0  # shards opened
    shards_lost: int = 0  # of them refused or broken (SHARD_LOSSES)
    lost: dict = field(default_factory=dict)  # shard → reason, the first few lost

    def add(self, reason: str, shard: str, key: str, detail: str = "", sample: bool = True) -> None:
        """Count a skip. ``sample`` False: what was lost is not one sample (a broken or refused tar, a
        member with no usable name), so it is not in ``seen``."""
        self.counts[reason] += 1
        self.skipped_samples += sample
        self.by_shard[shard] += 1
        if reason in SHARD_LOSSES:
            self.shards_lost += 1
            if len(self.lost) < 8:  # enough to name in an abort; the summary travels with every batch
                self.lost[shard] = reason
        self.examples.setdefault(reason, f"{shard}:{key}")
        log.warning("skipping %s in %s: %s%s", key, shard, reason, f" ({detail})" if detail else "")

    def filter(self, reason: str, n: int = 1) -> None:
        self.filtered[reason] += n  # not bad input: does not count toward the error rate

    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict:
        return {
            "seen": self.seen,
            "skipped_samples": self.skipped_samples,
            "skipped": dict(self.counts),
            "filtered": dict(self.filtered),
            "examples": dict(self.examples),
            "decoded": self.decoded,
            "decode_s": self.decode_s,
            "shards": self.shards,
            "shards_lost": self.shards_lost,
            "lost": dict(self.lost),
        }


@dataclass(frozen=True)
class Expect:
    """What the model takes from a latent shard. Given to :func:`data.pipeline.build_loader` (see
    ``launch.batches.expect_for``), every latent sample must match it exactly for its bucket F×H×W, or
    it is a ``shape_mismatch`` skip naming what differs; a field left None is not checked. Without
    it, a foreign latent (another VAE's channels, another text encoder's width) that agrees with its
    own json reaches the model and stops the run."""

    channels: int | None = None
    """Latent channels C (``model.arch.in_channels``)."""
    compression: Compression | None = None
    """The codec's compression: t = ``compression.latent_frames(F)`` (1 + (F-1)/temporal for a causal
    VAE), h = H / spatial, w = W / spatial."""
    text_dim: int | None = None
    """Width D of the text states (``model.arch.text_dim``, when the model conditions on text)."""

    def differences(self, bucket: str, shape: list[int], text_shape: list[int] | None) -> list[str]:
        """What of a latent sample's declared ``latent_shape`` (C, t, h, w) and ``text_shape`` (L, D)
        differs from what the model takes for ``bucket`` ("FxHxW")."""
        f, h, w = (int(v) for v in bucket.split("x"))
        want: dict[str, int | str | None] = {"C": self.channels}
        if self.compression is not None:
            s = self.compression.spatial
            want["t"] = self.compression.latent_frames(f)
            want["h"] = h // s if h % s == 0 else f"{h}/{s}"  # no whole latent: nothing matches
            want["w"] = w // s if w % s == 0 else f"{w}/{s}"
        out = []
        for name, value in zip("Cthw", shape, strict=True):
            if want.get(name) is not None and want[name] != value:
                out.append(f"{name}={value} (expected {want[name]})")
        if self.text_dim is not None and text_shape and text_shape[-1] != self.text_dim:
            out.append(f"text width {text_shape[-1]} (expected {self.text_dim})")
        return out


@dataclass
class StreamSpec:
    """What one worker reads and how: everything that determines its batches."""

    shards: list[Shard | str]  # a str is always a local file
    buckets: BucketConfig
    seed: int
    epoch: int
    stream_id: tuple[int, ...]  # (dp_rank, worker): seeds the shuffle
    shuffle_buffer: int = 64
    random_crop: bool = False
    error_threshold: float = 0.05
    min_samples_for_threshold: int = 50
    drop_partial: bool = False  # drop each bucket's last, partial batch of the epoch (see DataConfig)
    clip_decoder: Callable = decode_clip  # a video's clip → frames (benchmarks.dataloader: its baseline)
    limits: Limits = field(default_factory=Limits)  # pixels per picture, bytes per member, compression
    expect: Expect | None = None  # what the model takes from a latent sample (None: its json's word)


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) & 0xFFFFFFFF for p in parts])


def _key_seed(key: str) -> int:
    return zlib.crc32(key.encode())


def validate(
    sample: dict,
    errors: Errors,
    seen: set[str],
    limits: Limits = Limits(),  # noqa: B008 (frozen dataclass)
    expect: Expect | None = None,
) -> dict | None:
    """Metadata + media check; the sample with ``__meta__`` (schema-checked, :func:`data.meta.parse_meta`)
    and ``__text__`` (the caption) added, or None (counted with its reason). A latent sample is held to
    its json and its bucket, and to ``expect`` when given."""
    key, shard = sample["__key__"], sample["__shard__"]
    errors.seen += 1
    try:
        reason, detail = _check(sample, seen, limits, expect)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 (one sample's bytes must never stop the stream)
        reason, detail = "bad_sample", f"{type(e).__name__}: {e}"
    if reason is not None:
        errors.add(reason, shard, key[:80], detail)
        return None
    return sample


def _check(sample: dict, seen: set[str], limits: Limits, expect: Expect | None) -> tuple[str | None, str]:
    """``(reason, detail)`` why the sample cannot be used, or ``(None, "")`` after adding its fields."""
    key = sample["__key__"]
    if "__error__" in sample:  # found while reading the tar (a member over the size limit)
        return sample["__error__"]
    if not _SAFE_KEY.match(key):
        return "unsafe_key", ""
    if key in seen:
        return "duplicate_key", ""
    seen.add(key)
    unknown = [e for e in sample if not e.startswith("__") and e not in KNOWN_EXTS]
    media = [e for e in sample if e in VIDEO_EXTS or e in IMAGE_EXTS or e in LATENT_EXTS]
    if not media:
        return ("unknown_extension" if unknown else "missing_media"), ",".join(unknown)[:80]
    if "json" not in sample:
        return "missing_metadata", ""
    try:
        meta = parse_meta(sample["json"], limits.max_pixels)
    except MediaError as e:
        return e.reason, str(e)
    if "txt" not in sample and "text.npy" not in sample:
        return "missing_caption", ""
    try:
        text = sample["txt"].decode("utf-8").strip() if "txt" in sample else ""
    except UnicodeDecodeError as e:
        return "bad_caption", f"caption is not UTF-8 ({e})"
    if meta["kind"] == "video" and meta.get("frames", 0) < 1:
        return "zero_frames", ""
    if media[0] == "latent.npy":
        reason, detail = _check_latent_meta(meta, expect)
        if reason is not None:
            return reason, detail
    sample["__meta__"], sample["__text__"], sample["__media__"] = meta, text, media[0]
    return None, ""


def _check_latent_meta(meta: dict, expect: Expect | None = None) -> tuple[str | None, str]:
    """A latent sample's json must declare its bucket and a C×t×h×w ``latent_shape`` (data.encode
    writes both) that some codec could make of that bucket: one integer spatial factor for height and
    width, no more latent frames than pixel frames, one for a still; with ``expect``, exactly the shape
    (and text width) the model takes. The array is held to that shape when decoded, so a single sample
    can never bring a latent of another size into a batch."""
    shape = meta.get("latent_shape")
    if "bucket" not in meta or shape is None:
        return "bad_metadata", "a latent sample's json must declare 'bucket' and 'latent_shape'"
    if len(shape) != 4:
        return "shape_mismatch", f"latent_shape {shape} is not C×t×h×w"
    f, h, w = (int(v) for v in meta["bucket"].split("x"))
    _, lt, lh, lw = shape
    factor = h // lh
    if factor < 1 or (lh * factor, lw * factor) != (h, w) or lt > f or (f == 1 and lt != 1):
        return "shape_mismatch", f"latent_shape {shape} is no codec's latent of bucket {meta['bucket']}"
    wrong = expect.differences(meta["bucket"], shape, meta.get("text_shape")) if expect else []
    if wrong:
        return "shape_mismatch", f"latent_shape {shape} of bucket {meta['bucket']}: {', '.join(wrong)}"
    return None, ""


def shuffled(samples: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    """A seeded shuffle buffer: fill to ``size``, then emit a random element per new arrival."""
    if size <= 1:
        yield from samples
        return
    buf: list[dict] = []
    for s in samples:
        buf.append(s)
        if len(buf) >= size:
            i = int(rng.integers(len(buf)))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    while buf:
        i = int(rng.integers(len(buf)))
        buf[i], buf[-1] = buf[-1], buf[i]
        yield buf.pop()


def decode_sample(sample: dict, a: Assignment, spec: StreamSpec) -> dict:
    """Decoded tensors of one :func:`validate`-d sample for its bucket; raises MediaError on failure."""
    key, b, max_pixels = sample["__key__"], a.bucket, spec.limits.max_pixels
    u = _rng(spec.seed, spec.epoch, _key_seed(key))
    offset = tuple(u.random(2)) if spec.random_crop else (0.5, 0.5)
    ext = sample["__media__"]
    if ext == "latent.npy":
        shape = tuple(sample["__meta__"]["latent_shape"])  # validate() checked it against the bucket
        out = {"latent": torch.from_numpy(_npy(sample, "latent.npy", shape))}
    else:
        data = sample[ext]
        if ext in IMAGE_EXTS:
            frames = decode_image(data, (b.width, b.height), offset, max_pixels)
        else:
            start = clip_start(a, float(u.random()))
            size = (b.width, b.height)
            frames = spec.clip_decoder(data, start, b.frames, a.fps, size, offset, max_pixels, ext)
        video = torch.from_numpy(np.array(frames)).permute(3, 0, 1, 2)  # C, T, H, W (a writable copy)
        out = {"video": video.float().div_(127.5).sub_(1.0)}
    if "text.npy" in sample:
        declared = sample["__meta__"].get("text_shape")  # L, D (data.encode writes it)
        emb = _npy(sample, "text.npy", tuple(declared) if declared else 2)
        width = spec.expect.text_dim if spec.expect is not None else None
        if width is not None and emb.shape[-1] != width:  # none declared, or a raw sample's states
            raise MediaError("shape_mismatch", f"text.npy is {emb.shape}, text width {width} expected")
        out["text_emb"] = torch.from_numpy(emb)
        out["text_mask"] = None
        if "text_mask.npy" in sample:
            out["text_mask"] = torch.from_numpy(_npy(sample, "text_mask.npy", emb.shape[:1])).bool()
    if "label" in sample["__meta__"]:  # a non-negative int: the schema checked it
        out["label"] = sample["__meta__"]["label"]
    out.update(text=sample["__text__"], fps=a.fps, key=key)
    return out


def _npy(sample: dict, ext: str, want: tuple[int, ...] | int) -> np.ndarray:
    """The array in a ``.npy`` member: never unpickled, refused when its header declares more data than
    the member holds (numpy allocates the declared size before reading any of it), and a
    ``shape_mismatch`` (found from the header, before reading) unless its shape is ``want`` (a tuple)
    or has ``want`` dimensions (an int)."""
    data = sample[ext]
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f".npy format version {version}")
        read = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read(f)
        if shape != want if isinstance(want, tuple) else len(shape) != want:
            expected = want if isinstance(want, tuple) else f"{want}-D"
            raise MediaError("shape_mismatch", f"{ext} is {shape}, not {expected}")
        declared = math.prod(shape) * dtype.itemsize
        if declared > len(data) - f.tell():
            raise ValueError(
                f"shape {shape} of {dtype} needs {declared} bytes; it holds {len(data) - f.tell()}"
            )
        return np.load(io.BytesIO(data), allow_pickle=False)  # never unpickle shard content
    except MediaError:  # a ValueError too, with its own reason
        raise
    except ValueError as e:
        raise MediaError("bad_array", f"{ext}: {e}"[:200]) from e


class _RatioMixer:
    """Holds back image or video batches so their shares approach ``image_ratio`` (deterministic)."""

    def __init__(self, ratio: float | None):
        self.ratio = ratio
        self.held: dict[bool, collections.deque] = {True: collections.deque(), False: collections.deque()}
        self.emitted = {True: 0, False: 0}

    def push(self, is_image: bool, item) -> Iterator:
        if self.ratio is None:
            yield item
            return
        self.held[is_image].append(item)
        yield from self._drain(final=False)

    def _drain(self, final: bool) -> Iterator:
        while self.held[True] or self.held[False]:
            total = self.emitted[True] + self.emitted[False] + 1
            want_image = (self.emitted[True] + 1) / total <= self.ratio + 1e-9
            kind = want_image if self.held[want_image] else (not want_image if final else None)
            if kind is None:
                return
            self.emitted[kind] += 1
            yield self.held[kind].popleft()

    def flush(self) -> Iterator:
        if self.ratio is not None:
            yield from self._drain(final=True)


def batches(spec: StreamSpec, errors: Errors, skip: int = 0) -> Iterator[tuple[int, dict | None]]:
    """``(index, batch)`` for the batches this worker forms in the epoch, in order, from ``skip`` on.

    The first ``skip`` batches are formed from metadata and dropped without decoding (resuming). A
    batch whose samples all fail to decode is None. The error-rate threshold is checked as samples arrive.
    """
    for index, (a, members) in enumerate(_formed_batches(spec, errors)):
        if index >= skip:
            yield index, _decode_batch(members, a, spec, errors)


def _formed_batches(spec: StreamSpec, errors: Errors) -> Iterator[tuple[Assignment, list]]:
    """``(assignment, [(sample, assignment), …])`` per batch: metadata only, nothing decoded. Each
    bucket's batches are full but the last of the epoch, which is short unless ``spec.drop_partial``."""
    seen: set[str] = set()
    buffers: dict = collections.defaultdict(list)
    mixer = _RatioMixer(spec.buckets.image_ratio)

    def samples() -> Iterator[dict]:
        for shard in spec.shards:
            errors.shards += 1
            for raw in read_shard(shard, errors, spec.limits):
                sample = validate(raw, errors, seen, spec.limits, spec.expect)
                _check_rate(errors, spec)
                if sample is not None:
                    yield sample

    for sample in shuffled(samples(), spec.shuffle_buffer, _rng(spec.seed, spec.epoch, *spec.stream_id)):
        meta = sample["__meta__"]
        a = assign(meta, spec.buckets)
        if a is None:
            if "bucket" in meta:  # an encoded sample whose bucket is not in this config
                errors.filter("bucket_not_configured")
            else:
                errors.filter("shorter_than_any_bucket" if meta["kind"] == "video" else "no_image_bucket")
            continue
        buf = buffers[a.bucket]
        buf.append((sample, a))
        if len(buf) == a.bucket.batch_size:
            buffers[a.bucket] = []
            yield from mixer.push(a.bucket.frames == 1, (a, buf))
    # what is left of each bucket is too few for a full batch: let it through as a short batch (every
    # sample is seen each epoch; the trainer weights the loss per sample), or drop it (unused this
    # epoch). Either way the order is a function of the stream's seeds, so resuming re-forms it.
    for bucket, buf in buffers.items():
        if not buf:
            continue
        if spec.drop_partial:
            errors.filter("partial_batch", len(buf))
        else:
            yield from mixer.push(bucket.frames == 1, (buf[-1][1], buf))
    yield from mixer.flush()


def _decode_batch(members: list, a: Assignment, spec: StreamSpec, errors: Errors) -> Batch | None:
    items = []
    for sample, sa in members:
        start = time.perf_counter()
        try:
            items.append((sample, decode_sample(sample, sa, spec)))
        except MemoryError:
            raise
        except MediaError as e:
            errors.add(e.reason, sample["__shard__"], sample["__key__"], str(e))
        except Exception as e:  # noqa: BLE001 (an unforeseen failure of one file is still one sample)
            errors.add("decode_error", sample["__shard__"], sample["__key__"], f"{type(e).__name__}: {e}")
        errors.decoded += 1
        errors.decode_s += time.perf_counter() - start
    items = _same_shapes(items, errors)
    return collate(items, a.bucket.name) if items else None


def _same_shapes(items: list[tuple[dict, dict]], errors: Errors) -> list[dict]:
    """The decoded items whose tensor shapes agree with the most common ones (the first on a tie).

    Pixels are decoded to the bucket's shape, but latent shards carry their arrays as they were
    written: one with another shape would make the whole batch fail to stack.
    """

    def shapes(item: dict) -> tuple:
        names = ("video", "latent", "text_emb", "text_mask")
        return tuple(
            (n, tuple(item[n].shape), item[n].dtype) if item.get(n) is not None else n for n in names
        )

    common = collections.Counter(shapes(item) for _, item in items).most_common(1)
    kept = []
    for sample, item in items:
        if shapes(item) == common[0][0]:
            kept.append(item)
        else:
            errors.add("shape_mismatch", sample["__shard__"], sample["__key__"], f"{shapes(item)}"[:200])
    return kept


def _check_rate(errors: Errors, spec: StreamSpec) -> None:
    """Abort past ``error_threshold`` skipped samples per sample seen. Shard-level skips (a compressed
    or truncated tar, a stray member) are not among ``seen``: lost shards have their own rate
    (:func:`check_shard_rate`)."""
    if errors.seen < spec.min_samples_for_threshold:
        return
    rate = errors.skipped_samples / max(errors.seen, 1)
    if rate > spec.error_threshold:
        worst = ", ".join(f"{s} ({n})" for s, n in errors.by_shard.most_common(3))
        raise RuntimeError(
            f"data error rate {rate:.1%} over {errors.seen} samples exceeds data.error_threshold="
            f"{spec.error_threshold:.0%}; worst shards: {worst}; reasons: {dict(errors.counts)}"
        )


def check_shard_rate(summaries: list[dict], threshold: float, where: str) -> None:
    """Abort when more than ``threshold`` of the shards opened (by the workers whose
    :meth:`Errors.summary` are given) were refused or broken, counting over at least
    :data:`MIN_SHARDS_FOR_THRESHOLD`. Their samples never reach the per-sample rate: without this, a
    run with half its shards compressed would train on half its data, only warned."""
    opened = sum(s["shards"] for s in summaries)
    lost = sum(s["shards_lost"] for s in summaries)
    if lost <= threshold * max(opened, MIN_SHARDS_FOR_THRESHOLD):
        return
    named = list({shard: why for s in summaries for shard, why in s["lost"].items()}.items())[:8]
    names = ", ".join(f"{shard} ({why})" for shard, why in named)
    if lost > len(named):
        names += f" and {lost - len(named)} more"
    reasons = collections.Counter()
    for s in summaries:
        reasons.update({r: n for r, n in s["skipped"].items() if r in SHARD_LOSSES})
    raise RuntimeError(
        f"data shard error rate {lost / max(opened, 1):.1%} over {opened} shards ({where}) exceeds "
        f"data.error_threshold={threshold:.0%}; refused or broken: {names}; reasons: {dict(reasons)}"
    )
