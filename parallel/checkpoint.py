"""Atomic torch.distributed.checkpoint (DCP) snapshots with retention, per-rank extras and integrity checks.

Layout of ``root/step-00001000/``: DCP shards and ``.metadata`` (model, optimizer, scheduler, EMA, step:
anything every rank holds a part or a copy of), ``rank-00000.pt`` … (what differs per rank: RNG states,
data-loader position), any extra text files (``config.yaml``), and the completion marker ``COMPLETE``.

A snapshot is written into ``.tmp-step-…`` and renamed once every rank has finished and the marker is
in place, so a directory named ``step-…`` with a marker is complete; anything else is ignored (a crash
mid-save costs that save, never an older checkpoint). The marker, written last, records the world size
and each file's size and CRC-32 (:mod:`parallel.checkpoint_safety` says why CRC-32); every read path
verifies them first, and :func:`latest` skips a damaged checkpoint for the newest intact one, saying so
(a file that cannot be read, EIO or EACCES, is an error on every rank, not damage: nothing is skipped).
Retention deletes a checkpoint's marker before its data, so a kill mid-deletion leaves a directory that
is ignored, never one that looks complete; it never deletes the checkpoint just written, and what it
cannot delete is a warning (the save succeeded). A trainer resuming past a damaged checkpoint moves it
aside to ``damaged-step-…`` (``latest(quarantine=True)``), out of retention's ranking. Nothing is
unpickled freely: tensors and non-tensor items with ``weights_only=True``, DCP's ``.metadata`` through
:mod:`parallel.checkpoint_metadata`.
"""

from __future__ import annotations

import errno
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
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from parallel import checkpoint_safety as safety
from parallel.checkpoint_safety import (  # noqa: F401  (CheckpointError, load_pt, marker, … are ours to export)
    MARKER,
    CheckpointError,
    CheckpointUnreadable,
    SafeFileSystemReader,
    SafeFullPlanner,
    SafeLoadPlanner,
    load_pt,
    marker,
    read_safetensors,
    save_pt,
)
from parallel.file_mode import save_safetensors

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
# A verdict: None (intact), or (DAMAGED, problem): a definite finding (a missing, resized or altered file,
# a bad marker, refused metadata), or (UNCHECKED, error): a file could not be read (EIO, ESTALE, EACCES,
# no memory …), which says nothing of the checkpoint: never a fallback past it nor a reason to move it.
DAMAGED, UNCHECKED = "damaged", "unchecked"
# verdicts of this process by checkpoint state (see _identity): resume asks about one checkpoint several
# times (latest, load, the trainer's own checks) and a 200 GB read should happen once; an UNCHECKED one
# is not kept (the next call reads again)
_VERDICTS: dict[tuple, tuple[str, str] | None] = {}
_UNKNOWN = object()


def verify(path: str | os.PathLike, *, distributed: bool = False) -> None:
    """Raise :class:`CheckpointError` naming the file if the checkpoint at ``path`` is damaged: a missing,
    resized or altered file, an empty or invalid marker; :class:`CheckpointUnreadable` if a file could
    not be read (an I/O error other than its absence: a transient storage fault, a permission). A
    checkpoint written before checksums is accepted with a warning after a size check of its DCP files.

    Args:
        distributed: every rank of the default process group calls this (a collective); each reads a
            disjoint share of the files and the verdicts are combined, so a resume reads the checkpoint
            once in all, not once per rank. Every rank raises the same error.
    """
    verdict, _ = _verdict(Path(path), distributed)
    _raise_unchecked(path, verdict)
    if verdict is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {verdict[1]}")


def _raise_unchecked(path, verdict: tuple[str, str] | None) -> None:
    if verdict is not None and verdict[0] == UNCHECKED:
        raise CheckpointUnreadable(
            f"checkpoint {path} could not be checked: {verdict[1]}. Nothing was skipped or moved: run again "
            f"once the storage answers (or the file is readable)"
        )


