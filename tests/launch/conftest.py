"""Fixtures for the trainer tests: a small real synthetic dataset and a CLI runner."""

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import time

import pytest
import torch

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


def start(cmd, **popen_kw):
    """Start a CLI in its own session (so a test can signal or kill its whole process group)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, **popen_kw)


def wait_for(predicate, proc, timeout=180):
    """Poll until ``predicate()`` holds; False if ``proc`` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def _every_step_once(run_dir, steps) -> dict[int, float]:
    """step → loss of a finished uninterrupted run that logged each of its ``steps`` steps."""
    want = {s: v[0] for s, v in losses_by_step(metrics(run_dir)).items()}
    assert sorted(want) == list(range(1, steps + 1))
    return want


def reference_losses(cmd, steps):
    """step → loss of an uninterrupted run of ``cmd`` (which must log every step)."""
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _every_step_once(next(a.split("=", 1)[1] for a in cmd if a.startswith("run.dir=")), steps)


def assert_same_losses(run_dir, want, context=""):
    """Every step logged exactly as in the reference, bit for bit, including steps logged twice
    (once before an interruption and again after the resume)."""
    got = losses_by_step(metrics(run_dir))
    assert sorted(got) == sorted(want), context
    for step, values in got.items():
        assert all(v == want[step] for v in values), (step, values, want[step])


@contextlib.contextmanager
def one_thread():
    """One torch thread, as the CLI subprocesses run (``OMP_NUM_THREADS=1``): a run in this process then
    computes the same bits as a subprocess does."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def train_in_process(run_dir, *args, config=None) -> str:
    """``python -m launch.train run.dir=RUN_DIR ARGS [--config CONFIG]`` in this process, with one thread
    (for CI time: an interpreter start-up less). For runs whose process boundary is not what a test
    checks: references, reruns after an interruption, runs that only make a checkpoint. Returns what the
    run logged (the lines the CLI prints to stderr, from INFO up)."""
    from launch.config import load_config
    from launch.train import run as train

    logged = io.StringIO()
    handler = logging.StreamHandler(logged)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)  # what the CLI's logging.basicConfig sets
    try:
        with one_thread():
            train(load_config(config, [f"run.dir={run_dir}", *args]))
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return logged.getvalue()


def reference_losses_in_process(run_dir, *args, steps: int) -> dict[int, float]:
    """:func:`reference_losses` of ``train_cmd(run_dir, *args)``, run by :func:`train_in_process`."""
    train_in_process(run_dir, *args)
    return _every_step_once(run_dir, steps)


def torchrun_cmd(run_dir, *extra, overrides=()):
    """``train_cmd`` under torchrun: 2 CPU processes (gloo) on this machine."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return [*torchrun, *train_cmd(run_dir, *extra, overrides=overrides)[1:]]  # from "-m launch.train" on


PREEMPT_STEPS = 30
PREEMPT_RUN = (f"train.steps={PREEMPT_STEPS}", "checkpoint.every=0")
"""The preemption tests' runs under torchrun (test_torchrun's and the SLURM requeue's): long enough that
a signal sent after step 2 lands mid-run however slowly the machine runs."""


@pytest.fixture(scope="session")
def torchrun_reference(tmp_path_factory, overrides) -> dict[int, float]:
    """step → loss of ``PREEMPT_RUN`` uninterrupted under torchrun (2 ranks): the reference of both
    preemption tests, run once per session (CI time: one torchrun start-up less)."""
    rd = tmp_path_factory.mktemp("torchrun-reference") / "run"
    return reference_losses(torchrun_cmd(rd, *PREEMPT_RUN, overrides=overrides), PREEMPT_STEPS)
