"""One writer per run directory: ``run.dir/LOCK``, taken by rank 0 before anything is written.

Two trainers on one run directory would interleave their metrics and overwrite each other's
checkpoints, so the second one is refused. The lock file holds who owns it (host, pid, the pid's start
time, the SLURM job) and is removed on exit. A lock left by a process that died without cleaning up
(SIGKILL, a node failure) is stale and taken over, with a warning, when that can be told for sure:

- same host, and that pid is gone (or is now another process: its start time differs);
- same SLURM job id and a lower restart count: the job was requeued, so the old holder is dead.

A lock from another host (or container) and another job cannot be checked from here, nor can an
unreadable one: it is refused, and the message says when the owner last showed life (the trainer
touches the file as it logs) and how to remove it.
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


def _parse(text: str) -> dict:
    try:
        owner = json.loads(text)
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


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


def _pid_namespace() -> int | None:
    """The pid namespace's inode: containers on one host (one hostname) can have separate pids."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _me() -> dict:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "pidns": _pid_namespace(),
        "start": _start_time(pid),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart": _int(os.environ.get("SLURM_RESTART_COUNT")),
        "since": time.time(),
    }


def _int(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0


def _is_me(owner: dict, me: dict) -> bool:
    return all(owner.get(k) == me[k] for k in ("host", "pid", "pidns", "start"))


def _stale(owner: dict, me: dict) -> str | None:
    """Why ``owner`` is certainly dead, or None if it may be alive."""
    restart = owner.get("slurm_restart")
    same_job = owner.get("slurm_job") and owner["slurm_job"] == me["slurm_job"]
    if same_job and isinstance(restart, int) and restart < me["slurm_restart"]:
        return f"left by SLURM job {owner['slurm_job']} before its requeue #{me['slurm_restart']}"
    if owner.get("host") != me["host"] or owner.get("pidns") != me["pidns"]:
        return None  # another machine or container: its pids mean nothing here
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
        for _ in range(5):  # a lock that vanishes or is taken over between our steps: look again
            if self._create(me):
                self.held = True
                return self
            try:
                text = self.path.read_text(encoding="utf-8")
            except FileNotFoundError:
                continue
            owner = _parse(text)
            if owner and _is_me(owner, me):
                self.held = True  # this process already holds it (a second setup in one process)
                return self
            reason = _stale(owner, me) if owner else None
            if reason is None:
                raise RunDirLocked(self._refusal(owner))
            if self._take_over(text):
                log.warning("run.dir lock %s is stale (%s): taking it over", self.path, reason)
        raise RunDirLocked(f"{self.path}: could not take the lock (other processes keep taking it)")

    def _create(self, me: dict) -> bool:
        # the owner is written to a private file and linked into place, so the lock never exists
        # without its contents (nobody can judge a half-written lock to be unreadable, hence stale)
        tmp = self.path.with_name(f"{LOCK}.{me['host']}.{me['pid']}")
        tmp.write_text(json.dumps(me), encoding="utf-8")
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive create, then write
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over(self, judged: str) -> bool:
        # moved aside, then checked to be the lock we judged stale: two processes that judged the
        # same dead owner must not both remove "the" lock (the second would remove the first's)
        aside = self.path.with_name(f"{LOCK}.stale.{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            if aside.read_text(encoding="utf-8") != judged:  # a live lock taken meanwhile: restore it
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)
                return False
            return True
        finally:
            aside.unlink(missing_ok=True)

    def _refusal(self, owner: dict) -> str:
        try:
            quiet = time.time() - self.path.stat().st_mtime
        except OSError:
            quiet = float("nan")
        job = f", SLURM job {owner['slurm_job']}" if owner.get("slurm_job") else ""
        who = f"pid {owner.get('pid')} on {owner.get('host')}{job}" if owner else "an unreadable lock"
        return (
            f"run.dir={self.path.parent} is in use by {who} "
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
        try:
            owner = _parse(self.path.read_text(encoding="utf-8"))
        except OSError:
            return
        if owner.get("pid") == os.getpid():  # never remove a lock someone took over from us
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
