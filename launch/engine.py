"""The engine: the part of a training step that depends on how the model is distributed.

The trainer (:mod:`launch.train`) holds an :class:`Engine` and owns the loop, the data, the EMA and the
metrics; the engine owns the parallel model, its optimizer and schedule, and five operations: the
module the forward calls (under the engine's autocast), backward, update, save and resume.
``parallel.engine`` picks one:

- ``fsdp`` (:class:`FsdpEngine`, here): FSDP2 + DTensor tensor parallelism + context parallelism,
  built on the meta device by :func:`parallel.parallelize.build_parallel_model`; DCP checkpoints that
  reshard to any layout.
- ``deepspeed`` (:class:`launch.engine_deepspeed.ZeroEngine`): DeepSpeed ZeRO-1/2/3 + megatron-core
  tensor parallelism; DeepSpeed is imported only when this engine is asked for.

The step arithmetic both engines and the parity tests share is here too (:func:`sample_losses`,
:func:`global_samples`, :func:`mean_loss`): a step's gradient is that of the per-sample mean over the
global batch, however the samples were split over ranks and micro-steps.
"""

from __future__ import annotations

import contextlib
import logging
import math
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LRScheduler

from dit.diffusion import Objective
from dit.extras import require
from dit.model import build_model, num_params
from launch.batches import Prepared
from launch.config import JobConfig
from launch.distributed import DistEnv, all_reduce
from launch.finetune import apply_init, freeze
from launch.optim import EMA, build_optimizer, build_scheduler
from parallel import checkpoint as ckpt
from parallel.dims import ParallelDims
from parallel.grads import clip_grad_norm
from parallel.parallelize import build_parallel_model

log = logging.getLogger("launch.train")


class Engine(Protocol):
    """What the trainer asks of a distributed model (see the module doc)."""

    model: nn.Module
    """The plain module holding the weights: the EMA, validation and samples use it."""
    opt: torch.optim.Optimizer
    sched: LRScheduler
    n_params: int
    """Parameters of the whole model, however they are split over ranks."""
    n_trainable: int
    """Of them, those that train (all but ``init.freeze``'s, or a LoRA run's adapters)."""
    base: dict | None
    """A LoRA run's base model (``{"init_from": …, "fingerprint": …}``, see :class:`BaseRecord`;
    the fingerprint on the rank that built the initial weights); None in full training."""

    def forward_module(self) -> nn.Module:
        """What the training forward calls (the model, or a wrapper that owns its hooks)."""

    def autocast(self) -> AbstractContextManager:
        """The context of the training forward (bf16 autocast in a bf16 run)."""

    def ema_part(self, p: nn.Parameter) -> Tensor:
        """The tensor this rank holds of parameter ``p``, which the EMA averages."""

    def backward(self, per_sample: Tensor, total: float, last: bool) -> None:
        """Backward of one micro-batch's per-sample losses; ``total`` is the step's global sample
        count (:func:`global_samples`), ``last`` marks the step's last micro-batch."""

    def update(self, loss: float) -> tuple[float, bool, float]:
        """Clip and step unless the loss or a gradient is non-finite on any rank; returns (gradient
        norm before clipping, whether the update was applied, its learning rate)."""

    def save(
        self, root: Path, step: int, ema: EMA | None, rank_state: dict, files: dict[str, str], keep: int
    ) -> Path:
        """Write ``root/step-XXXXXXXX/`` collectively: weights, optimizer, schedule, ``ema``, ``step``,
        this rank's ``rank_state`` and the text ``files``; keep the newest ``keep`` (0: all)."""

    def resume(self, path: Path, ema: EMA | None) -> tuple[int, dict | None]:
        """Load :meth:`save`'s ``path`` (and ``ema``); returns (step, this rank's ``rank_state``, or
        None when it belongs to another layout and the data order restarts)."""


def layout_of(dims: ParallelDims) -> list[int]:
    """The layout a checkpoint's rank states belong to (a loader position is one data split's)."""
    return [dims.dp_replicate, dims.dp_shard, dims.cp, dims.cp_ring, dims.tp]


