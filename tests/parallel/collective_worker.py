"""Each collective and distributed attention against the same computation in one process.

Every rank builds the full inputs from one seed, computes the single-process reference itself, runs
the distributed version on its own chunk, and reports the worst error over all ranks. Yes/no checks
report 0 (holds) or 1 (fails) the same way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dit.attention import AttentionCore, attention
from parallel.collectives import (
    all_to_all,
    gather_replicated,
    local_chunk,
    split_full_grad,
    sum_grad,
    sum_partials,
)
from parallel.context import RingAttention, UlyssesAttention
from tests.parallel.group import serve
from tests.parallel.op_recorder import OpRecorder


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _attention_check(core_fn, group) -> float:
    """Forward and q/k/v gradients of a distributed core against full SDPA."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 16, 4, 8, generator=g, requires_grad=True) for _ in range(3))
    w = torch.randn(2, 16, 4, 8, generator=g)
    ref = attention(q, k, v)
    (ref * w).sum().backward()
    parts = [local_chunk(t.detach(), 1, group).requires_grad_() for t in (q, k, v)]
    out = core_fn(*parts)
    (out * local_chunk(w, 1, group)).sum().backward()
    errs = [_err(out, local_chunk(ref.detach(), 1, group))]
    errs += [_err(p.grad, local_chunk(t.grad, 1, group)) for p, t in zip(parts, (q, k, v), strict=True)]
    return max(errs)


def _ring_autocast(group) -> dict[str, float]:
    """Ring attention under CPU autocast (bf16, standing in for CUDA's) and single-device SDPA under
    the same autocast, each against fp32 full attention (output and q/k/v gradients); the ring's
    output bf16, its merge and gradient sums fp32, no B×H×Nq×Nk tensor."""
    n, per = dist.get_world_size(group), 32  # tokens per rank; head dim 8, so scores would be 4x out
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, per * n, 4, 8, generator=g, requires_grad=True) for _ in range(3))
    w = torch.randn(2, per * n, 4, 8, generator=g)
    ref = attention(q, k, v)
    want = [ref.detach(), *torch.autograd.grad((ref * w).sum(), (q, k, v))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sdpa = attention(q, k, v)
    sdpa_errs = [
        _err(a.float(), b)
        for a, b in zip(
            [sdpa.detach(), *torch.autograd.grad(sdpa, (q, k, v), w.to(sdpa.dtype))], want, strict=True
        )
    ]
    parts = [local_chunk(t.detach(), 1, group).requires_grad_() for t in (q, k, v)]
    with OpRecorder() as rec:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = RingAttention(group)(*parts)
        grads = torch.autograd.grad(out, parts, local_chunk(w, 1, group).to(out.dtype))
    got = [out.detach().float(), *grads]
    return {
        "ring_autocast": max(_err(a, local_chunk(b, 1, group)) for a, b in zip(got, want, strict=True)),
        "sdpa_autocast": max(sdpa_errs),
        "ring_autocast_bf16_out": float(out.dtype != torch.bfloat16),
        "ring_autocast_fp32_sums": float(rec.accumulator_dtypes() != {torch.float32}),
        "ring_autocast_no_scores": float(rec.largest() >= 2 * 4 * per * per),
    }


def _compiled(group) -> dict[str, float]:
    """``torch.compile(fullgraph=True)`` (raises at any graph break) of Ulysses attention followed by
    the other named collectives, forward and backward, against eager. aot_eager: dynamo and AOT
    autograd, the parts a graph break comes from, without inductor's C++ build."""
    core = UlyssesAttention(AttentionCore("sdpa"), group)

    def f(q, k, v):
        out = core(q, k, v)  # B, N/P, H, Dh
        return sum_grad(split_full_grad(gather_replicated(out, 1, group), 1, group), group)

    g = torch.Generator().manual_seed(3)
    inputs = [torch.randn(2, 8, 4, 8, generator=g) for _ in range(3)]
    w = torch.randn(2, 8, 4, 8, generator=g)
    results = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        xs = [x.clone().requires_grad_() for x in inputs]
        out = fn(*xs)
        results.append([out.detach(), *torch.autograd.grad((out * w).sum(), xs)])
    return {"compiled_fullgraph": max(_err(c, e) for e, c in zip(*results, strict=True))}


def _rms_across_ranks(group) -> float:
    """An RMSNorm over all heads of a token with the heads split over the ranks (the across-heads qk norm
    under tensor parallelism): each rank's sum of squares over its heads, :func:`sum_partials`, its own
    heads normalised. Forward and input gradient against the whole norm in one process."""
    n, r = dist.get_world_size(group), dist.get_rank(group)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 5, 2 * n, 3, generator=g, requires_grad=True)  # B, N, H, Dh
    w = torch.randn(2, 5, 2 * n, 3, generator=g)
    ref = q * torch.rsqrt(q.pow(2).flatten(2).mean(-1)[..., None, None] + 1e-6)
    (ref * w).sum().backward()
    mine = q.detach().chunk(n, 2)[r].requires_grad_()  # B, N, H/n, Dh: this rank's heads
    total = sum_partials(mine.pow(2).sum((2, 3)), group)  # B, N: over every head
    got = mine * torch.rsqrt(total / q[0, 0].numel() + 1e-6)[..., None, None]
    (got * w.chunk(n, 2)[r]).sum().backward()
    return max(_err(got, ref.detach().chunk(n, 2)[r]), _err(mine.grad, q.grad.chunk(n, 2)[r]))


