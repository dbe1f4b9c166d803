"""The model options for pretrained video DiTs: qk norm across heads, RMSNorm block norms, LTX's RoPE."""

import json

import pytest
import torch
import torch.nn.functional as F

from dit.config import DiTConfig, get_preset
from dit.layers import AcrossHeadsRMSNorm, SelfAttention, qk_norm_module
from dit.model import SpacetimeDiT, build_model
from tests.dit.helpers import inputs, random_model


def _rms(x: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    # the definition, written out: x / sqrt(mean(x²) + eps) over dims
    return x / torch.sqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)


def _output_with(model, module, added, x, t, kw: dict) -> torch.Tensor:
    """``model``'s output with ``added`` summed onto ``module``'s output (a forward hook, removed after)."""
    hook = module.register_forward_hook(lambda mod, args, out: out + added)
    try:
        return model(x, t, **kw)
    finally:
        hook.remove()


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
    from dit.config import qk_norm_kind

    assert DiTConfig(qk_norm=given).qk_norm == kind == qk_norm_kind(given)
    assert qk_norm_kind("across_heads") == "across_heads"


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


def _diffusers_ltx_rope(dim, heads, grid, fps, patch, base, comp):
    """diffusers' LTX RoPE on one sample: (cos, sin) 1×N×D and its rotation of a 1×N×D query."""
    from diffusers.models.transformers.transformer_ltx import LTXVideoRotaryPosEmbed, apply_rotary_emb

    rope = LTXVideoRotaryPosEmbed(dim, *base, patch_size=patch[1], patch_size_t=patch[0])
    scale = (comp[0] / fps, comp[1], comp[2])
    return rope(torch.zeros(1, 1, dim), *grid, rope_interpolation_scale=scale), apply_rotary_emb


