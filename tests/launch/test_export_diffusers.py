"""``python -m launch.export SRC OUT --format diffusers [--pipeline]`` and ``launch.export.load_model``, on
tiny random diffusers Wan models and tiny local VAE / text-encoder folders built by the tests (CPU, fp32).

Stock diffusers loads what we write (``WanTransformer3DModel.from_pretrained``,
``WanPipeline.from_pretrained``; its loader needs ``accelerate`` for these classes). The text encoder's
tokenizer is MiniLM's (a BERT WordPiece tokenizer, shipped with the package) saved beside a tiny UMT5
encoder of its vocabulary: no UMT5 SentencePiece model can be built offline, and WanPipeline only calls
the tokenizer's ``__call__``.
"""

from __future__ import annotations

import json

import pytest
import torch

from dit.config import get_preset
from dit.diffusion import DiffusionConfig
from dit.model import SpacetimeDiT, build_model
from launch import interop
from launch.config import JobConfig, ModelConfig, TrainData, to_yaml
from launch.export import load_model, main, write_export
from parallel import checkpoint as ckpt
from parallel.checkpoint import CheckpointError
from tests.launch.diffusers_models import perturb_, tiny_ltx, tiny_wan, tiny_wan_pipeline_root

RTOL = 1e-5


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def _inputs(cfg):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, 2, 6, 10, generator=gen)  # a non-square grid
    return x, torch.tensor([937.5, 12.25]), torch.randn(2, 7, cfg.text_dim, generator=gen)


def _wan_export(tmp_path, **extra):
    """Our export of a tiny Wan, with EMA weights that differ from the raw ones."""
    cfg, state = interop.to_ours(interop.read_diffusers(tiny_wan(tmp_path)))
    ema = {k: v + 0.01 * torch.randn_like(v) for k, v in state.items()}
    info = {"step": 7, "diffusion": DiffusionConfig(shift=3.0), **extra}
    return cfg, state, ema, write_export(tmp_path / "export", cfg, state, info, ema=ema)


def _stock(folder):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(folder).eval()


def test_export_to_diffusers_loads_in_stock_diffusers_and_computes_ours(tmp_path):
    cfg, state, ema, export = _wan_export(tmp_path)
    x, t, ctx = _inputs(cfg)
    for flags, weights in (([], ema), (["--no-ema"], state)):
        out = tmp_path / f"diffusers{len(flags)}"
        main([str(export), str(out), "--format", "diffusers", *flags])
        ours = build_model(cfg)
        ours.load_state_dict(weights)
        with torch.no_grad():
            want = ours.eval()(x, t, ctx)
            got = _stock(out)(x, t, ctx, return_dict=False)[0]
        assert _rel(got, want) <= RTOL
    # and it reads back into the same weights (init.from of our own diffusers export)
    back = interop.to_ours(interop.read_diffusers(tmp_path / "diffusers1"))[1]
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_ltx_export_loads_in_stock_diffusers_and_computes_ours(tmp_path):
    """LTX-Video: LTXPipeline's call (tokens packed (f h w), rope scaled by 8 / fps) against ours."""
    from diffusers import LTXVideoTransformer3DModel
    from einops import rearrange

    cfg, state = interop.to_ours(interop.read_diffusers(tiny_ltx(tmp_path)))
    export = write_export(tmp_path / "export", cfg, state, {"step": 1})
    main([str(export), str(tmp_path / "out"), "--format", "diffusers"])
    theirs = LTXVideoTransformer3DModel.from_pretrained(tmp_path / "out").eval()
    gen = torch.Generator().manual_seed(3)
    b, c, f, h, w = 2, cfg.in_channels, 3, 4, 5
    x, ctx = torch.randn(b, c, f, h, w, generator=gen), torch.randn(b, 6, cfg.text_dim, generator=gen)
    mask, t, fps = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6]), torch.tensor([850.0, 3.5]), 24.0
    with torch.no_grad():
        want = load_model(export)(x, t, ctx, context_mask=mask.bool(), fps=torch.full((b,), fps))
        got = theirs(
            rearrange(x, "b c f h w -> b (f h w) c"), ctx, t, mask, num_frames=f, height=h, width=w,
            rope_interpolation_scale=(8 / fps, 32, 32), return_dict=False,
        )[0]  # fmt: skip
    assert _rel(rearrange(got, "b (f h w) c -> b c f h w", f=f, h=h, w=w), want) <= RTOL


