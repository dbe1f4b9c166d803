"""Ring attention: queries stay, key/value blocks travel around the ring of context-parallel ranks.

Each step attends the local queries to one K/V block with a fused kernel that also returns the
block's log-sum-exp, and merges the partial results by their LSE; the backward pass runs each block's
fused backward with the *merged* output and LSE (the FlashAttention backward identity: with the global
LSE the block's softmax is the global one) and sends the K/V gradients around the ring back to their
owner. No B×H×Nq×Nk tensor is ever materialised: memory per rank is one K/V block plus the fp32
output and LSE, whatever the ring size.

Block kernels (B×H×N×Dh layout), chosen by :func:`choose_kernel`:

- CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ its backward).
- CUDA, bf16/fp16, head dim ≤ 256, Ampere or newer: FlashAttention-2
  (``aten._scaled_dot_product_flash_attention`` + ``_backward``), the kernel SDPA itself picks.
- CUDA otherwise (fp32 inputs, head dims over 256, Volta/Turing); a head dim off a multiple of 8
  is refused (neither kernel is built for it): the memory-efficient kernel
  (``aten._scaled_dot_product_efficient_attention(..., compute_log_sumexp=True)`` + ``_backward``).

Precision: under autocast q, k and v are cast to the autocast dtype before the kernels (the aten
kernels are not on autocast's lists, so nothing else would cast them, and flash refuses fp32); the
kernels accumulate in fp32 internally, the merged output and LSE and the ring's gradient accumulators
are fp32 with autocast disabled around that arithmetic (autocast would otherwise be free to run it in
bf16). Inputs of mixed dtypes without autocast are promoted to the widest.

What the CPU tests establish, and what only a GPU can: the ring, the merge and the backward identity
are checked for values on CPU (gloo, the CPU kernel, also under CPU autocast); the CUDA branches are
checked under ``FakeTensorMode`` with ``cuda`` tensors, which runs each aten op's schema and meta
function: argument lists, output shapes and dtypes, the padded LSE of the efficient kernel, and that
no op outputs a B×H×Nq×Nk tensor. That the CUDA kernels' *values* match (and that flash accepts this
external LSE, as torch's own ring attention relies on) only a GPU run confirms.

torch's own ring attention (``torch.distributed.tensor.experimental.context_parallel``) has no CPU
backward, so it can not be trained or tested here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from parallel.collectives import group_size, ring_shift

aten = torch.ops.aten

KERNELS = ("cpu_flash", "flash", "efficient")


def choose_kernel(
    device_type: str, dtype: torch.dtype, head_dim: int, capability: tuple[int, int] | None = None
) -> str:
    """The fused block kernel for queries of this device, dtype and head dim (one of :data:`KERNELS`).

    Args:
        device_type: ``cpu`` or ``cuda``.
        capability: the CUDA compute capability; None when unknown (taken as Ampere or newer).
    """
    if device_type == "cpu":
        return "cpu_flash"
    if device_type != "cuda":
        raise ValueError(f"ring attention has block kernels for cpu and cuda, not {device_type!r}")
    if head_dim % 8:
        # neither CUDA kernel is built for it (SDPA itself pads such heads; these ops do not)
        raise ValueError(
            f"ring attention on CUDA needs a head dim that is a multiple of 8, got {head_dim} "
            "(model.arch.hidden_size / num_heads): change the model, or use Ulysses alone "
            "(parallel.cp_ring=1, cp dividing num_heads/tp)"
        )
    flash = dtype in (torch.float16, torch.bfloat16) and head_dim <= 256
    if capability is not None and capability < (8, 0):
        flash = False  # FlashAttention-2 needs sm80+
    return "flash" if flash else "efficient"


def _kernel_for(q: Tensor) -> str:
    cap = None
    if q.device.type == "cuda" and torch.cuda.is_available():
        cap = torch.cuda.get_device_capability(q.device)
    return choose_kernel(q.device.type, q.dtype, q.shape[-1], cap)


def _block_fwd(kernel: str, q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor, tuple]:
    """Attention of q to one K/V block: output B×H×Nq×Dh (q's dtype), LSE B×H×Nq (fp32), and what
    the kernel's backward needs besides."""
    if kernel == "cpu_flash":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        return out, lse, ()
    if kernel == "flash":
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, False, False, scale=scale
        )
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)
    out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(
        q, k, v, None, True, 0.0, False, scale=scale
    )
    # CUDA pads the LSE rows to a multiple of 32 (B, H, ceil32(Nq)); its backward reads that layout
    return out, lse.narrow(-1, 0, q.shape[2]), (lse.shape[-1], seed, offset)


