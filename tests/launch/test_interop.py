"""launch.interop: diffusers Wan / LTX-Video ↔ SpacetimeDiT, on tiny random diffusers models (CPU, fp32).

The diffusers models are built here with every weight non-zero (``diffusers_models.perturb_``), saved
with ``save_pretrained`` and read back by our reader, so each test covers the file formats as well as
the mapping. The reference forward is diffusers' own module.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dit.config import DiTConfig
from dit.model import build_model
from launch import interop
from launch.interop import ltx, wan
from tests.launch.diffusers_models import build_ltx, build_wan, tiny_wan, tiny_wan_pipeline_root

RTOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def ours_from(folder, **read):
    cfg, state = interop.to_ours(interop.read_diffusers(folder, **read))
    model = build_model(cfg)
    model.load_state_dict(state, strict=True)
    return cfg, model.eval()


def saved(model, folder):
    model.save_pretrained(folder)
    return folder


# ---- Wan forward parity ------------------------------------------------------------------------------
@pytest.mark.parametrize("pt", [1, 2])
def test_wan21_t2v_forward_matches_diffusers(tmp_path, pt):
    ref = build_wan("t2v", seed=pt, patch_size=(pt, 2, 2))
    cfg, ours = ours_from(saved(ref, tmp_path / "wan"))
    assert (cfg.qk_norm, cfg.patch_size, cfg.hidden_size, cfg.num_heads) == (
        "across_heads",
        (pt, 2, 2),
        32,
        2,
    )
    assert (cfg.text_mask, cfg.text_null, cfg.text_len) == (False, "empty_prompt", 512)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 4, 6, 10, generator=gen)  # non-square grid: 4/pt × 3 × 5 patches
    t = torch.tensor([937.5, 12.25])
    ctx = torch.randn(2, 7, 24, generator=gen)
    with torch.no_grad():
        want = ref(x, t, ctx, return_dict=False)[0]
        got = ours(x, t, ctx)
    assert want.shape == got.shape == x.shape
    assert rel(got, want) <= RTOL


def test_wan22_ti2v_per_frame_timesteps_match_diffusers(tmp_path):
    """The TI2V pipeline's ``expand_timesteps``: one t per token, 0 on the clean first frame; ours takes
    one t per latent frame, which is the same function."""
    ref = build_wan("ti2v", seed=3)
    _, ours = ours_from(saved(ref, tmp_path / "wan"))
    gen = torch.Generator().manual_seed(1)
    b, c, f, h, w = 2, 6, 3, 4, 6
    x = torch.randn(b, c, f, h, w, generator=gen)
    ctx = torch.randn(b, 5, 24, generator=gen)
    t = torch.tensor([[0.0, 700.0, 700.0], [0.0, 31.5, 31.5]])  # B, F: the first frame is clean
    # WanPipeline: (mask[0][0][:, ::2, ::2] * t).flatten(), one value per patch token in (f h w) order
    per_token = t[:, :, None, None].expand(b, f, h // 2, w // 2).reshape(b, -1)
    with torch.no_grad():
        want = ref(x, per_token, ctx, return_dict=False)[0]
        got = ours(x, t, ctx)
        plain = ours(x, t[:, 1], ctx)  # the same t on every frame is another function
    assert rel(got, want) <= RTOL
    assert rel(plain, want) > 1e3 * RTOL


def test_wan_round_trip_is_bit_exact(tmp_path):
    """diffusers → ours → diffusers: every tensor equal (dtype included), config.json equal."""
    src = tiny_wan(tmp_path, "t2v", seed=5, patch_size=(2, 2, 2))
    bf16 = tmp_path / "bf16"
    build_wan("t2v", seed=6).to(torch.bfloat16).save_pretrained(bf16)
    for folder in (src, bf16):
        cfg, state = interop.to_ours(interop.read_diffusers(folder))
        out = interop.write_diffusers(interop.to_diffusers(cfg, state), tmp_path / f"{folder.name}-back")
        a, b = (
            load_file(folder / "diffusion_pytorch_model.safetensors"),
            load_file(out / "diffusion_pytorch_model.safetensors"),
        )
        assert sorted(a) == sorted(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        ca, cb = (json.loads((p / "config.json").read_text()) for p in (folder, out))
        assert ca.pop("_diffusers_version") and cb.pop("_diffusers_version")
        assert ca == cb


# ---- what Wan cannot express ----------------------------------------------------------------------
def _read(folder):
    return interop.read_diffusers(folder)


def test_wan_refuses_fields_it_cannot_express(tmp_path):
    m = _read(tiny_wan(tmp_path))
    # Wan2.1-I2V-14B's CLIP image branch
    m.config.update(image_dim=1280, added_kv_proj_dim=5120)
    with pytest.raises(ValueError, match=r"WanTransformer3DModel.*image_dim=1280.*added_kv_proj_dim=5120"):
        interop.to_ours(m)
    m = _read(tiny_wan(tmp_path, name="b"))
    m.config.update(qk_norm="rms_norm", window_size=[-1, -1])
    with pytest.raises(ValueError, match=r"WanTransformer3DModel.*window_size.*qk_norm='rms_norm'"):
        interop.to_ours(m)


def test_wan_unmapped_or_missing_tensor_is_an_error(tmp_path):
    m = _read(tiny_wan(tmp_path))
    m.state["blocks.0.attn1.norm_added_q.weight"] = torch.ones(32)
    with pytest.raises(ValueError, match=r"unmapped source tensors \(1\): blocks\.0\.attn1\.norm_added_q"):
        interop.to_ours(m)
    m = _read(tiny_wan(tmp_path, name="b"))
    del m.state["blocks.1.ffn.net.2.bias"]
    with pytest.raises(ValueError, match=r"missing tensors \(1\): blocks\.1\.ffn\.net\.2\.bias"):
        interop.to_ours(m)
    m = _read(tiny_wan(tmp_path, name="c"))
    m.config["ffn_dim"] = 64  # the config and the tensors disagree
    with pytest.raises(
        ValueError, match=r"blocks\.0\.mlp\.fc1\.weight \(48, 32\) \(config implies \(64, 32\)\)"
    ):
        interop.to_ours(m)


def test_to_diffusers_lists_what_wan_cannot_express():
    cfg = DiTConfig(
        hidden_size=32, num_heads=2, depth=1, text_dim=24, qk_norm="per_head", modulation="per_block"
    )
    state = build_model(cfg).state_dict()
    with pytest.raises(ValueError) as e:
        interop.to_diffusers(cfg, state)
    for field in ("qk_norm='per_head'", "modulation='per_block'", "text_mask=True"):
        assert field in str(e.value)


# ---- formats -------------------------------------------------------------------------------------
def test_sharded_index_reads_the_same_tensors_and_refuses_escaping_shards(tmp_path):
    folder = tiny_wan(tmp_path)
    whole = load_file(folder / "diffusion_pytorch_model.safetensors")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((folder / "config.json").read_text())
    keys = sorted(whole)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2]}  # fmt: skip
    for name, names in shards.items():
        save_file({k: whole[k] for k in names}, sharded / name)
    index = {"metadata": {}, "weight_map": {k: n for n, names in shards.items() for k in names}}
    index_file = sharded / "diffusion_pytorch_model.safetensors.index.json"
    index_file.write_text(json.dumps(index))
    got = interop.read_diffusers(sharded).state
    assert sorted(got) == keys and all(torch.equal(got[k], whole[k]) for k in keys)

    index["weight_map"][keys[0]] = "../wan-t2v/diffusion_pytorch_model.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(
        ValueError,
        match=r"shard '\.\./wan-t2v/diffusion_pytorch_model\.safetensors' is not a file name inside",
    ):
        interop.read_diffusers(sharded)


def test_sharded_model_in_the_hub_cache_layout_loads(tmp_path):
    """The Hugging Face hub cache: every file of ``snapshots/<rev>/transformer/`` is a symlink into
    ``blobs/`` (a hash name, another folder); the shards are read through the links as diffusers does,
    while an index naming a path (``../x``, an absolute one) is still refused."""
    whole = load_file(tiny_wan(tmp_path) / "diffusion_pytorch_model.safetensors")
    keys = sorted(whole)
    blobs, snap = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "abc" / "transformer"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2]}  # fmt: skip
    index = {"metadata": {}, "weight_map": {k: n for n, names in shards.items() for k in names}}
    files = {
        n: (lambda f, names=names: save_file({k: whole[k] for k in names}, f)) for n, names in shards.items()
    }
    files["config.json"] = lambda f: f.write_text((tmp_path / "wan-t2v" / "config.json").read_text())
    files["diffusion_pytorch_model.safetensors.index.json"] = lambda f: f.write_text(json.dumps(index))
    for i, (name, write) in enumerate(files.items()):
        write(blobs / f"blob{i}")
        (snap / name).symlink_to(f"../../../blobs/blob{i}")
    got = interop.read_diffusers(snap).state
    assert sorted(got) == keys and all(torch.equal(got[k], whole[k]) for k in keys)
    assert sorted(interop.read_diffusers(snap, meta=True).state) == keys

    for bad in ("../transformer/" + next(iter(shards)), str(snap / next(iter(shards))), ".", ".."):
        index["weight_map"][keys[0]] = bad
        (blobs / "blob3").write_text(json.dumps(index))
        with pytest.raises(ValueError, match=r"is not a file name inside"):
            interop.read_diffusers(snap)


def test_pickle_weights_are_refused_by_name(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_wan(tmp_path) / "config.json").read_text())
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.bin.*only safetensors are read"):
        interop.read_diffusers(folder)
    (folder / "model.pt").write_bytes(b"not opened")
    with pytest.raises(ValueError, match=r"model\.pt: a pickle file"):
        interop.read_diffusers(folder / "model.pt")


def test_lone_safetensors_file(tmp_path):
    folder = tiny_wan(tmp_path)
    weights = folder / "diffusion_pytorch_model.safetensors"
    assert interop.is_diffusers(weights)
    m = interop.read_diffusers(weights)  # config.json beside it
    assert m.class_name == wan.CLASS_NAME and m.config["num_layers"] == 2
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes(weights.read_bytes())
    assert interop.is_diffusers(lone)
    with pytest.raises(ValueError, match=r"32 wide, whose head count .* pass the diffusers model folder"):
        interop.read_diffusers(lone)


def test_lone_published_wan_file_infers_its_config():
    """Wan2.1-T2V-1.3B's shapes (meta tensors: only names and shapes are read) give its published config."""
    shapes = {
        "patch_embedding.weight": (1536, 16, 1, 2, 2),
        "proj_out.weight": (64, 1536),
        "condition_embedder.text_embedder.linear_1.weight": (1536, 4096),
        "condition_embedder.time_embedder.linear_1.weight": (1536, 256),
        "condition_embedder.time_proj.weight": (9216, 1536),
        "blocks.0.ffn.net.0.proj.weight": (8960, 1536),
        "blocks.0.norm2.weight": (1536,),
        "blocks.29.norm2.weight": (1536,),
    }
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    assert wan.owns(list(state))
    config = wan.infer_config(state, "x.safetensors")
    published = dict(patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128, in_channels=16,
                     out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                     cross_attn_norm=True, eps=1e-6, qk_norm="rms_norm_across_heads")  # fmt: skip
    assert {k: config[k] for k in published} == published


