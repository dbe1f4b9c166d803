"""The named collectives and distributed attention cores against one process (gloo, 2 and 4 ranks)."""

from __future__ import annotations

import pytest
import torch

from dit.attention import attention
from parallel.collectives import all_to_all, gather_replicated, local_chunk, split_full_grad, sum_grad
from parallel.ring import ring_attention
from tests.parallel.collective_worker import worker
from tests.parallel.group import run_group

CHECKS = [
    "gather_forward",
    "gather_backward",
    "split_forward",
    "split_backward",
    "sum_grad",
    "all_to_all_forward",
    "all_to_all_backward",
    "ulysses",
    "ring",
]


@pytest.fixture(scope="module")
def worst(tmp_path_factory):
    out = {}
    for world in (2, 4):
        out[world] = run_group(
            world, worker, [None], tmp_path_factory.mktemp(f"c{world}"), names=[f"world{world}"]
        )
    return {w: r[f"world{w}"] for w, r in out.items()}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("check", CHECKS)
def test_collective_matches_single_process(worst, world, check):
    assert worst[world][check] < 1e-6, (world, check, worst[world][check])


def test_one_rank_bypass_is_the_identity():
    x = torch.randn(2, 8, 4, 3, requires_grad=True)
    assert all_to_all(x, 2, 1, None) is x
    assert gather_replicated(x, 1, None) is x
    assert local_chunk(x, 1, None) is x
    assert split_full_grad(x, 1, None) is x and sum_grad(x, None) is x
    q, k, v = torch.randn(3, 2, 8, 4, 16).unbind(0)
    assert torch.allclose(ring_attention(q, k, v, None), attention(q, k, v), atol=1e-6)
