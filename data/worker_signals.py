"""How data-loader workers treat stop signals: the trainer decides when to stop, not a worker.

A terminal's Ctrl-C signals the whole foreground process group, and SLURM's ``scancel`` (or a time
limit) signals every process of the job, data workers included. A worker killed by such a signal
crashes the trainer ("DataLoader worker … is killed by signal") before it reaches the step boundary
where it would save. So workers ignore SIGINT and the preemption signals, and a SIGTERM is ignored
too, except when their loader is shutting them down: torch's ``_shutdown_workers`` and
multiprocessing's exit handler ``terminate()`` (SIGTERM) a worker that does not end by itself, and
then wait for it, so a worker stuck in a slow read must still obey that SIGTERM, or the trainer
could not exit. ``StopFlag`` tells the two apart.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import multiprocessing.util  # registers its exit handler now, before ours below (see _shutting_down)
import os
import signal

# SIGUSR2 is the default run.preempt_signal; SIGHUP comes with a closed terminal. (Under fork the
# trainer's own handlers are inherited and do nothing in a worker; under spawn or forkserver, the
# default on newer Pythons, a worker would start with the default action: terminate.)
_IGNORED = (signal.SIGINT, signal.SIGUSR2, signal.SIGHUP)
# signals whose handling a worker keeps: crashes, job control, child reaping (SIG_IGN on SIGCHLD
# would break waiting for a shard's pipe: command), and SIGTERM (below)
_LEFT_ALONE = {
    signal.SIGTERM, signal.SIGCHLD, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL,
    signal.SIGABRT, signal.SIGKILL, signal.SIGSTOP, signal.SIGCONT, signal.SIGTSTP, signal.SIGTTIN,
    signal.SIGTTOU, signal.SIGWINCH, signal.SIGURG, signal.SIGPIPE,
}  # fmt: skip
_LIVE: set[StopFlag] = set()


def _handler(sig: signal.Signals):
    try:
        return signal.getsignal(sig)
    except (ValueError, OSError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (also when another user owns it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StopFlag:
    """Shared with one epoch's workers: set once their loader starts shutting them down."""

    def __init__(self):
        self.value = multiprocessing.RawValue("b", 0)  # shared memory: passed to workers at start
        _LIVE.add(self)

    def set(self) -> None:
        self.value.value = 1
        _LIVE.discard(self)

    def worker_init_fn(self):
        """The ``worker_init_fn`` for a DataLoader whose workers follow this flag. Besides
        :data:`_IGNORED`, workers ignore every signal the trainer handles at this moment (its
        ``run.preempt_signal``, whatever it is) other than SIGTERM and those in :data:`_LEFT_ALONE`."""
        handled = {s for s in signal.Signals if s not in _LEFT_ALONE and callable(_handler(s))}
        ignored = tuple(sorted({*_IGNORED, *handled} - {signal.SIGTERM}))
        return functools.partial(_install, self.value, os.getpid(), ignored)


def _install(value, parent: int, ignored: tuple[int, ...], worker_id: int) -> None:
    signal.set_wakeup_fd(-1)  # a forked worker must not write into the trainer's Ctrl-C counter
    for sig in ignored:
        signal.signal(sig, signal.SIG_IGN)

    def on_sigterm(signum, frame):
        # the trainer's pid, not os.getppid(): under forkserver a worker's parent is the server
        if value.value or not pid_alive(parent):  # our loader is shutting us down, or is gone
            os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)


@atexit.register
def _shutting_down() -> None:
    # registered after multiprocessing's own exit handler (its module is imported above), so it runs
    # first (atexit is last in, first out): the SIGTERM that handler then sends ends the workers
    for flag in list(_LIVE):
        flag.set()
