"""A user's own clips on the way to training: each wrong turn of the first hour is a short error or
warning that names the key and the command that fixes it, and a small set trains as it is.

- ``data.shards`` naming the clips folder (or a glob of mp4s, or a manifest) instead of shards;
- ``data.val_shards`` naming a folder with only training shards;
- fewer shards than data-parallel ranks (drawn with replacement, one warning);
- clips no bucket takes (an error suggesting ``python -m data.buckets suggest``, exit 2);
- ``data.val_shards`` left at the demo's synthetic set while ``data.shards`` is the user's.
"""

import logging
import shlex
from pathlib import Path

import pytest

from data.buckets import Bucket, BucketConfig
from data.pipeline import DataConfig, NotShards, build_loader, list_shards
from data.shards import list_sources, write_shards
from data.video import encode_h264
from tests.data.conftest import gradient_clip

ROOT = Path(__file__).resolve().parents[2]
BUCKETS = BucketConfig([Bucket(4, 32, 32, 4)], fps=8)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("my clips")  # a space: the suggested command must quote it
    for i in range(3):
        (d / f"c{i}.mp4").write_bytes(encode_h264(gradient_clip(4, 32, 32, seed=i), fps=8))
        (d / f"c{i}.txt").write_text(f"clip {i}")
    return d


