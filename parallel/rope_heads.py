"""LTX-Video's RoPE (``model.arch.pos_embed=rope_ltx``) under tensor parallelism, for both translations
of :mod:`parallel.tp_plan`.

:class:`dit.embeddings.RopeLTX` rotates the whole inner width D = H·Dh of a token, so its cos/sin tables
carry a head axis (N×H×Dh/2, or N×B×H×Dh/2 with one frame rate per sample). The model computes them
once, whole, before the blocks; a tensor-parallel rank's queries and keys hold only its own heads (the
q/k projections' output features are cut head-major, H/tp contiguous heads per rank), and
:func:`dit.embeddings.apply_rope` refuses a table of another head count. :class:`RopeHeads`, a forward
pre-hook on every self-attention, hands it this rank's heads of the tables instead: a view (no copy, no
communication, no gradient: the tables hold no parameters). The head axis is dim -2 of every table
kind, whatever comes before it, so a context-parallel token cut (dim 0, at ``seq_start``) and this
head cut commute. RoPE tables without a head axis (``rope3d``: N×Dh/2, the same for every head) pass
untouched, so the hook is registered only for per-head tables.
"""

from __future__ import annotations

from torch import Tensor, nn

from dit.embeddings import RopeLTX
from dit.layers import SelfAttention

Rope = tuple[Tensor, Tensor]  # dit.model's: cos and sin, token-first


class RopeHeads:
    """Forward pre-hook of a :class:`dit.layers.SelfAttention` (``forward(x, grid, rope)``): its RoPE
    tables cut to this rank's heads along dim -2.

    Args:
        heads: the model's head count (``model.arch.num_heads``): what a whole table holds.
        rank: this rank's index in the tensor-parallel group.
        tp: the tensor-parallel degree.
    """

    def __init__(self, heads: int, rank: int, tp: int):
        if heads % tp:
            raise ValueError(f"parallel.tp={tp} must divide model.arch.num_heads={heads}")
        self.heads, self.rank, self.tp = heads, rank, tp

    def cut(self, rope: Rope | None) -> Rope | None:
        """This rank's heads of per-head tables (a view); tables without a head axis as they are."""
        if rope is None or rope[0].ndim < 3:
            return rope
        if rope[0].shape[-2] != self.heads:  # cut twice, or a table of another model
            raise ValueError(
                f"RoPE table for {rope[0].shape[-2]} heads reached tensor parallelism's head cut; expected "
                f"the whole model.arch.num_heads={self.heads} (model.arch.pos_embed=rope_ltx)"
            )
        local = self.heads // self.tp
        return tuple(z.narrow(-2, self.rank * local, local) for z in rope)  # (B,) N, H/tp, Dh/2 each

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if "rope" in kwargs:
            return args, kwargs | {"rope": self.cut(kwargs["rope"])}
        if len(args) > 2:
            return (*args[:2], self.cut(args[2]), *args[3:]), kwargs
        return args, kwargs

    def __repr__(self) -> str:
        return f"RopeHeads(heads={self.heads}, rank={self.rank}, tp={self.tp})"


def cut_rope_heads(model: nn.Module, rank: int, tp: int) -> None:
    """Give every self-attention of ``model`` this rank's heads of per-head RoPE tables (in place).

    Nothing to do for one rank or for a model whose RoPE is the same for every head (``rope3d``) or
    absent. Call it in the same pass that cuts the q/k projections (both tensor-parallel translations
    do), on the meta model or a materialised one.

    Args:
        model: a :class:`dit.model.SpacetimeDiT`.
        rank: this rank's index in the tensor-parallel group (the q/k output features it holds are the
            ``rank``-th of ``tp`` equal chunks).
        tp: the tensor-parallel degree.
    """
    if tp == 1 or not isinstance(getattr(model, "rope", None), RopeLTX):
        return
    hook = RopeHeads(model.cfg.num_heads, rank, tp)
    for module in model.modules():
        if isinstance(module, SelfAttention):
            module.register_forward_pre_hook(hook, with_kwargs=True)


__all__ = ["RopeHeads", "cut_rope_heads"]
