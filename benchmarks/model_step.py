"""Forward+backward throughput of SpacetimeDiT next to diffusers' WanTransformer3DModel.

Both models get the same architecture (a Wan-shaped preset: text cross-attention, adaLN-single,
3D RoPE, qk-RMSNorm, GELU-tanh FFN), the same inputs, dtype and attention kernel (SDPA), and are
timed in alternating iterations in one process, so the ratio is meaningful even on a noisy machine.
Reports tokens/s, achieved TFLOP/s (model FLOPs from ``dit.flops``) and MFU where the device's peak
is known, and writes a dated report to ``benchmarks/results/``.

For a Wan-shaped preset (qk RMSNorm across heads: the ``wan2.*`` ones) SpacetimeDiT is *imported* from
the diffusers model it is timed against, through the path a fine-tune takes (``save_pretrained`` →
``launch.interop.read_diffusers`` → ``to_ours``), so both hold the same weights; the report adds the
forward's output difference on the same inputs (Wan's text convention: ``text_len`` tokens, no mask).

    python -m benchmarks.model_step                                   # CPU default: video-small, 5×16×16
    python -m benchmarks.model_step --preset video-1b3 --frames 21 --height 60 --width 104 \\
        --device cuda --dtype bf16                                    # the 480p 81-frame target
    python -m benchmarks.model_step --preset wan2.1-t2v-1.3b --depth 3 --frames 1 --height 16 \\
        --width 16                                                    # imported Wan on a CPU (8 GiB)
    python -m benchmarks.model_step --preset wan2.1-t2v-1.3b --frames 21 --height 60 --width 104 \\
        --device cuda --dtype bf16                                    # the same, full depth, 480p
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from benchmarks import report
from dit.config import DEFAULT_LATENT_SIZE, DiTConfig, get_preset
from dit.extras import require
from dit.flops import count, mfu, peak_flops
from dit.model import build_model, num_params


def wan_reference(cfg: DiTConfig) -> torch.nn.Module | None:
    """diffusers' Wan transformer with ``cfg``'s architecture, or None if cfg is not Wan-shaped."""
    wan_shaped = (
        cfg.conditioning == "text"
        and cfg.modulation == "shared"
        and cfg.pos_embed == "rope3d"
        and cfg.mlp == "gelu_tanh"
        and cfg.qk_norm == "across_heads"  # Wan's qk RMSNorm spans all heads; a per-head model is not Wan
        and cfg.block_norm == "layernorm"
        and cfg.qk_norm_eps in (None, cfg.norm_eps)  # Wan's q/k norms use the model's eps
        and cfg.rope_theta == 10000.0
        and cfg.parametrization == "standard"
        and cfg.attention_layout == "full"
        and cfg.cross_attn_norm
        and not cfg.learn_sigma
        and cfg.cond_channels == 0
        and not cfg.fps_conditioning
    )
    if not wan_shaped:
        return None
    diffusers = require("diffusers", "benchmarks.model_step's reference for a Wan-shaped preset")
    return diffusers.WanTransformer3DModel(
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


def perturb_constant_(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Add ``scale`` × N(0, 1) to every parameter initialised to one value (norm weights 1, biases 0).

    diffusers initialises the rest randomly; perturbing only the constant tensors keeps the activations'
    scale while making a mapping that drops or swaps a norm's weight show up in the output difference.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 0 and bool((p == p.flatten()[0]).all()):
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def import_wan(wan: torch.nn.Module) -> tuple[DiTConfig, torch.nn.Module]:
    """SpacetimeDiT imported from diffusers' Wan as a fine-tune would: its saved folder, read back.

    ``save_pretrained`` writes what a downloaded transformer/ folder holds; ``launch.interop`` reads
    the safetensors and maps every tensor (strict: nothing missing, nothing left over).
    """
    from launch.interop import read_diffusers, to_ours

    with tempfile.TemporaryDirectory(prefix="model_step-wan-") as tmp:
        wan.save_pretrained(tmp)
        cfg, state = to_ours(read_diffusers(tmp))
    model = build_model(cfg, device="cpu")
    model.load_state_dict(state, strict=True)
    return cfg, model


def output_difference(ours: torch.nn.Module, wan: torch.nn.Module, x, t, ctx, mask) -> dict[str, float]:
    """Max absolute and relative (‖ours − wan‖ / ‖wan‖) difference of one fp32 forward on the same inputs."""
    with torch.no_grad():
        want = wan(x, t, encoder_hidden_states=ctx, return_dict=False)[0].float()
        got = ours(x, t, context=ctx, context_mask=mask).float()
    return {
        "max_abs": (got - want).abs().max().item(),
        "relative": ((got - want).norm() / want.norm()).item(),
        "output_rms": want.pow(2).mean().sqrt().item(),
    }


def _same_init(model: torch.nn.Module, seed: int) -> None:
    # Both models get N(0, 0.02) everywhere: the same numerics, and no all-zero gates that a
    # kernel could shortcut.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _step_fn(
    model,
    call: Callable,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    optimizer: torch.optim.Optimizer | None = None,
) -> Callable[[], float]:
    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = call(model)
        out.float().pow(2).mean().backward()
        if optimizer is not None:  # a whole training step (benchmarks.throughput), timed with the rest
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        for p in model.parameters():
            p.grad = None
        return elapsed

    return step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.model_step", description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--parallel", action="store_true",
        help="per-rank time/memory of parallel layouts on CPU (gloo) and Ulysses-vs-ring traffic",
    )  # fmt: skip
    mode.add_argument(
        "--mfu", action="store_true",
        help="GPU only: MFU over activation-checkpointing modes × torch.compile off/on",
    )  # fmt: skip
    p.add_argument(
        "--preset", help="default: video-small; video-1b3 with --mfu; a 256-wide one with --parallel"
    )
    p.add_argument("--depth", type=int, help="override the preset's depth (e.g. to fit a CPU run)")
    p.add_argument("--frames", type=int, help="latent frames T (default 5; 8 with --parallel; 21 with --mfu)")
    p.add_argument("--height", type=int, help="latent height H (default 16; 32; 60)")
    p.add_argument("--width", type=int, help="latent width W (default 16; 32; 104)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--text-len",
        type=int,
        help="text tokens (default: the preset's text_len (Wan: 512), else 64; 32 --parallel; 512 --mfu)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast (--mfu: always)"
    )
    p.add_argument("--warmup", type=int, help="default 3 (2 with --parallel)")
    p.add_argument("--iters", type=int, help="default 15 (7 with --parallel, 10 with --mfu)")
    p.add_argument("--compile", action="store_true", help="torch.compile each block of both models")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a shared machine)")
    p.add_argument("--no-reference", action="store_true", help="time only SpacetimeDiT")
    p.add_argument("--worlds", default="2,4", help="--parallel: world sizes to run (2 and/or 4)")
    p.add_argument("--ac-modes", default="none,full,every_2", help="--mfu: activation-checkpointing modes")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    defaults = {  # mode → (preset, (T, H, W), text_len, warmup, iters); step: the preset's text_len or 64
        "step": ("video-small", (5, 16, 16), None, 3, 15),
        "parallel": (None, (8, 32, 32), 32, 2, 7),
        "mfu": ("video-1b3", DEFAULT_LATENT_SIZE["video-1b3"], 512, 3, 10),
    }["parallel" if a.parallel else "mfu" if a.mfu else "step"]
    preset, (t, h, w), text_len, warmup, iters = defaults
    for name, value in zip(
        ("preset", "frames", "height", "width", "text_len", "warmup", "iters"),
        (preset, t, h, w, text_len, warmup, iters),
        strict=True,
    ):
        if getattr(a, name) is None:
            setattr(a, name, value)
    return a


def _models(a: argparse.Namespace, cfg: DiTConfig, device: torch.device, inputs: tuple) -> tuple:
    """The timed models with their calls, the architecture ours was built with, and the fp32 output
    difference of one forward when ours is imported from the diffusers reference (else None)."""
    x, t, ctx, mask = inputs
    wan = None if a.no_reference else wan_reference(cfg)
    diff = None
    if wan is None:
        ours = build_model(cfg, device="cpu")
        _same_init(ours, a.seed)
    else:
        # diffusers' own random init (seeded) with its constant tensors perturbed, then imported: the
        # two models hold the same weights, so their step times compare the implementations alone
        perturb_constant_(wan, a.seed)
        cfg, ours = import_wan(wan)
        wan.to(device)
        mask = mask if cfg.text_mask else None  # Wan's convention: padded states, nothing masked
        diff = output_difference(ours.to(device), wan, x, t, ctx, mask)
    models = {"spacetime-dit": (ours.to(device), lambda m: m(x, t, context=ctx, context_mask=mask))}
    if wan is not None:
        models["diffusers-wan"] = (wan, lambda m: m(x, t, encoder_hidden_states=ctx, return_dict=False)[0])
    return models, cfg, diff


def _timed(a: argparse.Namespace, models: dict, device: torch.device) -> dict[str, list[float]]:
    """Per-iteration forward+backward seconds of each model, timed in alternating iterations."""
    if a.compile:
        for model, _ in models.values():
            for block in model.blocks:
                block.compile()
    autocast_dtype = torch.bfloat16 if a.dtype == "bf16" else None
    steps = {name: _step_fn(m, call, device, autocast_dtype) for name, (m, call) in models.items()}
    for _ in range(a.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(a.iters):  # alternate, so drift on a shared machine hits both alike
        for name, step in steps.items():
            times[name].append(step())
    return times


def _load() -> str:
    """The 1/5/15-minute load average (CPU runs share the machine: a high load widens the spread)."""
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if a.parallel:
        from benchmarks.parallel_layouts import main as parallel_main

        return parallel_main(a)
    if a.mfu:
        return mfu_main(a)
    with report.torch_threads(a.threads):
        return step_main(a)


def step_main(a: argparse.Namespace) -> dict:
    """Time SpacetimeDiT (and diffusers' Wan for a Wan-shaped preset), print and write the report."""
    device = torch.device(a.device)
    overrides = {"depth": a.depth} if a.depth else {}
    cfg = get_preset(a.preset, **overrides)
    a.text_len = a.text_len or cfg.text_len or 64  # a Wan preset: its pipeline's 512 tokens

    g = torch.Generator().manual_seed(a.seed)
    x = torch.randn(a.batch, cfg.in_channels, a.frames, a.height, a.width, generator=g).to(device)
    t = (torch.rand(a.batch, generator=g) * 1000).to(device)
    ctx = torch.randn(a.batch, a.text_len, cfg.text_dim, generator=g).to(device)
    mask = torch.ones(a.batch, a.text_len, dtype=torch.bool, device=device)
    models, cfg, diff = _models(a, cfg, device, (x, t, ctx, mask))
    load_before = _load()
    times = _timed(a, models, device)

    flops = count(cfg, a.frames, a.height, a.width, a.batch, a.text_len)
    rows = _rows(a, models, times, flops, device)
    result = {"rows": rows, "flops": flops}
    body = report.table(rows)
    if "diffusers-wan" in times:
        ratio = statistics.median(times["diffusers-wan"]) / statistics.median(times["spacetime-dit"])
        # each iteration times both back to back: the per-pair ratio cancels the load they shared
        pairs = [w / o for w, o in zip(times["diffusers-wan"], times["spacetime-dit"], strict=True)]
        quartiles = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else [pairs[0]] * 3
        result["ratio"], result["paired_ratio"] = ratio, quartiles[1]
        body += (
            f"\n\nSpeed ratio (diffusers-wan step time / spacetime-dit step time): **{ratio:.3f}** "
            f"(≥ 1.0 means ours is at least as fast); median of the per-iteration ratios "
            f"{quartiles[1]:.3f} (quartiles {quartiles[0]:.3f}–{quartiles[2]:.3f}). Per-iteration times (s): "
            + "; ".join(f"{n}: {', '.join(f'{v:.4f}' for v in ts)}" for n, ts in times.items())
        )
    elif not a.no_reference:
        body += (
            f"\n\nNo diffusers reference: {a.preset} is not Wan-shaped (wan_reference; its qk_norm is "
            f"{cfg.qk_norm!r}, Wan's 'across_heads'), so only SpacetimeDiT is timed; the wan2.* presets "
            "are timed against diffusers with the same weights."
        )
    if diff is not None:
        result["difference"] = diff
        body += (
            "\n\nOutput difference, SpacetimeDiT imported from the diffusers model vs the diffusers model, "
            f"one fp32 forward on the same inputs: max |Δ| = {diff['max_abs']:.3e}, relative "
            f"‖Δ‖/‖ref‖ = **{diff['relative']:.3e}** (output RMS {diff['output_rms']:.3e})."
        )
    extra = {"dtype": a.dtype, "compile": a.compile}
    if device.type == "cpu":
        extra["torch threads"] = torch.get_num_threads()
    if diff is not None:
        extra["weights"] = "diffusers init (seeded, constant tensors perturbed), imported via launch.interop"
    extra["load average 1/5/15 min (before / after timing)"] = f"{load_before} / {_load()}"
    config = _config(a, cfg, flops, **extra)
    name = f"model_step-{a.preset.replace('/', '')}-{device.type}-{a.dtype}"
    if diff is not None:
        name = f"model_step-wan-import-{device.type}" + ("" if a.dtype == "fp32" else f"-{a.dtype}")
    title = f"Model step: {a.preset}{' imported from diffusers' if diff else ''} on {device.type}"
    path = report.write(name, "benchmarks.model_step", title, device, config, body, packages=("diffusers",))
    print(body)
    print(f"report: {path}")
    return result


def _rows(a: argparse.Namespace, models: dict, times: dict, flops: dict, device: torch.device) -> list[dict]:
    """One report row per timed model: median step time, tokens/s, TFLOP/s and MFU."""
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
                "max_memory_GiB": _cuda_memory(device),
            }
        )
    return rows


