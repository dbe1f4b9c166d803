"""Honest resumes and samples (issue 17, item 4), through the CLIs on a real tiny run.

A rerun that changes the learning-rate schedule says so (the keys, the lr of the next step under both
schedules, the overrides that keep the old one); ``train.schedule_steps`` keeps it; an unchanged rerun
says nothing. ``launch.sample --image`` from a model trained with ``train.task_i2v=0`` (its run
directory or its export) warns; from one trained for image-to-video, or of unknown training, it does not.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from launch.config import TrainConfig, load_config, to_yaml
from launch.export import main as export_main
from launch.optim import lr_factor
from launch.resume import schedule_change
from launch.sample import main as sample_main
from launch.train import main as train_main
from tests.launch.conftest import metrics

WARNED = "another learning-rate schedule"
# warmup 1: the resume step (2) is past it, where the two horizons give different lrs
FAST = ["data.num_workers=0", "train.warmup=1", "run.progress=lines", "checkpoint.keep=0"]


def _lrs(run_dir, after: int = 0) -> dict[int, float]:
    """step → logged lr of the records after the first ``after`` (a resumed run appends its own)."""
    return {r["step"]: r["lr"] for r in metrics(run_dir)[after:] if "lr" in r}


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, overrides):
    """(run dir stopped at step 2 of a 3-step run, the lrs of its uninterrupted steps 1-3, its overrides
    without run.dir). Trained to the end, then its step-3 checkpoint removed: what a run stopped after
    its step-2 checkpoint leaves (metrics.jsonl keeps step 3). Trained with train.task_i2v=0."""
    rd = tmp_path_factory.mktemp("honest") / "run"
    args = [*overrides, *FAST, "checkpoint.every=2"]
    train_main([f"run.dir={rd}", *args, "train.steps=3"])
    lrs = _lrs(rd)
    assert sorted(lrs) == [1, 2, 3]
    shutil.rmtree(rd / "checkpoints" / "step-00000003")
    return rd, lrs, args


def _copy(stopped, dest):
    shutil.copytree(stopped[0], dest)
    return dest, len(metrics(dest))


@pytest.mark.slow
def test_a_longer_rerun_names_the_schedule_change_and_its_suggestion_keeps_the_old_one(
    stopped, tmp_path, caplog
):
    _, original, args = stopped
    rd, before = _copy(stopped, tmp_path / "longer")
    with caplog.at_level(logging.INFO):
        train_main([f"run.dir={rd}", *args, "train.steps=4"])
    said = [r for r in caplog.records if WARNED in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING, caplog.text
    line = said[0].getMessage()
    assert "train.steps: 3 → 4" in line and f"{rd}/checkpoints/step-00000002/config.yaml" in line, line
    said = re.search(r"step 3 trains at lr (\S+), where the schedule it trained with gives (\S+) ", line)
    assert said, line
    new = load_config(None, [*args, "train.steps=4"]).train
    old = load_config(None, [*args, "train.steps=3"]).train
    new_lr, old_lr = new.lr * lr_factor(2, new), old.lr * lr_factor(2, old)
    assert abs(new_lr - old_lr) > 0.05 * old_lr  # the two schedules differ here
    assert float(said[1]) == pytest.approx(new_lr, rel=1e-3)
    assert float(said[2]) == pytest.approx(old_lr, rel=1e-3) == original[3]
    assert _lrs(rd, before)[3] == pytest.approx(new_lr, rel=1e-6)  # what it said is what trained
    suggestion = line.split("add to the command: ", 1)[1].split()
    assert suggestion == ["train.schedule_steps=3"]

    # the suggestion as typed, on the stopped run: no warning, the original lr bit for bit, then its last
    rd, before = _copy(stopped, tmp_path / "kept")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="launch.resume"):
        train_main([f"run.dir={rd}", *args, "train.steps=4", *suggestion])
    assert WARNED not in caplog.text
    lrs = _lrs(rd, before)
    assert sorted(lrs) == [3, 4] and lrs[3] == original[3]
    assert lrs[4] == pytest.approx(old.lr * old.min_lr_ratio, rel=1e-6)  # the schedule's final value


@pytest.mark.slow
def test_an_unchanged_rerun_resumes_without_a_word_about_the_schedule(stopped, tmp_path, caplog):
    _, original, args = stopped
    rd, before = _copy(stopped, tmp_path / "same")
    with caplog.at_level(logging.INFO):
        train_main([f"run.dir={rd}", *args, "train.steps=3"])
    assert "resumed from" in caplog.text and WARNED not in caplog.text
    assert _lrs(rd, before) == {3: original[3]}


def test_what_counts_as_a_schedule_change():
    """Only a change of the lrs still to train; each suggestion, applied as typed, removes the warning."""
    base = ["train.steps=100", "train.warmup=10"]
    cfg = load_config(None, base)
    saved = yaml.safe_load(to_yaml(cfg))

    def now(**train):
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))

    cases = [  # (train.* of the rerun, resume step, warns)
        ({}, 50, False),
        ({"lr": 5e-5}, 50, False),  # a new peak alone: ConfigSchedule's own warning
        ({"steps": 40}, 50, False),  # nothing left to train
        ({"steps": 150, "schedule_steps": 100}, 100, False),
        ({"schedule": "constant", "steps": 200}, 100, True),
        ({"steps": 150}, 100, True),
        ({"steps": 150}, 20, True),
        ({"warmup": 20}, 50, True),
        ({"schedule": "wsd"}, 50, True),
        ({"min_lr_ratio": 0.5, "lr": 5e-5}, 50, True),
    ]
    for train, step, warns in cases:
        said = schedule_change(saved, now(**train), step, "runs/x/config.yaml")
        assert bool(said) == warns, (train, said)
        if said:  # the rerun's command line, then what the warning says to add
            typed = [*base, *(f"train.{k}={v}" for k, v in train.items())]
            keep = said.split("add to the command: ", 1)[1].split()
            assert schedule_change(saved, load_config(None, [*typed, *keep]), step, "x") == "", (train, keep)
    # a constant schedule lengthened: the same lrs, no warning
    const = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, schedule="constant"))
    longer = dataclasses.replace(const, train=dataclasses.replace(const.train, steps=200))
    assert schedule_change(yaml.safe_load(to_yaml(const)), longer, 100, "x") == ""
    # a config saved before train.schedule_steps existed: its horizon was train.steps
    old = {**saved, "train": {k: v for k, v in saved["train"].items() if k != "schedule_steps"}}
    assert "train.schedule_steps=100" in schedule_change(old, now(steps=150), 100, "x")


@pytest.mark.parametrize("value", ["0", "-5"])
def test_schedule_steps_out_of_range_is_an_error_naming_the_key(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as stop:
        train_main([f"run.dir={tmp_path / 'r'}", f"train.schedule_steps={value}"])
    assert stop.value.code == 2
    assert f"train.schedule_steps={value}: must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_schedule_steps_spans_the_schedule_and_then_holds_its_final_value():
    for kind in ("cosine", "wsd", "constant"):
        short = TrainConfig(schedule=kind, steps=80, warmup=5)
        long = TrainConfig(schedule=kind, steps=200, warmup=5, schedule_steps=80)
        assert [lr_factor(s, long) for s in range(80)] == [lr_factor(s, short) for s in range(80)]
        final = lr_factor(80, short)  # where the schedule ends (its last step trains just above)
        assert {lr_factor(s, long) for s in range(80, 200)} == {final}
        assert final == (1.0 if kind == "constant" else pytest.approx(short.min_lr_ratio))


# ---- image-to-video from a model not trained for it ---------------------------------------------------
SAMPLE = ["--prompt", "a shape", "--steps", "1", "--frames", "4", "--height", "32", "--width", "32"]
SAMPLE += ["--cfg", "1", "--device", "cpu", "--precision", "fp32"]
I2V_WARNING = "this model was trained with train.task_i2v=0: it never saw a clean first frame"


def _sample(source, tmp_path, capsys, *extra) -> str:
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, :16] = (220, 40, 40)
    Image.fromarray(image).save(tmp_path / "first.png")
    capsys.readouterr()
    sample_main([str(source), *SAMPLE, *extra, "--out", str(tmp_path / "out.mp4")])
    assert (tmp_path / "out.mp4").is_file()
    return capsys.readouterr().err


@pytest.mark.slow
def test_image_to_video_from_a_model_trained_without_it_warns(stopped, tmp_path, capsys, overrides):
    rd, _, args = stopped
    image = ["--image", str(tmp_path / "first.png")]
    err = _sample(rd, tmp_path, capsys, *image)
    assert f"warning: {rd}: {I2V_WARNING}" in err and "train.task_i2v > 0" in err

    export = tmp_path / "export"
    export_main([str(rd), str(export)])
    assert I2V_WARNING in _sample(export, tmp_path, capsys, *image)
    # an export written before train_tasks was recorded still loads, and its training is unknown: no word
    config = json.loads((export / "config.json").read_text())
    assert config["train_tasks"]["task_i2v"] == 0
    del config["train_tasks"]
    (export / "config.json").write_text(json.dumps(config))
    assert "warning" not in _sample(export, tmp_path, capsys, *image)

    i2v = tmp_path / "i2v-run"
    train_main([f"run.dir={i2v}", *args, "train.steps=1", "train.task_i2v=0.5"])
    assert "warning" not in _sample(i2v, tmp_path, capsys, *image)
