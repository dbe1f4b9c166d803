"""Gradient accumulation under FSDP2 as the trainer runs it, in a gloo group.

Two optimizer steps of ``grad_accum = 2`` micro-steps over a global batch of 4 samples per micro-step,
each rank taking its data-parallel share, with the trainer's conventions: the loss of a micro-step is
scaled by ``dims.grad_scale`` over the step's global sample count, every micro-step's backward
reduce-scatters (no ``set_requires_gradient_sync(False)``), then clip and AdamW
(:func:`launch.optim.build_optimizer`). After every backward, each block parameter's gradient is
inspected: what this rank holds of it, and whether FSDP keeps an unsharded gradient anywhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from dit.diffusion import DiffusionConfig, make_objective
from dit.model import SpacetimeDiT
from launch.config import TrainConfig
from launch.optim import build_optimizer
from parallel.config import ParallelConfig
from parallel.grads import clip_grad_norm
from parallel.parallelize import make_dims, materialize, parallelize
from tests.dit.helpers import random_model
from tests.parallel.group import serve
from tests.parallel.parity_worker import GLOBAL_BATCH, arch, batch

ACCUM, STEPS = 2, 2


def micro_batches(cfg) -> list[dict]:
    """Two different global micro-batches of GLOBAL_BATCH samples."""
    first = batch(cfg)
    second = {k: v.roll(1, 0) for k, v in first.items()} | {"noise": -first["noise"], "t": 1 - first["t"]}
    return [first, second]


def _unsharded_grads(model: torch.nn.Module) -> int:
    """How many block parameters FSDP2 holds an unsharded gradient of (its accumulation buffer or the
    unsharded parameter's ``.grad``: what ``set_requires_gradient_sync(False)`` keeps)."""
    held = 0
    for block in model.blocks:
        for fp in block._get_fsdp_state()._fsdp_param_group.fsdp_params:
            unsharded = getattr(fp, "_unsharded_param", None)
            held += fp.unsharded_accumulated_grad is not None or (
                unsharded is not None and unsharded.grad is not None
            )
    return held


def _inspect(model: torch.nn.Module) -> dict:
    """Over every block parameter: all gradients sharded DTensors (Shard(0) over the dp ranks), the
    elements this rank holds and the parameters' full element count, unsharded gradients held."""
    sharded, local, full = True, 0, 0
    for p in model.blocks.parameters():
        g = p.grad  # None while FSDP holds it unsharded (no reduce-scatter yet)
        sharded &= isinstance(g, DTensor) and g.placements == (Shard(0),)
        local += 0 if g is None else (g.to_local() if isinstance(g, DTensor) else g).numel()
        full += p.numel()
    return {"sharded": sharded, "local": local, "full": full, "unsharded": _unsharded_grads(model)}


def train(world: int, no_sync_first: bool = False) -> dict:
    """Two steps of grad_accum=2; ``no_sync_first``: skip the first micro-step's reduce-scatter, as
    the trainer did before (the control that shows the inspection can see unsharded gradients)."""
    cfg = arch()
    pcfg = ParallelConfig(dp_shard=world)
    dims = make_dims(pcfg, world, cfg)
    mesh = dims.build_mesh("cpu")
    with torch.device("meta"):
        model = SpacetimeDiT(cfg)
    parallelize(model, dims, mesh, pcfg)
    materialize(model, torch.device("cpu"), mesh, lambda: random_model(cfg))
    opt = build_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.01), torch.device("cpu"))
    objective = make_objective(DiffusionConfig())
    per = GLOBAL_BATCH // dims.dp
    lo = dims.dp_rank(mesh) * per
    total = GLOBAL_BATCH * ACCUM  # global samples of one optimizer step
    losses, seen = [], []
    for _ in range(STEPS):
        step_loss = 0.0
        for micro, data in enumerate(micro_batches(cfg)):
            mine = {k: v[lo : lo + per] for k, v in data.items()}
            if world > 1 and no_sync_first:
                model.set_requires_gradient_sync(micro == ACCUM - 1)
            out = objective.loss(
                model, mine["x0"], {"context": mine["context"], "context_mask": mine["context_mask"]},
                cond_frames=mine["cond_frames"], noise=mine["noise"], t=mine["t"],
            )  # fmt: skip
            per_sample = out.per_frame.sum(1) / (~mine["cond_frames"]).sum(1).clamp(min=1)
            (per_sample.sum() * (dims.grad_scale / total)).backward()
            step_loss += float(per_sample.detach().sum())
            if world > 1:
                seen.append(_inspect(model))
        if world > 1:
            t = torch.tensor(step_loss, dtype=torch.float64)
            dist.all_reduce(t)
            step_loss = float(t)
        losses.append(step_loss / total)
        clip_grad_norm([p for p in model.parameters() if p.grad is not None], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    weights = {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in model.named_parameters()
    }
    return {"losses": losses, "weights": weights, "seen": seen}


def trainer_step(overrides: list[str]) -> dict:
    """One step of the real trainer (``launch.train.setup`` and ``Trainer.train_step``) with every
    backward observed: the trainer's own micro-step sequence, whatever it does between them."""
    from launch.config import load_config
    from launch.train import setup

    tr = setup(load_config(None, overrides))
    seen = []
    backward = tr._backward

    def observed(per_sample: torch.Tensor, total: float, last: bool) -> None:
        backward(per_sample, total, last)
        seen.append(_inspect(tr.model))

    tr._backward = observed  # instrumentation on the instance: the real backward runs
    try:
        stats = tr.train_step(iter(tr.loader))
    finally:
        tr.close()
    return {"seen": seen, "loss": stats.loss}


def worker(rank: int, world: int, port: int, cases: list, out_dir: str) -> None:
    """``cases``: (name, kind, arg): ``loop`` (arg: no_sync_first) or ``trainer`` (arg: overrides)."""

    def run(case):
        _, kind, arg = case
        return train(world, arg) if kind == "loop" else trainer_step(arg)

    serve(rank, world, port, cases, out_dir, run, name=lambda c: c[0])
