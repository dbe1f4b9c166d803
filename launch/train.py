"""Train a spacetime DiT: ``python -m launch.train [--config FILE] [key=value ...]``.

Runs as one process (CPU or one GPU) or under ``torchrun``. Rerunning the same command resumes from the
newest complete checkpoint in ``run.dir``. Read top to bottom: set-up, resume, then the loop
(batch → encode → loss → backward → agree on finiteness → clip → step → EMA → metrics → eval → samples
→ checkpoint → preemption check).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from data.pipeline import build_loader
from dit.diffusion import make_objective
from dit.flops import count, peak_flops
from dit.model import SpacetimeDiT, build_model, num_params
from launch import evaluate
from launch.batches import Conditioner, expect_for, run_bf16, step_seed
from launch.config import JobConfig, load_config, save_config, to_yaml
from launch.distributed import DistEnv, Preemption, all_reduce, init_distributed, requeue_slurm_job, shutdown
from launch.finetune import apply_init, freeze
from launch.metrics import Metrics, Progress, max_memory_gib
from launch.optim import EMA, build_optimizer, build_scheduler
from launch.resume import ResumeRefused, check_resumable, lock_run_dir
from launch.runlock import RunDirLocked, RunLock
from launch.sample import write_mp4
from parallel import checkpoint as ckpt
from parallel.dims import ParallelDims
from parallel.grads import clip_grad_norm
from parallel.parallelize import make_dims, materialize, parallelize, reshard

log = logging.getLogger("launch.train")


@dataclass
class Trainer:
    """Everything the loop touches, built once by :func:`setup`."""

    cfg: JobConfig
    env: DistEnv
    dims: ParallelDims
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    ema: EMA | None
    objective: object
    cond: Conditioner
    loader: object
    run_dir: Path
    bf16: bool
    dp_rank: int
    n_params: int = 0
    """Parameters of the whole model (however they are split over ranks)."""
    step: int = 0
    bad_streak: int = 0
    skipped: int = 0
    flops_cache: dict = field(default_factory=dict)
    lock: RunLock | None = None
    """``run.dir``'s lock (rank 0), released by :meth:`close`."""

    # ---- checkpoint state ------------------------------------------------------------------------
    def app_state(self) -> dict:
        msd, osd = get_state_dict(self.model, self.opt)
        return {
            "model": msd,
            "optim": osd,
            "sched": self.sched.state_dict(),
            "ema": self.ema.state_dict() if self.ema else {},
            "step": torch.tensor(self.step),
        }

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
            "layout": self._layout(),
        }

    def _layout(self) -> list[int]:
        d = self.dims
        return [d.dp_replicate, d.dp_shard, d.cp, d.cp_ring, d.tp]

    def checkpoint(self) -> Path:
        """:meth:`save`, after checking that every weight is finite: a NaN state is never written, so
        the newest checkpoint stays the last good one."""
        self.check_finite()
        return self.save()

    def check_finite(self) -> None:
        """Raise FloatingPointError if any weight or EMA value on any rank is NaN or infinite (a
        collective). A step is applied only when its loss and gradients are finite, but the update
        itself can still overflow (a huge learning rate, a bad restart): this catches the result."""
        tensors = [*self.model.parameters(), *(self.ema.shadow if self.ema else [])]
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
        path = ckpt.save(
            self.run_dir / "checkpoints",
            self.step,
            self.app_state(),
            self.rank_state(),
            self.env.rank,
            files={"config.yaml": to_yaml(self.cfg)},
            keep=self.cfg.checkpoint.keep,
        )
        log.info("saved %s", path)
        return path

    def resume(self, path: Path) -> None:
        state = self.app_state()
        own = ckpt.load(path, state, self.env.rank)
        set_state_dict(self.model, self.opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.sched.load_state_dict(state["sched"])
        if self.ema:
            self.ema.load_state_dict(state["ema"])
        self.step = int(state["step"])
        if own is None or own.get("layout") != self._layout():
            # the weights and optimizer reshard (DCP); a loader position belongs to one data split
            log.warning(
                "%s was saved under another parallel layout: weights and optimizer resharded, data order "
                "restarts",
                path,
            )
            return
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
    def train_step(self, batches) -> dict:
        """Accumulate ``grad_accum`` batches, agree on finiteness, clip, step. Returns step stats,
        including wall time per phase (data_wait, encode, forward, backward, optim)."""
        cfg, dev = self.cfg, self.env.device
        # seeded by the data-parallel rank: the cp/tp ranks that share a batch must draw the same noise
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, self.dp_rank, self.step))
        clock = PhaseClock(dev, sync=cfg.logging.phase_times)
        micro_batches = [next(batches) for _ in range(cfg.train.grad_accum)]
        clock.lap("data_wait")
        # the step's global sample count scales every backward (DeepSpeed needs it before the first);
        # each sample is counted by the dims.copies (cp × tp) ranks that share it
        local = float(sum(len(b["key"]) for b in micro_batches))
        total = all_reduce(local, "sum", dev) / self.dims.copies
        sums = {"loss_sum": 0.0, "samples": 0, "tokens": 0, "flops": 0.0}
        for micro, batch in enumerate(micro_batches):
            self._micro_step(batch, gen, micro, total, sums, clock)
        loss = all_reduce(sums["loss_sum"], "sum", dev) / self.dims.copies / total
        grad_norm, applied, lr = self._update(loss)
        if applied:
            if self.ema:
                self.ema.update(self.step)
            self.bad_streak = 0
        else:
            self._skip()
        clock.lap("optim")
        self.step += 1
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, **sums, **clock.times}

    def _micro_step(self, batch: dict, gen: torch.Generator, micro: int, total: float, sums: dict, clock):
        prep = self.cond(batch, gen)
        clock.lap("encode")
        b, _, t, h, w = prep.x0.shape
        n_tok = self._tokens(t, h, w)
        # FSDP2 reduce-scatters on every micro-step and accumulates the sharded gradients: skipping the
        # sync until the last one would hold unsharded fp32 gradients of every block (+53 GiB per GPU
        # for 14B at grad_accum=2); the price is one reduce-scatter per micro-step
        last = micro == self.cfg.train.grad_accum - 1
        with self._autocast():
            out = self.objective.loss(
                self.forward_module(),
                prep.x0,
                prep.kwargs,
                cond_frames=prep.cond_frames,
                tokens=n_tok,
                generator=gen,
            )
        per_sample = out.per_frame.sum(1) / prep.loss_frames.clamp(min=1)  # B
        clock.lap("forward")
        self._backward(per_sample, total, last)
        clock.lap("backward")
        sums["loss_sum"] += float(per_sample.detach().sum())
        sums["samples"] += b
        # a cp × tp group shares the work of its samples: count this rank's share
        sums["tokens"] += b * n_tok / self.dims.copies
        sums["flops"] += self._flops(t, h, w, b, prep.kwargs) / self.dims.copies

    # the engine-specific part of a step (FSDP2 here; DeepSpeed in launch/train_deepspeed.py)
    def forward_module(self) -> torch.nn.Module:
        """What the training forward calls."""
        return self.model

    def _backward(self, per_sample: torch.Tensor, total: float, last: bool) -> None:
        # FSDP averages gradients over its ranks; dims.grad_scale makes that a sum, and the division
        # by the global sample count makes the step a per-sample mean, however the samples were split
        # over ranks and micro-steps (decode failures can shorten a batch)
        (per_sample.sum() * (self.dims.grad_scale / total)).backward()

    def _update(self, loss: float) -> tuple[float, bool, float]:
        """Clip and step unless the loss or a gradient is non-finite on any rank; returns
        (gradient norm before clipping, whether the update was applied, its learning rate)."""
        cfg, dev = self.cfg, self.env.device
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = clip_grad_norm(params, cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf)
        bad = all_reduce(0.0 if math.isfinite(loss) and math.isfinite(grad_norm) else 1.0, "max", dev) > 0
        lr = self.opt.param_groups[0]["lr"]
        if not bad:
            self.opt.step()
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return grad_norm, not bad, lr

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

    def _autocast(self):
        if self.bf16:
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _tokens(self, t: int, h: int, w: int) -> int:
        pt, ph, pw = self.cfg.model.arch.patch_size
        return (t // pt) * (h // ph) * (w // pw)

    def _flops(self, t: int, h: int, w: int, b: int, kwargs: dict) -> float:
        text_len = kwargs["context"].shape[1] if "context" in kwargs else 0
        key = (t, h, w, text_len)
        if key not in self.flops_cache:
            self.flops_cache[key] = count(self.cfg.model.arch, t, h, w, batch=1, text_len=text_len)[
                "flops_train_step"
            ]
        return self.flops_cache[key] * b


def _local(p: torch.Tensor) -> torch.Tensor:
    """What this rank holds of a tensor: its ZeRO-3 partition, DTensor shard, or itself."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor
    return p.to_local() if isinstance(p, DTensor) else p


class PhaseClock:
    """Wall time of each phase of a step. On CUDA, work is asynchronous: with ``sync`` each boundary
    waits for the device (exact phases, slower steps); without it the times say where the host waited."""

    def __init__(self, device: torch.device, sync: bool):
        self.cuda_sync = sync and device.type == "cuda"
        self.times = {k: 0.0 for k in ("data_wait", "encode", "forward", "backward", "optim")}
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
    p = cfg.parallel
    dims = make_dims(p, env.world, cfg.model.arch)
    bf16 = run_bf16(cfg, env.device)
    if p.engine == "deepspeed":
        from launch.train_deepspeed import setup_deepspeed  # imports DeepSpeed: only when asked for

        return setup_deepspeed(cfg, env, dims, run_dir, bf16)
    return _setup_fsdp(cfg, env, dims, run_dir, bf16)


def _setup_fsdp(cfg: JobConfig, env: DistEnv, dims: ParallelDims, run_dir: Path, bf16: bool) -> Trainer:
    p = cfg.parallel
    mesh = dims.build_mesh(env.device.type)
    # built on meta and parallelized before any weight exists; rank 0 makes the initial weights
    with torch.device("meta"):
        model = SpacetimeDiT(cfg.model.arch)
    frozen = freeze(model, cfg.init.freeze)
    if frozen:
        log.info("froze %d parameter tensors matching init.freeze", frozen)
    parallelize(model, dims, mesh, p, bf16 and env.device.type == "cuda")
    materialize(model, env.device, mesh, lambda: initial_model(cfg), offload=p.cpu_offload)
    torch.manual_seed(cfg.seed)  # the same global RNG state on every rank, whoever built the weights
    model.train()
    opt = build_optimizer(model, cfg.train, env.device)
    dp_rank = dims.dp_rank(mesh)
    loader = build_loader(
        cfg.data, dp_rank, dims.dp, expect=expect_for(cfg), pin_memory=env.device.type == "cuda"
    )
    trainer = Trainer(
        cfg=cfg,
        env=env,
        dims=dims,
        model=model,
        opt=opt,
        sched=build_scheduler(opt, cfg.train),
        ema=EMA(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None,
        objective=make_objective(cfg.diffusion),
        cond=Conditioner(cfg, env.device),
        loader=loader,
        run_dir=run_dir,
        bf16=bf16,
        dp_rank=dp_rank,
        n_params=num_params(model),
    )
    return trainer


def initial_model(cfg: JobConfig) -> torch.nn.Module:
    """The full initial model on CPU: ``init_weights`` with the job's seed, then ``init.from``."""
    model = build_model(cfg.model.arch, device="cpu", seed=cfg.seed)
    if cfg.init.from_:
        report = apply_init(model, cfg.init.from_, cfg.model.arch, use_ema=cfg.init.use_ema)
        log.info("init.from=%s: %s", cfg.init.from_, report.summary())
    return model


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
    progress = Progress(cfg.train.steps, cfg.run.progress if env.is_main else "lines")
    metrics = Metrics(tr.run_dir, env.is_main, dev, cfg.logging.tensorboard, progress)
    signals = Preemption(cfg.run.preempt_signal)
    if env.is_main:
        n = tr.n_params
        progress.line(
            f"{cfg.model.preset}: {n:,} parameters, {env.world} process(es) on {dev}; run dir {tr.run_dir}"
        )
    val_batches = evaluate.held_out_batches(cfg, tr.dp_rank, tr.dims.dp) if cfg.eval.every else []
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
            extra = {}
            if cfg.eval.every and (step % cfg.eval.every == 0 or last):
                extra["val_loss"] = _with_ema(
                    tr,
                    lambda: evaluate.validation_loss(
                        tr.model, tr.objective, tr.cond, val_batches, cfg, tr.dp_rank
                    ),
                )
            if step % cfg.logging.every == 0 or last:
                tr.check_finite()  # on the logging schedule, and before every save
                record = metrics.log(step, extra | {"skipped_steps": tr.skipped})
                if tr.lock is not None:
                    tr.lock.touch()
            elif extra:
                metrics.write({"step": step, **extra})
            progress.update(step, f"loss {stats['loss']:.4f}")
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


def _update_metrics(metrics: Metrics, stats: dict, step_time: float, peak: float | None, dev) -> None:
    tflops = stats["flops"] / step_time / 1e12
    metrics.update(
        stats["tokens"],
        max_memory_gib(dev),
        flops=stats["flops"],
        loss=stats["loss"],
        lr=stats["lr"],
        grad_norm=stats["grad_norm"],
        step_time=step_time,
        data_wait=stats["data_wait"],
        encode_time=stats["encode"],
        forward_time=stats["forward"],
        backward_time=stats["backward"],
        optim_time=stats["optim"],
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


def write_samples(tr: Trainer, metrics: Metrics) -> None:
    cfg = tr.cfg
    draw = lambda: evaluate.draw_samples(tr.model, tr.objective, tr.cond, cfg, seed=cfg.seed)  # noqa: E731
    videos = _with_ema(tr, draw, use_ema=cfg.sample.use_ema)
    if not tr.env.is_main:
        return
    out = tr.run_dir / "samples"
    out.mkdir(exist_ok=True)
    for i, frames in enumerate(videos):
        write_mp4(out / f"step-{tr.step:08d}-{i}.mp4", frames, cfg.sample.fps)
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
    p = _Parser(prog="python -m launch.train", description="Train a spacetime DiT.")
    p.dry_run = "--dry-run" in (sys.argv[1:] if argv is None else argv)
    p.add_argument("--config", help="YAML config (default: launch/configs/tiny.yaml)")
    p.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. train.steps=100 model.arch.depth=4"
    )
    p.add_argument(
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(a.config, a.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        if a.dry_run:  # the dry run's contract: one JSON object on stdout, whatever went wrong
            print(json.dumps({"ok": False, "errors": [f"config: {e}"], "warnings": []}))
        raise SystemExit(2) from e
    if a.dry_run:
        from launch.dryrun import dry_run  # the planner: only when asked for

        raise SystemExit(dry_run(cfg, world_size=1 if a.world_size is None else a.world_size, gpu=a.gpu))
    try:
        run(cfg)
    except (RunDirLocked, ResumeRefused, ckpt.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    except KeyboardInterrupt:  # Ctrl-C before the loop installed its handler
        print("aborted: nothing saved since the newest checkpoint", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
