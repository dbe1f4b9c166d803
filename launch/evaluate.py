"""Validation loss at a fixed timestep grid, and sample videos, during training.

The validation loss is what scaling sweeps compare, so it is made free of sampling noise: the same
held-out batches every time, every sample scored at the same grid of times t_i = (i + 0.5) / n with
noise drawn from fixed seeds, averaged per sample over ranks.

Both run in the training precision (:func:`launch.batches.run_bf16`: bf16 autocast over the fp32
weights, on either engine), so the validation loss measures the model that trains, and the module
is called as the trainer calls it.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from data.pipeline import build_loader, list_shards
from dit.diffusion import Objective
from launch.batches import Conditioner, expect_for, run_bf16
from launch.config import JobConfig
from launch.distributed import all_reduce
from launch.sample import decode, latents_for


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
            with _precision(cfg, prep.x0.device):
                out = obj.loss(model, prep.x0, prep.kwargs, noise=noise, t=t)
            total += float(out.per_frame.mean(1).sum())
            count += b
    model.train(was_training)
    total = all_reduce(total, "sum", prep.x0.device if batches else None)
    count = all_reduce(float(count), "sum", prep.x0.device if batches else None)
    return total / max(count, 1.0)


def _precision(cfg: JobConfig, device: torch.device):
    # no weight-cast cache: under ZeRO-3 it would hold a bf16 copy of every (fp32) weight
    return torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=run_bf16(cfg, device), cache_enabled=False
    )


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def text_from_rank0(cond: Conditioner):
    """Caption encoder for samples: rank 0 runs the text encoder and broadcasts the states, so no other
    rank loads it for samples (with latent shards, which carry text states, none loads it at all)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return cond.encode_text

    def encode(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        dev, rank0 = cond.device, dist.get_rank() == 0
        emb = mask = error = None
        if rank0:
            try:
                emb, mask = cond.encode_text(prompts)
            except Exception as e:  # the others wait in the broadcast: tell them, then raise
                error = e
        shape = torch.tensor(emb.shape if emb is not None else (-1, 0, 0), device=dev)
        dist.broadcast(shape, 0)
        if error is not None:
            raise error
        b, length, d = shape.tolist()
        if b < 0:
            raise RuntimeError("rank 0 could not encode the sample captions (sample.prompts); see its log")
        emb = emb.to(dev) if rank0 else torch.empty(b, length, d, device=dev)
        keep = mask.to(dev, torch.uint8) if rank0 else torch.empty(b, length, dtype=torch.uint8, device=dev)
        dist.broadcast(emb, 0)
        dist.broadcast(keep, 0)  # as bytes: not every backend broadcasts bool
        return emb, keep.bool()

    return encode


@torch.no_grad()
def draw_samples(
    model: nn.Module, obj: Objective, cond: Conditioner, cfg: JobConfig, seed: int
) -> np.ndarray:
    """Videos for ``sample.prompts``: B×T×H×W×3 uint8 on rank 0, an empty array on the others.

    Every rank runs the DiT (its parameters are sharded: FSDP and ZeRO-3 gather them collectively, and
    context-parallel ranks share each sample's tokens), in the training precision. Rank 0 alone encodes
    the captions (broadcast to the others) and decodes the latents, so the text encoder and VAE load
    on one rank only, unless training itself needs them everywhere (raw video or captions).
    """
    s = cfg.sample
    was_training = model.training
    model.eval()
    z = latents_for(
        model,
        obj,
        cfg.model.arch,
        cond.compression,
        text_from_rank0(cond),
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
        bf16=run_bf16(cfg, cond.device),
    )
    model.train(was_training)
    return decode(cond.codec, z) if _rank() == 0 else np.zeros((0, 0, 0, 0, 3), np.uint8)