def _verdict(path: Path, distributed: bool) -> tuple[tuple[str, str] | None, bool]:
    """(the verdict, whether it was found now rather than remembered). Over ranks, a damaged share
    makes the checkpoint damaged whatever the others could read; else one unread share leaves it
    unchecked."""
    rank, world = _rank_world()
    key = _identity(path)
    cached = _VERDICTS.get(key, _UNKNOWN)
    if not distributed or world == 1:
        verdict = cached if cached is not _UNKNOWN else _check(path, 0, 1)
    else:
        # always the collective (a rank with a cached verdict must not skip it); a cached verdict is whole
        mine = cached if cached is not _UNKNOWN else _check(path, rank, world)
        found = [v for v in _gather(mine) if v is not None]
        verdict = next((v for v in found if v[0] == DAMAGED), found[0] if found else None)
    if key is not None and (verdict is None or verdict[0] == DAMAGED):
        _VERDICTS[key] = verdict
    return verdict, cached is _UNKNOWN


def _check(path: Path, rank: int, world: int) -> tuple[str, str] | None:
    """:func:`safety.check` as a verdict. What it raises is this rank's verdict too (a rank that raised
    instead would leave the others waiting in the gather of verdicts): an unreadable file, no memory or
    anything unexpected is UNCHECKED, never damage."""
    try:
        problem = safety.check(path, rank, world)
    except CheckpointUnreadable as e:
        return UNCHECKED, str(e)
    except Exception as e:  # MemoryError included: the state of this process, not of the checkpoint
        log.debug("checking %s failed", path, exc_info=True)
        return UNCHECKED, f"{path}: {type(e).__name__} while checking it: {str(e)[:500]}"
    return None if problem is None else (DAMAGED, problem)


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


def latest(root: str | os.PathLike, *, distributed: bool = False, quarantine: bool = False) -> Path | None:
    """The newest intact checkpoint under ``root``, or None if there is none at all.

    A damaged newer one is skipped with a warning naming it and its bad file. If every checkpoint is
    damaged this raises rather than returning None, which a trainer would take for a fresh start. If a
    file of one could not be read (see :func:`verify`), this raises :class:`CheckpointUnreadable` naming
    the checkpoint, the file and the error, before skipping or moving anything: whether it is damaged is
    unknown, and a run resumed from an older one would lose the steps in between for a transient fault.

    Args:
        distributed: a collective over the default group sharing the reading (see :func:`verify`).
        quarantine: for the trainer's resume: on a fallback, rank 0 renames each damaged newer checkpoint
            to ``damaged-step-XXXXXXXX`` (kept for inspection; neither resumed nor counted by retention,
            which would otherwise keep it, ranked by step, over the run's new saves), once every rank has
            the verdicts. Export, sampling and ``init.from`` only read (the default).
    """
    damaged: list[tuple[Path, str]] = []
    news = False
    rank = _rank_world()[0]
    for _, p in reversed(complete_checkpoints(root)):
        verdict, new = _verdict(p, distributed)
        _raise_unchecked(p, verdict)  # on every rank: the verdict was exchanged
        if verdict is None:
            if news and rank == 0:
                log.warning("falling back to %s, the newest intact checkpoint", p)
            if quarantine and rank == 0:
                for bad, why in damaged:
                    _move_aside(bad, why)
            return p
        damaged.append((p, verdict[1]))
        news |= new
        if new and rank == 0:  # said once per process, however often it is asked
            log.warning("checkpoint %s is damaged and skipped: %s", p, verdict[1])
    if damaged:
        said = "; ".join(f"{p.name}: {problem}" for p, problem in damaged)
        raise CheckpointError(
            f"{root}: no intact checkpoint ({said}). Repair or move them away to start afresh"
        )
    return None


