"""Fixtures for the trainer tests: a small real synthetic dataset and a CLI runner."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    from data.synthetic import generate

    d = tmp_path_factory.mktemp("synthetic")
    generate(d, num=48, seed=1, val_num=8, samples_per_shard=8, frames=(12, 24))
    return d


@pytest.fixture(scope="session")
def overrides(shards):
    """Fast settings over tiny.yaml: 32 px buckets, 2 data workers, every step logged."""
    return [
        f"data.shards={shards}",
        f"data.val_shards={shards}",
        "data.num_workers=2",
        "data.buckets.fps=8",
        "data.buckets.buckets=[{frames: 4, height: 32, width: 32, batch_size: 2},"
        "{frames: 1, height: 32, width: 32, batch_size: 4}]",
        "sample.frames=4",
        "sample.height=32",
        "sample.width=32",
        "sample.steps=2",
        "train.warmup=2",
        "logging.every=1",
        "eval.every=0",
        "logging.sample_every=0",
        "checkpoint.every=0",
    ]


def train_cmd(run_dir, *extra, overrides=()):
    return [sys.executable, "-m", "launch.train", f"run.dir={run_dir}", *overrides, *extra]


def run(cmd, timeout=300, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, **kw)
    return proc


def metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def losses_by_step(records):
    """step → list of logged losses (a step logged again after a resume appears twice)."""
    out = {}
    for r in records:
        if "loss" in r:
            out.setdefault(r["step"], []).append(r["loss"])
    return out
