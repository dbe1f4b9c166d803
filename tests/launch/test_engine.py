"""The trainer's seams: the engine behind a protocol, step stats named as the metrics record, and the
import directions (parallel/ never imports launch/; DeepSpeed is imported only by its engine)."""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.engine import FsdpEngine, global_samples, mean_loss
from launch.metrics import MEAN_KEYS, Metrics, Progress
from launch.train import StepStats, _update_metrics
from parallel.dims import ParallelDims

ROOT = Path(__file__).resolve().parents[2]


def test_step_stats_fields_are_the_metrics_keys(tmp_path):
    """Every StepStats field reaches the record under its own name, with its own value."""
    names = [f.name for f in dataclasses.fields(StepStats)]
    assert set(names) == set(MEAN_KEYS) - {"step_time", "tflops_per_device", "mfu"} | {"tokens", "flops"}
    values = {name: float(i + 1) for i, name in enumerate(names)}
    stats = StepStats(**values)
    metrics = Metrics(tmp_path, True, torch.device("cpu"), False, Progress(1, "lines"))
    try:
        _update_metrics(metrics, stats, step_time=2.0, peak=None, dev=torch.device("cpu"))
        record = metrics.log(1)
    finally:
        metrics.close()
    for name, value in values.items():
        assert record[name] == pytest.approx(value), name
    assert record["tflops_per_device"] == pytest.approx(values["flops"] / 2.0 / 1e12)
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["encode_time"] == values["encode_time"]


def test_fsdp_engine_step_is_the_clipped_per_sample_mean_and_skips_a_non_finite_loss():
    """One process, two micro-batches: the gradient is that of the per-sample mean over the step's
    samples, clipped to ``grad_clip``; a non-finite loss leaves weights and schedule as they were."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    x = torch.randn(4, 3)
    want = torch.autograd.grad(model(x).square().mean(), [model.weight, model.bias])
    norm = float(torch.cat([g.flatten() for g in want]).norm())
    dims = ParallelDims(1, 1, 1, 1, 1)
    engine = FsdpEngine(model, opt, sched, dims, torch.device("cpu"), grad_clip=norm / 2)
    total = global_samples(4, dims)
    assert total == 4
    for half in (x[:2], x[2:]):
        engine.backward(model(half).square().sum(1), total, last=False)
    torch.testing.assert_close(model.weight.grad, want[0])
    before = model.weight.detach().clone()
    got_norm, applied, lr = engine.update(mean_loss(1.0, total, dims))
    assert applied and lr == 0.1 and got_norm == pytest.approx(norm, rel=1e-6)
    factor = (norm / 2) / (norm + 1e-6)
    torch.testing.assert_close(model.weight.detach(), before - 0.1 * factor * want[0])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)  # the schedule advanced
    engine.backward(model(x).square().sum(1), total, last=True)
    after = model.weight.detach().clone()
    _, applied, _ = engine.update(float("nan"))
    assert not applied and torch.equal(model.weight.detach(), after)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05) and model.weight.grad is None


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_parallel_never_imports_launch():
    upward = {
        f"{p.name}: {m}"
        for p in (ROOT / "parallel").glob("*.py")
        for m in _imports(p)
        if m.startswith("launch")
    }
    assert not upward


@pytest.mark.slow
def test_the_trainer_imports_deepspeed_only_for_its_engine():
    code = (
        "import sys, launch.train; "
        "print(sorted(m for m in sys.modules if m.startswith(('deepspeed', 'launch.engine_'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    assert "launch.train" not in _imports(ROOT / "launch" / "engine_deepspeed.py")
