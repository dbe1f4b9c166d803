"""Small named collectives with their backward passes, for context and tensor parallelism.

Each is an autograd Function whose backward is the matching collective, plus a one-rank bypass (a
group of one is the identity, so single-process code paths stay free of communication). Each is
tested against a single-process reference in ``tests/parallel/test_collectives.py``.

They communicate through torch's functional collectives (``torch.distributed._functional_collectives``:
ops that return a new tensor instead of filling one in place), which dynamo traces: a
``torch.compile``d block that calls them stays one graph (tested with ``fullgraph=True``). The
all-to-all needs no Function of its own: the functional ``all_to_all_single`` has its backward (the
all-to-all with the split sizes swapped) registered. :func:`ring_shift` stays point-to-point (ring
attention runs outside the compiled graph, see :mod:`parallel.ring`).

Convention for sequence (context) parallelism: activations are split by plain slicing, whose backward
pads the gradient with zeros. Each rank's parameter gradients are therefore *partial* (its own tokens'
contribution), and the data-parallel reduction, which includes the cp ranks, sums them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
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


def _waited(t: Tensor) -> Tensor:
    # eager functional collectives return a tensor that waits on first use; a plain one leaves the Function
    return t.wait() if isinstance(t, funcol.AsyncCollectiveTensor) else t


def _all_gather(x: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
    return _waited(funcol.all_gather_single(x.contiguous(), dim, group))  # chunks in rank order along dim


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
        return _waited(funcol.all_reduce(grad.contiguous(), "sum", ctx.group)), None


def sum_grad(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Identity forward; backward sums the gradient over ``group``. For a tensor every rank holds whole
    but uses only on its own tokens (modulation vectors under sequence parallelism), so each rank's
    gradient is partial (Megatron's copy to the tensor-parallel region)."""
    if group_size(group) == 1:
        return x
    return _SumGrad.apply(x, group)


class _SumPartials(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return _waited(funcol.all_reduce(x.contiguous(), "sum", group))

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Each rank uses the sum on its own slice of the features (its heads), so each rank's gradient
        # of the sum is partial too; every rank's part gets the whole gradient: the sum of them all.
        # (Megatron's reduce-from-tp-region passes the gradient through unchanged: right only when
        # what follows the sum is computed identically on every rank.)
        return _waited(funcol.all_reduce(grad.contiguous(), "sum", ctx.group)), None


def sum_partials(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """All-reduce (sum) of a per-rank partial statistic that each rank then uses on its own part of the
    features, e.g. the sum of squares of a token's q over this rank's heads for an RMSNorm across all
    heads (Wan, LTX) under tensor parallelism. Backward: the all-reduce (sum) of the gradient, since
    each rank's gradient of the sum covers only its own heads."""
    if group_size(group) == 1:
        return x
    return _SumPartials.apply(x, group)


def all_to_all(x: Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup | None) -> Tensor:
    """Split ``x`` along ``scatter_dim`` over the ranks and concatenate what arrives along ``gather_dim``
    (Ulysses: B×N/P×H×Dh → B×N×H/P×Dh with scatter 2, gather 1). Backward: the inverse all-to-all.

    One functional ``all_to_all_single`` (a traceable op with its own backward, the all-to-all with the
    split sizes swapped), so ``torch.compile`` keeps a block that calls it in one graph.
    """
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[scatter_dim] % n:
        raise ValueError(f"all_to_all: size {x.shape[scatter_dim]} (dim {scatter_dim}) not divisible by {n}")
    scatter_dim, gather_dim = scatter_dim % x.ndim, gather_dim % x.ndim
    send = x.movedim(scatter_dim, 0).contiguous()  # S, <other dims>: rows i·S/n… go to rank i
    recv = funcol.all_to_all_single_autograd(send, None, None, group)  # rows j·S/n… came from rank j
    recv = recv.reshape(n, send.shape[0] // n, *send.shape[1:])  # n, S/n, <other dims>
    recv = recv.movedim(1, scatter_dim + 1).movedim(0, gather_dim)  # x's dims, n just before gather_dim
    shape = list(x.shape)
    shape[scatter_dim] //= n
    shape[gather_dim] *= n
    return recv.reshape(shape)  # the n received chunks concatenated along gather_dim, rank order


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