@pytest.fixture(scope="module")
def shards(clips, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(list_sources(clips), out, min_shards=1)  # one shard: fewer than two ranks
    return out


def test_clips_where_shards_belong_say_how_to_write_shards(clips, tmp_path):
    (tmp_path / "list.csv").write_text("path,caption\nc0.mp4,a clip\n")
    write = "\nWrite shards first: python -m data.shards write"
    for spec, names in (
        (
            str(clips),
            f"a folder of 3 videos/images, not shards (no train-*.tar in it).{write} '{clips}' OUT (a .txt "
            "caption beside each clip), then data.shards=OUT",
        ),
        (
            f"{clips}/*.mp4",
            f"{clips}/c0.mp4 is a video, not a shard (.tar).{write} '{clips}' OUT, then data.shards=OUT",
        ),
        (
            str(tmp_path / "list.csv"),
            f"list.csv is a manifest, not a shard (.tar).{write} {tmp_path / 'list.csv'} OUT",
        ),
    ):
        with pytest.raises(NotShards) as e:
            list_shards(DataConfig(shards=spec))
        assert str(e.value).startswith(f"data.shards={spec!r}: ") and names in str(e.value)
        assert len(str(e.value).splitlines()) == 2


def test_held_out_key_pointing_at_training_shards_says_prefix_val(shards, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        list_shards(DataConfig(shards=str(shards), prefix="val"), "data.val_shards")
    assert str(e.value) == (
        f"data.val_shards={str(shards)!r}: no val-*.tar in this directory (it holds train-*.tar; val "
        "shards are written by python -m data.shards write SRC OUT --prefix val)"
    )
    with pytest.raises(FileNotFoundError, match=r"no shards found \(no such file or directory\)$"):
        list_shards(DataConfig(shards=str(tmp_path / "typo")))


def test_fewer_shards_than_ranks_draw_with_replacement_and_warn_once(shards, caplog):
    cfg = DataConfig(shards=str(shards), buckets=BUCKETS, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="data.pipeline"):
        loaders = [build_loader(cfg, rank, 2) for rank in range(2)]
    warned = [r.getMessage() for r in caplog.records if "data-parallel ranks" in r.getMessage()]
    assert warned == [
        "data.shards: 1 shard for 2 data-parallel ranks: each rank draws shards with replacement "
        "(data.resampled=true); for exact epochs write >= 2 shards "
        "(python -m data.shards write --min-shards 2)"
    ]
    for loader in loaders:  # every rank trains on the 3 clips of the one shard
        batch = next(iter(loader))
        assert sorted(batch.key) == ["c0", "c1", "c2"] and loader.resampled


def _main(argv, capsys) -> tuple[int, str]:
    from launch.train import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    return stop.value.code, capsys.readouterr().err


def test_trainer_refuses_a_clips_folder_before_building_the_model(clips, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, err = _main(
        [
            "--config",
            str(ROOT / "launch/configs/demo.yaml"),
            f"data.shards={clips}",
            f"run.dir={run_dir}",
            "eval.every=0",
            "eval.sample_metrics=false",
        ],
        capsys,
    )
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"error: data.shards={str(clips)!r}: a folder of 3 videos/images, not shards (no train-*.tar in it).",
        f"Write shards first: python -m data.shards write '{clips}' OUT (a .txt caption beside each clip), "
        "then data.shards=OUT",
    ]
    assert not run_dir.exists()  # stopped before the run directory, the model and the loader


def test_clips_no_bucket_takes_stop_the_trainer_with_the_suggest_command(shards, tmp_path, capsys):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    fast = ["eval.every=0", "data.num_workers=0", "logging.sample_every=0", "train.steps=2"]
    try:  # tiny.yaml's buckets take 8 frames or more at 8 fps: the 4-frame clips fit none
        code, err = _main([f"data.shards={shards}", f"run.dir={tmp_path / 'run'}", *fast], capsys)
        # a path with nothing there: the loader's one line, exit 2
        typo = tmp_path / "typo"
        code_typo, err_typo = _main([f"data.shards={typo}", f"run.dir={tmp_path / 'run2'}", *fast], capsys)
    finally:
        torch.set_num_threads(threads)
    assert code_typo == 2 and "Traceback" not in err_typo
    assert (
        err_typo.splitlines()[-1]
        == f"error: data.shards={str(typo)!r}: no shards found (no such file or directory)"
    )
    assert code == 2 and "Traceback" not in err
    lines = err.splitlines()
    error = lines[[i for i, line in enumerate(lines) if line.startswith("error: ")][0] :]
    assert len(error) == 2, err
    assert error[0].startswith(f"error: data.shards={str(shards)!r}: a whole epoch gave no batch")
    assert "filtered {'shorter_than_any_bucket': 3}" in error[0]
    # the command names the run's codec, patch and fps (tiny.yaml: pixel, 1,1,1, 8), so typed it works
    command = f"python -m data.buckets suggest {shards} --codec pixel --patch 1,1,1 --fps 8 > buckets.json"
    assert error[1] == f"Fix: buckets made for these clips: {command}, then data.bucket_file=buckets.json"
    from data.buckets import main as buckets_main
    from launch.config import load_config

    assert buckets_main(shlex.split(command.split(" > ")[0])[3:]) in (0, None)
    (tmp_path / "buckets.json").write_text(capsys.readouterr().out)
    cfg = load_config(None, [f"data.shards={shards}", f"data.bucket_file={tmp_path / 'buckets.json'}"])
    assert all(b.frames == 4 for b in cfg.data.buckets.buckets)  # the 4-frame clips have a bucket now


def test_held_out_set_left_at_the_demo_is_a_warning(shards, caplog):
    from launch.config import load_config
    from launch.datacheck import check_sources
    from launch.dryrun import check

    demo = str(ROOT / "launch/configs/demo.yaml")
    want = (
        f"data.val_shards='runs/synthetic32' is the built-in demo's held-out set, but data.shards="
        f"{str(shards)!r} is other data: the validation loss and sample metrics would score the demo's "
        "synthetic clips. Set data.val_shards=OUT (held-out clips: python -m data.shards write VAL_FOLDER "
        "OUT --prefix val), or turn validation off: eval.every=0 eval.sample_metrics=false"
    )
    cfg = load_config(demo, [f"data.shards={shards}"])
    assert check(cfg)["warnings"] == [want]  # --dry-run's list
    with caplog.at_level(logging.WARNING, logger="launch.datacheck"):
        check_sources(cfg)  # what the trainer runs first
    assert [r.getMessage() for r in caplog.records] == [want]
    # the demo itself, the user's own held-out set, and validation turned off: nothing to say
    for overrides in (
        [],
        [f"data.shards={shards}", f"data.val_shards={shards}"],
        [f"data.shards={shards}", "eval.every=0", "eval.sample_metrics=false"],
    ):
        assert check(load_config(demo, overrides))["warnings"] == [], overrides


def test_sample_metrics_on_captions_the_probe_cannot_read_is_one_line(clips, shards, tmp_path, capsys):
    """The demo config (sample metrics on) with the user's own held-out clips: nothing can score their
    samples, so the run stops with one line naming eval.sample_metrics, not a traceback (found by review)."""
    fast = ["eval.every=1", "data.num_workers=0", "logging.sample_every=0", "train.steps=1"]
    buckets = "data.buckets.buckets=[{frames: 4, height: 32, width: 32, batch_size: 2}]"
    write_shards(list_sources(clips), tmp_path / "val", prefix="val", min_shards=1)
    argv = [f"data.shards={shards}", f"data.val_shards={tmp_path / 'val'}", f"run.dir={tmp_path / 'r'}"]
    argv += [buckets, *fast]
    code, err = _main(["eval.sample_metrics=true", *argv], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert "is not in the built-in dataset's grammar" in err and "eval.sample_metrics=false" in err
