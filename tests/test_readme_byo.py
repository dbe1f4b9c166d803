"""The README's "Train on your own clips" walkthrough, run as written: its code block's commands, in
order, each as a process, on clips this test writes with PyAV into the folders the block names. Only
overrides that shorten the run are appended (2 steps, 2 sampling steps); the outcomes are checked on
disk: shards with every clip, a bucket file the trainer loads that takes every clip, a checkpoint at
the last step with a validation loss on the held-out clips, and a sample that decodes to the requested
frames with its prompt beside it."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from data.buckets import assign, load_bucket_file
from data.meta import parse_meta
from data.reader import read_shard
from data.stream import Errors
from data.video import encode_h264

ROOT = Path(__file__).resolve().parent.parent
SECTION = "### Train on your own clips"
FAST = {"launch.train": ["train.steps=2", "sample.steps=2"], "launch.sample": ["--steps", "2"]}


def readme_commands() -> list[list[str]]:
    """The commands of the section's first ``bash`` block (continuation lines joined)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(SECTION)
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def write_clips(folder: Path, shapes: list[tuple[int, int, int]], seed: int) -> None:
    """8 fps H.264 clips (a bar moving right over a flat colour) with a caption beside each."""
    folder.mkdir(parents=True)
    for i, (t, h, w) in enumerate(shapes):
        frames = np.zeros((t, h, w, 3), np.uint8)
        frames[...] = np.random.default_rng(seed + i).integers(0, 255, 3, dtype=np.uint8)
        for k in range(t):
            frames[k, :, 3 * k % w : 3 * k % w + 8] = 255
        (folder / f"clip{i}.mp4").write_bytes(encode_h264(frames, 8))
        (folder / f"clip{i}.txt").write_text(f"a white bar moves to the right, clip {i}")


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    assert cmd[0] == "python" and cmd[1] == "-m", cmd
    module = cmd[2]
    extra = FAST.get(module, [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, *cmd[1:], *extra], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{shlex.join(cmd)}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_train_on_your_own_clips_walkthrough(tmp_path):
    cmds = readme_commands()
    modules = ["data.shards", "data.shards", "data.buckets", "launch.train", "launch.sample"]
    assert [c[2] for c in cmds] == modules, cmds
    (tmp_path / "launch").mkdir()
    (tmp_path / "launch" / "configs").symlink_to(ROOT / "launch" / "configs")  # --config launch/configs/…
    write_train, write_val, suggest, train, sample = cmds
    train_src, shards = write_train[4], tmp_path / write_train[5]
    write_clips(tmp_path / train_src, [(12, 48, 64), (16, 48, 64), (20, 64, 48), (24, 48, 64)], seed=0)
    write_clips(tmp_path / write_val[4], [(12, 48, 64), (14, 64, 48)], seed=10)
    (tmp_path / "runs").mkdir(exist_ok=True)

    run(write_train, tmp_path)
    run(write_val, tmp_path)
    assert json.loads((shards / "index.json").read_text())["samples"] == 4
    assert json.loads((shards / "index-val.json").read_text())["samples"] == 2
    assert len(list(shards.glob("train-*.tar"))) == 4 and len(list(shards.glob("val-*.tar"))) == 2

    # "> FILE" is the shell's: the command's stdout goes there
    assert suggest[-2] == ">", suggest
    proc = run(suggest[:-2], tmp_path)
    bucket_file = tmp_path / suggest[-1]
    bucket_file.write_text(proc.stdout)
    buckets = load_bucket_file(str(bucket_file))
    assert buckets.fps == 8 and "fit no bucket: 0" in proc.stderr
    metas = [
        parse_meta(s["json"], 1 << 30) for t in shards.glob("train-*.tar") for s in read_shard(t, Errors())
    ]
    assert len(metas) == 4 and all(assign(m, buckets) is not None for m in metas)

    proc = run(train, tmp_path)
    overrides = dict(a.split("=", 1) for a in train if "=" in a and not a.startswith("-"))
    run_dir = tmp_path / overrides["run.dir"]
    assert (run_dir / "checkpoints" / "step-00000002" / "COMPLETE").is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("step") == 2 and np.isfinite(r.get("val_loss", np.nan)) for r in records), records
    assert "done: 2 steps" in proc.stdout + proc.stderr
    assert "demo's held-out set" not in proc.stderr  # the held-out shards are the user's: no warning

    run(sample, tmp_path)
    opts = dict(zip(sample[4::2], sample[5::2], strict=False))
    out = tmp_path / opts["--out"]
    assert out.with_suffix(".txt").read_text() == opts["--prompt"]
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == int(opts["--frames"])
    assert frames[0].shape == (int(opts["--height"]), int(opts["--width"]), 3)
