"""LoRA export: ``python -m launch.export RUN OUT --lora [--lora-format diffusers|comfy]``, ``--merge``
and ``load_model`` of a LoRA run, on tiny random diffusers models built by the tests (CPU, fp32).

The round trip of issue 16: stock diffusers loads our adapter file onto the same base
(``WanPipeline.load_lora_weights``, which runs diffusers' own converter for the ComfyUI layout) and its
transformer computes what our LoRA model computes, within 1e-5. Only a real ComfyUI could confirm that
ComfyUI's loader reads the ``comfy`` file; the test checks its keys are the original Wan names
ComfyUI's Wan model has, and diffusers' converter for that layout (written after ComfyUI's) reads it.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from dit.model import build_model
from launch import interop
from launch.config import (
    LORA_TARGETS,
    FinetuneConfig,
    InitConfig,
    JobConfig,
    LoraConfig,
    ModelConfig,
    TrainData,
    to_yaml,
)
from launch.export import load_model, main
from launch.interop import adapters as lora_files
from launch.lora import adapter_state, apply_lora, base_fingerprint, is_adapter, merged_state
from parallel import checkpoint as ckpt
from parallel.checkpoint import CheckpointError
from tests.launch.diffusers_models import build_wan, tiny_ltx, tiny_wan

RTOL = 1e-5
# the default targets and linears outside the blocks (time, text and output projections): each is
# renamed differently in diffusers' and in the original Wan names
TARGETS = [*LORA_TARGETS, "t_embedder.fc2", "t_proj.1", "text_proj.fc1", "final.linear"]


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: the models are tiny, and LAPACK's SVD (pissa) ran ~100× slower with two threads on a
    busy 2-core machine (OpenMP waits) than with one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def _inputs(cfg):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, 2, 6, 10, generator=gen)
    return x, torch.tensor([937.5, 12.25]), torch.randn(2, 7, cfg.text_dim, generator=gen)


def _train_b(model, seed: int, scale: float = 0.05) -> None:
    """Non-zero B (a trained LoRA's): fresh adapters add nothing and would pass any loader."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter(name) and ".lora_B." in name:
                p.copy_(scale * torch.randn(p.shape, generator=gen))


def _lora_model(cfg, base, lora: LoraConfig, seed: int = 0):
    model = build_model(cfg)
    model.load_state_dict(base)
    apply_lora(model, lora, seed=seed)
    _train_b(model, seed + 1)
    return model.eval()


def _stock_pipe(folder):
    """A WanPipeline holding only the stock transformer (its LoRA loader needs no other component)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    transformer = WanTransformer3DModel.from_pretrained(folder).eval()
    scheduler = FlowMatchEulerDiscreteScheduler()
    return WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=transformer
    )


def test_lora_file_loads_in_stock_diffusers_onto_the_same_base(tmp_path):
    folder = tiny_wan(tmp_path)
    cfg, base = interop.to_ours(interop.read_diffusers(folder))
    model = _lora_model(cfg, base, LoraConfig(rank=4, alpha=8.0, targets=TARGETS))  # scale 2 in B
    x, t, ctx = _inputs(cfg)
    plain = build_model(cfg)
    plain.load_state_dict(base)
    merged = build_model(cfg)
    merged.load_state_dict(merged_state(model))
    with torch.no_grad():
        want = model(x, t, ctx)
        assert _rel(plain.eval()(x, t, ctx), want) > 0.05  # the adapters change the output
        assert _rel(merged.eval()(x, t, ctx), want) <= RTOL
    adapters = adapter_state(model)
    ours = lora_files.merge(base, adapters)  # what export --merge writes
    assert all(torch.allclose(ours[k], v, rtol=0, atol=1e-6) for k, v in merged_state(model).items())

    for fmt in ("diffusers", "comfy"):
        file = lora_files.write_lora(tmp_path / fmt, cfg, adapters, fmt, {"spacetime_dit.rank": "4"})
        with safe_open(file, "pt") as f:
            keys = set(f.keys())
        if fmt == "diffusers":
            assert {
                "transformer.blocks.1.attn2.to_out.0.lora_A.weight",
                "transformer.proj_out.lora_B.weight",
            } <= keys
        else:  # ComfyUI's Wan model keeps the original names: self_attn, ffn.0, head.head, time_projection.1
            assert {
                "diffusion_model.blocks.1.self_attn.o.lora_down.weight",
                "diffusion_model.blocks.0.ffn.0.lora_up.weight",
                "diffusion_model.blocks.0.self_attn.q.alpha",
                "diffusion_model.head.head.lora_down.weight",
                "diffusion_model.time_projection.1.lora_up.weight",
            } <= keys
        in_blocks = sum(k.startswith("blocks.") for k in adapters) // 2  # one alpha each in comfy's
        assert len(keys) == len(adapters) + (in_blocks if fmt == "comfy" else 0)
        pipe = _stock_pipe(folder)
        pipe.load_lora_weights(tmp_path / fmt)  # OUT/pytorch_lora_weights.safetensors, as users call it
        with torch.no_grad():
            got = pipe.transformer(x, t, ctx, return_dict=False)[0]
        assert _rel(got, want) <= RTOL, fmt


def test_ltx_lora_file_loads_in_stock_diffusers(tmp_path):
    """LTX-Video, both layouts (comfy's is LTX-Video-Trainer's: ``diffusion_model.`` + lora_A/lora_B),
    compared inside diffusers: the adapter loaded on the base against the base with our merged weights
    (LTX's call convention against ours is covered by the export tests)."""
    from diffusers import LTXPipeline, LTXVideoTransformer3DModel

    folder = tiny_ltx(tmp_path)
    cfg, base = interop.to_ours(interop.read_diffusers(folder))
    model = _lora_model(cfg, base, LoraConfig(rank=2, alpha=1.0))
    theirs = LTXVideoTransformer3DModel.from_pretrained(folder).eval()
    theirs.load_state_dict(interop.to_diffusers(cfg, merged_state(model)).state)
    gen = torch.Generator().manual_seed(0)
    call = dict(
        hidden_states=torch.randn(1, 12, 8, generator=gen),  # 1 frame of 3 × 4 tokens
        encoder_hidden_states=torch.randn(1, 5, 24, generator=gen),
        timestep=torch.tensor([500]),
        encoder_attention_mask=torch.ones(1, 5),
        num_frames=1,
        height=3,
        width=4,
        return_dict=False,
    )
    with torch.no_grad():
        want = theirs(**call)[0]
    for fmt in ("diffusers", "comfy"):
        file = lora_files.write_lora(tmp_path / fmt, cfg, adapter_state(model), fmt, {})
        loaded = LTXVideoTransformer3DModel.from_pretrained(folder).eval()
        loaded.load_lora_adapter(LTXPipeline.lora_state_dict(str(file)), prefix="transformer")
        with torch.no_grad():
            assert _rel(loaded(**call)[0], want) <= RTOL, fmt


def _lora_run(tmp_path, folder, cfg, lora: LoraConfig):
    """A LoRA run's checkpoint as the trainer writes it: the adapters (peft names) and their EMA only,
    config.yaml and base.json (init.from and the base's fingerprint)."""
    job = JobConfig(
        model=ModelConfig(arch=cfg),
        data=TrainData(max_text_len=cfg.text_len),
        init=InitConfig(from_=str(folder)),
        finetune=FinetuneConfig(lora=lora),
    )
    base = build_model(cfg, seed=job.seed)
    base.load_state_dict(interop.to_ours(interop.read_diffusers(folder))[1])
    record = {"init_from": str(folder), "fingerprint": base_fingerprint(base)}
    model = build_model(cfg)
    model.load_state_dict(base.state_dict())
    apply_lora(model, lora, seed=job.seed)
    _train_b(model, 7)
    adapters = {k: v.clone() for k, v in model.state_dict().items() if is_adapter(k)}
    ema = {k: v + 0.01 * torch.randn_like(v) for k, v in adapters.items()}
    files = {"config.yaml": to_yaml(job), "base.json": json.dumps(record)}
    full = {"model": adapters, "ema": ema, "step": torch.tensor(5)}
    ckpt.save(tmp_path / "run" / "checkpoints", 5, full, {}, rank=0, files=files)
    with torch.no_grad():
        model.load_state_dict(ema, strict=False)  # the export's default: the EMA
    return tmp_path / "run", model.eval()


def test_export_of_a_pissa_lora_run(tmp_path):
    """pissa moves the base's principal directions into the adapters: the exported file (rank 2r) still
    applies to the base as published, in stock diffusers; the plain export and load_model merge."""
    folder = tiny_wan(tmp_path)
    cfg, base = interop.to_ours(interop.read_diffusers(folder))
    run, model = _lora_run(tmp_path, folder, cfg, LoraConfig(rank=2, alpha=4.0, init="pissa"))
    x, t, ctx = _inputs(cfg)
    with torch.no_grad():
        want = model(x, t, ctx)
    main([str(run), str(tmp_path / "lora"), "--lora"])
    file = tmp_path / "lora" / lora_files.LORA_FILE
    with safe_open(file, "pt") as f:
        meta = f.metadata()
        assert f.get_tensor("transformer.blocks.0.attn1.to_q.lora_A.weight").shape[0] == 4  # [A; A0]
    assert (
        meta["spacetime_dit.base_fingerprint"]
        == json.loads((run / "checkpoints" / "step-00000005" / "base.json").read_text())["fingerprint"]
    )
    assert "lora_adapter_metadata" not in meta and meta["spacetime_dit.init"] == "pissa"
    main([str(run), str(tmp_path / "raw"), "--lora", "--no-ema", "--lora-format", "comfy"])
    with safe_open(tmp_path / "raw" / lora_files.LORA_FILE, "pt") as f, safe_open(file, "pt") as g:
        assert f.metadata()["spacetime_dit.ema"] == "false" and meta["spacetime_dit.ema"] == "true"
        raw, ema = (
            f.get_tensor("diffusion_model.blocks.0.ffn.2.lora_up.weight"),
            g.get_tensor("transformer.blocks.0.ffn.net.2.lora_B.weight"),
        )
        assert raw.shape == ema.shape and not torch.equal(raw, ema)  # the raw adapters, not their EMA
    pipe = _stock_pipe(folder)
    pipe.load_lora_weights(tmp_path / "lora")
    main([str(run), str(tmp_path / "merged")])  # a LoRA run's plain export is the merged model
    with torch.no_grad():
        assert _rel(pipe.transformer(x, t, ctx, return_dict=False)[0], want) <= RTOL
        assert _rel(load_model(run)(x, t, ctx), want) <= RTOL
        assert _rel(load_model(tmp_path / "merged")(x, t, ctx), want) <= RTOL

    with pytest.raises(SystemExit, match=r"--merge: .* is not a LoRA run"):
        main([str(tmp_path / "merged"), str(tmp_path / "again"), "--merge"])
    build_wan(seed=3).save_pretrained(folder)  # another base at init.from now
    with pytest.raises(SystemExit, match=r"fingerprint .* trained on .*another base"):
        main([str(run), str(tmp_path / "merged2"), "--merge", "--format", "diffusers"])
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_model(run)


def test_what_a_lora_file_cannot_carry_is_refused(tmp_path):
    """Adapters on a module no loader maps (Wan's Conv3d patch embedding), on a base no published class
    expresses, or from a source that is not a LoRA run: each an error saying what to do."""
    from dit.config import get_preset
    from launch.export import write_export
    from launch.interop import wan
    from tests.launch.diffusers_models import WAN_TINY

    cfg = wan.config_to_ours(WAN_TINY, "tiny Wan")
    model = build_model(cfg, seed=0)
    apply_lora(model, LoraConfig(rank=2, targets=["patch_embed.proj", "blocks.0.attn.q"]))
    adapters = adapter_state(model)
    for fmt in lora_files.FORMATS:
        with pytest.raises(
            ValueError, match=r"patch_embed\.proj \(Wan's patch embedding is a Conv3d.*targets"
        ):
            lora_files.write_lora(tmp_path / "out", cfg, adapters, fmt, {})
    tiny = get_preset("tiny")  # our own architecture: per-head qk norm, masked text …
    with pytest.raises(ValueError, match=r"qk_norm='per_head'.*export the merged model"):
        lora_files.lora_state(tiny, {}, "diffusers")
    assert not (tmp_path / "out").exists()
    export = write_export(tmp_path / "export", tiny, build_model(tiny, seed=0).state_dict(), {"step": 1})
    with pytest.raises(SystemExit, match=r"--lora: .*export is not a LoRA run"):
        main([str(export), str(tmp_path / "out"), "--lora"])
    with pytest.raises(SystemExit):  # argparse: --lora-format belongs to --lora
        main([str(export), str(tmp_path / "out"), "--lora-format", "comfy"])
