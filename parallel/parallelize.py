"""Apply parallelism to a plain single-device model from outside (DESIGN §4's fixed order).

Implemented so far: FSDP2 ``fully_shard`` per block and at the root (HSDP when ``dp_replicate`` > 1).
Tensor and context parallelism plug in before it, in that order.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from parallel.dims import ParallelDims


def parallelize(model: nn.Module, dims: ParallelDims, mesh: DeviceMesh | None, bf16: bool) -> nn.Module:
    """Shard ``model`` over the data-parallel mesh dims; a no-op with one process.

    Args:
        bf16: keep bf16 copies of the parameters for compute and reduce gradients in fp32 (CUDA).
    """
    if dims.tp > 1 or dims.cp > 1:
        raise NotImplementedError(
            f"parallel.tp={dims.tp}, parallel.cp={dims.cp}: tensor and context parallelism are not "
            "implemented yet; use data parallelism (parallel.dp_shard / dp_replicate)"
        )
    if mesh is None:
        return model
    dp_mesh = mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"]
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mesh": dp_mesh} | ({"mp_policy": mp} if mp else {})
    for block in model.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model
