"""The presets of published models have exactly the published shapes (built on the meta device: seconds)."""

import pytest
import torch

from dit.config import DEFAULT_LATENT_SIZE, PRESETS
from dit.model import SpacetimeDiT, num_params

# The published transformer/config.json of each model (Hugging Face, the *-Diffusers repositories and
# Lightricks/LTX-Video), written out here rather than taken from diffusers' defaults.
_WAN = {
    "added_kv_proj_dim": None,
    "attention_head_dim": 128,
    "cross_attn_norm": True,
    "eps": 1e-06,
    "freq_dim": 256,
    "image_dim": None,
    "patch_size": [1, 2, 2],
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
    "text_dim": 4096,
}
PUBLISHED = {
    "wan2.1-t2v-1.3b": (
        "WanTransformer3DModel",
        _WAN
        | {
            "ffn_dim": 8960,
            "in_channels": 16,
            "out_channels": 16,
            "num_attention_heads": 12,
            "num_layers": 30,
        },
    ),
    "wan2.1-t2v-14b": (
        "WanTransformer3DModel",
        _WAN
        | {
            "ffn_dim": 13824,
            "in_channels": 16,
            "out_channels": 16,
            "num_attention_heads": 40,
            "num_layers": 40,
        },
    ),
    "wan2.2-ti2v-5b": (
        "WanTransformer3DModel",
        _WAN
        | {
            "ffn_dim": 14336,
            "in_channels": 48,
            "out_channels": 48,
            "num_attention_heads": 24,
            "num_layers": 30,
        },
    ),
    "wan2.2-t2v-a14b": (  # each of transformer/ and transformer_2/
        "WanTransformer3DModel",
        _WAN
        | {
            "ffn_dim": 13824,
            "in_channels": 16,
            "out_channels": 16,
            "num_attention_heads": 40,
            "num_layers": 40,
        },
    ),
    "ltx-video-2b": (
        "LTXVideoTransformer3DModel",
        {
            "activation_fn": "gelu-approximate",
            "attention_bias": True,
            "attention_head_dim": 64,
            "attention_out_bias": True,
            "caption_channels": 4096,
            "cross_attention_dim": 2048,
            "in_channels": 128,
            "norm_elementwise_affine": False,
            "norm_eps": 1e-06,
            "num_attention_heads": 32,
            "num_layers": 28,
            "out_channels": 128,
            "patch_size": 1,
            "patch_size_t": 1,
            "qk_norm": "rms_norm_across_heads",
        },
    ),
}
# Parameter totals the published checkpoints hold (their safetensors' element counts; Wan2.2-A14B: per
# expert, Wan2.1-T2V-14B has the same shapes).
PUBLISHED_PARAMS = {
    "wan2.1-t2v-1.3b": 1_418_996_800,
    "wan2.1-t2v-14b": 14_288_491_584,
    "wan2.2-ti2v-5b": 4_999_787_712,
    "wan2.2-t2v-a14b": 14_288_491_584,
    "ltx-video-2b": 1_923_385_472,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_has_the_published_models_parameters(name):
    diffusers = pytest.importorskip("diffusers")
    class_name, config = PUBLISHED[name]
    with torch.device("meta"):
        ours = SpacetimeDiT(PRESETS[name])
        theirs = getattr(diffusers, class_name).from_config(config)
    assert num_params(ours) == num_params(theirs) == PUBLISHED_PARAMS[name]
    # tensor for tensor, not only in total: the same multiset of shapes (the conv patch embedding is our
    # linear on flattened patches)
    shapes = lambda m: sorted(p.numel() for p in m.parameters())  # noqa: E731
    assert shapes(ours) == shapes(theirs)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_carries_the_published_conventions(name):
    cfg = PRESETS[name]
    _, config = PUBLISHED[name]
    assert cfg.qk_norm == "across_heads" and cfg.modulation == "shared" and cfg.norm_eps == 1e-6
    assert cfg.text_dim == config.get("text_dim", config.get("caption_channels"))
    assert cfg.head_dim == config["attention_head_dim"]
    assert name in DEFAULT_LATENT_SIZE
    if name.startswith("wan"):
        assert (cfg.text_mask, cfg.text_null, cfg.text_len) == (False, "empty_prompt", 512)
        assert (cfg.pos_embed, cfg.block_norm, cfg.cross_attn_norm) == ("rope3d", "layernorm", True)
        assert cfg.patch_size == tuple(config["patch_size"])
    else:
        assert (cfg.text_mask, cfg.text_null, cfg.text_len) == (True, "empty_prompt", 128)
        assert (cfg.pos_embed, cfg.block_norm, cfg.cross_attn_norm) == ("rope_ltx", "rmsnorm", False)
        assert cfg.patch_size == (config["patch_size_t"], config["patch_size"], config["patch_size"])
        assert (cfg.rope_base, cfg.rope_compression) == ((20, 2048, 2048), (8, 32, 32))


@pytest.mark.parametrize("name", ["tiny", "video-small", "video-1b3", "video-14b"])
def test_our_own_video_presets_keep_their_per_head_norm(name):
    cfg = PRESETS[name]
    assert (cfg.qk_norm, cfg.block_norm, cfg.pos_embed, cfg.text_mask, cfg.text_null) == (
        "per_head",
        "layernorm",
        "rope3d",
        True,
        "masked",
    )


def test_flops_count_the_text_length_the_model_was_trained_at():
    from dit.flops import count

    ltx, tiny = PRESETS["ltx-video-2b"], PRESETS["tiny"]
    size = DEFAULT_LATENT_SIZE["ltx-video-2b"]
    assert count(ltx, *size)["text_len"] == 128
    assert count(ltx, *size)["macs_fwd"] == count(ltx, *size, text_len=128)["macs_fwd"]
    assert count(ltx, *size)["macs_fwd"] < count(ltx, *size, text_len=512)["macs_fwd"]
    assert (
        count(tiny, 4, 8, 8)["macs_fwd"] == count(tiny, 4, 8, 8, text_len=512)["macs_fwd"]
    )  # no text_len: 512