def _move_aside(path: Path, problem: str) -> None:
    """Rename a damaged checkpoint to ``damaged-<name>`` (``-2``, ``-3`` … if taken), saying so."""
    target, n = path.with_name(f"damaged-{path.name}"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"damaged-{path.name}-{n}")
    try:
        os.rename(path, target)
        _fsync_dir(path.parent)
    except OSError as e:
        log.warning("could not move the damaged checkpoint %s aside (%s); it stays in place", path, e)
        return
    log.warning(
        "moved the damaged checkpoint %s aside to %s (%s); delete it when inspected", path, target, problem
    )


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
            save_safetensors({k: v.contiguous() for k, v in state.items()}, out / name, metadata=meta)
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
    if final.exists():  # an earlier save of this step (a rerun after a resume)
        _, problems = _remove_checkpoint(final)
        if problems:
            raise OSError(f"cannot replace the earlier {final.name}: {'; '.join(problems)}")
    os.replace(tmp, final)
    # the checkpoint is saved: what fails from here on is a warning, not a failed save
    try:
        _fsync_dir(final.parent)
    except OSError as e:
        log.warning(
            "saved %s, but syncing its folder failed (a power loss may undo the rename): %s", final, e
        )
    try:
        prune(final.parent, keep, protect=final)
    except OSError as e:
        log.warning("saved %s, but retention failed: %s", final, e)


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
def prune(root: str | os.PathLike, keep: int, *, protect: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints (0: keep all), never ``protect``; returns
    what went.

    Each goes marker first (synced), then its data: a kill in between leaves a directory without a
    marker, which is ignored and removed by the next prune, never one that looks complete. What cannot
    be deleted is named in a warning and left (a checkpoint whose marker cannot go stays whole).

    Args:
        protect: the checkpoint just committed. Steps rank checkpoints, and a newer one may be damaged (a
            resume fell back past it without moving it aside, see :func:`latest`): the run's own new
            save must not be what goes.
    """
    found = complete_checkpoints(root)
    if keep <= 0 or not found:
        return []
    kept = {p for _, p in found[-keep:]} | ({Path(protect)} if protect is not None else set())
    gone: list[Path] = []
    failed: list[str] = []
    doomed = [p for _, p in found[:-keep] if p not in kept]  # never the newest: keep >= 1 here
    for p in doomed:
        unmarked, problems = _remove_checkpoint(p)
        failed += problems
        if unmarked:
            gone.append(p)
    oldest_kept = min(s for s, p in found if p in kept)
    for p in Path(root).iterdir():
        m = _STEP.match(p.name)
        if (
            m
            and int(m.group(1)) < oldest_kept
            and p not in doomed
            and p.is_dir()
            and not (p / MARKER).exists()
        ):
            failed += _rmtree(p)  # the rest of a deletion that was cut short
    if failed:
        log.warning(
            "retention could not delete %s; delete by hand what is no longer wanted", "; ".join(failed)
        )
    return gone


def _remove_checkpoint(path: Path) -> tuple[bool, list[str]]:
    """Remove a checkpoint, marker first: (whether its marker is gone, what could not be removed as
    ``"<path>: <reason>"``). Its data goes only once the marker's removal is synced."""
    m = path / MARKER
    try:
        if m.exists():
            m.unlink()
    except OSError as e:
        return False, [f"{m}: {e.strerror or e} (the checkpoint is left whole)"]
    try:
        _fsync_dir(path)  # the marker is gone for good before any data file goes
    except OSError as e:
        return True, [f"{path}: {e.strerror or e} (syncing the removal of its marker; its data is left)"]
    return True, _rmtree(path)


def _rmtree(path: Path) -> list[str]:
    """``shutil.rmtree``, going on past what cannot be removed; that, as ``"<path>: <reason>"``."""
    failed: list[str] = []

    def note(_fn, where, exc_info) -> None:
        e = exc_info[1]
        if failed and getattr(e, "errno", None) == errno.ENOTEMPTY:
            return  # a directory left non-empty by a file already named
        failed.append(f"{where}: {getattr(e, 'strerror', None) or e}")

    shutil.rmtree(path, onerror=note)
    return failed


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
