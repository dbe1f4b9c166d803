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

import copy
import hashlib
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dit.config import match_targets
from dit.extras import require
from launch.config import LoraConfig

if TYPE_CHECKING:
    from peft.tuners.lora import LoraLayer

ADAPTER = "default"
"""peft's adapter name; one adapter per model, so it is dropped from every name we write."""

# path segments under which peft keeps adapter weights (peft's LoraLayer.adapter_layer_names, spelled
# out: importing peft pulls in transformers, seconds that a run without LoRA should not pay)
_ADAPTER_PARTS = frozenset(
    ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
)

# our init names → peft's init_lora_weights (True is peft's default: A Kaiming-uniform, B zero)
_PEFT_INIT: dict[str, bool | str] = {
    "default": True,
    "gaussian": "gaussian",
    "pissa": "pissa",
    "olora": "olora",
}

# inits that move part of each base weight into the adapters (W = W_res + scale·B0·A0): their adapters
# alone do not apply to the base as published (see adapter_state); pissa_niter_N too (is_mutating)
MUTATING_INITS = ("pissa", "olora")
_PISSA_NITER = re.compile(r"pissa_niter_[1-9]\d*")


def is_mutating(init: str) -> bool:
    """Whether ``finetune.lora.init`` moves part of each base weight into the adapters (``pissa``,
    ``pissa_niter_N``, ``olora``): the trained adapters then apply to the residual base, and exporting
    them for the base as published needs the initial ones (:func:`adapter_state_from`)."""
    return init in MUTATING_INITS or bool(_PISSA_NITER.fullmatch(init))


