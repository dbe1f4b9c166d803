"""Runs parallel-layout cases inside one spawned gloo process group (one group per world size).

Each case builds the tiny model under its layout with :func:`parallel.parallelize.build_parallel_model`
(the FSDP engine's build), the same initial weights everywhere, and takes three AdamW steps on the same
global batch through the trainer's own step arithmetic: :class:`launch.engine.FsdpEngine`'s backward
(``dims.grad_scale``, division by the global sample count) and update (clipping, agreement on
finiteness), :func:`launch.engine.sample_losses` (per-sample loss), :func:`~launch.engine.global_samples`
and :func:`~launch.engine.mean_loss`. Noise and times are the trainer's draws
(``step_seed(seed, dp_rank, step)``) where the layout has one data-parallel rank, so a cp or tp peer
that drew other numbers fails; with several data-parallel ranks the trainer's draws differ from one
process's by design (another rank, another stream), so those cases use the batch's fixed noise and times.
Rank 0 records the losses and the gathered gradients of the first step; :func:`reference` does the same
in one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import DTensor

from dit.config import DiTConfig
from dit.diffusion import DiffusionConfig, make_objective
from launch.batches import Prepared, step_seed
from launch.engine import FsdpEngine, global_samples, mean_loss, sample_losses
from parallel.config import ParallelConfig
from parallel.parallelize import build_parallel_model, make_dims
from tests.dit.helpers import random_model
from tests.parallel.group import serve
from tests.parallel.lora_helpers import lora_model, prepare_lora
from tests.parallel.tp_plan_worker import ltx_shaped

GLOBAL_BATCH = 4
STEPS = 3


def arch(layout: str = "full", heads: int = 4, qk_norm: str = "per_head") -> DiTConfig:
    return DiTConfig(
        in_channels=4, hidden_size=32, depth=2, num_heads=heads, text_dim=16, patch_size=(1, 2, 2),
        mlp="swiglu", qk_norm=qk_norm, attention_layout=layout,
    )  # fmt: skip


@dataclass
class Case:
    name: str
    parallel: dict = field(default_factory=dict)
    layout: str = "full"
    qk_norm: str = "per_head"
    """``model.arch.qk_norm``: ``across_heads`` (Wan, LTX) all-reduces a statistic over the tp ranks."""
    ltx: bool = False
    """The LTX-Video-shaped model (:func:`tests.parallel.tp_plan_worker.ltx_shaped`, patch 1×2×2):
    per-sample RoPE tables with a head axis, cut over the tokens (cp) and the heads (tp); qk_norm unused."""
    lora: bool = False
    """peft LoRA adapters (:data:`tests.parallel.lora_helpers.LORA`) on the frozen base, as the trainer
    builds them: injected into the meta model before any parallelism (``prepare``) and into the CPU model
    whose state fills it."""
    base_dtype: str = "fp32"
    """``finetune.base_dtype`` of the LoRA base (bf16: FSDP2 gathers mixed dtypes as bytes)."""

    def arch(self) -> DiTConfig:
        if self.ltx:
            return ltx_shaped(self.layout).replace(patch_size=(1, 2, 2))
        return arch(self.layout, qk_norm=self.qk_norm)

    @property
    def split_batch(self) -> bool:
        """Several data-parallel ranks split the batch: noise and times are the batch's fixed ones."""
        p = ParallelConfig(**self.parallel)
        return p.dp_replicate * max(p.dp_shard, 1) > 1


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
        "fps": torch.tensor([24.0, 8.0, 30.0, 12.0]),  # the clips' frame rates (LTX's RoPE)
    }


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is None:  # a frozen parameter (LoRA's base): the test checks which names have gradients
            continue
        out[name] = (g.full_tensor() if isinstance(g, DTensor) else g).detach().clone()
    return out


def train(
    cfg: DiTConfig,
    pcfg: ParallelConfig,
    world: int,
    fixed_draws: bool = False,
    lora: bool = False,
    block_swap: int = 0,
    base_dtype: str = "fp32",
) -> dict:
    """Three optimizer steps of ``cfg`` under ``pcfg``; returns losses and first-step gradients.

    Args:
        fixed_draws: the batch's fixed noise and times instead of the trainer's draws (see the module
            doc); needed, and only allowed, where ``pcfg`` splits the batch over data-parallel ranks.
        lora: train the adapters of a frozen base (:func:`tests.parallel.lora_helpers.lora_model`) instead
            of every weight.
        block_swap: ``finetune.block_swap`` (one process).
        base_dtype: ``finetune.base_dtype`` of the LoRA base.
    """
    dims = make_dims(pcfg, world, cfg)
    if world > 1 and fixed_draws != (dims.dp > 1):
        raise ValueError(
            f"fixed_draws={fixed_draws} with {dims.dp} data-parallel ranks (see Case.split_batch)"
        )
    mesh = dims.build_mesh("cpu")
    if lora:
        model = build_parallel_model(
            cfg, dims, mesh, pcfg, lambda: lora_model(cfg, base_dtype),
            prepare=lambda m: prepare_lora(m, base_dtype), block_swap=block_swap,
        )  # fmt: skip
    else:
        model = build_parallel_model(cfg, dims, mesh, pcfg, lambda: random_model(cfg), block_swap=block_swap)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    cpu = torch.device("cpu")
    engine = FsdpEngine(model=model, opt=opt, sched=sched, dims=dims, device=cpu, grad_clip=1.0)
    objective = make_objective(DiffusionConfig())
    data = batch(cfg)
    dp_rank = dims.dp_rank(mesh)
    per = GLOBAL_BATCH // dims.dp
    mine = {k: v[dp_rank * per : (dp_rank + 1) * per] for k, v in data.items()}
    kwargs = {"context": mine["context"], "context_mask": mine["context_mask"]}
    if cfg.needs_fps:
        kwargs["fps"] = mine["fps"]  # B values, as launch.batches passes them
    prep = Prepared(mine["x0"], kwargs, mine["cond_frames"], (~mine["cond_frames"]).sum(1))
    fixed = {"noise": mine["noise"], "t": mine["t"]} if fixed_draws else {}
    b, _, frames, h, w = prep.x0.shape
    pt, ph, pw = cfg.patch_size
    tokens = (frames // pt) * (h // ph) * (w // pw)
    losses, grads = [], None
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(step_seed(0, dp_rank, step))
        total = global_samples(b, dims)
        per_sample = sample_losses(engine, objective, prep, tokens=tokens, generator=gen, **fixed)
        engine.backward(per_sample, total, last=True)
        loss = mean_loss(float(per_sample.detach().sum()), total, dims)
        if step == 0:
            grads = _grads(model)
        _, applied, _ = engine.update(loss)
        assert applied, f"step {step} skipped"
        losses.append(loss)
    return {"losses": losses, "grads": grads}


def reference(case: Case) -> dict:
    return train(
        case.arch(), ParallelConfig(), 1, case.split_batch, lora=case.lora, base_dtype=case.base_dtype
    )


def worker(rank: int, world: int, port: int, cases: list[Case], out_dir: str) -> None:
    serve(
        rank,
        world,
        port,
        cases,
        out_dir,
        lambda c: train(
            c.arch(), ParallelConfig(**c.parallel), world, c.split_batch, c.lora, base_dtype=c.base_dtype
        ),
    )
