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

import argparse
import contextlib
import datetime
import json
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
    """A real CPU forward of ``arch`` on one process under bf16 autocast (fp32 weights, as one GPU
    without FSDP runs it), then its backward: bytes alive at the end of forward that forward allocated
    (``activations``: saved tensors, autocast's bf16 weight copies, the output and loss)."""
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
        loss.backward()  # the checkpointed recomputation must run as it was saved
    return {"activations": acts}


def activation_rows(cases: list[tuple], text_len: int = 64) -> list[dict]:
    """(b): measured against predicted activation bytes for each (preset, (T, H, W), ac, batch)."""
    rows = []
    for preset, thw, ac, batch in cases:
        arch = get_preset(preset)
        t0 = time.perf_counter()
        got = measure_activations(arch, thw, text_len, ac, batch)
        p = plan(arch, *thw, batch=batch, text_len=text_len, layout=Layout(), ac=ac)
        pred = p["activation_detail_gib"]["after_forward"] * GIB
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


FAKE_CASES = [  # (preset, latent T×H×W, layout, ac): the target first
    ("video-14b", (21, 90, 160), "dp_shard=8,cp=8", "full"),
    ("video-14b", (21, 90, 160), "dp_shard=8,cp=8", "selective"),
    ("video-1b3", (21, 60, 104), "dp_shard=8", "none"),
    ("video-1b3", (21, 60, 104), "dp_shard=2,cp=4", "every_2"),
    ("video-1b3", (21, 60, 104), "dp_shard=4,tp=2", "full"),
]
CPU_CASES = [  # (preset, latent T×H×W, ac, batch)
    *[("tiny", (8, 32, 32), ac, 1) for ac in ("none", "full", "every_2", "selective")],
    ("tiny", (4, 16, 16), "none", 2),
    *[("video-small", (5, 32, 32), ac, 1) for ac in ("none", "full", "selective")],
]


def fake_rows(cases=FAKE_CASES, text_len: int = 512) -> list[dict]:
    """(a) for each case: the tracker's peak against the planner's (EMA left out: the tracker does not
    see it), activations after forward against the planner's, and the categories of both."""
    rows = []
    for preset, thw, layout, ac in cases:
        got = fake_fsdp_run(preset, thw, text_len, Layout.parse(layout), ac)
        p = plan(get_preset(preset), *thw, text_len=text_len, layout=Layout.parse(layout), ac=ac, ema=False)
        peak, pred = got["peak"]["Total"], p["memory_gib"] * GIB
        acts = got["after_forward"].get("Activation", 0)
        rows.append(
            {
                "preset": preset,
                "latent": "×".join(map(str, thw)),
                "layout": layout,
                "ac": ac,
                "measured_gib": peak / GIB,
                "predicted_gib": pred / GIB,
                "ratio": pred / peak,
                "acts_measured_gib": acts / GIB,
                "acts_predicted_gib": p["activation_detail_gib"]["after_forward"],
                "tracker": {k: v / GIB for k, v in got["peak"].items()},
                "plan": p["memory_breakdown_gib"],
                "seconds": got["seconds"],
            }
        )
    return rows