def peft_init(init: str) -> bool | str:
    """peft's ``init_lora_weights`` for ``finetune.lora.init`` (``pissa_niter_N`` passes through: peft's
    randomized-SVD PiSSA with N subspace iterations)."""
    if _PISSA_NITER.fullmatch(init):
        return init
    try:
        return _PEFT_INIT[init]
    except KeyError:
        raise ValueError(
            f"finetune.lora.init={init!r}: expected one of {[*_PEFT_INIT, 'pissa_niter_N']}"
        ) from None


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
    return match_targets([n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n], patterns)


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
    peft = require("peft", f"finetune.lora.rank={cfg.rank}")  # here, not at the top: see _ADAPTER_PARTS

    if lora_modules(model):
        raise ValueError("apply_lora: the model already has LoRA adapters (apply_lora was called twice)")
    names = resolve_targets(model, cfg.targets)
    meta = _is_meta(model)
    alpha = cfg.alpha if cfg.alpha is not None else cfg.rank
    pcfg = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=alpha,
        lora_dropout=cfg.dropout,  # 0 → peft puts nn.Identity, no RNG draw in forward
        target_modules=names,
        init_lora_weights=False if meta else peft_init(cfg.init),
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft.inject_adapter_in_model(pcfg, model, adapter_name=ADAPTER, low_cpu_mem_usage=meta)
    got = list(lora_modules(model))
    if got != names:
        raise RuntimeError(f"peft adapted {sorted(set(got) ^ set(names))[:5]} differently from the targets")
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter(name))
        if is_adapter(name) and p.dtype != torch.float32:
            # peft gives the adapters the base layer's dtype; they train in fp32 whatever the base is
            p.data = p.data.float()
    model.lora_config = copy.deepcopy(cfg)  # adapter_state reads the init and scale from here
    if not meta and is_mutating(cfg.init):
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
    # a peft layer exists only once peft is imported; until then there is none to look for
    layer = sys.modules.get("peft.tuners.lora.layer")
    if layer is None:
        return {}
    return {n: m for n, m in model.named_modules() if isinstance(m, layer.LoraLayer)}


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base inside the block (peft's ``enable_adapters(False)`` on every layer):
    the reference of the "LoRA had no effect" check. For pissa/olora the base is then the residual
    W_res, not the original weights."""
    layers = list(lora_modules(model).values())
    # peft's flag itself rather than enable_adapters(), which also flips the adapters' requires_grad
    # (FSDP2 and the optimizer hold those parameters; the block must leave nothing changed)
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m in layers:
            m._disable_adapters = False


def _full(t: Tensor) -> Tensor:
    """A DTensor's full value (FSDP / TP shards), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _peft_adapters(model: nn.Module) -> dict[str, Tensor]:
    return {k: v for k, v in model.state_dict().items() if is_adapter(k)}


def initial_adapters(model: nn.Module) -> dict[str, Tensor] | None:
    """The adapters as pissa/olora initialised them (peft names, fp32, CPU), kept by :func:`apply_lora`
    on ``model.lora_initial``; None for the other inits (their B starts at zero)."""
    return getattr(model, "lora_initial", None)


def _plain(name: str) -> str:
    """Our plain name of a peft state name: ``...q.base_layer.weight`` → ``...q.weight``,
    ``...q.lora_A.default.weight`` → ``...q.lora_A.weight``."""
    parts = name.split(".")
    out = [
        p
        for i, p in enumerate(parts)
        if p != "base_layer" and not (p == ADAPTER and i and is_adapter(parts[i - 1]))
    ]
    return ".".join(out)


def adapter_state_from(
    state: dict[str, Tensor], cfg: LoraConfig, initial: dict[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """The adapters of a peft-named state dict (a checkpoint's) in plain names, ready for other tools.

    Each adapted module ``M`` gives ``M.lora_A.weight`` (r × in) and ``M.lora_B.weight`` (out × r), fp32,
    with the scale ``alpha / rank`` already multiplied into B: a loader that assumes alpha = rank (no
    ``.alpha`` key, or one equal to the rank) then adds exactly ``B·A``, which is what the model added.

    For pissa/olora the trained model is ``W_res + s·B·A`` with ``W_res = W − s·B0·A0``, so relative to
    the published base W it adds ``s·(B·A − B0·A0) = [s·B, −s·B0] · [A; A0]``: adapters of rank 2r
    (peft's own conversion, ``save_pretrained(path_initial_model_for_weight_conversion=…)``) that apply to
    the base as published.

    Args:
        state: peft-named tensors (``...lora_A.default.weight``); base weights in it are ignored.
        cfg: the run's ``finetune.lora`` (its scale and init).
        initial: for pissa/olora, the adapters as initialised (peft names, :func:`initial_adapters` of a
            model built from the same base with :func:`apply_lora`); unused otherwise.
    """
    mutating = is_mutating(cfg.init)
    if mutating and initial is None:
        raise ValueError(
            f"finetune.lora.init={cfg.init} moved part of the base into the adapters: converting them to "
            "adapters of the original base needs the initial adapters (apply_lora on the init.from base)"
        )
    plain_initial = {_plain(k): _full(v).float() for k, v in (initial or {}).items() if is_adapter(k)}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if not is_adapter(key):
            continue
        name, t = _plain(key), _full(value).detach().float()
        is_b = ".lora_B." in f".{name}"
        t = t * cfg.scale if is_b else t.clone()
        if mutating:
            if name not in plain_initial:
                raise ValueError(f"the initial adapters have no {name} (another base or targets?)")
            t0 = plain_initial[name]
            t = torch.cat([t, -cfg.scale * t0], dim=1) if is_b else torch.cat([t, t0], dim=0)
        out[name] = t.contiguous()
    return out


def adapter_state(model: nn.Module, initial: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """:func:`adapter_state_from` of a live LoRA model (``model.lora_config``, set by :func:`apply_lora`).

    Args:
        model: a model adapted by :func:`apply_lora`. DTensor (FSDP/TP) shards are gathered, a
            collective: call it on every rank.
        initial: pissa/olora's initial adapters; default: those :func:`apply_lora` kept on ``model``
            (a meta/FSDP build keeps none: pass them from the CPU build).
    """
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise ValueError("adapter_state: the model has no LoRA adapters (apply_lora was not called)")
    return adapter_state_from(
        _peft_adapters(model), cfg, initial if initial is not None else initial_adapters(model)
    )


def _weight_fp32(module: nn.Module) -> Tensor:
    w = _full(module.weight).detach()
    return w.float() * _full(module.weight_scale).float() if isinstance(module, Fp8Linear) else w.float()


def merged_state(model: nn.Module) -> dict[str, Tensor]:
    """The plain model's state dict (no ``base_layer``, no adapters), fp32, with ``scale · B·A`` added
    to each adapted weight: it loads into a plain ``SpacetimeDiT`` of the same ``DiTConfig`` (strict)
    that computes what the LoRA model computes. A bf16/fp8 base is dequantised first (the merged
    model is fp32; casting it down is the exporter's choice). DTensor (FSDP/TP) shards are gathered, a
    collective: call it on every rank, or on the CPU model.
    """
    lora = lora_modules(model)
    fp8 = {n: m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if is_adapter(key) or key.endswith(".weight_scale"):
            continue
        out[_plain(key)] = _full(value).detach().float().clone()
    for name, m in fp8.items():
        out[_plain(f"{name}.weight")] = _weight_fp32(m)
    for name, m in lora.items():
        a = _full(m.lora_A[ADAPTER].weight).detach().float()
        b = _full(m.lora_B[ADAPTER].weight).detach().float()
        out[f"{name}.weight"] += m.scaling[ADAPTER] * (b @ a)  # out × in
    return out


class Fp8Linear(nn.Module):
    """A frozen linear stored in float8_e4m3fn with one fp32 scale per tensor (``finetune.base_dtype=fp8``).

    The scale is a power of two (the smallest with ``|W| / scale ≤ 448``, e4m3's largest value): e4m3 is
    floating point, so its relative precision (3 mantissa bits) is the same at any scale, and a power of
    two multiplies exactly in bf16 too. The forward dequantises to the input's dtype (bf16 under
    autocast, where the matmul runs anyway): the only full-width copy is that transient one per layer.
    The weight stays an ``nn.Parameter`` (frozen) so FSDP shards it like any other.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, device: torch.device | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        w = torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn, device=device)
        self.weight = nn.Parameter(w, requires_grad=False)
        self.register_buffer("weight_scale", torch.ones((), device=device))
        self.bias = (
            nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None
        )

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        """Quantise ``linear`` (values are skipped on meta)."""
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, w.device)
        if w.is_meta:
            return m
        amax = w.detach().abs().max().float().clamp_min(torch.finfo(torch.float32).tiny)
        scale = torch.exp2(torch.ceil(torch.log2(amax / torch.finfo(torch.float8_e4m3fn).max)))
        m.weight.copy_((w.detach().float() / scale).to(torch.float8_e4m3fn))
        m.weight_scale.copy_(scale)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().float())
        return m

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.to(x.dtype) * self.weight_scale.to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8_e4m3"


class Bf16Linear(nn.Linear):
    """A frozen linear stored in bf16 (``finetune.base_dtype=bf16``) that computes in its input's dtype.

    Under bf16 autocast nothing changes (autocast would have cast an fp32 weight to the same bf16 for the
    matmul); without autocast (a CPU run in fp32, a debugging forward) the weight is upcast for the call
    instead of failing on mixed dtypes. A subclass so that the state-dict names, ``isinstance`` checks
    (tensor-parallel plans) and FSDP see an ``nn.Linear``.
    """

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Bf16Linear:
        """The bf16 copy of ``linear`` (values are skipped on meta)."""
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, w.device, torch.bfloat16)
        m.requires_grad_(False)
        if not w.is_meta:
            m.weight.copy_(w)
            if linear.bias is not None:
                m.bias.copy_(linear.bias)
        return m

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def _frozen_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    # exactly nn.Linear: Fp32Linear (time embedding, modulation, output head) computes in fp32 on
    # purpose and is a sliver of the parameters; so are the norms, tables and embeddings left alone
    return [
        (n, m)
        for n, m in model.named_modules()
        if type(m) is nn.Linear and not any(p.requires_grad for p in m.parameters()) and not is_adapter(n)
    ]


def store_base(model: nn.Module, base_dtype: str) -> None:
    """Store the frozen base in low precision, in place (``finetune.base_dtype``); adapters stay fp32.

    What changes: every frozen plain ``nn.Linear`` (the blocks' projections and FFN, the text and patch
    projections: nearly all of a DiT's parameters), swapped for a :class:`Bf16Linear` (same names) or an
    :class:`Fp8Linear` (torch's float8_e4m3fn with a per-tensor scale, no torchao). Both compute in the
    input's dtype: bf16 under the training engine's autocast, where the matmuls run in bf16 anyway. The
    fp32-compute layers (time embedding, modulation, output head, norms) stay fp32 as they are: they
    are tiny and enter fp32 arithmetic (diffusers keeps Wan's so too, ``_keep_in_fp32_modules``). Call
    after :func:`apply_lora`: pissa/olora factor the fp32 weights.

    Args:
        model: the model (CPU, or meta: dtypes and modules change, no values).
        base_dtype: ``fp32`` (nothing), ``bf16`` or ``fp8``.
    """
    if base_dtype == "fp32":
        return
    if base_dtype not in ("bf16", "fp8"):
        raise ValueError(f"finetune.base_dtype={base_dtype!r}: expected fp32, bf16 or fp8")
    targets = _frozen_linears(model)
    if not targets:
        raise ValueError(
            f"finetune.base_dtype={base_dtype}: no frozen linear to store "
            "(set finetune.lora.rank or init.freeze)"
        )
    kind = Bf16Linear if base_dtype == "bf16" else Fp8Linear
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, kind.from_linear(linear))


def base_fingerprint(model: nn.Module) -> str:
    """sha256 (hex) of the plain model's state: for each state-dict entry in sorted name order, its name,
    dtype, shape and raw bytes.

    Identifies the base a LoRA run was trained on (its checkpoints hold the adapters only). Call it on the
    CPU model right after ``init.from`` and before :func:`apply_lora` / :func:`store_base` (pissa/olora
    and a low-precision base change the weights). One pass over the bytes without copies: about the
    speed of sha256 itself, 0.5–1 GB/s (one to two minutes for a 14B fp32 base).
    """
    h = hashlib.sha256()
    state = model.state_dict()
    if any(is_adapter(k) or ".base_layer." in k for k in state):
        raise ValueError(
            "base_fingerprint: the model has LoRA adapters; fingerprint the base before apply_lora"
        )
    for name in sorted(state):
        t = _full(state[name]).detach()
        if t.is_meta:
            raise ValueError(f"base_fingerprint: {name} is on the meta device (no values to hash)")
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()
