"""The one tensor-parallel plan of :class:`dit.model.SpacetimeDiT`: module-name patterns → a kind.

Megatron's split: q/k/v, the MLP input and the SwiGLU gate column-wise, so each rank holds whole heads
and a slice of the hidden units; the attention and MLP outputs row-wise, ending in one reduction per
sub-layer. The qk RMSNorm runs on the rank's own heads (per head, or across all heads with one
all-reduce of each token's sum of squares). Everything else holding parameters
(patch, timestep and caption embeddings, modulation, the final layer) is replicated.

Two engines translate this plan: :mod:`parallel.tensor` into DTensor styles (``parallel.engine=fsdp``)
and :mod:`parallel.megatron_tp` into megatron-core modules (``parallel.engine=deepspeed``). Module
names in ``dit/`` are API: renaming one means changing :data:`PATTERNS` here, once.

Kinds:

- ``column``: an ``nn.Linear`` split along its output features (whole heads / hidden units per rank).
- ``row``: an ``nn.Linear`` split along its input features; the partial outputs are summed over the
  tp ranks (all-reduce, or reduce-scatter back to the sequence cut under sequence parallelism).
- ``head_norm``: a per-head ``nn.RMSNorm`` seeing only this rank's heads: its weight is replicated and
  its gradient, partial on each rank, is summed over the tp ranks.
- ``across_heads_norm``: a qk RMSNorm over all heads of a token (:class:`dit.layers.AcrossHeadsRMSNorm`,
  ``model.arch.qk_norm=across_heads``): its (D,) weight is split like the q/k output features (this
  rank's heads' rows, so its gradient is whole on each rank), and its ``sum_squares`` hook is replaced by
  one that sums each token's sum of squares over the tp ranks (:func:`parallel.collectives.sum_partials`).
  It takes the names planned ``head_norm``: the module's type decides which.
- ``residual_input``: a sub-layer whose first input is the residual stream; under sequence
  parallelism that arrives cut along the sequence and is all-gathered here. No parameters of its own.
- ``residual_norm``: an affine norm on the residual stream: replicated; under sequence parallelism it
  sees a sequence chunk, so its gradient is summed over the tp ranks.
- ``residual_linear``: a linear on the residual stream that holds no split of its own: the up-projection
  (``lora_B``) of a row linear's LoRA adapter. Replicated; under sequence parallelism it sees a sequence
  chunk, so its gradient is summed over the tp ranks (as ``residual_norm``'s).
- ``replicate``: every other module holding parameters of its own (not a pattern: what is left).

LoRA (peft, ``finetune.lora``): a planned linear wrapped by peft (``blocks.0.attn.q`` holding
``base_layer``, ``lora_A.default``, ``lora_B.default``) is planned through its parts, Megatron's split
applied to the product B·A: for a ``column`` linear the base and B are split column-wise and A (r×in, on
the whole input) is replicated, so each rank adds its output features' share of B·A·x; for a ``row``
linear the base and A are split row-wise (A's r outputs summed over the ranks: one extra all-reduce of
B×N×r) and B is a ``residual_linear``. The wrapper itself plans nothing.

A pattern naming an ``nn.Identity`` (an option switched off: ``qk_norm=False``,
``cross_attn_norm=False``) plans nothing; one naming a module of another type than its kind expects
is an error (the plan is stale), never a silently replicated layer.
"""

from __future__ import annotations

import torch
from torch import nn

from dit.layers import AcrossHeadsRMSNorm

COLUMN, ROW, HEAD_NORM, ACROSS_HEADS_NORM = "column", "row", "head_norm", "across_heads_norm"
RESIDUAL_INPUT, RESIDUAL_NORM, REPLICATE = "residual_input", "residual_norm", "replicate"
RESIDUAL_LINEAR = "residual_linear"
SHARDED = (COLUMN, ROW, HEAD_NORM, ACROSS_HEADS_NORM)
"""The kinds whose parameters or gradients are split over the tp ranks (the rest compute replicated)."""