def test_export_from_a_checkpoint(tmp_path):
    cfg, state, ema, _ = _wan_export(tmp_path)
    job = JobConfig(model=ModelConfig(arch=cfg), data=TrainData(max_text_len=cfg.text_len))
    root = tmp_path / "run" / "checkpoints"
    full = {"model": state, "ema": ema, "step": torch.tensor(3)}
    ckpt.save(root, 3, full, {}, rank=0, files={"config.yaml": to_yaml(job)})
    main([str(tmp_path / "run"), str(tmp_path / "out"), "--format", "diffusers"])
    x, t, ctx = _inputs(cfg)
    with torch.no_grad():
        want = load_model(tmp_path / "run")(x, t, ctx)  # the EMA, as the export
        got = _stock(tmp_path / "out")(x, t, ctx, return_dict=False)[0]
    assert _rel(got, want) <= RTOL


def test_what_diffusers_cannot_express_is_listed(tmp_path, capsys):
    arch = get_preset("tiny").replace(fps_conditioning=True)
    model = build_model(arch, seed=0)
    export = write_export(tmp_path / "export", arch, model.state_dict(), {"step": 1})
    with pytest.raises(ValueError) as want:
        interop.to_diffusers(arch, model.state_dict())
    with pytest.raises(SystemExit) as e:
        main([str(export), str(tmp_path / "out"), "--format", "diffusers"])
    assert str(e.value) == f"error: {want.value}" and "fps_conditioning" in str(e.value)
    assert not (tmp_path / "out").exists()
    # the tables of the demo's options are named too (not only as tensors with no place in the state)
    for field, value in (("abs_pos_embed", "learned"), ("text_pos_embed", True), ("text_pool", True)):
        for base in (
            get_preset("tiny"),
            get_preset("ltx-video-2b").replace(hidden_size=64, num_heads=2, depth=1),
        ):
            edited = base.replace(**{field: value})
            with pytest.raises(ValueError, match=f"{field}={value!r}"):
                interop.to_diffusers(edited, SpacetimeDiT(edited).state_dict())


def test_exporting_again_into_a_folder_replaces_what_it_held(tmp_path):
    """A second export into the same OUT leaves only what it wrote: diffusers weights of a sharded model
    that was there (its index would be read in place of the new file, by us and by diffusers) are
    removed; a folder holding the other format is refused, not mixed into."""
    cfg, state, ema, export = _wan_export(tmp_path)
    out = tmp_path / "diffusers"
    older = perturb_(_stock(tmp_path / "wan-t2v"), seed=5)  # another model, saved in shards
    older.save_pretrained(out, max_shard_size="20KB")
    assert (out / "diffusion_pytorch_model.safetensors.index.json").is_file()
    main([str(export), str(out), "--format", "diffusers"])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    want = interop.to_diffusers(cfg, ema).state
    ours_read = interop.read_diffusers(out).state
    stock = _stock(out).state_dict()
    assert all(torch.equal(ours_read[k], v) and torch.equal(stock[k], v) for k, v in want.items())
    assert not torch.equal(older.state_dict()["proj_out.weight"], want["proj_out.weight"])

    with pytest.raises(SystemExit, match=r"holds model\.safetensors.*not a diffusers model folder"):
        main([str(export), str(export), "--format", "diffusers"])  # into our export: refused
    with pytest.raises(ValueError, match=r"holds a diffusers model \(diffusion_pytorch_model\.safetensors\)"):
        write_export(out, cfg, state, {"step": 1})  # our export into a diffusers folder: refused
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert (export / "model.safetensors").is_file() and (export / "ema.safetensors").is_file()

    again = write_export(export, cfg, state, {"step": 8})  # no EMA this time: the old one goes
    assert sorted(p.name for p in again.iterdir()) == ["config.json", "model.safetensors"]
    assert all(torch.equal(v, state[k]) for k, v in load_model(again).state_dict().items())


