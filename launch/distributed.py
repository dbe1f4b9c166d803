"""Process setup for one training process: device, process group, small agreed decisions, preemption.

Works the same as a plain ``python -m launch.train`` (one process, no process group) and under
``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK from the environment).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", backend: str = "auto") -> DistEnv:
    """Pick the device and, under torchrun, join the process group (nccl on CUDA, gloo on CPU)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("run.device=cuda but no CUDA device is visible")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
    return DistEnv(rank, world, local_rank, dev)


def all_reduce(value: float, op: str = "sum", device: torch.device | None = None) -> float:
    """A float reduced over all ranks (``sum`` or ``max``); the value itself with one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    dev = device or (torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu"))
    t = torch.tensor([value], dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return float(t.item())


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class Preemption:
    """Signal handlers that only set a flag; the training loop polls :meth:`agreed` at step boundaries.

    The handlers do no I/O beyond one line on stderr (they may interrupt anything); saving happens in
    the loop, after every rank has seen the flag (an all-reduce of max), so all ranks save the same
    step. Three requests, in increasing order of what the loop then does:

    - Ctrl-C (SIGINT): stop at the end of the step, save, exit 0. A second Ctrl-C kills the process
      at once (by SIGINT: exit status 130 in a shell); ``run.dir``'s lock is then left behind and
      taken over as stale by the next run.
    - SIGTERM (``kill``, ``scancel``, a scheduler's time limit): the same, without a message per signal.
    - ``preempt_signal`` (SLURM's ``--signal``): the same, and the job asks to be requeued.
    """

    STOP, PREEMPT = 1, 2

    def __init__(self, signal_name: str = "SIGUSR2"):
        if signal_name == "SIGUSR1":
            raise ValueError("run.preempt_signal=SIGUSR1: NCCL uses SIGUSR1; use SIGUSR2 (the default)")
        if signal_name in ("SIGTERM", "SIGINT"):
            # these also mean "stop for good" (scancel, kill, Ctrl-C): requeueing on them would bring
            # a cancelled job back forever
            raise ValueError(
                f"run.preempt_signal={signal_name}: {signal_name} already stops the run (save, exit, no "
                "requeue); the preemption signal must be one only the scheduler sends, e.g. SIGUSR2"
            )
        try:
            self.signum = signal.Signals[signal_name]
        except KeyError as e:
            raise ValueError(f"run.preempt_signal={signal_name!r}: not a signal name") from e
        self.requested = 0  # 0, STOP or PREEMPT
        self.received: signal.Signals | None = None
        self.pid = os.getpid()
        self._previous = {}
        for sig in {signal.SIGTERM, signal.SIGINT, self.signum}:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self.pid:
            return  # a forked data worker inherited this handler: its parent decides when it stops
        sig = signal.Signals(signum)
        if sig == signal.SIGINT and sig == self.received:
            # the second Ctrl-C: abort now, even from inside a blocking C call (a collective, a
            # kernel), where a Python exception would only be raised once it returned
            os.write(2, b"\naborted (second Ctrl-C): nothing saved since the newest checkpoint\n")
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
            return
        if sig == signal.SIGINT:
            os.write(2, b"\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again aborts)\n")
        self.received = sig
        self.requested = max(self.requested, self.PREEMPT if sig == self.signum else self.STOP)

    def agreed(self, device: torch.device | None = None) -> int:
        """The strongest request made on any rank (0: none, STOP or PREEMPT): a collective, call it
        on all ranks."""
        return int(all_reduce(float(self.requested), "max", device))

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def requeue_slurm_job() -> bool:
    """Ask SLURM to requeue this job (rank 0 only, after the checkpoint is complete)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if proc.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job, proc.stderr.strip())
        return False
    log.info("requeued SLURM job %s", job)
    return True
