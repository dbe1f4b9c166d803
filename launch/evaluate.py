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
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from data.batch import Batch
from data.pipeline import Loader, build_loader
from dit.diffusion import Objective
from launch.batches import Conditioner, broadcast_from_rank0, derive_seed, expect_for, run_bf16
from launch.config import JobConfig
from launch.distributed import all_reduce
from launch.sample import decode, latents_for

log = logging.getLogger(__name__)

EVAL_STREAM = 1
"""Tells held-out noise seeds from any other seed made of the same numbers."""


VAL_KEY = "data.val_shards"
"""What the held-out loader's errors name."""


@dataclass
class HeldOut:
    """This rank's share of the held-out batches, padded to the same length on every rank."""

    batches: list[Batch]
    scored: int
    """The first ``scored`` batches count; the rest repeat one of them so that every rank makes the
    same number of forwards (each forward of a sharded model is a collective), and are not counted."""


def held_out_batches(cfg: JobConfig, dp_rank: int, dp_size: int) -> HeldOut:
    """Batch ``dp_rank``, ``dp_rank + dp_size``, … of the first ``eval.batches`` batches of one pass over
    ``data.val_shards``: in a fixed order (no shuffling, no workers, no resampling, short batches kept),
    kept in memory and reused at every evaluation.

    Every rank reads the whole held-out set the way one process does and keeps its share, so the
    scored samples are the same under every layout: ``eval.batches`` is a global count. The shares are
    padded to one length (:class:`HeldOut`). A pass never wraps around; errors on any rank are raised
    on every rank, naming ``data.val_shards``.

    Args:
        cfg: job config (``data``, ``data.val_shards``, ``eval.batches``, the model for ``expect``).
        dp_rank: this rank's data-parallel index (context/tensor-parallel peers pass the same one).
        dp_size: number of data-parallel ranks.
    """
    if not cfg.data.val_shards:
        raise ValueError("eval.every is set but data.val_shards is empty")
    mine, first, total, error = {}, None, 0, None
    try:
        for i, batch in enumerate(_one_pass(val_loader(cfg), cfg.eval.batches)):
            first = batch if first is None else first
            total += 1
            if i % dp_size == dp_rank:
                mine[i] = batch
    except Exception as e:  # noqa: BLE001 (whatever it is, the others must hear of it before a collective)
        error = e
    if agreed_count(0 if error is None else -1) < 0:
        if error is not None:
            raise error
        raise ValueError(
            f"data.val_shards={cfg.data.val_shards!r}: another rank could not read the held-out batches "
            "(see its error)"
        )
    if total == 0:  # every rank read the same set: all of them stop here
        raise ValueError(f"data.val_shards={cfg.data.val_shards!r}: one pass gave no held-out batch")
    per_rank = -(-total // dp_size)
    log.info(
        "held-out: %d batches from data.val_shards, %d per data-parallel rank%s",
        total,
        per_rank,
        "" if total % dp_size == 0 else " (the others repeat one, uncounted)",
    )
    indices, scored = share(total, dp_rank, dp_size)
    return HeldOut([mine.get(i, first) for i in indices], scored)


def share(n: int, dp_rank: int, dp_size: int) -> tuple[list[int], int]:
    """Indices ``dp_rank, dp_rank + dp_size, …`` of ``n`` items, padded with a repeat (the rank's first,
    or item 0 for a rank with none) to ``ceil(n / dp_size)`` so every rank makes as many forwards;
    returns (indices, how many of them count)."""
    mine = list(range(dp_rank, n, dp_size))
    per_rank = -(-n // dp_size)
    return mine + [mine[0] if mine else 0] * (per_rank - len(mine)), len(mine)


def val_loader(cfg: JobConfig) -> Loader:
    """``data.val_shards`` read as one process reads them: in a fixed order, no shuffling, no workers,
    no resampling, random crops or dropped short batches."""
    val = dataclasses.replace(
        cfg.data,
        shards=cfg.data.val_shards,
        prefix="val",
        num_workers=0,
        shuffle_buffer=0,
        random_crop=False,
        resampled=False,
        drop_partial=False,
    )
    return build_loader(val, 0, 1, expect=expect_for(cfg), key=VAL_KEY)  # the whole set, as one process


def _one_pass(loader: Loader, limit: int) -> list[Batch]:
    """Up to ``limit`` batches of the loader's first epoch (the loader itself goes on forever)."""
    return list(one_pass(loader, lambda out: len(out) >= limit))


def one_pass(loader: Loader, done) -> Iterator[Batch]:
    """The loader's batches until ``done(batches so far)`` or the end of its first epoch."""
    out: list[Batch] = []
    batches = iter(loader)
    try:
        while not done(out):
            batch = next(batches)
            if loader.epoch > 0:  # a batch of the next epoch: the pass is over
                break
            out.append(batch)
            yield batch
    finally:
        batches.close()


def agreed_count(n: int) -> int:
    """The smallest ``n`` over all ranks (``n`` itself with one process); -1 stands for a failed rank."""
    return -int(all_reduce(-float(n), "max"))


def noise_seed(seed: int, key: str, point: int) -> int:
    """Seed of the noise a held-out sample gets at grid point ``point``: a function of (seed, the sample's
    key, point) alone, so it is the same whichever rank and batch the sample lands in (one process,
    data, context or tensor parallel), the way :func:`launch.batches.step_seed` makes training draws
    independent of the context/tensor-parallel layout. A stable digest, not ``hash()``."""
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return derive_seed(seed, digest, point, EVAL_STREAM)


def grid_times(obj: Objective, cfg: JobConfig, b: int, i: int, device) -> torch.Tensor:
    """The ``i``-th of ``eval.timesteps`` evenly spaced times, at the centres of equal cells of
    ``diffusion.t_range`` (the times the model trains on; (0, 1): t_i = (i + 0.5) / n)."""
    u = (i + 0.5) / cfg.eval.timesteps
    lo, hi = cfg.diffusion.t_range
    if (lo, hi) != (0.0, 1.0):
        u = lo + (hi - lo) * u
    if cfg.diffusion.objective == "ddpm":
        return torch.full((b,), int(u * cfg.diffusion.num_timesteps), dtype=torch.long, device=device)
    return torch.full((b,), u, device=device)


def held_out_noise(cfg: JobConfig, keys: list[str], point: int, shape: torch.Size, device) -> torch.Tensor:
    """B×C×T×H×W noise, each sample's drawn from its own :func:`noise_seed`."""
    gens = [torch.Generator().manual_seed(noise_seed(cfg.seed, k, point)) for k in keys]
    return torch.stack([torch.randn(shape[1:], generator=g) for g in gens]).to(device)


@torch.no_grad()
def validation_loss(
    model: nn.Module,
    obj: Objective,
    conditioner: Conditioner,
    held_out: HeldOut,
    cfg: JobConfig,
    dp_rank: int,
) -> float:
    """Per-sample mean loss over the held-out batches and the timestep grid, over all ranks.

    The value depends on the held-out samples alone, not on the parallel layout: each sample's noise
    is seeded by its key (:func:`noise_seed`), and context/tensor-parallel peers, which score the same
    samples, count them equally often. Every rank makes the same number of forwards (the padded
    :class:`HeldOut`), since every forward of a sharded model is a collective.

    Args:
        model: the module the trainer calls (FSDP/DeepSpeed-wrapped or plain).
        obj: the diffusion objective.
        conditioner: turns a loader batch into latents and model keyword arguments.
        held_out: this rank's held-out batches (:func:`held_out_batches`).
        cfg: job config (``seed``, ``eval.timesteps``, the precision rules).
        dp_rank: this rank's data-parallel index (named if the ranks disagree on the batch count).
    """
    n = len(held_out.batches)
    if agreed_count(n) != -agreed_count(-n):  # a caller's own lists: never wait in a forward
        raise ValueError(
            f"validation: the ranks hold different numbers of held-out batches ({n} on dp_rank {dp_rank})"
        )
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    device = None
    for j, batch in enumerate(held_out.batches):
        # nothing in an evaluation batch is drawn (no caption dropout, no tasks): the generator is unused
        prep = conditioner(batch, torch.Generator().manual_seed(cfg.seed), train=False)
        device, b = prep.x0.device, prep.x0.shape[0]
        for i in range(cfg.eval.timesteps):
            noise = held_out_noise(cfg, batch.key, i, prep.x0.shape, device)
            t = grid_times(obj, cfg, b, i, device)
            with _precision(cfg, device):
                out = obj.loss(model, prep.x0, prep.kwargs, noise=noise, t=t)
            if j < held_out.scored:  # a padding batch runs only for the collectives
                total += float(out.per_frame.double().mean(1).sum())
                count += b
    model.train(was_training)
    total = all_reduce(total, "sum", device)
    count = all_reduce(float(count), "sum", device)
    return total / max(count, 1.0)


def _precision(cfg: JobConfig, device: torch.device):
    # no weight-cast cache: under ZeRO-3 it would hold a bf16 copy of every (fp32) weight
    return torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=run_bf16(cfg, device), cache_enabled=False
    )


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def text_from_rank0(conditioner: Conditioner):
    """Caption encoder for samples: rank 0 runs the text encoder and broadcasts the states
    (:func:`launch.batches.broadcast_from_rank0`), so no other rank loads it for samples (with latent
    shards, which carry text states, none loads it at all)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return conditioner.encode_text
    return lambda prompts: broadcast_from_rank0(conditioner.encode_text, prompts, conditioner.device)


@torch.no_grad()
def draw_samples(
    model: nn.Module, obj: Objective, conditioner: Conditioner, cfg: JobConfig, seed: int
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
        conditioner.compression,
        text_from_rank0(conditioner),
        list(s.prompts),
        frames=s.frames,
        height=s.height,
        width=s.width,
        fps=s.fps,
        steps=s.steps,
        sampler=s.sampler,
        cfg_scale=s.cfg,
        seed=seed,
        device=conditioner.device,
        bf16=run_bf16(cfg, conditioner.device),
        grid=s.grid,
    )
    model.train(was_training)
    return decode(conditioner.codec, z) if _rank() == 0 else np.zeros((0, 0, 0, 0, 3), np.uint8)


def main(argv: list[str] | None = None) -> int:
    """``python -m launch.evaluate RUN_OR_EXPORT``: the sample metrics of a trained model (see
    :mod:`launch.sample_metrics`), one process; one JSON object on stdout."""
    from launch.sample_metrics import cli  # imports this module: only when run as a program

    return cli(argv)


if __name__ == "__main__":
    raise SystemExit(main())
