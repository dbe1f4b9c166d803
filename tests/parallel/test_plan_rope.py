"""The planner's RoPE term (:func:`parallel.plan.rope_bytes`) for LTX-Video's per-head, per-sample
tables (``model.arch.pos_embed=rope_ltx``) against a real CPU run.

As ``tests/benchmarks/test_plan.py`` measures the activations: a forward under bf16 autocast with the
norms in fp32 as CUDA autocast runs them (:func:`benchmarks.plan_validate.emulate_cuda_norms`), bytes
alive at the end of forward (torch's ``MemTracker``). The RoPE term is isolated by measuring the same
model with ``rope3d`` and ``rope_ltx``: nothing else differs between them, so the difference of the
measurements is the difference of the tables. What only a GPU can confirm (the caching allocator's
rounding, CUDA kernels' workspaces) is outside this test, as it is outside the planner.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from benchmarks.plan_validate import emulate_cuda_norms
from dit.config import DiTConfig, get_preset
from dit.model import build_model
from parallel.plan import GIB, plan, rope_bytes

THW, TEXT_LEN, BATCH = (4, 8, 8), 8, 2  # latent frames × height × width: 4·4·4 = 64 tokens of patch 1×2×2


def _ltx_shaped(pos_embed: str) -> DiTConfig:
    """The tiny preset with LTX-Video's options (the RoPE kind under test)."""
    return get_preset("tiny").replace(
        pos_embed=pos_embed, qk_norm="across_heads", block_norm="rmsnorm", cross_attn_norm=False,
        fps_conditioning=False, modulation="shared", mlp="gelu_tanh",
    )  # fmt: skip


def _activation_bytes(arch: DiTConfig) -> int:
    """Bytes that forward allocated and that are alive at its end (saved tensors, the output, loss)."""
    g = torch.Generator().manual_seed(0)
    model = build_model(arch)
    emulate_cuda_norms(model)
    mask = torch.ones(BATCH, TEXT_LEN, dtype=torch.bool)
    mask[:, TEXT_LEN // 2 :] = False
    kwargs = {
        "x": torch.randn(BATCH, arch.in_channels, *THW, generator=g),
        "t": torch.rand(BATCH, generator=g) * 1000,
        "context": torch.randn(BATCH, TEXT_LEN, arch.text_dim, generator=g),
        "context_mask": mask,
    }
    if arch.needs_fps:
        kwargs["fps"] = torch.tensor([24.0, 8.0])  # one per sample, as the trainer passes them
    target = torch.randn(BATCH, arch.out_ch, *THW, generator=g)
    mt = MemTracker()
    mt.track_external(model)
    with mt:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**kwargs)
        loss = (out.float() - target).square().mean()
        got = sum(snap.get("Activation", 0) for snap in mt.get_tracker_snapshot("current").values())
        loss.backward()
    return got


def _predicted(arch: DiTConfig) -> float:
    p = plan(arch, *THW, batch=BATCH, text_len=TEXT_LEN)
    return p["activation_detail_gib"]["after_forward"] * GIB


def test_ltx_tables_are_per_sample_and_span_the_inner_width():
    """N×B×D/2 per table for rope_ltx (scales with the batch), N×Dh/2 for rope3d (does not)."""
    ltx, rope3d = _ltx_shaped("rope_ltx"), _ltx_shaped("rope3d")
    assert rope_bytes(ltx, 100, 3) == 3 * rope_bytes(ltx, 100, 1) == 3 * 2 * 4 * 100 * ltx.hidden_size // 2
    assert rope_bytes(rope3d, 100, 3) == rope_bytes(rope3d, 100, 1) == 2 * 4 * 100 * rope3d.head_dim // 2
    assert rope_bytes(ltx.replace(pos_embed="sincos3d"), 100, 3) == 0
    # a tp or cp rank's tables are views of the whole ones: the term does not divide
    full = plan(ltx, *THW, batch=BATCH, text_len=TEXT_LEN)["activation_detail_gib"]["outside_rope"]
    assert full * GIB == rope_bytes(ltx, 64, BATCH)


@pytest.mark.slow
def test_rope_ltx_tables_match_a_real_cpu_run():
    """The rope_ltx − rope3d difference of the measured activations equals the planner's within 2% (the
    tables are all that differ), and the whole estimate is within the 15% the existing plan tests use.
    Tables counted once for the batch instead of per sample predict less than half the difference here
    (batch 2); no rope_ltx term at all, as before, a negative one."""
    ltx, rope3d = _ltx_shaped("rope_ltx"), _ltx_shaped("rope3d")
    got_ltx, got_3d = _activation_bytes(ltx), _activation_bytes(rope3d)
    want_diff = rope_bytes(ltx, 64, BATCH) - rope_bytes(rope3d, 64, BATCH)
    assert want_diff > 0
    assert got_ltx - got_3d == pytest.approx(want_diff, rel=0.02)
    assert _predicted(ltx) - _predicted(rope3d) == pytest.approx(want_diff, rel=1e-9)
    assert _predicted(ltx) == pytest.approx(got_ltx, rel=0.15)
