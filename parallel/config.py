"""The ``parallel.*`` section of a job config (owned here so parallel/ does not import launch/)."""

from __future__ import annotations

import datetime
import math
import re
from dataclasses import dataclass
from typing import ClassVar


def check_choice(value, choices: tuple, key: str) -> None:
    """A ValueError naming ``key`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{key}={value!r}: expected one of {', '.join(map(str, choices))}")


def check_range(
    value, key: str, low: float = -math.inf, high: float = math.inf, *, open_low=False, open_high=False
) -> None:
    """A ValueError naming ``key`` unless ``low <= value <= high`` (an open end excludes itself; NaN
    is never in range)."""
    if (
        value != value
        or value < low
        or (open_low and value == low)
        or value > high
        or (open_high and value == high)
    ):
        want = f"{'>' if open_low else '>='} {low}"
        if high != math.inf:
            want += f" and {'<' if open_high else '<='} {high}"
        raise ValueError(f"{key}={value}: must be {want}")


@dataclass
class ParallelConfig:
    """How ranks split the work. The product ``dp_replicate · dp_shard · cp · tp`` is the world size."""

    ENGINES: ClassVar[tuple[str, ...]] = ("fsdp", "deepspeed")
    BACKENDS: ClassVar[tuple[str, ...]] = ("auto", "nccl", "gloo")
    ZERO_STAGES: ClassVar[tuple[int, ...]] = (1, 2, 3)

    dp_shard: int = -1
    """FSDP2 sharding degree (-1: whatever is left of the world size)."""
    dp_replicate: int = 1
    """Replicas of the sharded group (HSDP: gradients all-reduced across replicas, sharded within)."""
    tp: int = 1
    """Tensor-parallel degree (heads and MLP width are split; keep it within a node)."""
    sequence_parallel: bool = True
    """With tp > 1, also cut the residual stream along the sequence over the tp ranks between
    sub-layers (Megatron-SP: all-gather before attention/MLP, reduce-scatter after): the same
    communication volume as plain TP's all-reduce, 1/tp of the norm/modulation activations.
    ``engine=fsdp`` only: megatron-core's version cannot cut B×N×D activations."""
    cp: int = 1
    """Context (sequence) parallel degree: each rank holds 1/cp of the tokens of every sample."""
    cp_ring: int = 0
    """How many of the cp ranks form a ring: 1 = pure Ulysses (all-to-all; cp must divide
    heads/tp), cp = pure ring attention, in between = Ulysses inside groups of cp/cp_ring ranks and a
    ring across them. 0 (auto): the largest Ulysses degree dividing both cp and num_heads/tp, a ring
    across the rest (cp=8 with 12 heads: Ulysses 4 × ring 2)."""
    activation_checkpointing: str = "none"
    """Recompute block activations in backward: ``none``, ``full`` (every block), ``every_K``
    (blocks 0, K, 2K, …: trades memory against the ~1/K of a forward it recomputes) or
    ``selective`` (every block, keeping the attention kernels' outputs and log-sum-exp: backward
    recomputes only the linears and element-wise work, not attention, the larger part of the FLOPs of
    long videos; saves a little less memory than ``full``)."""
    activation_offload: bool = False
    """Keep the activations saved for backward in host memory (pinned, copied asynchronously) instead of
    on the GPU (``torch.autograd.graph.save_on_cpu``): trades PCIe traffic for activation memory, e.g. a
    LoRA of a 14B base on a 24-48 GB GPU. Combines with ``activation_checkpointing`` (then only the
    checkpointed blocks' inputs are offloaded)."""
    compile: bool = False
    """``torch.compile`` each block (after checkpointing, before FSDP, as torchtitan); ``engine=fsdp``."""
    cpu_offload: bool = False
    """FSDP2: keep sharded parameters, gradients and optimizer states in host memory (CUDA);
    DeepSpeed: ZeRO-Offload of the optimizer state."""
    engine: str = "fsdp"
    """``fsdp`` (torch FSDP2 / DTensor) or ``deepspeed``."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage (1, 2 or 3) for ``engine=deepspeed``."""
    backend: str = "auto"
    """Process-group backend: ``auto`` (nccl on CUDA, gloo on CPU), ``nccl`` or ``gloo``. With
    ``cpu_offload`` on CUDA, a gloo backend for CPU tensors is added (``cuda:nccl,cpu:gloo``)."""
    timeout_minutes: float = 30.0
    """How long a collective may wait for the other ranks before the job fails (every process group:
    the default one and the mesh's). Generous by default: rank 0 builds the initial weights on CPU
    while the others wait in a broadcast (minutes for a 14B model), and checkpoints are written
    between collectives. torch's own default is 10 minutes for nccl."""

    def validate(self, key: str = "parallel") -> None:
        """A ValueError naming the first field (as ``key.field``) that cannot be right."""
        check_choice(self.engine, self.ENGINES, f"{key}.engine")
        check_choice(self.backend, self.BACKENDS, f"{key}.backend")
        check_choice(self.zero_stage, self.ZERO_STAGES, f"{key}.zero_stage")
        for name in ("dp_replicate", "tp", "cp"):
            check_range(getattr(self, name), f"{key}.{name}", 1)
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise ValueError(f"{key}.dp_shard={self.dp_shard}: must be -1 or at least 1")
        check_range(self.cp_ring, f"{key}.cp_ring", 0)  # 0: auto
        checkpoint_every(self.activation_checkpointing, f"{key}.activation_checkpointing")
        timeout(self.timeout_minutes, f"{key}.timeout_minutes")  # at load time, not once the job has nodes


def checkpoint_every(mode: str, field: str = "parallel.activation_checkpointing") -> int:
    """Which blocks are checkpointed: 0 for ``none``, 1 for ``full`` and ``selective`` (every block;
    what a selective one keeps is :func:`is_selective`'s business), K for ``every_K``; a clear error
    otherwise."""
    if mode == "none":
        return 0
    if mode in ("full", "selective"):
        return 1
    m = re.fullmatch(r"every_(\d+)", mode)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"{field}={mode!r}: expected 'none', 'full', 'selective' or 'every_K' (K ≥ 1)")
    return int(m.group(1))


def is_selective(mode: str) -> bool:
    """Whether checkpointed blocks keep their attention outputs (``selective``) instead of recomputing
    everything (``full``, ``every_K``)."""
    return mode == "selective"


def timeout(minutes: float, field: str = "parallel.timeout_minutes") -> datetime.timedelta:
    """The collective timeout; a ValueError naming ``field`` unless it is a finite number > 0."""
    if isinstance(minutes, bool) or not isinstance(minutes, int | float):
        raise ValueError(f"{field}={minutes!r}: expected a number of minutes")
    # a week at most: longer is a typo, and timedelta (and the C++ side) overflow long before inf
    if not (math.isfinite(minutes) and 0 < minutes <= 7 * 24 * 60):
        raise ValueError(f"{field}={minutes}: must be a number of minutes > 0 and at most a week (10080)")
    return datetime.timedelta(minutes=minutes)
