"""``python -m launch.convert from-diffusers``: a tiny random diffusers Wan becomes our export, which
``launch.finetune.read_weights`` / ``launch.export.read_export_config`` read and whose forward equals
diffusers'."""

from __future__ import annotations

import json

import pytest
import torch

from dit.model import build_model
from launch import convert, interop
from launch.export import read_export_config
from launch.finetune import read_weights
from tests.launch.diffusers_models import build_wan, tiny_wan, tiny_wan_pipeline_root


def test_convert_wan_folder_loads_and_matches_diffusers(tmp_path, capsys):
    src = tiny_wan(tmp_path, "t2v", seed=11)
    out = tmp_path / "export"
    convert.main(["from-diffusers", str(src), str(out)])
    assert "converted" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    info = read_export_config(out / "config.json")
    arch = info["arch"]
    assert (arch.qk_norm, arch.text_mask, arch.text_null, arch.text_len) == (
        "across_heads",
        False,
        "empty_prompt",
        512,
    )
    assert info["max_text_len"] == 512 and info["diffusion"].objective == "flow"
    state, _ = read_weights(out)
    model = build_model(arch)
    model.load_state_dict(state, strict=True)
    ref = build_wan("t2v", seed=11)
    gen = torch.Generator().manual_seed(2)
    x, ctx, t = (
        torch.randn(1, 4, 2, 4, 8, generator=gen),
        torch.randn(1, 6, 24, generator=gen),
        torch.tensor([400.0]),
    )
    with torch.no_grad():
        want = ref(x, t, ctx, return_dict=False)[0]
        got = model.eval()(x, t, ctx)
    assert ((got - want).norm() / want.norm()).item() <= 1e-5


def test_convert_one_expert_of_a_two_expert_root(tmp_path):
    root = tiny_wan_pipeline_root(tmp_path, experts=2, seed=3, boundary_ratio=0.9)
    with pytest.raises(SystemExit, match=r"two-expert pipeline root.*init\.expert"):
        convert.main(["from-diffusers", str(root), str(tmp_path / "x")])
    for expert, seed, t_range in (("high_noise", 3, (0.9, 1.0)), ("low_noise", 4, (0.0, 0.9))):
        out = convert.from_diffusers(root, tmp_path / expert, expert=expert)
        info = read_export_config(out / "config.json")
        # the root's FlowMatchEulerDiscreteScheduler(shift=3.0) and the expert's share of flow time
        assert info["diffusion"].shift == 3.0 and tuple(info["diffusion"].t_range) == t_range
        state, _ = read_weights(out)
        assert torch.equal(
            state["final.linear.weight"], build_wan("t2v", seed=seed).state_dict()["proj_out.weight"]
        )


def test_convert_refuses_what_it_cannot_express(tmp_path):
    src = tiny_wan(tmp_path)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "image_dim": 1280, "added_kv_proj_dim": 1280}))
    with pytest.raises(
        SystemExit, match=r"WanTransformer3DModel with image_dim=1280.*added_kv_proj_dim=1280"
    ):
        convert.main(["from-diffusers", str(src), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_convert_into_an_older_export_replaces_it(tmp_path):
    """An export folder that held a run's export with an EMA: after converting into it, ``init.from`` /
    ``load_model`` read the converted weights, not the old EMA (which readers prefer)."""
    from launch.export import load_model, write_export

    old = tiny_wan(tmp_path, seed=1, name="old")
    cfg, state = interop.to_ours(interop.read_diffusers(old))
    out = write_export(tmp_path / "export", cfg, state, {"step": 5}, ema={k: v + 1 for k, v in state.items()})
    convert.main(["from-diffusers", str(tiny_wan(tmp_path, seed=2, name="new")), str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    want = build_wan("t2v", seed=2).state_dict()["proj_out.weight"]
    assert torch.equal(load_model(out).state_dict()["final.linear.weight"], want)
    assert torch.equal(read_weights(out)[0]["final.linear.weight"], want)


def test_convert_into_an_existing_file_is_a_usage_error(tmp_path, capsys):
    """OUT naming a file: argparse's exit 2 and a line naming it (no traceback: the command ends in
    argparse's ``SystemExit(2)``), before the source is read; the file is untouched."""
    (out := tmp_path / "afile").write_text("mine")
    with pytest.raises(SystemExit) as e:
        convert.main(["from-diffusers", str(tmp_path / "not-read"), str(out)])
    assert e.value.code == 2 and f"OUT {out} is a file" in capsys.readouterr().err
    assert out.read_text() == "mine"
