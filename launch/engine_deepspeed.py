"""The DeepSpeed ZeRO engine (``parallel.engine=deepspeed``): :class:`launch.engine.Engine` with
DeepSpeed's backward, step and checkpoints, and megatron-core tensor parallelism. The trainer's loop
(:mod:`launch.train`) is the same for both engines.

What differs from the FSDP2 engine, and why:

- Every rank builds the full initial model (seed, then ``init.from``) and keeps its tensor-parallel
  slice; ZeRO-3 partitions it when the engine is made. Start-up therefore needs one full fp32 model
  in host memory per rank (the FSDP engine builds on meta and needs it on rank 0 only).
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
- LoRA (``finetune.lora.rank`` > 0), a low-precision frozen base (``finetune.base_dtype``) and block
  swapping (``finetune.block_swap``: DeepSpeed owns where weights live) are refused: the adapter-only
  checkpoints, the base fingerprint and the parity of ZeRO with peft's frozen base layers are the FSDP
  engine's (see :func:`check_deepspeed`). ``parallel.activation_offload`` works as under FSDP (after
  activation checkpointing, before ZeRO wraps the model).
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from deepspeed.runtime.engine import DeepSpeedEngine
from safetensors import safe_open
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.optim.lr_scheduler import LRScheduler

from dit.model import num_params
from launch.config import JobConfig
from launch.distributed import DistEnv
from launch.engine import check_finetune_deepspeed, freeze_logged, initial_model, layout_of, num_trainable
from launch.optim import EMA, build_optimizer, build_scheduler
from parallel import checkpoint as ckpt
from parallel import zero
from parallel.dims import ParallelDims
from parallel.megatron_tp import apply_megatron_tp
from parallel.offload import MemoryOptions, apply_memory_options
from parallel.parallelize import apply_activation_checkpointing, cut_sequence
from parallel.zero_parts import local_part, part_of, whole

log = logging.getLogger("launch.train")


@dataclass
class ZeroEngine:
    """A DeepSpeed engine behind :class:`launch.engine.Engine`'s protocol."""

    ds: DeepSpeedEngine
    opt: torch.optim.Optimizer
    """The client optimizer DeepSpeed steps (the trainer reads its learning rates)."""
    groups: zero.DeepSpeedGroups
    dims: ParallelDims
    device: torch.device
    bf16: bool = False
    rank: int = 0
    """Global rank (which rank file of a checkpoint is this rank's)."""
    n_params: int = 0
    n_trainable: int = 0
    base: dict | None = None
    """Always None: LoRA runs are refused here (:func:`check_deepspeed`)."""
    memory: MemoryOptions | None = None
    """``parallel.activation_offload``'s hooks (:func:`parallel.offload.apply_memory_options`)."""

    @property
    def model(self) -> nn.Module:
        return self.ds.module

    @property
    def sched(self) -> LRScheduler:
        return self.ds.lr_scheduler

    def forward_module(self) -> nn.Module:
        return self.ds

    def autocast(self) -> AbstractContextManager:
        return zero.autocast(self.device.type, self.bf16)  # no weight-cast cache (ZeRO-3)

    def ema_part(self, p: nn.Parameter) -> Tensor:
        return local_part(p)  # the ZeRO-3 partition (or the tensor-parallel slice)

    def backward(self, per_sample: Tensor, total: float, last: bool) -> None:
        zero.backward(self.ds, per_sample, total)
        if not last:
            zero.step(self.ds)  # DeepSpeed's micro-step bookkeeping; the update is in update()

    def update(self, loss: float) -> tuple[float, bool, float]:
        # DeepSpeed checks the gradients for inf/nan over its groups and skips the whole update
        # (weights, moments, schedule) everywhere when one has any; a non-finite loss makes them so
        lr = self.ds.get_lr()[0]
        result = zero.step(self.ds)
        return result.grad_norm, result.applied, lr

    # ---- checkpoints -----------------------------------------------------------------------------
    def _whole_ema(self, ema: EMA) -> dict[str, Tensor]:
        """The whole EMA on rank 0 (``{}`` elsewhere); collective."""
        out = {}
        for name, shadow, p in zip(ema.names, ema.shadow, ema.params, strict=True):
            full = whole(shadow, p, self.groups.dp_group, self.groups.tp_group)
            if self.rank == 0:
                out[name] = full.cpu().clone()
        return out

    def save(
        self, root: Path, step: int, ema: EMA | None, rank_state: dict, files: dict[str, str], keep: int
    ) -> Path:
        weights = zero.full_state_dict(self.ds, self.groups.tp_group, all_ranks=False)
        tensors = {ckpt.WHOLE_FILES["model"]: weights}
        if ema:
            tensors[ckpt.WHOLE_FILES["ema"]] = self._whole_ema(ema)
        return zero.save_checkpoint(
            self.ds,
            root,
            step,
            rank_state=rank_state,
            files=files,
            tensors=tensors if self.rank == 0 else {},
            keep=keep,
        )

    def resume(self, path: Path, ema: EMA | None) -> tuple[int, dict | None]:
        ckpt.verify(path, distributed=True)  # before any file is read (remembered: read once)
        own = ckpt.rank_state(path, self.rank)  # None: saved by fewer ranks; missing otherwise: an error
        saved, now = (own.get("layout") if own is not None else None), layout_of(self.dims)
        if saved != now:
            raise ValueError(
                f"{path} was written by DeepSpeed under another layout or world size (dp_replicate, "
                f"dp_shard, cp, cp_ring, tp = {saved}; now {now}): ZeRO partitions do not "
                f"reshard. Resume with the same parallel.* and world size, or start a new run (another "
                f"run.dir) with init.from={path}"
            )
        extra, own_state = zero.load_checkpoint(self.ds, path)
        if ema:
            with safe_open(path / ckpt.WHOLE_FILES["ema"], framework="pt") as f:
                parts = {
                    name: part_of(f.get_tensor(name), p, self.groups.dp_group, self.groups.tp_group)
                    for name, p in zip(ema.names, ema.params, strict=True)
                }
            ema.load_state_dict(parts)
        return int(extra["step"]), own_state


