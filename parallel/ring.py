"""Ring attention: queries stay, key/value blocks travel around the ring of context-parallel ranks.

Each step attends the local queries to one K/V block and merges the partial results by their
log-sum-exp; the backward pass recomputes each block with the *merged* output and LSE (the
FlashAttention backward identity) and sends the K/V gradients around the ring back to their owner.
Memory per rank is one K/V block plus the fp32 output and LSE, whatever the ring size.

Block kernels (B×H×N×Dh layout): on CPU, torch's fused flash kernel, which returns the LSE and has a
backward that accepts an external output/LSE; elsewhere an unfused fp32 kernel. torch's own ring
attention (``torch.distributed.tensor.experimental.context_parallel``) has no CPU backward, so it can
not be trained or tested here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from parallel.collectives import group_size, ring_shift


def _block_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Attention of q to one K/V block: (output B×H×Nq×Dh fp32, LSE B×H×Nq fp32)."""
    if q.device.type == "cpu":
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        out, lse = flash(q, k, v, 0.0, False, scale=scale)
        return out.float(), lse.float()
    s = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    lse = s.logsumexp(dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", (s - lse[..., None]).exp(), v.float()), lse


def _block_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one block given the merged output and LSE (so the block's softmax is the global one)."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, False, scale=scale
        )
    qf, kf, vf, do = q.float(), k.float(), v.float(), dout.float()
    p = (torch.einsum("bhqd,bhkd->bhqk", qf, kf) * scale - lse[..., None]).exp()  # B, H, Nq, Nk
    dv = torch.einsum("bhqk,bhqd->bhkd", p, do)
    dp = torch.einsum("bhqd,bhkd->bhqk", do, vf)
    delta = (do * out.float()).sum(-1, keepdim=True)  # B, H, Nq, 1
    ds = p * (dp - delta) * scale
    dq = torch.einsum("bhqk,bhkd->bhqd", ds, kf)
    dk = torch.einsum("bhqk,bhqd->bhkd", ds, qf)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup) -> Tensor:
        scale = q.shape[-1] ** -0.5
        out = lse = None
        kv = (k, v)
        for step in range(group_size(group)):
            # received before this block is computed: no overlap of communication and compute yet
            nxt = tuple(ring_shift(t, group) for t in kv) if step < group_size(group) - 1 else None
            o_i, lse_i = _block_fwd(q, kv[0], kv[1], scale)
            if out is None:
                out, lse = o_i, lse_i
            else:
                new = torch.logaddexp(lse, lse_i)
                out = out * (lse - new).exp()[..., None] + o_i * (lse_i - new).exp()[..., None]
                lse = new
            kv = nxt
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale = group, scale
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        group, n = ctx.group, group_size(ctx.group)
        dout = dout.contiguous()
        dq = torch.zeros_like(q, dtype=torch.float32)
        kv = (k, v)
        dkv = (torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32))
        for step in range(n):
            dq_i, dk_i, dv_i = _block_bwd(dout, q, kv[0], kv[1], out, lse, ctx.scale)
            dq += dq_i
            # a block's gradient travels with it; after n shifts it is back at its owner, complete
            dkv = (ring_shift(dkv[0] + dk_i, group), ring_shift(dkv[1] + dv_i, group))
            if step < n - 1:
                kv = tuple(ring_shift(t, group) for t in kv)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Softmax attention of local queries over the keys of every rank in ``group``.

    Args:
        q, k, v: this rank's B×N/P×H×Dh chunks (no key mask: self-attention only).

    Returns:
        B×N/P×H×Dh, equal to the matching rows of full attention over the concatenated keys.
    """
    qt, kt, vt = (z.transpose(1, 2).contiguous() for z in (q, k, v))  # B, H, N/P, Dh
    if group_size(group) == 1:
        out, _ = _block_fwd(qt, kt, vt, q.shape[-1] ** -0.5)
        return out.to(q.dtype).transpose(1, 2)
    return _RingAttention.apply(qt, kt, vt, group).transpose(1, 2)  # B, N/P, H, Dh
