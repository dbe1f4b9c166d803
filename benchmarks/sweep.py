"""Scaling-law sweeps: plan a grid of model sizes × compute budgets (× learning rates × parametrisations),
run it locally or as one SLURM job array, collect the results for ``benchmarks.scaling``.

    python -m benchmarks.sweep plan GRID.yaml OUT_DIR
    python -m benchmarks.sweep run OUT_DIR --local [--procs N]
    python -m benchmarks.sweep run OUT_DIR --slurm --gpus-per-node G --time T [--procs N] [--partition P]
        [--account A] [--max-parallel K] [--dry-run]
    python -m benchmarks.sweep collect OUT_DIR          # → OUT_DIR/results.jsonl
    python -m benchmarks.scaling fit OUT_DIR/results.jsonl --out OUT_DIR/fit

A run is an ordinary training job (``launch.train``) with its own ``run.dir`` under ``OUT_DIR/runs/``;
running the sweep again resumes unfinished runs from their checkpoints and skips finished ones. Model
sizes follow one family rule (``hidden_size = width``, ``depth = width / aspect``, ``num_heads = width
/ head_dim``, MLP ×4), so one number names a size. A budget of C FLOPs becomes ``steps = round(C /
F)`` where F is the expected model FLOPs of one optimizer step under the bucket mix of the training
shards (measured from their metadata: the share of batches each bucket gets), so a run spends C
within half a step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from data.buckets import assign
from data.meta import MetaError, parse_meta
from data.pipeline import limits, list_shards
from data.reader import read_shard
from data.stream import Errors
from dit.flops import count
from dit.model import SpacetimeDiT
from launch.config import CONFIG_DIR, JobConfig, load_config

SAMPLE_KEYS = ("fid", "fvd", "clip_score")
"""Sample-metric keys of a run's final record that a results row carries (with every ``probe_*``)."""
EMBEDDINGS = ("patch_embed.", "pos_embed.", "t_embedder.", "fps_embedder.", "label_embed.", "text_proj.")


@dataclass
class Grid:
    """A sweep grid (``GRID.yaml``); unknown keys are errors."""

    base_config: str = ""
    """Training config every run starts from (default: ``launch/configs/tiny.yaml``)."""
    overrides: list[str] = field(default_factory=list)
    """``key=value`` overrides for every run (data paths, eval batches, …)."""
    widths: list[int] = field(default_factory=list)
    """Model sizes by hidden width."""
    aspect: int = 32
    """Width per block: depth = max(1, round(width / aspect))."""
    head_dim: int = 32
    """Head width: num_heads = width / head_dim."""
    budgets: list[float] = field(default_factory=list)
    """Training compute budgets in model FLOPs (``dit.flops``: 3 × forward per sample)."""
    steps: list[int] = field(default_factory=list)
    """Fixed training lengths instead of budgets (for learning-rate transfer: every width trains
    the same steps on the same data)."""
    lrs: list[float] = field(default_factory=list)
    """Peak learning rates to try (empty: the base config's ``train.lr``)."""
    parametrizations: list[str] = field(default_factory=lambda: ["standard"])
    """``standard`` and/or ``mup``."""
    mup_base_width: int = 0
    """μP base width (0: the smallest width of the grid)."""
    procs: int = 1
    """Data-parallel processes per run (the global batch, and so the FLOPs of a step, scale with it)."""


def load_grid(path: str | os.PathLike) -> Grid:
    try:
        raw = OmegaConf.load(path)
        grid = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Grid), raw))
    except Exception as e:  # OmegaConf's errors name the key; add the file
        raise ValueError(f"{path}: {e}") from e
    if not grid.widths or bool(grid.budgets) == bool(grid.steps):
        raise ValueError(f"{path}: list widths, and either budgets (FLOPs) or steps")
    for w in grid.widths:
        if w % grid.head_dim:
            raise ValueError(f"{path}: width {w} is not a multiple of head_dim={grid.head_dim}")
    return grid