# ``*`` stands for one dotted segment (a block index)
PATTERNS: dict[str, str] = {
    "blocks.*.attn": RESIDUAL_INPUT,
    "blocks.*.attn.q": COLUMN,
    "blocks.*.attn.k": COLUMN,
    "blocks.*.attn.v": COLUMN,
    "blocks.*.attn.o": ROW,
    "blocks.*.attn.norm_q": HEAD_NORM,
    "blocks.*.attn.norm_k": HEAD_NORM,
    "blocks.*.norm_cross": RESIDUAL_NORM,
    "blocks.*.cross_attn": RESIDUAL_INPUT,
    "blocks.*.cross_attn.q": COLUMN,
    "blocks.*.cross_attn.k": COLUMN,
    "blocks.*.cross_attn.v": COLUMN,
    "blocks.*.cross_attn.o": ROW,
    "blocks.*.cross_attn.norm_q": HEAD_NORM,
    "blocks.*.cross_attn.norm_k": HEAD_NORM,
    "blocks.*.mlp": RESIDUAL_INPUT,
    "blocks.*.mlp.fc1": COLUMN,
    "blocks.*.mlp.gate": COLUMN,
    "blocks.*.mlp.fc2": ROW,
}

# what each kind must find (a subclass is fine: Fp32LayerNorm is an nn.LayerNorm)
_EXPECTED: dict[str, type[nn.Module]] = {
    COLUMN: nn.Linear,
    ROW: nn.Linear,
    HEAD_NORM: nn.RMSNorm,
    RESIDUAL_INPUT: nn.Module,
    RESIDUAL_NORM: nn.LayerNorm,
}


def _matches(pattern: str, name: str) -> bool:
    p, n = pattern.split("."), name.split(".")
    return len(p) == len(n) and all(a in ("*", b) for a, b in zip(p, n, strict=True))


# a planned linear's LoRA parts: the base keeps the kind; (A's, B's) kinds per kind of the base
_LORA_PARTS: dict[str, tuple[str, str]] = {COLUMN: (REPLICATE, COLUMN), ROW: (ROW, RESIDUAL_LINEAR)}


def lora_parts(module: nn.Module) -> list[tuple[str, str]] | None:
    """``[("base_layer", "base"), ("lora_A.default", "A"), ("lora_B.default", "B"), …]`` for a module
    wrapped by peft's LoRA (any adapter names), else None. Duck-typed on peft's ``LoraLayer``
    attributes, so the plan does not import peft."""
    base, a, b = (getattr(module, k, None) for k in ("base_layer", "lora_A", "lora_B"))
    if base is None or not isinstance(a, nn.ModuleDict) or not isinstance(b, nn.ModuleDict):
        return None
    if getattr(module, "lora_embedding_A", None) or getattr(module, "lora_magnitude_vector", None):
        raise TypeError(
            f"tensor-parallel plan: {type(module).__name__} has LoRA parts (embedding adapters or DoRA) "
            "that parallel.tp cannot split; use parallel.tp=1 with finetune.lora.rank > 0"
        )
    parts = [("base_layer", "base")]
    parts += [(f"lora_A.{k}", "A") for k in a] + [(f"lora_B.{k}", "B") for k in b]
    return parts


def _kind_of(name: str, module: nn.Module) -> str | None:
    """The planned kind of one module (``None``: not planned), checking its type."""
    for pattern, kind in PATTERNS.items():
        if not _matches(pattern, name):
            continue
        if isinstance(module, nn.Identity):
            return None  # the option is switched off: nothing to split
        if kind in _LORA_PARTS and lora_parts(module) is not None:
            return None  # planned through its parts (resolve_plan)
        if kind == HEAD_NORM and isinstance(module, AcrossHeadsRMSNorm):
            return ACROSS_HEADS_NORM  # qk_norm=across_heads: the statistic spans the tp ranks
        if not isinstance(module, _EXPECTED[kind]):
            expected = _EXPECTED[kind].__name__ + (" or AcrossHeadsRMSNorm" if kind == HEAD_NORM else "")
            raise TypeError(
                f"tensor-parallel plan (parallel/tp_plan.py): {name!r} matches {pattern!r} ({kind}) "
                f"but is a {type(module).__name__}, not an {expected}"
            )
        if kind == RESIDUAL_NORM and not module.elementwise_affine:
            return None  # no weight: nothing to replicate or sum
        return kind
    return None


