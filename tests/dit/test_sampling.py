import pytest
import torch

from dit.config import get_preset
from dit.diffusion import DDPM, DiffusionConfig, FlowMatching
from dit.sampling import SAMPLERS, make_predictor, sample
from tests.dit.helpers import inputs, random_model

SHAPE = (2, 4, 3, 4, 4)


def _delta_flow_model(x0_star):
    # The exact flow for data concentrated at x0*: the velocity carries x straight to x0*,
    # v(x, t) = (x - x0*) / t, a field linear in x.
    def model(x, net_t):
        return (x - x0_star) / (net_t / 1000)[:, None, None, None, None]

    return model


def _gauss_flow_model(s):
    # Exact velocity when the data is N(0, s²): x̂0 = (1-t)s²x / ((1-t)²s² + t²), v = (x - x̂0) / t.
    def model(x, net_t):
        t = (net_t / 1000)[:, None, None, None, None]
        x0 = (1 - t) * s**2 * x / ((1 - t) ** 2 * s**2 + t**2)
        return (x - x0) / t

    return model


def _gauss_ddpm_eps_model(obj, s):
    def model(x, net_t):
        a, sig = (
            v[:, None, None, None, None]
            for v in obj.alpha_sigma(torch.round(net_t * obj.cfg.num_timesteps / 1000))
        )
        x0 = a * s**2 * x / (a**2 * s**2 + sig**2)
        return (x - a * x0) / sig

    return model


@pytest.mark.parametrize("steps", [1, 3, 7])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_integrates_a_linear_velocity_field_exactly(steps, shift):
    x0_star = torch.randn(SHAPE)
    obj = FlowMatching(DiffusionConfig(shift=shift))
    out = sample(_delta_flow_model(x0_star), obj, SHAPE, {}, sampler="euler", steps=steps, seed=3)
    assert torch.allclose(out, x0_star, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_ddpm_samplers_reach_a_known_x0_exactly(sampler):
    obj = DDPM(DiffusionConfig(objective="ddpm"))
    x0_star = torch.randn(SHAPE)

    def model(x, net_t):  # ε that makes x̂0 = x0* everywhere
        a, s = (
            v[:, None, None, None, None]
            for v in obj.alpha_sigma(torch.round(net_t * obj.cfg.num_timesteps / 1000))
        )
        return (x - a * x0_star) / s

    out = sample(model, obj, SHAPE, {}, sampler=sampler, steps=10, seed=0)
    assert torch.allclose(out, x0_star, atol=1e-4)


def test_second_order_samplers_beat_first_order_on_gaussian_data():
    s = 0.5
    flow = FlowMatching(DiffusionConfig())
    noise = torch.Generator().manual_seed(0)
    exact = s * torch.randn(SHAPE, generator=noise)  # the PF-ODE maps noise z to s·z
    errs = {
        k: (sample(_gauss_flow_model(s), flow, SHAPE, {}, sampler=k, steps=8, seed=0) - exact).abs().max()
        for k in ("euler", "heun", "ddim", "dpm++2m")
    }
    assert errs["heun"] < errs["euler"] / 5
    assert errs["dpm++2m"] < errs["ddim"] / 5
    assert torch.isclose(errs["ddim"], errs["euler"], rtol=1e-3)  # DDIM on the flow path is Euler

    ddpm = DDPM(DiffusionConfig(objective="ddpm"))
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    a, sig = ddpm.alpha_sigma(torch.tensor([ddpm.cfg.num_timesteps - 1]))
    exact = z * s / (a**2 * s**2 + sig**2).sqrt()
    e_ddim = (
        (sample(_gauss_ddpm_eps_model(ddpm, s), ddpm, SHAPE, {}, sampler="ddim", steps=50, seed=0) - exact)
        .abs()
        .max()
    )
    e_dpm = (
        (sample(_gauss_ddpm_eps_model(ddpm, s), ddpm, SHAPE, {}, sampler="dpm++2m", steps=50, seed=0) - exact)
        .abs()
        .max()
    )
    assert e_dpm < e_ddim / 10


@pytest.mark.slow
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_each_sampler_is_deterministic_for_a_seed(sampler):
    cfg = get_preset("tiny")
    model = random_model(cfg)
    x, _, kw = inputs(cfg)
    null = {"context": torch.zeros_like(kw["context"]), "context_mask": torch.zeros_like(kw["context_mask"])}
    obj = (
        FlowMatching(DiffusionConfig())
        if sampler in ("euler", "heun")
        else DDPM(DiffusionConfig(objective="ddpm"))
    )

    def run(seed):
        return sample(model, obj, x.shape, kw, null, sampler=sampler, steps=4, cfg_scale=3.0, seed=seed)

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b) and not torch.allclose(a, c) and torch.isfinite(a).all()


def test_flow_only_samplers_refuse_ddpm():
    with pytest.raises(ValueError, match="flow ODE"):
        sample(lambda x, t: x, DDPM(DiffusionConfig(objective="ddpm")), SHAPE, {}, sampler="heun", steps=2)


