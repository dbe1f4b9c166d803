"""DeepSpeed cases run inside one spawned gloo process group per world size, and their one-process
reference (the FSDP trainer's arithmetic in plain torch).

Every case builds the same full tiny model (one seed) on every rank, optionally swaps in megatron
tensor parallelism, wraps it with :func:`parallel.zero.build_engine` and takes four steps on one
fixed global batch with the trainer's loss convention. Rank 0 records the losses, the gathered
first-step gradients, the final whole weights; with ``resume`` a second engine from other initial
weights loads the step-2 checkpoint and redoes steps 3 and 4 (two, so that a schedule not restored
shows: the optimizer state alone carries the next step's learning rate); with ``export`` the
initial and final weights are exported as safetensors. An :class:`OffloadCase` runs the trainer's
DeepSpeed engine with and without ``parallel.activation_offload`` in the same group.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import resource
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh

from dit.diffusion import DiffusionConfig, make_objective
from dit.model import build_model
from launch.batches import Conditioner
from launch.config import TrainConfig, load_config
from launch.distributed import DistEnv
from launch.engine import sample_losses
from launch.engine_deepspeed import build_zero_engine
from launch.optim import build_optimizer, build_scheduler
from parallel import checkpoint as ckpt
from parallel import zero
from parallel.grads import clip_grad_norm
from parallel.megatron_tp import apply_megatron_tp, full_tensor
from parallel.offload import _BlockHooks
from parallel.parallelize import make_dims
from tests.dit.emulate import cuda_autocast_flag
from tests.dit.helpers import random_model
from tests.launch.deepspeed_bf16_worker import latent_batch
from tests.parallel.group import exit_without_teardown, serve
from tests.parallel.parity_worker import GLOBAL_BATCH, arch, batch

STEPS = 4
SAVE_AFTER = 2


@dataclass
class Case:
    name: str
    stage: int
    tp: int = 1
    grad_accum: int = 1
    offload: bool = False
    bf16: bool = False
    freeze: bool = False
    """Freeze the timestep embedder (``init.freeze``): trained by no one, exported all the same."""
    resume: bool = False
    export: bool = False
    qk_norm: str = "per_head"
    """``model.arch.qk_norm``; ``across_heads`` splits the norm's weight over the tp ranks."""

    def arch(self):
        return arch(qk_norm=self.qk_norm)


def train_cfg(case: Case) -> TrainConfig:
    # warmup + cosine over 4 steps: lr factors 0.5, 1, 1, 0.55, so a scheduler stepped at the wrong
    # time shows; grad_clip below the gradient norms (≈0.5), so clipping acts in every step
    return TrainConfig(
        steps=STEPS, lr=1e-3, warmup=2, schedule="cosine", weight_decay=0.01, grad_clip=0.2,
        grad_accum=case.grad_accum,
    )  # fmt: skip


def per_sample_loss(model, objective, data: dict[str, torch.Tensor], bf16: bool = False) -> torch.Tensor:
    """The trainer's per-sample loss: mean over the frames that count. Under bf16 inside the DeepSpeed
    trainer's autocast with CUDA's autocast flag raised, which is what DeepSpeed's forward checks on a
    GPU (the weights stay fp32: DeepSpeed's torch_autocast)."""
    with zero.autocast("cpu", bf16), cuda_autocast_flag() if bf16 else contextlib.nullcontext():
        out = objective.loss(
            model, data["x0"], {"context": data["context"], "context_mask": data["context_mask"]},
            cond_frames=data["cond_frames"], noise=data["noise"], t=data["t"],
        )  # fmt: skip
    return out.per_frame.sum(1) / (~data["cond_frames"]).sum(1).clamp(min=1)


def _model(case: Case, seed: int = 0) -> torch.nn.Module:
    model = random_model(case.arch(), seed=seed)
    for p in model.t_embedder.parameters():
        p.requires_grad_(not case.freeze)
    return model


