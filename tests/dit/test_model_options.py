"""The model options for pretrained video DiTs: qk norm across heads, RMSNorm block norms, LTX's RoPE."""

import json

import pytest
import torch
import torch.nn.functional as F

from dit.config import DiTConfig, get_preset
from dit.layers import AcrossHeadsRMSNorm, SelfAttention, qk_norm_module
from dit.model import SpacetimeDiT
from tests.dit.helpers import inputs, random_model


def _rms(x: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    # the definition, written out: x / sqrt(mean(x²) + eps) over dims
    return x / torch.sqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)


def test_across_heads_norm_is_an_rmsnorm_over_all_heads():
    g = torch.Generator().manual_seed(0)
    b, n, h, dh, eps = 2, 5, 4, 6, 1e-6
    x = torch.randn(b, n, h, dh, generator=g) * 3
    norm = AcrossHeadsRMSNorm(h * dh, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(h * dh, generator=g))
    out = norm(x)
    want = _rms(x, (-2, -1), eps) * norm.weight.view(h, dh)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    # diffusers' form (Wan/LTX norm_q): an RMSNorm over the whole projection before the head split
    flat = F.rms_norm(x.flatten(-2), (h * dh,), norm.weight, eps)
    torch.testing.assert_close(out.flatten(-2), flat, rtol=1e-6, atol=1e-6)
    # the per-head norm with the same (tiled) weight is another function
    per_head = F.rms_norm(x, (dh,), None, eps) * norm.weight.view(h, dh)
    assert (per_head - out).abs().max() > 0.1


def test_qk_norm_kinds_build_their_modules_and_parameter_shapes():
    assert isinstance(qk_norm_module("none", 32, 4, 1e-6), torch.nn.Identity)
    assert qk_norm_module("per_head", 32, 4, 1e-6).weight.shape == (8,)
    assert qk_norm_module(True, 32, 4, 1e-6).weight.shape == (8,)
    assert qk_norm_module("across_heads", 32, 4, 1e-6).weight.shape == (32,)
    with pytest.raises(ValueError, match="qk_norm='rms'"):
        qk_norm_module("rms", 32, 4, 1e-6)
    model = SpacetimeDiT(get_preset("tiny", qk_norm="across_heads"))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if ".norm_" in k}
    d = model.cfg.hidden_size
    for i in range(model.cfg.depth):
        for attn in ("attn", "cross_attn"):
            assert shapes[f"blocks.{i}.{attn}.norm_q.weight"] == (d,)
            assert shapes[f"blocks.{i}.{attn}.norm_k.weight"] == (d,)


def test_self_attention_across_heads_equals_a_norm_before_the_head_split():
    """Our norm on the B×N×H×Dh view equals diffusers' order: RMSNorm(D) on q = W x, then split."""
    g = torch.Generator().manual_seed(1)
    d, heads, eps = 24, 4, 1e-6
    attn = SelfAttention(d, heads, "across_heads", eps, "math")
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(2, 6, d, generator=g)
    from dit.layers import Grid

    out = attn(x, Grid(1, 2, 3), None)
    q = F.rms_norm(attn.q(x), (d,), attn.norm_q.weight, eps).unflatten(-1, (heads, -1))  # B, N, H, Dh
    k = F.rms_norm(attn.k(x), (d,), attn.norm_k.weight, eps).unflatten(-1, (heads, -1))
    v = attn.v(x).unflatten(-1, (heads, -1))
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    torch.testing.assert_close(out, attn.o(o.transpose(1, 2).flatten(-2)), rtol=1e-5, atol=1e-5)


def test_across_heads_norm_under_autocast_is_fp32():
    """CPU autocast stands in for CUDA's: the norm computes and returns fp32 from a bf16 projection, as
    CUDA autocast runs ``rms_norm`` (only a GPU confirms the CUDA kernel's own rounding)."""
    norm = AcrossHeadsRMSNorm(16, eps=1e-6)
    x = torch.randn(1, 3, 2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _rms(x.bfloat16().float(), (-2, -1), 1e-6), rtol=1e-6, atol=1e-6)
    assert norm(x.bfloat16()).dtype == torch.bfloat16  # a model cast to bf16 stays bf16


