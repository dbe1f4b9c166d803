"""Context (sequence) parallelism for long videos, applied to a plain SpacetimeDiT with hooks.

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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor, nn

from parallel.collectives import all_to_all, gather_replicated, group_rank, group_size, local_chunk
from parallel.ring import ring_attention


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
    """The current forward's sequence cut, set by the model pre-hook and read by the others."""

    group: dist.ProcessGroup
    factorized: bool
    grid: tuple[int, int, int] = (0, 0, 0)
    frames_local: bool = False

    def rows(self, x: Tensor, dim: int) -> Tensor:
        return local_chunk(x, dim, self.group)

    def frames(self, mod: Tensor) -> Tensor:
        """B×F×… modulation: one vector for all tokens (F = 1) stays, per-frame vectors are cut."""
        return self.rows(mod, 1) if mod.shape[1] > 1 else mod


def apply_context_parallel(
    model: nn.Module,
    cp_group: dist.ProcessGroup,
    ulysses_group: dist.ProcessGroup | None,
    ring_group: dist.ProcessGroup | None,
) -> None:
    """Make ``model`` run on this rank's chunk of the sequence (in place, no parameter changes).

    Args:
        cp_group: all context-parallel ranks, in sequence-chunk order.
        ulysses_group / ring_group: its two factors (``cp_group`` rank = ring rank · |ulysses| +
            ulysses rank); either may be None (degree 1).
    """
    cut = _Cut(cp_group, model.cfg.attention_layout != "full")
    cp = group_size(cp_group)

    def check(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        x, cond = args[0], kwargs.get("cond", args[5] if len(args) > 5 else None)
        cut.grid = grid = mod._grid(x, cond)
        t = kwargs.get("t", args[1] if len(args) > 1 else None)
        per_frame = t is not None and t.ndim == 2
        n = grid[0] * grid[1] * grid[2]
        if (cut.factorized or per_frame) and grid[0] % cp:
            why = "the factorized layout" if cut.factorized else "per-frame timesteps"
            raise ValueError(
                f"context parallel with {why} cuts the sequence at frame boundaries: {grid[0]} latent "
                f"frames are not divisible by parallel.cp={cp}"
            )
        if n % cp:
            raise ValueError(f"context parallel: {n} tokens (grid {grid}) not divisible by parallel.cp={cp}")

    model.register_forward_pre_hook(check, with_kwargs=True)
    model.patch_embed.register_forward_hook(lambda m, a, out: cut.rows(out, 1))  # B, N/cp, D
    if model.pos_embed is not None:
        model.pos_embed.register_forward_hook(lambda m, a, out: cut.rows(out, -2))  # (…,) N/cp, D
    if model.rope is not None:
        model.rope.register_forward_hook(lambda m, a, out: tuple(cut.rows(z, 0) for z in out))  # N/cp, Dh/2

    def block_inputs(mod: nn.Module, args: tuple) -> tuple:
        h, m, grid, *rest = args
        local = (grid[0] // cp, grid[1], grid[2]) if grid[0] % cp == 0 else grid
        return (h, cut.frames(m), local, *rest)

    for block in model.blocks:
        block.register_forward_pre_hook(block_inputs)
        if block.attn.axis != "space":  # a spatial block attends within frames, which a chunk holds whole
            core = block.attn.core
            if ring_group is not None and group_size(ring_group) > 1:
                core = RingAttention(ring_group)
            block.attn.core = UlyssesAttention(core, ulysses_group) if group_size(ulysses_group) > 1 else core
    model.final.register_forward_pre_hook(lambda m, args: (args[0], cut.frames(args[1])))
    model.final.register_forward_hook(lambda m, a, out: gather_replicated(out, 1, cp_group))  # B, N, p·C


def check_cp_degrees(cp: int, cp_ring: int, heads: int, tp: int) -> int:
    """The ring degree to use (``cp_ring = 0``: Ulysses if the heads allow it, else ring); raises with
    the config field to change when the split is impossible."""
    if cp == 1:
        return 1
    local_heads = heads // tp
    if cp_ring == 0:
        cp_ring = 1 if local_heads % cp == 0 else cp
    if cp % cp_ring:
        raise ValueError(f"parallel.cp_ring={cp_ring} must divide parallel.cp={cp}")
    if local_heads % (cp // cp_ring):
        raise ValueError(
            f"Ulysses degree cp/cp_ring = {cp // cp_ring} must divide num_heads/tp = {heads}/{tp}: raise "
            f"parallel.cp_ring (ring attention takes any degree)"
        )
    return cp_ring


__all__ = ["apply_context_parallel", "check_cp_degrees", "UlyssesAttention", "RingAttention", "group_rank"]