def _vae(tmp_path):
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
        scale_factor_spatial=2,  # its one downsampling stage (decoding is not run here)
    )
    vae.save_pretrained(tmp_path / "vae")
    return tmp_path / "vae"


def _text_encoder(tmp_path, width: int):
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    from data.encoders import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    config = UMT5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    torch.manual_seed(0)
    perturb_(UMT5EncoderModel(config), seed=1).save_pretrained(tmp_path / "umt5")
    tokenizer.save_pretrained(tmp_path / "umt5")
    return tmp_path / "umt5"


def test_pipeline_export_loads_and_generates_with_wan_pipeline(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    codec, text = _vae(tmp_path), _text_encoder(tmp_path, width=24)  # the tiny Wan's text_dim
    cfg, _, ema, export = _wan_export(tmp_path, codec=str(codec), text_encoder=str(text))
    out = tmp_path / "pipeline"
    main([str(export), str(out), "--format", "diffusers", "--pipeline"])
    pipe = WanPipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0
    assert type(pipe.text_encoder).__name__ == "UMT5EncoderModel" and pipe.transformer_2 is None
    back = interop.to_ours(interop.read_diffusers(out))[1]  # the pipeline root's transformer/
    assert all(torch.equal(back[k], ema[k]) for k in ema)
    for name in ("vae", "text_encoder"):  # the run's weights, copied
        src = codec if name == "vae" else text
        (weights,) = (out / name).glob("*.safetensors")
        assert weights.read_bytes() == (src / weights.name).read_bytes()
    latents = pipe(
        "a red circle", num_frames=5, height=16, width=16, num_inference_steps=2, output_type="latent"
    ).frames
    assert latents.shape == (1, 4, 2, 8, 8)  # 5 frames / 4 + 1, 16 px / 2
    assert torch.isfinite(latents).all() and latents.std() > 0.1
    assert json.loads((out / "model_index.json").read_text())["expand_timesteps"] is False  # Wan2.1's VAE


def test_a_wan22_vae_pipeline_sets_expand_timesteps(tmp_path):
    """Wan2.2-TI2V's published root sets ``expand_timesteps`` (a timestep per token: the image frame at
    t = 0); an export with a Wan2.2 VAE (2×2 patchify, 16×) writes it too, a Wan2.1 VAE does not."""
    from transformers import AutoTokenizer

    from launch.diffusers_pipeline import write_pipeline

    vae = tmp_path / "vae22"
    vae.mkdir()
    (vae / "config.json").write_text(
        json.dumps({"_class_name": "AutoencoderKLWan", "z_dim": 48, "patch_size": 2, "in_channels": 12})
    )
    text = _text_encoder(tmp_path, width=24)
    out = tmp_path / "root"
    (out / "transformer").mkdir(parents=True)
    parts = {"vae": (vae, "AutoencoderKLWan"), "text_encoder": (text, "UMT5EncoderModel"), "shift": 5.0}
    parts["tokenizer"] = AutoTokenizer.from_pretrained(text, local_files_only=True)
    parts |= {"pipeline": "WanPipeline", "class_name": "WanTransformer3DModel"}
    write_pipeline(out, parts)
    assert json.loads((out / "model_index.json").read_text())["expand_timesteps"] is True


def test_pipeline_refusals_name_the_keys(tmp_path):
    cfg, _, _, export = _wan_export(tmp_path, codec="pixel", text_encoder="minilm")
    with pytest.raises(SystemExit) as e:
        main([str(export), str(tmp_path / "out"), "--format", "diffusers", "--pipeline"])
    said = str(e.value)
    assert "data.codec='pixel' is not a diffusers VAE folder" in said
    assert "data.text_encoder='minilm' is not a transformers model folder" in said
    assert not (tmp_path / "out").exists()  # refused before writing anything
    config = json.loads((export / "config.json").read_text())
    config["arch"]["text_mask"] = True  # our masked convention: WanPipeline masks nothing
    (export / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match=r"text_mask=True"):
        main([str(export), str(tmp_path / "out"), "--format", "diffusers", "--pipeline"])
    with pytest.raises(SystemExit):  # argparse: --pipeline is a diffusers-format option
        main([str(export), str(tmp_path / "out"), "--pipeline"])


def test_pipeline_refuses_everything_before_writing(tmp_path):
    """Every setting a WanPipeline would not reproduce is named in one error, before anything is written:
    a text length other than its 512 unmasked tokens, conditioning channels, one expert's t_range, a VAE
    folder with only its config.json, a text encoder without a tokenizer."""
    import shutil

    cfg, _, _, _ = _wan_export(tmp_path)
    vae = tmp_path / "vae-config-only"
    vae.mkdir()
    shutil.copy(_vae(tmp_path) / "config.json", vae)
    bare = tmp_path / "umt5-no-tokenizer"  # the encoder's config and weights, no tokenizer files
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(_text_encoder(tmp_path, width=24) / name, bare)
    arch = cfg.replace(text_len=256, cond_channels=4)
    info = {"step": 1, "max_text_len": 256, "codec": str(vae), "text_encoder": str(bare)}
    info["diffusion"] = DiffusionConfig(shift=3.0, t_range=(0.9, 1.0))
    export = write_export(tmp_path / "export2", arch, build_model(arch).state_dict(), info)
    with pytest.raises(SystemExit) as e:
        main([str(export), str(tmp_path / "out"), "--format", "diffusers", "--pipeline"])
    for named in (
        "model.arch.text_len=256 / data.max_text_len=256",
        "model.arch.cond_channels=4",
        "diffusion.t_range=(0.9, 1.0)",
        f"data.codec={str(vae)!r} has no diffusion_pytorch_model*.safetensors weights",
        f"data.text_encoder={str(bare)!r} has no tokenizer",
    ):
        assert named in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir() if "out" in p.name) == []  # no root, no temporary


