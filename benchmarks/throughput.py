"""Training-step throughput and MFU over presets × latent shapes × attention backends × activation
checkpointing × torch.compile, and a micro-benchmark of the attention entry point alone.

Each case builds a fresh random-weight model the way the trainer does (meta device, then
``parallel.parallelize`` with a one-process layout for checkpointing and per-block compile), and times
whole training steps on random inputs: forward, backward and the trainer's AdamW step
(``launch.optim.build_optimizer``). Per case it reports tokens/s, model TFLOP/s (``dit.flops``: 3 ×
forward, recomputation not credited), hardware TFLOP/s (plus the recomputed forwards of checkpointed
blocks), MFU against the device's peak and peak CUDA memory. The peak is the dense bf16 figure of
``dit.flops.PEAK_TFLOPS_BF16`` on a known GPU, else the best of a few large matmuls timed in this
process (labelled "measured"). A case that cannot run (a backend missing, a kernel refusing the
inputs, out of memory, a checkpointing mode ``parallel`` does not know) is listed with its reason
instead of stopping the sweep. ``--json FILE`` also writes the result as JSON (``benchmarks/gpu_check.sh``
runs one case per process and assembles the JSON files).

    python -m benchmarks.throughput                                  # CPU: tiny, 4x8x8 and 5x16x16
    python -m benchmarks.throughput --presets tiny --shapes 4x8x8 --depth 2 --iters 3 --warmup 1
    python -m benchmarks.throughput --device cuda --presets video-1b3 --shapes 21x60x104 \\
        --backends sdpa:flash,sdpa:cudnn,flash_attn --ac none,every_2,full,selective --compile off,on
    python -m benchmarks.throughput --device cuda --no-train --backends sdpa:cudnn --attn-shapes 12x128x32760
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks import report
from benchmarks.model_step import _cuda_memory, _release, _step_fn
from dit.attention import _find_flash_attn, _flash_attn_func, attention
from dit.config import PRESETS, get_preset
from dit.flops import count, peak_flops
from dit.model import SpacetimeDiT
from launch.config import TrainConfig
from launch.optim import build_optimizer
from parallel.config import ParallelConfig, checkpoint_every
from parallel.parallelize import make_dims, parallelize

# ``sdpa:KERNEL`` entries pin torch SDPA to one kernel (torch.nn.attention.sdpa_kernel), so a kernel
# that cannot take the inputs raises instead of SDPA quietly picking another one.
SDPA_KERNELS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
BACKENDS = ("sdpa", "math", "flash_attn", *(f"sdpa:{k}" for k in SDPA_KERNELS))
# What a bare ``python -m benchmarks.throughput`` sweeps, per device type, as flags that the command
# line overrides. CPU runs stay short; CUDA covers docs/design.md §7's targets (video-1b3 at ~32k tokens,
# attention with head dim 128 at ≥ 8k tokens).
DEFAULTS = {
    "cpu": "--presets tiny --shapes 4x8x8,5x16x16 --backends sdpa,math --compile off "
    "--attn-shapes 8x64x1024,16x128x1024,8x64x4096 --text-len 64 --warmup 1 --iters 3 --dtype fp32",
    "cuda": "--presets video-small,video-1b3 --shapes 9x32x32,21x60x104 "
    "--backends sdpa,sdpa:flash,sdpa:efficient,sdpa:cudnn,flash_attn,math --compile off,on "
    "--attn-shapes 16x64x8192,16x128x8192,16x128x16384,16x128x32768 --text-len 512 --warmup 3 "
    "--iters 10 --dtype bf16",
}
MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}  # large enough to reach the device's matmul peak
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _ints(text: str, n: int, what: str) -> tuple[int, ...]:
    parts = text.lower().split("x")
    if len(parts) != n or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what} (positive ints joined by 'x')")
    return tuple(int(p) for p in parts)


def _csv(parse_one: Callable[[str], object]) -> Callable[[str], list]:
    """An argparse ``type`` for a comma-separated list; argparse names the flag in its errors."""

    def parse(text: str) -> list:
        items = [parse_one(item.strip()) for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError("give at least one value")
        return items

    return parse


def _one_of(allowed, what: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in allowed:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {value!r}; expected one of {', '.join(allowed)}"
            )
        return value

    return parse


def _ac(mode: str) -> str:
    try:
        checkpoint_every(mode, field="activation checkpointing mode")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return mode


def _parser() -> argparse.ArgumentParser:
    defaults = "; ".join(f"{kind}: {flags}" for kind, flags in DEFAULTS.items())
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput",
        description=" ".join(__doc__.split("\n\n")[0].split()),
        epilog=f"Defaults by device type ({defaults}).",
    )
    p.add_argument(
        "--presets", type=_csv(_one_of(PRESETS, "preset")), help="model presets, e.g. tiny,video-small"
    )
    p.add_argument("--shapes", type=_csv(lambda s: _ints(s, 3, "a T×H×W latent")), help="latent T×H×W list")
    p.add_argument("--backends", type=_csv(_one_of(BACKENDS, "attention backend")), help="attention backends")
    p.add_argument(
        "--ac", type=_csv(_ac), default=["none", "full", "every_2"], help="none, full, every_K, selective"
    )
    p.add_argument(
        "--compile", type=_csv(_one_of(("off", "on"), "setting")), help="off,on: torch.compile each block"
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--depth", type=int, help="override every preset's depth (to fit a CPU run)")
    p.add_argument("--text-len", type=int, help="text tokens for cross-attention")
    p.add_argument("--warmup", type=int, help="untimed steps (at least 2 when compiled)")
    p.add_argument("--iters", type=int, help="timed steps; the median is reported")
    p.add_argument("--dtype", choices=list(DTYPES), help="bf16 = autocast over fp32 weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a shared machine)")
    p.add_argument(
        "--peak-tflops",
        type=float,
        help="the peak MFU is relative to (default: the table's dense bf16 figure for a known GPU, else "
        "measured with large matmuls)",
    )
    p.add_argument(
        "--train", action=argparse.BooleanOptionalAction, default=True, help="time whole training steps"
    )
    p.add_argument(
        "--attention", action=argparse.BooleanOptionalAction, default=True, help="time attention alone"
    )
    p.add_argument(
        "--attn-shapes", type=_csv(lambda s: _ints(s, 3, "H×Dh×N")), help="heads×head_dim×tokens list"
    )
    p.add_argument("--out", default="", help="suffix of the report's name")
    p.add_argument("--json", help="also write the result (rows, attention, skipped, peak) to this file")
    p.add_argument(
        "--report", action=argparse.BooleanOptionalAction, default=True, help="write the dated report"
    )
    p.add_argument("--seed", type=int, default=0)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line over the device's :data:`DEFAULTS`.

    Args:
        argv: arguments after the module name (default: ``sys.argv[1:]``).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    p = _parser()
    kind = torch.device(p.parse_args(argv).device).type
    if kind not in DEFAULTS:
        p.error(f"--device: expected a cpu or cuda device, got {kind!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this torch build or machine has no CUDA (torch.cuda.is_available() is False)")
    a = p.parse_args([*DEFAULTS[kind].split(), *argv])  # the later occurrence of a flag wins
    a.compile_default = not any(arg.startswith("--compile") for arg in argv)
    a.compile = [c == "on" for c in a.compile]
    if not (a.train or a.attention):
        p.error("--no-train --no-attention leaves nothing to measure")
    for preset in a.presets if a.train else []:
        patch = get_preset(preset).patch_size
        for shape in a.shapes:
            if any(n % k for n, k in zip(shape, patch, strict=True)):
                p.error(f"--shapes {_x(shape)}: not divisible by preset {preset}'s patch {_x(patch)}")
    if min(a.iters, a.batch, a.depth or 1, a.threads or 1) < 1 or a.warmup < 0:
        p.error("--iters, --batch, --depth and --threads must be ≥ 1 and --warmup ≥ 0")
    if a.peak_tflops is not None and not 0 < a.peak_tflops < float("inf"):
        p.error(f"--peak-tflops={a.peak_tflops}: expected a positive number of TFLOP/s")
    return a


def _unavailable(backend: str, device: torch.device, dtype: str) -> str | None:
    """Why ``backend`` cannot run here, or None. Checked up front because ``dit.attention`` falls back
    to SDPA without an error where flash_attn cannot run, which would mislabel the measurement."""
    if backend == "flash_attn":
        if device.type != "cuda":
            return "flash_attn needs CUDA (dit.attention would silently use SDPA)"
        if dtype == "fp32":
            return "flash_attn needs bf16/fp16 inputs (fp32 would silently use SDPA)"
        if _find_flash_attn() is None:
            return "flash-attn (FlashAttention-2/3) is not installed"
    if backend in ("sdpa:efficient", "sdpa:cudnn") and device.type != "cuda":
        return "a CUDA-only SDPA kernel"
    return None


def _kernel(backend: str) -> contextlib.AbstractContextManager:
    _, _, kernel = backend.partition(":")
    return sdpa_kernel(SDPA_KERNELS[kernel]) if kernel else contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _times(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds of each of ``iters`` calls of ``fn``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _measured_peak(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """FLOP/s of the fastest of 5 size³ matmuls: noise only ever slows a run down."""
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(size, size, generator=g).to(device, dtype) for _ in range(2))
    return 2 * size**3 / min(_times(lambda: x @ y, device, 1, 5))


def _device_peak(device: torch.device, dtype: str, given: float | None = None) -> tuple[float, str]:
    """The peak FLOP/s that MFU is relative to, and where it comes from."""
    if given:
        return given * 1e12, "given by --peak-tflops"
    table = peak_flops() if device.type == "cuda" else None
    if table:
        return table, f"{torch.cuda.get_device_name(device)}: dense bf16, dit.flops.PEAK_TFLOPS_BF16"
    size = MATMUL_SIZE[device.type]
    return _measured_peak(device, DTYPES[dtype], size), f"measured: fastest of 5 {size}³ {dtype} matmuls"


# forward MACs of one block's parts (dit.flops' breakdown); the attention kernels are the *_scores_values
LINEAR_PARTS = ("attn_proj", "cross_attn_proj", "mlp")
ATTENTION_PARTS = ("attn_scores_values", "cross_attn_scores_values")


def recomputed_flops(flops: dict, depth: int, ac: str) -> float:
    """Hardware FLOPs a training step adds by recomputing forward work in backward.

    ``full`` / ``every_K`` recompute the whole forward of blocks 0, K, 2K, …; ``selective`` keeps the
    attention kernels' outputs and recomputes every block's linears (element-wise work is not counted
    by ``dit.flops``).

    Args:
        flops: ``dit.flops.count`` of the case.
        depth: the model's number of blocks.
        ac: the activation-checkpointing mode.
    """
    parts = flops["macs_breakdown"]
    if ac == "selective":
        return 2 * sum(parts[k] for k in LINEAR_PARTS)
    every = checkpoint_every(ac)
    if not every:
        return 0.0
    block_macs = sum(parts[k] for k in (*LINEAR_PARTS, *ATTENTION_PARTS))  # all blocks together
    return 2 * block_macs * len(range(0, depth, every)) / depth


def _random_init(model: torch.nn.Module, seed: int, device: torch.device) -> None:
    # N(0, 0.02) everywhere (no all-zero gates a kernel could shortcut), drawn on the device: a CPU
    # draw of video-1b3's 1.4B weights would add seconds to every case and change nothing timed
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)


def step_case(preset: str, shape: tuple, backend: str, ac: str, compiled: bool, a) -> dict:
    """Time whole training steps of one configuration and turn the median into throughput figures.

    Args:
        preset, shape, backend, ac, compiled: the case (shape is the latent T, H, W).
        a: the parsed command line (batch, depth, text_len, dtype, device, warmup, iters, seed).
    """
    device = torch.device(a.device)
    overrides = {"attention_backend": backend.partition(":")[0]} | ({"depth": a.depth} if a.depth else {})
    cfg = get_preset(preset, **overrides)
    pcfg = ParallelConfig(activation_checkpointing=ac, compile=compiled)
    with torch.device("meta"):
        model = SpacetimeDiT(cfg)
    parallelize(model, make_dims(pcfg, 1, cfg), None, pcfg)  # checkpoint and compile as the trainer does
    model.to_empty(device=device)
    _random_init(model, a.seed, device)
    g = torch.Generator().manual_seed(a.seed)
    x = torch.randn(a.batch, cfg.in_channels, *shape, generator=g).to(device)
    t = (torch.rand(a.batch, generator=g) * 1000).to(device)
    # no text mask: a masked cross-attention would keep the flash kernels from running
    ctx = torch.randn(a.batch, a.text_len, cfg.text_dim, generator=g).to(device)
    opt = build_optimizer(model, TrainConfig(), device)
    autocast = torch.bfloat16 if a.dtype == "bf16" else None
    step = _step_fn(model, lambda m: m(x, t, context=ctx), device, autocast, optimizer=opt)
    with _kernel(backend):
        # compiled: the first steps trace and build the forward and backward graphs
        for _ in range(max(a.warmup, 2) if compiled else a.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sec = statistics.median(step() for _ in range(a.iters))
    flops = count(cfg, *shape, batch=a.batch, text_len=a.text_len)
    model_flops = flops["flops_train_step"]
    hardware_flops = model_flops + recomputed_flops(flops, cfg.depth, ac)
    return {
        "preset": preset,
        "latent T×H×W": _x(shape),
        "tokens": a.batch * flops["tokens"],
        "attention": backend,
        "checkpointing": ac,
        "compile": compiled,
        "step s (median)": sec,
        "tokens/s": a.batch * flops["tokens"] / sec,
        "model TFLOP/s": model_flops / sec / 1e12,
        "hardware TFLOP/s": hardware_flops / sec / 1e12,
        "MFU": None,  # set once the peak is final (main)
        "max memory GiB": _cuda_memory(device),
    }


def attention_case(backend: str, heads: int, head_dim: int, tokens: int, a) -> dict:
    """Forward and forward+backward time of ``dit.attention.attention`` on random B×N×H×Dh inputs.

    FLOPs count the two matmuls (QKᵀ and PV): forward 4·B·H·N²·Dh; backward is taken as 2 × forward,
    so forward+backward is 3 × forward (FlashAttention's papers count 2.5 × forward for backward).

    Args:
        backend: an entry of :data:`BACKENDS`.
        heads, head_dim, tokens: H, Dh and N (self-attention, no mask).
        a: the parsed command line (batch, dtype, device, warmup, iters, seed).
    """
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    name = backend.partition(":")[0]
    if name == "flash_attn":
        _flash_attn_func()  # dit.attention resolves the package lazily, when a model builds a core
    # drawn on the device: 4 × 387M values for 40 heads at 75.6k tokens take seconds on a CPU
    g = torch.Generator(device).manual_seed(a.seed)
    shape = (a.batch, tokens, heads, head_dim)
    q, k, v, grad = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(4))
    for z in (q, k, v):
        z.requires_grad_(True)

    def fwd_bwd() -> None:
        attention(q, k, v, backend=name).backward(grad)
        q.grad = k.grad = v.grad = None

    with _kernel(backend):
        fwd = statistics.median(_times(lambda: attention(q, k, v, backend=name), device, a.warmup, a.iters))
        both = statistics.median(_times(fwd_bwd, device, a.warmup, a.iters))
    flops = 4 * a.batch * heads * tokens**2 * head_dim
    return {
        "backend": backend,
        "B": a.batch,
        "H": heads,
        "Dh": head_dim,
        "N": tokens,
        "fwd FLOPs": flops,
        "fwd ms": fwd * 1e3,
        "fwd TFLOP/s": flops / fwd / 1e12,
        "fwd+bwd ms": both * 1e3,
        "fwd+bwd TFLOP/s": 3 * flops / both / 1e12,
        "fwd % of peak": None,  # set once the peak is final (main)
    }


def _attempt(fn: Callable[..., dict], args: tuple, label: str, skipped: list[dict], device) -> dict | None:
    """``fn(*args)``, or None with the reason recorded, so one failing case does not end the sweep."""
    _release(device)  # the previous case's model, optimizer state and compiled graphs
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - any refusal (kernel, OOM, compile) is a result to report
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        skipped.append({"case": label, "reason": f"{type(e).__name__}: {reason}"})
        print(f"skipped {label}: {skipped[-1]['reason']}", flush=True)
        return None
    finally:
        _release(device)


def _runnable_backends(a, device: torch.device, skipped: list[dict]) -> list[str]:
    backends = []
    for backend in a.backends:
        reason = _unavailable(backend, device, a.dtype)
        if reason:
            skipped.append({"case": f"backend {backend} (every case)", "reason": reason})
        else:
            backends.append(backend)
    if a.train and a.compile_default and device.type == "cpu":
        why = "not in the CPU default: inductor's C++ build of each block takes minutes on a small machine"
        skipped.append({"case": "compile=on (every case)", "reason": f"{why}; ask with --compile off,on"})
    return backends


def sweep(a, skipped: list[dict]) -> tuple[list[dict], list[dict]]:
    """Run every case; the ones that cannot run go to ``skipped``.

    Args:
        a: the parsed command line.
        skipped: receives ``{"case", "reason"}`` dicts.

    Returns:
        Training-step rows and attention rows, each in sweep order.
    """
    device = torch.device(a.device)
    backends = _runnable_backends(a, device, skipped)
    rows, attn = [], []
    cases = itertools.product(a.presets, a.shapes, backends, a.ac, a.compile) if a.train else ()
    for preset, shape, backend, ac, compiled in cases:
        label = f"{preset} {_x(shape)} {backend} ac={ac} compile={'on' if compiled else 'off'}"
        row = _attempt(step_case, (preset, shape, backend, ac, compiled, a), label, skipped, device)
        if row:
            rows.append(row)
            print(f"{label}: {row['tokens/s']:,.0f} tokens/s, {row['model TFLOP/s']:.4g} TFLOP/s", flush=True)
    for backend in backends if a.attention else []:
        for heads, head_dim, tokens in a.attn_shapes:
            label = f"attention {backend} H={heads} Dh={head_dim} N={tokens}"
            args = (backend, heads, head_dim, tokens, a)
            row = _attempt(attention_case, args, label, skipped, device)
            if row:
                attn.append(row)
    return rows, attn


def _x(shape: tuple) -> str:
    return "x".join(map(str, shape))


def _cells(row: dict) -> dict[str, str]:
    def cell(key: str, v) -> str:
        if key in ("MFU", "fwd % of peak"):
            return f"{v:.1%}"
        if isinstance(v, bool):
            return "on" if v else "off"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return {key: cell(key, v) for key, v in row.items()}


def _body(rows: list[dict], attn: list[dict], skipped: list[dict], peak: float, peak_label: str) -> str:
    parts = [
        "### Training step (forward + backward + AdamW)",
        report.table(list(map(_cells, rows))) if rows else "(no case ran)",
        f"Peak: {peak / 1e12:.4g} TFLOP/s ({peak_label}). Model FLOPs = 3 × forward (dit.flops); "
        "MFU = model FLOP/s / peak, so recomputation is not credited; hardware TFLOP/s adds one "
        "forward per checkpointed block (selective: every block's linears). Max memory: "
        "torch.cuda.max_memory_allocated over the timed steps (n/a on CPU).",
    ]
    if attn:
        parts += [
            "### Attention entry point (dit.attention.attention, no mask)",
            report.table(list(map(_cells, attn))),
            "FLOPs: forward 4·B·H·N²·Dh (QKᵀ and PV); backward counted as 2 × forward, so fwd+bwd "
            "TFLOP/s = 3 × forward FLOPs / fwd+bwd time. Inputs require grad in both timings.",
        ]
    if skipped:
        parts += ["### Skipped", "\n".join(f"- {s['case']}: {s['reason']}" for s in skipped)]
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> dict:
    """Run the sweep, print the tables and write the dated report.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        ``rows`` (training-step cases), ``attention`` (micro-benchmark cases), ``skipped`` (case and
        reason), ``peak`` (``flops``, ``label``) and ``report`` (the written file).
    """
    a = parse_args(argv)
    with report.torch_threads(a.threads):
        return _run(a)


def _run(a: argparse.Namespace) -> dict:
    device = torch.device(a.device)
    peak, peak_label = _device_peak(device, a.dtype, a.peak_tflops)
    print(f"peak {peak / 1e12:.4g} TFLOP/s ({peak_label})", flush=True)
    skipped: list[dict] = []
    rows, attn = sweep(a, skipped)
    if peak_label.startswith("measured"):
        # again after the sweep, keeping the better: on a shared machine load only ever lowers it
        peak = max(peak, _device_peak(device, a.dtype)[0])
        peak_label += " before the sweep and 5 after"
    for r in rows:
        r["MFU"] = r["model TFLOP/s"] * 1e12 / peak
    for r in attn:
        r["fwd % of peak"] = r["fwd TFLOP/s"] * 1e12 / peak
    body = _body(rows, attn, skipped, peak, peak_label)
    config = {
        "presets": ", ".join(a.presets) + (f" (depth overridden to {a.depth})" if a.depth else "")
        if a.train
        else "off (--no-train)",
        "latent shapes (T×H×W)": ", ".join(map(_x, a.shapes)),
        "batch": a.batch,
        "text_len": a.text_len,
        "dtype": "bf16 autocast over fp32 weights" if a.dtype == "bf16" else "fp32",
        "attention backends": ", ".join(a.backends),
        "checkpointing": ", ".join(a.ac),
        "compile": ", ".join("on" if c else "off" for c in a.compile),
        "warmup/iters": f"{a.warmup}/{a.iters} (compiled: ≥ 2 warm-up steps)",
        "optimizer": "AdamW, launch.optim.build_optimizer with TrainConfig defaults",
        "peak": f"{peak / 1e12:.4g} TFLOP/s ({peak_label})",
        "attention shapes (H×Dh×N)": ", ".join(map(_x, a.attn_shapes)) if a.attention else "off",
    }
    path = None
    if a.report:
        name = f"throughput-{device.type}-{a.dtype}" + (f"-{a.out.replace('/', '')}" if a.out else "")
        title = f"Throughput sweep on {device.type}"
        path = report.write(name, "benchmarks.throughput", title, device, config, body)
    print(body)
    peak_info = {"flops": peak, "label": peak_label}
    result = {"rows": rows, "attention": attn, "skipped": skipped, "peak": peak_info, "report": path}
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            case_args = {
                k: getattr(a, k) for k in ("presets", "shapes", "depth", "text_len", "batch", "dtype")
            }
            extra = {"report": path and str(path), "config": config, "args": case_args}
            json.dump({**result, **extra}, f, indent=1)
    if path:
        print(f"report: {path}")
    return result


if __name__ == "__main__":
    main()
