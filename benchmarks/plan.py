"""Will it fit, and how fast: the planner of :mod:`parallel.plan` from the command line.

    python -m benchmarks.plan video-14b --frames 21 --height 90 --width 160 --gpu h100 --gpus 64 \\
        --layout dp_shard=8,cp=8 --ac full
    python -m benchmarks.plan video-14b --frames 21 --height 90 --width 160 --gpu h100 --gpus 64 --fit

Sizes are LATENT T, H, W (as ``python -m dit.flops``; default: the preset's usual size). Prints one
JSON object: the plan (``memory_gib``, ``fits``, ``step_s``, ``mfu`` and their breakdowns), or with
``--fit`` the layouts and checkpointing modes that fit ``--gpus`` GPUs, fastest first at one global
batch (``--global-batch``, each layout's grad_accum making it up), and the best one's plan. These
are predictions (see :mod:`parallel.plan` for what they assume and what they are validated against).
"""

from __future__ import annotations

import argparse
import json
import sys

from dit.config import DEFAULT_LATENT_SIZE, get_preset
from parallel.plan import GPUS, Layout, checkpoint_blocks, plan

FIT_AC = ("none", "selective", "every_4", "every_2", "full")
"""Checkpointing modes ``--fit`` tries when ``--ac`` is not given."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(gpus: int, heads: int, engine: str, gpus_per_node: int) -> list[Layout]:
    """Every ``dp_replicate · dp_shard · cp · tp = gpus`` with tp dividing the heads and fitting in a
    node (tensor parallel communicates every layer); DeepSpeed has no dp_replicate."""
    out = []
    for tp in _divisors(gpus):
        if heads % tp or tp > gpus_per_node:
            continue
        for cp in _divisors(gpus // tp):
            for rep in _divisors(gpus // (tp * cp)):
                if engine == "deepspeed" and rep > 1:
                    continue
                out.append(Layout(dp_replicate=rep, dp_shard=gpus // (tp * cp * rep), cp=cp, tp=tp))
    return out


def fit(arch, thw, gpus: int, ac_modes, global_batch: int, top: int = 20, **kw) -> dict:
    """Plan every candidate layout × checkpointing mode at the same global batch (samples per optimizer
    step: ``batch`` per replica per micro-step, grad_accum = what is left), so step times compare;
    keep those that fit, fastest first."""
    fits, tried = [], 0
    for layout in candidate_layouts(gpus, arch.num_heads, kw["engine"], kw["gpus_per_node"]):
        replicas = layout.dp_replicate * layout.dp_shard * kw["batch"]
        if global_batch % replicas:
            continue
        for ac in ac_modes:
            try:
                p = plan(arch, *thw, layout=layout, ac=ac, grad_accum=global_batch // replicas, **kw)
            except ValueError:  # tp does not split the MLP, cp does not split the tokens
                continue
            tried += 1
            if p["fits"]:
                fits.append(p)
    fits.sort(key=lambda p: p["step_s"])
    rows = [
        {
            "layout": str(Layout(**{k: p["layout"][k] for k in ("dp_replicate", "dp_shard", "cp", "tp")})),
            "ac": p["settings"]["ac"],
            "grad_accum": p["settings"]["grad_accum"],
            "memory_gib": p["memory_gib"],
            "step_s": p["step_s"],
            "mfu": p["mfu"],
            "cp_ulysses_x_ring": f"{p['layout']['cp_ulysses']}x{p['layout']['cp_ring']}",
        }
        for p in fits[:top]
    ]
    best = fits[0] if fits else None
    return {
        "gpus": gpus,
        "global_batch": global_batch,
        "tried": tried,
        "fitting": len(fits),
        "ranked": rows,
        "best": best,
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("preset")
    p.add_argument("--frames", type=int, help="latent frames T (default: the preset's usual size)")
    p.add_argument("--height", type=int, help="latent height H")
    p.add_argument("--width", type=int, help="latent width W")
    p.add_argument("--text-len", type=int, default=512, help="caption tokens (default 512)")
    p.add_argument("--batch", type=int, default=1, help="samples per data-parallel rank per micro-step")
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    p.add_argument("--gpus", type=int, required=True, help="GPU count (the layout's product)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--layout", help="dp_shard=8,cp=8[,tp=…,dp_replicate=…] (default: dp_shard=--gpus)")
    p.add_argument(
        "--ac",
        help="activation checkpointing: none|full|every_K|selective (default none; "
        "--fit without --ac tries " + ", ".join(FIT_AC) + ")",
    )
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per step (not with --fit)")
    p.add_argument(
        "--global-batch",
        type=int,
        help="--fit: samples per optimizer step that every layout is planned at (default --gpus × --batch)",
    )
    p.add_argument("--engine", default="fsdp", choices=["fsdp", "deepspeed"])
    p.add_argument("--zero-stage", type=int, default=2, choices=[1, 2, 3])
    p.add_argument("--no-ema", action="store_true", help="no fp32 EMA of the weights")
    p.add_argument("--cpu-offload", action="store_true")
    p.add_argument("--no-sequence-parallel", action="store_true")
    p.add_argument("--fit", action="store_true", help="rank the layouts that fit --gpus by step time")
    p.add_argument("--top", type=int, default=20, help="--fit: rows to print")
    return p


def main(argv: list[str] | None = None) -> None:
    p = _parser()
    a = p.parse_args(argv)
    try:
        arch = get_preset(a.preset)
    except KeyError as e:
        p.error(str(e.args[0]))
    if a.gpus < 1:
        p.error(f"--gpus={a.gpus} must be ≥ 1")
    checks = (("--gpus-per-node", a.gpus_per_node, 1), ("--top", a.top, 1), ("--batch", a.batch, 1))
    for flag, value, low in checks + (("--text-len", a.text_len, 0),):
        if value < low:
            p.error(f"{flag}={value} must be ≥ {low}")
    if a.fit and a.layout:
        p.error("--layout: --fit searches the layouts itself; give one or the other")
    thw = tuple(
        v if v is not None else d
        for v, d in zip((a.frames, a.height, a.width), DEFAULT_LATENT_SIZE[a.preset], strict=True)
    )
    if a.ac is not None:
        try:
            checkpoint_blocks(a.ac, arch.depth)
        except ValueError as e:
            p.error(f"--{e}")
    kw = dict(
        batch=a.batch,
        text_len=a.text_len,
        gpu=a.gpu,
        grad_accum=a.grad_accum,
        engine=a.engine,
        zero_stage=a.zero_stage,
        ema=not a.no_ema,
        cpu_offload=a.cpu_offload,
        gpus_per_node=a.gpus_per_node,
        sequence_parallel=not a.no_sequence_parallel,
    )
    try:
        layout = Layout.parse(a.layout) if a.layout else Layout(dp_shard=a.gpus)
    except ValueError as e:
        p.error(f"--layout: {e}")
    if a.fit and a.grad_accum != 1:
        p.error("--grad-accum: --fit derives it from --global-batch for each layout")
    if a.global_batch is not None and (not a.fit or a.global_batch < 1):
        p.error(f"--global-batch={a.global_batch}: a positive number, with --fit")
    if layout.world != a.gpus:
        p.error(f"--layout {layout} covers {layout.world} GPUs, --gpus={a.gpus}")
    try:
        if a.fit:
            modes = (a.ac,) if a.ac else FIT_AC
            kw.pop("grad_accum")
            result = fit(arch, thw, a.gpus, modes, a.global_batch or a.gpus * a.batch, top=a.top, **kw)
        else:
            result = plan(arch, *thw, layout=layout, ac=a.ac or "none", **kw)
    except ValueError as e:
        p.error(f"--{e}")
    json.dump({"preset": a.preset, "frames": thw[0], "height": thw[1], "width": thw[2], **result}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
