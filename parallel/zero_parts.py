"""This rank's part of a parameter under DeepSpeed ZeRO and megatron-core tensor parallelism, and back.

ZeRO-3 keeps a flat slice of each parameter on each data-parallel rank (``p.ds_tensor``: chunk r of
the flattened tensor, the last chunk padded); megatron TP slices along ``p.partition_dim``. ZeRO-1/2
keep the (tp-sliced) parameter whole on every data-parallel rank. Per-parameter state that follows
the weights (the EMA) lives on these parts; checkpoints hold whole tensors, and :func:`whole` and
:func:`part_of` are exact inverses, so a save/load round trip changes no bit.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from parallel.collectives import group_rank, group_size
from parallel.megatron_tp import full_tensor, is_tp_sharded


def zero3_partitioned(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_tensor")


def local_part(p: nn.Parameter) -> Tensor:
    """What this rank holds of ``p``: its ZeRO-3 partition (flat), else the parameter itself."""
    return p.ds_tensor if zero3_partitioned(p) else p


def whole(part: Tensor, p: nn.Parameter, dp_group, tp_group) -> Tensor:
    """The whole tensor of which ``part`` (shaped like :func:`local_part` of ``p``) is this rank's part.

    Collective over ``dp_group`` (ZeRO-3) and ``tp_group`` (sliced parameters): every rank calls it
    for the same parameters in the same order.
    """
    if zero3_partitioned(p):
        parts = [torch.empty_like(part) for _ in range(group_size(dp_group))]
        dist.all_gather(parts, part.detach().contiguous(), group=dp_group)
        # the tp slice this rank's parameter is, before the tp gather
        part = torch.cat(parts)[: p.ds_numel].view(p.ds_shape)
    return full_tensor(part, tp_group, like=p)


def part_of(full: Tensor, p: nn.Parameter, dp_group, tp_group) -> Tensor:
    """This rank's part of the whole tensor ``full`` of ``p`` (no communication)."""
    if is_tp_sharded(p):
        full = full.chunk(group_size(tp_group), dim=p.partition_dim)[group_rank(tp_group)]
    if not zero3_partitioned(p):
        return full
    n, r = p.ds_tensor.numel(), group_rank(dp_group)
    flat = full.reshape(-1)[r * n : (r + 1) * n]
    out = torch.zeros(n, dtype=full.dtype, device=full.device)  # the padding of the last partition
    out[: flat.numel()] = flat
    return out


__all__ = ["zero3_partitioned", "local_part", "whole", "part_of"]