# ---- the step arithmetic of every engine (and of the parity tests) --------------------------------
def sample_losses(
    engine: Engine,
    objective: Objective,
    prep: Prepared,
    *,
    tokens: int | None,
    generator: torch.Generator | None,
    noise: Tensor | None = None,
    t: Tensor | None = None,
) -> Tensor:
    """The per-sample losses (B) of one micro-batch through ``engine``: each sample's mean over the
    frames that count in it (clean conditioning frames do not).

    Args:
        tokens: the sequence length, for a token-dependent time shift.
        generator: draws noise and times; the trainer seeds it with
            ``launch.batches.step_seed(seed, dp_rank, step)``, so cp × tp peers draw the same.
        noise, t: fixed noise and times instead (tests that split one batch over data-parallel ranks).
    """
    with engine.autocast():
        out = objective.loss(
            engine.forward_module(),
            prep.x0,
            prep.kwargs,
            cond_frames=prep.cond_frames,
            tokens=tokens,
            noise=noise,
            t=t,
            generator=generator,
        )
    return out.per_frame.sum(1) / prep.loss_frames.clamp(min=1)  # B


def global_samples(local: int, dims: ParallelDims, device: torch.device | None = None) -> float:
    """The step's sample count over all ranks (a collective). Each sample is counted by the
    ``dims.copies`` (cp × tp) ranks that share it, so the sum is divided by that. Every backward
    needs it (DeepSpeed before the first), hence known before the step's first forward."""
    return all_reduce(float(local), "sum", device) / dims.copies


def mean_loss(loss_sum: float, total: float, dims: ParallelDims, device: torch.device | None = None) -> float:
    """The step's per-sample mean loss from each rank's sum of its per-sample losses (a collective)."""
    return all_reduce(loss_sum, "sum", device) / dims.copies / total