@pytest.mark.parametrize(
    ("heads", "head_dim", "patch"),
    [(4, 6, (1, 1, 1)), (2, 10, (1, 1, 1)), (3, 8, (2, 1, 1))],  # D = 24, 20 (D % 6 = 2), 24 with pt = 2
)
def test_ltx_rope_equals_diffusers_with_two_frame_rates_in_a_batch(heads, head_dim, patch):
    from dit.embeddings import RopeLTX, apply_rope

    pytest.importorskip("diffusers")
    dim, grid, fps = heads * head_dim, (3, 4, 5), torch.tensor([25.0, 12.0])
    base, comp = (20, 2048, 2048), (8, 32, 32)
    ours = RopeLTX(dim, heads, patch, base, comp)
    cos, sin = ours(grid, fps)  # N, B, H, Dh/2
    n = 3 * 4 * 5
    assert cos.shape == (n, 2, heads, head_dim // 2)
    q = torch.randn(2, n, dim, generator=torch.Generator().manual_seed(0))
    rotated = apply_rope(q.unflatten(-1, (heads, head_dim)), (cos, sin)).flatten(-2)  # B, N, D
    for i, f in enumerate(fps.tolist()):
        (d_cos, d_sin), rotate = _diffusers_ltx_rope(dim, heads, grid, f, patch, base, comp)
        # their tables repeat each angle over its channel pair; ours hold one angle per pair
        torch.testing.assert_close(cos[:, i].flatten(-2), d_cos[0, :, ::2], rtol=0, atol=1e-6)
        torch.testing.assert_close(sin[:, i].flatten(-2), d_sin[0, :, ::2], rtol=0, atol=1e-6)
        torch.testing.assert_close(rotated[i], rotate(q[i : i + 1], (d_cos, d_sin))[0], rtol=0, atol=1e-6)
        # one frame rate for the batch: a shared N×H×Dh/2 table, the same rotation
        shared = ours(grid, torch.tensor(f))
        assert shared[0].shape == (n, heads, head_dim // 2)
        one = apply_rope(q[i : i + 1].unflatten(-1, (heads, head_dim)), shared).flatten(-2)
        torch.testing.assert_close(one[0], rotated[i], rtol=0, atol=0)
    # the two frame rates give other time coordinates (the spatial ones agree)
    assert (cos[:, 0] - cos[:, 1]).abs().max() > 1e-3


def test_ltx_rope_tables_are_token_first_for_the_context_parallel_cut():
    """parallel.context keeps a rank's chunk of every table along dim 0 (``local_chunk(z, 0, cp)``) with
    its chunk of the tokens along dim 1: both table kinds must rotate a chunk as the whole does."""
    from dit.embeddings import RopeLTX, apply_rope

    rope = RopeLTX(24, 4, (1, 1, 1), (20, 2048, 2048), (8, 32, 32))
    q = torch.randn(2, 4 * 2 * 3, 4, 6, generator=torch.Generator().manual_seed(0))  # B, N, H, Dh
    for fps in (torch.tensor(24.0), torch.tensor([24.0, 30.0])):
        tables = rope((4, 2, 3), fps)
        whole = apply_rope(q, tables)
        for rank in range(2):
            chunk = tuple(z.chunk(2, dim=0)[rank] for z in tables)
            torch.testing.assert_close(
                apply_rope(q.chunk(2, dim=1)[rank], chunk), whole.chunk(2, dim=1)[rank]
            )


def test_rope_ltx_model_needs_fps_and_uses_it():
    cfg = get_preset("tiny", depth=1, pos_embed="rope_ltx", qk_norm="across_heads", block_norm="rmsnorm")
    assert cfg.needs_fps and not get_preset("tiny").needs_fps
    model = random_model(cfg)
    x, t, kw = inputs(cfg)
    with pytest.raises(ValueError, match="rope_ltx.*needs fps"):
        model(x, t, **kw)
    a = model(x, t, **kw, fps=torch.tensor([24.0, 24.0]))
    torch.testing.assert_close(model(x, t, **kw, fps=24.0), a, rtol=1e-6, atol=1e-6)  # shared table
    b = model(x, t, **kw, fps=torch.tensor([24.0, 8.0]))
    torch.testing.assert_close(b[0], a[0], rtol=1e-6, atol=1e-6)  # per sample: sample 0 unchanged
    assert (b[1] - a[1]).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["sincos3d", "learned"])
@pytest.mark.parametrize("rope", ["rope3d", "rope_ltx"])
def test_abs_pos_embed_adds_its_table_to_the_patch_embedding_and_keeps_the_rope(kind, rope):
    """``abs_pos_embed`` = the plain rotary model with the additive table added after the patch embedding."""
    base = get_preset("tiny", pos_embed=rope, fps_conditioning=rope == "rope_ltx")
    plain = random_model(base)
    both = SpacetimeDiT(DiTConfig(**{**vars(base), "abs_pos_embed": kind}))
    extra = set(both.state_dict()) - set(plain.state_dict())
    assert extra == ({"pos_embed.t", "pos_embed.h", "pos_embed.w"} if kind == "learned" else set())
    torch.manual_seed(3)
    both.load_state_dict({**plain.state_dict(), **{k: torch.randn_like(both.state_dict()[k]) for k in extra}})
    assert both.rope is not None and type(both.rope) is type(plain.rope)
    x, t, kw = inputs(both.cfg, t=4, h=6, w=8)
    grid = both.grid(x)
    table = both.pos_embed(grid, x.device)
    want = _output_with(plain, plain.patch_embed, table, x, t, kw)
    torch.testing.assert_close(both(x, t, **kw), want, rtol=1e-5, atol=1e-5)
    assert (both(x, t, **kw) - plain(x, t, **kw)).abs().max() > 1e-3  # the table changes the output


def test_abs_pos_embed_is_off_by_default_and_only_next_to_a_rope():
    assert DiTConfig().abs_pos_embed == "none"
    assert SpacetimeDiT(get_preset("tiny")).pos_embed is None  # the rope3d model has no additive table
    with pytest.raises(ValueError, match="already additive"):
        DiTConfig(pos_embed="sincos3d", abs_pos_embed="sincos3d")
    with pytest.raises(ValueError, match="abs_pos_embed='rope3d'"):
        DiTConfig(abs_pos_embed="rope3d")


def _reversed_text(kw: dict) -> dict:
    # the same text states in reverse order (the mask with them): the same set of tokens, another order
    return {**kw, "context": kw["context"].flip(1), "context_mask": kw["context_mask"].flip(1)}


def test_cross_attention_alone_cannot_see_the_order_of_the_text_tokens():
    """Why ``text_pos_embed`` exists: without it, reordering the text states leaves the output unchanged
    (cross-attention is a weighted sum over the token set), so "from left to right" and "from right to
    left" differ only as much as the encoder's states do."""
    plain = random_model(get_preset("tiny"))
    x, t, kw = inputs(plain.cfg, b=1)
    torch.testing.assert_close(plain(x, t, **_reversed_text(kw)), plain(x, t, **kw), rtol=1e-5, atol=1e-5)


def test_text_pos_embed_adds_a_learned_row_per_text_position():
    """The option = the plain model with its table's first L rows added after the text projection."""
    assert DiTConfig().text_pos_embed is False
    base = get_preset("tiny")
    plain = random_model(base)
    withpos = SpacetimeDiT(DiTConfig(**{**vars(base), "text_pos_embed": True, "text_len": 9}))
    assert set(withpos.state_dict()) - set(plain.state_dict()) == {"text_proj.pos"}
    assert withpos.text_proj.pos.shape == (9, base.hidden_size)
    torch.manual_seed(5)
    table = torch.randn(9, base.hidden_size)
    withpos.load_state_dict({**plain.state_dict(), "text_proj.pos": table})
    x, t, kw = inputs(base, text_len=7)
    want = _output_with(plain, plain.text_proj, table[:7], x, t, kw)
    torch.testing.assert_close(withpos(x, t, **kw), want, rtol=1e-5, atol=1e-5)
    # now the order of the tokens matters
    assert (withpos(x, t, **_reversed_text(kw)) - withpos(x, t, **kw)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="10 text tokens; the text position table has 9"):
        withpos(*inputs(base, text_len=10)[:2], **inputs(base, text_len=10)[2])
    # no text_len: a 512-row table; initialised like the other embedding tables, N(0, 0.02)
    fresh = build_model(DiTConfig(**{**vars(base), "text_pos_embed": True}), seed=0)
    assert fresh.text_proj.pos.shape[0] == 512
    assert 0.015 < float(fresh.text_proj.pos.detach().std()) < 0.025


def _pooled_by_hand(model: SpacetimeDiT, kw: dict) -> torch.Tensor:
    # the definition, written out: LayerNorm → fc1 → SiLU per projected token, mean over the real ones, fc2
    pool = model.text_pool
    tokens = model.text_proj(kw["context"])  # B, L, D
    h = F.silu(pool.fc1(F.layer_norm(tokens, tokens.shape[-1:])))
    rows = [h[i][kw["context_mask"][i]].mean(0) for i in range(h.shape[0])]
    return pool.fc2(torch.stack(rows))  # B, D (B, frames·D with text_pool_frames)


def test_text_pool_adds_the_pooled_caption_to_the_conditioning_vector():
    """The option = the plain model with the pooled vector added where the timestep embedding enters c."""
    assert DiTConfig().text_pool is False
    base = DiTConfig(**{**vars(get_preset("tiny")), "text_pos_embed": True, "text_len": 7})
    pooled = random_model(base.replace(text_pool=True))
    plain = SpacetimeDiT(base)
    extra = set(pooled.state_dict()) - set(plain.state_dict())
    assert extra == {
        "text_pool.fc1.weight",
        "text_pool.fc1.bias",
        "text_pool.fc2.weight",
        "text_pool.fc2.bias",
    }
    plain.load_state_dict({k: v for k, v in pooled.state_dict().items() if k not in extra})
    x, t, kw = inputs(base)
    vec = _pooled_by_hand(pooled, kw).detach()
    want = _output_with(plain, plain.t_embedder, vec[:, None], x, t, kw)
    torch.testing.assert_close(pooled(x, t, **kw), want, rtol=1e-5, atol=1e-5)
    assert (pooled(x, t, **kw) - plain(x, t, **kw)).abs().max() > 1e-3  # the hook was not a no-op


def test_text_pool_reads_word_order_ignores_padding_and_pools_the_null_caption_to_its_bias():
    base = DiTConfig(**{**vars(get_preset("tiny")), "text_pos_embed": True, "text_len": 7, "text_pool": True})
    model = random_model(base)
    _, _, kw = inputs(base)
    tokens = model.text_proj(kw["context"])
    vec = model.text_pool(tokens, kw["context_mask"])
    # the same states in another order: another vector (a mean of linear states could not tell)
    flipped = _reversed_text(kw)
    other = model.text_pool(model.text_proj(flipped["context"]), flipped["context_mask"])
    assert (other - vec).abs().max() > 1e-2
    # what stands in the masked positions does not count
    junk = kw["context"].clone()
    junk[~kw["context_mask"]] = 100.0
    torch.testing.assert_close(model.text_pool(model.text_proj(junk), kw["context_mask"]), vec)
    # the null caption of CFG (all masked) pools to zeros: its vector is fc2's bias
    null = model.text_pool(tokens, torch.zeros_like(kw["context_mask"]))
    torch.testing.assert_close(null, model.text_pool.fc2.bias.expand_as(null))
    with pytest.raises(ValueError, match="text_pool=True .* conditioning='class'"):
        base.replace(conditioning="class")


@pytest.mark.parametrize("frames", [0, 4])
def test_text_pool_is_fp32_under_bf16_autocast(frames):
    """The pooled vector (with ``text_pool_frames``, each frame's) joins the fp32 conditioning vector:
    under CPU bf16 autocast (where CUDA's would run) it is computed in fp32 from bf16 text states and equals
    the fp32 computation on those states. Only a GPU can confirm CUDA autocast's own kernels; the dtype
    rule is the same."""
    cfg = DiTConfig(**{**vars(get_preset("tiny")), "text_pool": True, "text_pool_frames": frames})
    model = random_model(cfg)
    _, _, kw = inputs(cfg)
    tokens = model.text_proj(kw["context"]).bfloat16()
    want = model.text_pool(tokens.float(), kw["context_mask"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model.text_pool(tokens, kw["context_mask"])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_text_pool_starts_at_unit_scale():
    """The point of the option: unlike the N(0, 0.02) embedding MLPs, a fresh model's pooled vector differs
    between captions by an amount of the order of its own scale, so the modulation can read the caption
    from the first steps (benchmarks/results/demo-2026-12-01.md, session 7)."""
    cfg = get_preset("demo").replace(text_pool=True)
    model = build_model(cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    context, mask = torch.randn(8, 24, cfg.text_dim, generator=g), torch.ones(8, 24, dtype=torch.bool)
    with torch.no_grad():
        vec = model.text_pool(model.text_proj(context), mask)  # 8, D
        time = model.t_embedder(torch.full((8, 1), 1000.0))[:, 0]
    spread = (vec - vec.mean(0)).pow(2).mean().sqrt()
    assert spread > 0.05
    assert spread > 2 * time.pow(2).mean().sqrt()  # larger than the whole timestep embedding


def test_text_pool_frames_gives_each_latent_frame_its_own_map_of_the_pooled_caption():
    """``text_pool_frames``: the plain model with frame f's vector, fc2's f-th D rows applied to the pooled
    caption, added to frame f's conditioning vector (the per-frame modulation path of per-frame t)."""
    assert DiTConfig().text_pool_frames == 0
    base = DiTConfig(**{**vars(get_preset("tiny")), "text_pos_embed": True, "text_len": 7})
    framed = random_model(base.replace(text_pool=True, text_pool_frames=5))
    plain = SpacetimeDiT(base)
    plain.load_state_dict({k: v for k, v in framed.state_dict().items() if not k.startswith("text_pool.")})
    x, t, kw = inputs(base)  # 3 latent frames of the 5 the table covers
    pool, d = framed.text_pool, base.hidden_size
    assert pool.fc2.weight.shape == (5 * d, d)
    tokens = framed.text_proj(kw["context"])
    per_frame = _pooled_by_hand(framed, kw).unflatten(1, (5, d))[:, :3].detach()  # frame f: fc2's f-th D rows
    assert (per_frame[:, 0] - per_frame[:, 2]).abs().max() > 1e-2  # the frames do get different vectors
    torch.testing.assert_close(framed.text_pool(tokens, kw["context_mask"], 3), per_frame)
    want = _output_with(plain, plain.t_embedder, per_frame, x, t, kw)
    torch.testing.assert_close(framed(x, t, **kw), want, rtol=1e-5, atol=1e-5)
    # per-frame timesteps still work next to it (both are B×F'×D)
    t_frames = torch.rand(x.shape[0], x.shape[2]) * 1000
    assert framed(x, t_frames, **kw).shape == x.shape
    # a clip longer than the table is refused, naming the field
    with pytest.raises(ValueError, match="6 latent frames; DiTConfig.text_pool_frames=5"):
        framed(*inputs(base, t=6)[:1], t, **kw)


def test_text_pool_frames_needs_text_pool_and_a_count():
    base = get_preset("tiny")
    with pytest.raises(ValueError, match="text_pool_frames=4: expected 0, or > 0 with text_pool=True"):
        base.replace(text_pool_frames=4)
    with pytest.raises(ValueError, match="text_pool_frames=-1"):
        base.replace(text_pool=True, text_pool_frames=-1)
    assert base.replace(text_pool=True, text_pool_frames=4).text_pool_frames == 4
