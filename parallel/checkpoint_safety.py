"""What :mod:`parallel.checkpoint` needs to read checkpoints it cannot trust: the ``COMPLETE`` marker and
its per-file checksums, DCP metadata and items without arbitrary unpickling, the check of one checkpoint
(:func:`check`), and errors that name the file and what is wrong with it.

- ``.metadata``: torch's ``FileSystemReader.read_metadata`` is a plain ``pickle.load``;
  :mod:`parallel.checkpoint_metadata` reads it without effects (:class:`SafeFileSystemReader`).
  Everything else DCP reads is already safe: tensors are read with ``weights_only=True`` by torch,
  non-tensor items by our planners (``SafeLoadPlanner``).
- Checksums: CRC-32 (``zlib.crc32``), not SHA-256. They guard against accidental damage (bit rot, a
  truncated copy, a half-written file); whoever can rewrite a data file can rewrite the marker too, so a
  cryptographic hash would buy nothing, while a 14B model's checkpoint is ~200 GB and CRC-32 runs at
  ~4 GB/s per core here against ~1.7 GB/s for SHA-256 (with SHA-NI). zlib releases the GIL, so files
  are summed on a few threads, and over ranks each rank sums a disjoint share of the files.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import pickle
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.distributed.checkpoint._nested_dict import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner

from parallel.checkpoint_metadata import (  # noqa: F401  (ours to export)
    CheckpointError,
    CheckpointUnreadable,
    SafeFileSystemReader,
    absent_or_unreadable,
    check_dcp_structure,
    load_metadata,
)

log = logging.getLogger("parallel.checkpoint")

MARKER = "COMPLETE"
CHECKSUM = "crc32"
_CHUNK = 16 << 20  # large reads keep a parallel file system streaming; small enough for any host
_THREADS = 4


# ---- the marker --------------------------------------------------------------------------------------
def marker(path: str | os.PathLike) -> dict:
    """The ``COMPLETE`` marker of a checkpoint: its step, time, world size, (DeepSpeed) engine and, since
    checksums were added, ``files``: name → ``{"size": bytes, "crc32": hex}``."""
    f = Path(path) / MARKER
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
    except ValueError as e:  # empty, not JSON, not UTF-8
        raise CheckpointError(f"{f}: empty or invalid marker ({e})") from None
    except IsADirectoryError:
        raise CheckpointError(f"{f}: a directory, not a marker") from None
    except OSError as e:  # missing: damage; any other error: CheckpointUnreadable
        raise CheckpointError(absent_or_unreadable(f, e, "missing (the checkpoint is incomplete)")) from None
    if not isinstance(m, dict) or not isinstance(m.get("step"), int):
        raise CheckpointError(f"{f}: invalid marker (a JSON object with an integer step expected)")
    if "files" in m and not _valid_file_list(m["files"]):
        raise CheckpointError(f"{f}: invalid marker (files: name → {{size, crc32}} expected)")
    return m


def _valid_file_list(files) -> bool:
    """A marker's file list names plain relative paths inside the checkpoint with sizes and checksums."""
    return isinstance(files, dict) and all(
        isinstance(name, str)
        and name
        and not PurePosixPath(name).is_absolute()
        and ".." not in PurePosixPath(name).parts
        and isinstance(v, dict)
        and isinstance(v.get("size"), int)
        and isinstance(v.get(CHECKSUM), str)
        for name, v in files.items()
    )


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


class SafeFullPlanner(_SafeBytes, _EmptyStateDictLoadPlanner):
    """Rebuilds whole tensors from the metadata (export, fine-tuning): one process, no process group."""


# ---- checksums -----------------------------------------------------------------------------------------
def file_sum(path: Path) -> dict:
    """``{"size": bytes, "crc32": "8 hex digits"}`` of one file, read in large chunks."""
    crc, size, buf = 0, 0, bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
            size += n
    return {"size": size, CHECKSUM: f"{crc:08x}"}


