"""Samples and encoders in the training precision: ``launch.sample --precision`` runs the DiT under bf16
autocast (the weights stay fp32), and the Conditioner builds its VAE and text encoder lazily, in bf16
on CUDA when the run is bf16. CPU autocast stands in for CUDA's; what a GPU adds (bf16 VAE and text
encoder kernels) only a GPU run shows."""

from __future__ import annotations

import pytest
import torch

from dit.config import get_preset
from dit.diffusion import DiffusionConfig
from launch.batches import Conditioner, run_bf16
from launch.config import SampleConfig, load_config
from launch.sample import SampleRequest, generate
from tests.dit.helpers import random_model


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_sample_cli_runs_the_model_in_the_chosen_precision(tmp_path, precision):
    arch = get_preset("tiny").replace(conditioning="class", num_classes=10, in_channels=48)
    model = random_model(arch).eval()
    seen = []
    model.blocks[0].attn.q.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    info = {"arch": arch, "diffusion": DiffusionConfig(), "codec": "pixel", "sample": SampleConfig()}
    args = SampleRequest(
        frames=1, height=16, width=16, fps=8.0, steps=2, sampler="euler", cfg=2.0, seed=0, batch_size=4,
        device="cpu", precision=precision, image=None, video=None, strength=0.6, out=str(tmp_path / "s.mp4"),
    )  # fmt: skip
    written = generate(model, info, ["3"], args)
    assert written == [tmp_path / "s.mp4"] and written[0].stat().st_size > 0
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert set(seen) == {want} and len(seen) == 2  # two steps (guidance batches both halves)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize(
    ("precision", "device", "bf16", "encoders"),
    [
        ("auto", "cuda", True, torch.bfloat16),
        ("bf16", "cuda", True, torch.bfloat16),
        ("fp32", "cuda", False, torch.float32),
        ("auto", "cpu", False, torch.float32),
        ("bf16", "cpu", True, torch.float32),  # bf16 compute on CPU, encoders left in fp32
    ],
)
def test_precision_rule_and_encoder_dtype(precision, device, bf16, encoders):
    cfg = load_config(None, [f"run.precision={precision}"])
    assert run_bf16(cfg, torch.device(device)) is bf16
    cond = Conditioner(cfg, torch.device(device))  # builds nothing on the device
    assert cond.encoder_dtype == encoders
    assert cond._codec is None and cond.text is None  # nothing loaded until something is encoded


def test_conditioner_checks_channels_without_loading_the_codec():
    with pytest.raises(
        ValueError, match=r"data.codec='pixel' makes 48-channel latents but model.arch.in_channels=4"
    ):
        Conditioner(load_config(None, ["model.arch.in_channels=4"]), torch.device("cpu"))


def test_sampling_a_model_whose_codec_cannot_decode_stops_before_the_model_runs(tmp_path):
    """DiT-XL/2's ``data.codec=latents:4,1,8`` declares geometry only: ``launch.sample`` says so up front
    instead of after every denoising step has run."""
    arch = get_preset("tiny").replace(conditioning="class", num_classes=10, in_channels=4)
    model = random_model(arch).eval()
    calls = []
    model.register_forward_hook(lambda m, a, out: calls.append(1))
    info = {"arch": arch, "diffusion": DiffusionConfig(), "codec": "latents:4,1,8", "sample": SampleConfig()}
    args = SampleRequest(
        frames=1, height=16, width=16, fps=8.0, steps=2, sampler="euler", cfg=2.0, seed=0, batch_size=4,
        device="cpu", precision="fp32", image=None, video=None, strength=0.6, out=str(tmp_path / "s.mp4"),
    )  # fmt: skip
    with pytest.raises(SystemExit, match=r"latents:4,1,8.* cannot decode"):
        generate(model, info, ["3"], args)
    assert calls == [] and not (tmp_path / "s.mp4").exists()
