"""One writer per run directory: ``run.dir/LOCK``, taken by rank 0 before anything is written.

Two trainers on one run directory would interleave their metrics and overwrite each other's
checkpoints, so the second one is refused. The lock file holds who owns it (host, pid, the pid's start
time and namespace, the SLURM job), and the owner holds an ``flock`` on it for as long as it lives.
The kernel (and an NFS lock manager) drops that flock when the owner dies however it dies (SIGKILL,
a container restart), so a lock nobody holds is stale for certain and is taken over in place, with a
warning; a held one is refused, naming its owner.

On file systems without ``flock`` (Lustre mounted ``noflock``, some FUSE mounts) liveness falls back
to what the file says, and a lock is taken over only when that proves its owner dead:

- same host and pid namespace, and that pid is gone (or is now another process: its start time);
- same SLURM job id and a lower restart count: the job was requeued, so the old holder is dead.

Anything else (another host, container or job, an unreadable file) is refused there, and the message
says when the owner last showed life (the trainer touches the file as it logs) and how to remove it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path

from data.worker_signals import pid_alive
from parallel.file_mode import as_opened

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
    if not isinstance(pid, int) or not pid_alive(pid):
        return f"pid {pid} on {owner.get('host')} is gone"
    if owner.get("start") is not None and _start_time(pid) != owner["start"]:
        return f"pid {pid} on {owner.get('host')} is now another process"
    return None


class RunLock:
    """The exclusive lock of a run directory; :meth:`release` (or leaving the ``with``) removes it."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK
        self.held = False
        self._fd: int | None = None  # open on the lock file, flocked, while held

    def acquire(self) -> RunLock:
        """Take the lock, taking over a stale one; raises :class:`RunDirLocked` if a writer is live."""
        me = _me()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # a lock that vanishes or is taken over between our steps: look again
            if self._create(me):
                return self._hold()
            try:
                fd = os.open(self.path, os.O_RDWR)
            except FileNotFoundError:
                continue
            owner, free = _parse(_read(fd)), _try_flock(fd)
            if owner and _is_me(owner, me):
                os.close(fd)
                return self._hold()  # this process already holds it (a second setup in one process)
            reason = "nobody holds its flock" if free else None if free is False else _stale(owner, me)
            if reason is None:
                os.close(fd)
                raise RunDirLocked(self._refusal(owner))
            if free:  # we hold its flock now: rewrite it in place, nobody else can take it meanwhile
                _rewrite(fd, me)
                self._fd = fd
                log.warning("run.dir lock %s was stale (%s, %s): taken over", self.path, _who(owner), reason)
                return self._hold()
            os.close(fd)
            if self._take_over(_read_path(self.path), owner):
                log.warning("run.dir lock %s is stale (%s): taking it over", self.path, reason)
        raise RunDirLocked(f"{self.path}: could not take the lock (other processes keep taking it)")

    def _hold(self) -> RunLock:
        self.held = True
        return self

    def _create(self, me: dict) -> bool:
        # the owner is written to a private file, flocked, then linked into place: the lock never
        # exists without its contents, nor unflocked (nobody can judge a fresh lock to be stale)
        fd, tmp = tempfile.mkstemp(prefix=f"{LOCK}.", dir=self.path.parent)
        try:
            as_opened(fd)  # mkstemp's 0600 would keep others sharing the run dir from judging the lock
            _rewrite(fd, me)
            _try_flock(fd)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                os.close(fd)
                return False
            except OSError:  # a file system without hard links: exclusive create, then write
                os.close(fd)
                return self._create_exclusive(me)
            self._fd = fd
            return True
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _create_exclusive(self, me: dict) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            return False
        _try_flock(fd)
        _rewrite(fd, me)
        self._fd = fd
        return True

    def _take_over(self, judged: str | None, owner: dict) -> bool:
        # (no flock here) moved aside, then checked to be the lock we judged stale: two processes
        # that judged the same dead owner must not both remove "the" lock (the second would remove
        # the first's fresh one)
        aside = self.path.with_name(f"{LOCK}.stale.{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            if _read_path(aside) != judged:  # a live lock taken meanwhile: put it back
                with contextlib.suppress(OSError):
                    os.link(aside, self.path)
                if not self.path.exists():
                    os.rename(aside, self.path)
                return False
            return True
        finally:
            aside.unlink(missing_ok=True)

    def _refusal(self, owner: dict) -> str:
        try:
            quiet = time.time() - self.path.stat().st_mtime
        except OSError:
            quiet = float("nan")
        return (
            f"run.dir={self.path.parent} is in use by {_who(owner)} "
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
        owner = _parse(_read_path(self.path) or "")
        if owner.get("pid") == os.getpid():  # never remove a lock someone took over from us
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        if self._fd is not None:
            os.close(self._fd)  # drops the flock, after the file is gone
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _try_flock(fd: int) -> bool | None:
    """Take an exclusive flock without waiting: True if taken, False if another process holds it,
    None if this file system has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise


def _rewrite(fd: int, me: dict) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    os.fsync(fd)


def _read(fd: int) -> str:
    return os.pread(fd, 1 << 16, 0).decode("utf-8", "replace")


def _read_path(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None


def _who(owner: dict) -> str:
    if not owner:
        return "an unreadable lock"
    job = f", SLURM job {owner['slurm_job']}" if owner.get("slurm_job") else ""
    return f"pid {owner.get('pid')} on {owner.get('host')}{job}"
