"""Context (sequence) parallelism for long videos, and the sequence cut of Megatron-style sequence
parallelism, applied to a plain SpacetimeDiT at its named points (see :mod:`dit.model`).

The token sequence (``(f h w)`` order) is cut into ``cp`` contiguous chunks at ``seq_start`` (patch
embedding and additive positions done), every block runs on its chunk, and the chunks are gathered
again at ``seq_end``, after the final layer, before unpatchify. What has to agree with that cut is
cut with it: the 3D RoPE tables at ``seq_start``, and per-frame modulation vectors at the
``modulation`` of each block and of the final layer (when t differs per frame, each chunk must hold
whole frames). Every block keeps the whole sample's :class:`dit.layers.Grid`: attention uses only
its frame size, so a chunk of whole frames needs no grid of its own, and the full layout, which uses
none, cuts anywhere (a 3-frame clip over cp=2 is exact). A cut that cannot be exact (tokens that do
not split, a factorized layout or per-frame timesteps with frames that do not divide) raises naming
the latent and ``parallel.cp`` before any block runs.

Self-attention over the full sequence exchanges tokens: Ulysses (all-to-all from a sequence chunk
with every head to the whole sequence with H/cp heads; needs H divisible by the degree), ring
attention (K/V blocks passed around; any degree), or both (Ulysses inside groups of ``cp/cp_ring``
ranks, a ring across them). The factorized layout needs no exchange in its spatial blocks (a chunk
holds whole frames) and the same exchange in its temporal blocks. Cross-attention needs none: every
rank holds the whole caption, and a query chunk attends to it locally.

With sequence parallelism the chunk of each cp rank is cut again over its tp ranks between
sub-layers; :mod:`parallel.tensor` gathers it for attention and the MLP, and ``blocks_end`` gathers it
for the final layer, which runs on the whole cp chunk, so the loss is replicated and every parameter
outside the tensor-parallel plan gets the same gradient on each tp rank.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor, nn

from dit.layers import Grid
from parallel.collectives import (
    all_to_all,
    gather_replicated,
    group_size,
    local_chunk,
    split_full_grad,
    sum_grad,
)
from parallel.ring import ring_attention

Rope = tuple[Tensor, Tensor]  # dit.model's: cos and sin, one row per token

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
class SequenceCut:
    """The sequence cut: over the cp ranks, then (sequence parallelism) over the tp ranks of each.

    Args:
        cp: the context-parallel group, in chunk order (None: degree 1).
        sp: the tensor-parallel group when its residual stream is cut too (None: no sequence parallelism).
        factorized: the model alternates spatial and temporal attention (chunks must be whole frames).
        patch_size: the model's, to name the latent size in errors.
    """

    cp: dist.ProcessGroup | None
    sp: dist.ProcessGroup | None
    factorized: bool
    patch_size: tuple[int, int, int]

    @property
    def ways(self) -> int:
        return group_size(self.cp) * group_size(self.sp)

    def check(self, grid: Grid, per_frame: bool) -> None:
        """Raise, naming the latent and ``parallel.cp``, when ``grid`` cannot be cut exactly (every
        forward: integer checks; the message is made only for an error)."""
        cp = group_size(self.cp)
        if self.factorized and grid.frames % cp:
            raise ValueError(
                f"context parallel with the factorized layout cuts the sequence at frame boundaries: "
                f"{self._latent(grid)} has {grid.frames} frames of patches, not divisible by parallel.cp={cp}"
            )
        if per_frame and grid.frames % self.ways:
            raise ValueError(
                f"per-frame timesteps need whole frames on each rank: {self._latent(grid)} has "
                f"{grid.frames} frames of patches, not divisible by {self._ranks()}"
            )
        if math.prod(grid) % self.ways:
            raise ValueError(
                f"{self._latent(grid)}: its {math.prod(grid)} tokens do not split over {self._ranks()} ranks"
            )

    def _latent(self, grid: Grid) -> str:
        latent = "×".join(str(g * p) for g, p in zip(grid, self.patch_size, strict=True))
        return f"a latent of {latent} (frames × height × width; patch grid {grid})"

    def _ranks(self) -> str:
        sp = group_size(self.sp)
        return f"parallel.cp={group_size(self.cp)}" + (f" × (sequence-parallel) tp={sp}" if sp > 1 else "")

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

    def block_modulation(self, module: nn.Module, args: tuple, out: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """Forward hook on ``blocks.{i}.modulation``: its vectors for this rank's (sp-cut) tokens."""
        return tuple(self.frames(z) for z in out)

    def final_modulation(self, module: nn.Module, args: tuple, out: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """Forward hook on ``final.modulation``: its vectors for this rank's cp chunk (the final layer
        runs on the whole chunk, replicated over tp)."""
        return tuple(self.frames(z, sp=False) for z in out)


class CutSequence(nn.Module):
    """Replaces ``model.seq_start`` (same contract, :class:`dit.model.SequenceStart`): checks that the
    sample cuts exactly, then keeps this rank's tokens (over cp·sp) and RoPE rows (over cp: attention
    sees the whole cp chunk)."""

    def __init__(self, cut: SequenceCut):
        super().__init__()
        self.cut = cut

    def forward(
        self, h: Tensor, rope: Rope | None, grid: Grid, per_frame: bool
    ) -> tuple[Tensor, Rope | None]:
        self.cut.check(grid, per_frame)
        if rope is not None:
            rope = tuple(local_chunk(z, 0, self.cut.cp) for z in rope)  # N/cp, Dh/2 each
        return self.cut.tokens(h, 1), rope  # B, N/(cp·sp), D

    def extra_repr(self) -> str:
        return f"cp={group_size(self.cut.cp)}, sp={group_size(self.cut.sp)}"


class GatherSequence(nn.Module):
    """Replaces ``model.blocks_end`` (gathering the sp cut) or ``model.seq_end`` (the cp chunks): the
    whole sequence of ``group``'s ranks, in rank order; what follows runs replicated over them, so the
    backward keeps this rank's part of the gradient."""

    def __init__(self, group: dist.ProcessGroup | None, name: str):
        super().__init__()
        self.group, self.name = group, name

    def forward(self, h: Tensor) -> Tensor:
        return gather_replicated(h, 1, self.group)  # B, N·|group|, …

    def extra_repr(self) -> str:
        return f"{self.name}={group_size(self.group)}"


def apply_sequence_cut(
    model: nn.Module,
    cp_group: dist.ProcessGroup | None,
    ulysses_group: dist.ProcessGroup | None = None,
    ring_group: dist.ProcessGroup | None = None,
    sp_group: dist.ProcessGroup | None = None,
) -> None:
    """Make ``model`` run on this rank's chunk of the sequence (in place, no parameter changes).

    Args:
        model: a :class:`dit.model.SpacetimeDiT`: its ``seq_start``, ``blocks_end`` and ``seq_end``
            are replaced, its modulation modules hooked, its attention cores wrapped.
        cp_group: the context-parallel ranks, in sequence-chunk order (None: no context parallel).
        ulysses_group / ring_group: its two factors (``cp_group`` rank = ring rank · |ulysses| +
            ulysses rank); either may be None (degree 1).
        sp_group: the tensor-parallel ranks when their residual stream is cut along the sequence too
            (sequence parallelism: :func:`parallel.tensor.tp_plan` gathers it before attention and
            the MLP and reduce-scatters after); None otherwise.
    """
    cfg = model.cfg
    cut = SequenceCut(cp_group, sp_group, cfg.attention_layout != "full", tuple(cfg.patch_size))
    model.seq_start = CutSequence(cut)
    for block in model.blocks:
        block.modulation.register_forward_hook(cut.block_modulation)
        if group_size(cp_group) > 1 and block.attn.axis != "space":  # a spatial block: whole frames here
            core = block.attn.core
            if group_size(ring_group) > 1:
                core = RingAttention(ring_group)
            block.attn.core = UlyssesAttention(core, ulysses_group) if group_size(ulysses_group) > 1 else core
    # the final layer and the loss run replicated over tp: gather the sequence-parallel cut first
    model.blocks_end = GatherSequence(sp_group, "sp")
    model.final.modulation.register_forward_hook(cut.final_modulation)
    model.seq_end = GatherSequence(cp_group, "cp")  # B, N, p·C


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


__all__ = [
    "apply_sequence_cut",
    "check_cp_degrees",
    "SequenceCut",
    "CutSequence",
    "GatherSequence",
    "UlyssesAttention",
    "RingAttention",
]
