"""DeepSpeed bf16 cases for ``test_deepspeed_bf16.py``, on 2 gloo ranks with DeepSpeed's CPU accelerator.

Every case builds the tiny job of ``tiny.yaml`` with ``run.precision=bf16`` and a randomised model
(adaLN-Zero's initial model predicts exactly zero, which any precision gets right), wraps it with
:func:`parallel.zero.build_engine`, then, as the trainer does: draws the samples
(:func:`launch.evaluate.draw_samples` on ``engine.module``), scores the validation loss
(:func:`launch.evaluate.validation_loss`), and takes one training step through the engine under
the DeepSpeed trainer's autocast (:func:`parallel.zero.autocast`) with CUDA's autocast flag raised
(:func:`tests.dit.emulate.cuda_autocast_flag`): the outer autocast as DeepSpeed sees it on a GPU.
Forward hooks on one linear record the dtype each phase computed in and whether autocast's weight
cache was on. The control case builds the
engine with DeepSpeed's ``bf16`` section instead (the old configuration) and records what fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from data.batch import Batch
from dit.diffusion import make_objective
from launch import evaluate
from launch.batches import Conditioner
from launch.config import JobConfig, load_config
from launch.optim import build_optimizer, build_scheduler
from parallel import zero
from tests.dit.emulate import cuda_autocast_flag
from tests.dit.helpers import random_model
from tests.parallel.group import serve

SAMPLES_PER_RANK = 2
OVERRIDES = [
    "run.precision=bf16",
    "parallel.engine=deepspeed",
    "sample.prompts=[a red circle,a blue square]",
    "sample.frames=1",
    "sample.height=16",
    "sample.width=16",
    "sample.steps=2",
    "eval.timesteps=2",
    "train.cfg_dropout=0",
]


@dataclass
class Case:
    name: str
    stage: int
    old_bf16_section: bool = False
    """The control: DeepSpeed's ``bf16`` section (bf16 module weights), as before."""


def job(stage: int, precision: str = "bf16") -> JobConfig:
    return load_config(None, [*OVERRIDES, f"parallel.zero_stage={stage}", f"run.precision={precision}"])


def latent_batch(cfg: JobConfig, rank: int) -> Batch:
    """A latent-shard batch (latents + text states), different per rank: 8×8 pixel-codec latents of 2
    frames."""
    arch = cfg.model.arch
    g = torch.Generator().manual_seed(100 + rank)
    b, text_len = SAMPLES_PER_RANK, 6
    mask = torch.ones(b, text_len, dtype=torch.bool)
    mask[1, 4:] = False
    return Batch(
        bucket="2x8x8",
        key=[f"r{rank}-{i}" for i in range(b)],
        text=[""] * b,
        fps=torch.full((b,), 8.0),
        latent=torch.randn(b, arch.in_channels, 2, 8, 8, generator=g),
        text_emb=torch.randn(b, text_len, arch.text_dim, generator=g),
        text_mask=mask,
    )


def reference_loss(cfg: JobConfig, rank: int) -> torch.Tensor:
    """One process, fp32 weights under CPU bf16 autocast: the per-sample losses of ``rank``'s batch."""
    model = random_model(cfg.model.arch)
    prep = Conditioner(cfg, torch.device("cpu"))(latent_batch(cfg, rank), torch.Generator().manual_seed(rank))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = make_objective(cfg.diffusion).loss(
            model, prep.x0, prep.kwargs, generator=torch.Generator().manual_seed(7)
        )
    return out.per_frame.mean(1).detach()


def _engine(case: Case, cfg: JobConfig):
    model = random_model(cfg.model.arch)
    mesh = init_device_mesh("cpu", (dist.get_world_size(), 1), mesh_dim_names=("dp", "tp"))
    groups = zero.DeepSpeedGroups(mesh["dp"].get_group(), mesh["tp"].get_group())
    opt = build_optimizer(model, cfg.train, torch.device("cpu"))
    if not case.old_bf16_section:
        return zero.build_engine(
            model, grad_accum=cfg.train.grad_accum, grad_clip=cfg.train.grad_clip, optimizer=opt,
            scheduler_fn=lambda o: build_scheduler(o, cfg.train),
            zero_stage=case.stage, groups=groups, bf16=True,
        )  # fmt: skip
    config = zero.deepspeed_config(
        grad_accum=cfg.train.grad_accum, grad_clip=cfg.train.grad_clip, zero_stage=case.stage
    )
    config["bf16"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=lambda o: build_scheduler(o, cfg.train), mpu=groups,
        config=config, dist_init_required=False,
    )  # fmt: skip
    return engine


