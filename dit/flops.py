"""Exact parameter and FLOP accounting for SpacetimeDiT, and MFU.

Counts multiply-accumulates of every matrix product in a forward pass: linear layers (patch
embedding, timestep/fps/text embeddings, modulation, attention projections, MLPs, final layer) and
attention scores (QKᵀ) and values (PV) for both layouts. Element-wise work (norms, RoPE, softmax,
modulation arithmetic) is not counted, as is the convention for MFU. FLOPs = 2 × MACs; a training step
is 3 forwards of model FLOPs (backward = 2 × forward); activation checkpointing adds one forward
per recomputed block as *hardware* FLOPs, which MFU does not credit.

    python -m dit.flops video-1b3 --frames 21 --height 60 --width 104
"""

from __future__ import annotations

import argparse
import json

import torch

from dit.config import DEFAULT_LATENT_SIZE, DiTConfig, get_preset
from dit.model import SpacetimeDiT, block_axes, num_params

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s per device; matched by substring of the
# device name, first match wins, so the PCIe/NVL variants come before plain "h100" (SXM).
PEAK_TFLOPS_BF16 = {
    "h100 pcie": 756.0,
    "h100 nvl": 835.0,
    "h100": 989.0,
    "h200": 989.0,
    "b200": 2250.0,
    "a100": 312.0,
}


def _text_len(cfg: DiTConfig, text_len: int | None) -> int:
    # the length the model was trained at when it has one (an unmasked pad, or LTX's 128), else 512
    if text_len is not None:
        return text_len
    return cfg.text_len if cfg.text_len is not None else 512


def macs_breakdown(
    cfg: DiTConfig,
    frames: int,
    height: int,
    width: int,
    batch: int = 1,
    text_len: int | None = None,
    per_frame_t: bool = False,
) -> dict[str, int]:
    """Forward MACs by component for latents of size (frames, height, width).

    Args:
        cfg: the architecture.
        frames, height, width: latent T, H, W (divisible by the patch).
        batch: samples per forward.
        text_len: text tokens L for cross-attention; None: the model's ``text_len`` (Wan 512, LTX 128),
            else 512.
        per_frame_t: timesteps per latent frame (I2V), which runs the embedding and modulation
            linears once per frame instead of once per sample.
    """
    pt, ph, pw = cfg.patch_size
    gt, gh, gw = frames // pt, height // ph, width // pw
    n, s = gt * gh * gw, gh * gw
    d, f = cfg.hidden_size, cfg.ffn_hidden
    nf = gt if per_frame_t else 1  # modulation vectors per sample
    text = cfg.conditioning == "text"
    l = _text_len(cfg, text_len) if text else 0
    out = {
        "patch_embed": n * (cfg.in_channels + cfg.cond_channels) * cfg.patch_volume * d,
        "timestep_embed": nf * (cfg.freq_dim * d + d * d),
        "fps_embed": (cfg.freq_dim * d + d * d) if cfg.fps_conditioning else 0,
        "text_proj": l * (cfg.text_dim * d + d * d),
        "modulation": nf * d * 6 * d * (1 if cfg.modulation == "shared" else cfg.depth)
        + (nf * d * 2 * d if cfg.modulation == "per_block" else 0),
        "attn_proj": 0,
        "attn_scores_values": 0,
        "cross_attn_proj": 0,
        "cross_attn_scores_values": 0,
        "mlp": 0,
        "final_linear": n * d * cfg.patch_volume * cfg.out_ch,
    }
    seq_pairs = {"full": n * n, "space": gt * s * s, "time": s * gt * gt}  # query-key pairs per head set
    for axis in block_axes(cfg):
        out["attn_proj"] += 4 * n * d * d
        out["attn_scores_values"] += 2 * seq_pairs[axis] * d
        if text:
            out["cross_attn_proj"] += 2 * n * d * d + 2 * l * d * d
            out["cross_attn_scores_values"] += 2 * n * l * d
        out["mlp"] += (3 if cfg.mlp == "swiglu" else 2) * n * d * f
    return {k: v * batch for k, v in out.items()}


def count(
    cfg: DiTConfig,
    frames: int,
    height: int,
    width: int,
    batch: int = 1,
    text_len: int | None = None,
    per_frame_t: bool = False,
) -> dict:
    """Parameters, tokens and FLOPs of one forward / one training step (see module docstring)."""
    with torch.device("meta"):
        params = num_params(SpacetimeDiT(cfg))
    parts = macs_breakdown(cfg, frames, height, width, batch, text_len, per_frame_t)
    macs = sum(parts.values())
    pt, ph, pw = cfg.patch_size
    attn = parts["attn_scores_values"] + parts["cross_attn_scores_values"]
    return {
        "params": params,
        "tokens": (frames // pt) * (height // ph) * (width // pw),
        "batch": batch,
        "text_len": _text_len(cfg, text_len) if cfg.conditioning == "text" else 0,
        "macs_fwd": macs,
        "flops_fwd": 2 * macs,
        "flops_train_step": 3 * 2 * macs,
        "flops_train_step_recompute": 4 * 2 * macs,
        "attention_flops_fraction": attn / macs,
        "macs_breakdown": parts,
    }


def peak_flops(device_name: str | None = None) -> float | None:
    """Dense bf16 peak in FLOP/s for a device name (default: the current CUDA device), if known."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    name = device_name.lower()
    for key, tflops in PEAK_TFLOPS_BF16.items():
        if key in name:
            return tflops * 1e12
    return None


def mfu(flops_per_second: float, peak: float | None = None, device_name: str | None = None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's dense bf16 peak.

    Args:
        flops_per_second: model FLOPs (not hardware FLOPs) per second per device.
        peak: peak FLOP/s; default looked up from ``device_name`` (or the current CUDA device).
    """
    peak = peak if peak is not None else peak_flops(device_name)
    return None if not peak else flops_per_second / peak


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dit.flops", description="Parameters and FLOPs of a preset.")
    p.add_argument("preset")
    p.add_argument("--frames", type=int, help="latent frames T (default: the preset's usual size)")
    p.add_argument("--height", type=int, help="latent height H")
    p.add_argument("--width", type=int, help="latent width W")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--text-len",
        type=int,
        help="text tokens for cross-attention (default: the preset's text_len, else 512)",
    )
    p.add_argument("--per-frame-t", action="store_true", help="per-frame timesteps (I2V)")
    p.add_argument("--layout", choices=["full", "factorized"], help="override the attention layout")
    a = p.parse_args(argv)
    overrides = {"attention_layout": a.layout} if a.layout else {}
    try:
        cfg = get_preset(a.preset, **overrides)
    except KeyError as e:
        p.error(str(e.args[0]))
    t, h, w = (
        v if v is not None else d
        for v, d in zip((a.frames, a.height, a.width), DEFAULT_LATENT_SIZE[a.preset], strict=True)
    )
    bad = [
        (name, v, pp)
        for name, v, pp in zip(("--frames", "--height", "--width"), (t, h, w), cfg.patch_size, strict=True)
        if v % pp
    ]
    if bad:
        p.error(", ".join(f"{n}={v} is not divisible by the patch size {pp}" for n, v, pp in bad))
    result = {
        "preset": a.preset,
        "frames": t,
        "height": h,
        "width": w,
        **count(cfg, t, h, w, a.batch, a.text_len, a.per_frame_t),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
