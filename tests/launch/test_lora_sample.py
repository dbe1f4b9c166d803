"""A LoRA run as a source: ``python -m launch.sample LORA_RUN`` and ``init.from=LORA_RUN`` take the model it
trained (its base, rebuilt from the run's ``init.from`` and fingerprint-checked, with the adapters merged
in), as every other run is taken.

The run is a checkpoint as the trainer writes it (adapters and their EMA in peft's names, config.yaml and
base.json), built here through the trainer's own :func:`launch.engine.initial_model` without training:
its B matrices are set to non-zero values, as a trained LoRA's are.
"""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch

from dit.model import build_model
from launch.config import load_config, to_yaml
from launch.engine import BaseRecord, initial_model
from launch.export import export_config, load_model, write_export
from launch.export import main as export_main
from launch.finetune import apply_init
from launch.lora import is_adapter, merged_state
from launch.sample import main as sample_main
from parallel import checkpoint as ckpt

TINY = ["model.arch.depth=2", "model.arch.hidden_size=64", "model.arch.ffn_dim=128"]
SAMPLE = ["--prompt", "a red ball", "--steps", "2", "--frames", "2", "--height", "16", "--width", "16"]
SAMPLE += ["--cfg", "1", "--device", "cpu", "--precision", "fp32"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """(run dir, base export, the trained LoRA model with the EMA adapters loaded: what the run exports)."""
    tmp = tmp_path_factory.mktemp("lora")
    plain_cfg = load_config(None, TINY)
    arch = plain_cfg.model.arch
    gen = torch.Generator().manual_seed(3)
    plain = build_model(arch, device="cpu", seed=1)  # a stand-in for a pretrained base: no zero gates
    state = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in plain.state_dict().items()}
    info = {k: v for k, v in export_config(plain_cfg, 1, tmp).items() if k not in ("format", "arch")}
    base = write_export(tmp / "base", arch, state, info)
    cfg = load_config(None, [*TINY, f"init.from={base}", "finetune.lora.rank=2", "finetune.lora.alpha=4"])
    record = BaseRecord(str(base))
    model = initial_model(cfg, record)  # the trainer's: seed, init.from, fingerprint, adapters
    adapters = {}
    for name, p in model.named_parameters():
        if is_adapter(name):
            adapters[name] = 0.2 * torch.randn(p.shape, generator=gen) if ".lora_B." in name else p.detach()
    ema = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in adapters.items()}
    files = {"config.yaml": to_yaml(cfg), "base.json": json.dumps(record.as_dict())}
    full = {"model": adapters, "ema": ema, "step": torch.tensor(6)}
    ckpt.save(tmp / "run" / "checkpoints", 6, full, {}, rank=0, files=files)
    model.load_state_dict(ema, strict=False)  # a source's default is its EMA
    return tmp / "run", base, model.eval()


def _frames(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_init_from_a_lora_run_loads_its_merged_weights(lora_run, tmp_path):
    """``init.from=LORA_RUN`` through the trainer's initial model: the base with the EMA adapters merged,
    what :func:`launch.export.load_model` gives and what the LoRA model computes; not the base."""
    run, base, model = lora_run
    want = merged_state(model)
    cfg = load_config(None, [*TINY, f"init.from={run}"])
    got = initial_model(cfg).state_dict()
    assert got.keys() == want.keys()
    assert all(torch.allclose(got[k], v, rtol=0, atol=1e-6) for k, v in want.items())
    loaded = load_model(run).state_dict()
    assert all(torch.equal(got[k], v) for k, v in loaded.items())
    base_state = load_model(base).state_dict()
    assert not torch.allclose(got["blocks.0.attn.q.weight"], base_state["blocks.0.attn.q.weight"], atol=1e-3)
    # the raw adapters with init.use_ema=false
    fresh = build_model(cfg.model.arch, device="cpu", seed=0)
    apply_init(fresh, run, cfg.model.arch, use_ema=False)
    q = "blocks.1.attn.q.weight"
    assert not torch.allclose(fresh.state_dict()[q], got[q], atol=1e-4)


def test_sample_of_a_lora_run_is_that_of_its_merged_export(lora_run, tmp_path):
    """``launch.sample LORA_RUN`` (its CLI, in process) writes the video that sampling the run's merged
    export writes, and not the base's."""
    run, base, _ = lora_run
    export_main([str(run), str(tmp_path / "merged")])
    videos = {}
    for name, src in (("run", run), ("merged", tmp_path / "merged"), ("base", base)):
        sample_main([str(src), *SAMPLE, "--out", str(tmp_path / f"{name}.mp4")])
        videos[name] = _frames(tmp_path / f"{name}.mp4")
    assert videos["run"].shape == (2, 16, 16, 3)
    assert np.array_equal(videos["run"], videos["merged"])
    assert np.abs(videos["run"].astype(int) - videos["base"]).mean() > 1
