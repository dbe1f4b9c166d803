"""The across-heads qk RMSNorm (``model.arch.qk_norm=across_heads``, Wan and LTX-Video) under tensor
parallelism, for both translations of :mod:`parallel.tp_plan`.

A rank holds the q/k output features of its own heads, so it holds the matching rows of the norm's
(D,) weight (head-major, the same cut as the projection's output channels) and computes each token's
sum of squares over its heads only. :class:`TPSumSquares` replaces the norm's parameter-free
``sum_squares`` hook (:class:`dit.layers.SumSquares`) by that partial sum all-reduced over the tp group
(:func:`parallel.collectives.sum_partials`); the norm divides by the whole width D, which it keeps.
The model's own ``forward`` runs unchanged on the rank's heads.

The weight's gradient needs no collective: each of its elements scales one feature of one rank.
The gradient of the sum of squares does: each rank uses the sum on its own heads, so each rank's
gradient of it is partial, and :func:`~parallel.collectives.sum_partials` sums it in backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate

from dit.layers import SumSquares
from parallel.collectives import sum_partials


class _ReplicatePartialGrad(torch.autograd.Function):
    """A tensor every rank holds whole, as a ``Replicate`` DTensor, whose backward hands on this rank's
    *share* of the gradient unsummed: :func:`~parallel.collectives.sum_partials`'s backward sums it
    (DTensor's own ``from_local`` would sum it too, and the gradient would be counted ``tp`` times)."""

    @staticmethod
    def forward(ctx, x: Tensor, mesh: DeviceMesh) -> DTensor:
        return DTensor.from_local(x, mesh, [Replicate()], run_check=False)

    @staticmethod
    def backward(ctx, grad: DTensor):
        # The statistic scales only this rank's heads (x · rstd with x sharded on the head axis), so
        # what arrives is this rank's share: eager DTensor labels it Partial; a compiled block's
        # backward labels it as the forward output was (Replicate, AOTAutograd's guess at the tangent)
        # with the same values (measured: per-block torch.compile equals eager). The local values are
        # the share either way; redistributing by the label would all-reduce it a second time.
        return grad.to_local(), None


class TPSumSquares(SumSquares):
    """Each token's sum of squares over the heads of every tp rank: this rank's (:class:`SumSquares`)
    all-reduced over ``tp_group``.

    Args:
        tp_group: the tensor-parallel process group.
        mesh: the 1-D tp mesh when the norm runs on DTensors (:mod:`parallel.tensor`): the input is then
            a DTensor sharded on the head axis and the result a ``Replicate`` one; None for plain
            tensors (:mod:`parallel.megatron_tp`).
    """

    def __init__(self, tp_group: dist.ProcessGroup, mesh: DeviceMesh | None = None):
        super().__init__()
        self.tp_group, self.mesh = tp_group, mesh

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, DTensor):  # B, N, H, Dh sharded on H: this rank's heads
            partial = super().forward(x.to_local(grad_placements=x.placements))  # B, N, 1, 1
            return _ReplicatePartialGrad.apply(sum_partials(partial, self.tp_group), self.mesh)
        return sum_partials(super().forward(x), self.tp_group)

    def extra_repr(self) -> str:
        return f"tp={dist.get_world_size(self.tp_group)}"
