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
    """A signal handler that only sets a flag; the training loop polls :meth:`agreed` at step boundaries.

    The handler does no I/O (it may interrupt anything); saving happens in the loop, after every rank
    has seen the flag (an all-reduce of max), so all ranks save the same step.
    """

    def __init__(self, signal_name: str = "SIGUSR2"):
        if signal_name == "SIGUSR1":
            raise ValueError("run.preempt_signal=SIGUSR1: NCCL uses SIGUSR1; use SIGUSR2 or SIGTERM")
        try:
            self.signum = signal.Signals[signal_name]
        except KeyError as e:
            raise ValueError(f"run.preempt_signal={signal_name!r}: not a signal name") from e
        self.requested = False
        self._previous = signal.signal(self.signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, device: torch.device | None = None) -> bool:
        """True on every rank if any rank has been signalled (a collective: call it on all ranks)."""
        return all_reduce(1.0 if self.requested else 0.0, "max", device) > 0

    def close(self) -> None:
        signal.signal(self.signum, self._previous)


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