def test_pipeline_root_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """The root is built beside OUT and renamed at the end: a failure while writing (a full disk, by
    fault injection into the copy of the encoder weights: nothing here can fill a disk) leaves no partial
    root and keeps a previous one; exporting again replaces a previous root; a non-empty OUT that is not
    a pipeline root is refused and kept."""
    import errno
    import shutil

    codec, text = _vae(tmp_path), _text_encoder(tmp_path, width=24)
    cfg, state, ema, export = _wan_export(tmp_path, codec=str(codec), text_encoder=str(text))
    out = tmp_path / "root"
    main([str(export), str(out), "--format", "diffusers", "--pipeline", "--no-ema"])
    copy = shutil.copy2

    def disk_full(src, dst, **kw):
        if "text_encoder" in str(dst):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return copy(src, dst, **kw)

    monkeypatch.setattr(shutil, "copy2", disk_full)
    with pytest.raises(SystemExit, match="No space left on device"):
        main([str(export), str(out), "--format", "diffusers", "--pipeline"])
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir() if "root" in p.name) == ["root"]  # no temporary
    back = interop.to_ours(interop.read_diffusers(out))[1]
    assert all(torch.equal(back[k], state[k]) for k in state)  # the previous root, whole
    main([str(export), str(out), "--format", "diffusers", "--pipeline"])  # again: replaces it
    back = interop.to_ours(interop.read_diffusers(out))[1]
    assert all(torch.equal(back[k], ema[k]) for k in ema)
    assert sorted(p.name for p in tmp_path.iterdir() if "root" in p.name) == ["root"]

    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"not empty and not a pipeline root \(holds notes\.txt\)"):
        main([str(export), str(out), "--format", "diffusers", "--pipeline"])
    assert (out / "notes.txt").read_text() == "mine" and (out / "model_index.json").is_file()