def resolve_plan(model: nn.Module) -> dict[str, str]:
    """Module name → kind for every module of ``model`` the plan touches, in module order.

    Every module holding parameters of its own gets a kind: a planned one, or ``replicate``.

    Args:
        model: a :class:`dit.model.SpacetimeDiT` (any device, meta included).

    Returns:
        ``{name: kind}`` with kinds from this module's docstring.
    """
    plan: dict[str, str] = {}
    lora: dict[str, str] = {}  # the parts of planned linears wrapped by LoRA → their kinds
    for name, module in model.named_modules():
        if name in lora:
            plan[name] = lora[name]
            continue
        kind = _kind_of(name, module)
        if kind is None and (parts := lora_parts(module)) is not None:
            lora.update(_plan_lora(name, module, parts))
            continue
        if kind is None and any(True for _ in module.parameters(recurse=False)):
            kind = REPLICATE
        if kind is not None:
            plan[name] = kind
    return plan


def _plan_lora(name: str, module: nn.Module, parts: list[tuple[str, str]]) -> dict[str, str]:
    """Kinds of the parts of a peft LoRA wrapper named ``name``: a planned linear's (module doc), or
    ``replicate`` for every part of an unplanned one (an adapter on a replicated linear)."""
    kind = next((k for p, k in PATTERNS.items() if _matches(p, name)), None)
    base = module.base_layer
    if kind in _LORA_PARTS and not isinstance(base, _EXPECTED[kind]):
        raise TypeError(
            f"tensor-parallel plan (parallel/tp_plan.py): {name!r}'s LoRA base is a "
            f"{type(base).__name__}, not an nn.Linear"
        )
    a_kind, b_kind = _LORA_PARTS.get(kind, (REPLICATE, REPLICATE))
    by_role = {"base": kind if kind in _LORA_PARTS else REPLICATE, "A": a_kind, "B": b_kind}
    out = {}
    for part, role in parts:
        sub = module.get_submodule(part)
        if any(True for _ in sub.parameters(recurse=False)):
            out[f"{name}.{part}"] = by_role[role]
    return out


def check_tp_weights(model: nn.Module, tp: int) -> None:
    """A ValueError naming the keys if ``model`` holds weights the plan cannot split over ``tp`` > 1
    ranks: float8-stored ones (``finetune.base_dtype=fp8``: a weight with its per-tensor scale, which a
    column or row slice would have to share). A bf16-stored base splits like an fp32 one."""
    if tp > 1 and any(p.dtype in _FLOAT8 for p in model.parameters()):
        raise ValueError(
            f"parallel.tp={tp} with finetune.base_dtype=fp8: tensor parallelism cannot split float8 "
            "weights with their per-tensor scale; use finetune.base_dtype=bf16, or parallel.tp=1 (FSDP "
            "shards an fp8 base)"
        )


_FLOAT8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def check_tp(cfg, tp: int) -> None:
    """Clear errors, naming the config keys, for shapes that do not split over ``tp`` ranks.

    The hidden width splits whenever the heads do (``hidden_size = num_heads × head_dim``; the
    config refuses any other), so heads and the MLP width are what is checked.

    Args:
        cfg: the model's :class:`dit.config.DiTConfig`.
        tp: the tensor-parallel degree (``parallel.tp``).
    """
    if tp < 1:
        raise ValueError(f"parallel.tp={tp} must be at least 1")
    if cfg.num_heads % tp:
        raise ValueError(f"parallel.tp={tp} must divide model.arch.num_heads={cfg.num_heads}")
    if cfg.ffn_hidden % tp:
        raise ValueError(
            f"parallel.tp={tp} must divide the MLP width {cfg.ffn_hidden} (model.arch.ffn_dim, or "
            "model.arch.hidden_size × model.arch.mlp_ratio when ffn_dim is unset)"
        )