def _error(fn) -> str | None:
    try:
        fn()
    except RuntimeError as e:
        return str(e)
    return None


def run_case(case: Case) -> dict:
    cfg, rank = job(case.stage), dist.get_rank()
    zero._skip_shm_comm_build()
    engine = _engine(case, cfg)
    objective, cond = make_objective(cfg.diffusion), Conditioner(cfg, torch.device("cpu"))
    batch = latent_batch(cfg, rank)
    computed: list[torch.dtype] = []  # the dtype a linear computed in, each call
    cached: list[bool] = []  # whether autocast's weight-cast cache was on in that call
    q = engine.module.blocks[0].attn.q
    q.register_forward_hook(lambda m, a, out: computed.append(out.dtype))
    q.register_forward_hook(lambda m, a, out: cached.append(torch.is_autocast_cache_enabled()))

    def train_forward():
        prep = cond(batch, torch.Generator().manual_seed(rank))
        # the DeepSpeed trainer's autocast around the engine, CUDA's flag raised as on a GPU
        with zero.autocast("cpu", bf16=True), cuda_autocast_flag():
            out = objective.loss(engine, prep.x0, prep.kwargs, generator=torch.Generator().manual_seed(7))
        return out.per_frame.mean(1)

    if case.old_bf16_section:
        prep = cond(batch, torch.Generator().manual_seed(rank))
        return {
            "param_dtype": str(next(engine.module.parameters()).dtype),
            "train_error": _error(train_forward),
            # what validation and samples did before they took the training precision: the module alone
            "module_error": _error(lambda: engine.module(prep.x0, torch.rand(len(prep.x0)), **prep.kwargs)),
        }

    videos = evaluate.draw_samples(engine.module, objective, cond, cfg, seed=3)
    sample_dtypes, computed[:] = sorted({str(d) for d in computed}), []
    val = evaluate.validation_loss(engine.module, objective, cond, evaluate.HeldOut([batch], 1), cfg, rank)
    val_dtypes, computed[:] = sorted({str(d) for d in computed}), []
    fp32 = job(case.stage, "fp32")
    val_fp32 = evaluate.validation_loss(
        engine.module, objective, cond, evaluate.HeldOut([batch], 1), fp32, rank
    )
    computed.clear()
    per_sample = train_forward()
    train_dtypes = sorted({str(d) for d in computed})
    zero.backward(engine, per_sample, SAMPLES_PER_RANK * dist.get_world_size())
    step = zero.step(engine)
    losses = [None] * dist.get_world_size()
    dist.all_gather_object(losses, per_sample.detach())
    loaded = [None] * dist.get_world_size()
    dist.all_gather_object(loaded, {"text": cond.text is not None, "codec": cond._codec is not None})
    return {
        "videos": torch.from_numpy(videos),
        "sample_dtypes": sample_dtypes,
        "val": val,
        "val_fp32": val_fp32,
        "val_dtypes": val_dtypes,
        "train_dtypes": train_dtypes,
        "losses": losses,
        "applied": step.applied,
        "grad_norm": step.grad_norm,
        "cache_used": any(cached),
        "param_dtypes": sorted({str(p.dtype) for p in engine.module.parameters()}),
        "loaded": loaded,
        "rank1_videos_shape": _rank1_shape(videos),
    }


def _rank1_shape(videos: np.ndarray) -> tuple:
    shapes = [None] * dist.get_world_size()
    dist.all_gather_object(shapes, tuple(videos.shape))
    return shapes[1]


def worker(rank: int, world: int, port: int, cases: list[Case], out_dir: str) -> None:
    env = {"LOCAL_RANK": str(rank), "DS_ACCELERATOR": "cpu"}
    serve(rank, world, port, cases, out_dir, run_case, env=env)