@pytest.mark.slow
def test_classifier_free_guidance():
    cfg = get_preset("tiny")
    model = random_model(cfg)
    x, t, kw = inputs(cfg)
    obj = FlowMatching(DiffusionConfig())
    null = {"context": torch.zeros_like(kw["context"]), "context_mask": torch.zeros_like(kw["context_mask"])}
    c = make_predictor(model, obj, kw)(x, 0.5)
    u = make_predictor(model, obj, null)(x, 0.5)
    assert torch.allclose(make_predictor(model, obj, kw, null, 1.0)(x, 0.5), c)
    guided = make_predictor(model, obj, kw, null, 4.0)(x, 0.5)  # one batched forward
    assert torch.allclose(guided, u + 4.0 * (c - u), atol=1e-4)
    short_null = {
        "context": torch.zeros(2, 1, cfg.text_dim),
        "context_mask": torch.zeros(2, 1, dtype=torch.bool),
    }
    assert torch.allclose(
        make_predictor(model, obj, kw, short_null, 4.0)(x, 0.5), guided, atol=1e-4
    )  # two forwards
    with pytest.raises(ValueError, match="unconditional"):
        make_predictor(model, obj, kw, None, 2.0)


def test_class_guidance_with_the_null_class():
    """DDIM with cfg_scale=4 and the null class equals unguided DDIM of a model that returns
    u + 4 (c - u) itself (same seed): the guidance is applied to the model output at every step."""
    cfg = get_preset("dit-s/2", depth=2, hidden_size=96, num_heads=4, num_classes=10)
    model = random_model(cfg)
    obj = DDPM(DiffusionConfig(objective="ddpm"))
    labels, null = torch.tensor([3, 5]), torch.full((2,), 10)

    def guided_model(x, t, labels):
        u = model(x, t, labels=null)
        return u + 4.0 * (model(x, t, labels=labels) - u)

    def draw(m, kw, uncond, scale):
        return sample(m, obj, (2, 4, 1, 8, 8), kw, uncond, sampler="ddim", steps=3, cfg_scale=scale, seed=5)

    out = draw(model, {"labels": labels}, {"labels": null}, 4.0)
    # (random weights: samples of magnitude ~800; batched vs separate forwards differ by ~1e-3)
    assert torch.allclose(out, draw(guided_model, {"labels": labels}, None, 1.0), rtol=1e-5, atol=1e-2)
    assert not torch.allclose(out, draw(model, {"labels": labels}, None, 1.0), rtol=1e-2, atol=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["frames", "cond", "both"])
def test_image_to_video_keeps_the_first_frame(mode):
    cfg = get_preset("tiny", cond_channels=5 if mode != "frames" else 0)
    model = random_model(cfg)
    _, _, kw = inputs(cfg, t=4)
    kw.pop("cond", None)
    first = torch.randn(2, 4, 6, 10)
    out = sample(
        model,
        FlowMatching(DiffusionConfig()),
        (2, 4, 4, 6, 10),
        kw,
        sampler="heun",
        steps=3,
        first_frame=first,
        first_frame_as=mode,
    )
    if mode == "cond":
        assert not torch.equal(out[:, :, 0], first)  # only conditioned, not pinned
    else:
        assert torch.equal(out[:, :, 0], first)
    assert torch.isfinite(out).all()


@pytest.mark.slow
def test_video_to_video_strength():
    cfg = get_preset("tiny")
    model = random_model(cfg)
    video, _, kw = inputs(cfg)
    obj = FlowMatching(DiffusionConfig())
    same = sample(model, obj, video.shape, kw, sampler="euler", steps=4, video=video, strength=0.0)
    assert torch.equal(same, video)
    full = sample(model, obj, video.shape, kw, sampler="euler", steps=4, video=video, strength=1.0, seed=5)
    t2v = sample(model, obj, video.shape, kw, sampler="euler", steps=4, seed=5)
    assert torch.allclose(full, t2v, atol=1e-6)  # at t = 1 the input is fully replaced by noise
    half = sample(model, obj, video.shape, kw, sampler="euler", steps=4, video=video, strength=0.5, seed=5)
    assert (half - video).abs().mean() < (t2v - video).abs().mean()
    with pytest.raises(ValueError, match="strength"):
        sample(model, obj, video.shape, kw, video=video, strength=1.5)


def test_ddpm_grid():
    times = DDPM(DiffusionConfig(objective="ddpm")).sampling_times(10)
    assert times[0] == 999 and times[-1] == -1 and len(times) == 11 and (times[1:] < times[:-1]).all()


@pytest.mark.slow
@pytest.mark.parametrize("sampler,objective", [("ddim", "ddpm"), ("dpm++2m", "flow"), ("heun", "flow")])
def test_low_precision_model_samples_in_fp32_and_returns_its_dtype(sampler, objective):
    cfg = get_preset("tiny")
    model = random_model(cfg).to(torch.bfloat16)
    _, _, kw = inputs(cfg)
    kw = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in kw.items()}
    obj = FlowMatching(DiffusionConfig()) if objective == "flow" else DDPM(DiffusionConfig(objective="ddpm"))
    out = sample(
        model,
        obj,
        (2, 4, 3, 6, 10),
        kw,
        sampler=sampler,
        steps=3,
        dtype=torch.bfloat16,
        first_frame=torch.randn(2, 4, 6, 10),
    )
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_ddpm_grid_rejects_more_steps_than_timesteps():
    with pytest.raises(ValueError, match="num_timesteps=10"):
        DDPM(DiffusionConfig(objective="ddpm", num_timesteps=10)).sampling_times(25)
