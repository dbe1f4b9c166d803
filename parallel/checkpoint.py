"""Atomic torch.distributed.checkpoint (DCP) snapshots with retention, per-rank extras and integrity checks.

Layout of ``root/step-00001000/``: DCP shards and ``.metadata`` (model, optimizer, scheduler, EMA, step:
anything every rank holds a part or a copy of), ``rank-00000.pt`` … (what differs per rank: RNG states,
data-loader position), any extra text files (``config.yaml``), and the completion marker ``COMPLETE``.

A snapshot is written into ``.tmp-step-…`` and renamed once every rank has finished and the marker is
in place, so a directory named ``step-…`` with a marker is complete; anything else is ignored (a crash
mid-save costs that save, never an older checkpoint). The marker, written last, records the world size
and each file's size and CRC-32 (:mod:`parallel.checkpoint_safety` says why CRC-32); every read path
verifies them first, and :func:`latest` skips a damaged checkpoint for the newest intact one, saying so.
Retention deletes a checkpoint's marker before its data, so a kill mid-deletion leaves a directory that
is ignored, never one that looks complete. Nothing is unpickled freely: tensors and non-tensor items
with ``weights_only=True``, DCP's ``.metadata`` with an allow-list.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from parallel import checkpoint_safety as safety
from parallel.checkpoint_safety import (  # noqa: F401  (CheckpointError, load_pt, marker, … are ours to export)
    MARKER,
    CheckpointError,
    SafeFileSystemReader,
    SafeFullPlanner,
    SafeLoadPlanner,
    load_pt,
    marker,
    read_safetensors,
    save_pt,
)

# one process without a process group is a supported case here, not a mistake worth a warning
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

log = logging.getLogger("parallel.checkpoint")

_STEP = re.compile(r"^step-(\d{8})$")


# whole-tensor files of an export, and of a DeepSpeed checkpoint next to its ZeRO partitions
WHOLE_FILES = {"model": "model.safetensors", "ema": "ema.safetensors"}


def engine_of(path: str | os.PathLike) -> str:
    """``fsdp`` (a DCP checkpoint) or ``deepspeed``: which trainer engine wrote the checkpoint."""
    return marker(path).get("engine", "fsdp")


# ---- verification --------------------------------------------------------------------------------------
# verdicts of this process by checkpoint state (see _identity): resume asks about one checkpoint several
# times (latest, load, the trainer's own checks) and a 200 GB read should happen once
_VERDICTS: dict[tuple, str | None] = {}
_UNKNOWN = object()


def verify(path: str | os.PathLike, *, distributed: bool = False) -> None:
    """Raise :class:`CheckpointError` naming the file if the checkpoint at ``path`` is damaged: a missing,
    resized or altered file, an empty or invalid marker. A checkpoint written before checksums is
    accepted with a warning after a size check of its DCP files.

    Args:
        distributed: every rank of the default process group calls this (a collective); each reads a
            disjoint share of the files and the verdicts are combined, so a resume reads the checkpoint
            once in all, not once per rank.
    """
    problem, _ = _verdict(Path(path), distributed)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}")


def _verdict(path: Path, distributed: bool) -> tuple[str | None, bool]:
    """(the problem or None, whether it was found now rather than remembered)."""
    rank, world = _rank_world()
    key = _identity(path)
    cached = _VERDICTS.get(key, _UNKNOWN)
    if not distributed or world == 1:
        verdict = cached if cached is not _UNKNOWN else safety.check(path, 0, 1)
    else:
        # always the collective (a rank with a cached verdict must not skip it); a cached verdict is whole
        mine = cached if cached is not _UNKNOWN else safety.check(path, rank, world)
        verdict = next((v for v in _gather(mine) if v is not None), None)
    if key is not None:
        _VERDICTS[key] = verdict
    return verdict, cached is _UNKNOWN


def _identity(path: Path) -> tuple | None:
    """What a verdict is remembered by: the directory and the size and time of each of its files (a
    file changed since it was checked is checked again)."""
    try:
        files = sorted(p for p in path.rglob("*") if p.is_file())
        stats = tuple((str(p), st.st_ino, st.st_size, st.st_mtime_ns) for p in files for st in [p.stat()])
    except OSError:
        return None
    return (str(path.resolve()), stats) if (path / MARKER).is_file() else None


# ---- finding checkpoints ---------------------------------------------------------------------------------
def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def complete_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint under ``root`` that has a marker, oldest first (not verified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest(root: str | os.PathLike, *, distributed: bool = False) -> Path | None:
    """The newest intact checkpoint under ``root``, or None if there is none at all.

    A damaged newer one is skipped with a warning naming it and its bad file. If every checkpoint is
    damaged this raises rather than returning None, which a trainer would take for a fresh start.

    Args:
        distributed: a collective over the default group sharing the reading (see :func:`verify`).
    """
    damaged, news = [], False
    for _, p in reversed(complete_checkpoints(root)):
        problem, new = _verdict(p, distributed)
        if problem is None:
            if news and _rank_world()[0] == 0:
                log.warning("falling back to %s, the newest intact checkpoint", p)
            return p
        damaged.append(f"{p.name}: {problem}")
        news |= new
        if new and _rank_world()[0] == 0:  # said once per process, however often it is asked
            log.warning("checkpoint %s is damaged and skipped: %s", p, problem)
    if damaged:
        raise CheckpointError(
            f"{root}: no intact checkpoint ({'; '.join(damaged)}). Repair or move them away to start afresh"
        )
    return None


def resolve(path: str | os.PathLike) -> Path:
    """A verified checkpoint directory from a checkpoint, a ``checkpoints/`` folder or a run directory
    (the newest intact one of a folder)."""
    path = Path(path)
    if (path / MARKER).is_file():
        verify(path)  # named explicitly: an error, not a silent fallback to another checkpoint
        return path
    for root in (path, path / "checkpoints"):
        found = latest(root)
        if found is not None:
            return found
    raise FileNotFoundError(f"{path}: no complete checkpoint (a step-XXXXXXXX/ directory with {MARKER})")


# ---- reading ---------------------------------------------------------------------------------------------
def load(path: str | os.PathLike, state: dict, rank: int) -> dict | None:
    """Load ``state`` in place from a checkpoint, collectively, after :func:`verify`; returns this rank's
    own items (see :func:`rank_state`)."""
    path = Path(path)
    verify(path, distributed=True)
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner())
    except CheckpointException as e:
        _raise_ours(e)
    return rank_state(path, rank)


def rank_state(path: str | os.PathLike, rank: int) -> dict | None:
    """This rank's ``rank-XXXXX.pt``, or None when the checkpoint was saved by fewer ranks (another world
    size: a new layout, not damage). A missing file of a rank that existed is damage: an error."""
    path = Path(path)
    own = path / f"rank-{rank:05d}.pt"
    if own.is_file():
        return load_pt(own)
    world = marker(path).get("world_size")
    if world is not None and rank < world:
        raise CheckpointError(f"{own}: missing, but the checkpoint was saved by {world} ranks")
    return None


def read_full(path: str | os.PathLike, keys: set[str]) -> dict:
    """The top-level items ``keys`` of a checkpoint as whole (unsharded) tensors, in one process.

    A DeepSpeed checkpoint answers ``model``, ``ema`` (empty if the run kept none) and ``step`` from
    its whole-tensor files and marker; its optimizer state exists only as ZeRO partitions."""
    verify(path)
    if engine_of(path) == "deepspeed":
        return _read_whole_files(Path(path), keys)
    state: dict = {}
    try:
        _load_state_dict(
            state,
            storage_reader=SafeFileSystemReader(str(path)),
            planner=SafeFullPlanner(keys=keys),
            no_dist=True,
        )
    except CheckpointException as e:
        _raise_ours(e)
    return state


def _raise_ours(e: CheckpointException):
    """DCP wraps a rank's failure in a CheckpointException (a traceback dump); raise our readable error
    itself when it is the cause."""
    for exc, _ in e.failures.values():
        if isinstance(exc, CheckpointError):
            raise exc from None
    raise e


def _read_whole_files(path: Path, keys: set[str]) -> dict:
    unknown = keys - {*WHOLE_FILES, "step"}
    if unknown:
        raise KeyError(
            f"{path} is a DeepSpeed checkpoint: it holds whole tensors for model, ema and step only, "
            f"not {sorted(unknown)} (optimizer state is in ZeRO partitions: resume it with the same layout)"
        )
    out: dict = {}
    for key in keys & WHOLE_FILES.keys():
        f = path / WHOLE_FILES[key]
        out[key] = read_safetensors(f) if f.is_file() else {}
    if "step" in keys:
        out["step"] = torch.tensor(marker(path)["step"])
    return out


def write_safetensors(out: Path, states: dict[str, dict[str, torch.Tensor] | None], step: int) -> None:
    """Whole state dicts as safetensors files (file name → state; empty or None ones skipped), with
    the metadata every export carries."""
    meta = {"format": "pt", "step": str(step)}
    for name, state in states.items():
        if state:
            save_file({k: v.contiguous() for k, v in state.items()}, out / name, metadata=meta)
            _fsync_file(out / name)


# ---- writing ---------------------------------------------------------------------------------------------
def save(
    root: str | os.PathLike,
    step: int,
    state: dict,
    rank_state: dict,
    rank: int,
    files: dict[str, str] | None = None,
    keep: int = 0,
) -> Path:
    """Write a checkpoint collectively (every rank calls this) and return its directory.

    Args:
        state: the DCP state dict (tensors/DTensors and small picklable values).
        rank_state: this rank's own items (saved with ``torch.save``; plain types and tensors only).
        files: extra text files written by rank 0 (name → content).
        keep: complete checkpoints to keep afterwards (0: all).

    Raises:
        CheckpointError: on every rank if any rank failed to write (a full disk is named as such); the
            partial directory is removed and earlier checkpoints are kept.
    """

    def write(tmp: Path) -> None:
        dcp.save(state, checkpoint_id=str(tmp))
        save_pt(rank_state, tmp / f"rank-{rank:05d}.pt")

    return write_checkpoint(root, step, write, files, keep)


def write_checkpoint(
    root: str | os.PathLike,
    step: int,
    write: Callable[[Path], None],
    files: dict[str, str] | None = None,
    keep: int = 0,
    **extra,
) -> Path:
    """The atomic part of every checkpoint save (DCP's and DeepSpeed's), on every rank: ``write(tmp)``
    puts this rank's files into a fresh temporary directory; once all ranks succeeded, each checksums a
    share of the files and rank 0 :func:`commit`\\ s. A failure anywhere is raised on every rank as one
    :class:`CheckpointError` and the temporary directory is removed.

    Args:
        extra: items for the marker (``engine="deepspeed"``).
    """
    root, final = Path(root), step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    rank, world = _rank_world()
    _raise_any(_gather(_attempt(lambda: _fresh_dir(tmp), tmp) if rank == 0 else None), tmp, final)
    _raise_any(_gather(_attempt(lambda: write(tmp), tmp)), tmp, final)
    # every rank's files exist now: each sums a disjoint share, rank 0 gathers them into the marker
    names = safety.files_of(tmp, {MARKER})[rank::world]
    sums: dict = {}
    error = _attempt(lambda: sums.update(safety.sums_of(tmp, names)), tmp)
    shares = _gather((error, sums))
    _raise_any([e for e, _ in shares], tmp, final)
    error = None
    if rank == 0:
        merged = {k: v for _, share in shares for k, v in share.items()}
        error = _attempt(lambda: commit(tmp, final, step, files, keep, sums=merged, **extra), tmp)
    _raise_any(_gather(error), tmp, final)
    return final


def commit(
    tmp: Path,
    final: Path,
    step: int,
    files: dict[str, str] | None,
    keep: int,
    *,
    sums: dict[str, dict] | None = None,
    **extra,
) -> None:
    """Rank 0, once every rank has written into ``tmp``: the text ``files``, the marker (with the world
    size, each file's size and checksum, and ``extra`` items), the rename to ``final`` and retention.
    The marker is synced before the rename and the rename before pruning, so a crash at any point
    leaves the newest complete checkpoint.

    Args:
        sums: checksums already taken (by the ranks, in shares); the rest are taken here.
    """
    for name, text in (files or {}).items():
        _write_synced(tmp / name, text)
    sums = dict(sums or {})
    sums.update(safety.sums_of(tmp, [n for n in safety.files_of(tmp, {MARKER}) if n not in sums]))
    record = {**extra, "step": step, "time": time.time(), "world_size": _rank_world()[1]}
    record |= {"checksum": safety.CHECKSUM, "files": dict(sorted(sums.items()))}
    _write_synced(tmp / MARKER, json.dumps(record, indent=1))
    _fsync_dir(tmp)
    if final.exists():
        _remove_checkpoint(final)  # an earlier save of this step (a rerun after a resume)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    prune(final.parent, keep)


def _fresh_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)  # left by a crash during an earlier attempt at this step
    path.mkdir(parents=True)


def _attempt(fn: Callable[[], object], where: Path) -> str | None:
    """Run ``fn``; None if it succeeded, else one line saying what went wrong (a full disk by name)."""
    try:
        fn()
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        log.debug("checkpoint write failed", exc_info=True)
        return safety.describe_write_error(e, where)
    return None


def _raise_any(errors: list[str | None], tmp: Path, final: Path) -> None:
    """After a gather of every rank's error: if any failed, rank 0 removes ``tmp`` and all raise it."""
    first = next((e for e in errors if e), None)
    if first is None:
        return
    if _rank_world()[0] == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    raise CheckpointError(
        f"checkpoint {final.name} not saved: {first}; its partial {tmp.name}/ was removed, earlier "
        f"checkpoints are kept"
    )


# ---- retention -------------------------------------------------------------------------------------------
def prune(root: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints (0: keep all); returns what went.

    Each goes marker first (synced), then its data: a kill in between leaves a directory without a
    marker, which is ignored and removed by the next prune, never one that looks complete."""
    found = complete_checkpoints(root)
    if keep <= 0 or not found:
        return []
    gone = [p for _, p in found[:-keep]]  # never the newest: keep >= 1 here
    for p in gone:
        _remove_checkpoint(p)
    oldest_kept = found[-keep:][0][0]
    for p in Path(root).iterdir():
        m = _STEP.match(p.name)
        if m and int(m.group(1)) < oldest_kept and p.is_dir() and not (p / MARKER).exists():
            shutil.rmtree(p, ignore_errors=True)  # the rest of a deletion that was cut short
    return gone


def _remove_checkpoint(path: Path) -> None:
    m = path / MARKER
    if m.exists():
        m.unlink()
        _fsync_dir(path)  # the marker is gone for good before any data file goes
    shutil.rmtree(path, ignore_errors=True)


# ---- process group and file system helpers ---------------------------------------------------------------
def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(obj) -> list:
    """``obj`` of every rank (small picklable values between our own processes), or ``[obj]`` alone."""
    if _rank_world()[1] == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