def _config(a: argparse.Namespace, cfg: DiTConfig, flops: dict, **extra) -> dict:
    """The config block of a step or MFU report."""
    return {
        "preset": a.preset,
        "architecture": cfg,
        "latent (T,H,W)": (a.frames, a.height, a.width),
        "batch": a.batch,
        "text_len": a.text_len,
        "tokens/sample": flops["tokens"],
        **extra,
        "model TFLOP per train step": f"{flops['flops_train_step'] / 1e12:.4f}",
        "warmup/iters": f"{a.warmup}/{a.iters}",
    }


def _recomputed_flops(flops: dict, cfg: DiTConfig, every: int) -> float:
    """Hardware FLOPs a step adds by recomputing checkpointed blocks (blocks 0, K, 2K, …)."""
    if not every:
        return 0.0
    parts = flops["macs_breakdown"]
    block_macs = sum(parts[k] for k in ("attn_proj", "attn_scores_values", "cross_attn_proj",
                                        "cross_attn_scores_values", "mlp"))  # fmt: skip
    return 2 * block_macs * len(range(0, cfg.depth, every)) / cfg.depth


def mfu_case(cfg: DiTConfig, mode: str, compiled: bool, a: argparse.Namespace, device: torch.device) -> dict:
    """Time one (checkpointing mode, compile) setting of a single-device bf16 training step.

    The model goes through ``parallel.parallelize`` with a one-process layout, so checkpointing and
    compile are applied exactly as the trainer applies them; bf16 is autocast over fp32 weights, the
    trainer's single-device precision.
    """
    from dit.model import SpacetimeDiT
    from parallel.config import ParallelConfig, checkpoint_every
    from parallel.parallelize import make_dims, parallelize

    pcfg = ParallelConfig(activation_checkpointing=mode, compile=compiled)
    with torch.device("meta"):
        model = SpacetimeDiT(cfg)
    parallelize(model, make_dims(pcfg, 1, cfg), None, pcfg)
    model.to_empty(device=device)
    _same_init(model, a.seed)
    g = torch.Generator().manual_seed(a.seed)
    x = torch.randn(a.batch, cfg.in_channels, a.frames, a.height, a.width, generator=g).to(device)
    t = (torch.rand(a.batch, generator=g) * 1000).to(device)
    ctx = torch.randn(a.batch, a.text_len, cfg.text_dim, generator=g).to(device)
    step = _step_fn(model, lambda m: m(x, t, context=ctx), device, torch.bfloat16)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for _ in range(a.warmup):  # includes compilation when compiled
            step()
        sec = statistics.median(step() for _ in range(a.iters))
    except torch.OutOfMemoryError:
        return {"activation_checkpointing": mode, "compile": compiled, "step_s (median)": "OOM"}
    flops = count(cfg, a.frames, a.height, a.width, a.batch, a.text_len)
    hw = flops["flops_train_step"] + _recomputed_flops(flops, cfg, checkpoint_every(mode))
    util = mfu(flops["flops_train_step"] / sec, peak=peak_flops() if device.type == "cuda" else None)
    return {
        "activation_checkpointing": mode,
        "compile": compiled,
        "step_s (median)": f"{sec:.3f}",
        "tokens/s": f"{a.batch * flops['tokens'] / sec:,.0f}",
        "model TFLOP/s": f"{flops['flops_train_step'] / sec / 1e12:.1f}",
        "hardware TFLOP/s": f"{hw / sec / 1e12:.1f}",
        "MFU": f"{util:.1%}" if util is not None else "n/a",
        "max_memory_GiB": _cuda_memory(device),
    }


