"""Validation loss at a fixed timestep grid, and sample videos, during training.

The validation loss is what scaling sweeps compare, so it is made free of sampling noise: the same
held-out batches every time, every sample scored at the same grid of times t_i = (i + 0.5) / n with
noise drawn from fixed seeds, averaged per sample over ranks.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import torch
from torch import nn

from data.pipeline import build_loader, list_shards
from dit.diffusion import Objective
from launch.batches import Conditioner, expect_for
from launch.config import JobConfig
from launch.distributed import all_reduce
from launch.sample import videos_for


def held_out_batches(cfg: JobConfig, dp_rank: int, dp_size: int) -> list[dict]:
    """The first ``eval.batches`` batches of ``data.val_shards`` for this data-parallel rank, in a fixed
    order (no shuffling, no workers), kept in memory and reused at every evaluation."""
    if not cfg.data.val_shards:
        raise ValueError("eval.every is set but data.val_shards is empty")
    val = dataclasses.replace(
        cfg.data, shards=cfg.data.val_shards, prefix="val", num_workers=0, shuffle_buffer=0, random_crop=False
    )
    # fewer held-out shards than ranks: every rank still needs batches, so draw shards (seeded)
    val.resampled = val.resampled or len(list_shards(val)) < dp_size
    loader = build_loader(val, dp_rank, dp_size, expect=expect_for(cfg))
    return list(itertools.islice(iter(loader), cfg.eval.batches))


def grid_times(obj: Objective, cfg: JobConfig, b: int, i: int, device) -> torch.Tensor:
    u = (i + 0.5) / cfg.eval.timesteps
    if cfg.diffusion.objective == "ddpm":
        return torch.full((b,), int(u * cfg.diffusion.num_timesteps), dtype=torch.long, device=device)
    return torch.full((b,), u, device=device)


@torch.no_grad()
def validation_loss(
    model: nn.Module, obj: Objective, cond: Conditioner, batches: list[dict], cfg: JobConfig, rank: int
) -> float:
    """Per-sample mean loss over the held-out batches and the timestep grid, over all ranks."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for n, batch in enumerate(batches):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + n)
        prep = cond(batch, gen, train=False)
        b = prep.x0.shape[0]
        for i in range(cfg.eval.timesteps):
            g = torch.Generator().manual_seed(hash((cfg.seed, rank, n, i)) % 2**63)
            noise = torch.randn(prep.x0.shape, generator=g).to(prep.x0.device)
            t = grid_times(obj, cfg, b, i, prep.x0.device)
            out = obj.loss(model, prep.x0, prep.kwargs, noise=noise, t=t)
            total += float(out.per_frame.mean(1).sum())
            count += b
    model.train(was_training)
    total = all_reduce(total, "sum", prep.x0.device if batches else None)
    count = all_reduce(float(count), "sum", prep.x0.device if batches else None)
    return total / max(count, 1.0)


@torch.no_grad()
def draw_samples(
    model: nn.Module, obj: Objective, cond: Conditioner, cfg: JobConfig, seed: int
) -> np.ndarray:
    """Videos for ``sample.prompts``: B×T×H×W×3 uint8 (every rank runs the model; rank 0 writes)."""
    s = cfg.sample
    was_training = model.training
    model.eval()
    videos = videos_for(
        model,
        obj,
        cfg.model.arch,
        cond.codec,
        cond.encode_text,
        list(s.prompts),
        frames=s.frames,
        height=s.height,
        width=s.width,
        fps=s.fps,
        steps=s.steps,
        sampler=s.sampler,
        cfg_scale=s.cfg,
        seed=seed,
        device=cond.device,
    )
    model.train(was_training)
    return videos
