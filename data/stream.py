"""The per-worker sample stream: shards → validated samples → shuffled → bucketed batches → decoded.

Everything up to batch formation uses only tar members and ``{key}.json`` metadata, and every random
choice comes from a generator seeded by (seed, epoch, dp_rank, worker) or (seed, epoch, key). So a
worker's sequence of batches is a pure function of those numbers, and resuming can re-form and skip the
batches already consumed without decoding a single frame.

Bad input costs only its sample: each skip is counted by reason with its shard and key.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import re
import subprocess
import tarfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from data.buckets import Assignment, BucketConfig, assign, clip_start
from data.video import IMAGE_EXTS, VIDEO_EXTS, MediaError, decode_clip, decode_clip_naive, decode_image

log = logging.getLogger(__name__)

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
LATENT_EXTS = ("latent.npy",)
KNOWN_EXTS = set(VIDEO_EXTS) | set(IMAGE_EXTS) | {"txt", "json", "latent.npy", "text.npy", "text_mask.npy"}


@dataclass
class Errors:
    """Skipped samples by reason, with where they came from."""

    seen: int = 0
    counts: collections.Counter = field(default_factory=collections.Counter)
    filtered: collections.Counter = field(default_factory=collections.Counter)  # fine samples no bucket fits
    by_shard: collections.Counter = field(default_factory=collections.Counter)
    examples: dict = field(default_factory=dict)  # reason → "shard:key" of the first one
    decoded: int = 0  # samples decoded, and the seconds it took (for benchmarks.dataloader)
    decode_s: float = 0.0

    def add(self, reason: str, shard: str, key: str) -> None:
        self.counts[reason] += 1
        self.by_shard[shard] += 1
        self.examples.setdefault(reason, f"{shard}:{key}")
        log.warning("skipping sample %s in %s: %s", key, shard, reason)

    def filter(self, reason: str) -> None:
        self.filtered[reason] += 1  # not bad input: does not count toward the error rate

    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict:
        return {
            "seen": self.seen,
            "skipped": dict(self.counts),
            "filtered": dict(self.filtered),
            "examples": dict(self.examples),
            "decoded": self.decoded,
            "decode_s": self.decode_s,
        }


@dataclass
class StreamSpec:
    """What one worker reads and how: everything that determines its batches."""

    shards: list[str]
    buckets: BucketConfig
    seed: int
    epoch: int
    stream_id: tuple[int, ...]  # (dp_rank, worker): seeds the shuffle
    shuffle_buffer: int = 64
    random_crop: bool = False
    error_threshold: float = 0.05
    min_samples_for_threshold: int = 50
    naive_decode: bool = False  # decode every frame, then subsample (the benchmark's baseline)


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) & 0xFFFFFFFF for p in parts])


def _key_seed(key: str) -> int:
    return zlib.crc32(key.encode())


def read_shard(path: str, errors: Errors) -> Iterator[dict]:
    """Samples ``{"__key__", "__shard__", ext: bytes, …}`` of one tar; a broken tar ends early."""
    current: dict | None = None
    shard = path.rsplit("/", 1)[-1]
    try:
        with _open_shard(path) as f:
            for member in tar_file_iterator(f):
                prefix, ext = base_plus_ext(member["fname"])
                if prefix is None:
                    errors.add("bad_member_name", shard, member["fname"][:80])
                    continue
                key = prefix.rsplit("/", 1)[-1]
                if current is not None and key != current["__key__"]:
                    yield current
                    current = None
                if current is None:  # a repeated key is caught by validate()
                    current = {"__key__": key, "__shard__": shard}
                current[ext.lower()] = member["data"]
    except (tarfile.TarError, OSError, EOFError) as e:
        errors.add("truncated_tar", shard, f"after {current['__key__'] if current else 'start'} ({e})")
        return  # the sample being read when the tar broke is incomplete: drop it
    if current is not None:
        yield current


@contextlib.contextmanager
def _open_shard(path: str):
    """A local tar, or the stdout of a ``pipe:`` command (only listed when data.allow_pipe is set)."""
    if not path.startswith("pipe:"):
        with open(path, "rb") as f:
            yield f
        return
    proc = subprocess.Popen(path[5:], shell=True, stdout=subprocess.PIPE)  # noqa: S602 (opted in)
    try:
        yield proc.stdout
    finally:
        proc.stdout.close()
        if proc.wait() != 0:
            raise OSError(f"{path}: command exited with {proc.returncode}")


def validate(sample: dict, errors: Errors, seen: set[str]) -> dict | None:
    """Metadata + media check; returns the sample with parsed ``meta`` or None (counted)."""
    key, shard = sample["__key__"], sample["__shard__"]
    errors.seen += 1
    if not _SAFE_KEY.match(key):
        errors.add("unsafe_key", shard, key[:80])
        return None
    if key in seen:
        errors.add("duplicate_key", shard, key)
        return None
    seen.add(key)
    unknown = [e for e in sample if not e.startswith("__") and e not in KNOWN_EXTS]
    media = [e for e in sample if e in VIDEO_EXTS or e in IMAGE_EXTS or e in LATENT_EXTS]
    if not media:
        errors.add("unknown_extension" if unknown else "missing_media", shard, key)
        return None
    if "json" not in sample:
        errors.add("missing_metadata", shard, key)
        return None
    try:
        meta = json.loads(sample["json"])
        if not isinstance(meta, dict) or meta.get("kind") not in ("video", "image"):
            raise ValueError("kind must be 'video' or 'image'")
        int(meta["width"]), int(meta["height"])
    except (ValueError, KeyError, TypeError) as e:
        errors.add(f"bad_metadata: {e}"[:60], shard, key)
        return None
    if "txt" not in sample and "text.npy" not in sample:
        errors.add("missing_caption", shard, key)
        return None
    if meta["kind"] == "video" and int(meta.get("frames", 0)) < 1:
        errors.add("zero_frames", shard, key)
        return None
    sample["meta"], sample["__media__"] = meta, media[0]
    return sample


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
    """Decoded tensors of one sample for its bucket; raises MediaError on failure."""
    key, b = sample["__key__"], a.bucket
    u = _rng(spec.seed, spec.epoch, _key_seed(key))
    offset = tuple(u.random(2)) if spec.random_crop else (0.5, 0.5)
    text = sample["txt"].decode("utf-8").strip() if "txt" in sample else ""
    ext = sample["__media__"]
    if ext == "latent.npy":
        out = {"latent": torch.from_numpy(_npy(sample, "latent.npy"))}
    else:
        data = sample[ext]
        if ext in IMAGE_EXTS:
            frames = decode_image(data, (b.width, b.height), offset)
        else:
            start = clip_start(a, float(u.random()))
            decode = decode_clip_naive if spec.naive_decode else decode_clip
            frames = decode(data, start, b.frames, a.fps, (b.width, b.height), offset)
        video = torch.from_numpy(np.array(frames)).permute(3, 0, 1, 2)  # C, T, H, W (a writable copy)
        out = {"video": video.float().div_(127.5).sub_(1.0)}
    if "text.npy" in sample:
        out["text_emb"] = torch.from_numpy(_npy(sample, "text.npy"))
        out["text_mask"] = (
            torch.from_numpy(_npy(sample, "text_mask.npy")).bool() if "text_mask.npy" in sample else None
        )
    label = sample.get("meta", {}).get("label")
    if label is not None:
        if not isinstance(label, int) or label < 0:
            raise MediaError("bad_label", f"json 'label' must be a non-negative integer, got {label!r}")
        out["label"] = label
    out.update(text=text, fps=a.fps, key=key)
    return out


def _npy(sample: dict, ext: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(sample[ext]), allow_pickle=False)  # never unpickle shard content
    except ValueError as e:
        raise MediaError("bad_array", f"{ext}: {e}") from e


def collate(items: list[dict], bucket_name: str) -> dict:
    """Stack same-shape samples into the batch dict of DESIGN.md §1."""
    batch: dict = {
        "bucket": bucket_name,
        "key": [i["key"] for i in items],
        "text": [i["text"] for i in items],
        "fps": torch.tensor([i["fps"] for i in items], dtype=torch.float32),
    }
    for name in ("video", "latent", "text_emb"):
        if name in items[0]:
            batch[name] = torch.stack([i[name] for i in items])
    if items[0].get("text_mask") is not None:
        batch["text_mask"] = torch.stack([i["text_mask"] for i in items])
    if all("label" in i for i in items):
        batch["label"] = torch.tensor([i["label"] for i in items], dtype=torch.long)
    return batch


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
    """``(assignment, [(sample, assignment), …])`` per full bucket: metadata only, nothing decoded."""
    seen: set[str] = set()
    buffers: dict = collections.defaultdict(list)
    mixer = _RatioMixer(spec.buckets.image_ratio)

    def samples() -> Iterator[dict]:
        for shard in spec.shards:
            for raw in read_shard(shard, errors):
                sample = validate(raw, errors, seen)
                _check_rate(errors, spec)
                if sample is not None:
                    yield sample

    for sample in shuffled(samples(), spec.shuffle_buffer, _rng(spec.seed, spec.epoch, *spec.stream_id)):
        meta = sample["meta"]
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
    yield from mixer.flush()
    for buf in buffers.values():  # too few for a full batch this epoch (they are reshuffled next epoch)
        errors.filtered["partial_batch"] += len(buf)


def _decode_batch(members: list, a: Assignment, spec: StreamSpec, errors: Errors) -> dict | None:
    items = []
    for sample, sa in members:
        start = time.perf_counter()
        try:
            items.append(decode_sample(sample, sa, spec))
        except MediaError as e:
            errors.add(e.reason, sample["__shard__"], sample["__key__"])
        errors.decoded += 1
        errors.decode_s += time.perf_counter() - start
    return collate(items, a.bucket.name) if items else None


def _check_rate(errors: Errors, spec: StreamSpec) -> None:
    if errors.seen < spec.min_samples_for_threshold:
        return
    rate = errors.total() / max(errors.seen, 1)
    if rate > spec.error_threshold:
        worst = ", ".join(f"{s} ({n})" for s, n in errors.by_shard.most_common(3))
        raise RuntimeError(
            f"data error rate {rate:.1%} over {errors.seen} samples exceeds data.error_threshold="
            f"{spec.error_threshold:.0%}; worst shards: {worst}; reasons: {dict(errors.counts)}"
        )