NOTES = """\
- What (a) confirms: which tensors the real model code allocates and keeps, at what size and for how
  long, once FSDP2 (bf16 parameters, fp32 reduce), Ulysses or tensor parallelism, and checkpointing
  are applied, as a dispatch-level tracker sees them on rank 0 of the real mesh. That is the planner's
  accounting: parameters, gradients, optimizer state, FSDP's unsharded weights and all-gather /
  reduce-scatter buffers, activations and backward temporaries at the peak.
- What (a) cannot confirm, and only a GPU can: the CUDA caching allocator's rounding and
  fragmentation, the CUDA context, NCCL and cuBLAS workspaces (the planner takes
  `OVERHEAD_GIB` and `FRAGMENTATION` off the device before `fits`: assumptions, not measured); the
  CUDA attention kernels (the CPU run uses `_scaled_dot_product_flash_attention_for_cpu`; CUDA's flash
  and cuDNN kernels also save output + log-sum-exp, its masked cross-attention runs the
  memory-efficient kernel); autocast's CUDA op lists (the runs emulate the two that matter here:
  LayerNorm and RMSNorm in fp32, RMSNorm saving what the fused CUDA kernel saves); FSDP2's stream
  semantics (on a GPU a buffer is freed when its collective finishes on the communication stream,
  so overlap may keep one more block's buffers alive for a while).
- The mesh is on CPU: a CPU build of torch cannot hand FSDP2 CUDA streams and events for fake CUDA
  tensors. The fake process group makes every collective a no-op of the right shape.
- The tracker's module tracker holds, with its default multi-gradient hook ("all"), each block's
  input gradient until the gradients of the inputs every block shares (modulation vectors, caption)
  are complete at the end of backward: one fp32 B×N×D per block, 7.4 GiB of "Temp" for 14B that a
  real step frees as soon as the previous block has used it (found by recording which tensors
  outlive their block: `aten.add` results, the residual-stream gradients). The runs use the hook's
  "any" mode; the raw tool's number is given for the target.
- AdamW: the fake run uses the single-tensor implementation (one parameter's temporaries at a time,
  nearest the fused CUDA kernel the trainer uses, which has none); its state is created before the
  measured step, as in any step after the first. The EMA (4 bytes per sharded parameter) is not seen
  by the tracker: the planner's numbers in (a) leave it out; in a run it adds 0.83 GiB for 14B.
- (b) runs one process with fp32 weights under bf16 autocast (one GPU without FSDP: autocast's bf16
  weight copies are part of the activations); FSDP's bf16 weights are covered by (a).
- `selective` checkpointing is the one in `parallel/parallelize.py` (a torch selective-checkpoint
  policy keeping the attention kernels' outputs): measured in (a) and (b), not only derived.
- Step time and MFU are not validated: a roofline with the constants above, no GPU run in this task.
  Next: `python -m benchmarks.plan` against a measured step on 8 and 64 H100s, and
  `torch.cuda.max_memory_allocated` against `memory_gib` for the same layouts."""


def _table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(c[1] for c in cols) + " |\n|" + "---|" * len(cols) + "\n"
    body = "".join("| " + " | ".join(format(r[c[0]], c[2]) for c in cols) + " |\n" for r in rows)
    return head + body


def _categories(row: dict) -> str:
    tr, pl = row["tracker"], row["plan"]
    pairs = [
        ("params (Sharded Param)", tr.get("Sharded Param", 0), pl["params"]),
        ("grads (Sharded Grad)", tr.get("Sharded Grad", 0), pl["grads"]),
        ("optimizer (OptState)", tr.get("OptState", 0), pl["optimizer"]),
        (
            "fsdp_buffers (Unsharded Param + All Gather + Reduce Scatter)",
            sum(tr.get(k, 0) for k in ("Unsharded Param", "All Gather", "Reduce Scatter")),
            pl["fsdp_buffers"],
        ),
        (
            "activations + temporaries (Activation + Temp)",
            tr.get("Activation", 0) + tr.get("Temp", 0),
            pl["activations"] + pl["temporaries"],
        ),
        ("inputs (Inputs; not in the plan)", tr.get("Inputs", 0), 0.0),
    ]
    rows = [{"what": w, "tracker": a, "plan": b} for w, a, b in pairs]
    return _table(
        rows, [("what", "category", "s"), ("tracker", "tracker GiB", ".3f"), ("plan", "planner GiB", ".3f")]
    )


def _mfu_section() -> str:
    from parallel import plan as model

    p = plan(get_preset("video-14b"), 21, 90, 160, layout=Layout(dp_shard=8, cp=8), ac="full", gpu="h100")
    step = p["step_s"]
    rows = [{"kind": k, "s": v, "pct": 100 * v / step} for k, v in p["time_breakdown_s"].items()]
    consts = (
        f"matmul efficiency {model.MATMUL_EFF['h100']}, attention (SDPA) forward/backward "
        f"{model.ATTENTION_EFF['h100']['sdpa']}, HBM {model.HBM_EFF} of 3.35 TB/s, links {model.LINK_EFF} "
        f"of 450 GB/s NVLink / 50 GB/s InfiniBand per GPU, 989 TFLOP/s dense bf16"
    )
    return (
        f"Predicted peak {p['memory_gib']:.2f} GiB per GPU (EMA included) of {p['usable_gib']:.1f} usable: "
        f"fits = {p['fits']}. Step {step:.2f} s, MFU {100 * p['mfu']:.1f}% "
        f"(model FLOPs {p['flops']['model_per_step']:.3e} per GPU per step, hardware "
        f"{p['flops']['hardware_per_step']:.3e} with the recomputation). Exposed time by kind:\n\n"
        + _table(rows, [("kind", "kind", "s"), ("s", "seconds", ".3f"), ("pct", "% of step", ".1f")])
        + f"\nCommunication per GPU per step: FSDP {p['comm_bytes']['fsdp'] / 1e9:.1f} GB (overlapped but "
        f"for the first gather and last reduce-scatter), Ulysses {p['comm_bytes']['cp'] / 1e9:.1f} GB "
        f"(exposed, NVLink). Constants: {consts}.\n"
    )


