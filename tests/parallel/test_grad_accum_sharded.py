"""Gradient accumulation under FSDP2 accumulates sharded gradients (2 gloo ranks, dp_shard=2).

Between micro-steps, and after the last, every block parameter's ``.grad`` is a Shard(0) DTensor of
which this rank holds half the elements, and FSDP holds no unsharded gradient (the fp32 buffers that
``set_requires_gradient_sync(False)`` keeps: +53 GiB per GPU for 14B at grad_accum=2); the losses and
weights after two steps of grad_accum=2 equal one process's (fp32, 1e-5). A control run that skips the
first micro-step's reduce-scatter shows the inspection does see unsharded gradients when they exist.
"""

from __future__ import annotations

import pytest
import torch

from tests.parallel.grad_accum_worker import ACCUM, STEPS, train, worker
from tests.parallel.group import run_group

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from data.synthetic import generate

    shards = tmp_path_factory.mktemp("shards")
    generate(shards, num=16, seed=1, samples_per_shard=8, frames=(12, 24))
    run_dir = tmp_path_factory.mktemp("run")
    overrides = [
        f"data.shards={shards}", f"run.dir={run_dir}", "data.num_workers=0", "data.buckets.fps=8",
        "data.buckets.buckets=[{frames: 4, height: 32, width: 32, batch_size: 2}]",
        "train.steps=1", f"train.grad_accum={ACCUM}", "parallel.dp_shard=2", "eval.every=0",
        "logging.sample_every=0", "checkpoint.every=0", "train.ema_decay=0",
    ]  # fmt: skip
    cases = [
        ("reduce_scatter_every_micro_step", "loop", False),
        ("control_no_sync_first", "loop", True),
        ("trainer", "trainer", overrides),
    ]
    return run_group(2, worker, cases, tmp_path_factory.mktemp("accum"), names=[c[0] for c in cases])


def _assert_sharded(seen: dict) -> None:
    assert seen["sharded"], seen
    assert seen["unsharded"] == 0, seen
    # dim-0 shards of odd-sized parameters may differ by a row: about half, never the whole
    assert abs(seen["local"] - seen["full"] / 2) <= 0.02 * seen["full"], seen


def test_the_trainer_keeps_gradients_sharded_between_micro_steps(results):
    got = results["trainer"]
    assert "error" not in got, got.get("error")
    assert len(got["seen"]) == ACCUM
    for seen in got["seen"]:
        _assert_sharded(seen)


def test_gradients_stay_sharded_between_micro_steps(results):
    got = results["reduce_scatter_every_micro_step"]
    assert "error" not in got, got.get("error")
    assert len(got["seen"]) == STEPS * ACCUM
    for seen in got["seen"]:
        _assert_sharded(seen)


def test_sharded_accumulation_matches_one_process(results):
    got = results["reduce_scatter_every_micro_step"]
    want = train(world=1)
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-5)
    assert want["losses"][0] != want["losses"][1]  # the first step changed the weights
    for name, w in want["weights"].items():
        err = float((got["weights"][name] - w).abs().max() / w.abs().max().clamp(min=1e-12))
        assert err < 1e-5, (name, err)


def test_inspection_sees_unsharded_gradients_when_sync_is_skipped(results):
    got = results["control_no_sync_first"]
    assert "error" not in got, got.get("error")
    first_micro = got["seen"][0]
    assert first_micro["unsharded"] > 0 and not first_micro["sharded"]
    assert got["seen"][1]["unsharded"] == 0  # the last micro-step reduce-scatters them
    assert torch.tensor(got["losses"]).isfinite().all()
