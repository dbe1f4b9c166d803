"""Small named collectives with their backward passes, for context and tensor parallelism.

Each is an autograd Function whose backward is the matching collective, plus a one-rank bypass (a
group of one is the identity, so single-process code paths stay free of communication). Each is
tested against a single-process reference in ``tests/parallel/test_collectives.py``.

Convention for sequence (context) parallelism: activations are split by plain slicing, whose backward
pads the gradient with zeros. Each rank's parameter gradients are therefore *partial* (its own tokens'
contribution), and the data-parallel reduction, which includes the cp ranks, sums them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def local_chunk(x: Tensor, dim: int, group: dist.ProcessGroup | None) -> Tensor:
    """This rank's contiguous chunk of ``x`` along ``dim`` (autograd: zero-padded gradient)."""
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"cannot split size {x.shape[dim]} (dim {dim}) evenly over {n} ranks")
    return x.chunk(n, dim=dim)[group_rank(group)]


def _all_gather(x: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class _GatherSlice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Everything after the gather is computed identically on every rank, so the full gradient is
        # already here: keep this rank's part (a reduce-scatter would count it ``world`` times).
        n, r = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(n, dim=ctx.dim)[r].contiguous(), None, None


def gather_replicated(x: Tensor, dim: int, group: dist.ProcessGroup | None) -> Tensor:
    """All-gather chunks along ``dim`` (rank order) for computation that is then replicated on every
    rank of ``group`` (the loss after context parallelism). Backward: this rank's slice of the gradient."""
    if group_size(group) == 1:
        return x
    return _GatherSlice.apply(x, dim, group)


class _SplitGatherGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
        ctx.dim, ctx.group = dim, group
        n, r = dist.get_world_size(group), dist.get_rank(group)
        return x.chunk(n, dim=dim)[r].contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_gather(grad, ctx.dim, ctx.group), None, None


def split_full_grad(x: Tensor, dim: int, group: dist.ProcessGroup | None) -> Tensor:
    """This rank's chunk of a tensor that every rank of ``group`` holds whole; backward all-gathers,
    so what produced ``x`` gets the whole gradient on every rank (Megatron's scatter to the
    sequence-parallel region)."""
    if group_size(group) == 1:
        return x
    if x.shape[dim] % group_size(group):
        raise ValueError(
            f"cannot split size {x.shape[dim]} (dim {dim}) evenly over {group_size(group)} ranks"
        )
    return _SplitGatherGrad.apply(x, dim, group)


class _SumGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_grad(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Identity forward; backward sums the gradient over ``group``. For a tensor every rank holds whole
    but uses only on its own tokens (modulation vectors under sequence parallelism), so each rank's
    gradient is partial (Megatron's copy to the tensor-parallel region)."""
    if group_size(group) == 1:
        return x
    return _SumGrad.apply(x, group)


def _all_to_all(x: Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup) -> Tensor:
    n = dist.get_world_size(group)
    inputs = [c.contiguous() for c in x.chunk(n, dim=scatter_dim)]
    outputs = [torch.empty_like(c) for c in inputs]
    dist.all_to_all(outputs, inputs, group=group)
    return torch.cat(outputs, dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup) -> Tensor:
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, gather_dim, scatter_dim, ctx.group), None, None, None


def all_to_all(x: Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup | None) -> Tensor:
    """Split ``x`` along ``scatter_dim`` over the ranks and concatenate what arrives along ``gather_dim``
    (Ulysses: B×N/P×H×Dh → B×N×H/P×Dh with scatter 2, gather 1). Backward: the inverse all-to-all."""
    if group_size(group) == 1:
        return x
    n = dist.get_world_size(group)
    if x.shape[scatter_dim] % n:
        raise ValueError(f"all_to_all: size {x.shape[scatter_dim]} (dim {scatter_dim}) not divisible by {n}")
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)


def ring_shift(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Pass ``x`` one step around the ring (to rank+1, from rank-1). Not differentiable: ring
    attention moves K/V (and, backward, their gradients) explicitly."""
    n, r = dist.get_world_size(group), dist.get_rank(group)
    to, frm = (r + 1) % n, (r - 1) % n
    out = torch.empty_like(x)
    ops = [
        dist.P2POp(dist.isend, x.contiguous(), dist.get_global_rank(group, to), group),
        dist.P2POp(dist.irecv, out, dist.get_global_rank(group, frm), group),
    ]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out
