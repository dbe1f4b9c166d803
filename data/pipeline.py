"""The training data loader: ``build_loader(cfg, dp_rank, dp_size)``.

Shards are listed, shuffled per epoch with (seed, epoch), split by *data-parallel* rank (never by
global rank: tensor- and context-parallel peers must see identical batches, so they pass the same
dp_rank) and then by DataLoader worker. Each worker runs :func:`data.stream.batches`, a deterministic
stream, and tags every batch with (worker, index). The loader hands batches out in a fixed
round-robin order over workers, whatever order they arrive in, and counts what it handed out, so
its ``state_dict()`` pins the exact position: a resumed loader with the same data-parallel size and
worker count re-forms (without decoding) and skips what was consumed, then yields exactly the
batches an uninterrupted run would have. With a different layout it restarts the epoch, and logs it.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import shlex
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.batch import Batch
from data.buckets import BucketConfig
from data.reader import Limits, Shard
from data.stream import Errors, Expect, StreamSpec, batches, check_shard_rate
from data.video import DEFAULT_MAX_PIXELS, IMAGE_EXTS, VIDEO_EXTS, decode_clip
from data.worker_signals import StopFlag

log = logging.getLogger(__name__)


class NoShards(FileNotFoundError):
    """``data.shards`` (or ``data.val_shards``) names no shard: a user's error, said in one or two lines."""


class NotShards(NoShards):
    """``data.shards`` names clips or a manifest (what ``python -m data.shards write`` reads), not shards."""


class NoBatchError(ValueError):
    """A whole epoch gave no batch: the data does not fit the buckets (a user's error, said in two lines)."""


