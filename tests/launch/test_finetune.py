"""init.from: weights only, image→video inflation, new text width, freezing."""

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from dit.config import get_preset
from dit.model import build_model
from launch.config import TrainConfig
from launch.finetune import apply_init, freeze, read_weights
from launch.optim import build_optimizer


def _export(tmp_path, arch, seed=0):
    """A source model with every weight non-zero (so identities are not trivially zero), as an export."""
    model = build_model(arch, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    out = tmp_path / "export"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({"arch": dataclasses.asdict(arch)}))
    return model.eval(), out


def test_image_model_initialises_a_video_model_that_computes_the_same_on_a_still_clip(tmp_path):
    src_arch = get_preset("tiny")  # patch (1, 2, 2): an image model
    src, export = _export(tmp_path, src_arch)
    arch = src_arch.replace(patch_size=(2, 2, 2), cond_channels=5, depth=3, fps_conditioning=True)
    dst = build_model(arch, seed=1)
    report = apply_init(dst, export, arch, new=["blocks.2.*", "fps_embedder.*"])  # new on purpose
    assert {"patch_embed.proj.weight", "final.linear.weight", "final.linear.bias"} <= set(report.inflated)
    assert any(n.startswith("blocks.2.") for n in report.missing)
    assert any(n.startswith("fps_embedder.") for n in report.missing) and not report.unexpected

    g = torch.Generator().manual_seed(3)
    image = torch.randn(2, 4, 1, 8, 8, generator=g)
    ctx, mask = torch.randn(2, 5, 384, generator=g), torch.ones(2, 5, dtype=torch.bool)
    t = torch.tensor([100.0, 700.0])
    want = src(image, t, context=ctx, context_mask=mask)  # 2, 4, 1, 8, 8
    still = image.repeat(1, 1, 2, 1, 1)  # the image held for two frames
    got = dst.eval()(
        still,
        t,
        context=ctx,
        context_mask=mask,
        cond=torch.randn(2, 5, 2, 8, 8, generator=g),
        fps=torch.tensor([8.0, 24.0]),
    )
    assert want.abs().mean() > 0.01
    torch.testing.assert_close(got, want.repeat(1, 1, 2, 1, 1), atol=1e-5, rtol=1e-4)


def test_new_text_width_reinitialises_only_the_text_projection(tmp_path):
    src_arch = get_preset("tiny")
    src, export = _export(tmp_path, src_arch)
    arch = src_arch.replace(text_dim=768)
    dst = build_model(arch, seed=1)
    fresh = build_model(arch, seed=1).state_dict()
    report = apply_init(dst, export, arch, new=["text_proj.*"])
    assert sorted(report.reinitialised) == sorted(n for n in fresh if n.startswith("text_proj."))
    for name, value in dst.state_dict().items():
        expected = fresh[name] if name.startswith("text_proj.") else src.state_dict()[name]
        assert torch.equal(value, expected), name

    with pytest.raises(ValueError, match="blocks.0.mlp.fc1.weight has shape"):
        apply_init(build_model(src_arch.replace(ffn_dim=128), seed=0), export, src_arch.replace(ffn_dim=128))


def test_freeze_by_pattern_keeps_parameters_out_of_the_optimizer():
    model = build_model(get_preset("tiny"), seed=0)
    n = freeze(model, ["blocks.0.*", "t_embedder.*"])
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert n == len(frozen) and all(f.startswith(("blocks.0.", "t_embedder.")) for f in frozen)
    opt = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in model.parameters() if not p.requires_grad)
    with pytest.raises(ValueError, match="no parameter name matches"):
        freeze(model, ["nothing.*"])


def test_ema_follows_the_weights_and_swaps_in_temporarily():
    from launch.optim import EMA

    model = torch.nn.Linear(3, 2)
    start = [p.detach().clone() for p in model.parameters()]
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(step=1000)  # past the warm-up: the decay is 0.9
    for s, p0, p in zip(ema.shadow, start, model.parameters(), strict=True):
        torch.testing.assert_close(s, 0.9 * p0 + 0.1 * p.detach())
    ema.update(step=0)  # the first update uses (1 + 0) / (10 + 0) = 0.1: mostly the current weights
    trained = [p.detach().clone() for p in model.parameters()]
    with ema.swapped_in():
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), ema.shadow, strict=True))
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained, strict=True))


