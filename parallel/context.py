"""Context (sequence) parallelism for long videos, and the sequence cut of Megatron-style sequence
parallelism, applied to a plain SpacetimeDiT with hooks.

The token sequence (``(t h w)`` order) is cut into ``cp`` contiguous chunks right after patch
embedding, every block runs on its chunk, and the chunks are gathered again after the final layer,
before unpatchify. What has to agree with that cut is sliced by hooks on the modules that make it:
the additive position embedding and the 3D RoPE tables (``pos_embed``, ``rope``), and per-frame
modulation vectors (``blocks.*``, ``final``: when t differs per frame, each chunk must hold whole
frames, so ``T_latent % cp == 0``).

Self-attention over the full sequence exchanges tokens: Ulysses (all-to-all from a sequence chunk
with every head to the whole sequence with H/cp heads; needs H divisible by the degree), ring
attention (K/V blocks passed around; any degree), or both (Ulysses inside groups of ``cp/cp_ring``
ranks, a ring across them). The factorized layout needs no exchange in its spatial blocks (a chunk
holds whole frames) and the same exchange in its temporal blocks. Cross-attention needs none: every
rank holds the whole caption, and a query chunk attends to it locally.

With sequence parallelism the chunk of each cp rank is cut again over its tp ranks between
sub-layers; :mod:`parallel.tensor` gathers it for attention and the MLP. The final layer runs on the
whole cp chunk, so the loss is replicated and every parameter outside the tensor-parallel plan gets
the same gradient on each tp rank.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor, nn

from parallel.collectives import (
    all_to_all,
    gather_replicated,
    group_size,
    local_chunk,
    split_full_grad,
    sum_grad,
)
from parallel.ring import ring_attention

log = logging.getLogger(__name__)


class UlyssesAttention(nn.Module):
    """All-to-all sequence↔heads around an inner attention core (DeepSpeed-Ulysses).

    Keeps the ``core(q, k, v, key_mask=None)`` contract of :class:`dit.attention.AttentionCore`.
    """

    def __init__(self, inner: nn.Module, group: dist.ProcessGroup | None):
        super().__init__()
        self.inner, self.group = inner, group

    def forward(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
        if key_mask is not None:
            raise ValueError("context-parallel self-attention takes no key mask")
        heads = q.shape[2]
        if heads % group_size(self.group):
            raise ValueError(
                f"Ulysses needs the (per tensor-parallel rank) head count {heads} divisible by its degree "
                f"{group_size(self.group)}: set parallel.cp_ring so that cp/cp_ring divides num_heads/tp"
            )
        q, k, v = (all_to_all(z, 2, 1, self.group) for z in (q, k, v))  # B, N, H/P, Dh
        out = self.inner(q, k, v)
        return all_to_all(out, 1, 2, self.group)  # B, N/P, H, Dh


class RingAttention(nn.Module):
    """Ring attention as an attention core (self-attention only)."""

    def __init__(self, group: dist.ProcessGroup | None):
        super().__init__()
        self.group = group

    def forward(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
        if key_mask is not None:
            raise ValueError("ring attention takes no key mask")
        return ring_attention(q, k, v, self.group)


@dataclass
class _Cut:
    """The sequence cut: over the cp ranks, then (sequence parallelism) over the tp ranks of each."""

    cp: dist.ProcessGroup | None
    sp: dist.ProcessGroup | None
    factorized: bool

    @property
    def ways(self) -> int:
        return group_size(self.cp) * group_size(self.sp)

    def tokens(self, x: Tensor, dim: int) -> Tensor:
        """This rank's tokens. Over cp by plain slicing: the gradient of what is upstream stays partial
        (own tokens) and the FSDP reduction, which includes cp, sums it. Over tp with an all-gather in
        backward: tp ranks are not reduced over, so upstream must get the whole gradient here."""
        return split_full_grad(local_chunk(x, dim, self.cp), dim, self.sp)

    def frames(self, mod: Tensor, sp: bool = True) -> Tensor:
        """B×F×D modulation of a sub-layer on this rank's tokens: F = 1 stays, per-frame vectors are cut.
        Under sequence parallelism the tp ranks use different frames of a vector they all computed, so
        its gradient is summed over tp before the cut."""
        if sp:
            mod = sum_grad(mod, self.sp)
        if mod.shape[1] == 1:
            return mod
        mod = local_chunk(mod, 1, self.cp)
        return local_chunk(mod, 1, self.sp) if sp else mod


def apply_sequence_cut(
    model: nn.Module,
    cp_group: dist.ProcessGroup | None,
    ulysses_group: dist.ProcessGroup | None = None,
    ring_group: dist.ProcessGroup | None = None,
    sp_group: dist.ProcessGroup | None = None,
) -> None:
    """Make ``model`` run on this rank's chunk of the sequence (in place, no parameter changes).

    Args:
        cp_group: the context-parallel ranks, in sequence-chunk order (None: no context parallel).
        ulysses_group / ring_group: its two factors (``cp_group`` rank = ring rank · |ulysses| +
            ulysses rank); either may be None (degree 1).
        sp_group: the tensor-parallel ranks when their residual stream is cut along the sequence too
            (sequence parallelism: :func:`parallel.tensor.tp_plan` gathers it before attention and
            the MLP and reduce-scatters after); None otherwise.
    """
    cut = _Cut(cp_group, sp_group, model.cfg.attention_layout != "full")
    cp = group_size(cp_group)

    def check(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["x"]
        grid = mod._grid(x, kwargs.get("cond"))
        t = args[1] if len(args) > 1 else kwargs.get("t")
        per_frame = t is not None and t.ndim == 2
        if cut.factorized and grid[0] % cp:
            raise ValueError(
                f"context parallel with the factorized layout cuts the sequence at frame boundaries: "
                f"{grid[0]} latent frames are not divisible by parallel.cp={cp}"
            )
        if per_frame and grid[0] % cut.ways:
            raise ValueError(
                f"per-frame timesteps need whole frames on each rank: {grid[0]} latent frames are not "
                f"divisible by parallel.cp={cp} × (sequence-parallel) tp={group_size(sp_group)}"
            )
        if (grid[0] * grid[1] * grid[2]) % cut.ways:
            raise ValueError(
                f"{grid[0] * grid[1] * grid[2]} tokens (grid {grid}) do not split over parallel.cp={cp} × "
                f"(sequence-parallel) tp={group_size(sp_group)} ranks"
            )

    model.register_forward_pre_hook(check, with_kwargs=True)
    model.patch_embed.register_forward_hook(lambda m, a, out: cut.tokens(out, 1))  # B, N/(cp·sp), D
    if model.pos_embed is not None:
        model.pos_embed.register_forward_hook(lambda m, a, out: cut.tokens(out, -2))  # N/(cp·sp), D
    if model.rope is not None:  # used inside attention, which sees the whole cp chunk
        model.rope.register_forward_hook(lambda m, a, out: tuple(local_chunk(z, 0, cp_group) for z in out))

    def local_grid(mod: nn.Module, args: tuple) -> tuple:
        h, m, grid, *rest = args
        return (h, m, (grid[0] // cp, grid[1], grid[2]) if grid[0] % cp == 0 else grid, *rest)

    for block in model.blocks:
        block.register_forward_pre_hook(local_grid)
        block.modulation.register_forward_hook(lambda m, a, out: tuple(cut.frames(z) for z in out))
        if cp > 1 and block.attn.axis != "space":  # a spatial block attends within frames, held whole
            core = block.attn.core
            if group_size(ring_group) > 1:
                core = RingAttention(ring_group)
            block.attn.core = UlyssesAttention(core, ulysses_group) if group_size(ulysses_group) > 1 else core
    # the final layer and the loss run replicated over tp: gather the sequence-parallel cut first
    model.final.register_forward_pre_hook(lambda m, args: (gather_replicated(args[0], 1, sp_group), args[1]))
    model.final.modulation.register_forward_hook(
        lambda m, a, out: tuple(cut.frames(z, sp=False) for z in out)
    )
    model.final.register_forward_hook(lambda m, a, out: gather_replicated(out, 1, cp_group))  # B, N, p·C


def check_cp_degrees(cp: int, cp_ring: int, heads: int, tp: int) -> int:
    """The ring degree to use; raises with the config field to change when the split is impossible.

    ``cp_ring = 0`` (auto) takes the largest Ulysses degree u dividing both cp and the heads of a
    tensor-parallel rank, and a ring of cp/u across those groups: pure Ulysses when the heads allow it
    (its all-to-alls move less than a ring's K/V turns, and its attention is one local kernel call),
    else as much Ulysses as they allow (cp=8, 12 heads: Ulysses 4 × ring 2), a pure ring only when
    heads and cp share no factor.
    """
    if cp == 1:
        return 1
    local_heads = heads // tp
    if cp_ring == 0:
        ulysses = math.gcd(cp, local_heads)
        cp_ring = cp // ulysses
        log.info(
            "parallel.cp_ring=0: context parallel cp=%d runs as Ulysses %d × ring %d (%d heads per tp rank)",
            cp, ulysses, cp_ring, local_heads,
        )  # fmt: skip
    if cp % cp_ring:
        raise ValueError(f"parallel.cp_ring={cp_ring} must divide parallel.cp={cp}")
    if local_heads % (cp // cp_ring):
        raise ValueError(
            f"Ulysses degree cp/cp_ring = {cp // cp_ring} must divide num_heads/tp = {heads}/{tp}: raise "
            f"parallel.cp_ring (ring attention takes any degree)"
        )
    return cp_ring


__all__ = ["apply_sequence_cut", "check_cp_degrees", "UlyssesAttention", "RingAttention"]
