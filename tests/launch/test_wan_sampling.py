"""``launch.sample``'s sampler on tiny Wan models imported from diffusers equals ``WanPipeline`` given the
same initial noise, prompt embeddings and scheduler (FlowMatchEuler and UniPC, one expert and
Wan2.2-A14B's two), and ``diffusion.t_range`` (one expert's share of the training times)."""

import math

import pytest
import torch

from data.buckets import Compression
from dit.diffusion import DDPM, DiffusionConfig, FlowMatching
from launch.config import load_config
from launch.evaluate import grid_times
from launch.sample import experts, latents_for, load_for_inference
from tests.launch.diffusers_models import build_wan, tiny_wan_pipeline_root

FRAMES, HEIGHT, WIDTH, TEXT_LEN = 5, 32, 48, 12  # latents B×4×2×4×6: 2×2×3 tokens with patch (1, 2, 2)
WAN_VAE = Compression(4, 8, True)
PROMPTS = ["a", "b"]


def _text():
    """Stand-in UMT5 states (24 wide) as WanPipeline takes them: zero past each caption's length; the
    empty prompt has one token. ``encode`` answers our sampler's calls with the same tensors."""
    g = torch.Generator().manual_seed(7)
    lens = torch.tensor([5, 9, 1])  # the two prompts, then ""
    mask = torch.arange(TEXT_LEN)[None] < lens[:, None]
    emb = torch.randn(3, TEXT_LEN, 24, generator=g) * mask[..., None]

    def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [2] if texts == [""] else [PROMPTS.index(t) for t in texts]
        return emb[rows], mask[rows]

    return encode, emb[:2], emb[2:].expand(2, -1, -1)


def _pipeline(root, scheduler):
    """WanPipeline over the root's transformers, rebuilt in memory (diffusers' ``from_pretrained`` needs
    ``accelerate``) and checked equal to the files the root holds."""
    from diffusers import WanPipeline
    from safetensors.torch import load_file

    def transformer(name: str, seed: int):
        model = build_wan("t2v", seed)
        saved = load_file(root / name / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
        return model

    two = (root / "transformer_2").is_dir()
    return WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=scheduler,
        transformer=transformer("transformer", 0),
        transformer_2=transformer("transformer_2", 1) if two else None,
        boundary_ratio=0.875 if two else None,
    )


def _reference(pipe, steps: int, cfg: float, noise: torch.Tensor) -> torch.Tensor:
    _, emb, empty = _text()
    out = pipe(
        prompt_embeds=emb,
        negative_prompt_embeds=empty,
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        num_inference_steps=steps,
        guidance_scale=cfg,
        latents=noise,
        output_type="latent",
    )
    return out.frames


def _ours(model, info, steps, cfg, noise, sampler="euler", grid="diffusers") -> torch.Tensor:
    encode, _, _ = _text()
    obj = FlowMatching(info["diffusion"])
    kw = dict(frames=FRAMES, height=HEIGHT, width=WIDTH, fps=16.0, steps=steps, sampler=sampler)
    kw |= dict(cfg_scale=cfg, seed=0, device="cpu", grid=grid, noise=noise)
    return latents_for(model, obj, info["arch"], WAN_VAE, encode, PROMPTS, **kw)


