"""The trainer under DeepSpeed ZeRO (``parallel.engine=deepspeed``): :class:`launch.train.Trainer`'s
loop with DeepSpeed's backward, step and checkpoints, and megatron-core tensor parallelism.

What differs from the FSDP2 trainer, and why:

- Every rank builds the full initial model (seed, then ``init.from``) and keeps its tensor-parallel
  slice; ZeRO-3 partitions it when the engine is made. Start-up therefore needs one full fp32 model
  in host memory per rank (the FSDP trainer builds on meta and needs it on rank 0 only).
- DeepSpeed's data-parallel group is dp_shard × cp: the cp ranks of a sample hold partial gradients
  of it, which ZeRO's reduction sums (FSDP's ``dp_shard_cp``). ``parallel.dp_replicate`` has no
  meaning here (ZeRO partitions over all of them) and must be 1.
- Tensor parallelism is megatron-core's (:mod:`parallel.megatron_tp`), without its sequence
  parallelism (its mappings cut dim 0 of [s, b, h]; our activations are B×N×D), so
  ``parallel.sequence_parallel`` is an FSDP-engine setting. ``parallel.compile`` is refused: ZeRO-3
  hooks gather parameters inside the module, across graph breaks.
- A checkpoint is DeepSpeed's own (weights, ZeRO partitions of the optimizer, scheduler; exact resume
  under the same layout and world size only: ZeRO partitions do not reshard) plus whole fp32
  ``model.safetensors`` and ``ema.safetensors`` gathered to rank 0, so ``launch.export`` and
  ``init.from`` read it in one process as they read DCP checkpoints (and a run under another layout
  can start from it with ``init.from``).
- bf16 is DeepSpeed's ``torch_autocast`` (:func:`parallel.zero.deepspeed_config`): the module's
  weights stay fp32 and are the master weights, the engine's forward runs under bf16 autocast.
- The EMA averages the module's (fp32) weights, each rank over its part: a ZeRO-3 partition or a
  tensor-parallel slice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from data.pipeline import build_loader
from dit.diffusion import make_objective
from dit.model import num_params
from launch.batches import Conditioner, expect_for
from launch.config import JobConfig, to_yaml
from launch.distributed import DistEnv
from launch.finetune import freeze
from launch.optim import EMA, build_optimizer, build_scheduler
from launch.train import Trainer, initial_model
from parallel import checkpoint as ckpt
from parallel import zero
from parallel.context import apply_sequence_cut
from parallel.dims import ParallelDims
from parallel.megatron_tp import apply_megatron_tp
from parallel.parallelize import apply_activation_checkpointing
from parallel.zero_parts import local_part, part_of, whole

log = logging.getLogger("launch.train")


@dataclass(kw_only=True)
class DeepSpeedTrainer(Trainer):
    engine: object
    groups: zero.DeepSpeedGroups

    def forward_module(self) -> nn.Module:
        return self.engine

    def _autocast(self):
        return zero.autocast(self.env.device.type, self.bf16)  # no weight-cast cache (ZeRO-3)

    def _backward(self, per_sample: torch.Tensor, total: float, last: bool) -> None:
        zero.backward(self.engine, per_sample, total)
        if not last:
            zero.step(self.engine)  # DeepSpeed's micro-step bookkeeping; the update is in _update

    def _update(self, loss: float) -> tuple[float, bool, float]:
        # DeepSpeed checks the gradients for inf/nan over its groups and skips the whole update
        # (weights, moments, schedule) everywhere when one has any; a non-finite loss makes them so
        lr = self.engine.get_lr()[0]
        result = zero.step(self.engine)
        return result.grad_norm, result.applied, lr

    # ---- checkpoints -----------------------------------------------------------------------------
    def _whole_ema(self) -> dict[str, torch.Tensor]:
        """The whole EMA on rank 0 (``{}`` elsewhere); collective."""
        out = {}
        for name, shadow, p in zip(self.ema.names, self.ema.shadow, self.ema.params, strict=True):
            full = whole(shadow, p, self.groups.dp_group, self.groups.tp_group)
            if self.env.rank == 0:
                out[name] = full.cpu().clone()
        return out

    def save(self) -> Path:
        weights = zero.full_state_dict(self.engine, self.groups.tp_group, all_ranks=False)
        tensors = {ckpt.WHOLE_FILES["model"]: weights}
        if self.ema:
            tensors[ckpt.WHOLE_FILES["ema"]] = self._whole_ema()
        path = zero.save_checkpoint(
            self.engine,
            self.run_dir / "checkpoints",
            self.step,
            rank_state=self.rank_state(),
            files={"config.yaml": to_yaml(self.cfg)},
            tensors=tensors if self.env.rank == 0 else {},
            keep=self.cfg.checkpoint.keep,
        )
        log.info("saved %s", path)
        return path

    def resume(self, path: Path) -> None:
        ckpt.verify(path, distributed=True)  # before any file is read (remembered: read once)
        own = ckpt.rank_state(path, self.env.rank)  # None: saved by fewer ranks; missing otherwise: an error
        saved = own.get("layout") if own is not None else None
        if saved != self._layout():
            raise ValueError(
                f"{path} was written by DeepSpeed under another layout or world size (dp_replicate, "
                f"dp_shard, cp, cp_ring, tp = {saved}; now {self._layout()}): ZeRO partitions do not "
                f"reshard. Resume with the same parallel.* and world size, or start a new run (another "
                f"run.dir) with init.from={path}"
            )
        extra, own_state = zero.load_checkpoint(self.engine, path)
        self.step = int(extra["step"])
        if self.ema:
            with safe_open(path / ckpt.WHOLE_FILES["ema"], framework="pt") as f:
                parts = {
                    name: part_of(f.get_tensor(name), p, self.groups.dp_group, self.groups.tp_group)
                    for name, p in zip(self.ema.names, self.ema.params, strict=True)
                }
            self.ema.load_state_dict(parts)
        self.restore_rank_state(own_state)


def check_deepspeed(cfg: JobConfig, dims: ParallelDims) -> None:
    p = cfg.parallel
    if dims.dp_replicate > 1:
        raise ValueError(
            f"parallel.dp_replicate={dims.dp_replicate} with parallel.engine=deepspeed: ZeRO partitions "
            "over every data-parallel rank; use parallel.dp_shard"
        )
    if p.compile:
        raise ValueError(
            "parallel.compile=true needs parallel.engine=fsdp (ZeRO-3 hooks break compiled blocks)"
        )


def setup_deepspeed(cfg: JobConfig, env: DistEnv, dims: ParallelDims, run_dir: Path, bf16: bool):
    """The :class:`DeepSpeedTrainer` for ``cfg`` (see the module doc), resumed if ``run_dir`` has a
    checkpoint."""
    p = cfg.parallel
    check_deepspeed(cfg, dims)
    mesh = dims.build_mesh(env.device.type)
    groups = zero.DeepSpeedGroups(dp_group=mesh["dp_shard_cp"].get_group(), tp_group=mesh["tp"].get_group())
    model = initial_model(cfg).to(env.device)
    n_params = num_params(model)
    frozen = freeze(model, cfg.init.freeze)
    if frozen:
        log.info("froze %d parameter tensors matching init.freeze", frozen)
    apply_megatron_tp(model, groups.tp_group)
    if dims.cp > 1:
        apply_sequence_cut(
            model,
            cp_group=mesh["cp"].get_group(),
            ulysses_group=mesh["cp_ulysses"].get_group() if dims.cp_ulysses > 1 else None,
            ring_group=mesh["cp_ring"].get_group() if dims.cp_ring > 1 else None,
            sp_group=None,
        )
    apply_activation_checkpointing(model, p.activation_checkpointing)  # the FSDP engine's, selective too
    model.train()
    opt = build_optimizer(model, cfg.train, env.device)
    engine = zero.build_engine(
        model,
        cfg.train,
        optimizer=opt,
        scheduler_fn=lambda o: build_scheduler(o, cfg.train),
        zero_stage=p.zero_stage,
        groups=groups,
        offload=p.cpu_offload,
        bf16=bf16,
    )
    torch.manual_seed(cfg.seed)
    dp_rank = dims.dp_rank(mesh)
    trainer = DeepSpeedTrainer(
        cfg=cfg,
        env=env,
        dims=dims,
        model=engine.module,
        opt=opt,
        sched=engine.lr_scheduler,
        ema=EMA(engine.module, cfg.train.ema_decay, part=local_part) if cfg.train.ema_decay > 0 else None,
        objective=make_objective(cfg.diffusion),
        cond=Conditioner(cfg, env.device),
        loader=build_loader(
            cfg.data, dp_rank, dims.dp, expect=expect_for(cfg), pin_memory=env.device.type == "cuda"
        ),
        run_dir=run_dir,
        bf16=bf16,
        dp_rank=dp_rank,
        n_params=n_params,
        engine=engine,
        groups=groups,
    )
    return trainer
