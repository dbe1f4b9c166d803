"""Process setup for one training process: device, process group, small agreed decisions, preemption.

Works the same as a plain ``python -m launch.train`` (one process, no process group) and under
``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK from the environment).
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.config import timeout

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


def init_distributed(
    device: str = "auto",
    backend: str = "auto",
    cpu_offload: bool = False,
    timeout_minutes: float = 30.0,
    tf32: bool = True,
) -> DistEnv:
    """Pick the device and, under torchrun, join the process group.

    Args:
        device: ``run.device`` (``auto``: CUDA when visible).
        backend: ``parallel.backend``, resolved by :func:`process_group_backend`.
        cpu_offload: ``parallel.cpu_offload``: CPU tensors then take part in collectives.
        timeout_minutes: ``parallel.timeout_minutes``, for every collective of the default group.
        tf32: on CUDA, let fp32 matmuls use TF32 (:func:`enable_tf32`). The trainer asks for it with
            ``run.precision=fp32`` only: under bf16 the few fp32 matmuls left are the layers kept in
            fp32 on purpose (time embedding, modulation, head), tiny and better exact.
    """
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    timeout = collective_timeout(timeout_minutes)  # checked with one process too
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("run.device=cuda but no CUDA device is visible")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        if tf32:
            enable_tf32()
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = process_group_backend(dev.type, backend, cpu_offload)
        dist.init_process_group(backend, timeout=timeout, device_id=dev if dev.type == "cuda" else None)
        # groups made later (the DeviceMesh's, DeepSpeed's) take torch's module-level default, not
        # the default group's timeout (read when each group is made): FSDP's collectives run on them
        dist.distributed_c10d.default_pg_timeout = timeout
        dist.distributed_c10d.default_pg_nccl_timeout = timeout
    return DistEnv(rank, world, local_rank, dev)


def process_group_backend(device_type: str, backend: str = "auto", cpu_offload: bool = False) -> str:
    """The ``init_process_group`` backend for ``parallel.backend`` on this device type.

    ``auto`` is nccl on CUDA and gloo on CPU. With ``parallel.cpu_offload`` on CUDA, FSDP2's
    gradients and optimizer states live in host memory and the gradient-norm reduction, the
    finiteness checks and checkpointing run collectives on CPU tensors, which nccl cannot: a gloo
    backend is added for them (``cuda:nccl,cpu:gloo``, as torchtitan). Not otherwise: gloo connects
    every pair of ranks when the group is made, a cost (and thousands of sockets per process) that
    grows with the square of the world size and buys nothing when every collective is on the GPU.
    """
    if backend not in ("auto", "nccl", "gloo"):
        raise ValueError(f"parallel.backend={backend!r}: expected 'auto', 'nccl' or 'gloo'")
    if device_type != "cuda":
        if backend == "nccl":
            raise ValueError("parallel.backend=nccl needs CUDA devices (run.device is cpu): use gloo or auto")
        return "gloo"
    if backend == "gloo":
        return "gloo"
    return "cuda:nccl,cpu:gloo" if cpu_offload else "nccl"


def collective_timeout(minutes: float) -> datetime.timedelta:
    """``parallel.timeout_minutes`` as a timedelta; a ValueError naming the key unless it is a finite
    number > 0."""
    return timeout(minutes, "parallel.timeout_minutes")


def enable_tf32() -> None:
    """Let fp32 matmuls on CUDA use TF32 tensor cores (10-bit mantissa inputs, fp32 accumulation):
    torch's default is full fp32, about 8× slower on A100/H100. Under bf16 autocast this touches only what
    runs outside it; with ``run.precision=fp32`` the model's matmuls run in TF32. cuDNN convolutions
    already allow TF32 by default. ``set_float32_matmul_precision`` rather than the per-backend
    ``fp32_precision`` flags, which torch refuses to mix with the older ``allow_tf32`` ones."""
    torch.set_float32_matmul_precision("high")
    log.info("CUDA: TF32 enabled for fp32 matmuls (torch.set_float32_matmul_precision('high'))")


def all_reduce(value: float, op: str = "sum", device: torch.device | None = None) -> float:
    """A float reduced over all ranks (``sum`` or ``max``); the value itself with one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    dev = device or (torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu"))
    buf = torch.tensor([value], dtype=torch.float64, device=dev)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return float(buf.item())


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def preempt_signum(name: str) -> signal.Signals:
    """The signal ``run.preempt_signal`` names; a ValueError naming the key if it cannot be one."""
    if name not in signal.Signals.__members__:
        raise ValueError(f"run.preempt_signal={name!r}: not a signal name (e.g. SIGUSR2)")
    if name in ("SIGUSR1", "SIGTERM", "SIGINT", "SIGKILL", "SIGSTOP"):
        # NCCL uses SIGUSR1; SIGTERM and SIGINT already mean "stop for good" (scancel, kill, Ctrl-C),
        # and requeueing on them would bring a cancelled job back forever; the last two cannot be caught
        why = "NCCL uses it" if name == "SIGUSR1" else "it cannot mean 'save, exit and requeue'"
        raise ValueError(f"run.preempt_signal={name}: {why}; use one only the scheduler sends, e.g. SIGUSR2")
    return signal.Signals[name]


class Preemption:
    """Signal handlers that only set a flag; the training loop polls :meth:`agreed` at step boundaries.

    The handlers do no I/O (they may interrupt anything); saving happens in the loop, after every rank
    has seen the flag (an all-reduce of max), so all ranks save the same step. Three requests, in
    increasing order of what the loop then does:

    - Ctrl-C (SIGINT): stop at the end of the step, save, exit 0. A second Ctrl-C ends the process at
      once (exit status 130), even while it is blocked in a collective (see :class:`_CtrlC`);
      ``run.dir``'s lock is then left behind, unheld, and the next run takes it over.
    - SIGTERM (``kill``, ``scancel``, a scheduler's time limit): the same, without a message.
    - ``preempt_signal`` (SLURM's ``--signal``): the same, and the job asks to be requeued.
    """

    STOP, PREEMPT = 1, 2

    def __init__(self, signal_name: str = "SIGUSR2"):
        self.signum = preempt_signum(signal_name)
        self.requested = 0  # 0, STOP or PREEMPT
        self.received: signal.Signals | None = None
        self.pid = os.getpid()
        self._previous = {}
        for sig in {signal.SIGTERM, signal.SIGINT, self.signum}:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._ctrl_c = _CtrlC()

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self.pid:
            return  # a forked data worker inherited this handler: its parent decides when it stops
        sig = signal.Signals(signum)
        self.received = sig
        self.requested = max(self.requested, self.PREEMPT if sig == self.signum else self.STOP)

    def agreed(self, device: torch.device | None = None) -> int:
        """The strongest request made on any rank (0: none, STOP or PREEMPT): a collective, call it
        on all ranks."""
        return int(all_reduce(float(self.requested), "max", device))

    def close(self) -> None:
        self._ctrl_c.close()
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


class _CtrlC:
    """Counts Ctrl-Cs as they arrive and acts on them from a thread: the first gets a one-line
    notice, the second ends the process.

    A Python signal handler runs only when the main thread is between bytecodes, not while it is
    blocked in a collective or a kernel (exactly when a user presses Ctrl-C twice), and two signals
    pending at once run it only once. ``signal.set_wakeup_fd`` makes the C-level handler write one
    byte per signal to a pipe the moment it arrives, whatever the main thread is doing; this thread
    reads them.
    """

    def __init__(self):
        self.read, self.write = os.pipe()
        os.set_blocking(self.write, False)
        self.previous = signal.set_wakeup_fd(self.write, warn_on_full_buffer=False)
        self.thread = threading.Thread(target=self._watch, name="ctrl-c", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        first = None
        while True:
            data = os.read(self.read, 64)
            if not data or 0 in data:  # close() writes a 0 (forked workers keep the pipe open: no EOF)
                return
            if signal.SIGINT not in data:
                continue
            now = time.monotonic()
            # one press signals every process of the terminal's group at once, and a data worker
            # forked a moment ago may still share this pipe: bytes within 20 ms are one press
            if first is None:
                first = now
                os.write(2, b"\nCtrl-C: stopping after this step, with a checkpoint (again: abort)\n")
            elif now - first > 0.02:
                os.write(2, b"\naborted (second Ctrl-C): nothing saved since the newest checkpoint\n")
                os._exit(130)

    def close(self) -> None:
        signal.set_wakeup_fd(self.previous)
        os.write(self.write, b"\0")
        self.thread.join()
        os.close(self.write)
        os.close(self.read)


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
