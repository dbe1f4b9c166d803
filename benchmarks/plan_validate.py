"""Check the memory model of :mod:`parallel.plan` against measurements.

(a) FSDP2's memory tracker (``FSDPMemTracker``) on fake tensors with a fake process group: the real
model code (:class:`dit.model.SpacetimeDiT`, :func:`parallel.parallelize.parallelize`, bf16 mixed
precision) as rank 0 of a 64-rank job, one forward + backward + AdamW step, peak bytes by category.
(b) Real CPU runs of small presets: the bytes of activations alive at the end of forward (torch's
``MemTracker``) against the planner's ``activations``, for each checkpointing mode.

    python -m benchmarks.plan_validate                 # both, writes the dated report
    python -m benchmarks.plan_validate --skip-fake     # (b) only

CUDA autocast runs LayerNorm and RMSNorm in fp32, CPU autocast in bf16; :func:`emulate_cuda_norms`
makes the CPU runs follow CUDA's rule, so what is measured is what a GPU would save. Everything else
(kernel choice, allocator, streams) only a GPU can confirm: see the report's notes.
"""

from __future__ import annotations

import contextlib
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dit.config import get_preset
from parallel.plan import GIB, Layout, plan

ROOT = Path(__file__).resolve().parent
REPORT = ROOT / "results" / "2026-12-01-plan-validation.md"


