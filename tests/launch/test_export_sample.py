"""Export, sampling (T2V, I2V, V2V) and init.from through their CLIs, from a real short run."""

import json
import os
import sys

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from data.video import encode_h264
from parallel import checkpoint as ckpt
from tests.launch.conftest import metrics, run, train_in_process


@pytest.fixture(scope="module")
def trained(tmp_path_factory, overrides):
    """A short run and its export, both in this process (CI time: the CLIs under test are the ones that
    read them)."""
    from launch.export import main as export

    rd = tmp_path_factory.mktemp("run") / "run"
    train_in_process(rd, *overrides, "train.steps=3")
    out = rd.parent / "export"
    export([str(rd), str(out)])
    return rd, out


def _frames(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.mark.slow
def test_export_holds_the_checkpoint_weights(trained):
    rd, out = trained
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "ema.safetensors", "model.safetensors"]
    state = ckpt.read_full(ckpt.resolve(rd), {"model", "ema"})
    for name, weights in (
        ("model", load_file(out / "model.safetensors")),
        ("ema", load_file(out / "ema.safetensors")),
    ):
        assert weights.keys() == state[name].keys()
        assert all(torch.equal(weights[k], state[name][k]) for k in weights)


@pytest.mark.slow
def test_sample_text_image_and_video_to_video(trained, tmp_path):
    from launch.sample import main as sample

    _, out = trained
    args = [str(out), "--steps", "3", "--frames", "4", "--height", "32", "--width", "32", "--cfg", "2"]
    base = [sys.executable, "-m", "launch.sample", *args]
    proc = run(
        [*base, "--prompt", "a red circle", "--prompt", "a blue square", "--out", str(tmp_path / "t2v.mp4")]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    clips = [_frames(tmp_path / f"t2v-{i}.mp4") for i in range(2)]
    assert all(c.shape == (4, 32, 32, 3) for c in clips)
    assert [(tmp_path / f"t2v-{i}.txt").read_text(encoding="utf-8") for i in range(2)] == [
        "a red circle",
        "a blue square",
    ]

    # image-to-video: the first frame is pinned to the (pixel-codec) latent of the image
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, :16] = (220, 40, 40)
    image[:, 16:] = (40, 40, 220)
    Image.fromarray(image).save(tmp_path / "first.png")
    # image- and video-to-video through the same command line in this process (CI time)
    sample(
        [
            *args,
            "--prompt",
            "a shape",
            "--image",
            str(tmp_path / "first.png"),
            "--out",
            str(tmp_path / "i2v.mp4"),
        ]
    )
    first = _frames(tmp_path / "i2v.mp4")[0].astype(int)
    assert np.abs(first - image).mean() < 12  # H.264 is lossy; an unrelated frame is ~100 off

    # video-to-video at strength 0 returns the input clip
    clip = np.stack([np.roll(image, 4 * i, axis=1) for i in range(8)])
    (tmp_path / "in.mp4").write_bytes(encode_h264(clip, 8))
    v2v = [*args, "--prompt", "a shape", "--video", str(tmp_path / "in.mp4"), "--strength", "0", "--fps", "8"]
    sample([*v2v, "--out", str(tmp_path / "v2v.mp4")])
    assert np.abs(_frames(tmp_path / "v2v.mp4").astype(int) - clip[:4]).mean() < 12

    proc = run(
        [*base, "--prompt", "x", "--image", str(tmp_path / "missing.png"), "--out", str(tmp_path / "o.mp4")]
    )
    assert proc.returncode != 0 and "missing.png: no such file" in proc.stderr


@pytest.mark.slow
def test_init_from_an_export_loads_weights_only(trained, tmp_path, overrides):
    _, out = trained
    rd = tmp_path / "finetune"
    logged = train_in_process(
        rd, *overrides, "train.steps=2", f"init.from={out}", "init.freeze=[t_embedder.*]"
    )
    assert "init.from=" in logged and "loaded" in logged and "froze 4 parameter tensors" in logged
    assert [r["step"] for r in metrics(rd) if "loss" in r] == [1, 2]  # a fresh optimizer and schedule
    tuned = ckpt.read_full(ckpt.resolve(rd), {"model"})["model"]
    source = load_file(out / "ema.safetensors")  # init.use_ema defaults to true
    assert torch.equal(tuned["t_embedder.fc1.weight"], source["t_embedder.fc1.weight"])  # frozen
    assert not torch.equal(tuned["blocks.0.attn.q.weight"], source["blocks.0.attn.q.weight"])  # trained