# ---- FSDP2 -------------------------------------------------------------------------------------
@dataclass
class FsdpEngine:
    """FSDP2 (HSDP), DTensor tensor parallelism and context parallelism (``parallel.engine=fsdp``)."""

    model: nn.Module
    opt: torch.optim.Optimizer
    sched: LRScheduler
    dims: ParallelDims
    device: torch.device
    grad_clip: float
    """``train.grad_clip``; 0: measure the norm only."""
    bf16: bool = False
    """bf16 autocast around the forward (fp32 weights)."""
    rank: int = 0
    """Global rank (which rank file of a checkpoint is this rank's)."""
    n_params: int = 0
    n_trainable: int = 0
    base: dict | None = None
    """A LoRA run's base (:class:`launch.engine.Engine`): its checkpoints hold the adapters only."""

    def forward_module(self) -> nn.Module:
        return self.model

    def autocast(self) -> AbstractContextManager:
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def ema_part(self, p: nn.Parameter) -> Tensor:
        return p  # a DTensor: the EMA shadow is sharded as the parameter is

    def backward(self, per_sample: Tensor, total: float, last: bool) -> None:
        # FSDP averages gradients over its ranks; dims.grad_scale makes that a sum, and the division by
        # the global sample count makes the step a per-sample mean, however the samples were split over
        # ranks and micro-steps (decode failures can shorten a batch). FSDP2 reduce-scatters on every
        # micro-step (``last`` unused) and accumulates the sharded gradients: skipping the sync until the
        # last one would hold unsharded fp32 gradients of every block (+53 GiB per GPU for 14B at
        # grad_accum=2); the price is one reduce-scatter per micro-step
        (per_sample.sum() * (self.dims.grad_scale / total)).backward()

    def update(self, loss: float) -> tuple[float, bool, float]:
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = clip_grad_norm(params, self.grad_clip if self.grad_clip > 0 else math.inf)
        ok = math.isfinite(loss) and math.isfinite(grad_norm)
        bad = all_reduce(0.0 if ok else 1.0, "max", self.device) > 0
        lr = self.opt.param_groups[0]["lr"]
        if not bad:
            self.opt.step()
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return grad_norm, not bad, lr

    def _state(self, ema: EMA | None, step: int) -> dict:
        if self.base is None:
            msd, osd = get_state_dict(self.model, self.opt)
        else:
            # a LoRA checkpoint holds the trainable state only: the frozen base is rebuilt from init.from
            # (base.json); the optimizer and the EMA hold the adapters alone already
            opts = StateDictOptions(ignore_frozen_params=True)
            msd, osd = get_state_dict(self.model, self.opt, options=opts)
            msd = adapters_only(msd)
        return {
            "model": msd,
            "optim": osd,
            "sched": self.sched.state_dict(),
            "ema": ema.state_dict() if ema else {},
            "step": torch.tensor(step),
        }

    def save(
        self, root: Path, step: int, ema: EMA | None, rank_state: dict, files: dict[str, str], keep: int
    ) -> Path:
        return ckpt.save(root, step, self._state(ema, step), rank_state, self.rank, files=files, keep=keep)

    def resume(self, path: Path, ema: EMA | None) -> tuple[int, dict | None]:
        state = self._state(ema, 0)
        own = ckpt.load(path, state, self.rank)
        self._set_state(state["model"], state["optim"])
        self.sched.load_state_dict(state["sched"])
        if ema:
            ema.load_state_dict(state["ema"])
        if own is None or own.get("layout") != layout_of(self.dims):
            # the weights and optimizer reshard (DCP); a loader position belongs to one data split
            log.warning(
                "%s was saved under another parallel layout: weights and optimizer resharded, data order "
                "restarts",
                path,
            )
            own = None
        return int(state["step"]), own

    def _set_state(self, msd: dict, osd: dict) -> None:
        if self.base is None:
            set_state_dict(self.model, self.opt, model_state_dict=msd, optim_state_dict=osd)
            return
        # the adapters alone: the base stays as built; a missing adapter is an error all the same
        opts = StateDictOptions(strict=False)
        keys = set_state_dict(self.model, self.opt, model_state_dict=msd, optim_state_dict=osd, options=opts)
        missing = adapters_only(dict.fromkeys(keys.missing_keys))
        if missing or keys.unexpected_keys:
            raise ValueError(
                f"the checkpoint's adapters do not fit this model (missing {sorted(missing)[:4]}, "
                f"unexpected {sorted(keys.unexpected_keys)[:4]}): check finetune.lora.targets"
            )


def adapters_only(state: dict) -> dict:
    """The LoRA adapters' items of a model state dict (peft's names, :func:`launch.lora.is_adapter`)."""
    from launch.lora import is_adapter

    return {k: v for k, v in state.items() if is_adapter(k)}


@dataclass
class BaseRecord:
    """What a LoRA run's checkpoints say of their frozen base (their ``base.json``): ``init.from`` and
    :func:`launch.lora.base_fingerprint` of the plain model it built (before the adapters)."""

    init_from: str
    fingerprint: str | None = None
    """Set by :func:`initial_model` on the process that builds the initial weights (rank 0 of the
    FSDP engine, every rank of DeepSpeed's)."""

    def as_dict(self) -> dict:
        return {"init_from": self.init_from, "fingerprint": self.fingerprint}


def base_model(cfg: JobConfig) -> nn.Module:
    """The plain model a run starts from, on CPU in fp32: ``init_weights`` with the job's seed, then
    ``init.from`` (:func:`launch.finetune.apply_init`). A LoRA run's frozen base is this model (its
    fingerprint goes to ``base.json``); :func:`launch.interop.adapters.lora_base` rebuilds it with this
    very function, so the two cannot build different bases."""
    model = build_model(cfg.model.arch, device="cpu", seed=cfg.seed)
    if cfg.init.from_:
        report = apply_init(
            model,
            cfg.init.from_,
            cfg.model.arch,
            use_ema=cfg.init.use_ema,
            min_match=cfg.init.min_match,
            expert=cfg.init.expert,
            new=cfg.init.new,
            allow_arch_changes=cfg.init.allow_arch_changes,
        )
        log.info("init.from=%s: %s", cfg.init.from_, report.summary())
    return model


