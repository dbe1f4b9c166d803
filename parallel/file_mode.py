"""Files that others read get the mode a plain ``open()`` gives: 0o666 less the umask.

Writers that go through a private temporary file leave it 0600 whatever the umask says: safetensors'
``save_file`` (0.8 writes a temporary file and renames it) and ``tempfile.mkstemp``. Checkpoints and
exports written so cannot be read by the group a run directory is shared with; these helpers give them
the umask's mode back, so a restrictive umask (0o077) is honoured too.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor


def umask() -> int:
    """The process's umask. Read from ``/proc/self/status`` where Linux shows it: ``os.umask`` can only
    read it by setting it, and a file another thread creates meanwhile (DCP's writers, a logger) would
    get the mask set for that instant (0o077 here, so never a looser one)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def open_mode() -> int:
    """The permission bits ``open(path, "w")`` gives a new file now."""
    return 0o666 & ~umask()


def as_opened(path: str | os.PathLike | int) -> None:
    """Give ``path`` (or an open file descriptor) the mode a plain ``open()`` would have given it."""
    if isinstance(path, int):
        os.fchmod(path, open_mode())
    else:
        os.chmod(path, open_mode())


def save_safetensors(tensors: dict[str, Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """safetensors' ``save_file``, with the mode ``open()`` would give (see the module docstring)."""
    save_file(tensors, path, metadata=metadata)
    as_opened(path)
