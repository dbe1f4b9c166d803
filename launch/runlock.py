"""One writer per run directory: ``run.dir/LOCK``, taken by rank 0 before anything is written.

Two trainers on one run directory would interleave their metrics and overwrite each other's
checkpoints, so the second one is refused. The lock file holds who owns it (host, pid, the pid's start
time, the SLURM job) and is removed on exit. A lock left by a process that died without cleaning up
(SIGKILL, a node failure) is stale and taken over, with a warning, when that can be told for sure:

- same host, and that pid is gone (or is now another process: its start time differs);
- same SLURM job id and a lower restart count: the job was requeued, so the old holder is dead.

A lock from another host and another job cannot be checked from here: it is refused, and the message
says when the owner last showed life (the trainer touches the file as it logs) and how to remove it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK = "LOCK"


class RunDirLocked(RuntimeError):
    """Another live process writes to this run directory."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # field 22, counted after the command name, which is in parentheses and may contain spaces
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _me() -> dict:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "start": _start_time(pid),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        "since": time.time(),
    }


def _stale(owner: dict, me: dict) -> str | None:
    """Why ``owner`` is certainly dead, or None if it may be alive."""
    restart = owner.get("slurm_restart")
    same_job = owner.get("slurm_job") and owner["slurm_job"] == me["slurm_job"]
    if same_job and isinstance(restart, int) and restart < me["slurm_restart"]:
        return f"left by SLURM job {owner['slurm_job']} before its requeue #{me['slurm_restart']}"
    if owner.get("host") != me["host"]:
        return None
    pid = owner.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return f"pid {pid} on {owner.get('host')} is gone"
    if owner.get("start") is not None and _start_time(pid) != owner["start"]:
        return f"pid {pid} on {owner.get('host')} is now another process"
    return None


class RunLock:
    """The exclusive lock of a run directory; :meth:`release` (or leaving the ``with``) removes it."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK
        self.held = False

    def acquire(self) -> RunLock:
        """Take the lock, taking over a stale one; raises :class:`RunDirLocked` if a writer is live."""
        me = _me()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock removed between our checks is retried, not an error
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner.get("pid") == me["pid"] and owner.get("host") == me["host"]:
                    self.held = True  # this process already holds it (a second setup in one process)
                    return self
                reason = _stale(owner, me) if owner else "unreadable lock file"
                if reason is None:
                    raise RunDirLocked(self._refusal(owner)) from None
                log.warning("run.dir lock %s is stale (%s): taking it over", self.path, reason)
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunDirLocked(f"{self.path}: could not take the lock (another process keeps taking it)")

    def _owner(self) -> dict:
        try:
            owner = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def _refusal(self, owner: dict) -> str:
        try:
            quiet = time.time() - self.path.stat().st_mtime
        except OSError:
            quiet = float("nan")
        job = f", SLURM job {owner['slurm_job']}" if owner.get("slurm_job") else ""
        return (
            f"run.dir={self.path.parent} is in use by pid {owner.get('pid')} on {owner.get('host')}{job} "
            f"(lock {self.path}, last touched {quiet:.0f} s ago). Wait for that run, stop it, or choose "
            f"another run.dir; if it is certainly dead, delete {self.path}"
        )

    def touch(self) -> None:
        """Show life (the refusal message reports how long ago this last happened)."""
        if self.held:
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        owner = self._owner()
        if owner.get("pid") == os.getpid():  # never remove a lock someone took over from us
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