def family(width: int, grid: Grid) -> list[str]:
    """The architecture overrides of one size of the family."""
    depth = max(1, round(width / grid.aspect))
    return [
        f"model.arch.hidden_size={width}",
        f"model.arch.depth={depth}",
        f"model.arch.num_heads={width // grid.head_dim}",
        f"model.arch.ffn_dim={4 * width}",
    ]


def non_embedding_params(arch) -> int:
    """Parameters outside the input embeddings (Kaplan et al.'s N): blocks, modulation, final layer."""
    import torch

    with torch.device("meta"):
        model = SpacetimeDiT(arch)
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(EMBEDDINGS))


def bucket_mix(cfg: JobConfig) -> dict[str, float]:
    """Share of optimizer-step batches per bucket, from the training shards' metadata (no decoding)."""
    buckets = cfg.data.buckets
    samples = {b.name: 0 for b in buckets.buckets}
    lim = limits(cfg.data)
    for shard in list_shards(cfg.data):
        # the loader's own reader and sidecar schema: the same size limits, no crash on a bad sample
        for sample in read_shard(shard, Errors(), lim):
            try:
                meta = parse_meta(sample["json"], lim.max_pixels) if "json" in sample else None
            except MetaError:
                continue
            found = assign(meta, buckets) if meta else None
            if found is not None:
                samples[found.bucket.name] += 1
    batches = {b.name: samples[b.name] / b.batch_size for b in buckets.buckets}
    if buckets.image_ratio is not None:  # the loader holds image batches at this share
        images = {b.name for b in buckets.buckets if b.frames == 1}
        for group, share in ((images, buckets.image_ratio), (set(batches) - images, 1 - buckets.image_ratio)):
            total = sum(batches[n] for n in group)
            for n in group:
                batches[n] = share * batches[n] / total if total else 0.0
    total = sum(batches.values())
    if total == 0:
        raise ValueError(f"data.shards={cfg.data.shards}: no sample fits any bucket of data.buckets")
    return {n: v / total for n, v in batches.items() if v > 0}


def step_cost(cfg: JobConfig, mix: dict[str, float], procs: int) -> tuple[float, float]:
    """Expected (latent tokens, model FLOPs) of one optimizer step of ``cfg`` under ``mix``."""
    from data.encoders import build_codec

    comp = build_codec(cfg.data.codec).compression
    text_len = cfg.data.max_text_len if cfg.model.arch.conditioning == "text" else 0
    per_step = cfg.train.grad_accum * procs
    tokens = flops = 0.0
    for b in cfg.data.buckets.buckets:
        if b.name not in mix:
            continue
        t, h, w = comp.latent_frames(b.frames), b.height // comp.spatial, b.width // comp.spatial
        c = count(cfg.model.arch, t, h, w, batch=b.batch_size, text_len=text_len)
        tokens += mix[b.name] * c["tokens"]
        flops += mix[b.name] * c["flops_train_step"]
    return tokens * per_step, flops * per_step