@dataclass
class DataConfig:
    """Where the shards are and how batches are formed."""

    shards: str = ""
    """A directory (``{prefix}-*.tar`` inside it), a glob, or comma-separated tar paths."""
    prefix: str = "train"
    """Shard name prefix when ``shards`` is a directory (``val`` for held-out shards)."""
    buckets: BucketConfig = field(default_factory=BucketConfig)
    """Bucket shapes, batch sizes per data-parallel rank, target fps, image:video ratio."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0: decode in the training process)."""
    seed: int = 0
    """Seeds shard order, shuffling, clip starts and crops."""
    shuffle_buffer: int = 64
    """Samples held for shuffling within a worker (0 or 1: no sample shuffling)."""
    random_crop: bool = False
    """Random crop position (seeded per sample and epoch) instead of the centre."""
    error_threshold: float = 0.05
    """Abort when more than this share of a worker's samples are skipped as bad, or of the shards a
    rank opened in an epoch are refused or broken (counted over at least
    ``data.stream.MIN_SHARDS_FOR_THRESHOLD`` = 20 shards: one lost shard alone stays under 5%)."""
    min_samples_for_threshold: int = 50
    """Samples a worker must have seen before the error threshold applies."""
    resampled: bool = False
    """Draw shards with replacement when there are fewer than data-parallel ranks × workers (turned on,
    with a warning, when there are fewer shards than data-parallel ranks: a few clips on many GPUs)."""
    allow_pipe: bool = False
    """Allow ``pipe:CMD`` entries written in ``shards`` itself (each runs a shell command). Files found
    by a glob or in a directory are always read as files, whatever their names."""
    allow_compressed: bool = False
    """Read gzip/bz2/xz-compressed tars. Off: such a shard is skipped and counted (``compressed_tar``),
    as a small compressed file can inflate to gigabytes in memory."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Largest image or video frame (width × height) decoded; checked on the declared size (sidecar
    json, image header, video stream) before decoding. A larger sample is skipped (``too_many_pixels``).
    Video frames are held to at most 16384 × 8704 (``data.video.MAX_VIDEO_PIXELS``) even above it."""
    max_member_mb: float = 1024.0
    """Largest tar member (MiB) read into memory; a sample with a larger one is skipped
    (``member_too_large``) without reading it."""
    max_sample_mb: float | None = None
    """Largest sum of one sample's members (MiB) read into memory; a sample past it is skipped
    (``sample_too_large``) and its remaining members are not read. None: twice ``max_member_mb``."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""
    drop_partial: bool = False
    """Drop the last, short batch of each bucket (of each loader worker) at the end of an epoch: its
    samples are not used that epoch (the next one reshuffles everything). Off: it is let through, so
    every sample is seen each epoch, which a fine-tune on a few dozen clips over several buckets needs
    (otherwise a bucket that never fills gives no batch at all); the loss is weighted per sample, so a
    short batch counts for what it holds. On: every batch has its bucket's size (e.g. for a compiled
    model that recompiles per batch shape)."""


def list_shards(cfg: DataConfig, key: str = "data.shards") -> list[Shard]:
    """The shards named by ``cfg.shards``, files sorted; errors name the config field.

    Only an entry of the config string itself that starts with ``pipe:`` and is not an existing file
    becomes a command (:class:`data.reader.Shard` with ``pipe=True``), and only with ``allow_pipe``.
    Whatever a glob or a directory listing returns is a file, whatever its name.

    Args:
        cfg: data config.
        key: the config key ``cfg.shards`` came from, named in errors (``data.val_shards`` for the
            held-out set).
    """
    spec = cfg.shards.strip()
    if not spec:
        raise ValueError(f"{key} is empty: set it to a shard directory, glob or list of .tar files")
    if spec.startswith("pipe:") and not os.path.exists(spec):
        return _pipes(spec, cfg.allow_pipe, key)
    if os.path.isdir(spec):
        shards = [Shard(p) for p in sorted(glob.glob(os.path.join(glob.escape(spec), f"{cfg.prefix}-*.tar")))]
        if not shards:
            message, clips = _empty_folder(spec, cfg.prefix, key)
            raise (NotShards if clips else NoShards)(message)
    elif "," in spec:
        shards = []
        for entry in (p.strip() for p in spec.split(",")):
            if entry.startswith("pipe:") and not os.path.isfile(entry):
                shards += _pipes(entry, cfg.allow_pipe, key)
            elif entry:
                shards.append(Shard(entry))
    else:
        shards = [Shard(p) for p in sorted(glob.glob(spec))]
    missing = [s.url for s in shards if not s.pipe and not os.path.isfile(s.url)]
    if missing:
        raise NoShards(f"{key}: {missing[0]} does not exist")
    if not shards:
        raise NoShards(f"{key}={spec!r}: no shards found{_glob_hint(spec)}")
    sources = [s.url for s in shards if not s.pipe and _source_kind(s.url)]
    if sources:  # a video or a manifest read as a tar would only be counted as one broken shard
        kind = _source_kind(sources[0])
        src = sources[0] if kind == "a manifest" else os.path.dirname(sources[0]) or "."
        raise NotShards(
            f"{key}={spec!r}: {sources[0]} is {kind}, not a shard (.tar).\nWrite shards first: "
            f"{_WRITE} {shlex.quote(src)} OUT, then {key}=OUT"
        )
    return shards


_WRITE = "python -m data.shards write"


def _source_kind(path: str) -> str | None:
    """'a video', 'an image' or 'a manifest' when ``path``'s extension says it is a source of
    :mod:`data.shards` rather than a shard."""
    ext = path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""
    if ext in VIDEO_EXTS:
        return "a video"
    if ext in IMAGE_EXTS:
        return "an image"
    return "a manifest" if ext in ("csv", "jsonl") else None


def _empty_folder(folder: str, prefix: str, key: str) -> tuple[str, bool]:
    """The error for a directory without ``{prefix}-*.tar``: what it holds instead (clips, other
    shards) and the command that makes shards of it; and whether it holds clips."""
    names: list[str] = []
    for root, _, files in os.walk(folder):
        names += [os.path.join(root, f) for f in files]
        if len(names) > 10_000:  # enough to tell clips from shards: a huge tree is not listed whole
            break
    clips = sum(_source_kind(n) in ("a video", "an image") for n in names)
    val = " --prefix val" if prefix == "val" else ""
    if clips:
        return (
            f"{key}={folder!r}: a folder of {clips}{'+' * (len(names) > 10_000)} "
            f"{'videos/images' if clips > 1 else 'video/image'}, not shards "
            f"(no {prefix}-*.tar in it).\nWrite shards first: {_WRITE} {shlex.quote(folder)} OUT{val} "
            f"(a .txt caption beside each clip), then {f'{key}=OUT' if '.' in key else f'use OUT as {key}'}",
            True,
        )
    others = sorted({os.path.basename(n).split("-")[0] for n in names if n.endswith(".tar") and "-" in n})
    hint = ""
    if others:
        held = ", ".join(f"{o}-*.tar" for o in others)
        hint = f" (it holds {held}; {prefix} shards are written by {_WRITE} SRC OUT --prefix {prefix})"
    return f"{key}={folder!r}: no {prefix}-*.tar in this directory{hint}", False


def _glob_hint(spec: str) -> str:
    if not glob.has_magic(spec) and not os.path.exists(spec):
        return " (no such file or directory)"
    return ""


def _pipes(entry: str, allow: bool, key: str) -> list[Shard]:
    """Commands written in data.shards, e.g. ``pipe:aws s3 cp s3://b/train-{000000..000099}.tar -``."""
    if not allow:
        raise ValueError(f"{key}={entry!r}: pipe: URLs run shell commands; set data.allow_pipe=true to allow")
    from braceexpand import braceexpand

    return [Shard(url, pipe=True) for url in braceexpand(entry)]


