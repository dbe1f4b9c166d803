"""Atomic torch.distributed.checkpoint (DCP) snapshots with retention and per-rank extras.

Layout of ``root/step-00001000/``: DCP shards and ``.metadata`` (model, optimizer, scheduler, EMA, step:
anything every rank holds a part or a copy of), ``rank-00000.pt`` … (what differs per rank: RNG states,
data-loader position), any extra text files (``config.yaml``), and the completion marker ``COMPLETE``.

A snapshot is written into ``.tmp-step-…`` and renamed once every rank has finished and the marker is
in place, so a directory named ``step-…`` with a marker is complete; anything else is ignored (a crash
mid-save costs that save, never an older checkpoint). Everything is read with ``weights_only=True``,
including the non-tensor items DCP stores (whose default reader unpickles them freely).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._nested_dict import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

# one process without a process group is a supported case here, not a mistake worth a warning
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

MARKER = "COMPLETE"
_STEP = re.compile(r"^step-(\d{8})$")


class _SafeBytes:
    """Non-tensor items load with ``weights_only=True`` (DCP's planners unpickle them freely)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class SafeLoadPlanner(_SafeBytes, DefaultLoadPlanner):
    """Loads into an existing state dict (resume)."""


class _SafeFullPlanner(_SafeBytes, _EmptyStateDictLoadPlanner):
    """Rebuilds whole tensors from the metadata (export, fine-tuning): one process, no process group."""


# whole-tensor files of an export, and of a DeepSpeed checkpoint next to its ZeRO partitions
WHOLE_FILES = {"model": "model.safetensors", "ema": "ema.safetensors"}


def marker(path: str | os.PathLike) -> dict:
    """The ``COMPLETE`` marker of a checkpoint: its step, time and (DeepSpeed) engine."""
    return json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))


def engine_of(path: str | os.PathLike) -> str:
    """``fsdp`` (a DCP checkpoint) or ``deepspeed``: which trainer engine wrote the checkpoint."""
    return marker(path).get("engine", "fsdp")


def write_safetensors(out: Path, states: dict[str, dict[str, torch.Tensor] | None], step: int) -> None:
    """Whole state dicts as safetensors files (file name → state; empty or None ones skipped), with
    the metadata every export carries."""
    meta = {"format": "pt", "step": str(step)}
    for name, state in states.items():
        if state:
            save_file({k: v.contiguous() for k, v in state.items()}, out / name, metadata=meta)


def read_full(path: str | os.PathLike, keys: set[str]) -> dict:
    """The top-level items ``keys`` of a checkpoint as whole (unsharded) tensors, in one process.

    A DeepSpeed checkpoint answers ``model``, ``ema`` (empty if the run kept none) and ``step`` from
    its whole-tensor files and marker; its optimizer state exists only as ZeRO partitions."""
    if engine_of(path) == "deepspeed":
        return _read_whole_files(Path(path), keys)
    state: dict = {}
    _load_state_dict(
        state, storage_reader=FileSystemReader(str(path)), planner=_SafeFullPlanner(keys=keys), no_dist=True
    )
    return state


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
        out[key] = load_file(f) if f.is_file() else {}
    if "step" in keys:
        out["step"] = torch.tensor(marker(path)["step"])
    return out


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def complete_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a checkpoint, a ``checkpoints/`` folder or a run directory."""
    path = Path(path)
    if (path / MARKER).is_file():
        return path
    for root in (path, path / "checkpoints"):
        found = latest(root)
        if found is not None:
            return found
    raise FileNotFoundError(f"{path}: no complete checkpoint (a step-XXXXXXXX/ directory with {MARKER})")


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
    """
    root, final = Path(root), step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash during an earlier attempt at this step
        tmp.mkdir(parents=True)
    barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    torch.save(rank_state, tmp / f"rank-{rank:05d}.pt")
    barrier()
    if rank == 0:
        commit(tmp, final, step, files, keep)
    barrier()
    return final


def commit(tmp: Path, final: Path, step: int, files: dict[str, str] | None, keep: int, **extra) -> None:
    """Rank 0, once every rank has written into ``tmp``: the text ``files``, the marker (with
    ``extra`` items), the rename to ``final`` and retention. The marker is synced before the rename
    and the rename before pruning, so a crash at any point leaves the newest complete checkpoint."""
    for name, text in (files or {}).items():
        (tmp / name).write_text(text, encoding="utf-8")
    _write_synced(tmp / MARKER, json.dumps({"step": step, "time": time.time(), **extra}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    prune(final.parent, keep)


def load(path: str | os.PathLike, state: dict, rank: int) -> dict | None:
    """Load ``state`` in place from a checkpoint; returns this rank's own items (None if absent, e.g.
    after a change of world size)."""
    path = Path(path)
    dcp.load(state, checkpoint_id=str(path), planner=SafeLoadPlanner())
    own = path / f"rank-{rank:05d}.pt"
    return torch.load(own, weights_only=True) if own.is_file() else None


def prune(root: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints (0: keep all); returns what went."""
    found = complete_checkpoints(root)
    if keep <= 0 or len(found) <= keep:
        return []
    gone = [p for _, p in found[:-keep]]  # never the newest: keep >= 1 here
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
