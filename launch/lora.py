"""LoRA adapters on a frozen base, through peft (``finetune.lora.*``, ``finetune.base_dtype``).

The model stays a plain :class:`dit.model.SpacetimeDiT`: :func:`apply_lora` swaps each targeted
``nn.Linear`` for peft's ``lora.Linear`` wrapper in place (``peft.inject_adapter_in_model``, not a
``PeftModel``), so ``forward``'s signature, ``init_weights`` and ``parallel/`` see the same model, and
parallelism is applied afterwards from outside as for full training. The names become peft's::

    blocks.0.attn.q.base_layer.weight          the frozen base weight (and .bias)
    blocks.0.attn.q.lora_A.default.weight      A, r × in
    blocks.0.attn.q.lora_B.default.weight      B, out × r;  output = base(x) + scale · B·A·x

Outside the training state (export, diffusers, ComfyUI) adapters travel in plain names without peft's
adapter name (:func:`adapter_state`) or merged into the base (:func:`merged_state`).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import peft
import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from launch.config import LoraConfig

ADAPTER = "default"
"""peft's adapter name; one adapter per model, so it is dropped from every name we write."""

# path segments under which peft keeps adapter weights (LoraLayer.adapter_layer_names)
_ADAPTER_PARTS = frozenset(LoraLayer.adapter_layer_names)

# our init names → peft's init_lora_weights (True is peft's default: A Kaiming-uniform, B zero)
_PEFT_INIT: dict[str, bool | str] = {
    "default": True,
    "gaussian": "gaussian",
    "pissa": "pissa",
    "olora": "olora",
}

# inits that move part of each base weight into the adapters (W = W_res + scale·B0·A0): their adapters
# alone do not apply to the base as published (see adapter_state)
MUTATING_INITS = ("pissa", "olora")


@dataclass
class LoraReport:
    """What :func:`apply_lora` did.

    Attributes:
        modules: the full names of the ``nn.Linear`` modules that got adapters, in model order.
        trainable: parameters that require grad afterwards (the adapters).
        total: all parameters afterwards (base + adapters).
        rank, alpha, init: the adapters' rank, scale numerator and init (for the summary).
    """

    modules: list[str]
    trainable: int
    total: int
    rank: int = 0
    alpha: float = 0.0
    init: str = "default"
    patterns: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the log: rank, scale, how many modules, trainable share."""
        share = 100.0 * self.trainable / max(self.total, 1)
        return (
            f"LoRA rank {self.rank} (alpha {self.alpha:g}, init {self.init}) on {len(self.modules)} modules: "
            f"{self.trainable:,} trainable of {self.total:,} parameters ({share:.2f}%)"
        )


def is_adapter(name: str) -> bool:
    """Whether a parameter / state-dict / optimizer-state name belongs to a LoRA adapter.

    Decided by path segment (``...q.lora_A.default.weight``, ``...q.lora_B.weight``), so a base module
    whose name merely contains "lora" is not mistaken for one, and any prefix (FSDP, ``_orig_mod.``)
    is fine.
    """
    return any(part in _ADAPTER_PARTS for part in name.split("."))


def resolve_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """The full names of the ``nn.Linear`` modules matched by any of the fnmatch ``patterns``.

    Args:
        model: the plain model (before injection).
        patterns: ``finetune.lora.targets``.

    Raises:
        ValueError: a pattern matches no ``nn.Linear``, naming the key, the pattern and a few of the
            linears there are (a typo would otherwise train nothing: the "LoRA had no effect" complaint).
    """
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
    chosen: set[str] = set()
    for pattern in patterns:
        hits = fnmatch.filter(linears, pattern)
        if not hits:
            # the first block's linears and those outside the blocks: every kind of name, once
            examples = ", ".join([n for n in linears if not re.match(r"blocks\.[1-9]", n)][:20])
            raise ValueError(
                f"finetune.lora.targets: pattern {pattern!r} matches no nn.Linear of the model; its linears "
                f"are named like {examples}"
            )
        chosen.update(hits)
    return [n for n in linears if n in chosen]  # model order, each once


def _is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def apply_lora(model: nn.Module, cfg: LoraConfig, seed: int = 0) -> LoraReport:
    """Inject peft LoRA layers into ``model`` in place and freeze everything else.

    Call after ``init.from`` has loaded the base: the pissa/olora inits factor the base weights as
    they are then. The patterns of ``cfg.targets`` are resolved here to an explicit list of module
    names, and peft is handed that list: for a list, peft matches a name exactly (or as a dotted
    suffix, which full names from the root cannot hit twice); the injected set is checked against it.

    On a ``meta`` model (the FSDP engine's build, later filled from the CPU model's full state dict)
    the same names and shapes appear on meta and nothing is initialised (peft's
    ``low_cpu_mem_usage``; an SVD of a meta weight has no values to factor).

    Args:
        model: a plain ``SpacetimeDiT`` (or any module with ``nn.Linear`` targets), not yet adapted.
        cfg: ``finetune.lora``; ``cfg.rank`` must be > 0.
        seed: seeds A's random init (peft draws it from torch's global CPU generator: the draw runs
            inside ``torch.random.fork_rng``, so the caller's RNG stream is untouched and two calls
            with one seed give the same bits).

    Returns:
        a :class:`LoraReport`.
    """
    if cfg.rank <= 0:
        raise ValueError(f"finetune.lora.rank={cfg.rank}: apply_lora needs a rank > 0")
    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise ValueError("apply_lora: the model already has LoRA adapters (apply_lora was called twice)")
    names = resolve_targets(model, cfg.targets)
    meta = _is_meta(model)
    alpha = cfg.alpha if cfg.alpha is not None else cfg.rank
    pcfg = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=alpha,
        lora_dropout=cfg.dropout,  # 0 → peft puts nn.Identity, no RNG draw in forward
        target_modules=names,
        init_lora_weights=False if meta else _PEFT_INIT[cfg.init],
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft.inject_adapter_in_model(pcfg, model, adapter_name=ADAPTER, low_cpu_mem_usage=meta)
    got = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    if got != names:
        raise RuntimeError(f"peft adapted {sorted(set(got) ^ set(names))[:5]} differently from the targets")
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter(name))
    if not meta and cfg.init in MUTATING_INITS:
        # the starting adapters are needed to turn the trained ones into adapters of the original base
        model.lora_initial = {k: v.detach().float().clone().cpu() for k, v in _peft_adapters(model).items()}
    return LoraReport(
        modules=names,
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total=sum(p.numel() for p in model.parameters()),
        rank=cfg.rank,
        alpha=float(alpha),
        init=cfg.init,
        patterns=list(cfg.targets),
    )


def lora_modules(model: nn.Module) -> dict[str, LoraLayer]:
    """The adapted modules by full name (empty for a model without LoRA)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base inside the block (peft's ``enable_adapters(False)`` on every layer):
    the reference of the "LoRA had no effect" check. For pissa/olora the base is then the residual
    W_res, not the original weights."""
    layers = list(lora_modules(model).values())
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


def _full(t: Tensor) -> Tensor:
    """A DTensor's full value (FSDP / TP shards), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _peft_adapters(model: nn.Module) -> dict[str, Tensor]:
    return {k: v for k, v in model.state_dict().items() if is_adapter(k)}


def initial_adapters(model: nn.Module) -> dict[str, Tensor] | None:
    """The adapters as pissa/olora initialised them (peft names, fp32, CPU), kept by :func:`apply_lora`
    on ``model.lora_initial``; None for the other inits (their B starts at zero)."""
    return getattr(model, "lora_initial", None)