def _config_with(export, section: str | None, key: str, value):
    config = json.loads((export / "config.json").read_text())
    (config[section] if section else config)[key] = value
    (export / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("section", "key", "value", "said"),
    [
        ("arch", "depth", "two", "arch.depth='two' is not <class 'int'>"),
        ("arch", "patch_size", [1, "x", 2], r"arch.patch_size=\[1, 'x', 2\] is not tuple\[int, int, int\]"),
        ("arch", "qk_norm", 1, r"arch.qk_norm=1 is not str \| bool"),  # legacy exports hold a bool
        ("arch", "colour", "red", "unknown key arch.colour"),
        ("arch", "mlp", "relu", "arch: DiTConfig.mlp='relu': expected one of"),  # the dataclass's own check
        (None, "colour", "red", "unknown key 'colour'"),
        (None, "diffusion", {"shift": "large"}, "diffusion.shift='large' is not <class 'float'>"),
        (None, "format", "diffusers", "not a spacetime-dit export"),
    ],
)
def test_export_config_errors_name_the_file_and_the_key(tmp_path, section, key, value, said):
    from launch.sample import load_for_inference
    from parallel.checkpoint import CheckpointError

    _, export = _export(tmp_path, get_preset("tiny"))
    _config_with(export, section, key, value)
    for read in (read_weights, load_for_inference):  # init.from, launch.sample
        with pytest.raises(CheckpointError, match=f"{export / 'config.json'}: .*{said}"):
            read(export)


def test_random_bytes_as_weights_are_named(tmp_path):
    from parallel.checkpoint import CheckpointError

    _, export = _export(tmp_path, get_preset("tiny"))
    (export / "model.safetensors").write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        read_weights(export)


def _renamed_export(tmp_path, arch, rename):
    """An export of a model of ``arch`` whose tensor names went through ``rename`` (another library's
    layout), with a real config.json."""
    model = build_model(arch, seed=0)
    out = tmp_path / "renamed"
    out.mkdir()
    state = {rename(k): v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({"arch": dataclasses.asdict(arch)}))
    return out


def test_a_source_whose_names_match_nothing_is_an_error_and_changes_nothing(tmp_path):
    arch = get_preset("tiny")
    export = _renamed_export(tmp_path, arch, lambda k: f"model.diffusion_model.{k}")
    dst = build_model(arch, seed=1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError, match=r"init.from=.*renamed: none of the source's 69 tensors match") as e:
        apply_init(dst, export, arch)
    said = str(e.value)
    assert "model.diffusion_model." in said and "'blocks.0." in said and "export directory" in said
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())


def test_a_source_matching_under_min_match_is_an_error_unless_lowered(tmp_path):
    arch = get_preset("tiny")
    # only block 0 keeps our names (all else renamed): under half of the source
    export = _renamed_export(tmp_path, arch, lambda k: k if k.startswith("blocks.0.") else f"x.{k}")
    source = read_weights(export)[0]
    share = sum(not k.startswith("x.") for k in source) / len(source)
    assert 0 < share < 0.5
    with pytest.raises(ValueError, match=rf"{round(share * 100)}%, below init.min_match=0.5"):
        apply_init(build_model(arch, seed=1), export, arch)
    report = apply_init(build_model(arch, seed=1), export, arch, min_match=share, new=["*"])
    assert len(report.loaded) == round(share * len(source)) and len(report.unexpected) == len(source) - len(
        report.loaded
    )


def test_a_deeper_model_may_start_from_a_shallower_one(tmp_path):
    src_arch = get_preset("tiny")
    _, export = _export(tmp_path, src_arch)
    arch = src_arch.replace(depth=2 * src_arch.depth)  # half the model is new: missing, not unmatched
    new = [f"blocks.{i}.*" for i in range(src_arch.depth, arch.depth)]
    report = apply_init(build_model(arch, seed=1), export, arch, new=new)
    assert not report.unexpected and any(n.startswith(f"blocks.{src_arch.depth}.") for n in report.missing)