def _cuda_memory(device: torch.device) -> str:
    """Peak allocated GiB on CUDA; n/a on a CPU (there is no allocator peak to read)."""
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}" if device.type == "cuda" else "n/a"


def _release(device: torch.device) -> None:
    # each case builds a fresh model: drop the last one's memory and compiled graphs first
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def mfu_main(a: argparse.Namespace) -> dict:
    """Single-GPU MFU of one preset over activation-checkpointing modes × compile off/on."""
    device = torch.device(a.device)
    if device.type != "cuda":
        raise SystemExit(
            "--mfu measures MFU against a GPU's dense bf16 peak, so it needs CUDA, and this machine has "
            f"none (device {a.device!r}, torch.cuda.is_available() = {torch.cuda.is_available()}). "
            "Run it on a GPU node: python -m benchmarks.model_step --mfu"
        )
    cfg = get_preset(a.preset, **({"depth": a.depth} if a.depth else {}))
    rows = []
    for mode in a.ac_modes.split(","):
        for compiled in (False, True):
            _release(device)
            rows.append(mfu_case(cfg, mode, compiled, a, device))
            print(rows[-1], flush=True)
    flops = count(cfg, a.frames, a.height, a.width, a.batch, a.text_len)
    body = report.table(rows) + (
        "\n\nMFU = model FLOPs (3 × forward, dit.flops) per second / the device's dense bf16 peak "
        f"({(peak_flops() or 0) / 1e12:.0f} TFLOP/s); hardware TFLOP/s adds the recomputed forwards of "
        "checkpointed blocks. Target (docs/design.md §7): ≥ 45% MFU for video-1b3 at ~32k tokens on an H100."
    )
    config = _config(a, cfg, flops, dtype="bf16 autocast, fp32 weights")
    name = f"model_step-mfu-{a.preset.replace('/', '')}-cuda"
    path = report.write(
        name, "benchmarks.model_step", f"MFU: {a.preset}, checkpointing × compile", device, config, body
    )
    print(body)
    print(f"report: {path}")
    return {"rows": rows, "flops": flops}


if __name__ == "__main__":
    main()