def initial_model(cfg: JobConfig, base: BaseRecord | None = None) -> nn.Module:
    """The full initial model on CPU: :func:`base_model`; in a LoRA run then its fingerprint (into
    ``base``), the adapters and the base's storage (:func:`adapt`), so its state dict has the names
    and dtypes of the meta build's."""
    model = base_model(cfg)
    if cfg.finetune.lora.enabled and base is not None:
        from launch.lora import base_fingerprint

        base.fingerprint = base_fingerprint(model)
    adapt(model, cfg, quiet=True)
    return model


def adapt(model: nn.Module, cfg: JobConfig, quiet: bool = False) -> None:
    """``init.freeze``, a LoRA run's adapters (``finetune.lora``, seeded by ``seed``: every build gets
    the same bits; every other parameter frozen) and the frozen base's storage
    (``finetune.base_dtype``), in place. The same on the meta build (names, dtypes, modules: an fp8
    base has a scale per weight) and on the CPU initial model (values).

    Args:
        quiet: say nothing (the initial model; the meta build says it on every rank)."""
    ft = cfg.finetune
    if quiet:
        freeze(model, cfg.init.freeze)
    else:
        freeze_logged(model, cfg.init.freeze)
    if ft.lora.enabled:
        from launch.lora import apply_lora

        report = apply_lora(model, ft.lora, seed=cfg.seed)
        if not quiet:
            log.info("finetune.lora: %s", report.summary())
    if ft.base_dtype != "fp32":
        from launch.lora import store_base

        store_base(model, ft.base_dtype)


@torch.no_grad()
def adapter_delta_norm(start: EMA, scale: float) -> float:
    """The Frobenius norm, over every adapted module, of what the adapters now add to its base weight
    beyond what they added at the start: ``scale · (B·A − B₀·A₀)`` (B₀ = 0 for the default and gaussian
    inits, so ``scale · B·A``). ``start`` is the snapshot of the adapters (an :class:`EMA` of the
    trainable parameters, never updated); its parameters hold the weights now. Whole matrices are
    gathered (a collective under FSDP: every rank calls this)."""
    whole = lambda t: (t.full_tensor() if isinstance(t, DTensor) else t).float()  # noqa: E731
    now = dict(zip(start.names, start.params, strict=True))
    then = dict(zip(start.names, start.shadow, strict=True))
    total = torch.zeros((), dtype=torch.float64)
    for name in start.names:
        if ".lora_A." not in name:
            continue
        b_name = name.replace(".lora_A.", ".lora_B.")
        a, b, a0, b0 = whole(now[name]), whole(now[b_name]), whole(then[name]), whole(then[b_name])
        delta = scale * (b @ a - b0 @ a0)  # out × in, the weight's shape
        total += delta.double().pow(2).sum().cpu()
    return float(total.sqrt())


