"""Validation and samples with the EMA swapped in leave FSDP2 holding nothing stale (2 gloo ranks).

FSDP2 keeps its root's parameters gathered after a forward, for the backward it expects; validation
and samples have none. Swapping the EMA in, running them and swapping back changes only the shards,
so without ``parallel.parallelize.reshard`` the next training forward ran on the EMA's root weights
(patch embedding, time embedding, final layer). Same code on GPUs; nothing here is CPU-specific.
"""

from __future__ import annotations

import types

import pytest
import torch

from dit.model import SpacetimeDiT
from launch.optim import EMA
from launch.train import _with_ema
from parallel.config import ParallelConfig
from parallel.parallelize import make_dims, materialize, parallelize, reshard
from tests.dit.helpers import random_model
from tests.parallel.group import run_group, serve
from tests.parallel.parity_worker import arch, batch

pytestmark = pytest.mark.slow


def _outputs(skip_reshard: bool) -> dict:
    cfg, pcfg = arch(), ParallelConfig(dp_shard=2)
    dims = make_dims(pcfg, 2, cfg)
    mesh = dims.build_mesh("cpu")
    with torch.device("meta"):
        model = SpacetimeDiT(cfg)
    parallelize(model, dims, mesh, pcfg)
    materialize(model, torch.device("cpu"), mesh, lambda: random_model(cfg))
    ema = EMA(model, 0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = batch(cfg)
    kwargs = {"context": data["context"][:2], "context_mask": data["context_mask"][:2]}
    x, t = data["x0"][:2], data["t"][:2] * 1000
    model(x, t, **kwargs).square().mean().backward()  # a training step: the EMA now differs
    opt.step()
    ema.update(1)
    with torch.no_grad():
        before = model(x, t, **kwargs)
    reshard(model)
    trainer = types.SimpleNamespace(ema=ema, model=model)
    if skip_reshard:  # the old code: the EMA forward without reshard
        with ema.swapped_in(), torch.no_grad():
            model(x, t, **kwargs)
    else:
        with torch.no_grad():
            _with_ema(trainer, lambda: model(x, t, **kwargs))
    with torch.no_grad():
        after = model(x, t, **kwargs)
    return {"before": before, "after": after}


def worker(rank: int, world: int, port: int, cases: list, out_dir: str) -> None:
    serve(rank, world, port, cases, out_dir, lambda c: _outputs(c == "without_reshard"), name=lambda c: c)


def test_a_forward_after_ema_validation_sees_the_training_weights(tmp_path):
    got = run_group(
        2, worker, ["with_reshard", "without_reshard"], tmp_path, names=["with_reshard", "without_reshard"]
    )
    for r in got.values():
        assert "error" not in r, r.get("error")
    assert torch.equal(got["with_reshard"]["after"], got["with_reshard"]["before"])
    # the control: the stale gathered EMA weights change the next forward
    assert not torch.allclose(got["without_reshard"]["after"], got["without_reshard"]["before"], atol=1e-6)
