"""Tensor parallel alone (no FSDP) with the trainer's optimizer, fused AdamW forced, in a gloo group.

Each case builds the tiny model on meta under a tp-only layout, materialises the same initial weights
as one process, and takes three steps with :func:`launch.optim.build_optimizer` (``fused=True``, the
CUDA default; torch runs fused AdamW on CPU too) and :func:`parallel.grads.clip_grad_norm` with a
``max_norm`` small enough to clip. Rank 0 records the losses, the first step's gradients and norm, the
final weights, and where every parameter lives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

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

STEPS = 3
MAX_NORM = 0.05  # below the first steps' gradient norm: the clipped path is what is compared
FROZEN = ("t_embedder.fc1.weight", "blocks.0.attn.q.weight")


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def train(pcfg: ParallelConfig, world: int, layout: str = "full") -> dict:
    cfg = arch(layout)
    dims = make_dims(pcfg, world, cfg)
    mesh = dims.build_mesh("cpu")
    with torch.device("meta"):
        model = SpacetimeDiT(cfg)
    for name, p in model.named_parameters():
        if name in FROZEN:  # as init.freeze does, before parallelize
            p.requires_grad_(False)
    parallelize(model, dims, mesh, pcfg)
    materialize(model, torch.device("cpu"), mesh, lambda: random_model(cfg))
    tp_mesh = mesh["tp"] if mesh is not None else None
    placement = {
        n: p.device_mesh == tp_mesh if isinstance(p, DTensor) else False for n, p in model.named_parameters()
    }
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    train_cfg = TrainConfig(lr=1e-3, weight_decay=0.01)
    opt = build_optimizer(model, train_cfg, torch.device("cpu"), fused=True)
    objective = make_objective(DiffusionConfig())
    data = batch(cfg)
    losses, norms, grads = [], [], None
    for step in range(STEPS):
        out = objective.loss(
            model, data["x0"], {"context": data["context"], "context_mask": data["context_mask"]},
            cond_frames=data["cond_frames"], noise=data["noise"], t=data["t"],
        )  # fmt: skip
        per_sample = out.per_frame.sum(1) / (~data["cond_frames"]).sum(1).clamp(min=1)
        # the trainer's scaling: tp ranks are not reduced over (dims.grad_scale = 1 here)
        (per_sample.sum() * (dims.grad_scale / GLOBAL_BATCH)).backward()
        losses.append(float(per_sample.detach().sum()) / GLOBAL_BATCH)
        if step == 0:
            grads = {n: _full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
        norms.append(clip_grad_norm([p for p in model.parameters() if p.grad is not None], MAX_NORM))
        opt.step()
        opt.zero_grad(set_to_none=True)
    if world > 1:  # every tp rank logged the same loss
        t = torch.tensor(losses)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        assert torch.equal(t, torch.tensor(losses))
    return {
        "losses": losses,
        "norms": norms,
        "grads": grads,
        "weights": {n: _full(p) for n, p in model.named_parameters()},
        "on_tp_mesh": placement,
        "trainable": trainable,
        "fused": all(g["fused"] for g in opt.param_groups),
    }


def worker(rank: int, world: int, port: int, cases: list, out_dir: str) -> None:
    """``cases``: (name, parallel dict, attention layout) triples."""
    serve(
        rank,
        world,
        port,
        cases,
        out_dir,
        lambda c: train(ParallelConfig(**c[1]), world, c[2]),
        name=lambda c: c[0],
    )
