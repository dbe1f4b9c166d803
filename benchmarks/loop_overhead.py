"""Training-loop overhead: the share of step time spent in none of the step's phases.

    python -m benchmarks.loop_overhead [--steps 300] [--shards DIR] [key=value ...]

Trains the ``tiny`` preset through the real CLI (``python -m launch.train``, data workers, metrics,
progress output) with evaluation, samples and periodic checkpoints off, then reads ``metrics.jsonl``:
each record holds the mean ``step_time`` of its logging window and the mean time of each phase
(``data_wait``, ``encode_time``, ``forward_time``, ``backward_time``, ``optim_time``). Overhead =
step_time − Σ phases (metrics, logging, the progress line, Python between phases), reported as a share
of step time over all windows after the first (warm-up). Target: under 5%. Extra ``key=value``
arguments go to the trainer (e.g. ``logging.every=1`` to see the cost of logging every step).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks import report

PHASES = ("data_wait", "encode_time", "forward_time", "backward_time", "optim_time")


def summarise(records: list[dict]) -> dict:
    """Step-time-weighted phase shares and overhead over the windows after the first."""
    windows = [r for r in records if "step_time" in r and r.get("step_time")][1:]
    if not windows:
        raise ValueError("metrics.jsonl has fewer than two logged windows; run more steps")
    step = sum(r["step_time"] for r in windows)
    shares = {p: sum(r[p] or 0.0 for r in windows) / step for p in PHASES}
    overhead = 1.0 - sum(shares.values())
    per_window = [1 - sum(r[p] or 0.0 for p in PHASES) / r["step_time"] for r in windows]
    return {
        "windows": len(windows),
        "mean_step_time_s": step / len(windows),
        "shares": shares,
        "overhead": overhead,
        "overhead_max_window": max(per_window),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.loop_overhead", description=__doc__.splitlines()[0]
    )
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--shards", help="synthetic shards to train on (default: generated in a temp dir)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        shards = a.shards
        if shards is None:
            shards = os.path.join(tmp, "shards")
            subprocess.run(
                [sys.executable, "-m", "data.synthetic", shards, "--num", "256", "--val-num", "0"],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        run_dir = Path(tmp) / "run"
        args = [
            f"run.dir={run_dir}",
            f"data.shards={shards}",
            f"train.steps={a.steps}",
            "eval.every=0",
            "logging.sample_every=0",
            "checkpoint.every=0",
            "logging.tensorboard=true",
            *a.overrides,
        ]
        subprocess.run([sys.executable, "-m", "launch.train", *args], check=True)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    s = summarise(records)
    rows = [{"phase": k, "share of step time": f"{v:.1%}"} for k, v in s["shares"].items()]
    rows.append({"phase": "**loop overhead**", "share of step time": f"**{s['overhead']:.2%}**"})
    body = (
        report.table(rows)
        + f"\n\nMean step time {s['mean_step_time_s'] * 1000:.1f} ms over {s['windows']} logging windows "
        f"(first window excluded as warm-up); worst window overhead {s['overhead_max_window']:.2%}. "
        f"Target: overhead under 5% of step time — {'met' if s['overhead'] < 0.05 else 'NOT met'}.\n"
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = report.write(
        f"loop_overhead-tiny-{device.type}",
        "benchmarks.loop_overhead",
        "Training-loop overhead, tiny preset",
        device,
        {"preset": "tiny (launch/configs/tiny.yaml)", "steps": a.steps, "overrides": " ".join(args[2:])},
        body,
    )
    print(json.dumps({**s, "report": str(path)}, indent=2))


if __name__ == "__main__":
    main()
