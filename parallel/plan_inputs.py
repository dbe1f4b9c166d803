"""The planner's inputs: the GPUs it knows (memory, peak, bandwidths), the efficiencies its roofline
assumes, the layout of a job and its checkpointing mode (see :mod:`parallel.plan`)."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from parallel.config import checkpoint_every, is_selective

GIB = 2**30


@dataclass(frozen=True)
class GPU:
    """A GPU type. Bandwidths are GB/s (10⁹ bytes) per GPU and direction; HBM in TB/s."""

    name: str
    memory_gib: float
    """Device memory as the driver reports it (GiB)."""
    bf16_tflops: float
    """Dense bf16 tensor-core peak (no sparsity)."""
    hbm_tbps: float
    intra_node_gbps: float
    """NVLink, per GPU per direction."""
    inter_node_gbps: float
    """InfiniBand/RoCE per GPU (one NIC per GPU, as DGX/HGX nodes)."""


GPUS: dict[str, GPU] = {
    "h100": GPU("H100 SXM 80GB", 79.6, 989.0, 3.35, 450.0, 50.0),  # NDR 400 Gb/s per GPU
    "h200": GPU("H200 SXM 141GB", 140.4, 989.0, 4.8, 450.0, 50.0),
    "a100": GPU("A100 SXM 80GB", 80.0, 312.0, 2.04, 300.0, 25.0),  # HDR 200 Gb/s per GPU
    "b200": GPU("B200 HGX 180GB", 179.1, 2250.0, 8.0, 900.0, 50.0),
}

MATMUL_EFF = {"h100": 0.70, "h200": 0.70, "a100": 0.80, "b200": 0.70}
# (forward, backward) fraction of the peak for attention, by GPU and attention_backend
ATTENTION_EFF = {
    gpu: {"sdpa": sdpa, "flash_attn": fa3}
    for gpu, sdpa, fa3 in [
        ("a100", (0.65, 0.50), (0.70, 0.55)),
        ("h100", (0.45, 0.35), (0.70, 0.50)),
        ("h200", (0.45, 0.35), (0.70, 0.50)),
        ("b200", (0.50, 0.40), (0.50, 0.40)),
    ]
}
HBM_EFF = 0.7  # unfused eager element-wise kernels
LINK_EFF = 0.8  # NCCL bus bandwidth over the link's
OVERHEAD_GIB = 2.5  # CUDA context, NCCL buffers, cuBLAS workspaces: outside the tensor terms
FRAGMENTATION = 0.08  # fraction of the device the caching allocator may lose to fragmentation
DS_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements)


def elementwise_bytes(d: int, f: int, swiglu: bool) -> int:
    """HBM bytes read + written per token by the element-wise ops of one block's forward, counted op by
    op: fp32 LayerNorms and modulate/gated-residual arithmetic, casts, fp32 qk-norm and RoPE (≈ 90 D of
    the 250 D), the MLP activation."""
    return 250 * d + (12 if swiglu else 4) * f


@dataclass(frozen=True)
class Layout:
    """Degrees of a layout; their product is the GPU count (mesh order as :mod:`parallel.dims`)."""

    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp

    @classmethod
    def parse(cls, text: str) -> Layout:
        """``"dp_shard=8,cp=8[,tp=2,dp_replicate=2]"``; degrees not named are 1."""
        names = {f for f in cls.__dataclass_fields__}
        values: dict[str, int] = {}
        for part in (p.strip() for p in text.split(",")):
            m = re.fullmatch(r"(\w+)=(\d+)", part)
            if not m:
                raise ValueError(f"layout part {part!r}: expected name=int with name in {sorted(names)}")
            name, value = m.group(1), int(m.group(2))
            if name not in names:
                raise ValueError(f"layout part {part!r}: unknown degree {name!r}; expected {sorted(names)}")
            if name in values:
                raise ValueError(f"layout part {part!r}: {name} given twice")
            if value < 1:
                raise ValueError(f"layout part {part!r}: {name} must be ≥ 1")
            values[name] = value
        return cls(**values)

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in asdict(self).items())


def checkpoint_blocks(ac: str, depth: int) -> tuple[str, int]:
    """(kind, number of checkpointed blocks) for an ``ac`` mode; kind is ``none|input|selective``.
    The modes are the trainer's (:func:`parallel.config.checkpoint_every`)."""
    every = checkpoint_every(ac, field="ac")
    if every == 0:
        return "none", 0
    return ("selective" if is_selective(ac) else "input"), math.ceil(depth / every)  # blocks 0, K, 2K, …
