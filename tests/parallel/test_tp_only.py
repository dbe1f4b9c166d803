"""Tensor parallel without FSDP: every parameter is a DTensor on the tp mesh, so the fused AdamW that
``build_optimizer`` picks on CUDA runs (it refuses lists mixing DTensors and plain tensors), and three
clipped steps equal one process, replicated parameters included (a replicated gradient summed over
the tp ranks would be twice the reference).

Fused AdamW is forced and runs for real on CPU (torch has a CPU kernel); that the CUDA kernel takes
the same DTensor lists only a GPU run confirms.
"""

from __future__ import annotations

import pytest
import torch

from parallel.config import ParallelConfig
from tests.parallel.group import run_group
from tests.parallel.tp_only_worker import FROZEN, train, worker

pytestmark = pytest.mark.slow


CASES = [
    ("tp2_sequence_parallel", {"tp": 2, "dp_shard": 1}, "full"),
    ("tp2_no_sequence_parallel", {"tp": 2, "dp_shard": 1, "sequence_parallel": False}, "full"),
    (
        "tp2_factorized_selective",
        {"tp": 2, "dp_shard": 1, "activation_checkpointing": "selective"},
        "factorized",
    ),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_group(2, worker, CASES, tmp_path_factory.mktemp("tp_only"), names=[c[0] for c in CASES])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_tp_only_with_fused_adamw_matches_one_process(case, results):
    name, _, layout = case
    got = results[name]
    assert "error" not in got, got.get("error")
    want = train(ParallelConfig(), world=1, layout=layout)
    assert got["fused"] and want["fused"]
    # every parameter lives on the tp mesh: the optimizer's lists are homogeneous
    assert all(got["on_tp_mesh"].values()), [n for n, ok in got["on_tp_mesh"].items() if not ok]
    # init.freeze survives: torch's styles re-register parameters as trainable
    assert {n for n, t in got["trainable"].items() if not t} == set(FROZEN)
    assert got["grads"].keys() == want["grads"].keys()
    for k, g in want["grads"].items():
        assert _rel(got["grads"][k], g) < 1e-5, (k, _rel(got["grads"][k], g))
    assert want["grads"]["t_embedder.fc2.weight"].abs().max() > 0  # a replicated parameter has signal
    assert want["norms"][0] > 2 * 0.05  # clipping acted
    assert got["norms"] == pytest.approx(want["norms"], rel=1e-5)
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-5)
    for k, w in want["weights"].items():
        assert _rel(got["weights"][k], w) < 1e-5, k
    for k in FROZEN:
        assert torch.equal(got["weights"][k], want["weights"][k])