def _not_ours(tmp_path, kind: str):
    """A path init.from does not read: an empty directory, a .bin file, a diffusers folder, other files."""
    path = tmp_path / ("weights.bin" if kind == "bin" else "src")
    if kind == "bin":
        path.write_bytes(os.urandom(64))
        return path
    path.mkdir()
    if kind == "diffusers":
        save_file({"patch_embedding.weight": torch.zeros(2, 2)}, path / "diffusion_pytorch_model.safetensors")
        config = {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.33.0"}
        (path / "config.json").write_text(json.dumps(config))
    elif kind == "other":
        (path / "notes.txt").write_text("x")
    return path


@pytest.mark.parametrize(
    ("kind", "found"),
    [
        ("empty", "an empty directory"),
        ("bin", r"a file \(\.bin, 64 bytes\), not a directory"),
        ("other", "a directory holding notes.txt, and no complete checkpoint"),
    ],
)
def test_init_from_something_else_says_what_it_takes_and_what_it_found(tmp_path, kind, found):
    path = _not_ours(tmp_path, kind)
    with pytest.raises(
        FileNotFoundError, match=f"init.from={path}: {found}.*; init.from takes an export"
    ) as e:
        read_weights(path)
    assert "step-XXXXXXXX/ directory with COMPLETE" in str(e.value)  # among what it takes


def test_a_weights_file_of_an_export_points_at_its_directory(tmp_path):
    _, export = _export(tmp_path, get_preset("tiny"))
    with pytest.raises(FileNotFoundError, match=rf"name its directory instead \(init.from={export}\)"):
        read_weights(export / "model.safetensors")
    assert read_weights(export)[0]  # which loads


def test_min_match_is_a_share():
    from launch.config import load_config

    assert load_config(None, ["init.min_match=0.2"]).init.min_match == 0.2
    with pytest.raises(ValueError, match=r"init.min_match=1.5: must be >= 0.0 and <= 1.0"):
        load_config(None, ["init.min_match=1.5"])


def test_a_partial_source_is_an_error_unless_min_match_is_lowered(tmp_path):
    """An export holding 1 of its architecture's tensors matches the model 1 of 1 by name, but would
    leave the rest at their fresh initialisation (silently training from scratch): refused, naming what
    it lacks, unless init.min_match is lowered to that share on purpose."""
    arch = get_preset("tiny")
    _, export = _export(tmp_path, arch)
    full = read_weights(export)[0]
    save_file({"final.linear.bias": full["final.linear.bias"].contiguous()}, export / "model.safetensors")
    dst = build_model(arch, seed=1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError, match=rf"holds 1 of the {len(full)} parameters of its own architecture"):
        apply_init(dst, export, arch)
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())
    report = apply_init(dst, export, arch, min_match=0.0, new=["*"])
    assert report.loaded == ["final.linear.bias"]


# ---- a model that would compute another function than the source (review M4) ---------------------------
def _run_checkpoint(tmp_path, arch, arch_yaml: dict):
    """A run's checkpoint of a model of ``arch`` whose config.yaml holds ``model.arch: arch_yaml``."""
    import yaml

    from parallel import checkpoint as ckpt

    model = build_model(arch, seed=0)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    files = {"config.yaml": yaml.safe_dump({"model": {"arch": arch_yaml}})}
    ckpt.save(tmp_path / "run" / "checkpoints", 1, {"model": state, "step": torch.tensor(1)}, {}, 0, files)
    return model, tmp_path / "run"


@pytest.mark.parametrize("change", [{"pos_embed": "sincos3d"}, {"attention_layout": "factorized"},
                                    {"modulation": "per_block"}, {"text_mask": False}])  # fmt: skip
def test_an_export_into_a_model_computing_another_function_is_refused(tmp_path, change):
    """An export's config.json names its architecture: a model whose arch differs in a field that
    changes the function is refused, naming ``model.arch.FIELD: source → model``, before any weight
    changes (``modulation`` also changes parameters: the arch error comes first and says why)."""
    src_arch = get_preset("tiny")
    _, export = _export(tmp_path, src_arch)
    arch = src_arch.replace(**change)
    dst = build_model(arch, seed=1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    (name, value), = change.items()  # fmt: skip
    with pytest.raises(
        ValueError, match=rf"init.from={export}: the model would compute another function"
    ) as e:
        apply_init(dst, export, arch)
    assert f"model.arch.{name}: {getattr(src_arch, name)!r} → {value!r}" in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())


