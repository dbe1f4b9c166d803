import pytest
import torch

from dit.config import PRESETS, DiTConfig, get_preset
from dit.flops import count
from dit.model import SpacetimeDiT, num_params

# DiT paper (Peebles & Xie 2023, Table 4): forward GFLOPs at 256² (32² latents). The paper's "flops"
# are multiply-accumulates, rounded to two decimals.
DIT_PAPER_GMACS = {"dit-s/2": 6.06, "dit-b/2": 23.01, "dit-l/2": 80.71, "dit-xl/2": 118.64}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_on_meta_and_reports_params(name):
    with torch.device("meta"):
        model = SpacetimeDiT(PRESETS[name])
    assert all(p.is_meta for p in model.parameters())
    assert count(PRESETS[name], 1, 8, 8)["params"] == num_params(model) > 0


def test_dit_xl2_matches_the_official_parameter_count():
    # The official DiT-XL/2 reports 675,129,632 parameters, which include its frozen 256×1152
    # sin-cos table stored as a parameter; ours computes that table on the fly.
    with torch.device("meta"):
        model = SpacetimeDiT(PRESETS["dit-xl/2"])
    assert num_params(model) + 256 * 1152 == 675_129_632


@pytest.mark.parametrize("name", sorted(DIT_PAPER_GMACS))
def test_dit_presets_match_paper_flops(name):
    macs = count(PRESETS[name], 1, 32, 32)["macs_fwd"]
    assert macs / 1e9 == pytest.approx(DIT_PAPER_GMACS[name], rel=1e-3)


@pytest.mark.parametrize("name,heads,ffn,layers", [("video-1b3", 12, 8960, 30), ("video-14b", 40, 13824, 40)])
def test_video_presets_are_wan_sized(name, heads, ffn, layers):
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ours = SpacetimeDiT(PRESETS[name])
        wan = diffusers.WanTransformer3DModel(
            num_attention_heads=heads, attention_head_dim=128, ffn_dim=ffn, num_layers=layers
        )
    d = PRESETS[name].hidden_size
    # The only difference: Wan's qk RMSNorm spans all heads (weight D), ours is per head (weight Dh),
    # for q and k in self- and cross-attention.
    assert num_params(wan) - num_params(ours) == layers * 4 * (d - 128)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="attention_layout"):
        DiTConfig(attention_layout="axial")
    with pytest.raises(ValueError, match="num_heads"):
        DiTConfig(hidden_size=100, num_heads=3)
    with pytest.raises(KeyError, match="unknown model preset"):
        get_preset("dit-xxl/2")


def test_get_preset_returns_a_copy():
    cfg = get_preset("tiny", depth=3)
    assert cfg.depth == 3 and PRESETS["tiny"].depth == 2
    assert get_preset("dit-xl/2").out_ch == 8  # learned sigma doubles the 4 latent channels