def split_shards(
    shards: list,
    seed: int,
    epoch: int,
    dp_rank: int,
    dp_size: int,
    worker: int,
    num_workers: int,
    resampled: bool,
) -> list:
    """This (data-parallel rank, worker)'s shards for an epoch: disjoint across ranks and workers,
    together all of them (unless ``resampled``, which draws with replacement)."""
    streams = dp_size * num_workers
    stream = dp_rank * num_workers + worker
    if resampled:
        rng = np.random.default_rng([seed, epoch, stream, 1])
        per = max(1, -(-len(shards) // streams))
        return [shards[i] for i in rng.integers(0, len(shards), per)]
    order = np.random.default_rng([seed, epoch]).permutation(len(shards))
    mine = order[dp_rank::dp_size][worker::num_workers]
    return [shards[i] for i in mine]


class _EpochStream(IterableDataset):
    """One epoch of one data-parallel rank; each worker yields ``(worker, index, batch, errors)``."""

    def __init__(self, loader: Loader, skip: list[int]):
        self.cfg, self.shards, self.epoch, self.skip = loader.cfg, loader.shards, loader.epoch, skip
        self.dp_rank, self.dp_size, self.expect = loader.dp_rank, loader.dp_size, loader.expect
        self.resampled = loader.resampled
        self.clip_decoder = loader.clip_decoder

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        cfg = self.cfg
        spec = StreamSpec(
            shards=split_shards(
                self.shards, cfg.seed, self.epoch, self.dp_rank, self.dp_size, worker, workers, self.resampled
            ),
            buckets=cfg.buckets,
            seed=cfg.seed,
            epoch=self.epoch,
            stream_id=(self.dp_rank, worker),
            shuffle_buffer=cfg.shuffle_buffer,
            random_crop=cfg.random_crop,
            error_threshold=cfg.error_threshold,
            min_samples_for_threshold=cfg.min_samples_for_threshold,
            drop_partial=cfg.drop_partial,
            clip_decoder=self.clip_decoder,
            limits=limits(cfg),
            expect=self.expect,
        )
        errors = Errors()
        for index, batch in batches(spec, errors, skip=self.skip[worker]):
            yield worker, index, batch, errors.summary()
        yield worker, -1, None, errors.summary()  # end of this worker's epoch


class Loader:
    """Iterable over training batches (epoch after epoch) with exact-resume state.

    ``num_workers`` is the DataLoader workers it runs: ``data.num_workers``, but no more than each
    data-parallel rank has shards (a worker without a shard would idle). ``clip_decoder`` decodes a
    video's clip (:func:`data.video.decode_clip`); ``benchmarks.dataloader`` swaps in its baseline.
    """

    def __init__(
        self,
        cfg: DataConfig,
        dp_rank: int,
        dp_size: int,
        expect: Expect | None = None,
        pin_memory: bool = False,
        key: str = "data.shards",
    ):
        self.cfg, self.dp_rank, self.dp_size, self.expect = cfg, dp_rank, dp_size, expect
        self.pin_memory, self.key = pin_memory, key
        self.shards = list_shards(cfg, key)
        self.clip_decoder = decode_clip
        self.resampled = cfg.resampled  # also when there are fewer shards than ranks (_worker_count)
        if not cfg.buckets.buckets:
            raise ValueError("data.buckets: no buckets configured")
        limits(cfg)  # range errors at start-up, not in a worker
        self.num_workers = self._worker_count()
        self.workers = max(1, self.num_workers)  # streams: in-process decoding is one
        self.epoch = 0
        self.consumed = [0] * self.workers  # batches handed out, per worker, this epoch
        self.next_worker = 0
        self.errors: dict[int, dict] = {}  # latest error summary per worker, this epoch
        self.errors_before: list[dict] = []  # final summaries of finished epochs

    def _worker_count(self) -> int:
        """``data.num_workers``, lowered to the shards each rank gets (all ranks alike); an error when
        a rank would get none."""
        cfg, n, ranks = self.cfg, len(self.shards), self.dp_size
        if n < ranks and not cfg.resampled:  # a few clips on many GPUs: draw, as data.resampled=true does
            self.resampled = True
            if self.dp_rank == 0:
                log.warning(
                    "%s: %d shard%s for %d data-parallel ranks: each rank draws shards with replacement "
                    "(data.resampled=true); for exact epochs write >= %d shards (%s --min-shards %d)",
                    *(self.key, n, "s" * (n != 1), ranks, ranks, _WRITE, ranks),
                )
        if self.resampled:
            return cfg.num_workers  # shards are drawn with replacement: every worker gets some
        per_rank = n // ranks
        if cfg.num_workers > per_rank:
            if self.dp_rank == 0:
                log.info(
                    "data.num_workers=%d -> %d: %d shard%s for %d rank%s",
                    *(cfg.num_workers, per_rank, n, "s" * (n != 1), ranks, "s" * (ranks != 1)),
                )
            return per_rank
        return cfg.num_workers

    def _digest(self) -> str:
        return hashlib.sha1("\n".join(s.name for s in self.shards).encode()).hexdigest()[:16]

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "consumed": list(self.consumed),
            "next_worker": self.next_worker,
            "dp_size": self.dp_size,
            "num_workers": self.workers,
            "seed": self.cfg.seed,
            "shards": self._digest(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        layout = (state.get("dp_size"), state.get("num_workers"), state.get("seed"), state.get("shards"))
        if layout == (self.dp_size, self.workers, self.cfg.seed, self._digest()):
            self.consumed, self.next_worker = list(state["consumed"]), int(state["next_worker"])
            return
        log.warning(
            "data loader state was saved with dp_size=%s, num_workers=%s, seed=%s, shards=%s; "
            "now %s, %s, %s, %s: restarting epoch %d with the order seeded by (seed, epoch)",
            *layout,
            self.dp_size,
            self.workers,
            self.cfg.seed,
            self._digest(),
            self.epoch,
        )
        self.consumed, self.next_worker = [0] * self.workers, 0

    def __iter__(self) -> Iterator[Batch]:
        while True:
            # resumed after the epoch's last batch (a checkpoint at an epoch end): nothing is left of
            # it, and that is no error; only a fresh epoch that gives nothing means no data fits
            resumed = any(self.consumed)
            produced = 0
            for batch in self._epoch():
                produced += 1
                yield batch
            if produced == 0 and not resumed:  # another epoch would give none either: say so, not spin
                raise NoBatchError(self._no_batch())
            self.errors_before.extend(self.errors.values())
            self.errors = {}
            self.epoch += 1
            self.consumed, self.next_worker = [0] * self.workers, 0

    def _no_batch(self) -> str:
        """Why an epoch gave nothing, with what fixes it: buckets made for the data, or short batches."""
        summary = self.error_summary()
        filtered, skipped = summary["filtered"] or "none", summary["skipped"] or "none"
        few = ", or too few for a batch with data.drop_partial=true" if self.cfg.drop_partial else ""
        fix = []
        if set(summary["filtered"]) & {"shorter_than_any_bucket", "no_image_bucket", "bucket_not_configured"}:
            fix.append(
                "buckets made for these clips: python -m data.buckets suggest "
                f"{shlex.quote(self.cfg.shards)} > buckets.json, then data.bucket_file=buckets.json"
            )
        if "partial_batch" in summary["filtered"]:
            fix.append("data.drop_partial=false (the last, short batch of each bucket is used)")
        return (
            f"{self.key}={self.cfg.shards!r}: a whole epoch gave no batch for this rank "
            f"(dp_rank {self.dp_rank} of {self.dp_size}): no sample fits data.buckets (too short{few}), or "
            f"every sample failed to decode ({summary['seen']} read; filtered {filtered}, skipped {skipped})"
            + (f"\nFix: {'; or '.join(fix)}" if fix else "")
        )

    def _epoch(self) -> Iterator[Batch]:
        dataset = _EpochStream(self, list(self.consumed))
        stop = StopFlag()  # workers ignore stop signals unless this epoch's loader is ending them
        if self.num_workers == 0 and not self.pin_memory:
            source = iter(dataset)
        else:
            # pinned batches: the DataLoader copies each into page-locked memory (in a thread beside the
            # workers, or inline with none), so the trainer's .to(device, non_blocking=True) is async
            workers = {} if self.num_workers == 0 else {"prefetch_factor": self.cfg.prefetch_factor}
            source = iter(
                DataLoader(
                    dataset,
                    batch_size=None,
                    num_workers=self.num_workers,
                    pin_memory=self.pin_memory,
                    persistent_workers=False,
                    worker_init_fn=stop.worker_init_fn(),
                    **workers,
                )
            )
        try:
            yield from self._hand_out(source)
        finally:
            stop.set()

    def _hand_out(self, source) -> Iterator[Batch]:
        pending: dict[int, deque] = {w: deque() for w in range(self.workers)}
        active = set(range(self.workers))
        for worker, index, batch, errors in source:
            self.errors[worker] = errors
            where = f"dp_rank {self.dp_rank}, epoch {self.epoch}"
            check_shard_rate(list(self.errors.values()), self.cfg.error_threshold, where)
            if index < 0:
                active.discard(worker)
            else:
                pending[worker].append((index, batch))
            yield from self._drain(pending, active)
        yield from self._drain(pending, active)

    def _drain(self, pending: dict[int, deque], active: set[int]) -> Iterator[Batch]:
        # hand out in round-robin order over workers; a worker that has ended drops out of the cycle
        while True:
            w = self.next_worker
            if pending[w]:
                index, batch = pending[w].popleft()
                self.consumed[w] = index + 1
                self.next_worker = self._advance(w, active, pending)
                if batch is not None:  # None: every sample of that batch failed to decode
                    yield batch
            elif w not in active:
                if not any(pending.values()) and not active:
                    return
                self.next_worker = self._advance(w, active, pending)
            else:
                return  # wait for worker w

    def _advance(self, w: int, active: set[int], pending: dict[int, deque]) -> int:
        for step in range(1, self.workers + 1):
            nxt = (w + step) % self.workers
            if nxt in active or pending[nxt]:
                return nxt
        return w

    def error_summary(self) -> dict:
        """Bad samples skipped by reason (with an example shard:key each) and samples filtered out
        (e.g. shorter than every bucket), summed over workers and epochs since this loader started.
        ``skipped_samples`` counts the skips that cost a sample: ``seen`` = delivered + that + filtered
        (over finished epochs). ``shards`` counts the shards opened, ``shards_lost`` those refused or
        broken."""
        total: dict = {"seen": 0, "skipped_samples": 0, "skipped": {}, "filtered": {}, "examples": {}}
        total.update(shards=0, shards_lost=0)
        for summary in [*self.errors_before, *self.errors.values()]:
            for count in ("seen", "skipped_samples", "shards", "shards_lost"):
                total[count] += summary[count]
            for kind in ("skipped", "filtered"):
                for reason, n in summary[kind].items():
                    total[kind][reason] = total[kind].get(reason, 0) + n
            for reason, where in summary["examples"].items():
                total["examples"].setdefault(reason, where)
            total["decoded"] = total.get("decoded", 0) + summary["decoded"]
            total["decode_s"] = total.get("decode_s", 0.0) + summary["decode_s"]
        return total


def limits(cfg: DataConfig) -> Limits:
    """The per-sample and per-shard limits of ``cfg``; errors name the config field (each size a
    finite number > 0, see :class:`data.reader.Limits`)."""
    return Limits(cfg.max_pixels, cfg.max_member_mb, cfg.allow_compressed, cfg.max_sample_mb)


def build_loader(
    cfg: DataConfig,
    dp_rank: int = 0,
    dp_size: int = 1,
    expect: Expect | None = None,
    pin_memory: bool = False,
    key: str = "data.shards",
) -> Loader:
    """The loader for one data-parallel rank (pass the DP rank/size, not the global ones).

    Args:
        cfg: data config.
        dp_rank: this rank's index among data-parallel replicas; all ranks of one tensor/context-parallel
            group pass the same value and so receive identical batches.
        dp_size: number of data-parallel replicas.
        expect: what the model takes from latent shards (channels, the codec's compression, text
            width; ``launch.batches.expect_for`` makes it from a job config): a latent sample that
            differs is a counted ``shape_mismatch`` skip. None: each latent is held to its own json.
        pin_memory: hand out batches in page-locked host memory (the DataLoader's ``pin_memory``), so
            that copies to the GPU with ``non_blocking=True`` overlap compute. Pass
            ``device.type == "cuda"``; without an accelerator torch warns and leaves batches unpinned.
        key: the config key of ``cfg.shards``, named in errors (``data.val_shards`` for held-out data).
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    return Loader(cfg, dp_rank, dp_size, expect, pin_memory, key)
