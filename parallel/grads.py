"""Gradient-norm clipping over parameters that live on different meshes.

:mod:`parallel.tensor` puts every parameter on the tp mesh (sharded or replicated), so under FSDP they
share the (dp, tp) mesh; but a list may still mix meshes or DTensors and plain tensors (a model
parallelized another way, DeepSpeed's plain parameters), and ``torch.nn.utils.clip_grad_norm_``
stacks the per-tensor norms and cannot mix them. Norms are summed per mesh here and combined as
floats. A replicated DTensor's norm is taken once (torch reduces only sharded placements).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor


def grad_norm(params: list[Tensor]) -> float:
    """Global L2 norm of the gradients of ``params`` (sharded ones counted once)."""
    groups: dict = defaultdict(list)
    for p in params:
        if p.grad is not None:
            groups[p.grad.device_mesh if isinstance(p.grad, DTensor) else None].append(p.grad)
    total = 0.0
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads)  # one mesh: torch's (sharded-aware) reduction
        total += float(norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2
    return math.sqrt(total)


def clip_grad_norm(params: list[Tensor], max_norm: float) -> float:
    """Scale gradients so their global norm is at most ``max_norm`` (inf: measure only); returns the
    norm before clipping (non-finite if any gradient is)."""
    norm = grad_norm(params)
    if math.isfinite(norm) and norm > max_norm:
        factor = max_norm / (norm + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(factor)
    return norm
