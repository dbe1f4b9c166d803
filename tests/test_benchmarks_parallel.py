"""The parallel-layout benchmark's measurements: comm formulas against bytes really sent, and
activation bytes per rank under cp=2 against one process (2 gloo ranks, a tiny model); and the step
benchmark's import of diffusers' Wan (same weights on both sides, the output difference reported)."""

from __future__ import annotations

import re
import sys

import pytest
import torch

from benchmarks import model_step, report
from benchmarks.comm_volume import attention_comm_bytes
from benchmarks.parallel_layouts import Layout, Spec, run_group, summarize
from dit.config import PRESETS, DiTConfig, get_preset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cp2(tmp_path_factory):
    arch = DiTConfig(
        in_channels=4, hidden_size=32, depth=2, num_heads=4, text_dim=16, patch_size=(1, 2, 2),
        mlp="gelu_tanh", qk_norm=True, pos_embed="rope3d", modulation="shared", conditioning="text",
    )  # fmt: skip
    layouts = [
        Layout("single", None),
        Layout("ulysses", {"cp": 2, "cp_ring": 1}),
        Layout("ring", {"cp": 2, "cp_ring": 2}),
    ]
    spec = Spec(arch, latent=(4, 8, 8), text_len=8, warmup=0, iters=1, layouts=layouts)
    ranks = run_group(spec, 2, tmp_path_factory.mktemp("cp2"))
    return ranks, summarize(spec, ranks)[1]


@pytest.mark.parametrize("layout", ["ulysses", "ring"])
def test_comm_formula_matches_bytes_sent(cp2, layout):
    ranks, ratios = cp2
    # 64 tokens × 32 wide over 2 ranks, 2 attention layers, fp32
    per_layer = attention_comm_bytes(64, 32, 2)
    for r in ranks:
        assert r[layout]["comm_fwd"] == 2 * per_layer[f"{layout}_fwd"]
        assert r[layout]["comm_bwd"] == 2 * per_layer[f"{layout}_bwd"]
    assert ratios[layout]["comm_matches"] is True
    assert ranks[0]["single"]["comm_fwd"] == ranks[0]["single"]["comm_bwd"] == 0


def test_cp2_halves_activations(cp2):
    ranks, ratios = cp2
    for layout in ("ulysses", "ring"):
        # ≈ 1/2: a little more, since the input latents, gathered output and text states stay whole
        assert 0.45 < ratios[layout]["activations"] < 0.7, ratios[layout]
        assert ranks[1][layout]["act_bytes"] == ranks[0][layout]["act_bytes"]


def test_ring_backward_sends_fp32_gradients_whatever_the_activation_dtype():
    b = attention_comm_bytes(tokens=1024, hidden=64, p=4, act_bytes=2)
    chunk = 256 * 64
    assert b["ulysses_fwd"] == b["ulysses_bwd"] == 4 * 3 * chunk // 4 * 2
    assert b["ring_fwd"] == 2 * 3 * chunk * 2
    assert b["ring_bwd"] == b["ring_fwd"] + 2 * 4 * chunk * 4
    assert set(attention_comm_bytes(1024, 64, 1).values()) == {0}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_mfu_sweep_refuses_cpu():
    with pytest.raises(SystemExit, match="needs CUDA"):
        model_step.main(["--mfu"])


def test_wan_shaped_means_across_heads_qk_norm():
    # qk_norm is a str: "none" and "per_head" are truthy but not Wan's norm, so no reference is built
    wan = get_preset("wan2.1-t2v-1.3b", depth=1, hidden_size=32, num_heads=2, ffn_dim=48, text_dim=24)
    assert model_step.wan_reference(wan) is not None
    for kind in ("none", "per_head"):
        assert model_step.wan_reference(wan.replace(qk_norm=kind)) is None
    assert model_step.wan_reference(get_preset("video-small", depth=1)) is None


def test_imported_wan_step_reports_same_output_and_a_ratio(tmp_path):
    """A tiny Wan-shaped run: ours is imported from diffusers' Wan (save_pretrained → read_diffusers →
    to_ours), both are timed, and the report carries the ratio and the forward's output difference."""
    tiny = get_preset(
        "wan2.1-t2v-1.3b", hidden_size=32, num_heads=2, depth=2, ffn_dim=48, text_dim=24, in_channels=4,
        freq_dim=32,
    )  # fmt: skip
    args = ["--preset", "wan-tiny", "--frames", "2", "--height", "4", "--width", "6", "--warmup", "0",
            "--iters", "2", "--device", "cpu", "--threads", "1"]  # fmt: skip
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PRESETS, "wan-tiny", tiny)
        mp.setattr(report, "RESULTS", tmp_path)
        mp.setattr(sys, "argv", ["benchmarks/model_step.py", *args])
        result = model_step.main(args)
    assert torch.get_num_threads() == threads  # --threads applies to the run only
    diff = result["difference"]
    assert diff["output_rms"] > 0.1  # a real output, not a trivially zero one
    assert diff["relative"] <= 1e-5
    assert 0 <= diff["max_abs"] <= 1e-5 * 10 * diff["output_rms"]
    assert [r["model"] for r in result["rows"]] == ["spacetime-dit", "diffusers-wan"]
    assert result["rows"][0]["params"] == result["rows"][1]["params"]
    (path,) = tmp_path.glob("*-model_step-wan-import-cpu.md")
    text = path.read_text()
    assert "--preset wan-tiny" in text and "qk_norm='across_heads'" in text
    assert "- text_len: `512`" in text  # Wan's text convention by default
    ratio = float(re.search(r"Speed ratio .*?\*\*([0-9.]+)\*\*", text).group(1))
    assert ratio > 0 and ratio == pytest.approx(result["ratio"], abs=1e-3)
    assert result["paired_ratio"] > 0 and "- torch threads: `1`" in text
    rel = float(re.search(r"relative ‖Δ‖/‖ref‖ = \*\*([0-9.e+-]+)\*\*", text).group(1))
    assert rel == pytest.approx(diff["relative"], rel=1e-3)