def test_class_conditional_models_sample_from_class_ids():
    from data.encoders import PixelCodec
    from dit.config import get_preset
    from dit.diffusion import DiffusionConfig, make_objective
    from dit.model import build_model
    from launch.sample import videos_for

    arch = get_preset("tiny").replace(conditioning="class", num_classes=10, in_channels=48)
    model = build_model(arch, seed=0).eval()
    kw = dict(
        frames=2, height=16, width=16, fps=8, steps=2, sampler="euler", cfg_scale=3.0, seed=0, device="cpu"
    )
    obj = make_objective(DiffusionConfig())
    clips = videos_for(model, obj, arch, PixelCodec(), None, ["3", "7"], **kw)
    assert clips.shape == (2, 2, 16, 16, 3) and clips.dtype == np.uint8
    with pytest.raises(ValueError, match="class ids 0..9"):
        videos_for(model, obj, arch, PixelCodec(), None, ["a cat"], **kw)


def _checkpoint(root, step):
    """A real DCP checkpoint of the tiny preset, as the trainer lays it out (no training needed)."""
    from dit.model import build_model
    from launch.config import load_config, to_yaml

    cfg = load_config()
    weights = build_model(cfg.model.arch, seed=step).state_dict()
    state = {"model": weights, "ema": weights, "step": torch.tensor(step)}
    return ckpt.save(root, step, state, {}, rank=0, files={"config.yaml": to_yaml(cfg)})


@pytest.mark.slow
def test_export_cli_refuses_a_crafted_checkpoint_and_falls_back_from_it(tmp_path):
    from tests.parallel.test_checkpoint_safety import plant_metadata_payload

    root, target, out = tmp_path / "run" / "checkpoints", tmp_path / "pwned", tmp_path / "out"
    _checkpoint(root, 1)
    crafted = _checkpoint(root, 2)
    plant_metadata_payload(crafted, target)
    proc = run([sys.executable, "-m", "launch.export", str(crafted), str(out)])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"{crafted / '.metadata'}: refused to load pathlib.Path.touch" in proc.stderr
    assert not target.exists() and not out.exists()
    # given the run directory, export takes the newest intact checkpoint and says why
    proc = run([sys.executable, "-m", "launch.export", str(tmp_path / "run"), str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step-00000002 is damaged and skipped" in proc.stderr and "falling back to" in proc.stderr
    assert not target.exists()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "1"


@pytest.mark.slow
def test_sample_cli_names_a_foreign_weights_file(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_bytes(os.urandom(4096))
    (export / "config.json").write_text(json.dumps({"format": "spacetime-dit", "arch": {}}))
    proc = run(
        [
            sys.executable,
            "-m",
            "launch.sample",
            str(export),
            "--prompt",
            "x",
            "--out",
            str(tmp_path / "o.mp4"),
        ]
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"{export / 'model.safetensors'}: not a readable safetensors file" in proc.stderr


@pytest.mark.slow
def test_export_refuses_non_finite_weights(tmp_path):
    """The trainer never saves NaN weights (tests/launch/test_reliability.py); a checkpoint holding
    them anyway (altered, or written by something else) is not exported."""
    from dit.model import build_model
    from launch.config import load_config, to_yaml
    from launch.export import export

    cfg = load_config()
    weights = build_model(cfg.model.arch, seed=0).state_dict()
    ema = {k: v.clone() for k, v in weights.items()}
    ema["final.linear.weight"][0, 0] = float("nan")
    root = tmp_path / "run" / "checkpoints"
    ckpt.save(root, 1, {"model": weights, "ema": ema, "step": torch.tensor(1)}, {}, rank=0,
              files={"config.yaml": to_yaml(cfg)})  # fmt: skip
    with pytest.raises(ckpt.CheckpointError, match="ema weights final.linear.weight hold NaN or inf"):
        export(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_export_refuses_a_tensor_the_checkpoint_cannot_hold(tmp_path):
    """Export allocates every tensor whole from the size ``.metadata`` declares: a 2^40-element one is
    refused naming the file, before any allocation, and a run directory falls back from it."""
    import pickle

    from launch.export import export
    from tests.parallel.test_checkpoint_metadata import _replace_metadata

    root = tmp_path / "run" / "checkpoints"
    _checkpoint(root, 1)
    crafted = _checkpoint(root, 2)
    md = pickle.loads((crafted / ".metadata").read_bytes())  # our own file, written by this test
    md.state_dict_metadata["ema.final.linear.bias"].size = torch.Size([2**40])
    _replace_metadata(crafted, pickle.dumps(md))
    with pytest.raises(
        ckpt.CheckpointError, match=rf"{crafted / '.metadata'}: tensor 'ema\.final\.linear\.bias'"
    ):
        export(crafted, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    out = export(tmp_path / "run", tmp_path / "out")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "1"
