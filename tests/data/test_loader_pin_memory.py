"""``build_loader(..., pin_memory=True)``: batches in page-locked memory for asynchronous copies to the GPU.

On a machine without an accelerator torch's DataLoader accepts ``pin_memory=True``, warns that it
can not pin, and hands out ordinary batches: that warning is what shows here that the argument
reached the DataLoader (with and without worker processes). That the batches are really pinned only
a CUDA machine shows (the last check, which runs there).
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from data.buckets import Bucket, BucketConfig
from data.pipeline import DataConfig, build_loader
from data.synthetic import generate

NO_ACCELERATOR = "pin_memory' argument is set as true but no accelerator is found"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    generate(out, num=8, seed=0, samples_per_shard=4)  # 2 shards
    return out


def _cfg(shards, workers: int) -> DataConfig:
    buckets = BucketConfig([Bucket(2, 32, 32, 2)], fps=8)
    return DataConfig(shards=str(shards), buckets=buckets, num_workers=workers, seed=1)


def _batches(shards, workers: int, pin: bool) -> tuple[list[dict], list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(itertools.islice(iter(build_loader(_cfg(shards, workers), pin_memory=pin)), 3))
    return batches, [str(w.message) for w in caught]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_pin_memory_reaches_the_dataloader_and_keeps_the_batches(shards, workers):
    plain, plain_warnings = _batches(shards, workers, pin=False)
    pinned, pinned_warnings = _batches(shards, workers, pin=True)
    assert not any(NO_ACCELERATOR in w for w in plain_warnings)
    if not torch.accelerator.is_available():
        assert any(NO_ACCELERATOR in w for w in pinned_warnings)
    assert [b.key for b in pinned] == [b.key for b in plain]
    for a, b in zip(pinned, plain, strict=True):
        assert torch.equal(a.video, b.video) and torch.equal(a.fps, b.fps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs CUDA")
@pytest.mark.parametrize("workers", [0, 2])
def test_batches_are_pinned_on_cuda(shards, workers):
    batch = next(iter(build_loader(_cfg(shards, workers), pin_memory=True)))
    assert batch.video.is_pinned() and batch.fps.is_pinned()
