"""Building blocks: modulation, MLPs, norms, and the self-/cross-attention modules.

Module and parameter names here are API: tensor-parallel plans and checkpoint converters key on
them (``attn.q``, ``attn.o``, ``mlp.fc1``, ``mlp.fc2``, ``modulation.linear`` …).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from dit.attention import AttentionCore
from dit.embeddings import Fp32Linear, apply_rope, autocast_on


class Grid(NamedTuple):
    """The patch grid of one sample: latent frames, height and width divided by the patch size.

    Tokens are laid out in ``(f h w)`` order, so a contiguous run of ``height · width`` tokens is one
    frame. A plain tuple: code that indexes ``grid[0]`` or takes ``math.prod(grid)`` keeps working.
    """

    frames: int
    height: int
    width: int

    def __str__(self) -> str:
        return f"{self.frames}×{self.height}×{self.width}"


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` run in: autocast's for x's device when it is on, else x's own."""
    return torch.get_autocast_dtype(x.device.type) if autocast_on(x) else x.dtype


def modulate(x: Tensor, shift: Tensor, scale: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """adaLN: ``x * (1 + scale) + shift``, broadcast per sample or per frame.

    Args:
        x: B×N×D tokens in (f h w) order.
        shift, scale: B×F×D with F = 1 (one timestep per sample) or F = frames (per-frame timesteps);
            viewing tokens as B×F×(N/F)×D applies each frame's vector without materialising B×N×D.
        dtype: of the result; default :func:`compute_dtype` of x. Under autocast the next linears
            would cast it anyway, once each: casting here once shares one bf16 copy between q, k and
            v (the one saved for backward) and halves the sequence-parallel all-gather.
    """
    # fp32 arithmetic whatever the autocast dtype (as Wan): the shift/scale are small corrections
    b, n, d = x.shape
    f = shift.shape[1]
    xf = x.float().view(b, f, n // f, d)  # B, F, N/F, D
    out = (xf * (1 + scale.float()[:, :, None]) + shift.float()[:, :, None]).view(b, n, d)
    return out.to(dtype if dtype is not None else compute_dtype(x))


def gated_residual(x: Tensor, y: Tensor, g: Tensor) -> Tensor:
    """The residual update ``x + y * g`` (g B×F×D broadcast per frame, as in :func:`modulate`).

    Computed in fp32 and returned in x's dtype: under mixed precision x is the fp32 residual stream
    and y a bf16 sub-layer output, added without rounding the update to bf16 first (Wan 2.1's
    ``x + y * e`` under ``autocast(float32)``); a model cast to one dtype keeps it.
    """
    b, n, d = y.shape
    f = g.shape[1]
    update = y.float().view(b, f, n // f, d) * g.float()[:, :, None]  # B, F, N/F, D
    return (x.float() + update.view(b, n, d)).to(x.dtype)


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the parameter dtype (Wan's ``WanLayerNorm``): an affine
    norm of the fp32 residual stream, whose weight FSDP hands over as a bf16 copy (CUDA autocast would
    upcast it; CPU's does not run layer_norm in fp32 and refuses the mix)."""

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


class AdaLNModulation(nn.Module):
    """adaLN-Zero (DiT): each block maps the conditioning vector c to its own ``n`` vectors (fp32)."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.linear = Fp32Linear(dim, n * dim)

    def forward(self, c: Tensor) -> tuple[Tensor, ...]:
        return self.linear(F.silu(c.float())).chunk(self.n, dim=-1)  # n × (B, F, D)


class TableModulation(nn.Module):
    """adaLN-single (PixArt-α, Wan): a learned per-block table added to one shared projection.

    Input is B×F×(k·D) with k = n (the shared projection) or k = 1 (c itself, broadcast to all n;
    the final layer's convention in Wan). The sum is fp32 (Wan's ``modulation + e`` under
    ``autocast(float32)``), whatever dtype FSDP gives the table.
    """

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.table = nn.Parameter(torch.empty(n, dim))

    def forward(self, e: Tensor) -> tuple[Tensor, ...]:
        out = e.float().unflatten(-1, (-1, self.table.shape[1])) + self.table.float()  # B, F, n, D
        return out.unbind(dim=-2)


class MLP(nn.Module):
    """GELU-tanh (``fc1 → gelu → fc2``) or SwiGLU (``silu(gate) * fc1 → fc2``)."""

    def __init__(self, dim: int, hidden: int, kind: str = "gelu_tanh"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.gate = nn.Linear(dim, hidden) if kind == "swiglu" else None
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)  # B, N, F
        h = F.silu(self.gate(x)) * h if self.gate is not None else F.gelu(h, approximate="tanh")
        return self.fc2(h)


class SumSquares(nn.Module):
    """Parameter-free reduction point of :class:`AcrossHeadsRMSNorm`: the hook tensor parallelism replaces.

    ``forward(x) -> Tensor``: x is B×N×H×Dh (fp32) over the heads this process holds; the result is the
    B×N×1×1 sum of squares over those H·Dh channels. Under tensor parallelism a rank holds H/tp heads,
    so a replacement returns the sum over *all* ranks' heads: ``parallel.collectives.sum_partials`` of
    this module's result over the tp group (one all-reduce of B×N floats; its backward all-reduces the
    gradient, since each rank's gradient of the sum covers only its own heads).
    """

    def forward(self, x: Tensor) -> Tensor:
        return x.square().sum(dim=(-2, -1), keepdim=True)  # B, N, 1, 1


class AcrossHeadsRMSNorm(nn.Module):
    """RMSNorm of a token's queries (or keys) over all heads together: Wan's and LTX-Video's qk norm
    (diffusers' ``rms_norm_across_heads``, an ``nn.RMSNorm(H·Dh)`` on the projection before the head
    split), applied here to the B×N×H×Dh view after the split.

    ``y = x · rsqrt(Σ_{h,d} x² / dim + eps) · weight``, computed in fp32. ``dim`` is the width of the
    whole model (H·Dh over all heads), fixed at construction: the denominator stays global when a rank
    holds only its heads. The statistic comes from the ``sum_squares`` submodule (:class:`SumSquares`),
    the one point tensor parallelism replaces (with an all-reduce over the tp group). The weight,
    ``(dim,)`` in head-major order, is applied as ``weight.view(H_local, Dh)``: a rank holding heads
    a…b holds rows a·Dh…b·Dh of it, the same cut as the q/k projection's output channels.

    Returns fp32 under autocast (as CUDA autocast runs an RMSNorm), else x's dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.sum_squares = SumSquares()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        rstd = torch.rsqrt(self.sum_squares(xf) / self.dim + self.eps)  # B, N, 1, 1
        out = xf * rstd * self.weight.float().view(x.shape[-2], x.shape[-1])  # B, N, H, Dh
        return out if autocast_on(x) else out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


def qk_norm_module(kind: str | bool, dim: int, heads: int, eps: float) -> nn.Module:
    """The q or k norm of an attention of width ``dim`` with ``heads`` heads.

    Args:
        kind: ``none``, ``per_head`` (an ``nn.RMSNorm(head_dim)``, as SD3/Flux: a head's statistics
            stay on the rank that owns the head under tensor parallelism) or ``across_heads``
            (:class:`AcrossHeadsRMSNorm`, Wan/LTX); a bool means ``per_head``/``none``.
        dim, heads, eps: the attention's width, head count and the norm's epsilon.
    """
    if isinstance(kind, bool):
        kind = "per_head" if kind else "none"
    if kind == "per_head":
        return nn.RMSNorm(dim // heads, eps=eps)
    if kind == "across_heads":
        return AcrossHeadsRMSNorm(dim, eps=eps)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"qk_norm={kind!r}: expected 'none', 'per_head' or 'across_heads'")


def block_norm_module(kind: str, dim: int, eps: float) -> nn.Module:
    """A parameter-free pre-norm of a block: ``layernorm`` (DiT, Wan) or ``rmsnorm`` (LTX-Video)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps, elementwise_affine=False)
    raise ValueError(f"block_norm={kind!r}: expected 'layernorm' or 'rmsnorm'")


class SelfAttention(nn.Module):
    """Multi-head self-attention over the tokens of one axis of the patch grid.

    ``axis='full'`` attends over all F·H·W tokens; ``'space'`` within each frame (frames folded
    into the batch); ``'time'`` across frames at each spatial position.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        qk_norm: str | bool,
        eps: float,
        backend: str,
        axis: str = "full",
        logit_mult: float = 1.0,
    ):
        super().__init__()
        self.head_dim, self.axis, self.logit_mult = dim // heads, axis, logit_mult
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = qk_norm_module(qk_norm, dim, heads, eps)
        self.norm_k = qk_norm_module(qk_norm, dim, heads, eps)
        self.core = AttentionCore(backend)

    def forward(self, x: Tensor, grid: Grid, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        """Attend over ``x`` (B×N×D tokens in ``(f h w)`` order).

        Args:
            x: the tokens: a whole sample, or any run of whole frames of it (a context-parallel chunk).
            grid: the whole sample's patch grid. Only its frame size ``height · width`` is used, so
                the grid is the same on every context-parallel rank and a chunk's frame count follows
                from its own length.
            rope: cos/sin tables for these tokens, or None.
        """
        # heads = -1: under tensor parallelism a rank holds only its own heads
        b, n, _ = x.shape
        q = self.norm_q(self.q(x).view(b, n, -1, self.head_dim))  # B, N, H, Dh
        k = self.norm_k(self.k(x).view(b, n, -1, self.head_dim))
        v = self.v(x).view(b, n, -1, self.head_dim)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if self.logit_mult != 1.0:
            # μP's logit scale rides on the queries, so every attention core (SDPA, flash, ring,
            # Ulysses) keeps its own 1/sqrt(head_dim)
            q = q * self.logit_mult
        # under autocast the RMSNorm (and the fp32 RoPE) return fp32 while v is bf16: one compute dtype
        # for the core, so flash-attn takes them, SDPA gets no mixed dtypes and Ulysses sends bf16
        q, k = q.to(v.dtype), k.to(v.dtype)
        s = grid.height * grid.width  # tokens per frame
        if self.axis == "space":
            q, k, v = (rearrange(z, "b (f s) h e -> (b f) s h e", s=s) for z in (q, k, v))
        elif self.axis == "time":
            q, k, v = (rearrange(z, "b (f s) h e -> (b s) f h e", s=s) for z in (q, k, v))
        out = self.core(q, k, v)
        if self.axis == "space":
            out = rearrange(out, "(b f) s h e -> b (f s) h e", b=b)
        elif self.axis == "time":
            out = rearrange(out, "(b s) f h e -> b (f s) h e", b=b)
        return self.o(out.reshape(b, n, -1))


class CrossAttention(nn.Module):
    """Queries from the video tokens, keys and values from the projected text states."""

    def __init__(
        self, dim: int, heads: int, qk_norm: str | bool, eps: float, backend: str, logit_mult: float = 1.0
    ):
        super().__init__()
        self.head_dim, self.logit_mult = dim // heads, logit_mult
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = qk_norm_module(qk_norm, dim, heads, eps)
        self.norm_k = qk_norm_module(qk_norm, dim, heads, eps)
        self.core = AttentionCore(backend)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None) -> Tensor:
        b, n, _ = x.shape
        l = context.shape[1]
        q = self.norm_q(self.q(x).view(b, n, -1, self.head_dim))  # B, N, H, Dh
        k = self.norm_k(self.k(context).view(b, l, -1, self.head_dim))  # B, L, H, Dh
        v = self.v(context).view(b, l, -1, self.head_dim)
        if self.logit_mult != 1.0:
            q = q * self.logit_mult  # μP (see SelfAttention)
        q, k = q.to(v.dtype), k.to(v.dtype)  # the RMSNorm's fp32 under autocast (see SelfAttention)
        out = self.core(q, k, v, key_mask=context_mask)  # B, N, H, Dh
        return self.o(out.reshape(b, n, -1))
