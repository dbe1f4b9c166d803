"""The planner's LoRA case (:func:`parallel.plan.plan`'s ``finetune``): what ``finetune.*`` and
``parallel.activation_offload`` change in one GPU's states and activations.

LoRA (:class:`Finetune`, ``finetune.*``): the frozen base holds no gradient, optimizer state or EMA and
is stored as ``launch.lora.store_base`` stores it: the plain ``nn.Linear`` layers (the blocks'
projections and FFN, the patch and text projections: nearly all of it) in ``base_dtype`` (4, 2 or 1
bytes; an fp8 linear keeps its bias in fp32), everything else in fp32 (the fp32-compute linears of the
time embedding, modulation and head, the norms, the adaLN tables: 0.19B parameters of a 14B Wan). The
trainer's fp32 LoRA base under autocast saves a bf16 copy of each weight for backward, as an fp8 base
saves its dequantised one; a bf16 base none. The adapters, r·(in + out) on each linear that
``finetune.lora.targets`` matches (:func:`lora_params`, against the linears of the model built on
meta), carry fp32 parameters, gradients, AdamW and EMA. ``block_swap`` keeps the last blocks' base in
host memory (two of them resident at a time: the running one and the prefetched next);
``activation_offload`` moves the blocks' saved activations to host memory (counted in
:func:`parallel.plan.plan`: two blocks' on the device in backward, the one computing and the
prefetched previous). :func:`launch.dryrun.lora_options` finds the options that make a LoRA fit a GPU
of a given size.

Arithmetic over :class:`dit.config.DiTConfig`, like :mod:`parallel.plan`, which calls
:func:`check_finetune` and :func:`lora_plan_states`; the model's linears come from one meta build per
architecture (cached).
"""

from __future__ import annotations

from dataclasses import dataclass

from dit.config import LORA_TARGETS, DiTConfig, match_targets
from parallel.plan_inputs import Layout

BASE_BYTES = {"fp32": 4, "bf16": 2, "fp8": 1}


@dataclass(frozen=True)
class Finetune:
    """What the planner counts of ``finetune.*`` and ``parallel.activation_offload`` (defaults: full
    training, nothing offloaded)."""

    lora_rank: int = 0
    """``finetune.lora.rank`` (0: every parameter trains)."""
    base_dtype: str = "fp32"
    """``finetune.base_dtype`` of the frozen base (LoRA only)."""
    block_swap: int = 0
    """``finetune.block_swap``: the last blocks whose frozen base lives in host memory."""
    activation_offload: bool = False
    """``parallel.activation_offload``."""
    targets: tuple[str, ...] | None = None
    """``finetune.lora.targets`` (fnmatch patterns of module names); None: the default
    (``dit.config.LORA_TARGETS``)."""


_LINEARS: dict[str, list[tuple[str, int, int, bool, bool]]] = {}


def _linears(arch: DiTConfig) -> list[tuple[str, int, int, bool, bool]]:
    """``(name, in, out, has bias, plain)`` of every ``nn.Linear`` of the model (built on meta once per
    architecture); ``plain``: exactly ``nn.Linear``, what ``launch.lora.store_base`` stores in
    ``finetune.base_dtype`` (not the fp32-compute ``Fp32Linear``)."""
    key = repr(arch)
    if key not in _LINEARS:
        import torch
        from torch import nn

        from dit.model import SpacetimeDiT

        with torch.device("meta"):
            model = SpacetimeDiT(arch)
        _LINEARS[key] = [
            (n, m.in_features, m.out_features, m.bias is not None, type(m) is nn.Linear)
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n
        ]
    return _LINEARS[key]


def lora_params(arch: DiTConfig, rank: int, targets=None) -> tuple[int, int]:
    """``(total, largest block's)`` LoRA parameters: r·(in + out) on each linear that a pattern of
    ``targets`` (``finetune.lora.targets``; None: the default targets) matches, by module name as
    ``launch.lora.resolve_targets`` matches them.

    Raises:
        ValueError: a pattern matches no linear, naming ``finetune.lora.targets`` and the pattern.
    """
    if targets is None:
        targets = LORA_TARGETS
    linears = _linears(arch)
    chosen = set(match_targets([n for n, *_ in linears], targets))
    per_block = [0] * arch.depth
    total = 0
    for name, fan_in, fan_out, _, _ in linears:
        if name in chosen:
            n = rank * (fan_in + fan_out)
            total += n
            if name.startswith("blocks."):
                per_block[int(name.split(".")[1])] += n
    return total, max(per_block, default=0)


def adapter_params(arch: DiTConfig, rank: int, targets=None) -> int:
    """LoRA parameters of the block with the most (every block's, for the default targets): r·(in + out)
    per adapted linear (:func:`lora_params`)."""
    return lora_params(arch, rank, targets)[1]