def test_load_model_from_every_source_kind(tmp_path):
    cfg, state, ema, export = _wan_export(tmp_path)
    root = tiny_wan_pipeline_root(tmp_path, experts=2)
    _, low = interop.to_ours(interop.read_diffusers(root, expert="low_noise"))
    job = JobConfig(model=ModelConfig(arch=cfg), data=TrainData(max_text_len=cfg.text_len))
    ckpt.save(tmp_path / "run" / "checkpoints", 2, {"model": state, "ema": ema, "step": torch.tensor(2)}, {},
              rank=0, files={"config.yaml": to_yaml(job)})  # fmt: skip
    cases = [
        (export, {}, ema),
        (export, {"use_ema": False}, state),
        (tmp_path / "run", {}, ema),
        (tmp_path / "run" / "checkpoints" / "step-00000002", {"use_ema": False}, state),
        (tmp_path / "wan-t2v", {}, state),  # the diffusers folder the export came from
        (root, {"expert": "low_noise"}, low),
    ]
    for path, kw, want in cases:
        model = load_model(path, **kw)
        assert not model.training and all(p.device.type == "cpu" for p in model.parameters())
        assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items()), (path, kw)
    with pytest.raises(ValueError, match=rf"load_model={root}: .*set init.expert"):
        load_model(root)


def test_legacy_export_with_a_boolean_qk_norm_loads(tmp_path):
    """Exports written before qk_norm had three values hold ``true``/``false``: still read (per_head/none)."""
    arch = get_preset("tiny").replace(qk_norm="per_head")
    model = build_model(arch, seed=0)
    export = write_export(tmp_path / "export", arch, model.state_dict(), {"step": 1})
    config = json.loads((export / "config.json").read_text())
    config["arch"]["qk_norm"] = True
    (export / "config.json").write_text(json.dumps(config))
    loaded = load_model(export)
    assert loaded.cfg == arch and loaded.cfg.qk_norm == "per_head"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    config["arch"]["qk_norm"] = False
    (export / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="the weights do not fit the arch of its config"):
        load_model(export)  # no norm weights in a qk_norm=none model: the bool was read as such


def _expert_exports(tmp_path, high_range=(0.875, 1.0), low_range=(0.0, 0.875), low_arch=None, **extra):
    """Our exports of two tiny Wan experts (other weights, EMA differing from the raw ones) with the given
    ``diffusion.t_range``; (their export folders, their EMA weights)."""
    folders, emas = [], []
    for name, seed, t_range in (("high", 0, high_range), ("low", 1, low_range)):
        cfg, state = interop.to_ours(
            interop.read_diffusers(tiny_wan(tmp_path, seed=seed, name=f"wan-{name}"))
        )
        if name == "low" and low_arch is not None:
            cfg = cfg.replace(**low_arch)  # a shallower expert keeps the layers it has
            state = {k: state[k] for k in build_model(cfg).state_dict()}
        ema = {k: v + 0.01 * torch.randn_like(v) for k, v in state.items()}
        info = {"step": 3, "diffusion": DiffusionConfig(shift=3.0, t_range=t_range), **extra}
        folders.append(write_export(tmp_path / f"export-{name}", cfg, state, info, ema=ema))
        emas.append(interop.to_diffusers(cfg, ema).state)
    return folders, emas


def test_two_experts_export_as_one_wan_pipeline_root(tmp_path):
    """Wan2.2-A14B's layout: ``transformer/`` the high-noise expert, ``transformer_2/`` the low-noise one,
    ``boundary_ratio`` where the experts' t_ranges meet; stock WanPipeline loads it (and runs both experts
    in a short generation), our reader takes each expert back."""
    from diffusers import WanPipeline

    codec, text = _vae(tmp_path), _text_encoder(tmp_path, width=24)
    (high, low), (want_high, want_low) = _expert_exports(tmp_path, codec=str(codec), text_encoder=str(text))
    out = tmp_path / "a14b"
    main([str(high), str(out), "--format", "diffusers", "--pipeline", "--low-noise", str(low)])
    pipe = WanPipeline.from_pretrained(out)
    assert pipe.config.boundary_ratio == 0.875 and pipe.transformer_2 is not None
    for model, want in ((pipe.transformer, want_high), (pipe.transformer_2, want_low)):
        got = model.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(want_high["proj_out.weight"], want_low["proj_out.weight"])  # two models
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer_2"] == ["diffusers", "WanTransformer3DModel"] and index["vae"][1] is not None
    for expert, want in (("high_noise", want_high), ("low_noise", want_low)):
        read = interop.read_diffusers(out, expert=expert).state
        assert all(torch.equal(read[k], want[k]) for k in want)
    assert interop.wan_boundary(out) == 0.875
    calls = {"high": 0, "low": 0}  # forward calls of each expert (2 per step: conditional and null)
    for name, model in (("high", pipe.transformer), ("low", pipe.transformer_2)):
        model.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    latents = pipe(
        "a red circle", num_frames=5, height=16, width=16, num_inference_steps=4, output_type="latent"
    ).frames
    assert latents.shape == (1, 4, 2, 8, 8) and torch.isfinite(latents).all()
    steps = pipe.scheduler.timesteps  # shift 3: the steps at t >= 875 run the high-noise expert
    assert calls == {"high": 2 * int((steps >= 875).sum()), "low": 2 * int((steps < 875).sum())}
    assert calls["high"] > 0 and calls["low"] > 0