def num_trainable(model: nn.Module) -> int:
    """Parameters that train (whole counts, however they are split over ranks)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def freeze_logged(model: nn.Module, patterns: list[str]) -> None:
    """``init.freeze``: turn off the gradients of the matching parameters."""
    frozen = freeze(model, patterns)
    if frozen:
        log.info("froze %d parameter tensors matching init.freeze", frozen)


def build_fsdp_engine(
    cfg: JobConfig, env: DistEnv, dims: ParallelDims, mesh: DeviceMesh | None, bf16: bool
) -> FsdpEngine:
    """The model built on meta and parallelized before any weight exists; rank 0 makes the initial
    weights (:func:`initial_model`) and they are broadcast into every rank's shards. A LoRA run's
    adapters are injected into both (:func:`adapt`) before any parallelism."""
    lora = cfg.finetune.lora
    base = BaseRecord(cfg.init.from_ or "") if lora.enabled else None
    if lora.enabled and not cfg.init.from_ and env.rank == 0:
        log.warning(
            "finetune.lora.rank=%d without init.from: the base is a freshly initialised model, whose "
            "adaLN-Zero gates and output layer are zero and stay frozen, so the adapters get no gradient",
            lora.rank,
        )

    model = build_parallel_model(
        cfg.model.arch,
        dims,
        mesh,
        cfg.parallel,
        lambda: initial_model(cfg, base),
        device=env.device,
        bf16=bf16 and env.device.type == "cuda",
        prepare=lambda m: adapt(m, cfg),
        block_swap=cfg.finetune.block_swap,
    )
    model.train()
    opt = build_optimizer(model, cfg.train, env.device, lora=lora)
    return FsdpEngine(
        model=model,
        opt=opt,
        sched=build_scheduler(opt, cfg.train),
        dims=dims,
        device=env.device,
        grad_clip=cfg.train.grad_clip,
        bf16=bf16,
        rank=env.rank,
        n_params=num_params(model),
        n_trainable=num_trainable(model),
        base=base.as_dict() if base else None,
    )


def require_deepspeed() -> None:
    """DeepSpeed and megatron-core (the DeepSpeed engine's tensor parallelism), imported, or
    :class:`dit.extras.MissingExtra` naming the extra to install."""
    for module in ("deepspeed", "megatron.core"):
        require(module, "parallel.engine=deepspeed")


def check_finetune_deepspeed(cfg: JobConfig) -> None:
    """The ``finetune`` settings the DeepSpeed engine refuses, as errors naming the keys (here, not in
    :mod:`launch.engine_deepspeed`, so that checking needs no DeepSpeed import)."""
    ft = cfg.finetune
    if cfg.parallel.engine != "deepspeed":
        return
    if ft.lora.enabled:
        # ZeRO would partition and checkpoint the whole frozen base with the adapters (its checkpoints
        # and whole-model files are full ones), and nothing here tests its parity with peft's layers
        raise ValueError(
            f"finetune.lora.rank={ft.lora.rank} with parallel.engine=deepspeed: LoRA training (adapter-only "
            "checkpoints, the base fingerprint) is implemented for parallel.engine=fsdp; use "
            "parallel.engine=fsdp (FSDP2 shards the frozen base as ZeRO-3 would)"
        )
    if ft.base_dtype != "fp32":
        raise ValueError(
            f"finetune.base_dtype={ft.base_dtype} with parallel.engine=deepspeed: DeepSpeed keeps one dtype "
            "for all weights; use parallel.engine=fsdp or finetune.base_dtype=fp32"
        )
    if ft.block_swap:
        # ZeRO-3 partitions every parameter and gathers it itself (block swap would move the empty
        # partitions' placeholders), and ZeRO-1/2 engines move the whole module to the device when made
        raise ValueError(
            f"finetune.block_swap={ft.block_swap} with parallel.engine=deepspeed: DeepSpeed owns where the "
            "weights live (ZeRO-3 partitions them); use parallel.zero_stage=3 with parallel.cpu_offload, or "
            "parallel.engine=fsdp on one GPU for block swap. parallel.activation_offload works under both"
        )


def build_engine(
    cfg: JobConfig, env: DistEnv, dims: ParallelDims, mesh: DeviceMesh | None, bf16: bool
) -> Engine:
    """The engine ``parallel.engine`` names, holding the job's initial weights.

    Args:
        dims, mesh: the layout (:func:`parallel.parallelize.make_dims`, ``dims.build_mesh``).
        bf16: the run computes in bf16 (``launch.batches.run_bf16``).
    """
    if cfg.parallel.engine == "deepspeed":
        check_finetune_deepspeed(cfg)  # before DeepSpeed's import
        require_deepspeed()
        from launch.engine_deepspeed import build_zero_engine  # imports DeepSpeed: only when asked for

        return build_zero_engine(cfg, env, dims, mesh, bf16)
    return build_fsdp_engine(cfg, env, dims, mesh, bf16)
