"""A checkpoint saved under one parallel layout loads under another, bit for bit (gloo, 4 processes)."""

from __future__ import annotations

import pytest
import torch

from tests.parallel.group import run_group
from tests.parallel.reshard_worker import worker

pytestmark = pytest.mark.slow


CASES = [
    ("dp_shard4_to_dp_shard2_tp2", {"dp_shard": 4}, {"dp_shard": 2, "tp": 2}),
    ("dp_shard2_cp2_to_dp_shard4", {"dp_shard": 2, "cp": 2}, {"dp_shard": 4}),
    ("tp2_hsdp_to_tp4", {"dp_replicate": 2, "dp_shard": 1, "tp": 2}, {"dp_shard": 1, "tp": 4}),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_group(4, worker, CASES, tmp_path_factory.mktemp("reshard"), names=[c[0] for c in CASES])


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat(v, f"{prefix}{k}.")
    elif isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            yield from _flat(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], tree


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_checkpoint_loads_bitwise_under_another_layout(name, results):
    before = dict(_flat(results[name]["before"]))
    after = dict(_flat(results[name]["after"]))
    assert before.keys() == after.keys()
    assert any(k.endswith("exp_avg_sq") for k in before)  # optimizer moments are compared
    assert sum(isinstance(v, torch.Tensor) for v in before.values()) > 50
    for key, want in before.items():
        got = after[key]
        if isinstance(want, torch.Tensor):
            assert torch.equal(got, want), key
        else:
            assert got == want, key