def checks(group) -> dict[str, float]:
    n, r = dist.get_world_size(group), dist.get_rank(group)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4 * n, 6, generator=g, requires_grad=True)
    w = torch.randn(2, 4 * n, 6, generator=g)
    out = {}

    # gather_replicated: forward = the full tensor; backward = this rank's slice of the gradient
    mine = x.detach().chunk(n, 1)[r].requires_grad_()
    full = gather_replicated(mine, 1, group)
    (full * w).sum().backward()
    out["gather_forward"] = _err(full, x.detach())
    out["gather_backward"] = _err(mine.grad, w.chunk(n, 1)[r])

    # split_full_grad: forward = this rank's chunk; backward = the whole gradient on every rank
    y = x.detach().clone().requires_grad_()
    (split_full_grad(y, 1, group) * w.chunk(n, 1)[r] * (r + 1)).sum().backward()
    out["split_forward"] = _err(split_full_grad(x.detach(), 1, group), x.detach().chunk(n, 1)[r])
    out["split_backward"] = _err(y.grad, torch.cat([c * (i + 1) for i, c in enumerate(w.chunk(n, 1))], 1))

    # sum_grad: identity forward; backward = the sum of every rank's gradient
    y = x.detach().clone().requires_grad_()
    (sum_grad(y, group) * w * (r + 1)).sum().backward()
    out["sum_grad"] = _err(y.grad, w * sum(range(1, n + 1)))

    # sum_partials: forward = the sum of every rank's part; backward = the sum of every rank's gradient
    y = x.detach().chunk(n, 1)[r].clone().requires_grad_()
    total = sum_partials(y, group)
    (total * w.chunk(n, 1)[0] * (r + 1)).sum().backward()
    out["sum_partials_forward"] = _err(total, sum(x.detach().chunk(n, 1)))
    out["sum_partials_backward"] = _err(y.grad, w.chunk(n, 1)[0] * sum(range(1, n + 1)))
    out["rms_across_ranks"] = _rms_across_ranks(group)

    # all_to_all sequence→heads: rank r gets every token of heads r·H/n … ; backward inverts it
    h = torch.randn(2, 4 * n, 2 * n, 3, generator=g, requires_grad=True)  # B, N, H, Dh
    wh = torch.randn(2, 4 * n, 2 * n, 3, generator=g)
    mine = h.detach().chunk(n, 1)[r].requires_grad_()
    swapped = all_to_all(mine, 2, 1, group)
    out["all_to_all_forward"] = _err(swapped, h.detach().chunk(n, 2)[r])
    (swapped * wh.chunk(n, 2)[r]).sum().backward()
    out["all_to_all_backward"] = _err(mine.grad, wh.chunk(n, 1)[r])

    out["ulysses"] = _attention_check(UlyssesAttention(AttentionCore("sdpa"), group), group)
    out["ring"] = _attention_check(RingAttention(group), group)
    out.update(_ring_autocast(group))
    if n == 2:  # one world size is enough for the graph, and compiling costs seconds
        out.update(_compiled(group))
    return out


def worst_over_ranks() -> dict[str, float]:
    errs = checks(dist.group.WORLD)
    worst = torch.tensor(list(errs.values()))
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return dict(zip(errs, worst.tolist(), strict=True))


def worker(rank: int, world: int, port: int, cases: list, out_dir: str) -> None:
    serve(rank, world, port, cases, out_dir, lambda c: worst_over_ranks(), name=lambda c: f"world{world}")