def reference(case: Case) -> dict:
    """``STEPS`` steps in one process: the FSDP trainer's optimizer, schedule, clipping and loss."""
    cfg, tcfg = case.arch(), train_cfg(case)
    model = _model(case)
    opt = build_optimizer(model, tcfg, torch.device("cpu"))
    sched = build_scheduler(opt, tcfg)
    objective, data = make_objective(DiffusionConfig()), batch(cfg)
    losses, norms, grads = [], [], None
    for step in range(STEPS):
        per_sample = per_sample_loss(model, objective, data)
        (per_sample.sum() / GLOBAL_BATCH).backward()
        losses.append(float(per_sample.detach().sum()) / GLOBAL_BATCH)
        if step == 0:
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        norms.append(clip_grad_norm([p for p in model.parameters() if p.grad is not None], tcfg.grad_clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"losses": losses, "grad_norms": norms, "grads": grads, "weights": weights}


def _engine(case: Case, world: int, seed: int = 0):
    mesh = init_device_mesh("cpu", (world // case.tp, case.tp), mesh_dim_names=("dp", "tp"))
    groups = zero.DeepSpeedGroups(mesh["dp"].get_group(), mesh["tp"].get_group())
    model = apply_megatron_tp(_model(case, seed), groups.tp_group)
    tcfg = train_cfg(case)
    engine = zero.build_engine(
        model, grad_accum=tcfg.grad_accum, grad_clip=tcfg.grad_clip,
        optimizer=build_optimizer(model, tcfg, torch.device("cpu")),
        scheduler_fn=lambda opt: build_scheduler(opt, tcfg), zero_stage=case.stage, groups=groups,
        offload=case.offload, bf16=case.bf16,
    )  # fmt: skip
    return engine, groups


def _full_grads(engine, groups) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in engine.module.named_parameters():  # the same order on every rank: collectives
        if p.requires_grad:
            out[name] = full_tensor(safe_get_full_grad(p), groups.tp_group, like=p).cpu().clone()
    return out


def _poisoned_step(engine, groups, case: Case) -> dict:
    """One step whose loss is NaN on global rank 0 only: every rank must skip it (the FSDP trainer's
    agreement on finiteness), leaving weights and schedule as they were."""
    objective, data = make_objective(DiffusionConfig()), batch(arch())
    before, last = zero.full_state_dict(engine, groups.tp_group), engine.lr_scheduler.last_epoch
    per = GLOBAL_BATCH // groups.get_data_parallel_world_size()
    lo = groups.get_data_parallel_rank() * per
    micro = per // case.grad_accum
    for m in range(case.grad_accum):
        mine = {k: v[lo + m * micro : lo + (m + 1) * micro] for k, v in data.items()}
        per_sample = per_sample_loss(engine, objective, mine, case.bf16)
        if dist.get_rank() == 0 and m == 0:
            per_sample = per_sample * float("nan")
        zero.backward(engine, per_sample, GLOBAL_BATCH)
        result = zero.step(engine)
    after = zero.full_state_dict(engine, groups.tp_group)
    return {
        "applied": result.applied,
        "grad_norm": result.grad_norm,
        "unchanged": all(torch.equal(before[k], after[k]) for k in before),
        "schedule_unchanged": engine.lr_scheduler.last_epoch == last,
    }


def _steps(engine, groups, case: Case, steps: range, record_grads: bool) -> dict:
    """Optimizer steps ``steps`` as the trainer would take them: losses, gradient norms and (with
    ``record_grads``) the gathered gradients of step 0."""
    objective, data = make_objective(DiffusionConfig()), batch(arch())
    dp, dp_rank = groups.get_data_parallel_world_size(), groups.get_data_parallel_rank()
    per = GLOBAL_BATCH // dp
    micro = per // case.grad_accum
    losses, norms, grads = [], [], {}
    for s in steps:
        loss = torch.zeros(())
        for m in range(case.grad_accum):
            lo = dp_rank * per + m * micro
            mine = {k: v[lo : lo + micro] for k, v in data.items()}
            per_sample = per_sample_loss(engine, objective, mine, case.bf16)
            zero.backward(engine, per_sample, GLOBAL_BATCH)
            loss += per_sample.detach().sum()
            if record_grads and s == 0 and m == case.grad_accum - 1:
                grads = _full_grads(engine, groups)
            result = zero.step(engine)
            assert (result is not None) == (m == case.grad_accum - 1), "boundary on the last micro-batch"
        assert result.applied, f"step {s} skipped"
        dist.all_reduce(loss)
        losses.append(float(loss) / case.tp / GLOBAL_BATCH)  # tp ranks count their samples again
        norms.append(result.grad_norm)
    return {"losses": losses, "grad_norms": norms, "grads": grads}


def run_case(case: Case, world: int, out_dir: Path) -> dict:
    engine, groups = _engine(case, world)
    q = engine.module.blocks[0].attn.q
    result = {
        "keys": list(engine.module.state_dict()),
        "q_type": type(q).__name__,
        "checkpoint_engine": type(engine.checkpoint_engine).__name__,
    }
    if case.export:  # before any step: the exported weights are exactly the initial ones
        zero.export(engine, out_dir / f"{case.name}-export0", step_num=0, tp_group=groups.tp_group)
    first = _steps(engine, groups, case, range(SAVE_AFTER), record_grads=True)
    path = zero.save_checkpoint(
        engine, out_dir / case.name, SAVE_AFTER, extra={"note": "x"}, rank_state={"rank": dist.get_rank()}
    )
    rest = _steps(engine, groups, case, range(SAVE_AFTER, STEPS), record_grads=False)
    result.update(
        losses=first["losses"] + rest["losses"],
        grad_norms=first["grad_norms"] + rest["grad_norms"],
        grads=first["grads"],
        weights=zero.full_state_dict(engine, groups.tp_group),
    )
    if case.export:
        zero.export(engine, out_dir / f"{case.name}-export", step_num=STEPS, tp_group=groups.tp_group)
    result["poisoned"] = _poisoned_step(engine, groups, case)
    if case.resume:
        engine, groups = _engine(case, world, seed=5)  # other initial weights: the load must replace them
        extra, own = zero.load_checkpoint(engine, path)
        resumed = _steps(engine, groups, case, range(SAVE_AFTER, STEPS), record_grads=False)
        result["resume"] = {
            "extra": extra,
            "own_rank": own["rank"],
            "losses": resumed["losses"],
            "weights": zero.full_state_dict(engine, groups.tp_group),
        }
    return result


def worker(rank: int, world: int, port: int, cases: list, out_dir: str) -> None:
    def run_one(case) -> dict:
        if isinstance(case, OffloadCase):
            return run_offload_case(case, Path(out_dir))
        return run_case(case, world, Path(out_dir))

    env = {"LOCAL_RANK": str(rank), "DS_ACCELERATOR": "cpu"}
    serve(rank, world, port, cases, out_dir, run_one, env=env)


def write_failure_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """ZeRO-3 on ``world`` ranks saving twice; in the second save rank 1's ZeRO partition passes a file
    size limit (RLIMIT_FSIZE, set in that process alone: a real failed write, EFBIG). The process group's
    timeout is short, so a rank left waiting in a collective fails the test instead of hanging it. Rank 0
    saves what each rank raised and what the checkpoint folder holds as ``write_failure.pt``."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu",
    )  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))
    try:
        case = Case("zero3_write_failure", 3)
        engine, groups = _engine(case, world)
        _steps(engine, groups, case, range(1), record_grads=False)  # optimizer moments to save
        root = Path(out_dir) / "checkpoints"
        zero.save_checkpoint(engine, root, 1, rank_state={"rank": rank})
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        if rank == 1:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then a write past the limit fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
        try:
            zero.save_checkpoint(engine, root, 2, rank_state={"rank": rank})
            error = None
        except ckpt.CheckpointError as e:
            error = str(e)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        errors: list = [None] * world
        dist.all_gather_object(errors, error)
        if rank == 0:
            found = ckpt.latest(root)
            result = {"errors": errors, "listing": sorted(os.listdir(root)), "latest": found.name}
            torch.save(result, Path(out_dir) / "write_failure.pt")
        # the engine (and DeepSpeed's references to the groups) go while the group is alive: a gloo
        # group whose last reference dies in interpreter teardown can abort the process (CI once saw
        # rank 1 end in "terminate called without an active exception" after this test's work)
        del engine, groups
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_without_teardown()


# ---- the trainer's ZeRO-3 engine with parallel.activation_offload -----------------------------------
TINY = ["model.arch.depth=2", "model.arch.hidden_size=64", "model.arch.ffn_dim=128"]


@dataclass
class OffloadCase:
    """One ZeRO-3 step of the trainer's DeepSpeed engine (:func:`launch.engine_deepspeed.build_zero_engine`)
    with and without ``parallel.activation_offload``, on the tiny preset from a base with every weight
    perturbed (a fresh adaLN-Zero model would give its blocks no gradient to compare)."""

    name: str


def run_offload_case(case: OffloadCase, out_dir: Path) -> dict:
    base = out_dir / f"{case.name}-base"
    if dist.get_rank() == 0:
        model = build_model(load_config(None, TINY).model.arch, device="cpu", seed=0)
        g = torch.Generator().manual_seed(5)
        state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
        base.mkdir()
        save_file(state, base / "model.safetensors")
    dist.barrier()
    return {
        "plain": _trainer_zero_step(base, offload=False),
        "offload": _trainer_zero_step(base, offload=True),
    }


def _trainer_zero_step(base: Path, offload: bool) -> dict:
    """Per-sample losses of this rank's batch, host bytes held by the offload after the forward,
    gradient norm, whether the step applied, the losses after it, and the memory hooks of each block."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(
        None, [*TINY, "parallel.engine=deepspeed", "parallel.zero_stage=3", f"init.from={base}"]
    )
    cfg.parallel.activation_offload = offload
    env = DistEnv(rank, world, rank, torch.device("cpu"))
    dims = make_dims(cfg.parallel, world, cfg.model.arch)
    engine = build_zero_engine(cfg, env, dims, dims.build_mesh("cpu"), bf16=False)  # the trainer's mesh
    objective = make_objective(cfg.diffusion)
    prep = Conditioner(cfg, env.device)(latent_batch(cfg, rank), torch.Generator().manual_seed(rank))
    per = sample_losses(engine, objective, prep, tokens=None, generator=torch.Generator().manual_seed(7))
    host = engine.memory.host_bytes() if engine.memory else 0
    engine.backward(per, float(len(per) * world), last=True)
    grad_norm, applied, _ = engine.update(per.mean().item())
    after = sample_losses(engine, objective, prep, tokens=None, generator=torch.Generator().manual_seed(7))
    return {
        "loss": per.detach(),
        "host": host,
        "grad_norm": grad_norm,
        "applied": applied,
        "after": after.detach(),
        "hooks": [_memory_hooks(b) for b in engine.model.blocks],
    }


def _memory_hooks(block) -> tuple[bool, bool] | None:
    """(activation offload, block swap) as :func:`parallel.offload.apply_memory_options` installed them on
    ``block`` (its forward pre-hook); None without them."""
    pre = [getattr(h, "__self__", None) for h in block._forward_pre_hooks.values()]
    hooks = [h for h in pre if isinstance(h, _BlockHooks)]
    assert len(hooks) <= 1, hooks
    return (hooks[0].offload, hooks[0].swap is not None) if hooks else None
