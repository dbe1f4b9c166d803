"""Sample quality against sampler, step count and CFG scale, measured with the probe (``data.probe``).

    python -m benchmarks.quality RUN_OR_EXPORT [--samplers euler,heun,dpm++2m,ddim] [--steps 4,8,16,32,50]
        [--cfg 1,2,4,6] [--prompts 32] [--seed 0] [--out benchmarks/results/quality-DATE.md]

For a model trained on the built-in dataset (a run directory, a checkpoint or an export; EMA weights when
the run kept them), it draws ``--prompts`` held-out captions in :mod:`data.synthetic`'s grammar (moving
clips; an index range far beyond any training set the demo draws), samples every prompt with a fixed seed
under each configuration, and scores the videos with :func:`data.probe.score`:

* the quality-per-step table: every sampler × step count at the run's ``sample.cfg``;
* the CFG table: every ``--cfg`` scale at the run's ``sample.sampler`` and ``sample.steps``.

Each row has the probe's accuracies (colour, background, shape, direction, speed, overall), the centroid
track's jerk, the network evaluations per sample (counted, CFG's two branches in one batched call) and
the wall-clock seconds per sample (sampling and decoding). The same prompts and the same noise go into
every row, so rows differ only by the sampler. This is the reference for few-step distillation: the
quality a distilled 4-step sampler has to reach. Writes a dated markdown report and the same numbers as
JSON next to it (``quality-DATE.json``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import report
from data.encoders import TextEncoder, build_codec
from data.probe import ATTRIBUTES, score
from data.synthetic import describe
from dit.diffusion import make_objective
from dit.sampling import SAMPLER_NAMES
from launch.batches import bf16_compute, encoder_dtype
from launch.config import SampleConfig
from launch.sample import load_for_inference, videos_for
from parallel.checkpoint import CheckpointError

HELD_OUT = 1_000_000
"""First ``data.synthetic`` index the prompts are drawn at: no training set reaches it (the demo's is 544)."""
SOURCE = "RUN_OR_EXPORT"
"""The positional argument's name in usage and error messages."""
COLUMNS = (*ATTRIBUTES, "overall", "found", "jerk", "nfe", "s_per_sample")


def held_out_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` captions of moving clips drawn like :func:`data.synthetic.write_raw` draws, from indices
    :data:`HELD_OUT` onwards (deterministic in ``seed``)."""
    return [describe(np.random.default_rng([seed, HELD_OUT + i]), still=False)["caption"] for i in range(n)]


class _Cached:
    """The text encoder with its output kept per batch of prompts (the same batches recur in every row)."""

    def __init__(self, encoder):
        self.encoder, self.seen = encoder, {}

    def __call__(self, prompts: list[str]):
        key = tuple(prompts)
        if key not in self.seen:
            self.seen[key] = self.encoder(prompts)
        return self.seen[key]


def measure_row(ctx: dict, prompts: list[str], sampler: str, steps: int, cfg: float, batch: int) -> dict:
    """Sample every prompt under one configuration and score the videos with the probe.

    Args:
        ctx: model, objective, arch, codec, text encoder, clip geometry and seed (see :func:`run`).
        prompts: captions; prompt ``i``'s batch starts at seed ``ctx["seed"] + start`` as in
            ``launch.sample``.
        sampler, steps, cfg: the configuration.
        batch: prompts sampled together.
    """
    calls = [0]
    hook = ctx["model"].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    videos, start_time = [], time.perf_counter()
    try:
        for start in range(0, len(prompts), batch):
            videos += list(
                videos_for(
                    ctx["model"],
                    ctx["objective"],
                    ctx["arch"],
                    ctx["codec"],
                    ctx["text"],
                    prompts[start : start + batch],
                    **ctx["geometry"],
                    steps=steps,
                    sampler=sampler,
                    cfg_scale=cfg,
                    seed=ctx["seed"] + start,
                    device=ctx["device"],
                    bf16=ctx["bf16"],
                )
            )
    finally:
        hook.remove()
    seconds = time.perf_counter() - start_time
    batches = -(-len(prompts) // batch)
    r = score(zip(videos, prompts, strict=True))
    return {
        "sampler": sampler,
        "steps": steps,
        "cfg": cfg,
        **r["accuracy"],
        "overall": r["overall"],
        "jerk": r["temporal"]["jerk"],
        "found": r["found"],
        "nfe": calls[0] // batches,
        "s_per_sample": seconds / len(prompts),
    }


def run(
    src: str | Path,
    samplers: list[str],
    steps: list[int],
    cfgs: list[float],
    n_prompts: int,
    seed: int = 0,
    batch: int = 8,
    device: str = "cpu",
) -> dict:
    """Both tables for the model at ``src``; JSON-able: ``config``, ``steps_table``, ``cfg_table``."""
    model, info = load_for_inference(src, device=device)
    arch, defaults = info["arch"], info.get("sample") or SampleConfig()
    if arch.conditioning != "text":
        raise SystemExit(f"{src}: a {arch.conditioning}-conditioned model; the probe needs text prompts")
    bf16 = bf16_compute("auto", device)
    enc_dtype = encoder_dtype(bf16, device)
    ctx = {
        "model": model,
        "objective": make_objective(info["diffusion"]),
        "arch": arch,
        "codec": build_codec(info["codec"], device=device, dtype=enc_dtype),
        "text": _Cached(
            TextEncoder(
                info["text_encoder"],
                info["max_text_len"],
                device,
                enc_dtype,
                encoder_mask=arch.text_encoder_mask,
            )  # fmt: skip
        ),
        "geometry": {
            "frames": defaults.frames,
            "height": defaults.height,
            "width": defaults.width,
            "fps": defaults.fps,
        },
        "seed": seed,
        "device": device,
        "bf16": bf16,
    }
    prompts = held_out_prompts(n_prompts, seed)
    measure_row(ctx, prompts[:1], samplers[0], 1, 1.0, 1)  # warm-up: the first row's time is not setup
    steps_table = [measure_row(ctx, prompts, s, n, defaults.cfg, batch) for s in samplers for n in steps]
    cfg_table = [measure_row(ctx, prompts, defaults.sampler, defaults.steps, c, batch) for c in cfgs]
    config = {
        "source": str(src),
        "step": info.get("step"),
        "prompts": n_prompts,
        "seed": seed,
        "batch": batch,
        "device": device,
        **ctx["geometry"],
        "default_sampler": defaults.sampler,
        "default_steps": defaults.steps,
        "default_cfg": defaults.cfg,
    }
    return {"config": config, "steps_table": steps_table, "cfg_table": cfg_table}


def _cell(value) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def table(rows: list[dict], keys: tuple[str, ...]) -> str:
    """A markdown table of ``keys`` (floats to 3 decimals, None as "–")."""
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def markdown(result: dict, command: str) -> str:
    """The report: header, the quality-per-step table, the CFG table."""
    c = result["config"]
    return (
        "# Sample quality per sampler, step count and CFG scale (probe scores)\n\n"
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}\n"
        f"- hardware: {report.hardware(torch.device(c['device']))}\n"
        f"- versions: {report.versions()}\n"
        f"- command: `{command}`\n"
        f"- model: `{c['source']}` (step {c['step']}), EMA weights when kept\n"
        f"- prompts: {c['prompts']} held-out moving-clip captions (`data.synthetic.describe`, "
        f"seed {c['seed']}, indices from {HELD_OUT}), the same noise in every row "
        f"(seed {c['seed']} + batch start, batch {c['batch']}); "
        f"clips {c['frames']}×{c['height']}×{c['width']} at {c['fps']} fps\n\n"
        "Accuracies are `python -m data.probe`'s (direction and speed over moving clips; a clip without "
        "a visible object is wrong on everything it cannot show; `found`: the share of clips with one). "
        "`jerk` is the centroid track's mean third difference in units of the frame's shorter side "
        "(lower is smoother); `nfe` counts network calls per sample (CFG's two branches run as one "
        "batched call); `s_per_sample` is wall-clock sampling + decoding "
        f"(samplers of `dit.sampling`: {', '.join(SAMPLER_NAMES)}).\n\n"
        f"## Quality per step (CFG {c['default_cfg']})\n\n"
        f"{table(result['steps_table'], ('sampler', 'steps', *COLUMNS))}\n\n"
        f"## CFG scale ({c['default_sampler']}, {c['default_steps']} steps)\n\n"
        f"{table(result['cfg_table'], ('cfg', *COLUMNS))}\n"
    )


def _list(parser: argparse.ArgumentParser, text: str, cast, name: str) -> list:
    """The comma-separated values of flag ``name``; anything else (a word, nothing, nan or inf for a
    number) is a usage error naming the flag (exit status 2)."""
    try:
        values = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        parser.error(f"{name} {text!r}: expected a comma-separated list of numbers")
    if not values:
        parser.error(f"{name} {text!r}: no values")
    if cast is not str and not all(math.isfinite(v) for v in values):
        parser.error(f"{name} {text!r}: every value must be a finite number")
    return values


def _source_error(e: Exception) -> str:
    """The loader's message in this CLI's terms: its ``init.from`` (a training key) is the argument."""
    return str(e).replace("init.from=", f"{SOURCE} ").replace("init.from", SOURCE)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.splitlines()[0])
    p.add_argument("src", metavar=SOURCE, help="run directory, checkpoint or export (built-in data)")
    p.add_argument("--samplers", default=",".join(SAMPLER_NAMES))
    p.add_argument("--steps", default="4,8,16,32,50")
    p.add_argument("--cfg", default="1,2,4,6", help="CFG scales (at the run's sample.sampler and steps)")
    p.add_argument("--prompts", type=int, default=32, help="held-out prompts per row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="report path (default benchmarks/results/quality-DATE.md); JSON beside it")
    a = p.parse_args(argv)
    samplers = _list(p, a.samplers, str, "--samplers")
    for s in samplers:
        if s not in SAMPLER_NAMES:
            p.error(f"--samplers: {s!r} is not one of {', '.join(SAMPLER_NAMES)}")
    steps = _list(p, a.steps, int, "--steps")
    cfgs = _list(p, a.cfg, float, "--cfg")
    if min(steps) < 1 or a.prompts < 1 or a.batch_size < 1 or min(cfgs) < 0:
        p.error("--steps, --prompts and --batch-size must be ≥ 1 and --cfg ≥ 0")
    try:
        result = run(a.src, samplers, steps, cfgs, a.prompts, a.seed, a.batch_size, a.device)
    except (CheckpointError, FileNotFoundError) as e:
        p.error(_source_error(e))
    out = Path(a.out) if a.out else report.RESULTS / f"quality-{dt.date.today().isoformat()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(
        ["python -m benchmarks.quality", *map(shlex.quote, argv if argv is not None else sys.argv[1:])]
    )
    out.write_text(markdown(result, command), encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return out


if __name__ == "__main__":
    main()
