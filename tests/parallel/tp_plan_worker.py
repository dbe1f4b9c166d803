"""Both translations of the one tensor-parallel plan, side by side on two gloo ranks.

Each case builds the same full tiny model (one seed) three times on every rank: as it is (the
reference), with DTensor styles (:func:`parallel.tensor.apply_tensor_parallel`) and with megatron-core
modules (:func:`parallel.megatron_tp.apply_megatron_tp`), then runs one forward and backward of a
fixed weighted sum of the output. A module planned by one translation and not the other shows as a
parameter whose local slice or gradient differs between them (a linear left whole, or a head norm
whose partial gradient is not summed over the ranks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from dit.config import DiTConfig
from parallel.rope_heads import RopeHeads
from parallel.tensor import apply_tensor_parallel
from tests.dit.helpers import random_model
from tests.parallel.group import serve
from tests.parallel.lora_helpers import lora_model


@dataclass
class Case:
    name: str
    mlp: str
    layout: str
    qk_norm: str = "per_head"
    compiled: bool = False
    """Also run the DTensor model with per-block ``torch.compile`` (aot_eager: dynamo and AOTAutograd,
    where a DTensor gradient's placement can differ from eager's, without inductor's C++ build)."""
    ltx: bool = False
    """The LTX-shaped model (:func:`ltx_shaped`, in ``layout``) instead of :func:`every_option`; its
    mlp and qk_norm are LTX's whatever ``mlp`` and ``qk_norm`` say."""
    lora: bool = False
    """The model with LoRA adapters on a frozen base (:func:`tests.parallel.lora_helpers.lora_model`):
    planned through their parts (:mod:`parallel.tp_plan`); only the adapters have gradients."""

    def arch(self) -> DiTConfig:
        if self.ltx:
            return ltx_shaped(self.layout)
        return every_option(self.mlp, self.layout, self.qk_norm)


def every_option(mlp: str, layout: str, qk_norm: str = "per_head") -> DiTConfig:
    """A tiny model with everything the plan names switched on: qk norm (per head or across heads),
    text cross-attention with its affine norm, the given MLP kind and attention layout; and the
    replicated root options of the demo model (text positions, the pooled caption in c)."""
    return DiTConfig(
        in_channels=4, hidden_size=32, depth=2, num_heads=4, text_dim=16, patch_size=(1, 2, 2),
        mlp=mlp, attention_layout=layout, qk_norm=qk_norm, conditioning="text", cross_attn_norm=True,
        text_pos_embed=True, text_pool=True,
    )  # fmt: skip


def ltx_shaped(layout: str = "full") -> DiTConfig:
    """A tiny LTX-Video-shaped model (``ltx-video-2b``'s options): LTX's RoPE over the whole inner width
    (per-head tables: a tp rank needs its heads' part), the qk norm across heads, RMSNorm block norms,
    no norm before cross-attention, no fps embedding (fps reaches the RoPE only). Width 32 is not a
    multiple of 6: its first channel pair is left unrotated, in head 0, as LTX does."""
    return DiTConfig(
        in_channels=4, hidden_size=32, depth=2, num_heads=4, ffn_dim=64, text_dim=16, patch_size=(1, 1, 1),
        mlp="gelu_tanh", attention_layout=layout, qk_norm="across_heads", qk_norm_eps=1e-5,
        block_norm="rmsnorm", pos_embed="rope_ltx", modulation="shared", conditioning="text",
        cross_attn_norm=False, fps_conditioning=False, norm_eps=1e-6,
    )  # fmt: skip


def _inputs(cfg: DiTConfig) -> dict:
    g = torch.Generator().manual_seed(3)
    b = 2
    mask = torch.ones(b, 3, dtype=torch.bool)
    mask[1, 2:] = False
    return {
        "x": torch.randn(b, cfg.in_channels, 2, 4, 4, generator=g),  # B, C, T, H, W
        "t": torch.rand(b, generator=g) * 1000,
        "context": torch.randn(b, 3, cfg.text_dim, generator=g),
        "context_mask": mask,
        "weight": torch.randn(b, cfg.out_ch, 2, 4, 4, generator=g),  # of the summed output
        # one frame rate per sample, as the trainer passes it: N×B×H×Dh/2 tables under rope_ltx
        "fps": torch.tensor([24.0, 8.0]),
    }


def _forward(model: nn.Module, data: dict, fps: torch.Tensor) -> torch.Tensor:
    kwargs = {"fps": fps} if model.cfg.needs_fps else {}
    return model(data["x"], data["t"], context=data["context"], context_mask=data["context_mask"], **kwargs)


def _run(model: nn.Module, data: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and every parameter's gradient as this rank's optimizer step sees it: a DTensor
    gradient placed like its parameter (a head norm's ``Partial`` one summed), then its local slice."""
    out = _forward(model, data, data["fps"])
    (out * data["weight"]).sum().backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is None:  # frozen (LoRA's base)
            continue
        if isinstance(g, DTensor):
            g = g.redistribute(p.device_mesh, p.placements).to_local()
        grads[name] = g.detach().clone()
    return out.detach(), grads


def _whole_grad_diff(model: nn.Module, grads_ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per parameter, the largest difference between its whole gradient (a DTensor's gathered, or a
    megatron slice's gathered over the tp group) and one process's. A collective call for every rank."""
    from parallel.megatron_tp import full_tensor  # (see run_case)

    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is None:  # frozen (LoRA's base), the same on every rank
            continue
        whole = g.full_tensor() if isinstance(g, DTensor) else full_tensor(g, dist.group.WORLD, like=p)
        out[name] = float((whole - grads_ref[name]).abs().max())
    return out


def run_case(case: Case) -> dict:
    # megatron-core is imported here, not with the module: parity_worker and the workers built on it
    # import this module for ltx_shaped alone, and megatron-core's imports cost each of their spawned
    # ranks about 2 s of CPU (CI time)
    from parallel.megatron_tp import apply_megatron_tp

    cfg = case.arch()
    data = _inputs(cfg)
    build = lora_model if case.lora else random_model
    reference = build(cfg)
    out_ref, grads_ref = _run(reference, data)
    dtensor = build(cfg)
    apply_tensor_parallel(dtensor, init_device_mesh("cpu", (dist.get_world_size(),)))
    out_dt, grads_dt = _run(dtensor, data)
    whole_dt = _whole_grad_diff(dtensor, grads_ref)
    scalar = {}
    if cfg.needs_fps:  # one frame rate for the batch: N×H×Dh/2 tables, the sampler's
        with torch.no_grad():
            fps = torch.tensor(24.0)
            scalar = {"out_ref_scalar_fps": _forward(reference, data, fps)}
            scalar["out_dt_scalar_fps"] = _forward(dtensor, data, fps)
            # the control: every rank given the other rank's heads of the tables
            hooks = [
                h
                for m in dtensor.modules()
                for h in m._forward_pre_hooks.values()
                if isinstance(h, RopeHeads)
            ]
            scalar["hooks"] = [repr(h) for h in hooks]
            for h in set(hooks):
                h.rank = dist.get_world_size() - 1 - h.rank
            scalar["out_dt_other_heads"] = _forward(dtensor, data, data["fps"])
            for h in set(hooks):
                h.rank = dist.get_world_size() - 1 - h.rank
    compiled = {}
    if case.compiled:
        model = build(cfg)
        apply_tensor_parallel(model, init_device_mesh("cpu", (dist.get_world_size(),)))
        # a fresh dynamo per case: after one case's tp blocks are compiled, recompiling DiTBlock.forward
        # for another model in the same process fails in AOTAutograd's tracing with a RecursionError
        # (torch 2.13, CPU; each model alone compiles, as it does in a job: one model per process)
        torch._dynamo.reset()
        for block in model.blocks:
            block.compile(backend="aot_eager")
        out, _ = _run(model, data)
        compiled = {"out_compiled": out, "whole_diff_compiled": _whole_grad_diff(model, grads_ref)}
    megatron = apply_megatron_tp(build(cfg), dist.group.WORLD)
    out_mg, grads_mg = _run(megatron, data)
    whole_mg = _whole_grad_diff(megatron, grads_ref)
    if cfg.needs_fps:
        with torch.no_grad():
            scalar["out_mg_scalar_fps"] = _forward(megatron, data, torch.tensor(24.0))
    # per parameter, the largest difference over the ranks (inf for slices of different shapes) and
    # the largest megatron gradient, to judge it by
    names = sorted(grads_dt)
    diff = torch.zeros(2, len(names))
    for i, name in enumerate(names):
        g, m = grads_dt[name], grads_mg[name]
        diff[0, i] = (g - m).abs().max() if g.shape == m.shape else torch.inf
        diff[1, i] = m.abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return {
        "grad_diff": dict(zip(names, diff[0].tolist(), strict=True)),
        "grad_scale": dict(zip(names, diff[1].tolist(), strict=True)),
        "sliced_dt": sorted(n for n in names if grads_dt[n].shape != grads_ref[n].shape),
        "sliced_mg": sorted(n for n in names if grads_mg[n].shape != grads_ref[n].shape),
        "out_ref": out_ref,
        "out_dt": out_dt,
        "out_mg": out_mg,
        "grads_ref": grads_ref,
        "grads_dt_rank0": grads_dt,
        "whole_diff_dt": whole_dt,
        "whole_diff_mg": whole_mg,
        **compiled,
        **scalar,
    }


def worker(rank: int, world: int, port: int, cases: list, out_dir: str) -> None:
    # megatron-core asks for this on CUDA (its all-reduce ordering); harmless here, quiets its warning
    serve(rank, world, port, cases, out_dir, run_case, env={"CUDA_DEVICE_MAX_CONNECTIONS": "1"})
