"""A shard's file name is never a command: a file called ``pipe:touch PWNED; …`` that a glob or a
directory listing finds is read as a tar, by the loader, the trainer, the loader benchmark and the
encoder. Only ``pipe:`` entries written in ``data.shards`` itself run, and only with allow_pipe.

The end-to-end runs also carry bad samples in that shard, so each CLI shows it survives them."""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from data.pipeline import DataConfig, list_shards
from data.stream import Errors, read_shard
from data.synthetic import generate
from tests.data.conftest import audio_only_mp4, bomb_png, image_sample, video_sample

ROOT = Path(__file__).resolve().parents[2]
EVIL = "pipe:touch PWNED; cat train-000000.tar #.tar"  # one valid file name: no slash in it
BUCKETS = {"fps": 8, "buckets": [[4, 32, 32, 2], [1, 32, 32, 1]]}


def _bad_samples() -> list[dict]:
    fast = video_sample("fast_fps", fps="fast")  # TypeError in bucket assignment before the schema
    latin1 = video_sample("latin1_caption")
    latin1["txt"] = "café".encode("latin-1")
    audio = video_sample("audio_only")
    audio["mp4"] = audio_only_mp4()
    deep = video_sample("deep_json")
    deep["json"] = "[" * 100_000 + "]" * 100_000
    bomb = bomb_png(20000, 20000)
    return [
        fast,
        latin1,
        audio,
        deep,
        image_sample("bomb", bomb, 20000, 20000),
        image_sample("bomb_liar", bomb, 32, 32),
    ]


def _append(path: Path, samples: list[dict]) -> None:
    with tarfile.open(path, "a") as tar:
        for s in samples:
            for ext, value in s.items():
                if ext == "__key__":
                    continue
                data = value.encode() if isinstance(value, str) else value
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def evil_dir(tmp_path_factory) -> Path:
    """``train-000000.tar`` (4 clips) and a tar named EVIL (4 clips + 6 bad samples)."""
    d = tmp_path_factory.mktemp("evil")
    generate(d / "gen", num=8, seed=3, samples_per_shard=4, frames=(24, 32), image_fraction=0.0)
    shutil.move(d / "gen" / "train-000000.tar", d / "train-000000.tar")
    shutil.move(d / "gen" / "train-000001.tar", d / EVIL)
    shutil.rmtree(d / "gen")
    _append(d / EVIL, _bad_samples())
    (d / "buckets.json").write_text(json.dumps(BUCKETS))
    return d


@pytest.fixture(autouse=True)
def no_marker(evil_dir):
    """Each test starts without the marker, so a marker found is that test's own doing."""
    (evil_dir / "PWNED").unlink(missing_ok=True)


def _read_all(cfg: DataConfig) -> set[str]:
    keys = set()
    for shard in list_shards(cfg):
        keys |= {s["__key__"] for s in read_shard(shard, Errors())}
    return keys


@pytest.mark.parametrize("spec", ["*.tar", f"train-000000.tar,{EVIL}"])
def test_a_listed_file_named_pipe_is_read_as_a_file(evil_dir, monkeypatch, spec):
    monkeypatch.chdir(evil_dir)
    keys = _read_all(DataConfig(shards=spec, allow_pipe=True))  # even opted in to pipes
    assert not (evil_dir / "PWNED").exists()
    assert len(keys) == 14 and "fast_fps" in keys  # both tars read as tars


def test_a_directory_named_pipe_is_a_directory(evil_dir, tmp_path, monkeypatch):
    d = tmp_path / "pipe:touch PWNED #"
    d.mkdir()
    shutil.copy(evil_dir / "train-000000.tar", d / "train-000000.tar")
    monkeypatch.chdir(tmp_path)
    assert len(_read_all(DataConfig(shards="pipe:touch PWNED #", allow_pipe=True))) == 4
    assert not (tmp_path / "PWNED").exists()


def test_pipe_entries_written_in_data_shards_run_only_when_allowed(evil_dir):
    spec = f"{evil_dir}/train-000000.tar,pipe:cat '{evil_dir}/{EVIL}'"
    with pytest.raises(ValueError, match="data.allow_pipe=true"):
        list_shards(DataConfig(shards=spec))
    shards = list_shards(DataConfig(shards=spec, allow_pipe=True))
    assert [s.pipe for s in shards] == [False, True]
    assert len(_read_all(DataConfig(shards=spec, allow_pipe=True))) == 14
    with pytest.raises(TypeError, match="a command, not a file"):
        os.fspath(shards[1])


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_train_reads_a_pipe_named_shard_as_a_file_and_skips_its_bad_samples(evil_dir, tmp_path):
    proc = _run(
        [
            sys.executable,
            "-m",
            "launch.train",
            f"run.dir={tmp_path / 'run'}",
            'data.shards="*.tar"',
            "data.allow_pipe=true",  # even opted in: a globbed file is a file
            "data.num_workers=0",
            "data.buckets.fps=8",
            "data.buckets.buckets=[{frames: 4, height: 32, width: 32, batch_size: 2},"
            "{frames: 1, height: 32, width: 32, batch_size: 1}]",
            "train.steps=2",
            "train.warmup=1",
            "eval.every=0",
            "logging.sample_every=0",
            "checkpoint.every=0",
        ],
        evil_dir,
    )
    assert not (evil_dir / "PWNED").exists()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data: 14 samples read" in proc.stdout  # 4 + 4 clips and 6 bad samples, from both tars
    for reason in ("'bad_metadata': 2", "'bad_caption': 1", "'too_many_pixels': "):
        assert reason in proc.stdout, proc.stdout[-2000:]


@pytest.mark.slow
def test_loader_benchmark_reads_a_pipe_named_shard_as_a_file(evil_dir):
    proc = _run(
        [sys.executable, "-m", "benchmarks.dataloader", "--shards", "*.tar", "--buckets", "buckets.json"]
        + ["--workers", "0", "--batches", "2", "--no-report"],
        evil_dir,
    )
    assert not (evil_dir / "PWNED").exists()
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.splitlines()[0])["errors"]
    assert {k: errors[k] for k in ("bad_metadata", "bad_caption", "too_many_pixels")} == {
        "bad_metadata": 2,
        "bad_caption": 1,
        "too_many_pixels": errors["too_many_pixels"],
    } and errors["too_many_pixels"] >= 1


@pytest.mark.slow
def test_encode_reads_a_pipe_named_shard_as_a_file_and_skips_its_bad_samples(evil_dir, tmp_path):
    out = tmp_path / "latents"
    proc = _run(
        [sys.executable, "-m", "data.encode", "*.tar", str(out), "--buckets", "buckets.json"], evil_dir
    )
    assert not (evil_dir / "PWNED").exists()
    assert proc.returncode == 0, proc.stderr[-3000:]
    index = json.loads((out / "index.json").read_text())
    assert index["samples"] == 8
    assert index["ranks"][0]["skipped"] == {
        "bad_metadata": 2,
        "bad_caption": 1,
        "too_many_pixels": 2,
        "no_video_stream": 1,
    }
