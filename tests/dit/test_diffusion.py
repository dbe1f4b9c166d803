import math

import pytest
import torch

from dit.config import get_preset
from dit.diffusion import DDPM, DiffusionConfig, FlowMatching, make_betas, make_objective
from tests.dit.helpers import inputs, random_model


def test_flow_time_samplers():
    n = 20000
    for kind in ("uniform", "logit_normal", "mode"):
        t = FlowMatching(DiffusionConfig(timestep_sampling=kind)).sample_t(n, None, "cpu")
        assert t.min() >= 0 and t.max() <= 1
    t = FlowMatching(DiffusionConfig(timestep_sampling="logit_normal", logit_mean=1.0)).sample_t(
        n, None, "cpu"
    )
    assert t.median().item() == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.01)
    with pytest.raises(ValueError, match="timestep_sampling"):
        FlowMatching(DiffusionConfig(timestep_sampling="beta")).sample_t(4, None, "cpu")


def test_token_dependent_shift():
    obj = FlowMatching(DiffusionConfig(shift=1.0, shift_base_tokens=256, timestep_sampling="uniform"))
    assert obj.shift_for(256) == 1.0 and obj.shift_for(1024) == 2.0
    grid_small, grid_big = obj.sampling_times(10, 256), obj.sampling_times(10, 4096)
    assert torch.allclose(grid_small, torch.linspace(1, 0, 11, dtype=torch.float64))
    assert (grid_big[1:-1] > grid_small[1:-1]).all()  # more tokens: more time at high noise
    assert grid_big[0] == 1 and grid_big[-1] == 0
    with pytest.raises(ValueError, match="tokens"):
        obj.sample_t(4, None, "cpu")


def test_ddpm_schedules():
    lin = make_betas(DiffusionConfig(beta_schedule="linear"))
    assert lin[0].item() == pytest.approx(1e-4) and lin[-1].item() == pytest.approx(0.02)
    sl = make_betas(DiffusionConfig(beta_schedule="scaled_linear"))
    assert sl[0].item() == pytest.approx(0.00085) and sl[-1].item() == pytest.approx(0.012)
    cos = make_betas(DiffusionConfig(beta_schedule="cosine"))
    assert cos.max() <= 0.999 and (cos[1:] >= cos[:-1] - 1e-12).all()


def test_zero_terminal_snr():
    plain = DDPM(DiffusionConfig(beta_schedule="scaled_linear", prediction="v"))
    ztsnr = DDPM(DiffusionConfig(beta_schedule="scaled_linear", prediction="v", zero_terminal_snr=True))
    assert plain.alphas_cumprod[-1] > 0 and ztsnr.alphas_cumprod[-1] == 0
    assert ztsnr.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item())
    with pytest.raises(ValueError, match="prediction='v'"):
        DDPM(DiffusionConfig(zero_terminal_snr=True, prediction="eps"))


@pytest.mark.parametrize(
    "cfg",
    [
        DiffusionConfig(objective="flow"),
        DiffusionConfig(objective="ddpm"),
        DiffusionConfig(objective="ddpm", prediction="v"),
    ],
)
def test_target_recovers_x0_and_noise(cfg):
    obj = make_objective(cfg)
    x0, noise = torch.randn(3, 4, 2, 4, 4), torch.randn(3, 4, 2, 4, 4)
    t = obj.sample_t(3, None, "cpu")
    x_t = obj.add_noise(x0, noise, t)
    x0_hat, eps_hat = obj.to_x0_eps(obj.target(x0, noise, t), x_t, t)
    assert torch.allclose(x0_hat, x0, atol=1e-4) and torch.allclose(eps_hat, noise, atol=1e-4)


def test_perfect_prediction_has_zero_loss():
    obj = FlowMatching(DiffusionConfig())
    x0, noise = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 4, 3, 4, 4)
    out = obj.loss(lambda x, t: noise - x0, x0, noise=noise)
    assert out.loss.item() == 0 and out.per_frame.shape == (2, 3)


def test_conditioning_frames_stay_clean_and_do_not_count():
    obj = FlowMatching(DiffusionConfig())
    x0, noise = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 4, 3, 4, 4)
    cond_frames = torch.tensor([[True, False, False]] * 2)
    seen = {}

    def model(x, t):
        seen["x"], seen["t"] = x, t
        wrong = torch.zeros_like(x)
        return torch.where(cond_frames[:, None, :, None, None], wrong, noise - x0)  # right except on frame 0

    out = obj.loss(model, x0, cond_frames=cond_frames, noise=noise)
    assert out.loss.item() == 0  # the wrong frame is masked out
    assert torch.equal(seen["x"][:, :, 0], x0[:, :, 0])  # ... and was not noised
    assert seen["t"].shape == (2, 3) and (seen["t"][:, 0] == 0).all() and (seen["t"][:, 1] > 0).all()
    assert (out.per_frame[:, 0] == 0).all()


def test_learned_sigma_adds_a_variance_term_that_only_trains_variance():
    obj = DDPM(DiffusionConfig(objective="ddpm"))
    x0 = torch.randn(4, 4, 1, 4, 4)
    noise = torch.randn_like(x0)
    t = torch.tensor([1, 10, 500, 999])  # KL terms (≥ 0); t = 0 is a likelihood, checked below
    mean = (noise + 0.1 * torch.randn_like(noise)).requires_grad_()
    var = torch.zeros_like(x0, requires_grad=True)
    plain = obj.loss(lambda x, tt: mean, x0, noise=noise, t=t).loss
    hybrid = obj.loss(lambda x, tt: torch.cat([mean, var], 1), x0, noise=noise, t=t).loss
    assert torch.isfinite(hybrid) and hybrid > plain
    hybrid.backward()
    assert var.grad.abs().sum() > 0
    # the mean's gradient comes from the MSE alone (the VLB sees a detached mean)
    mean_grad = mean.grad.clone()
    mean.grad = None
    plain.backward()
    assert torch.allclose(mean.grad, mean_grad)
    at_zero = obj.loss(
        lambda x, tt: torch.cat([mean, var], 1), x0, noise=noise, t=torch.zeros(4, dtype=torch.long)
    )
    assert torch.isfinite(at_zero.loss)


def test_loss_through_the_model_rejects_wrong_channels():
    cfg = get_preset("tiny")
    model = random_model(cfg)
    x, _, kw = inputs(cfg)
    obj = FlowMatching(DiffusionConfig())
    assert torch.isfinite(obj.loss(model, x, kw).loss)
    with pytest.raises(ValueError, match="channels"):
        obj.loss(lambda x, t: x[:, :3], x)
