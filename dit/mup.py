"""μP (maximal update parametrisation; Yang et al. 2022, "Tensor Programs V") for SpacetimeDiT.

Under μP, the learning rate, initialisation scale and multipliers tuned on a narrow *base* model
stay optimal as the width grows. Every parameter is classified by which of its dimensions grow
with width, found by comparing its shape with that of the same model at the base width
(:func:`base_config`), as the ``mup`` package does with base shapes:

- **hidden** (both dimensions grow: attention and MLP matrices, modulation, the D→D layers of the
  timestep and text MLPs): initial variance ∝ 1/fan_in and Adam learning rate × base/width;
- **input** (only the output dimension grows: patch embedding, the first layers of the timestep
  and text MLPs, embedding tables, biases and norm weights): width-independent initialisation and
  learning rate;
- **output** (only the input dimension grows: the final linear): zero-initialised (adaLN-Zero) and
  read out through a multiplier base/width, with a width-independent learning rate.

Attention logits are scaled by 1/head_dim instead of 1/sqrt(head_dim) (equal at the base head
width), because under μP queries and keys become correlated and their dot product grows ∝ head_dim.
At the base width every multiplier is 1 and the μP model is the standard one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dit.config import DiTConfig


def enabled(cfg: DiTConfig) -> bool:
    return cfg.parametrization == "mup"


def base_head_dim(cfg: DiTConfig) -> int:
    return cfg.mup_base_head_dim or cfg.head_dim


def width_mult(cfg: DiTConfig) -> float:
    """hidden_size / base width under μP; 1 under the standard parametrisation."""
    return cfg.hidden_size / cfg.mup_base_width if enabled(cfg) else 1.0


def logit_mult(cfg: DiTConfig) -> float:
    """Factor on the queries that turns every attention core's 1/sqrt(d) into μP's sqrt(d_base)/d."""
    return math.sqrt(base_head_dim(cfg) / cfg.head_dim) if enabled(cfg) else 1.0


def output_mult(cfg: DiTConfig) -> float:
    """Multiplier of the final linear's output (μP's readout): base/width."""
    return 1.0 / width_mult(cfg)


def base_config(cfg: DiTConfig) -> DiTConfig:
    """The same architecture at μP's base width (heads and MLP width scaled along)."""
    d0, dh0 = cfg.mup_base_width, base_head_dim(cfg)
    if d0 % dh0:
        raise ValueError(
            f"DiTConfig.mup_base_width={d0} is not a multiple of the base head width {dh0} "
            "(DiTConfig.mup_base_head_dim, or head_dim when 0)"
        )
    ffn = None if cfg.ffn_dim is None else round(cfg.ffn_dim * d0 / cfg.hidden_size)
    return cfg.replace(hidden_size=d0, num_heads=d0 // dh0, ffn_dim=ffn, parametrization="standard")


def _shapes(cfg: DiTConfig) -> tuple[dict[str, torch.Size], dict[str, torch.Size], set[str]]:
    """Parameter shapes of the model and of its base-width twin (meta, no memory), and the names of
    linear-layer weights."""
    from dit.model import SpacetimeDiT  # dit.model imports this module for its multipliers

    with torch.device("meta"):
        model, base = SpacetimeDiT(cfg), SpacetimeDiT(base_config(cfg))
    linear = {f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    shapes = {n: p.shape for n, p in model.named_parameters()}
    return shapes, {n: p.shape for n, p in base.named_parameters()}, linear


def _kind(name: str, shape: torch.Size, base: torch.Size, linear: set[str]) -> str:
    grows = [a != b for a, b in zip(shape, base, strict=True)]
    # a matrix is (fan_out, fan_in) only in a linear layer; tables (modulation, embeddings) are
    # per-coordinate vectors however many rows they have
    if name in linear and grows == [True, True]:
        return "hidden"
    if name in linear and grows == [False, True]:
        return "output"
    return "input" if any(grows) else "fixed"


def classify(cfg: DiTConfig) -> dict[str, str]:
    """Parameter name → ``hidden``, ``input``, ``output`` or ``fixed`` (no dimension grows)."""
    shapes, base, linear = _shapes(cfg)
    return {n: _kind(n, shape, base[n], linear) for n, shape in shapes.items()}


def lr_multipliers(cfg: DiTConfig) -> dict[str, float]:
    """Parameter name → factor on the base learning rate (Adam): base fan-in / fan-in for hidden
    matrices, 1 for everything else; all 1 under the standard parametrisation."""
    if not enabled(cfg):
        return {}
    shapes, base, linear = _shapes(cfg)
    return {
        n: base[n][1] / shape[1] if _kind(n, shape, base[n], linear) == "hidden" else 1.0
        for n, shape in shapes.items()
    }


@torch.no_grad()
def rescale_init(model: nn.Module) -> None:
    """Turn the standard initialisation of ``model`` (just done by ``init_weights``) into μP's.

    The standard scheme's Xavier bound sqrt(6 / (fan_in + fan_out)) shrinks input layers as width
    grows (their fan_out grows); μP keeps them at their base-width scale. Its N(0, 0.02) layers are
    width-independent, which μP wants for input layers but not for hidden ones (variance ∝ 1/fan_in).
    Xavier is already μP-correct for hidden layers (both fans grow together), and zero stays zero.
    """
    cfg = model.cfg
    m = width_mult(cfg)
    kinds = classify(cfg)
    for name, p in model.named_parameters():
        kind = kinds[name]
        if kind == "input" and name == "patch_embed.proj.weight":
            fan_out, fan_in = p.shape
            p.mul_(math.sqrt((fan_in + fan_out) / (fan_in + fan_out / m)))  # Xavier at base fan_out
        elif kind == "hidden" and name.split(".")[0] in model.SMALL_INIT and name.endswith("fc2.weight"):
            p.mul_(1 / math.sqrt(m))  # the timestep/fps/text MLPs' D→D layer: N(0, 0.02²/m)


__all__ = [
    "enabled",
    "width_mult",
    "logit_mult",
    "output_mult",
    "base_config",
    "classify",
    "lr_multipliers",
    "rescale_init",
]