def test_per_head_and_across_heads_models_compute_different_functions():
    cfg = get_preset("tiny", depth=1)
    per_head = random_model(cfg.replace(qk_norm="per_head"))
    across = random_model(cfg.replace(qk_norm="across_heads"))
    # the same weights, with each per-head norm weight tiled over the heads: only the statistic differs
    state = {}
    for k, v in per_head.state_dict().items():
        state[k] = v.repeat(cfg.num_heads) if ".norm_q." in k or ".norm_k." in k else v
    # heads of unequal size (as trained ones are): head 0's queries 5× the others'
    state["blocks.0.attn.q.weight"][: cfg.head_dim] *= 5
    per_head.load_state_dict(state | {k: v for k, v in per_head.state_dict().items() if ".norm_" in k})
    across.load_state_dict(state)
    x, t, kw = inputs(cfg)
    a, b = per_head(x, t, **kw), across(x, t, **kw)
    assert (a - b).abs().max() > 1e-3 * a.abs().max()


@pytest.mark.parametrize(
    ("given", "kind"),
    [(True, "per_head"), (False, "none"), ("True", "per_head"), ("true", "per_head"), ("false", "none")],
)
def test_legacy_qk_norm_booleans_map_to_kinds(given, kind):
    assert DiTConfig(qk_norm=given).qk_norm == kind


def test_bad_qk_norm_and_block_norm_name_the_field():
    with pytest.raises(ValueError, match="DiTConfig.qk_norm=1"):
        DiTConfig(qk_norm=1)
    with pytest.raises(ValueError, match="DiTConfig.qk_norm='across'"):
        DiTConfig(qk_norm="across")
    with pytest.raises(ValueError, match="DiTConfig.block_norm='batchnorm'"):
        DiTConfig(block_norm="batchnorm")


def test_run_config_and_export_written_with_a_bool_load(tmp_path):
    """A run config (YAML) and an export's config.json from before qk_norm was a choice still load."""
    from launch.config import load_config
    from launch.export import read_export_config

    yaml_path = tmp_path / "old.yaml"
    yaml_path.write_text("model:\n  preset: tiny\n  arch:\n    qk_norm: true\n")
    assert load_config(yaml_path).model.arch.qk_norm == "per_head"
    yaml_path.write_text("model:\n  preset: tiny\n  arch:\n    qk_norm: false\n")
    assert load_config(yaml_path).model.arch.qk_norm == "none"
    json_path = tmp_path / "config.json"
    json_path.write_text(json.dumps({"arch": {"qk_norm": True, "depth": 2}}))
    assert read_export_config(json_path)["arch"].qk_norm == "per_head"


def test_rmsnorm_block_norm_is_a_parameter_free_rmsnorm():
    eps = 1e-6
    cfg = get_preset("tiny", depth=1, norm_eps=eps)
    ln, rms = SpacetimeDiT(cfg), SpacetimeDiT(cfg.replace(block_norm="rmsnorm"))
    # parameter-free: the same checkpoint keys and shapes either way
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(ln) == shapes(rms)
    x = torch.randn(2, 5, cfg.hidden_size) * 2 + 0.5
    for norm in (rms.blocks[0].norm1, rms.blocks[0].norm2):
        torch.testing.assert_close(norm(x), _rms(x, (-1,), eps), rtol=1e-6, atol=1e-6)
    want_ln = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    torch.testing.assert_close(ln.blocks[0].norm1(x), want_ln, rtol=1e-5, atol=1e-5)
    # the final layer keeps its LayerNorm
    torch.testing.assert_close(rms.final.norm(x), want_ln, rtol=1e-5, atol=1e-5)
    # and the model computes another function with the same weights
    a = random_model(cfg)
    b = SpacetimeDiT(cfg.replace(block_norm="rmsnorm"))
    b.load_state_dict(a.state_dict())
    xs, t, kw = inputs(cfg)
    assert (a(xs, t, **kw) - b(xs, t, **kw)).abs().max() > 1e-4
