"""A few clips fine-tune with the default settings: the writer spreads them over shards, the loader uses
only as many workers as a rank has shards, and the last short batch of each bucket is let through, so
an epoch gives every sample once. Real H.264 clips, written by the real ``python -m data.shards``."""

import itertools
import json
import logging
import subprocess
import sys

import pytest
import torch

from data.buckets import Bucket, BucketConfig
from data.pipeline import DataConfig, build_loader
from data.shards import list_sources, write_shards
from data.video import encode_h264
from tests.data.conftest import gradient_clip

# 8 fps: an 8-frame clip fills only the 8-frame bucket, a 16-frame clip the 16-frame one; neither fills a
# batch of 4 with two clips
BUCKETS = BucketConfig([Bucket(8, 32, 32, 4), Bucket(16, 32, 32, 4)], fps=8)
KEYS = ["clip0", "clip1", "clip2", "clip3"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("four")
    for i, frames in enumerate((8, 16, 8, 16)):
        (d / f"clip{i}.mp4").write_bytes(encode_h264(gradient_clip(frames, 32, 32, seed=i), fps=8))
        (d / f"clip{i}.txt").write_text(f"clip number {i}")
    return d


def _write(src, out, *flags) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "data.shards", "write", str(src), str(out), *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((out / "index.json").read_text())


@pytest.fixture(scope="module")
def default_shards(clips, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    return out, _write(clips, out)


def _epoch(loader) -> list[dict]:
    """The batches of the loader's first epoch."""
    out, it = [], iter(loader)
    while True:
        batch = next(it)
        if loader.epoch > 0:
            return out
        out.append(batch)


def test_the_writer_spreads_a_small_folder_over_shards(default_shards, clips, tmp_path):
    _, index = default_shards  # the default --min-shards 8: never more shards than samples
    assert [s["samples"] for s in index["shards"]] == [1, 1, 1, 1] and index["samples"] == 4
    index = _write(clips, tmp_path / "two", "--min-shards", "2")
    assert [s["samples"] for s in index["shards"]] == [2, 2]
    index = write_shards(list_sources(clips), tmp_path / "lib", max_samples=3)  # the library: min_shards=1
    assert [s["samples"] for s in index["shards"]] == [3, 1]


def test_four_clips_over_two_buckets_give_every_sample_once_per_epoch(default_shards):
    shards, _ = default_shards
    cfg = DataConfig(shards=str(shards), buckets=BUCKETS)  # default workers, drop_partial off
    loader = build_loader(cfg)
    assert loader.num_workers == cfg.num_workers == 2
    batches = _epoch(loader)
    assert sorted(k for b in batches for k in b.key) == KEYS
    for b in batches:  # each worker's stream ends its buckets with short batches, tensors of their length
        n, frames = len(b.key), int(b.bucket.split("x")[0])
        assert 1 <= n < 4 and b.video.shape[:3] == (n, 3, frames) and b.fps.shape == (n,)


@pytest.mark.slow
def test_one_shard_uses_one_worker_and_says_so(clips, tmp_path, caplog):
    out = tmp_path / "one"
    assert len(_write(clips, out, "--min-shards", "1")["shards"]) == 1
    with caplog.at_level(logging.INFO, logger="data.pipeline"):
        loader = build_loader(DataConfig(shards=str(out), buckets=BUCKETS))
    assert loader.num_workers == 1
    assert "data.num_workers=2 -> 1: 1 shard for 1 rank" in caplog.text
    assert sorted(k for b in _epoch(loader) for k in b.key) == KEYS


def test_drop_partial_drops_the_short_batches(default_shards):
    shards, _ = default_shards
    cfg = DataConfig(shards=str(shards), buckets=BUCKETS, num_workers=0, drop_partial=True)
    with pytest.raises(ValueError, match="no batch.*too few for a batch with data.drop_partial=true"):
        next(iter(build_loader(cfg)))
    both = BucketConfig([Bucket(8, 32, 32, 2), Bucket(16, 32, 32, 3)], fps=8)  # 8-frame bucket fills
    loader = build_loader(DataConfig(shards=str(shards), buckets=both, num_workers=0, drop_partial=True))
    batches = _epoch(loader)
    assert [sorted(b.key) for b in batches] == [["clip0", "clip2"]]
    filtered = collections_sum(s["filtered"] for s in loader.errors_before)
    assert filtered == {"partial_batch": 2}  # the two 16-frame clips wait for the next epoch


def collections_sum(dicts) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


@pytest.mark.parametrize("workers,split", [(2, 3), (0, 5)])
def test_exact_resume_across_short_batches(default_shards, workers, split):
    shards, _ = default_shards
    # batch 3 in each bucket: each epoch ends with short batches, in every worker's stream
    buckets = BucketConfig([Bucket(8, 32, 32, 3), Bucket(16, 32, 32, 3)], fps=8)
    cfg = DataConfig(shards=str(shards), buckets=buckets, num_workers=workers, random_crop=True)
    ref = list(itertools.islice(iter(build_loader(cfg)), 8))  # two epochs and more
    first = build_loader(cfg)
    it = iter(first)
    head = list(itertools.islice(it, split))
    resumed = build_loader(cfg)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got = head + list(itertools.islice(iter(resumed), 8 - split))
    assert [b.key for b in got] == [b.key for b in ref]
    assert all(torch.equal(x.video, y.video) for x, y in zip(got, ref, strict=True))


def test_held_out_shards_are_named_as_data_val_shards(default_shards):
    shards, _ = default_shards  # train-*.tar only: no val-*.tar in it
    val = DataConfig(shards=str(shards), prefix="val", buckets=BUCKETS, num_workers=0)
    with pytest.raises(FileNotFoundError, match=r"^data.val_shards=.*: no val-\*\.tar in this directory"):
        build_loader(val, key="data.val_shards")
    with pytest.raises(ValueError, match=r"^data.val_shards is empty"):
        build_loader(DataConfig(shards="", buckets=BUCKETS), key="data.val_shards")