def check_deepspeed(cfg: JobConfig, dims: ParallelDims) -> None:
    """The ``parallel`` settings DeepSpeed cannot honour, as errors naming them (also run by --dry-run)."""
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
    check_finetune_deepspeed(cfg)


def build_zero_engine(
    cfg: JobConfig, env: DistEnv, dims: ParallelDims, mesh: DeviceMesh | None, bf16: bool
) -> ZeroEngine:
    """The :class:`ZeroEngine` for ``cfg`` (see the module doc), holding the job's initial weights."""
    p = cfg.parallel
    check_deepspeed(cfg, dims)
    if mesh is None:
        raise ValueError(
            "parallel.engine=deepspeed needs a process group: start the job with torchrun (or srun), "
            "or use parallel.engine=fsdp for one process"
        )
    groups = zero.DeepSpeedGroups(dp_group=mesh["dp_shard_cp"].get_group(), tp_group=mesh["tp"].get_group())
    model = initial_model(cfg).to(env.device)
    n_params = num_params(model)
    freeze_logged(model, cfg.init.freeze)
    n_trainable = num_trainable(model)  # whole counts: before the tensor-parallel slicing
    apply_megatron_tp(model, groups.tp_group)
    if dims.tp > 1 and p.sequence_parallel and env.rank == 0:
        log.info(
            "parallel.sequence_parallel is an engine=fsdp setting: megatron-core tensor parallel runs "
            "without it"
        )
    cut_sequence(model, dims, mesh)  # no sequence parallelism: megatron's cuts dim 0 of [s, b, h]
    apply_activation_checkpointing(model, p.activation_checkpointing)  # the FSDP engine's, selective too
    memory = None
    if p.activation_offload:
        # each block's saved activations to pinned host memory, as under FSDP; what ZeRO-3 gathers is a
        # parameter (or a view of one), which stays. Block swap is refused (check_finetune_deepspeed)
        memory = apply_memory_options(model, activation_offload=True, block_swap=0, device=env.device)
    model.train()
    opt = build_optimizer(model, cfg.train, env.device)
    ds = zero.build_engine(
        model,
        grad_accum=cfg.train.grad_accum,
        grad_clip=cfg.train.grad_clip,
        optimizer=opt,
        scheduler_fn=lambda o: build_scheduler(o, cfg.train),
        zero_stage=p.zero_stage,
        groups=groups,
        offload=p.cpu_offload,
        bf16=bf16,
    )
    return ZeroEngine(
        ds=ds, opt=opt, groups=groups, dims=dims, device=env.device, bf16=bf16, rank=env.rank,
        n_params=n_params, n_trainable=n_trainable, memory=memory,
    )  # fmt: skip
