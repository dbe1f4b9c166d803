"""Resuming at an epoch's end: a checkpoint taken on the last batch of an epoch saves "epoch e, all
consumed"; the rerun must roll over to epoch e + 1 (not stop with "a whole epoch gave no batch"),
and log the same losses, bit for bit, as a run that never stopped.

A tiny dataset (4 clips, batches of 2: a 2-batch epoch) keeps the runs few and short; the schedule is
constant after warmup, so a rerun with a larger ``train.steps`` has the learning rates of the
reference."""

import pytest
import torch

from data.pipeline import build_loader
from data.synthetic import generate
from launch.config import load_config
from tests.launch.conftest import (
    assert_same_losses,
    reference_losses_in_process,
    run,
    train_cmd,
    train_in_process,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_overrides(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("epoch-data")
    generate(d, num=4, seed=2, samples_per_shard=2, frames=(24, 32), image_fraction=0.0)
    return [
        f"data.shards={d}",
        "data.num_workers=1",
        "data.shuffle_buffer=4",
        "data.buckets.fps=8",
        "data.buckets.buckets=[{frames: 4, height: 32, width: 32, batch_size: 2}]",
        "train.schedule=constant",
        "train.warmup=1",
        "logging.every=1",
        "eval.every=0",
        "logging.sample_every=0",
        "checkpoint.every=0",
    ]


@pytest.fixture(scope="module")
def epoch_length(tiny_overrides) -> int:
    """Batches (= optimizer steps, grad_accum 1) in epoch 0, from the trainer's own loader config."""
    cfg = load_config(None, tiny_overrides)
    assert cfg.train.grad_accum == 1
    loader = build_loader(cfg.data)
    n = 0
    for _ in loader:
        if loader.epoch > 0:
            break
        n += 1
    assert n == 2, "the dataset was made for a 2-batch epoch"
    return n


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_overrides, epoch_length) -> dict:
    steps = 2 * epoch_length
    rd = tmp_path_factory.mktemp("epoch-ref") / "run"
    # in this process (CI time); the resumes under test are processes of their own
    return reference_losses_in_process(rd, *tiny_overrides, f"train.steps={steps}", steps=steps)


def test_resume_at_every_step_including_each_epoch_end(tmp_path, tiny_overrides, epoch_length, reference):
    """Each run adds one step to the same run dir (``train.steps=k``, then ``k + 1``), so every step
    boundary is a resume, among them a stop exactly at the end of epoch 0 and of epoch 1.

    Odd runs are processes of their own, even ones run in this process (CI time): every run in this
    process resumes from a checkpoint another process wrote, so what it resumes comes from the disk."""
    rd = tmp_path / "run"
    for steps in range(1, 2 * epoch_length + 1):
        if steps % 2:
            proc = run(train_cmd(rd, f"train.steps={steps}", overrides=tiny_overrides))
            assert proc.returncode == 0, (steps, proc.stderr[-3000:])
            logged = proc.stderr
        else:
            logged = train_in_process(rd, *tiny_overrides, f"train.steps={steps}")
        if steps > 1:
            assert f"resumed from {rd / 'checkpoints'}" in logged
        if steps == epoch_length:  # the case this guards: saved as "epoch 0, every batch consumed"
            own = torch.load(rd / "checkpoints" / f"step-{steps:08d}" / "rank-00000.pt", weights_only=True)
            assert own["loader"]["epoch"] == 0 and own["loader"]["consumed"] == [epoch_length]
    assert_same_losses(rd, reference, "one step per run")