class _FusedRMSNorm(torch.autograd.Function):
    """RMSNorm that saves what CUDA's fused kernel (``aten::_fused_rms_norm``) saves: its input and
    rstd. The CPU build has no fused kernel: its composite RMSNorm also saves ``x · rstd``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
        rstd = torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)  # ..., 1
        ctx.save_for_backward(x, rstd, w)
        return x * rstd * w if w is not None else x * rstd

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, rstd, w = ctx.saved_tensors
        gw = g * w if w is not None else g
        dx = rstd * gw - x * rstd**3 * (gw * x).mean(-1, keepdim=True)
        dw = (g * x * rstd).reshape(-1, x.shape[-1]).sum(0) if w is not None else None
        return dx, dw, None


def _fp32_norm(self, x: torch.Tensor) -> torch.Tensor:
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return type(self).forward(self, x)
    w = None if self.weight is None else self.weight.float()
    with torch.autocast(dev, enabled=False):
        if isinstance(self, nn.RMSNorm):
            eps = self.eps if self.eps is not None else torch.finfo(torch.float32).eps
            return _FusedRMSNorm.apply(x.float(), w, eps)
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


def emulate_cuda_norms(model: nn.Module) -> None:
    """Run every LayerNorm/RMSNorm of ``model`` in fp32 under autocast, as CUDA autocast does (its fp32
    op list; CPU autocast leaves them in bf16), RMSNorm saving what CUDA's fused kernel saves, so a CPU
    run saves the tensors a GPU run saves. Per module rather than a torch-function mode, so that
    checkpoint recomputation in backward follows it."""
    for m in model.modules():
        if isinstance(m, nn.LayerNorm | nn.RMSNorm):
            m.forward = types.MethodType(_fp32_norm, m)


def _inputs(arch, thw, text_len: int, batch: int, device: str = "cpu") -> tuple[dict, torch.Tensor]:
    x = torch.randn(batch, arch.in_channels, *thw, device=device)
    kwargs = {"x": x, "t": torch.rand(batch, device=device) * 1000}
    if arch.conditioning == "text":
        kwargs["context"] = torch.randn(batch, text_len, arch.text_dim, device=device)
        mask = torch.ones(batch, text_len, dtype=torch.bool, device=device)
        mask[:, text_len // 2 :] = False  # padded captions: the trainer passes a mask
        kwargs["context_mask"] = mask
    elif arch.conditioning == "class":
        kwargs["labels"] = torch.zeros(batch, dtype=torch.long, device=device)
    return kwargs, torch.randn(batch, arch.out_ch, *thw, device=device)


def _loss(model, kwargs: dict, target: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**kwargs)
    return (out.float() - target).square().mean()


def measure_activations(arch, thw, text_len: int, ac: str, batch: int = 1) -> dict:
    """A real CPU forward + backward of ``arch`` on one process under bf16 autocast (fp32 weights, as one
    GPU without FSDP runs it): bytes alive at the end of forward that forward allocated
    (``activations``: saved tensors, autocast's bf16 weight copies, the output and loss) and the peak
    during backward of activations, temporaries and gradients (``backward_peak``).
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    from dit.model import build_model
    from parallel.config import ParallelConfig
    from parallel.dims import ParallelDims
    from parallel.parallelize import parallelize

    torch.manual_seed(0)
    model = build_model(arch)
    parallelize(
        model, ParallelDims(1, 1, 1, 1, 1), None, ParallelConfig(dp_shard=1, activation_checkpointing=ac)
    )
    emulate_cuda_norms(model)
    kwargs, target = _inputs(arch, thw, text_len, batch)
    mt = MemTracker()
    mt.track_external(model)
    with mt:
        loss = _loss(model, kwargs, target)
        acts = sum(snap.get("Activation", 0) for snap in mt.get_tracker_snapshot("current").values())
        loss.backward()
    peak = mt.get_tracker_snapshot("peak")
    keys = ("Activation", "Temp", "Gradient")
    return {"activations": acts, "backward_peak": sum(s.get(k, 0) for s in peak.values() for k in keys)}


def activation_rows(cases: list[tuple], text_len: int = 64) -> list[dict]:
    """(b): measured against predicted activation bytes for each (preset, (T, H, W), ac, batch)."""
    rows = []
    for preset, thw, ac, batch in cases:
        arch = get_preset(preset)
        t0 = time.perf_counter()
        got = measure_activations(arch, thw, text_len, ac, batch)
        p = plan(arch, *thw, batch=batch, text_len=text_len, layout=Layout(), ac=ac)
        pred = predicted_activations(p)
        rows.append(
            {
                "preset": preset,
                "latent": "×".join(map(str, thw)),
                "batch": batch,
                "ac": ac,
                "measured_mib": got["activations"] / 2**20,
                "predicted_mib": pred / 2**20,
                "ratio": pred / got["activations"],
                "seconds": time.perf_counter() - t0,
            }
        )
    return rows


def predicted_activations(p: dict) -> float:
    """The planner's saved activations, in bytes."""
    return p["memory_breakdown_gib"]["activations"] * GIB


def fake_fsdp_run(
    preset: str,
    thw: tuple,
    text_len: int,
    layout: Layout,
    ac: str,
    raw_tracker: bool = False,
    **arch_overrides,
) -> dict:
    """(a): one training step of ``preset`` as rank 0 of ``layout.world`` ranks, on fake tensors with a
    fake process group, under FSDP2's memory tracker. Returns the peak bytes by tracker category.

    The mesh is on CPU (a CPU build cannot make CUDA fake tensors for FSDP2's streams and events); the
    norms follow CUDA autocast (:func:`emulate_cuda_norms`). AdamW is the single-tensor one: its
    temporaries are one parameter's at a time, nearest to the fused CUDA kernel the trainer uses (none);
    on fake DTensors the foreach and fused CPU implementations allocate many times the state.
    """
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from dit.model import SpacetimeDiT
    from parallel.config import ParallelConfig
    from parallel.dims import ParallelDims
    from parallel.parallelize import parallelize

    arch = get_preset(preset, **arch_overrides)
    world = layout.world
    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    dims = ParallelDims(layout.dp_replicate, layout.dp_shard, layout.cp, layout.tp, world)
    pcfg = ParallelConfig(
        dp_replicate=layout.dp_replicate,
        dp_shard=layout.dp_shard,
        cp=layout.cp,
        tp=layout.tp,
        activation_checkpointing=ac,
    )
    mesh = dims.build_mesh("cpu")
    with torch.device("meta"):
        model = SpacetimeDiT(arch)
    emulate_cuda_norms(model)
    parallelize(model, dims, mesh, pcfg, bf16=True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
        _warm_optimizer(model, opt)
        kwargs, target = _inputs(arch, thw, text_len, 1)
        tracker = FSDPMemTracker(model, opt)
        tracker.track_inputs((*kwargs.values(), target))
        t0 = time.perf_counter()
        with tracker, _mod_tracker_any(not raw_tracker):
            loss = _loss(model, kwargs, target)
            after_forward = _snapshot(tracker, "current")
            loss.backward()
            backward_peak = _snapshot(tracker, "peak")
            opt.step()
            opt.zero_grad(set_to_none=True)
        step_peak = _snapshot(tracker, "peak")
    return {
        "after_forward": after_forward,
        "backward_peak": backward_peak,
        "peak": step_peak,
        "seconds": time.perf_counter() - t0,
    }


@contextlib.contextmanager
def _mod_tracker_any(enabled: bool):
    """Make the tracker's module tracker wait for any input gradient, not all, to mark a module's
    backward done. With "all" (its default), the hook on a block's inputs holds the residual-stream
    gradient until the gradients of the inputs every block shares (modulation, caption) are complete,
    at the end of backward: one fp32 B×N×D per block that a real step frees at once (an artifact of the
    tool: 7.4 GiB of "Temp" for 14B)."""
    from torch.distributed._tools import mod_tracker

    orig = mod_tracker.register_multi_grad_hook
    if enabled:
        mod_tracker.register_multi_grad_hook = lambda tensors, fn, mode="all": orig(tensors, fn, mode="any")
    try:
        yield
    finally:
        mod_tracker.register_multi_grad_hook = orig


def _warm_optimizer(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Create AdamW's state as after a first step (steady state: m and v exist through every forward
    and backward), without a forward: zero gradients, one step, gradients dropped as the trainer does."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _snapshot(tracker, kind: str) -> dict[str, int]:
    snap = next(iter(tracker.get_tracker_snapshot(kind).values()))
    return {str(getattr(k, "value", k)): int(v) for k, v in snap.items() if v}