def test_two_experts_without_pipeline_and_an_explicit_boundary(tmp_path):
    """Without ``--pipeline`` the root holds the two transformers, the scheduler and model_index.json
    (what tells readers which expert is which, and the boundary), no VAE or text encoder. ``--boundary``
    takes experts trained on every time; it must agree with ranges the experts did record."""
    (high, low), (want_high, want_low) = _expert_exports(tmp_path, (0.0, 1.0), (0.0, 1.0))
    out = tmp_path / "experts"
    with pytest.raises(SystemExit, match=r"diffusion\.t_range: .*\(0\.0, 1\.0\).*need --boundary B"):
        main([str(high), str(out), "--format", "diffusers", "--low-noise", str(low)])
    main([str(high), str(out), "--format", "diffusers", "--low-noise", str(low), "--boundary", "0.6"])
    assert sorted(p.name for p in out.iterdir()) == [
        "model_index.json",
        "scheduler",
        "transformer",
        "transformer_2",
    ]
    index = json.loads((out / "model_index.json").read_text())
    assert index["boundary_ratio"] == 0.6 and index["vae"] == [None, None]
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["shift"] == 3.0
    for folder, want in (("transformer", want_high), ("transformer_2", want_low)):
        got = _stock(out / folder).state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)
    (high2, low2), _ = _expert_exports(tmp_path / "ranged")  # ranges recorded at 0.875
    with pytest.raises(SystemExit) as e:
        main(
            [
                str(high2),
                str(tmp_path / "o2"),
                "--format",
                "diffusers",
                "--low-noise",
                str(low2),
                "--boundary",
                "0.6",
            ]
        )
    assert "diffusion.t_range=(0.875, 1.0) of the high-noise expert is not its share (0.6, 1.0)" in str(
        e.value
    )
    assert "diffusion.t_range=(0.0, 0.875) of the low-noise expert is not its share (0.0, 0.6)" in str(
        e.value
    )
    assert not (tmp_path / "o2").exists()


def test_two_expert_refusals_name_the_fields(tmp_path):
    (high, low), _ = _expert_exports(tmp_path, low_range=(0.0, 0.9), low_arch={"text_null": "masked"})
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main([str(high), str(out), "--format", "diffusers", "--pipeline", "--low-noise", str(low)])
    said = str(e.value)
    assert "model.arch.text_null (high: 'empty_prompt', low: 'masked')" in said
    assert (
        "diffusion.t_range: the high-noise expert's (0.875, 1.0) and the low-noise expert's (0.0, 0.9)"
        in said
    )
    assert not out.exists()
    (high, low), _ = _expert_exports(tmp_path / "b")
    with pytest.raises(
        SystemExit, match=r"high-noise expert's \(0\.0, 0\.875\) and the low-noise expert's \(0\.875"
    ):
        main([str(low), str(out), "--format", "diffusers", "--low-noise", str(high)])  # swapped
    (_, deeper), _ = _expert_exports(tmp_path / "c", low_arch={"depth": 1})
    with pytest.raises(SystemExit, match=r"model\.arch\.depth \(high: 2, low: 1\)"):
        main([str(high), str(out), "--format", "diffusers", "--low-noise", str(deeper)])
    assert not out.exists()
    for argv in (["--low-noise", str(low)], ["--format", "diffusers", "--boundary", "0.5"]):
        with pytest.raises(SystemExit) as e:  # argparse: usage errors (exit 2)
            main([str(high), str(out), *argv])
        assert e.value.code == 2