def _block_bwd(
    kernel: str,
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    aux: tuple,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one block given the merged output and LSE (so the block's softmax is the global one)."""
    if kernel == "cpu_flash":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, False, scale=scale
        )
    if kernel == "flash":
        cum_q, cum_k, max_q, max_k, seed, offset = aux  # no dropout: the seed and offset are not read
        return aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, False, seed, offset, scale=scale
        )
    width, seed, offset = aux
    lse = F.pad(lse, (0, width - lse.shape[-1]))  # B, H, ceil32(Nq): the padded rows are no queries
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, None, out, lse, seed, offset, 0.0, [True, True, True, False], False, scale=scale
    )
    return dq, dk, dv


def _merge(out: Tensor | None, lse: Tensor | None, o_i: Tensor, lse_i: Tensor) -> tuple[Tensor, Tensor]:
    """Fold one block's (output, LSE) into the running fp32 ones."""
    with torch.autocast(o_i.device.type, enabled=False):
        o_i, lse_i = o_i.float(), lse_i.float()
        if out is None:
            return o_i, lse_i
        new = torch.logaddexp(lse, lse_i)  # B, H, Nq
        out = out * (lse - new).exp().unsqueeze(-1) + o_i * (lse_i - new).exp().unsqueeze(-1)
        return out, new


def ring_forward(q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup) -> tuple[Tensor, Tensor, dict]:
    """The ring's forward on B×H×N/P×Dh blocks: (merged output in q's dtype, merged fp32 LSE B×H×N/P,
    what :func:`ring_backward` needs besides)."""
    state = {"scale": q.shape[-1] ** -0.5, "kernel": _kernel_for(q), "aux": None}
    n, out, lse, kv = group_size(group), None, None, (k, v)
    for step in range(n):
        # received before this block is computed: no overlap of communication and compute yet
        nxt = tuple(ring_shift(t, group) for t in kv) if step < n - 1 else None
        o_i, lse_i, aux = _block_fwd(state["kernel"], q, kv[0], kv[1], state["scale"])
        if step == 0:  # every block has the same shape: one set serves all
            state["aux"] = aux
        out, lse = _merge(out, lse, o_i, lse_i)
        kv = nxt
    return out.to(q.dtype), lse, state


def ring_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    group: dist.ProcessGroup,
    state: dict,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of q, k, v (their dtypes) from the merged ``out`` and ``lse`` of :func:`ring_forward`."""
    n, kernel, aux, scale = group_size(group), state["kernel"], state["aux"], state["scale"]
    dout = dout.to(q.dtype)
    if not dout.is_contiguous():  # the kernels want it dense (.to aliases a view of the same dtype)
        dout = dout.clone(memory_format=torch.contiguous_format)
    with torch.autocast(q.device.type, enabled=False):  # fp32 sums even if backward runs in autocast
        dq = torch.zeros_like(q, dtype=torch.float32)
        kv = (k, v)
        dkv = (torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32))
        for step in range(n):
            dq_i, dk_i, dv_i = _block_bwd(kernel, dout, q, kv[0], kv[1], out, lse, aux, scale)
            dq += dq_i
            # a block's gradient travels with it; after n shifts it is back at its owner, complete
            dkv = (ring_shift(dkv[0] + dk_i, group), ring_shift(dkv[1] + dv_i, group))
            if step < n - 1:
                kv = tuple(ring_shift(t, group) for t in kv)
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup) -> Tensor:
        out, lse, ctx.state = ring_forward(q, k, v, group)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group = group
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        return *ring_backward(dout, *ctx.saved_tensors, ctx.group, ctx.state), None


# One deliberate graph break under per-block torch.compile (dynamo can not trace the P2P shifts, and
# would otherwise break at each of them): the ring runs eagerly between the compiled halves of a block.
@torch.compiler.disable
def _ring(q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup) -> Tensor:
    return _RingAttention.apply(q, k, v, group)


def _kernel_inputs(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v in the dtype the kernels run in: autocast's when it is on (the aten kernels are not on
    its lists, and RMS-normed q/k may arrive in fp32 beside a bf16 v), else the widest of the three."""
    dev = q.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
    else:
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    return tuple(z.to(dtype).transpose(1, 2).contiguous() for z in (q, k, v))  # B, H, N/P, Dh


def ring_attention(q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Softmax attention of local queries over the keys of every rank in ``group``.

    Args:
        q, k, v: this rank's B×N/P×H×Dh chunks (no key mask: self-attention only).

    Returns:
        B×N/P×H×Dh in the kernels' dtype (autocast's when on), equal to the matching rows of full
        attention over the concatenated keys.
    """
    qt, kt, vt = _kernel_inputs(q, k, v)
    if group_size(group) == 1:  # the aten kernels are differentiable themselves
        out, _, _ = _block_fwd(_kernel_for(qt), qt, kt, vt, q.shape[-1] ** -0.5)
        return out.transpose(1, 2)
    return _ring(qt, kt, vt, group).transpose(1, 2)  # B, N/P, H, Dh
