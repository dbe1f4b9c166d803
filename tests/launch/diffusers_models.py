"""Tiny random diffusers video transformers, built and saved by the tests (nothing is downloaded).

Shared by the interop, init, export and sampling tests. Every weight is non-zero: diffusers' own
initialisation already is, and a small perturbation on top makes the norms' affine weights differ from
one (so a mapping that drops or swaps them shows up as a forward difference).

``diffusers`` is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Tiny shapes: width 32 (2 heads of 16: Wan's RoPE splits a 16-wide head 8/4/4 between t/h/w),
# 2 layers, text states 24 wide (not the width, so a swapped text projection fails loudly).
WAN_TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    text_dim=24,
    freq_dim=32,
    ffn_dim=48,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
)
# Wan2.2-TI2V-5B is Wan2.1's architecture on the 48-channel Wan2.2 VAE, run with per-token timesteps
# (the pipeline's ``expand_timesteps``): the tiny stand-in differs only in channels.
WAN_TI2V_TINY = dict(WAN_TINY, in_channels=6, out_channels=6)
# LTX-Video: patch 1, width = cross-attention width, text states 24 wide; its RoPE spans the whole
# width in thirds of pairs (a width divisible by 6 leaves no padding channels: 36 = 2 heads × 18).
LTX_TINY = dict(
    in_channels=8,
    out_channels=8,
    patch_size=1,
    patch_size_t=1,
    num_attention_heads=2,
    attention_head_dim=18,
    cross_attention_dim=36,
    num_layers=2,
    caption_channels=24,
    qk_norm="rms_norm_across_heads",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
)


def perturb_(model: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Add ``scale`` × N(0, 1) to every parameter in place (seeded), so none is zero or one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def build_wan(variant: str = "t2v", seed: int = 0, **overrides):
    """An in-memory ``WanTransformer3DModel`` (fp32, eval) with tiny shapes and perturbed weights.

    Args:
        variant: ``t2v`` (Wan2.1-T2V shapes) or ``ti2v`` (Wan2.2-TI2V: other channel count).
        seed: of the initialisation and the perturbation.
        **overrides: config fields to change (``patch_size=(2, 2, 2)``, ``num_layers=1`` …).
    """
    from diffusers import WanTransformer3DModel

    if variant not in ("t2v", "ti2v"):
        raise ValueError(f"variant={variant!r}: expected 't2v' or 'ti2v'")
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**{**(WAN_TINY if variant == "t2v" else WAN_TI2V_TINY), **overrides})
    return perturb_(model, seed + 1000).eval()


def build_ltx(seed: int = 0, **overrides):
    """An in-memory ``LTXVideoTransformer3DModel`` (fp32, eval) with tiny shapes and perturbed weights.

    Args:
        seed: of the initialisation and the perturbation.
        **overrides: config fields to change.
    """
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    model = LTXVideoTransformer3DModel(**{**LTX_TINY, **overrides})
    return perturb_(model, seed + 1000).eval()


def tiny_wan(tmp: Path, variant: str = "t2v", seed: int = 0, name: str | None = None, **overrides) -> Path:
    """Save a tiny random Wan transformer as a diffusers model folder under ``tmp``; returns the folder.

    The folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors``, as
    ``WanTransformer3DModel.save_pretrained`` writes them.

    Args:
        tmp: parent directory (a test's ``tmp_path``).
        variant: ``t2v`` or ``ti2v`` (see :func:`build_wan`).
        seed: of the weights.
        name: folder name; default ``wan-{variant}``.
        **overrides: config fields to change.
    """
    out = Path(tmp) / (name or f"wan-{variant}")
    build_wan(variant, seed, **overrides).save_pretrained(out)
    return out


def tiny_ltx(tmp: Path, seed: int = 0, name: str = "ltx", **overrides) -> Path:
    """Save a tiny random LTX-Video transformer as a diffusers model folder under ``tmp``; returns it.

    Args:
        tmp: parent directory.
        seed: of the weights.
        name: folder name.
        **overrides: config fields to change.
    """
    out = Path(tmp) / name
    build_ltx(seed, **overrides).save_pretrained(out)
    return out


def write_wan_index(root: Path, expand_timesteps: bool = False, **components) -> None:
    """``root/model_index.json`` of a one-expert ``WanPipeline`` root with a VAE, UMT5 encoder and
    tokenizer (the recipes' roots); ``components`` override entries (``scheduler=[...]``)."""
    index = {
        "_class_name": "WanPipeline",
        "_diffusers_version": "0.42.1",
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": [None, None],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "boundary_ratio": None,
        "expand_timesteps": expand_timesteps,
        **components,
    }
    (Path(root) / "model_index.json").write_text(json.dumps(index))


def tiny_wan_pipeline_root(
    tmp: Path, experts: int = 1, variant: str = "t2v", seed: int = 0, boundary_ratio: float = 0.875
) -> Path:
    """A WanPipeline root with only the transformer(s) and the scheduler (no VAE or text encoder).

    ``model_index.json`` names ``transformer`` (and, for two experts, ``transformer_2`` with
    ``boundary_ratio``, as Wan2.2-T2V-A14B's root does: ``transformer`` is the high-noise expert,
    ``transformer_2`` the low-noise one, with other weights). The scheduler is
    ``FlowMatchEulerDiscreteScheduler(shift=3.0)``; ``variant='ti2v'`` sets ``expand_timesteps``.

    Args:
        tmp: parent directory.
        experts: 1 (Wan2.1 / TI2V) or 2 (A14B).
        variant: ``t2v`` or ``ti2v``.
        seed: of the (first) transformer's weights; the second uses ``seed + 1``.
        boundary_ratio: of a two-expert root.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if experts not in (1, 2):
        raise ValueError(f"experts={experts}: expected 1 or 2")
    root = Path(tmp) / f"wan-pipeline-{variant}-{experts}"
    build_wan(variant, seed).save_pretrained(root / "transformer")
    index = {
        "_class_name": "WanPipeline",
        "_diffusers_version": "0.42.1",
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "vae": [None, None],
        "text_encoder": [None, None],
        "tokenizer": [None, None],
        "boundary_ratio": None,
        "expand_timesteps": variant == "ti2v",
    }
    if experts == 2:
        build_wan(variant, seed + 1).save_pretrained(root / "transformer_2")
        index["transformer_2"] = ["diffusers", "WanTransformer3DModel"]
        index["boundary_ratio"] = boundary_ratio
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root
