"""Selective activation checkpointing (``parallel.activation_checkpointing=selective``): the same loss
and gradients as no checkpointing; in backward the attention kernel is not run again (it is under
``full``); the activations kept are none > selective > full, selective keeping exactly the attention
kernels' outputs (output and log-sum-exp) more than full.

On CPU the kernel is ``aten._scaled_dot_product_flash_attention_for_cpu`` (SDPA's and the ring's);
the CUDA kernels (flash, memory-efficient, cuDNN) are in the same policy set, but that SDPA on a GPU
dispatches to one of them, and so is kept, only a GPU run confirms.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dit.diffusion import DiffusionConfig, make_objective
from parallel.config import checkpoint_every
from parallel.parallelize import _attention_ops, apply_activation_checkpointing
from tests.dit.helpers import random_model
from tests.parallel.group import run_group
from tests.parallel.parity_worker import Case, arch, batch, reference, worker

ATTENTION = "aten._scaled_dot_product_flash_attention_for_cpu.default"


class OpLog(TorchDispatchMode):
    """Counts aten ops, the bytes the attention kernel outputs, and (weakly) every storage an op
    outputs, to tell afterwards which are still alive: held by autograd or by checkpointing's cache."""

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()
        self.attention_bytes = 0
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls[str(func)] += 1
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.storages[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
                if str(func) == ATTENTION:
                    self.attention_bytes += t.nbytes
        return out

    def live_bytes(self) -> int:
        return sum(n for ref, n in self.storages.values() if not ref.expired())


def _step(mode: str, layout: str = "full") -> dict:
    model = random_model(arch(layout))
    apply_activation_checkpointing(model, mode)
    data = batch(model.cfg)
    kwargs = {"context": data["context"], "context_mask": data["context_mask"]}
    objective = make_objective(DiffusionConfig())
    with OpLog() as fwd:
        out = objective.loss(
            model, data["x0"], kwargs, cond_frames=data["cond_frames"], noise=data["noise"], t=data["t"]
        )
        loss = out.per_frame.mean()
    kept = fwd.live_bytes()  # activations held for backward (and the loss)
    with OpLog() as bwd:
        loss.backward()
    return {
        "loss": loss.detach(),
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "kept": kept,
        "attention_bytes": fwd.attention_bytes,
        "attentions": sum(1 + (b.cross_attn is not None) for b in model.blocks),
        "attention_forward": fwd.calls[ATTENTION],
        "attention_recomputed": bwd.calls[ATTENTION],
    }


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["full", "factorized"])
def test_selective_keeps_attention_and_matches_no_checkpointing(layout):
    none, selective, full = (_step(m, layout) for m in ("none", "selective", "full"))
    attentions = none["attentions"]
    assert attentions == 4 and none["attention_forward"] == attentions  # self + cross, 2 blocks
    for got in (selective, full):
        assert torch.equal(got["loss"], none["loss"])
        for name, g in none["grads"].items():
            assert torch.allclose(got["grads"][name], g, rtol=1e-6, atol=1e-9), name
    assert none["grads"]["blocks.1.attn.q.weight"].abs().max() > 0
    assert selective["attention_recomputed"] == 0
    assert full["attention_recomputed"] == attentions
    assert none["kept"] > selective["kept"] > full["kept"]
    # selective keeps exactly the attention outputs and LSEs on top of full's block inputs
    assert selective["kept"] - full["kept"] == none["attention_bytes"] > 0


def test_selective_is_a_checkpoint_mode_and_its_policy_knows_the_cuda_kernels():
    assert checkpoint_every("selective") == 1  # every block
    names = {str(op) for op in _attention_ops()}
    for kernel in ("flash_attention", "efficient_attention", "cudnn_attention", "flash_attention_for_cpu"):
        assert f"aten._scaled_dot_product_{kernel}.default" in names
    assert not any("backward" in n for n in names)


CASES = [
    Case("dp_shard2_selective", {"dp_shard": 2, "activation_checkpointing": "selective"}),
    Case(
        "cp2_ulysses_selective",
        {"cp": 2, "cp_ring": 1, "dp_shard": 1, "activation_checkpointing": "selective"},
    ),
    Case(
        "cp2_ring_selective", {"cp": 2, "cp_ring": 2, "dp_shard": 1, "activation_checkpointing": "selective"}
    ),
]


@pytest.fixture(scope="module")
def parallel_results(tmp_path_factory):
    return run_group(2, worker, CASES, tmp_path_factory.mktemp("selective"))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_selective_under_fsdp_and_context_parallel_matches_one_process(case, parallel_results):
    """FSDP2 (its all-gathers in the recomputed forward), Ulysses and the ring's autograd Function
    under the selective policy: losses of three steps and first-step gradients equal one process."""
    got = parallel_results[case.name]
    assert "error" not in got, got.get("error")
    want = reference(case)
    for k, g in want["grads"].items():
        err = float((got["grads"][k] - g).abs().max() / g.abs().max().clamp(min=1e-12))
        assert err < 1e-5, (k, err)
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-5)