def test_a_runs_saved_arch_is_compared_and_legacy_values_read_as_their_kind(tmp_path):
    """A run's config.yaml ``model.arch`` (written by an older version: a boolean qk_norm, fields it did
    not have yet) is the source's architecture: the same model loads, one with another q/k norm is
    refused (per_head → none would otherwise drop the norms silently: an export's or a run's unexpected
    tensors are only reported), and ``init.allow_arch_changes`` lets it through."""
    arch = get_preset("tiny")
    assert arch.qk_norm == "per_head"
    legacy = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(arch).items()}
    legacy["qk_norm"] = True
    del legacy["block_norm"], legacy["text_null"]  # not in an old run's config: their defaults then
    src, run_dir = _run_checkpoint(tmp_path, arch, legacy)
    model = build_model(arch, seed=1)
    apply_init(model, run_dir, arch)
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())

    none = arch.replace(qk_norm="none")
    with pytest.raises(ValueError, match=r"model.arch.qk_norm: 'per_head' → 'none'"):
        apply_init(build_model(none, seed=1), run_dir, none)
    report = apply_init(build_model(none, seed=1), run_dir, none, allow_arch_changes=["qk_norm"])
    assert report.unexpected and all(".norm_q." in n or ".norm_k." in n for n in report.unexpected)


def test_an_export_may_still_load_into_a_shallower_model(tmp_path):
    """Part of a deeper export (init.min_match's documented use): its extra blocks are reported as
    unexpected, not refused; only a diffusers source's are (test_init_diffusers.py)."""
    src_arch = get_preset("tiny").replace(depth=3)
    _, export = _export(tmp_path, src_arch)
    arch = src_arch.replace(depth=2)
    report = apply_init(build_model(arch, seed=1), export, arch)
    assert report.unexpected and all(n.startswith("blocks.2.") for n in report.unexpected)


def test_arch_changes_counts_only_differences_with_an_effect():
    from launch.finetune import arch_changes

    base = get_preset("tiny")  # per_head q/k norm, rope3d, masked text
    same = [
        base.replace(qk_norm_eps=base.norm_eps),  # the epsilon None stands for
        base.replace(rope_base=(1, 2, 3), rope_compression=(2, 4, 4)),  # rope_ltx's only
        base.replace(text_len=77),  # masked padding: its length does not matter
        base.replace(fps_conditioning=True),  # a new fps embedder starts as the identity
        base.replace(attention_backend="math", depth=5, cond_channels=3, text_dim=768, mup_base_width=64),
        base.replace(parametrization="mup", mup_base_head_dim=base.head_dim).replace(
            parametrization="standard"
        ),
    ]
    for cfg in same:
        assert arch_changes(base, cfg) == {}, cfg
    mup = base.replace(parametrization="mup")
    assert arch_changes(mup, mup.replace(mup_base_head_dim=mup.head_dim)) == {}  # 0 means head_dim
    assert arch_changes(mup, mup.replace(mup_base_width=64)) == {"mup_base_width": (128, 64)}
    assert arch_changes(base, mup) == {"parametrization": ("standard", "mup")}
    assert arch_changes(base.replace(fps_conditioning=True), base) == {"fps_conditioning": (True, False)}
    unmasked = base.replace(text_mask=False, text_len=512)
    assert arch_changes(unmasked, unmasked.replace(text_len=24)) == {"text_len": (512, 24)}
    assert arch_changes(base, base.replace(qk_norm_eps=1e-5)) == {"qk_norm_eps": (None, 1e-5)}
    ltx = base.replace(pos_embed="rope_ltx")
    assert arch_changes(ltx, ltx.replace(rope_base=(1, 2, 3))) == {"rope_base": ((20, 2048, 2048), (1, 2, 3))}
    assert arch_changes(base, base.replace(num_heads=2, conditioning="none")) == {
        "num_heads": (4, 2),
        "conditioning": ("text", "none"),
    }
