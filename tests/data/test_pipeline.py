import collections
import io
import itertools
import json
import logging
import tarfile

import numpy as np
import pytest
import torch

from data.buckets import Bucket, BucketConfig
from data.pipeline import DataConfig, build_loader, split_shards
from data.synthetic import generate
from data.video import encode_h264
from tests.data.conftest import gradient_clip, write_tar

# Every synthetic clip (≥ 8 frames at ≤ 30 fps) covers 2 frames at 8 fps.
BUCKETS = [Bucket(1, 32, 32, 2), Bucket(2, 32, 32, 2), Bucket(4, 32, 32, 2)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    generate(out, num=48, seed=0, samples_per_shard=4)  # 12 shards
    return out


def cfg_for(path, **kw):
    base = {"shards": str(path), "buckets": BucketConfig(BUCKETS, fps=8), "num_workers": 0, "seed": 1}
    return DataConfig(**{**base, **kw})


def _keys(batch_iter, n):
    return [tuple(b.key) for b in itertools.islice(batch_iter, n)]


def _one_epoch(loader):
    it = iter(loader)
    out = []
    while True:
        b = next(it)
        if loader.epoch > 0:
            return out, b
        out.append(b)


@pytest.mark.slow
def test_batches_have_the_documented_layout(shards):
    batch = next(iter(build_loader(cfg_for(shards))))
    b, c, t, h, w = batch.video.shape
    assert (
        (c, h, w) == (3, 32, 32) and batch.bucket == f"{t}x32x32" and b == len(batch.key) == len(batch.text)
    )
    assert batch.video.dtype == torch.float32 and batch.video.min() >= -1 and batch.video.max() <= 1
    assert batch.fps.shape == (b,) and all(isinstance(s, str) and s for s in batch.text)


def test_shard_split_is_disjoint_and_complete():
    shards = [f"s{i}" for i in range(23)]
    for dp_size, workers in ((1, 1), (2, 3), (4, 2)):
        parts = [
            split_shards(shards, 0, 5, r, dp_size, w, workers, False)
            for r in range(dp_size)
            for w in range(workers)
        ]
        flat = [s for p in parts for s in p]
        assert sorted(flat) == sorted(shards) and len(flat) == len(set(flat))
    assert split_shards(shards, 0, 1, 0, 2, 0, 1, False) != split_shards(shards, 0, 2, 0, 2, 0, 1, False)


@pytest.mark.slow
def test_data_parallel_ranks_see_disjoint_samples_covering_the_epoch(shards):
    per_rank = []
    for rank in range(2):
        loader = build_loader(
            cfg_for(
                shards,
                buckets=BucketConfig([Bucket(1, 32, 32, 1), Bucket(2, 32, 32, 1)], fps=8),
                num_workers=2,
            ),
            rank,
            2,
        )
        batches, _ = _one_epoch(loader)
        per_rank.append({k for b in batches for k in b.key})
    assert not per_rank[0] & per_rank[1]
    assert len(per_rank[0] | per_rank[1]) == 48


def test_tensor_parallel_peers_get_identical_batches(shards):
    # ranks of one TP/CP group share a data-parallel rank, so they build identical loaders
    a = list(itertools.islice(iter(build_loader(cfg_for(shards, num_workers=2), 1, 2)), 4))
    b = list(itertools.islice(iter(build_loader(cfg_for(shards, num_workers=2), 1, 2)), 4))
    assert [x.key for x in a] == [y.key for y in b]
    assert all(torch.equal(x.video, y.video) for x, y in zip(a, b, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("workers,split", [(2, 5), (3, 11), (0, 7)])
def test_exact_resume_with_workers(shards, workers, split):
    cfg = cfg_for(shards, num_workers=workers, shuffle_buffer=8, random_crop=True)
    ref = list(itertools.islice(iter(build_loader(cfg)), 20))  # crosses an epoch boundary
    first = build_loader(cfg)
    it = iter(first)
    head = list(itertools.islice(it, split))
    state = json.loads(json.dumps(first.state_dict()))  # plain data, checkpointable anywhere
    resumed = build_loader(cfg)
    resumed.load_state_dict(state)
    tail = list(itertools.islice(iter(resumed), 20 - split))
    got = head + tail
    assert [b.key for b in got] == [b.key for b in ref]
    assert all(torch.equal(x.video, y.video) for x, y in zip(got, ref, strict=True))


def test_changed_data_parallel_size_restarts_the_epoch(shards, caplog):
    loader = build_loader(cfg_for(shards), 0, 2)
    it = iter(loader)
    _one_epoch(loader)
    next(it)
    state = loader.state_dict()
    assert state["epoch"] >= 1
    fresh = build_loader(cfg_for(shards), 0, 1)
    with caplog.at_level(logging.WARNING):
        fresh.load_state_dict(state)
    assert "restarting epoch" in caplog.text
    fresh_ref = build_loader(cfg_for(shards), 0, 1)
    fresh_ref.epoch = state["epoch"]
    assert _keys(iter(fresh), 5) == _keys(iter(fresh_ref), 5)


def _sample(key, frames=8, caption="ok", ext="mp4", meta_frames=None):
    data = encode_h264(gradient_clip(frames, 32, 32), fps=8)
    meta = {
        "kind": "video",
        "frames": meta_frames if meta_frames is not None else frames,
        "fps": 8.0,
        "width": 32,
        "height": 32,
        "duration": frames / 8,
    }
    s = {"__key__": key, ext: data, "json": json.dumps(meta)}
    if caption is not None:
        s["txt"] = caption
    return s


def test_each_bad_input_is_skipped_and_counted(tmp_path):
    good = [_sample(f"good{i}") for i in range(6)]
    write_tar(
        tmp_path / "train-000000.tar",
        good[:3] + [_sample("nocap", caption=None), _sample("zero", meta_frames=0)],
    )
    write_tar(tmp_path / "train-000001.tar", good[3:] + [_sample("weird", ext="gif"), _sample("good0")])
    broken = _sample("broken")
    broken["mp4"] = b"\x00" * 500
    write_tar(tmp_path / "train-000002.tar", [broken, _sample("tail")])
    with tarfile.open(tmp_path / "train-000002.tar") as tar:
        cut = next(m.offset_data for m in tar.getmembers() if m.name == "tail.mp4") + 100
    data = (tmp_path / "train-000002.tar").read_bytes()
    (tmp_path / "train-000002.tar").write_bytes(data[:cut])  # truncated inside the last sample
    cfg = cfg_for(tmp_path, buckets=BucketConfig([Bucket(4, 32, 32, 1)], fps=8), error_threshold=1.0)
    loader = build_loader(cfg)
    batches, _ = _one_epoch(loader)
    keys = sorted(k for b in batches for k in b.key)
    assert keys == sorted(f"good{i}" for i in range(6))
    epoch0 = collections.Counter()  # the finished epoch exactly (epoch 1 has begun)
    for worker_summary in loader.errors_before:
        epoch0.update(worker_summary["skipped"])
    assert dict(epoch0) == {
        "missing_caption": 1,
        "zero_frames": 1,
        "unknown_extension": 1,
        "duplicate_key": 1,
        "undecodable": 1,
        "truncated_tar": 1,
    }
    assert loader.error_summary()["examples"]["missing_caption"] == "train-000000.tar:nocap"


def test_error_rate_threshold_aborts_naming_the_worst_shard(tmp_path):
    write_tar(tmp_path / "train-000000.tar", [_sample(f"g{i}") for i in range(8)])
    write_tar(tmp_path / "train-000001.tar", [_sample(f"b{i}", caption=None) for i in range(4)])
    cfg = cfg_for(
        tmp_path,
        buckets=BucketConfig([Bucket(4, 32, 32, 1)], fps=8),
        min_samples_for_threshold=10,
        shuffle_buffer=0,
    )
    with pytest.raises(
        RuntimeError, match=r"exceeds data.error_threshold=5%.*worst shards: train-000001.tar \(\d\)"
    ):
        list(itertools.islice(iter(build_loader(cfg)), 20))


def test_start_up_checks(tmp_path, shards):
    with pytest.raises(FileNotFoundError, match=r"^data.shards=.*: no train-\*\.tar in this directory"):
        build_loader(cfg_for(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"data.shards=.*: no shards found"):
        build_loader(cfg_for(tmp_path / "*.tar"))
    with pytest.raises(ValueError, match="data.shards is empty"):
        build_loader(cfg_for(""))
    with pytest.raises(ValueError, match="allow_pipe"):
        build_loader(cfg_for("pipe:curl http://x/{0..9}.tar"))
    assert build_loader(cfg_for(shards, num_workers=1), 0, 16).resampled  # 12 shards, 16 ranks: drawn
    assert build_loader(cfg_for(shards, num_workers=4), 3, 4).num_workers == 3  # 12 shards, 3 a rank
    assert build_loader(cfg_for(shards, num_workers=2), 3, 4).num_workers == 2
    loader = build_loader(cfg_for(shards, num_workers=4, resampled=True), 0, 16)
    assert loader.num_workers == 4 and next(iter(loader)).video.ndim == 5
    with pytest.raises(ValueError, match="batch_size=0"):
        cfg_for(shards, buckets=BucketConfig([Bucket(1, 32, 32, 0)]))


def test_an_epoch_with_no_batch_is_an_error_not_a_hang(shards):
    # every synthetic clip covers 2 frames at 8 fps: a 64-frame bucket takes none of them
    loader = build_loader(cfg_for(shards, buckets=BucketConfig([Bucket(64, 32, 32, 2)], fps=8)))
    with pytest.raises(ValueError, match="data.shards=.*whole epoch gave no batch.*shorter_than_any"):
        next(iter(loader))


def test_latent_shards_are_read_directly_without_unpickling(tmp_path):
    def npy(a):
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    meta = {"kind": "video", "frames": 8, "fps": 8.0, "width": 32, "height": 32, "duration": 1.0}
    meta = json.dumps({**meta, "bucket": "8x32x32", "latent_shape": [4, 2, 4, 4], "text_shape": [5, 8]})
    samples = [
        {
            "__key__": f"k{i}",
            "latent.npy": npy(np.full((4, 2, 4, 4), i, np.float32)),
            "text.npy": npy(np.ones((5, 8), np.float32)),
            "text_mask.npy": npy(np.ones(5, bool)),
            "json": meta,
        }
        for i in range(2)
    ]
    evil = io.BytesIO()
    objects = np.array([{"i": f"{i:040d}"} for i in range(128)]).reshape(4, 2, 4, 4)  # the declared shape
    np.save(evil, objects, allow_pickle=True)  # an object array needs pickle
    samples.append({**samples[0], "__key__": "evil", "latent.npy": evil.getvalue()})
    write_tar(tmp_path / "train-000000.tar", samples)
    loader = build_loader(
        cfg_for(
            tmp_path,
            buckets=BucketConfig([Bucket(8, 32, 32, 1)], fps=8),
            error_threshold=1.0,
            shuffle_buffer=0,
        )
    )
    batches, _ = _one_epoch(loader)
    assert [b.key for b in batches] == [["k0"], ["k1"]]
    assert batches[1].latent.shape == (1, 4, 2, 4, 4) and batches[1].latent.max() == 1
    assert batches[0].text_emb.shape == (1, 5, 8) and batches[0].text_mask.dtype == torch.bool
    assert loader.error_summary()["skipped"]["bad_array"] >= 1


def test_pipe_shards_only_when_enabled(shards):
    spec = f"pipe:cat {shards}/train-{{000000..000011}}.tar"
    with pytest.raises(ValueError, match="allow_pipe"):
        build_loader(cfg_for(spec))
    piped = list(itertools.islice(iter(build_loader(cfg_for(spec, allow_pipe=True))), 3))
    local = list(itertools.islice(iter(build_loader(cfg_for(shards))), 3))
    assert [b.key for b in piped] == [b.key for b in local]


def test_image_ratio_balances_joint_training(shards):
    def share(ratio):
        buckets = BucketConfig([Bucket(1, 32, 32, 1), Bucket(2, 32, 32, 1)], fps=8, image_ratio=ratio)
        batches, _ = _one_epoch(build_loader(cfg_for(shards, buckets=buckets)))
        images = [b.video.shape[2] == 1 for b in batches]
        return images, sum(images) / len(images)

    natural, natural_share = share(None)
    assert 0 < natural_share < 0.5  # the synthetic set has ~15% stills
    balanced, _ = share(0.5)
    n = 2 * sum(balanced)  # while both kinds last, batches alternate image/video
    assert abs(sum(balanced[:n]) - n / 2) <= 1 and sorted(balanced) == sorted(natural)