def test_pipeline_roots_and_experts(tmp_path):
    root = tiny_wan_pipeline_root(tmp_path, experts=2, seed=7)
    assert interop.is_diffusers(root) and interop.wan_boundary(root) == 0.875
    with pytest.raises(ValueError, match=r"two-expert pipeline root.*init\.expert"):
        interop.read_diffusers(root)
    high = interop.read_diffusers(root, expert="high_noise")
    low = interop.read_diffusers(root, expert="low_noise")
    assert high.path == root / "transformer" and low.path == root / "transformer_2"
    want_low = build_wan("t2v", seed=8).state_dict()
    assert all(torch.equal(low.state[k], want_low[k]) for k in want_low)
    assert not torch.equal(high.state["proj_out.weight"], low.state["proj_out.weight"])

    one = tiny_wan_pipeline_root(tmp_path, experts=1)
    assert interop.wan_boundary(one) is None
    assert interop.read_diffusers(one).path == one / "transformer"
    with pytest.raises(ValueError, match=r"has one transformer, not two experts"):
        interop.read_diffusers(one, expert="low_noise")
    with pytest.raises(ValueError, match=r"init\.expert='high_noise'.*not one"):
        interop.read_diffusers(one / "transformer", expert="high_noise")


def test_is_diffusers_tells_our_exports_apart(tmp_path):
    ours = tmp_path / "export"
    ours.mkdir()
    save_file({"x": torch.zeros(1)}, ours / "model.safetensors")
    (ours / "config.json").write_text(json.dumps({"format": "spacetime-dit"}))
    assert not interop.is_diffusers(ours)
    assert not interop.is_diffusers(ours / "model.safetensors")
    assert not interop.is_diffusers(tmp_path / "missing")
    assert interop.is_diffusers(tiny_wan(tmp_path))


