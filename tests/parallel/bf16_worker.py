"""bf16 cases for ``test_bf16_layouts.py``: the tiny model trained two steps under CPU bf16 autocast,
in one process with fp32 parameters or on FSDP2 ranks with bf16 parameter copies
(``parallelize(..., bf16=True)``: ``MixedPrecisionPolicy(bf16, reduce fp32, cast_forward_inputs=False)``).

Hooks record what the model sees inside: the times at the timestep embedder, the frame rates at the
fps embedder, and block 0's inputs (residual stream, modulation vectors, RoPE tables) as the block
receives them after FSDP's own pre-forward hook. Every rank's record is gathered; rank 0 returns them
with the losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from dit.config import DiTConfig
from dit.diffusion import DiffusionConfig, make_objective
from dit.model import SpacetimeDiT
from parallel.config import ParallelConfig
from parallel.parallelize import make_dims, materialize, parallelize
from tests.dit.helpers import random_model
from tests.parallel.group import serve
from tests.parallel.parity_worker import GLOBAL_BATCH, arch, batch

STEPS = 2


def bf16_arch() -> DiTConfig:
    return arch().replace(fps_conditioning=True)


@dataclass
class Case:
    name: str
    parallel: dict = field(default_factory=dict)
    cast_forward_inputs: bool = False
    """A control: FSDP's default policy (casts every floating forward input to bf16), applied by hand."""


def bf16_batch(cfg: DiTConfig) -> dict:
    """The parity batch with flow times whose model times (×1000) bf16 cannot hold (999.3 → 1000)
    and a frame rate per sample."""
    data = batch(cfg)
    data["t"] = torch.tensor([0.9993, 0.2187, 0.5001, 0.0133])
    data["fps"] = torch.tensor([23.976, 8.0, 29.97, 12.5])
    return data


class Seen:
    """What the model sees at its inputs, recorded by forward pre-hooks (first forward only)."""

    def __init__(self, model: torch.nn.Module):
        self.record: dict[str, object] = {}
        model.t_embedder.register_forward_pre_hook(lambda m, args: self._keep("t", args[0].detach().clone()))
        model.fps_embedder.register_forward_pre_hook(
            lambda m, args: self._keep("fps", args[0].detach().clone())
        )
        model.blocks[0].register_forward_pre_hook(self._block, with_kwargs=True)

    def _keep(self, name: str, value) -> None:
        self.record.setdefault(name, value)

    def _block(self, module, args, kwargs) -> None:
        x, mod, _, rope = args[:4]
        self._keep("block0", {"x_dtype": x.dtype, "mod_dtype": mod.dtype, "rope": [r.clone() for r in rope]})
        self._keep("mod", mod.detach().clone())  # B, F, 6D: the adaLN vectors, made by fp32 layers


def _shard_casting_inputs(model: torch.nn.Module, mesh) -> None:
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def train(case: Case, world: int) -> dict:
    """``STEPS`` AdamW steps under bf16 autocast with the trainer's loss convention."""
    cfg, pcfg = bf16_arch(), ParallelConfig(**case.parallel)
    dims = make_dims(pcfg, world, cfg)
    mesh = dims.build_mesh("cpu")
    with torch.device("meta"):
        model = SpacetimeDiT(cfg)
    if case.cast_forward_inputs:
        _shard_casting_inputs(model, mesh["dp_shard_cp"])
    else:
        parallelize(model, dims, mesh, pcfg, bf16=world > 1)
    materialize(model, torch.device("cpu"), mesh, lambda: random_model(cfg))
    seen = Seen(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    objective, data = make_objective(DiffusionConfig()), bf16_batch(cfg)
    per = GLOBAL_BATCH // dims.dp
    lo = dims.dp_rank(mesh) * per if mesh is not None else 0
    mine = {k: v[lo : lo + per] for k, v in data.items()}
    losses = []
    for _ in range(STEPS):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = objective.loss(
                model, mine["x0"],
                {"context": mine["context"], "context_mask": mine["context_mask"], "fps": mine["fps"]},
                cond_frames=mine["cond_frames"], noise=mine["noise"], t=mine["t"],
            )  # fmt: skip
        per_sample = out.per_frame.sum(1) / (~mine["cond_frames"]).sum(1).clamp(min=1)
        (per_sample.sum() * dims.grad_scale / GLOBAL_BATCH).backward()
        loss = per_sample.detach().sum()
        if world > 1:
            dist.all_reduce(loss)
        losses.append(float(loss) / GLOBAL_BATCH)
        opt.step()
        opt.zero_grad(set_to_none=True)
    record = seen.record
    if world > 1:  # every rank's inputs, in rank order
        gathered: list = [None] * world
        dist.all_gather_object(gathered, record)
        record = {k: torch.cat([r[k] for r in gathered]) for k in ("t", "fps", "mod")}
        record["block0"] = gathered[0]["block0"]
    return {"losses": losses, **record}


def reference() -> dict:
    return train(Case("one_process"), world=1)


def worker(rank: int, world: int, port: int, cases: list[Case], out_dir: str) -> None:
    serve(rank, world, port, cases, out_dir, lambda c: train(c, world))
