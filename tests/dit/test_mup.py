"""μP (``parametrization='mup'``): the base width is the standard model, hidden matrices get a
smaller learning rate, and the coordinate check: activation sizes after a few Adam steps stay flat
across widths under μP and drift under the standard parametrisation."""

import pytest
import torch

from dit import mup
from dit.config import get_preset
from dit.model import build_model
from launch.config import TrainConfig
from launch.optim import build_optimizer

COORDS = ("patch_embed", "blocks.0", "blocks.1", "final")


def _cfg(width: int, parametrization: str, base: int = 32):
    return get_preset(
        "tiny", hidden_size=width, num_heads=width // 16, ffn_dim=None, mlp_ratio=4.0, depth=2,
        conditioning="none", fps_conditioning=False, parametrization=parametrization, mup_base_width=base,
    )  # fmt: skip


def test_mup_at_its_base_width_is_the_standard_model():
    std = build_model(_cfg(64, "standard"), seed=0)
    x, t = torch.randn(2, std.cfg.in_channels, 2, 4, 4), torch.tensor([10.0, 900.0])
    mu = build_model(_cfg(64, "mup", base=64), seed=0)
    assert std.state_dict().keys() == mu.state_dict().keys()
    assert all(torch.equal(v, mu.state_dict()[k]) for k, v in std.state_dict().items())
    torch.nn.init.normal_(std.final.linear.weight)  # adaLN-Zero: make the output non-zero
    mu.final.linear.weight.data.copy_(std.final.linear.weight)
    assert torch.equal(std(x, t), mu(x, t))


def test_parameter_classes_and_learning_rates():
    cfg = _cfg(128, "mup")  # width multiplier 4
    kinds = mup.classify(cfg)
    assert kinds["blocks.0.attn.q.weight"] == kinds["blocks.1.mlp.fc2.weight"] == "hidden"
    assert kinds["t_embedder.fc2.weight"] == "hidden"
    assert kinds["patch_embed.proj.weight"] == kinds["t_embedder.fc1.weight"] == "input"
    assert kinds["blocks.0.attn.q.bias"] == kinds["final.modulation.table"] == "input"
    assert kinds["final.linear.weight"] == "output"
    assert mup.output_mult(cfg) == 0.25

    model = build_model(cfg, seed=0)
    opt = build_optimizer(model, TrainConfig(lr=1e-3), torch.device("cpu"))
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert lr_of[id(params["blocks.0.attn.q.weight"])] == pytest.approx(1e-3 / 4)
    assert lr_of[id(params["blocks.0.mlp.fc2.weight"])] == pytest.approx(1e-3 / 4)  # fan-in 4·128 vs 4·32
    assert lr_of[id(params["patch_embed.proj.weight"])] == lr_of[id(params["final.linear.weight"])] == 1e-3
    assert opt.param_groups[0]["lr"] == 1e-3  # the logged learning rate is the base one

    standard = build_optimizer(build_model(_cfg(128, "standard")), TrainConfig(lr=1e-3), torch.device("cpu"))
    assert {g["lr"] for g in standard.param_groups} == {1e-3}


def test_mup_initialisation_keeps_input_layers_at_base_scale():
    base = build_model(_cfg(32, "mup"), seed=0).state_dict()
    wide = build_model(_cfg(512, "mup"), seed=0).state_dict()
    # input layer: width-independent scale; hidden D→D layer: std ∝ 1/sqrt(width)
    embed = "patch_embed.proj.weight"
    assert float(wide[embed].std()) == pytest.approx(float(base[embed].std()), rel=0.1)
    ratio = float(base["t_embedder.fc2.weight"].std() / wide["t_embedder.fc2.weight"].std())
    assert ratio == pytest.approx(4.0, rel=0.1)
    # the text pool's D→D layers are Xavier, μP's hidden scale already: std = 1/sqrt(D), not shrunk again
    pooled = build_model(_cfg(512, "mup").replace(conditioning="text", text_pool=True), seed=0).state_dict()
    for name in ("text_pool.fc1.weight", "text_pool.fc2.weight"):
        assert float(pooled[name].std()) == pytest.approx(512**-0.5, rel=0.05)


def _coordinates(width: int, parametrization: str, steps: int = 3, lr: float = 1e-2) -> dict[str, float]:
    """Mean |activation| of each coordinate after ``steps`` Adam steps on one fixed batch."""
    cfg = _cfg(width, parametrization)
    model = build_model(cfg, seed=0)
    opt = build_optimizer(model, TrainConfig(lr=lr, weight_decay=0.0), torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, cfg.in_channels, 2, 8, 8, generator=g)
    t = torch.rand(4, generator=g) * 1000
    target = torch.randn(4, cfg.out_ch, 2, 8, 8, generator=g)
    for _ in range(steps):
        opt.zero_grad()
        ((model(x, t) - target) ** 2).mean().backward()
        opt.step()
    acts = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o.abs().mean()))
        for n in COORDS
    ]
    with torch.no_grad():
        model(x, t)
    for h in hooks:
        h.remove()
    return {n: float(v) for n, v in acts.items()}


@pytest.mark.slow
def test_coordinate_check():
    widths = (32, 128, 512)
    spread = {}
    for parametrization in ("standard", "mup"):
        runs = [_coordinates(w, parametrization) for w in widths]
        spread[parametrization] = {
            n: max(r[n] for r in runs) / min(r[n] for r in runs) for n in COORDS
        }  # fmt: skip
    # μP: every coordinate within 30% over a 16× width range
    assert max(spread["mup"].values()) < 1.3, spread
    # standard: the output blows up with width and the input embedding shrinks
    assert spread["standard"]["final"] > 3 and spread["standard"]["patch_embed"] > 2, spread