# ---- LTX-Video ---------------------------------------------------------------------------------------
def test_ltx_forward_matches_diffusers_at_two_frame_rates(tmp_path):
    """LTXPipeline's call: tokens packed (f h w) with patch 1, ``rope_interpolation_scale`` =
    (8 / fps, 32, 32), the T5 mask; ours takes the latents, the mask and the fps.

    LTX's q/k RMSNorm eps is fixed at 1e-5 while its other norms use 1e-6: the import sets
    ``qk_norm_eps`` (before it did, the forwards differed by 6e-6, all of it that eps)."""
    from einops import rearrange

    ref = build_ltx(seed=4)
    cfg, ours = ours_from(saved(ref, tmp_path / "ltx"))
    assert (cfg.pos_embed, cfg.block_norm, cfg.cross_attn_norm) == ("rope_ltx", "rmsnorm", False)
    assert (cfg.text_mask, cfg.text_null, cfg.text_len) == (True, "empty_prompt", 128)
    assert (cfg.norm_eps, cfg.qk_norm_eps) == (1e-6, 1e-5)
    gen = torch.Generator().manual_seed(3)
    b, c, f, h, w = 2, 8, 3, 4, 5
    x = torch.randn(b, c, f, h, w, generator=gen)
    ctx = torch.randn(b, 6, 24, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    t = torch.tensor([850.0, 3.5])
    outs = []
    for fps in (24.0, 12.5):
        with torch.no_grad():
            want = ref(
                rearrange(x, "b c f h w -> b (f h w) c"), ctx, t, mask, num_frames=f, height=h, width=w,
                rope_interpolation_scale=(8 / fps, 32, 32), return_dict=False,
            )[0]  # fmt: skip
            want = rearrange(want, "b (f h w) c -> b c f h w", f=f, h=h, w=w)
            got = ours(x, t, ctx, context_mask=mask.bool(), fps=torch.full((b,), fps))
        assert rel(got, want) <= 1e-6, fps
        outs.append(got)
    assert rel(outs[0], outs[1]) > 1e3 * RTOL  # the fps reaches the positions


def test_ltx_round_trip_and_refusals(tmp_path):
    src = saved(build_ltx(seed=9), tmp_path / "ltx")
    cfg, state = interop.to_ours(interop.read_diffusers(src))
    out = interop.write_diffusers(interop.to_diffusers(cfg, state), tmp_path / "back")
    a, b = (load_file(p / "diffusion_pytorch_model.safetensors") for p in (src, out))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (src, out))
    assert {k: v for k, v in ca.items() if k != "_diffusers_version"} == {
        k: v for k, v in cb.items() if k != "_diffusers_version"
    }

    m = interop.read_diffusers(src)
    m.config.update(norm_elementwise_affine=True, patch_size=2)
    with pytest.raises(
        ValueError, match=r"LTXVideoTransformer3DModel with patch_size=2.*norm_elementwise_affine=True"
    ):
        interop.to_ours(m)
    with pytest.raises(ValueError, match=r"block_norm='layernorm' \(LTX: 'rmsnorm'\)"):
        interop.to_diffusers(cfg.replace(block_norm="layernorm"), state)


