"""AdamW with decay/no-decay groups, learning-rate schedules, and an EMA of the weights."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dit import mup
from launch.config import LoraConfig, TrainConfig

log = logging.getLogger(__name__)


def build_optimizer(
    model: nn.Module,
    cfg: TrainConfig,
    device: torch.device,
    fused: bool | None = None,
    lora: LoraConfig | None = None,
) -> torch.optim.AdamW:
    """AdamW over trainable parameters; no weight decay on biases, norms and embedding tables (1-D or
    named ``*table*``/``*embed*`` vectors), the usual convention from GPT-2 on.

    ``fused`` (default: on CUDA) runs one kernel per parameter group over its whole list of tensors:
    the tensors of a group must then be all plain or all DTensors (with tensor parallelism,
    :mod:`parallel.tensor` makes every parameter a DTensor for this reason).

    Under μP (``model.arch.parametrization=mup``) hidden matrices get ``lr × base/width``
    (:func:`dit.mup.lr_multipliers`); each group records its ``lr_mult``. Weight decay stays coupled
    to each group's learning rate (torch's AdamW), as in the ``mup`` package's MuAdam.

    Args:
        lora: ``finetune.lora`` of a LoRA run (rank > 0; the model holds peft adapters and only they
            train): the base learning rate is ``lora.lr`` (0: ``cfg.lr``) and every ``lora_B`` matrix
            gets ``lr_mult = lora.plus_ratio`` (LoRA+). The μP multipliers name the plain model's
            weights, so adapters have none of them. Group 0 (the logged lr) is then the A matrices'.

    The groups depend on the parameters alone (decay or not, μP multiplier, and in a LoRA run ``lora_B``
    or not), never on the learning rates: a checkpoint's optimizer state then loads whatever
    ``finetune.lora.plus_ratio`` (even 1) or ``lr`` the resuming run has, and those take effect (see
    :func:`build_scheduler`).
    """
    arch = getattr(model, "cfg", None)
    mults = mup.lr_multipliers(arch) if arch is not None else {}
    lr = cfg.lr
    plus = 1.0
    if lora is not None and lora.enabled:
        lr, plus = lora.lr or cfg.lr, lora.plus_ratio
    groups: dict[tuple[bool, bool, float], list] = {}  # (is lora_B, decay, μP multiplier)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim < 2 or "table" in name)
        groups.setdefault((".lora_B." in name, decay, mults.get(name, 1.0)), []).append(p)
    # groups at the base learning rate first: param_groups[0]["lr"] is what the trainer logs as lr;
    # lora_B's after every other (its multiplier, plus_ratio, may change at resume: the order may not)
    order = sorted(groups, key=lambda k: (k[0], abs(math.log(k[2])), not k[1]))
    lr_mult = [k[2] * (plus if k[0] else 1.0) for k in order]
    opt = torch.optim.AdamW(
        [
            {
                "params": groups[k],
                "weight_decay": cfg.weight_decay if k[1] else 0.0,
                "lr": lr * m,
                "lr_mult": m,
            }
            for k, m in zip(order, lr_mult, strict=True)
        ],
        lr=lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        fused=device.type == "cuda" if fused is None else fused,
    )
    opt.register_load_state_dict_post_hook(_ConfigPeaks([lr * m for m in lr_mult], lr_mult))
    return opt


class _ConfigPeaks:
    """Optimizer ``load_state_dict`` post-hook: the loaded groups keep this run's peak learning rates
    (``train.lr``, ``finetune.lora.lr``, ``finetune.lora.plus_ratio``), not the checkpoint's, and the
    current lr keeps the checkpoint's place in the schedule (lr / initial_lr). DeepSpeed loads the
    optimizer after the scheduler (:class:`ConfigSchedule` covers the other order); unchanged
    settings leave every bit as loaded (exact resume)."""

    def __init__(self, peaks: list[float], lr_mult: list[float]):
        self.peaks, self.lr_mult = peaks, lr_mult

    def __call__(self, opt: torch.optim.Optimizer) -> None:
        for g, peak, mult in zip(opt.param_groups, self.peaks, self.lr_mult, strict=True):
            g["lr_mult"] = mult
            saved = g.get("initial_lr", peak)
            if saved != peak:
                g["lr"] = peak * (g["lr"] / saved) if saved else peak
                g["initial_lr"] = peak


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` for the update made at optimizer step ``step`` (0-based). The schedule
    spans :func:`horizon` steps; after them it stays at its final value."""
    if cfg.warmup > 0 and step < cfg.warmup:
        return (step + 1) / cfg.warmup
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    steps = horizon(cfg)
    if cfg.schedule == "cosine":
        span = max(1, steps - cfg.warmup)
        progress = min(1.0, (step - cfg.warmup) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd: flat at the peak, then a linear decay over the last ``decay_fraction`` of the schedule
    decay_steps = max(1, round(cfg.decay_fraction * steps))
    start = steps - decay_steps
    if step < start:
        return 1.0
    return 1.0 - (1 - floor) * min(1.0, (step - start + 1) / decay_steps)


def horizon(cfg: TrainConfig) -> int:
    """Steps the schedule spans: ``train.schedule_steps``, or ``train.steps`` when it is not set."""
    return cfg.steps if cfg.schedule_steps is None else cfg.schedule_steps


class ConfigSchedule(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` whose peak learning rates (``base_lrs``) stay this run's after ``load_state_dict``:
    the checkpoint gives the place in the schedule (``last_epoch``), the config the peaks and the shape
    (``train.warmup``, ``schedule``, ``steps``, ``schedule_steps``: the lambda is never saved; a changed
    shape is named at resume by :func:`launch.resume.schedule_change`). A resumed run therefore
    trains at the ``train.lr`` / ``finetune.lora.lr`` / ``finetune.lora.plus_ratio`` it was started
    with (a lower ``train.lr`` after a non-finite step, as the trainer advises, takes effect), logged
    when they differ from the checkpoint's. With unchanged settings every lr is the bits saved."""

    def load_state_dict(self, state_dict: dict) -> None:
        peaks = list(self.base_lrs)
        super().load_state_dict(state_dict)
        saved, self.base_lrs = self.base_lrs, peaks
        if saved != peaks and _rank() == 0:
            log.warning(
                "resumed with other learning rates than the checkpoint's (train.lr, finetune.lora.lr or "
                "finetune.lora.plus_ratio changed): peak lr per parameter group %s, now %s",
                [f"{x:g}" for x in saved],
                [f"{x:g}" for x in peaks],
            )
        lrs = [peak * f(self.last_epoch) for f, peak in zip(self.lr_lambdas, peaks, strict=True)]
        for g, lr, peak in zip(self.optimizer.param_groups, lrs, peaks, strict=True):
            g["lr"], g["initial_lr"] = lr, peak
        self._last_lr = lrs


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> ConfigSchedule:
    return ConfigSchedule(opt, lambda step: lr_factor(step, cfg))


class EMA:
    """Exponential moving average of the weights, kept in fp32 next to them (same sharding).

    ``part(p)`` is the tensor this rank holds of parameter ``p`` (default: ``p`` itself, a DTensor
    shard under FSDP; the ZeRO-3 partition under DeepSpeed, see ``parallel.zero_parts.local_part``).

    ``trainable_only`` (a LoRA run) averages the parameters that train (the adapters) and nothing of the
    frozen base, whose average would be itself. Full training averages every parameter, frozen ones
    (``init.freeze``) included, as its checkpoints always held. An EMA that is never updated is a
    snapshot of the weights it was made with, which :meth:`swapped_in` can put back.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float,
        part: Callable[[nn.Parameter], Tensor] | None = None,
        trainable_only: bool = False,
    ):
        self.decay = decay
        self.part = part or (lambda p: p)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or not trainable_only]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [self.part(p).detach().clone().float() for p in self.params]
        # one foreach per mesh: a foreach op cannot mix meshes, or DTensors and plain tensors (see
        # parallel.grads for when a model's parameters do)
        by_mesh: dict = {}
        for s, p in zip(self.shadow, self.params, strict=True):
            shadows, params = by_mesh.setdefault(getattr(p, "device_mesh", None), ([], []))
            shadows.append(s)
            params.append(p)
        self.groups = list(by_mesh.values())

    @torch.no_grad()
    def update(self, step: int) -> None:
        # warm up the decay (1 + n) / (10 + n) so early averages are not dominated by the initial weights
        d = min(self.decay, (1 + step) / (10 + step))
        for shadows, params in self.groups:
            torch._foreach_lerp_(shadows, [self.part(p).detach().float() for p in params], 1 - d)

    def state_dict(self) -> dict:
        return dict(zip(self.names, self.shadow, strict=True))

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name, s in zip(self.names, self.shadow, strict=True):
                s.copy_(state[name])

    @contextlib.contextmanager
    def swapped_in(self):
        """Temporarily put the EMA weights into the model (for samples and validation)."""
        backup = [self.part(p).detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow, strict=True):
                self.part(p).copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup, strict=True):
                    self.part(p).copy_(b)