def files_of(directory: Path, skip: set[str]) -> list[str]:
    """Every file under ``directory`` (relative POSIX paths, sorted), but ``skip``."""
    names = (p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    return sorted(n for n in names if n not in skip)


def sums_of(directory: Path, names: list[str]) -> dict[str, dict]:
    """:func:`file_sum` of each name, a few files at a time."""
    return dict(zip(names, _each_file(file_sum, directory, names), strict=True))


def _each_file(fn, directory: Path, names: list[str]) -> list:
    with ThreadPoolExecutor(min(_THREADS, max(1, len(names)))) as pool:
        return list(pool.map(lambda n: fn(directory / n), names))


def check_sizes(directory: Path, expected: dict[str, dict]) -> str | None:
    """The first missing or wrongly sized file (cheap: no reading), or None. Any other I/O error says
    nothing about the file (EIO, ESTALE, EACCES …): raised as :class:`CheckpointUnreadable`."""
    for name, want in expected.items():
        f = directory / name
        try:
            if not f.is_file():
                return f"{f}: missing (the marker lists it)"
            size = f.stat().st_size
        except OSError as e:  # removed since is_file: missing; EIO, EACCES …: raised
            return absent_or_unreadable(f, e, "missing (the marker lists it)")
        if size != want["size"]:
            return f"{f}: {size} bytes, the marker says {want['size']} (truncated or overwritten)"
    return None


def _sum_or_error(f: Path) -> dict | str:
    try:
        return file_sum(f)
    except OSError as e:
        return absent_or_unreadable(f, e, "missing (the marker lists it)")


def check_sums(directory: Path, expected: dict[str, dict]) -> str | None:
    """The first missing file or file whose content does not match its checksum (reads every byte), or
    None (other I/O errors raised, as in :func:`check_sizes`)."""
    names = sorted(expected)
    for name, got in zip(names, _each_file(_sum_or_error, directory, names), strict=True):
        want = expected[name]
        if isinstance(got, str):
            return got
        if got != {"size": want["size"], CHECKSUM: want.get(CHECKSUM)}:
            return (
                f"{directory / name}: {CHECKSUM} {got[CHECKSUM]}, the marker says {want.get(CHECKSUM)} "
                f"(the file is damaged)"
            )
    return None


def check(path: Path, rank: int, world: int) -> str | None:
    """The first problem in this rank's share (every ``world``-th file from ``rank``), or None: a definite
    finding (a missing, resized or altered file, a bad marker, refused metadata). A file that could not
    be read is no finding: :class:`CheckpointUnreadable` is raised."""
    try:
        m = marker(path)
    except CheckpointUnreadable:
        raise
    except CheckpointError as e:
        return str(e)
    if "files" not in m:
        if rank == 0:
            log.warning("%s was written before per-file checksums: only its completeness is checked", path)
    else:
        share = dict(sorted(m["files"].items())[rank::world])
        problem = check_sizes(path, share) or check_sums(path, share)
        if problem is not None:
            return problem
    # DCP's .metadata through the allow-list (a crafted one is refused here, before DCP reads it) and
    # the files it points into: cheap, and all an old checkpoint without checksums gets
    if rank == 0 and m.get("engine", "fsdp") == "fsdp":
        return check_dcp_structure(path)
    return None


# ---- readable errors -------------------------------------------------------------------------------------
def load_pt(path: Path):
    """``torch.load(path, weights_only=True)``, with an error naming the file when it is damaged."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a global: say so plainly
        raise CheckpointError(f"{path}: refused to load: {str(e).splitlines()[0]}") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(
            f"{path}: unreadable (truncated or not a torch file): {str(e).splitlines()[0]}"
        ) from None


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file``, with an error naming the file when it is not one."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def save_pt(obj, path: Path) -> None:
    """``torch.save`` through a buffer: written by Python, a full disk raises ``OSError(ENOSPC)`` (torch's
    own file writer reports it as ``enforce fail at inline_container.cc … unexpected pos``)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    try:
        with open(path, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a failed write() does not say which file
        raise OSError(e.errno, e.strerror, str(path)) from e


_NO_SPACE = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}


def describe_write_error(e: BaseException, where: Path) -> str:
    """One line for a failed checkpoint write: the cause (a full disk above all) and the path."""
    cause = os_error_in(e)
    if cause is not None:
        target = cause.filename or where
        if cause.errno in _NO_SPACE:
            return f"{_NO_SPACE[cause.errno]} writing {target}"
        if cause.errno == errno.EFBIG:
            return f"file too large for the file system or the process's file size limit, writing {target}"
        return f"cannot write {target}: {cause.strerror or cause}"
    last = str(e).strip().splitlines()[-1:] or [""]
    return f"{type(e).__name__} while writing {where}: {last[0]}"


def os_error_in(e: BaseException | None, depth: int = 0) -> OSError | None:
    """The first ``OSError`` in ``e``, its causes, or the rank failures of a DCP ``CheckpointException``."""
    if e is None or depth > 8:
        return None
    if isinstance(e, OSError) and e.errno is not None:
        return e
    inner = [exc for exc, _ in e.failures.values()] if isinstance(e, CheckpointException) else []
    for nxt in [*inner, e.__cause__, e.__context__]:
        found = os_error_in(nxt, depth + 1)
        if found is not None:
            return found
    return None