# the transformer/config.json of the published diffusers checkpoints (Wan-AI/*-Diffusers, LTX-Video)
WAN_13B = dict(
    patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, eps=1e-6,
    qk_norm="rms_norm_across_heads", image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
    pos_embed_seq_len=None,
)  # fmt: skip
WAN_14B = dict(WAN_13B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
LTX_2B = dict(
    in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
    attention_head_dim=64, cross_attention_dim=2048, num_layers=28, activation_fn="gelu-approximate",
    qk_norm="rms_norm_across_heads", norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=4096,
    attention_bias=True, attention_out_bias=True,
)  # fmt: skip
PUBLISHED = {
    "wan2.1-t2v-1.3b": (wan, WAN_13B),
    "wan2.1-t2v-14b": (wan, WAN_14B),
    "wan2.2-ti2v-5b": (
        wan,
        dict(WAN_13B, num_attention_heads=24, ffn_dim=14336, in_channels=48, out_channels=48),
    ),
    "wan2.2-t2v-a14b": (wan, WAN_14B),  # each expert
    "ltx-video-2b": (ltx, LTX_2B),
}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_published_configs_give_our_presets(preset):
    """Importing a published checkpoint yields exactly the preset of the same name (text convention too),
    so a fine-tune of the import and one of the preset are the same model."""
    from dit.config import get_preset

    module, config = PUBLISHED[preset]
    assert module.config_to_ours(config, preset) == get_preset(preset)


def test_lone_ltx_file_infers_the_published_config(tmp_path):
    """LTX-Video 2B's shapes (meta tensors) give its published config; a tiny LTX file without its
    config.json is refused with the way out."""
    shapes = {
        "proj_in.weight": (2048, 128),
        "proj_out.weight": (128, 2048),
        "caption_projection.linear_1.weight": (2048, 4096),
        "transformer_blocks.0.attn2.to_k.weight": (2048, 2048),
        "transformer_blocks.27.attn2.to_k.weight": (2048, 2048),
    }
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    assert ltx.owns(list(state)) and not wan.owns(list(state))
    assert ltx.infer_config(state, "x.safetensors") == LTX_2B
    lone = tmp_path / "ltx.safetensors"
    lone.write_bytes(
        (saved(build_ltx(), tmp_path / "ltx") / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    with pytest.raises(ValueError, match=r"LTX-Video transformer 36 wide.*pass the diffusers model folder"):
        interop.read_diffusers(lone)
