"""End-to-end trainer tests through the CLI, with real shards, data workers and DCP checkpoints."""

import dataclasses
import os
import signal
import subprocess

import av
import pytest
import torch

from dit.diffusion import make_objective
from launch import evaluate
from launch.batches import Conditioner
from launch.config import load_config
from launch.sample import load_for_inference
from tests.launch.conftest import (
    assert_same_losses,
    losses_by_step,
    metrics,
    reference_losses_in_process,
    run,
    start,
    train_cmd,
    train_in_process,
    wait_for,
)

pytestmark = pytest.mark.slow


KEYS = {
    "step",
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "step_time",
    "data_wait",
    "tflops_per_device",
    "mfu",
}


def test_run_writes_config_metrics_checkpoints_samples_and_tensorboard(tmp_path, overrides):
    rd = tmp_path / "run"
    extra = [
        "train.steps=6",
        "logging.every=2",
        "eval.every=3",
        "eval.batches=2",
        "checkpoint.every=3",
        "checkpoint.keep=1",
        "logging.sample_every=6",
    ]
    proc = run(train_cmd(rd, *extra, overrides=overrides))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"done: 6 steps in {rd}" in proc.stdout

    saved = load_config(rd / "config.yaml")
    assert (
        saved.train.steps == 6
        and saved.model.arch.in_channels == 48
        and saved.data.shards == overrides[0][12:]
    )

    recs = metrics(rd)
    logged = [r for r in recs if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4, 6]
    for r in logged:
        assert (
            KEYS | {"max_memory"} <= r.keys() and r["loss"] > 0 and r["tokens_per_s"] > 0 and r["mfu"] is None
        )
    val = {r["step"]: r["val_loss"] for r in recs if "val_loss" in r}
    assert sorted(val) == [3, 6]
    # the logged number is the validation loss of the EMA weights saved at step 6, scored again here
    model, info = load_for_inference(rd, use_ema=True)
    assert info["step"] == 6  # the step of the checkpoint it read (reports name it)
    cond = Conditioner(saved, torch.device("cpu"))
    held_out = evaluate.held_out_batches(saved, 0, 1)
    again = evaluate.validation_loss(model, make_objective(saved.diffusion), cond, held_out, saved, 0)
    assert abs(val[6] - again) <= 1e-5 * again and val[3] != val[6], (val, again)

    ckpts = sorted(p.name for p in (rd / "checkpoints").iterdir())
    assert ckpts == ["step-00000006"]  # keep=1 pruned step 3
    assert (rd / "checkpoints" / "step-00000006" / "COMPLETE").is_file()

    for i in range(2):
        with av.open(str(rd / "samples" / f"step-00000006-{i}.mp4")) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(frames) == 4 and frames[0].shape == (32, 32, 3)
        # the prompt beside it, so the folder can be scored as it is (python -m data.probe score)
        assert (rd / "samples" / f"step-00000006-{i}.txt").read_text(
            encoding="utf-8"
        ) == saved.sample.prompts[i]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(rd / "tb"))
    acc.Reload()
    assert {"train/loss", "val/loss", "train/tokens_per_s"} <= set(acc.Tags()["scalars"])
    assert "samples/0" in acc.Tags()["images"]

    # a longer run continues it (in this process: CI time; the checkpoint is the CLI process's)
    logged = train_in_process(rd, *overrides, *extra[:-1], "train.steps=8")
    assert "resumed from" in logged and "(step 6)" in logged, logged[-3000:]
    assert [r["step"] for r in metrics(rd) if "loss" in r][-2:] == [6, 8]


def test_config_errors_name_the_key(tmp_path, capsys):
    """The command line exits 2 naming the key (one real process); the other kinds of bad key through
    the same ``main`` in this process (an interpreter start-up less each)."""
    from launch.train import main

    proc = run(train_cmd(tmp_path / "r", "train.stepz=3"))
    assert proc.returncode == 2 and "train.stepz" in proc.stderr, proc.stderr
    for bad, key in (("train.steps=abc", "train.steps"), ("run.device=tpu", "run.device")):
        with pytest.raises(SystemExit) as stop:
            main([f"run.dir={tmp_path / 'r'}", bad])
        assert stop.value.code == 2 and key in capsys.readouterr().err


def test_sigkill_after_a_checkpoint_then_rerun_gives_the_same_losses_bit_for_bit(tmp_path, overrides):
    """Exact resume: model, optimizer, scheduler, EMA, RNG and the data workers' position. The killed run
    is a process of its own; the reference and the rerun run in this process (CI time)."""
    extra = ["train.steps=14", "checkpoint.every=5", "checkpoint.keep=0"]
    want = reference_losses_in_process(tmp_path / "ref", *overrides, *extra, steps=14)

    rd = tmp_path / "killed"
    killed = start(
        train_cmd(rd, *extra, overrides=overrides), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    marker = rd / "checkpoints" / "step-00000005" / "COMPLETE"
    assert wait_for(marker.is_file, killed), "the run ended before its first checkpoint"
    os.killpg(killed.pid, signal.SIGKILL)  # the trainer and its data workers, no chance to clean up
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    before = losses_by_step(metrics(rd))
    assert max(before) < 14

    train_in_process(rd, *overrides, *extra)
    assert_same_losses(rd, want)


def test_non_finite_steps_are_skipped_then_abort(tmp_path, overrides):
    from launch.train import setup

    cfg = load_config(
        None, [f"run.dir={tmp_path / 'run'}", *overrides, "data.num_workers=0", "run.max_bad_steps=3"]
    )
    tr = setup(cfg)
    batch = next(iter(tr.loader))
    poisoned = dataclasses.replace(batch, video=torch.full_like(batch.video, float("nan")))
    before = [p.detach().clone() for p in tr.model.parameters()]
    stats = tr.train_step(iter([poisoned]))
    assert stats.loss != stats.loss and tr.skipped == 1 and tr.step == 1
    assert all(torch.equal(a, p) for a, p in zip(before, tr.model.parameters(), strict=True))
    stats = tr.train_step(iter([batch]))  # a good step resets the streak and moves the weights
    assert tr.bad_streak == 0 and not all(
        torch.equal(a, p) for a, p in zip(before, tr.model.parameters(), strict=True)
    )
    tr.train_step(iter([poisoned]))
    tr.train_step(iter([poisoned]))
    with pytest.raises(FloatingPointError, match="run.max_bad_steps=3"):
        tr.train_step(iter([poisoned]))
    assert tr.skipped == 4
