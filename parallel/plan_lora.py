"""The planner's LoRA case (:func:`parallel.plan.plan`'s ``finetune``): what ``finetune.*`` and
``parallel.activation_offload`` change in one GPU's states and activations.

LoRA (:class:`Finetune`, ``finetune.*``): the frozen base holds no gradient, optimizer state or EMA and
is stored in ``base_dtype`` (4, 2 or 1 bytes; the trainer's fp32 LoRA base under autocast saves a bf16
copy of each weight for backward, as an fp8 base saves its dequantised one; a bf16 base none); the
adapters (the default targets: q, k, v, o of each attention, fc1, fc2) carry fp32 parameters,
gradients, AdamW and EMA. ``block_swap`` keeps the last blocks' base in host memory (two of them
resident at a time: the running one and the prefetched next); ``activation_offload`` moves the saved
activations of every block but the one in backward to host memory. :func:`launch.dryrun.lora_options` finds
the options that make a LoRA fit a GPU of a given size.

Pure arithmetic over :class:`dit.config.DiTConfig`, like :mod:`parallel.plan`, which calls
:func:`check_finetune` and :func:`lora_plan_states`.
"""

from __future__ import annotations

from dataclasses import dataclass

from dit.config import DiTConfig
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


def adapter_params(arch: DiTConfig, rank: int) -> int:
    """LoRA parameters of one block on the default targets: r·(in + out) per adapted linear."""
    d, f = arch.hidden_size, arch.ffn_hidden
    attentions = 2 if arch.conditioning == "text" else 1
    return rank * (attentions * 4 * 2 * d + 2 * (d + f))


def lora_state_bytes(arch: DiTConfig, layout: Layout, engine: str, ema: bool, states: dict, ft: Finetune):
    """:func:`parallel.plan.state_bytes`'s result for a LoRA run: base in ``ft.base_dtype`` without
    gradients or optimizer states (``block_swap`` blocks of it on the host), adapters with all of theirs
    (fp32)."""
    depth, t = arch.depth, layout.tp
    sharded = engine == "fsdp" and layout.dp_shard * layout.cp > 1
    s = layout.dp_shard * layout.cp if sharded else 1
    a_block = adapter_params(arch, ft.lora_rank) // t
    a = depth * a_block // s
    local, block, root = states["local_params"], states["block_params"], states["root_params"]
    b = BASE_BYTES[ft.base_dtype]
    away = ft.block_swap - min(ft.block_swap, 2)  # swapped blocks not resident at the peak
    out = dict(states) | {
        "params": b * (local - away * block) // s + 4 * a,
        "grads": 4 * a,
        "optimizer": 8 * a,
        "ema": 4 * a if ema else 0,
        "host": b * away * block // s,
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
    if ft.base_dtype != "fp32" and not ft.lora_rank:
        raise ValueError(
            f"finetune.base_dtype={ft.base_dtype} stores a frozen base: needs finetune.lora.rank"
        )
    if ft.block_swap:
        if not ft.lora_rank:
            raise ValueError(
                f"finetune.block_swap={ft.block_swap} swaps a frozen base: needs finetune.lora.rank"
            )
        if not 0 < ft.block_swap <= arch.depth:
            raise ValueError(f"finetune.block_swap={ft.block_swap}: the model has {arch.depth} blocks")
        if engine == "fsdp" and layout.dp_shard * layout.cp > 1 or layout.tp > 1:
            raise ValueError(
                f"finetune.block_swap={ft.block_swap} swaps whole blocks: it needs unsharded blocks "
                "(dp_shard = cp = tp = 1); with FSDP sharding use parallel.cpu_offload"
            )
