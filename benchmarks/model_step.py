"""Forward+backward throughput of SpacetimeDiT next to diffusers' WanTransformer3DModel.

Both models get the same architecture (a Wan-shaped preset: text cross-attention, adaLN-single,
3D RoPE, qk-RMSNorm, GELU-tanh FFN), the same inputs, dtype and attention kernel (SDPA), and are
timed in alternating iterations in one process, so the ratio is meaningful even on a noisy machine.
Reports tokens/s, achieved TFLOP/s (model FLOPs from ``dit.flops``) and MFU where the device's peak
is known, and writes a dated report to ``benchmarks/results/``.

    python -m benchmarks.model_step                                   # CPU default: video-small, 5×16×16
    python -m benchmarks.model_step --preset video-1b3 --frames 21 --height 60 --width 104 \\
        --device cuda --dtype bf16                                    # the 480p 81-frame target
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks import report
from dit.config import DiTConfig, get_preset
from dit.flops import count, mfu, peak_flops
from dit.model import build_model, num_params


def wan_reference(cfg: DiTConfig) -> torch.nn.Module | None:
    """diffusers' Wan transformer with ``cfg``'s architecture, or None if cfg is not Wan-shaped."""
    wan_shaped = (
        cfg.conditioning == "text"
        and cfg.modulation == "shared"
        and cfg.pos_embed == "rope3d"
        and cfg.mlp == "gelu_tanh"
        and cfg.qk_norm
        and cfg.attention_layout == "full"
        and cfg.cross_attn_norm
        and not cfg.learn_sigma
        and cfg.cond_channels == 0
        and not cfg.fps_conditioning
    )
    if not wan_shaped:
        return None
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=cfg.patch_size,
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_ch,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_hidden,
        num_layers=cfg.depth,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=cfg.norm_eps,
    )


def _same_init(model: torch.nn.Module, seed: int) -> None:
    # Both models get N(0, 0.02) everywhere: the same numerics, and no all-zero gates that a
    # kernel could shortcut.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _step_fn(
    model, call: Callable, device: torch.device, autocast_dtype: torch.dtype | None
) -> Callable[[], float]:
    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = call(model)
        out.float().pow(2).mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        for p in model.parameters():
            p.grad = None
        return elapsed

    return step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.model_step", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="video-small")
    p.add_argument("--depth", type=int, help="override the preset's depth (e.g. to fit a CPU run)")
    p.add_argument("--frames", type=int, default=5, help="latent frames T")
    p.add_argument("--height", type=int, default=16, help="latent height H")
    p.add_argument("--width", type=int, default=16, help="latent width W")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--text-len", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--compile", action="store_true", help="torch.compile each block of both models")
    p.add_argument("--no-reference", action="store_true", help="time only SpacetimeDiT")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    device = torch.device(a.device)
    overrides = {"depth": a.depth} if a.depth else {}
    cfg = get_preset(a.preset, **overrides)
    autocast_dtype = torch.bfloat16 if a.dtype == "bf16" else None

    g = torch.Generator().manual_seed(a.seed)
    x = torch.randn(a.batch, cfg.in_channels, a.frames, a.height, a.width, generator=g).to(device)
    t = (torch.rand(a.batch, generator=g) * 1000).to(device)
    ctx = torch.randn(a.batch, a.text_len, cfg.text_dim, generator=g).to(device)
    mask = torch.ones(a.batch, a.text_len, dtype=torch.bool, device=device)

    ours = build_model(cfg, device="cpu")
    _same_init(ours, a.seed)
    models = {"spacetime-dit": (ours.to(device), lambda m: m(x, t, context=ctx, context_mask=mask))}
    wan = None if a.no_reference else wan_reference(cfg)
    if wan is not None:
        _same_init(wan, a.seed)
        models["diffusers-wan"] = (
            wan.to(device),
            lambda m: m(x, t, encoder_hidden_states=ctx, return_dict=False)[0],
        )
    if a.compile:
        for model, _ in models.values():
            for block in model.blocks:
                block.compile()

    steps = {name: _step_fn(m, call, device, autocast_dtype) for name, (m, call) in models.items()}
    for _ in range(a.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(a.iters):  # alternate, so drift on a shared machine hits both alike
        for name, step in steps.items():
            times[name].append(step())

    flops = count(cfg, a.frames, a.height, a.width, a.batch, a.text_len)
    peak = peak_flops() if device.type == "cuda" else None
    rows = []
    for name, ts in times.items():
        sec = statistics.median(ts)
        achieved = flops["flops_train_step"] / sec
        util = mfu(achieved, peak=peak) if peak else None
        rows.append(
            {
                "model": name,
                "params": f"{num_params(models[name][0]):,}",
                "step_s (median)": f"{sec:.4f}",
                "tokens/s": f"{a.batch * flops['tokens'] / sec:,.0f}",
                "TFLOP/s": f"{achieved / 1e12:.3f}",
                "MFU": f"{util:.1%}" if util is not None else "n/a",
                "max_memory_GiB": f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}"
                if device.type == "cuda"
                else "n/a",
            }
        )
    result = {"rows": rows, "flops": flops}
    body = report.table(rows)
    if "diffusers-wan" in times:
        ratio = statistics.median(times["diffusers-wan"]) / statistics.median(times["spacetime-dit"])
        result["ratio"] = ratio
        body += (
            f"\n\nSpeed ratio (diffusers-wan step time / spacetime-dit step time): **{ratio:.3f}** "
            f"(≥ 1.0 means ours is at least as fast). Per-iteration times (s): "
            + "; ".join(f"{n}: {', '.join(f'{v:.4f}' for v in ts)}" for n, ts in times.items())
        )
    config = {
        "preset": a.preset,
        "architecture": cfg,
        "latent (T,H,W)": (a.frames, a.height, a.width),
        "batch": a.batch,
        "text_len": a.text_len,
        "tokens/sample": flops["tokens"],
        "dtype": a.dtype,
        "compile": a.compile,
        "model TFLOP per train step": f"{flops['flops_train_step'] / 1e12:.4f}",
        "warmup/iters": f"{a.warmup}/{a.iters}",
    }
    name = f"model_step-{a.preset.replace('/', '')}-{device.type}-{a.dtype}"
    path = report.write(
        name,
        "benchmarks.model_step",
        f"Model step: {a.preset} on {device.type}",
        device,
        config,
        body,
        packages=("diffusers",),
    )
    print(body)
    print(f"report: {path}")
    return result


if __name__ == "__main__":
    main()
