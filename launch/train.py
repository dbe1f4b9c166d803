"""Train a spacetime DiT: ``python -m launch.train [--config FILE] [key=value ...]``.

Runs as one process (CPU or one GPU) or under ``torchrun``. Rerunning the same command resumes from the
newest complete checkpoint in ``run.dir``. Read top to bottom: set-up, resume, then the loop
(batch → encode → loss → backward → agree on finiteness → clip → step → EMA → metrics → eval → samples
→ checkpoint → preemption check). What depends on how the model is distributed (FSDP2 or DeepSpeed:
``parallel.engine``) is the trainer's :class:`~launch.engine.Engine`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import shlex
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from data.batch import Batch
from data.pipeline import Loader, NoBatchError, NoShards, build_loader
from dit.config import PRESETS
from dit.diffusion import Objective, make_objective
from dit.extras import MissingExtra
from dit.flops import count, peak_flops
from launch import evaluate
from launch.batches import Conditioner, expect_for, run_bf16, step_seed
from launch.config import JobConfig, load_config, save_config, to_yaml
from launch.config_help import ConfigHelp
from launch.datacheck import NotScorable, check_sources, suggest_command
from launch.distributed import DistEnv, Preemption, all_reduce, init_distributed, requeue_slurm_job, shutdown
from launch.engine import (
    Engine,
    adapter_delta_norm,
    build_engine,
    global_samples,
    layout_of,
    mean_loss,
    sample_losses,
)
from launch.metrics import Metrics, Progress, max_memory_gib
from launch.optim import EMA
from launch.progress import install_log_handler
from launch.resume import BASE_FILE, ResumeRefused, check_base, check_resumable, lock_run_dir
from launch.runlock import RunDirLocked, RunLock
from launch.sample import write_mp4
from parallel import checkpoint as ckpt
from parallel.dims import ParallelDims
from parallel.parallelize import make_dims, reshard

log = logging.getLogger("launch.train")


@dataclass
class StepStats:
    """One optimizer step, as :meth:`Trainer.train_step` returns it. The field names are the metrics
    keys (:mod:`launch.metrics`): ``tokens`` and ``flops`` are summed into a record, the others
    averaged."""

    loss: float
    """Per-sample mean over the global batch (non-finite for a skipped step)."""
    lr: float
    grad_norm: float
    """Global gradient norm before clipping."""
    tokens: float = 0.0
    """Latent tokens of this rank's share of the step (a cp × tp group shares its samples' work)."""
    flops: float = 0.0
    """Model FLOPs of this rank's share of the step."""
    data_wait: float = 0.0
    encode_time: float = 0.0
    forward_time: float = 0.0
    backward_time: float = 0.0
    optim_time: float = 0.0
    """Wall seconds of each phase (see :class:`PhaseClock`)."""

    PHASES = ("data_wait", "encode_time", "forward_time", "backward_time", "optim_time")

    def means(self) -> dict[str, float]:
        """The averaged metrics of the step (every field but the summed ``tokens`` and ``flops``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("tokens", "flops")}


@dataclass
class Trainer:
    """Everything the loop touches, built once by :func:`setup`; the distributed model is its engine."""

    cfg: JobConfig
    env: DistEnv
    dims: ParallelDims
    engine: Engine
    ema: EMA | None
    objective: Objective
    conditioner: Conditioner
    loader: Loader
    run_dir: Path
    dp_rank: int
    step: int = 0
    bad_streak: int = 0
    skipped: int = 0
    flops_cache: dict = field(default_factory=dict)
    lock: RunLock | None = None
    """``run.dir``'s lock (rank 0), released by :meth:`close`."""
    start: EMA | None = None
    """A LoRA run's adapters as they started (an EMA never updated): the "no effect" guard's reference
    (:func:`lora_effect`)."""
    start_output: torch.Tensor | None = None
    """The model's output with :attr:`start`'s adapters on the guard's fixed batch: the same input and
    weights at every validation, so computed once."""

    @property
    def model(self) -> torch.nn.Module:
        """The plain module holding the weights (validation, samples and the EMA use it)."""
        return self.engine.model

    @property
    def opt(self) -> torch.optim.Optimizer:
        return self.engine.opt

    @property
    def n_params(self) -> int:
        """Parameters of the whole model (however they are split over ranks)."""
        return self.engine.n_params

    # ---- checkpoint state ------------------------------------------------------------------------
    def rank_state(self) -> dict:
        np_state = np.random.get_state()
        rng = {
            "torch": torch.get_rng_state(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate(),
        }
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state(self.env.device)
        return {
            "rng": rng,
            "loader": self.loader.state_dict(),
            "skipped": self.skipped,
            "layout": layout_of(self.dims),
        }

    def checkpoint(self) -> Path:
        """:meth:`save`, after checking that every weight is finite: a NaN state is never written, so
        the newest checkpoint stays the last good one."""
        self.check_finite()
        return self.save()

    def check_finite(self) -> None:
        """Raise FloatingPointError if any weight or EMA value on any rank is NaN or infinite (a
        collective). A step is applied only when its loss and gradients are finite, but the update
        itself can still overflow (a huge learning rate, a bad restart): this catches the result.
        A frozen base stored in low precision (LoRA, ``finetune.base_dtype``) is not read: no update
        changes it, and float8 has no isfinite."""
        params = self.model.parameters()
        if self.engine.base is not None or self.cfg.finetune.base_dtype != "fp32":
            params = [p for p in params if p.requires_grad]
        tensors = [*params, *(self.ema.shadow if self.ema else [])]
        parts = [t for t in map(_local, tensors) if t.numel()]
        ok = bool(torch.stack([torch.isfinite(t).all() for t in parts]).all()) if parts else True
        if all_reduce(0.0 if ok else 1.0, "max", self.env.device) > 0:
            raise FloatingPointError(
                f"step {self.step}: the weights are no longer finite after the update (train.lr="
                f"{self.cfg.train.lr}); nothing was saved. Rerunning resumes from the newest checkpoint "
                f"in {self.run_dir / 'checkpoints'}; lower train.lr or check the data first"
            )

    def close(self) -> None:
        """Release ``run.dir``'s lock (the end of a run, or of a failed one)."""
        if self.lock is not None:
            self.lock.release()

    def save(self) -> Path:
        files = {"config.yaml": to_yaml(self.cfg)}
        if self.engine.base is not None:  # a LoRA checkpoint: the adapters, and which base they are for
            files[BASE_FILE] = json.dumps(self.engine.base, indent=1)
        root = self.run_dir / "checkpoints"
        path = self.engine.save(root, self.step, self.ema, self.rank_state(), files, self.cfg.checkpoint.keep)
        log.info("saved %s", path)
        return path

    def resume(self, path: Path) -> None:
        check_base(path, self.engine.base, self.cfg, self.env)
        self.step, own = self.engine.resume(path, self.ema)
        if own is not None:
            self.restore_rank_state(own)

    def restore_rank_state(self, own: dict) -> None:
        """RNG states, loader position and skip count saved by :meth:`rank_state` on this rank."""
        rng = own["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state((rng["numpy"][0], rng["numpy"][1].numpy().astype(np.uint32), *rng["numpy"][2:]))
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"], self.env.device)
        self.loader.load_state_dict(own["loader"])
        self.skipped = int(own["skipped"])

    # ---- one optimizer step ----------------------------------------------------------------------
    def train_step(self, batches) -> StepStats:
        """Accumulate ``grad_accum`` batches, agree on finiteness, clip, step. Returns the step's
        stats, including wall time per phase."""
        cfg, dev = self.cfg, self.env.device
        # seeded by the data-parallel rank: the cp/tp ranks that share a batch must draw the same noise
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, self.dp_rank, self.step))
        clock = PhaseClock(dev, sync=cfg.logging.phase_times)
        micro_batches = [next(batches) for _ in range(cfg.train.grad_accum)]
        clock.lap("data_wait")
        total = global_samples(sum(len(b) for b in micro_batches), self.dims, dev)
        stats = StepStats(loss=0.0, lr=0.0, grad_norm=0.0)
        loss_sum = 0.0
        for micro, batch in enumerate(micro_batches):
            loss_sum += self._micro_step(batch, gen, micro, total, stats, clock)
        stats.loss = mean_loss(loss_sum, total, self.dims, dev)
        stats.grad_norm, applied, stats.lr = self.engine.update(stats.loss)
        if applied:
            if self.ema:
                self.ema.update(self.step)
            self.bad_streak = 0
        else:
            self._skip()
        clock.lap("optim_time")
        self.step += 1
        for phase, seconds in clock.times.items():
            setattr(stats, phase, seconds)
        return stats

    def _micro_step(
        self,
        batch: Batch,
        gen: torch.Generator,
        micro: int,
        total: float,
        stats: StepStats,
        clock: PhaseClock,
    ) -> float:
        """Forward and backward of one micro-batch; adds its tokens and FLOPs to ``stats`` and returns
        the sum of its per-sample losses."""
        prep = self.conditioner(batch, gen)
        clock.lap("encode_time")
        b, _, frames, h, w = prep.x0.shape
        n_tok = self._tokens(frames, h, w)
        per_sample = sample_losses(self.engine, self.objective, prep, tokens=n_tok, generator=gen)
        clock.lap("forward_time")
        self._backward(per_sample, total, last=micro == self.cfg.train.grad_accum - 1)
        clock.lap("backward_time")
        # a cp × tp group shares the work of its samples: count this rank's share
        stats.tokens += b * n_tok / self.dims.copies
        stats.flops += self._flops(frames, h, w, b, prep.kwargs) / self.dims.copies
        return float(per_sample.detach().sum())

    def _backward(self, per_sample: torch.Tensor, total: float, last: bool) -> None:
        """The engine's backward (one seam, which tests instrument on the instance)."""
        self.engine.backward(per_sample, total, last)

    def _skip(self) -> None:
        max_bad = self.cfg.run.max_bad_steps
        self.bad_streak += 1
        self.skipped += 1
        log.warning(
            "step %d: non-finite loss or gradient; skipped (%d in a row)", self.step + 1, self.bad_streak
        )
        if self.bad_streak >= max_bad:
            raise FloatingPointError(
                f"{self.bad_streak} consecutive non-finite steps (run.max_bad_steps={max_bad})"
            )

    def _tokens(self, frames: int, h: int, w: int) -> int:
        pt, ph, pw = self.cfg.model.arch.patch_size
        return (frames // pt) * (h // ph) * (w // pw)

    def _flops(self, frames: int, h: int, w: int, b: int, kwargs: dict) -> float:
        text_len = kwargs["context"].shape[1] if "context" in kwargs else 0
        key = (frames, h, w, text_len)
        if key not in self.flops_cache:
            self.flops_cache[key] = count(self.cfg.model.arch, frames, h, w, batch=1, text_len=text_len)[
                "flops_train_step"
            ]
        return self.flops_cache[key] * b


def _local(p: torch.Tensor) -> torch.Tensor:
    """What this rank holds of a tensor: its ZeRO-3 partition, DTensor shard, or itself."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor
    return p.to_local() if isinstance(p, DTensor) else p


class PhaseClock:
    """Wall time of each phase of a step (:attr:`StepStats.PHASES`). On CUDA, work is asynchronous:
    with ``sync`` each boundary waits for the device (exact phases, slower steps); without it the times
    say where the host waited."""

    def __init__(self, device: torch.device, sync: bool):
        self.cuda_sync = sync and device.type == "cuda"
        self.times = dict.fromkeys(StepStats.PHASES, 0.0)
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.cuda_sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.times[phase] += now - self.last
        self.last = now


def setup(cfg: JobConfig) -> Trainer:
    """Process group, run-directory lock, model, optimizer, loader; resumed from the newest intact
    checkpoint of ``run.dir`` when there is one."""
    p = cfg.parallel
    tf32 = cfg.run.precision == "fp32"  # under bf16 the fp32 layers stay exact (init_distributed)
    env = init_distributed(cfg.run.device, p.backend, p.cpu_offload, p.timeout_minutes, tf32=tf32)
    run_dir = Path(cfg.run.dir)
    lock = lock_run_dir(run_dir, env)
    try:
        # the newest intact checkpoint; damaged newer ones are named and moved aside (so retention
        # never counts them); the ranks share the reading that verifies it
        found = ckpt.latest(run_dir / "checkpoints", distributed=True, quarantine=True)
        if found is not None:
            check_resumable(found, cfg, run_dir)
        if env.is_main:
            save_config(cfg, run_dir / "config.yaml")  # after the check: the old one may be its reference
        trainer = _build(cfg, env, run_dir)
        trainer.lock = lock
        if found is not None:
            trainer.resume(found)
            log.info("resumed from %s (step %d)", found, trainer.step)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return trainer


def _build(cfg: JobConfig, env: DistEnv, run_dir: Path) -> Trainer:
    dims = make_dims(cfg.parallel, env.world, cfg.model.arch)
    mesh = dims.build_mesh(env.device.type)
    engine = build_engine(cfg, env, dims, mesh, run_bf16(cfg, env.device))
    torch.manual_seed(cfg.seed)  # the same global RNG state on every rank, whoever built the weights
    dp_rank = dims.dp_rank(mesh)
    decay = cfg.train.ema_decay
    lora = engine.base is not None
    return Trainer(
        cfg=cfg,
        env=env,
        dims=dims,
        engine=engine,
        ema=EMA(engine.model, decay, part=engine.ema_part, trainable_only=lora) if decay > 0 else None,
        objective=make_objective(cfg.diffusion),
        conditioner=Conditioner(cfg, env.device),
        loader=build_loader(
            cfg.data, dp_rank, dims.dp, expect=expect_for(cfg), pin_memory=env.device.type == "cuda"
        ),
        run_dir=run_dir,
        dp_rank=dp_rank,
        start=EMA(engine.model, 0.0, part=engine.ema_part, trainable_only=True) if lora else None,
    )


def run(cfg: JobConfig) -> dict:
    """Train to ``train.steps`` (or until preempted or stopped); returns the last metrics record."""
    tr = setup(cfg)
    try:
        return _train(tr)
    finally:
        tr.close()


def _train(tr: Trainer) -> dict:
    cfg, env = tr.cfg, tr.env
    dev = env.device
    progress = Progress(cfg.train.steps, cfg.run.progress if env.is_main else "off")  # rank 0 only
    metrics = Metrics(tr.run_dir, env.is_main, dev, cfg.logging.tensorboard, progress)
    signals = Preemption(cfg.run.preempt_signal)
    if env.is_main:
        n, trained = tr.n_params, tr.engine.n_trainable
        share = f" ({trained:,} trainable, {trained / n:.2%})" if trained != n else ""
        name = cfg.model.preset
        if name in PRESETS and cfg.model.arch != PRESETS[name]:  # say so: tiny.yaml widens the tiny preset
            name = f"{name} preset with model.arch changes"
        progress.line(
            f"{name}: {n:,} parameters{share}, {env.world} process(es) on {dev}; run dir {tr.run_dir}"
        )
    held_out = evaluate.held_out_batches(cfg, tr.dp_rank, tr.dims.dp) if cfg.eval.every else None
    score_samples = None
    if cfg.eval.sample_metrics:
        # imported here: it brings the probe and scipy, which a run without sample metrics never uses
        from launch import sample_metrics

        score_samples = sample_metrics.for_trainer(tr)
    peak = peak_flops() if dev.type == "cuda" else None
    batches = iter(tr.loader)
    record: dict = {}
    last_saved = tr.step if tr.step else -1  # a resumed run starts at its checkpoint's step
    prev = time.perf_counter()
    try:
        while tr.step < cfg.train.steps:
            stats = tr.train_step(batches)
            # a step's time runs from the end of the previous step, so logging, evaluation and
            # checkpoints in between count (as loop overhead: time in none of the phases)
            now = time.perf_counter()
            step_time, prev = now - prev, now
            _update_metrics(metrics, stats, step_time, peak, dev)
            step, last = tr.step, tr.step == cfg.train.steps
            progress.update(step, loss=stats.loss, lr=stats.lr)  # before its record: the line has its rate
            extra = {}
            if cfg.eval.every and (step % cfg.eval.every == 0 or last):
                extra["val_loss"] = _with_ema(
                    tr,
                    lambda: evaluate.validation_loss(
                        tr.model, tr.objective, tr.conditioner, held_out, cfg, tr.dp_rank
                    ),
                )
                if score_samples is not None:
                    extra |= _with_ema(tr, lambda: score_samples(metrics))
                if tr.start is not None:
                    extra |= _with_ema(tr, lambda: lora_effect(tr, held_out))
            if step % cfg.logging.every == 0 or last:
                tr.check_finite()  # on the logging schedule, and before every save
                record = metrics.log(step, extra | {"skipped_steps": tr.skipped})
                if tr.lock is not None:
                    tr.lock.touch()
            elif extra:
                metrics.write({"step": step, **extra})
            if cfg.logging.sample_every and (step % cfg.logging.sample_every == 0 or last):
                write_samples(tr, metrics)
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or last:
                tr.checkpoint()
                last_saved = step
            request = signals.agreed(dev)
            if request:
                if last_saved != step:
                    tr.checkpoint()
                _stopped(tr, progress, step, request, signals)
                break
    finally:
        progress.close()
        metrics.close()
        signals.close()
    if env.is_main and tr.step >= cfg.train.steps:
        summary = tr.loader.error_summary()
        progress.line(
            f"done: {tr.step} steps in {tr.run_dir}: metrics.jsonl, checkpoints/, samples/, and "
            f"tensorboard --logdir {tr.run_dir / 'tb'}; data: {summary['seen']} samples read, "
            f"skipped {summary['skipped'] or 'none'}"
        )
    shutdown()
    return record


def _stopped(tr: Trainer, progress: Progress, step: int, request: int, signals: Preemption) -> None:
    """The line (and, on preemption, the SLURM requeue) after the checkpoint of a requested stop."""
    if request == Preemption.PREEMPT:
        progress.line(f"preempted at step {step}: checkpoint saved; rerun the same command to resume")
        if tr.env.is_main:
            requeue_slurm_job()
        return
    why = signals.received.name if signals.received else "a stop request on another rank"
    progress.line(f"stopped at step {step} ({why}): checkpoint saved; rerun the same command to resume")


def _update_metrics(metrics: Metrics, stats: StepStats, step_time: float, peak: float | None, dev) -> None:
    tflops = stats.flops / step_time / 1e12
    metrics.update(
        stats.tokens,
        max_memory_gib(dev),
        flops=stats.flops,
        **stats.means(),
        step_time=step_time,
        tflops_per_device=tflops,
        mfu=tflops * 1e12 / peak if peak else None,
    )


def _with_ema(tr: Trainer, fn, use_ema: bool = True):
    """``fn()`` (forwards without backward) with the EMA swapped in when there is one and ``use_ema``."""
    ctx = tr.ema.swapped_in() if (tr.ema and use_ema) else contextlib.nullcontext()
    with ctx:
        try:
            return fn()
        finally:
            reshard(tr.model)  # before the swap back: FSDP2 would reuse the gathered EMA weights


def lora_effect(tr: Trainer, held_out: evaluate.HeldOut) -> dict[str, float]:
    """The guard against "my LoRA has no effect", on the weights being validated (the EMA's when there
    is one), every rank (collectives):

    - ``lora/adapter_norm``: :func:`launch.engine.adapter_delta_norm`, what the adapters add to the
      base weights (scale·B·A for the default and gaussian inits);
    - ``lora/output_change``: ‖out − out₀‖ / ‖out₀‖, the model's output on each rank's first held-out
      batch (the middle time of the validation grid, the validation's noise) against out₀, the same
      forward with the adapters as they started: the base model's output for every init.

    A warning says so while either is 0 after training started."""
    cfg, dev = tr.cfg, tr.env.device
    norm = adapter_delta_norm(tr.start, cfg.finetune.lora.scale)
    out = _fixed_output(tr, held_out)
    if tr.start_output is None:
        with tr.start.swapped_in():
            tr.start_output = _fixed_output(tr, held_out)
    ref = tr.start_output
    counts = held_out.scored > 0  # a rank with only padding batches adds nothing
    diff = all_reduce(float((out - ref).pow(2).sum()) if counts else 0.0, "sum", dev)
    size = all_reduce(float(ref.pow(2).sum()) if counts else 0.0, "sum", dev)
    change = (diff / size) ** 0.5 if size > 0 else 0.0
    if tr.step > 0 and (norm == 0 or change == 0) and tr.env.is_main:
        log.warning(
            "step %d: the LoRA adapters have not changed the model (lora/adapter_norm=%g, "
            "lora/output_change=%g): check finetune.lora.lr (or train.lr), finetune.lora.targets and "
            "finetune.lora.rank",
            tr.step,
            norm,
            change,
        )
    return {"lora/adapter_norm": norm, "lora/output_change": change}


@torch.no_grad()
def _fixed_output(tr: Trainer, held_out: evaluate.HeldOut) -> torch.Tensor:
    """The model's output (fp64, on the host) on this rank's first held-out batch, the middle grid time
    and the validation's noise of each sample: the same input at every validation."""
    cfg, model, dev = tr.cfg, tr.model, tr.env.device
    batch = held_out.batches[0]
    prep = tr.conditioner(batch, torch.Generator().manual_seed(cfg.seed), train=False)
    point = cfg.eval.timesteps // 2
    noise = evaluate.held_out_noise(cfg, batch.key, point, prep.x0.shape, dev)  # the validation's noise
    t = evaluate.grid_times(tr.objective, cfg, prep.x0.shape[0], point, dev)
    seen: list[torch.Tensor] = []

    def forward(*args, **kwargs):
        out = model(*args, **kwargs)
        seen.append(out.detach().double().cpu())
        return out

    was_training = model.training
    model.eval()  # no adapter dropout
    try:
        with tr.engine.autocast():
            tr.objective.loss(forward, prep.x0, prep.kwargs, noise=noise, t=t)
    finally:
        model.train(was_training)
        reshard(model)  # before a swap: FSDP2 would reuse the gathered weights
    return seen[0]


def write_samples(tr: Trainer, metrics: Metrics) -> None:
    cfg = tr.cfg
    draw = lambda: evaluate.draw_samples(tr.model, tr.objective, tr.conditioner, cfg, seed=cfg.seed)  # noqa: E731
    videos = _with_ema(tr, draw, use_ema=cfg.sample.use_ema)
    if not tr.env.is_main:
        return
    out = tr.run_dir / "samples"
    out.mkdir(exist_ok=True)
    for i, frames in enumerate(videos):
        write_mp4(out / f"step-{tr.step:08d}-{i}.mp4", frames, cfg.sample.fps, caption=cfg.sample.prompts[i])
        metrics.video(f"samples/{i}", frames, tr.step, cfg.sample.fps)


class _Parser(argparse.ArgumentParser):
    """argparse, except that under ``--dry-run`` a bad command line still prints the dry run's one
    JSON object (``ok: false``) before the usage message and exit 2."""

    dry_run = False

    def error(self, message: str):
        if self.dry_run:
            print(json.dumps({"ok": False, "errors": [f"command line: {message}"], "warnings": []}))
        super().error(message)


def main(argv: list[str] | None = None) -> None:
    p = _Parser(prog="python -m launch.train", description="Train a spacetime DiT.", add_help=False)
    p.dry_run = "--dry-run" in (sys.argv[1:] if argv is None else argv)
    p.add_argument(
        "-h", "--help", action=ConfigHelp, schema=JobConfig, metavar="GROUP",
        help="show this help and every config key (with GROUP or KEY, e.g. train: only those, in full)",
    )  # fmt: skip
    p.add_argument("--config", help="YAML config (default: launch/configs/tiny.yaml)")
    p.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. train.steps=100 model.arch.depth=4"
    )
    only = p.add_mutually_exclusive_group()
    only.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (--config, then the overrides: the run.dir/config.yaml a run "
        "would save) as YAML and exit; nothing is created",
    )
    only.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config (buckets vs codec and patch, eval vs val_shards, the parallel layout "
        "for --world-size), build the model on the meta device, print tokens, FLOPs and the memory plan "
        "as one JSON object, and exit",
    )
    p.add_argument(
        "--world-size", type=int, help="--dry-run: the number of GPUs the job will run on (default: 1)"
    )
    p.add_argument("--gpu", default="h100", help="--dry-run: GPU type for the plan (h100, h200, a100, b200)")
    a = p.parse_intermixed_args(argv)  # options may follow the overrides: ... key=value --world-size 8
    install_log_handler()  # basicConfig whose records go above the progress bar
    try:
        cfg = load_config(a.config, a.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        if a.dry_run:  # the dry run's contract: one JSON object on stdout, whatever went wrong
            print(json.dumps({"ok": False, "errors": [f"config: {e}"], "warnings": []}))
        raise SystemExit(2) from e
    if a.print_config:
        print(to_yaml(cfg), end="")
        return
    if a.dry_run:
        from launch.dryrun import dry_run  # the planner: only when asked for

        raise SystemExit(dry_run(cfg, world_size=1 if a.world_size is None else a.world_size, gpu=a.gpu))
    try:
        check_sources(cfg)  # before the model is built: shards (not clips), val_shards not the demo's
        run(cfg)
    except (
        RunDirLocked,
        ResumeRefused,
        ckpt.CheckpointError,
        MissingExtra,
        NoShards,
        NoBatchError,
        NotScorable,
    ) as e:
        text = str(e)
        if isinstance(e, NoBatchError):  # the loader knows the shards, not the model's patch: say it whole
            generic = f"python -m data.buckets suggest {shlex.quote(cfg.data.shards)} > buckets.json"
            text = text.replace(generic, suggest_command(cfg))
        print(f"error: {text}", file=sys.stderr)
        raise SystemExit(2) from e
    except KeyboardInterrupt:  # Ctrl-C before the loop installed its handler
        print("aborted: nothing saved since the newest checkpoint", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