def base_bytes(arch: DiTConfig, base_dtype: str, block: int, root: int, tp: int = 1) -> tuple[int, int]:
    """Bytes of one block's and of the root's frozen base as ``launch.lora.store_base`` stores it: the
    plain linears' weights (and, but for fp8, biases) in ``base_dtype``, the rest in fp32.

    Args:
        arch: the architecture.
        base_dtype: ``finetune.base_dtype``.
        block, root: the parameters of a block on this tp rank and of the root
            (:func:`parallel.plan.state_bytes`'s ``block_params``, ``root_params``).
        tp: tensor-parallel degree (what it splits are plain linears: their share comes off the block's).
    """
    from parallel.plan import param_counts

    b = BASE_BYTES[base_dtype]
    low = {"block": 0, "root": 0}
    for name, fan_in, fan_out, bias, plain in _linears(arch):
        if plain:
            n = fan_in * fan_out + (fan_out if bias and base_dtype != "fp8" else 0)
            if name.startswith("blocks.0."):
                low["block"] += n
            elif not name.startswith("blocks."):
                low["root"] += n
    low["block"] -= param_counts(arch)["block_tp_split"] * (tp - 1) // tp
    return b * low["block"] + 4 * (block - low["block"]), b * low["root"] + 4 * (root - low["root"])


def lora_state_bytes(arch: DiTConfig, layout: Layout, engine: str, ema: bool, states: dict, ft: Finetune):
    """:func:`parallel.plan.state_bytes`'s result for a LoRA run: base in ``ft.base_dtype`` without
    gradients or optimizer states (``block_swap`` blocks of it on the host), adapters with all of theirs
    (fp32)."""
    depth, t = arch.depth, layout.tp
    sharded = engine == "fsdp" and layout.dp_shard * layout.cp > 1
    s = layout.dp_shard * layout.cp if sharded else 1
    total, largest = lora_params(arch, ft.lora_rank, ft.targets)
    a_block = largest // t
    a = total // t // s
    block, root = states["block_params"], states["root_params"]
    base_block, base_root = base_bytes(arch, ft.base_dtype, block, root, t)
    away = ft.block_swap - min(ft.block_swap, 2)  # swapped blocks not resident at the peak
    out = dict(states) | {
        "params": ((depth - away) * base_block + base_root) // s + 4 * a,
        "grads": 4 * a,
        "optimizer": 8 * a,
        "ema": 4 * a if ema else 0,
        "host": away * base_block // s,
    }
    if sharded:  # the running and the prefetched block gathered (bf16), the adapters' fp32 reduce-scatter
        out["fsdp_buffers"] = (2 + 2) * block + 4 * a_block + 2 * root
    elif ft.base_dtype == "bf16":
        out["casts_block"], out["casts_root"] = 0, 0
    return out


def lora_plan_states(
    arch: DiTConfig,
    layout: Layout,
    engine: str,
    ema: bool,
    cpu_offload: bool,
    states: dict,
    act: dict,
    ft: Finetune,
) -> dict:
    """:func:`parallel.plan.plan`'s states of a LoRA run (:func:`lora_state_bytes`, then what
    ``cpu_offload`` moves to the host); ``act["working"]`` loses the base's weight gradient (in place).

    Args:
        arch, layout, engine, ema, cpu_offload: as :func:`parallel.plan.plan` takes them.
        states: :func:`parallel.plan.state_bytes`'s result for full training.
        act: :func:`parallel.plan.activation_bytes`'s result, changed in place.
        ft: the :class:`Finetune` (``lora_rank`` > 0).
    """
    states = lora_state_bytes(arch, layout, engine, ema, states, ft)
    act["working"] -= 2 * arch.hidden_size * arch.ffn_hidden // layout.tp  # no base weight gradient
    if cpu_offload:  # FSDP2 offloads every sharded state (the base included), DeepSpeed the optimizer
        moved = ("params", "grads", "optimizer", "ema") if engine == "fsdp" else ("optimizer",)
        states = states | {"host": states["host"] + sum(states[k] for k in moved)} | {k: 0 for k in moved}
    return states


def check_finetune(arch: DiTConfig, layout: Layout, engine: str, ft: Finetune) -> None:
    """Raise naming the key for a LoRA / memory setting the planner (and the trainer) cannot run."""
    if ft.lora_rank < 0:
        raise ValueError(f"finetune.lora.rank={ft.lora_rank} must be ≥ 0")
    if ft.base_dtype not in BASE_BYTES:
        raise ValueError(f"finetune.base_dtype={ft.base_dtype!r}: expected one of {sorted(BASE_BYTES)}")
    # whether anything is frozen (LoRA or init.freeze) is the config's rule (launch.config
    # cross_field_errors); without LoRA the planner plans full training, an upper bound for init.freeze
    if ft.block_swap:
        if not 0 < ft.block_swap <= arch.depth:
            raise ValueError(f"finetune.block_swap={ft.block_swap}: the model has {arch.depth} blocks")
        if engine == "fsdp" and layout.dp_shard * layout.cp > 1 or layout.tp > 1:
            raise ValueError(
                f"finetune.block_swap={ft.block_swap} swaps whole blocks: it needs unsharded blocks "
                "(dp_shard = cp = tp = 1); with FSDP sharding use parallel.cpu_offload"
            )