def _noise() -> torch.Tensor:
    return torch.randn(2, 4, 2, 4, 6, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("sampler", ["euler", "unipc"])
def test_imported_wan_samples_what_wan_pipeline_samples(tmp_path, sampler):
    """A pipeline root imported as ours (Wan's text convention and flow shift 3 from its files), sampled
    by ``launch.sample`` with ``--grid diffusers``, equals WanPipeline's latents with
    FlowMatchEulerDiscreteScheduler (``euler``) or Wan's UniPCMultistepScheduler (``unipc``) within
    1e-4; our own uniform grid (the default) walks other times and lands elsewhere."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    root = tiny_wan_pipeline_root(tmp_path)
    model, info = load_for_inference(root)
    arch = info["arch"]
    assert (arch.text_mask, arch.text_null, info["diffusion"].shift) == (False, "empty_prompt", 3.0)
    if sampler == "euler":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    else:
        unipc = dict(prediction_type="flow_prediction", use_flow_sigmas=True, solver_order=2)
        scheduler = UniPCMultistepScheduler(flow_shift=3.0, **unipc)
    noise = _noise()
    ref = _reference(_pipeline(root, scheduler), 6, 5.0, noise)
    ours = _ours(model, info, 6, 5.0, noise, sampler)
    assert (ours - ref).abs().max() < 1e-4
    assert (_ours(model, info, 6, 5.0, noise, sampler, grid="uniform") - ref).abs().max() > 1e-3


def test_two_experts_switch_at_the_boundary_as_wan_pipeline_does(tmp_path):
    """Wan2.2-A14B: the high-noise expert (``transformer/``) for network times ≥ 875, the low-noise one
    (``transformer_2/``) below, the boundary read from the root's ``boundary_ratio``: WanPipeline's
    latents within 1e-4. Either expert alone gives other latents (both really run)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    root = tiny_wan_pipeline_root(tmp_path, experts=2)
    high, info = load_for_inference(root, expert="high_noise")
    low, low_info = load_for_inference(root, expert="low_noise")
    pair = experts(high, info, low, low_info, root, None)
    assert pair.boundary == 0.875
    noise = _noise()
    ref = _reference(_pipeline(root, FlowMatchEulerDiscreteScheduler(shift=3.0)), 8, 4.0, noise)
    assert (_ours(pair, info, 8, 4.0, noise) - ref).abs().max() < 1e-4
    for alone in (high, low):
        assert (_ours(alone, info, 8, 4.0, noise) - ref).abs().max() > 1e-3
    with pytest.raises(ValueError, match="--boundary"):
        experts(high, info, low, low_info, tmp_path, None)  # two exports: no root to read it from


@pytest.mark.parametrize(
    "sampling,shift,t_range",
    [("uniform", 1.0, (0.2, 0.6)), ("logit_normal", 3.0, (0.875, 1.0)), ("mode", 5.0, (0.0, 0.875))],
)
def test_t_range_draws_the_configured_distribution_inside_the_range(sampling, shift, t_range):
    """Every drawn time lies in [lo, hi], and their quantiles are those of the unrestricted draws that
    fall in the range (the shape kept, only truncated)."""
    base = dict(timestep_sampling=sampling, shift=shift)
    ranged = FlowMatching(DiffusionConfig(**base, t_range=t_range))
    t = ranged.sample_t(200000, None, "cpu", torch.Generator().manual_seed(0))
    lo, hi = t_range
    assert t.dtype == torch.float32 and t.min() >= lo and t.max() <= hi
    free = FlowMatching(DiffusionConfig(**base)).sample_t(
        1000000, None, "cpu", torch.Generator().manual_seed(1)
    )
    inside = free[(free >= lo) & (free <= hi)]
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    assert (torch.quantile(t, q) - torch.quantile(inside, q)).abs().max() < 0.01 * (hi - lo)


def test_full_t_range_is_todays_draw_and_the_validation_grid_follows_the_range():
    """(0, 1) draws bit for bit what the formula drew before t_range existed; the validation grid
    spreads ``eval.timesteps`` cell centres over the range; DDPM refuses a range."""
    cfg = DiffusionConfig(logit_mean=0.3, logit_std=1.2, shift=3.0)
    got = FlowMatching(cfg).sample_t(64, None, "cpu", torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    torch.rand(64, generator=g)  # today's draw order: u first, then n
    t = torch.sigmoid(0.3 + 1.2 * torch.randn(64, generator=g))
    assert torch.equal(got, 3.0 * t / (1 + 2.0 * t))
    job = load_config(None, ["eval.timesteps=4", "diffusion.t_range=[0.875,1.0]"])
    times = [float(grid_times(None, job, 1, i, "cpu")) for i in range(4)]
    assert times == pytest.approx([0.875 + 0.125 * (i + 0.5) / 4 for i in range(4)])
    job = load_config(None, ["eval.timesteps=4"])
    assert [float(grid_times(None, job, 1, i, "cpu")) for i in range(4)] == [0.125, 0.375, 0.625, 0.875]
    with pytest.raises(ValueError, match="t_range"):
        DDPM(DiffusionConfig(objective="ddpm", t_range=(0.5, 1.0)))
    assert math.isfinite(float(got.sum()))
