"""Training on latent shards: a sample encoded for another model (another VAE's channels) is one
counted skip for the loader, never a crash in the trainer."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import webdataset as wds

pytestmark = pytest.mark.slow


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def test_a_latent_of_foreign_channels_is_skipped_and_training_runs_to_the_end(tmp_path):
    from data.synthetic import generate

    generate(tmp_path / "raw", num=8, seed=1, samples_per_shard=8, frames=(12, 24))
    (tmp_path / "b.json").write_text(json.dumps({"fps": 8, "buckets": [[4, 32, 32, 1], [1, 32, 32, 1]]}))
    lat = tmp_path / "lat"
    encode = [sys.executable, "-m", "data.encode", str(tmp_path / "raw"), str(lat)]
    encode += ["--buckets", str(tmp_path / "b.json")]  # the pixel codec, MiniLM: tiny.yaml's encoders
    proc = subprocess.run(encode, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((lat / "index.json").read_text())["samples"] == 8
    # the first sample again, as a 16-channel VAE would have encoded it: its json agrees with it
    sample = next(iter(wds.WebDataset(str(lat / "train-r000-000000.tar"), shardshuffle=False)))
    meta = json.loads(sample["json"])
    _, t, h, w = meta["latent_shape"]
    meta["latent_shape"] = [16, t, h, w]
    foreign = {k: v for k, v in sample.items() if not k.startswith("__")}
    foreign.update({"__key__": "foreign", "json": json.dumps(meta).encode()})
    foreign["latent.npy"] = _npy(np.zeros((16, t, h, w), np.float32))
    with wds.TarWriter(str(lat / "train-r001-000000.tar")) as sink:
        sink.write(foreign)

    steps = 10  # more than an epoch: the foreign sample is read whatever the order
    bucket = "{{frames: {}, height: 32, width: 32, batch_size: 1}}"
    buckets = f"[{bucket.format(4)}, {bucket.format(1)}]"
    cmd = [sys.executable, "-m", "launch.train", f"run.dir={tmp_path / 'run'}", f"data.shards={lat}"]
    cmd += [
        f"data.val_shards={lat}",
        "data.num_workers=2",
        "data.buckets.fps=8",
        f"data.buckets.buckets={buckets}",
    ]
    cmd += [
        "sample.frames=4",
        "sample.height=32",
        "sample.width=32",
        "train.warmup=2",
        f"train.steps={steps}",
    ]
    cmd += ["logging.every=1", "eval.every=0", "logging.sample_every=0", "checkpoint.every=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "run" / "metrics.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    assert max(r["step"] for r in records if "loss" in r) == steps
    assert "skipping foreign in train-r001-000000.tar: shape_mismatch" in proc.stderr
    assert "C=16 (expected 48)" in proc.stderr
