"""Save a DCP checkpoint under one layout and load it under another, in one process group."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from dit.model import SpacetimeDiT
from parallel import checkpoint as ckpt
from parallel.config import ParallelConfig
from parallel.parallelize import make_dims, materialize, parallelize
from tests.dit.helpers import random_model
from tests.parallel.group import serve
from tests.parallel.parity_worker import arch, batch

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def build(layout: dict, world: int, seed: int):
    cfg = arch()
    pcfg = ParallelConfig(**layout)
    dims = make_dims(pcfg, world, cfg)
    mesh = dims.build_mesh("cpu")
    with torch.device("meta"):
        model = SpacetimeDiT(cfg)
    parallelize(model, dims, mesh, pcfg)
    materialize(model, torch.device("cpu"), mesh, lambda: random_model(cfg, seed=seed))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def full_state(model, opt) -> tuple[dict, dict]:
    msd, osd = get_state_dict(model, opt, options=FULL)
    return msd, osd


def reshard(case: tuple, world: int, out_dir: Path) -> dict:
    """Train a step under ``saved``, checkpoint, load under ``loaded``: both full states."""
    name, saved, loaded = case
    rank = dist.get_rank()
    model, opt = build(saved, world, seed=0)
    data = batch(model.cfg)
    out = model(data["x0"], data["t"] * 1000, context=data["context"], context_mask=data["context_mask"])
    out.square().mean().backward()
    opt.step()  # optimizer moments exist and differ from their initial values
    msd, osd = get_state_dict(model, opt)
    path = ckpt.save(out_dir / name, 1, {"model": msd, "optim": osd}, {}, rank)
    before = full_state(model, opt)

    model2, opt2 = build(loaded, world, seed=1)  # different weights until the load
    msd2, osd2 = get_state_dict(model2, opt2)
    state = {"model": msd2, "optim": osd2}
    ckpt.load(path, state, rank)
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return {"before": before, "after": full_state(model2, opt2)}


def worker(rank: int, world: int, port: int, cases: list, out_dir: str) -> None:
    """``cases``: (name, layout_saved, layout_loaded) triples."""
    serve(rank, world, port, cases, out_dir, lambda c: reshard(c, world, Path(out_dir)), name=lambda c: c[0])