def plan(grid_path: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Expand the grid into runs and write ``OUT_DIR/plan.json``."""
    grid, out = load_grid(grid_path), Path(out_dir).resolve()
    base = str(Path(grid.base_config).resolve()) if grid.base_config else str(CONFIG_DIR / "tiny.yaml")
    mup_base = grid.mup_base_width or min(grid.widths)
    mix = bucket_mix(load_config(base, grid.overrides))
    runs = []
    for param in grid.parametrizations:
        for width in grid.widths:
            arch = family(width, grid) + [f"model.arch.parametrization={param}"]
            if param == "mup":
                arch.append(f"model.arch.mup_base_width={mup_base}")
            cfg = load_config(base, grid.overrides + arch)
            tokens, flops = step_cost(cfg, mix, grid.procs)
            lengths = [(b, max(1, round(b / flops))) for b in grid.budgets]
            lengths += [(s * flops, s) for s in grid.steps]
            for budget, steps in lengths:
                for lr in grid.lrs or [cfg.train.lr]:
                    size = f"c{budget:.0e}".replace("+", "") if grid.budgets else f"s{steps}"
                    name = f"{param}-w{width}-{size}-lr{lr:g}"
                    keys = _run_keys(out / "runs" / name, steps, lr, cfg.train.warmup)
                    overrides = grid.overrides + arch + keys
                    runs.append(
                        {
                            "name": name, "index": len(runs), "width": width, "depth": cfg.model.arch.depth,
                            "parametrization": param, "lr": lr, "budget": budget, "steps": steps,
                            "params": non_embedding_params(cfg.model.arch), "tokens_per_step": tokens,
                            "flops_per_step": flops, "tokens": steps * tokens, "flops": steps * flops,
                            "overrides": overrides,
                        }
                    )  # fmt: skip
    result = {"grid": asdict(grid), "base_config": base, "bucket_mix": mix, "runs": runs}
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


def _run_keys(run_dir: Path, steps: int, lr: float, warmup: int) -> list[str]:
    # validation once, at the end (the fitted loss); every step logged, so collect can sum the exact
    # tokens and FLOPs a run saw; warmup kept below a fifth of the shortest run
    return [
        f"run.dir={run_dir}",
        f"train.steps={steps}",
        f"train.lr={lr}",
        f"train.warmup={min(warmup, steps // 5)}",
        f"eval.every={steps}",
        "logging.every=1",
        "logging.sample_every=0",
        "run.progress=lines",
    ]


def read_plan(out_dir: str | os.PathLike) -> dict:
    path = Path(out_dir) / "plan.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no plan (make one: python -m benchmarks.sweep plan GRID.yaml DIR)")
    return json.loads(path.read_text(encoding="utf-8"))


def status(run: dict) -> dict:
    """What a run's directory says: ``ok`` (finished with a final validation loss), ``failed`` (its
    last attempt exited non-zero), ``incomplete`` (started, not finished) or ``pending``."""
    run_dir = Path(_value(run["overrides"], "run.dir"))
    attempts = _jsonl(run_dir / "attempts.jsonl")
    records = {r["step"]: r for r in _jsonl(run_dir / "metrics.jsonl")}  # a re-logged step: the last
    final = records.get(run["steps"], {})
    if final.get("val_loss") is not None:
        state = "ok"
    elif attempts and attempts[-1].get("exit", 0) != 0:
        state = "failed"
    else:
        state = "incomplete" if (records or attempts) else "pending"
    steps = [r for s, r in sorted(records.items()) if s <= run["steps"]]
    return {
        "status": state,
        "loss": final.get("val_loss"),
        "tokens": sum(r.get("tokens", 0.0) for r in steps),
        "flops": sum(r.get("flops", 0.0) for r in steps),
        "wall_s": sum(a["end"] - a["start"] for a in attempts if "end" in a),
        "steps_done": max(records, default=0),
    } | sample_scores(final)


def sample_scores(record: dict) -> dict:
    """The sample metrics of a metrics record (``eval.sample_metrics``: ``probe_*``, ``fid``, ``fvd``,
    ``clip_score``), for ``benchmarks.scaling fit --target``."""
    return {k: v for k, v in record.items() if k.startswith("probe_") or k in SAMPLE_KEYS}


def collect(out_dir: str | os.PathLike) -> list[dict]:
    """Write ``OUT_DIR/results.jsonl``: one object per planned run, failed ones included (with their
    status; ``benchmarks.scaling`` skips them)."""
    rows, plan_ = [], read_plan(out_dir)
    for run in plan_["runs"]:
        seen = status(run)
        keys = ("name", "width", "depth", "parametrization", "lr", "budget", "steps", "params")
        row = {k: run[k] for k in keys}
        row.update(seen)
        if seen["status"] != "ok":  # planned amounts, so the row still says what the run was
            row.update(tokens=run["tokens"], flops=run["flops"])
        rows.append(row)
    path = Path(out_dir) / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    if len({r["lr"] for r in rows}) > 1:
        by = "steps" if plan_["grid"]["steps"] else "budget"
        (Path(out_dir) / "lr_table.md").write_text(lr_table(rows, by), encoding="utf-8")
    return rows


def lr_table(rows: list[dict], by: str = "budget") -> str:
    """Final validation loss by width × learning rate, one table per parametrisation and ``by``
    (``budget``, or ``steps`` for a fixed-length grid), the best learning rate of each width in bold:
    does the optimum stay put as the width grows (μP)?"""
    out = []
    for param in sorted({r["parametrization"] for r in rows}):
        for length in sorted({r[by] for r in rows if r["parametrization"] == param}):
            mine = [r for r in rows if r["parametrization"] == param and r[by] == length]
            lrs = sorted({r["lr"] for r in mine})
            title = f"{length:.3g} FLOPs" if by == "budget" else f"{length} steps"
            out += [
                f"### {param}, {title}",
                "",
                "| width | " + " | ".join(f"lr {x:g}" for x in lrs) + " | best |",
            ]
            out.append("|---" * (len(lrs) + 2) + "|")
            for width in sorted({r["width"] for r in mine}):
                by_lr = {r["lr"]: r["loss"] for r in mine if r["width"] == width and r["loss"] is not None}
                best = min(by_lr, key=by_lr.get) if by_lr else None
                cells = [
                    "–" if x not in by_lr else f"**{by_lr[x]:.4f}**" if x == best else f"{by_lr[x]:.4f}"
                    for x in lrs
                ]
                out.append(f"| {width} | {' | '.join(cells)} | {'–' if best is None else f'{best:g}'} |")
            out.append("")
    return "\n".join(out)


def _value(overrides: list[str], key: str) -> str:
    return [o.split("=", 1)[1] for o in overrides if o.startswith(key + "=")][-1]


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---- running ------------------------------------------------------------------------------------------
def _train_argv(plan_: dict, run: dict, procs: int) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
    head = launcher if procs > 1 else [sys.executable]
    return [*head, "-m", "launch.train", "--config", plan_["base_config"], *run["overrides"]]


def run_local(out_dir: str | os.PathLike) -> int:
    """Run every unfinished run, one after another; returns how many failed."""
    plan_ = read_plan(out_dir)
    failed = 0
    for run in plan_["runs"]:
        if status(run)["status"] == "ok":
            continue
        run_dir = Path(_value(run["overrides"], "run.dir"))
        run_dir.mkdir(parents=True, exist_ok=True)
        print(f"[{run['index'] + 1}/{len(plan_['runs'])}] {run['name']}: {run['steps']} steps", flush=True)
        start = time.time()
        code = subprocess.run(_train_argv(plan_, run, plan_["grid"]["procs"])).returncode
        _attempt(run_dir, start, code)
        failed += code != 0
    return failed


def _attempt(run_dir: Path, start: float, code: int) -> None:
    with open(run_dir / "attempts.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"start": start, "end": time.time(), "exit": code}) + "\n")


def slurm_argv(
    out_dir: str | os.PathLike,
    *,
    gpus_per_node: int,
    time_limit: str,
    partition: str | None = None,
    account: str | None = None,
    job_name: str | None = None,
    max_parallel: int = 0,
    signal_lead: int = 120,
) -> list[str]:
    """The sbatch command of one job array over the unfinished runs (array index = run index); [] when
    every run has finished.

    Args:
        out_dir: The sweep directory (``plan.json``); the array's logs go to its ``slurm-logs/``.
        gpus_per_node: GPUs each array task asks for (0: none, a CPU sweep).
        time_limit: SLURM time limit of each array task (``H:MM:SS``).
        partition: SLURM partition (None: the cluster's default).
        account: SLURM account (None: the user's default).
        job_name: Name of the array job (None: ``sweep-<directory name>``).
        max_parallel: Array tasks running at once (0: no limit).
        signal_lead: Seconds before the time limit at which SLURM signals a task to checkpoint.
    """
    from launch.slurm.__main__ import sbatch_argv

    out = Path(out_dir).resolve()
    plan_ = read_plan(out)
    todo = [r["index"] for r in plan_["runs"] if status(r)["status"] != "ok"]
    if not todo:
        return []
    spec = ",".join(map(str, todo)) + (f"%{max_parallel}" if max_parallel else "")
    # launch.slurm's sbatch_argv reads its own `submit` options from a namespace
    ns = argparse.Namespace(
        nodes=1, gpus_per_node=gpus_per_node, procs_per_node=plan_["grid"]["procs"], time=time_limit,
        partition=partition, account=account, job_name=job_name or f"sweep-{out.name}",
        signal_lead=signal_lead, log_dir=out / "slurm-logs", module="benchmarks.sweep", array=spec,
        config=None, overrides=[], program_args=["task", str(out)],
    )  # fmt: skip
    return sbatch_argv(ns)


def task(out_dir: str | os.PathLike, index: int | None) -> None:
    """One run of the plan inside a (SLURM array) job, under torchrun: ``SLURM_ARRAY_TASK_ID`` picks it."""
    from launch import train

    if index is None:
        index = int(os.environ["SLURM_ARRAY_TASK_ID"])
    plan_ = read_plan(out_dir)
    run = plan_["runs"][index]
    cfg = load_config(plan_["base_config"], run["overrides"])
    start, code = time.time(), 1
    try:
        train.run(cfg)
        code = 0
    finally:
        if int(os.environ.get("RANK", "0")) == 0:
            _attempt(Path(cfg.run.dir), start, code)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pl = sub.add_parser("plan", help="expand GRID.yaml into OUT_DIR/plan.json")
    pl.add_argument("grid")
    pl.add_argument("out_dir")
    rn = sub.add_parser("run", help="run the unfinished runs")
    rn.add_argument("out_dir")
    where = rn.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true")
    where.add_argument("--slurm", action="store_true")
    rn.add_argument("--gpus-per-node", type=int, default=0)
    rn.add_argument("--time", default="1:00:00", help="time limit of each array task")
    rn.add_argument("--partition")
    rn.add_argument("--account")
    rn.add_argument("--job-name")
    rn.add_argument("--max-parallel", type=int, default=0, help="array tasks running at once (0: any)")
    rn.add_argument("--signal-lead", type=int, default=120)
    rn.add_argument("--dry-run", action="store_true", help="print the sbatch command only")
    co = sub.add_parser("collect", help="write OUT_DIR/results.jsonl")
    co.add_argument("out_dir")
    tk = sub.add_parser("task", help=argparse.SUPPRESS)
    tk.add_argument("out_dir")
    tk.add_argument("--index", type=int)
    a = p.parse_args(argv)
    if a.cmd == "plan":
        result = plan(a.grid, a.out_dir)
        for r in result["runs"]:
            print(f"{r['name']:>36}  N {r['params']:>11,}  steps {r['steps']:>6}  C {r['flops']:.3g}")
        return 0
    if a.cmd == "collect":
        rows = collect(a.out_dir)
        bad = [r for r in rows if r["status"] != "ok"]
        print(f"{len(rows) - len(bad)} finished, {len(bad)} not: {', '.join(r['name'] for r in bad) or '-'}")
        return 0
    if a.cmd == "task":
        task(a.out_dir, a.index)
        return 0
    if a.local:
        return 1 if run_local(a.out_dir) else 0
    argv_ = slurm_argv(
        a.out_dir, gpus_per_node=a.gpus_per_node, time_limit=a.time, partition=a.partition,
        account=a.account, job_name=a.job_name, max_parallel=a.max_parallel, signal_lead=a.signal_lead,
    )  # fmt: skip
    if not argv_:
        print("every run has finished")
        return 0
    if a.dry_run:
        print(" ".join(argv_))
        return 0
    (Path(a.out_dir) / "slurm-logs").mkdir(exist_ok=True)
    proc = subprocess.run(argv_, capture_output=True, text=True)
    sys.stderr.write(proc.stderr)
    print(proc.stdout.strip().split(";")[0])
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
