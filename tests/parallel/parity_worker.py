"""Runs parallel-layout cases inside one spawned gloo process group (one group per world size).

Each case builds the tiny model on meta under its layout, materialises the same initial weights, and
takes three AdamW steps on the same global batch with the trainer's conventions (per-sample loss,
``dims.grad_scale``, division by the global sample count, clipping). Rank 0 records the losses and the
gathered gradients of the first step; :func:`reference` does the same in one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from dit.config import DiTConfig
from dit.diffusion import DiffusionConfig, make_objective
from dit.model import SpacetimeDiT
from parallel.config import ParallelConfig
from parallel.grads import clip_grad_norm
from parallel.parallelize import make_dims, materialize, parallelize
from tests.dit.helpers import random_model
from tests.parallel.group import serve

GLOBAL_BATCH = 4
STEPS = 3


def arch(layout: str = "full", heads: int = 4) -> DiTConfig:
    return DiTConfig(
        in_channels=4, hidden_size=32, depth=2, num_heads=heads, text_dim=16, patch_size=(1, 2, 2),
        mlp="swiglu", qk_norm=True, attention_layout=layout,
    )  # fmt: skip


@dataclass
class Case:
    name: str
    parallel: dict = field(default_factory=dict)
    layout: str = "full"


def batch(cfg: DiTConfig) -> dict:
    """The global batch: 4 samples of 4×4×8×8 latents, a caption each (one padded), fixed noise and
    times, and an image-to-video sample (per-frame timesteps: its first frame is clean)."""
    g = torch.Generator().manual_seed(1)
    b, t = GLOBAL_BATCH, 4
    x0 = torch.randn(b, cfg.in_channels, t, 8, 8, generator=g)
    mask = torch.ones(b, 5, dtype=torch.bool)
    mask[1, 3:] = False
    cond = torch.zeros(b, t, dtype=torch.bool)
    cond[2, 0] = True
    return {
        "x0": x0,
        "noise": torch.randn(x0.shape, generator=g),
        "t": torch.rand(b, generator=g),
        "context": torch.randn(b, 5, cfg.text_dim, generator=g),
        "context_mask": mask,
        "cond_frames": cond,
    }


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        out[name] = (g.full_tensor() if isinstance(g, DTensor) else g).detach().clone()
    return out


def train(cfg: DiTConfig, pcfg: ParallelConfig, world: int) -> dict:
    """Three optimizer steps of ``cfg`` under ``pcfg``; returns losses and first-step gradients."""
    dims = make_dims(pcfg, world, cfg)
    mesh = dims.build_mesh("cpu")
    with torch.device("meta"):
        model = SpacetimeDiT(cfg)
    parallelize(model, dims, mesh, pcfg)
    materialize(model, torch.device("cpu"), mesh, lambda: random_model(cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    objective = make_objective(DiffusionConfig())
    data = batch(cfg)
    per = GLOBAL_BATCH // dims.dp
    lo = dims.dp_rank(mesh) * per
    mine = {k: v[lo : lo + per] for k, v in data.items()}
    losses, grads = [], None
    for step in range(STEPS):
        out = objective.loss(
            model, mine["x0"], {"context": mine["context"], "context_mask": mine["context_mask"]},
            cond_frames=mine["cond_frames"], noise=mine["noise"], t=mine["t"],
        )  # fmt: skip
        frames = (~mine["cond_frames"]).sum(1).clamp(min=1)
        per_sample = out.per_frame.sum(1) / frames
        (per_sample.sum() * dims.grad_scale).backward()
        loss = per_sample.detach().sum()
        if world > 1:
            dist.all_reduce(loss)
        losses.append(float(loss) / dims.copies / GLOBAL_BATCH)
        for p in model.parameters():
            p.grad.div_(GLOBAL_BATCH)
        if step == 0:
            grads = _grads(model)
        clip_grad_norm(list(model.parameters()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"losses": losses, "grads": grads}


def reference(case: Case) -> dict:
    return train(arch(case.layout), ParallelConfig(), world=1)


def worker(rank: int, world: int, port: int, cases: list[Case], out_dir: str) -> None:
    serve(
        rank,
        world,
        port,
        cases,
        out_dir,
        lambda c: train(arch(c.layout), ParallelConfig(**c.parallel), world),
    )