def write_report(fake: list[dict], cpu: list[dict], raw: dict | None, path: Path) -> None:
    """The dated markdown report: commands, both tables, the target by category, the MFU breakdown."""
    out = [
        f"# Planner validation: `parallel.plan` against measurements ({datetime.date.today()})\n",
        f"Generated by `python -m benchmarks.plan_validate` (torch {torch.__version__}, CPU only: no GPU "
        "in this task). Planner: `python -m benchmarks.plan PRESET ...`; latent sizes as `dit.flops`, "
        "text 512 tokens in (a), 64 in (b).\n",
    ]
    if fake:
        t = fake[0]
        out += [
            "## (a) FSDP2 memory tracker on fake tensors, fake process group, rank 0\n",
            "`FSDPMemTracker` around one forward + backward + AdamW step of `dit.model.SpacetimeDiT` "
            "parallelized by `parallel.parallelize.parallelize` (bf16 mixed precision), peak per GPU.\n",
            _table(
                fake,
                [
                    ("preset", "preset", "s"),
                    ("latent", "latent", "s"),
                    ("layout", "layout", "s"),
                    ("ac", "ac", "s"),
                ]
                + [("measured_gib", "tracker peak GiB", ".2f"), ("predicted_gib", "planner GiB", ".2f")]
                + [
                    ("ratio", "planner / tracker", ".3f"),
                    ("acts_measured_gib", "acts after fwd, tracker", ".2f"),
                ]
                + [("acts_predicted_gib", "acts, planner", ".2f"), ("seconds", "run s", ".0f")],
            ),
            f"\nTarget, {t['preset']} at {t['latent']} (75.6k tokens), {t['layout']}, {t['ac']}: planner / "
            f"tracker = {t['ratio']:.3f} (target: within 15%). By category at the tracker's peak:\n",
            _categories(t),
        ]
        if raw:
            out.append(
                f"\nThe raw tool (module tracker's default hook, see the notes) reports "
                f"{raw['Total'] / GIB:.2f} GiB for the target, {raw.get('Temp', 0) / GIB:.2f} GiB of it "
                "Temp.\n"
            )
    if cpu:
        out += [
            "\n## (b) Real CPU runs: activation bytes at the end of forward\n",
            "torch `MemTracker`, bytes forward allocated and still alive (saved tensors, autocast weight "
            "copies, output, loss), one process, bf16 autocast with CUDA's fp32 norms.\n",
            _table(
                cpu,
                [
                    ("preset", "preset", "s"),
                    ("latent", "latent", "s"),
                    ("batch", "batch", "d"),
                    ("ac", "ac", "s"),
                ]
                + [("measured_mib", "measured MiB", ".2f"), ("predicted_mib", "planner MiB", ".2f")]
                + [("ratio", "planner / measured", ".3f")],
            ),
        ]
    out += [
        "\n## Predicted MFU: video-14b, 21×90×160 latents, 64×H100, dp_shard 8 × cp 8, full\n",
        _mfu_section(),
    ]
    out += ["\n## Notes\n", NOTES, ""]
    path.write_text("\n".join(out))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.plan_validate", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--skip-fake", action="store_true", help="skip (a), the fake-tensor FSDP runs")
    p.add_argument("--skip-cpu", action="store_true", help="skip (b), the real CPU runs")
    p.add_argument("--raw", action="store_true", help="(a): also run the target with the raw tracker")
    p.add_argument("--report", type=Path, default=REPORT)
    a = p.parse_args(argv)
    fake = [] if a.skip_fake else fake_rows()
    raw = None
    if a.raw and not a.skip_fake:
        preset, thw, layout, ac = FAKE_CASES[0]
        raw = fake_fsdp_run(preset, thw, 512, Layout.parse(layout), ac, raw_tracker=True)["peak"]
    cpu = [] if a.skip_cpu else activation_rows(CPU_CASES)
    for row in fake + cpu:
        print(json.dumps({k: v for k, v in row.items() if k not in ("tracker", "plan")}))
    write_report(fake, cpu, raw, a.report)
    print(f"report: {a.report}")


if __name__ == "__main__":
    main()
