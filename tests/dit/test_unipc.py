"""UniPC (Wan's default sampler) against diffusers' ``UniPCMultistepScheduler``, step by step, and the
diffusers grids against the schedulers that build them."""

import math

import pytest
import torch

from dit.diffusion import DiffusionConfig, FlowMatching
from dit.sampling import sample, sampling_grid

diffusers = pytest.importorskip("diffusers")

# Wan2.1's scheduler_config.json (the keys that differ from UniPCMultistepScheduler's defaults)
WAN_UNIPC = dict(prediction_type="flow_prediction", use_flow_sigmas=True, solver_order=2, solver_type="bh2")


class Field:
    """A fixed nonlinear velocity field v(x, t) that records where it is evaluated."""

    def __init__(self, c: int = 4):
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(c, c, generator=g) / math.sqrt(c)
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.clone(), t.clone()))
        s = t.float().view(-1, 1, 1, 1, 1) / 1000
        return torch.tanh(torch.einsum("dc,bcthw->bdthw", self.w, x)) * (1 + s) + s * x


def _diffusers_unipc(field: Field, noise: torch.Tensor, steps: int, shift: float) -> torch.Tensor:
    sched = diffusers.UniPCMultistepScheduler(flow_shift=shift, **WAN_UNIPC)
    sched.set_timesteps(steps)
    sched.set_begin_index(0)  # as WanPipeline does
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(field(x, t.expand(x.shape[0])), t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("steps,shift", [(1, 3.0), (2, 1.0), (7, 3.0), (12, 5.0)])
def test_unipc_equals_diffusers_step_by_step(steps, shift):
    """Every network call (its input latents and its integer timestep) and the result agree with
    diffusers' scheduler driven the way ``WanPipeline`` drives it, on the same model function."""
    noise = torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    ref_field, our_field = Field(), Field()
    ref = _diffusers_unipc(ref_field, noise, steps, shift)
    obj = FlowMatching(DiffusionConfig(shift=shift))
    ours = sample(
        our_field, obj, noise.shape, {}, sampler="unipc", steps=steps, grid="diffusers", noise=noise
    )
    assert len(our_field.calls) == len(ref_field.calls) == steps
    for (x_ours, t_ours), (x_ref, t_ref) in zip(our_field.calls, ref_field.calls, strict=True):
        assert torch.equal(t_ours, t_ref.float())  # int(1000 σ): 999 first, not 1000
        torch.testing.assert_close(x_ours, x_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (4, 3.0), (30, 5.0)])
def test_diffusers_grids_equal_the_schedulers(steps, shift):
    """``grid=diffusers`` is the σ list each scheduler builds (FlowMatchEuler for euler, UniPC for
    unipc), bit for bit in float32, and the network times they tell the model."""
    obj = FlowMatching(DiffusionConfig(shift=shift))
    euler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    euler.set_timesteps(steps)
    times, net = sampling_grid(obj, steps, "euler", "diffusers")
    assert net is None and torch.equal(times.float(), euler.sigmas)
    assert torch.equal(obj.model_time(times[:-1].float()), euler.timesteps)
    unipc = diffusers.UniPCMultistepScheduler(flow_shift=shift, **WAN_UNIPC)
    unipc.set_timesteps(steps)
    times, net = sampling_grid(obj, steps, "unipc", "diffusers")
    assert torch.equal(times.float(), unipc.sigmas)
    assert [net[t] for t in times[:-1].tolist()] == unipc.timesteps.float().tolist()
    uniform, none = sampling_grid(obj, steps, "euler")
    assert none is None and torch.equal(uniform, obj.sampling_times(steps))  # the default is today's


def _gaussian_velocity(s: float):
    """The exact flow velocity of data x0 ~ N(0, s²): v = (x - E[x0 | x_t]) / t."""

    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.float().view(-1, 1, 1, 1, 1) / 1000
        x0 = (1 - tt) * s**2 / ((1 - tt) ** 2 * s**2 + tt**2) * x
        return (x - x0) / tt

    return v


def test_unipc_on_our_grid_starts_at_pure_noise_and_is_second_order():
    """On the uniform grid (from t = 1 exactly, log-SNR -inf: diffusers nudges it, ours takes the limit)
    UniPC solves the Gaussian flow ODE, whose end point is known (x0 = s · noise), finitely, more than
    ten times closer than Euler at 8 steps, and its error falls about 4× per doubling of the steps
    (Euler's about 2×)."""
    s = 0.5
    noise = torch.randn(4, 2, 2, 3, 3, generator=torch.Generator().manual_seed(2))
    obj = FlowMatching(DiffusionConfig(shift=1.0))
    err = {}
    for name, steps in (("euler", 8), ("unipc", 8), ("unipc", 32), ("unipc", 64)):
        out = sample(_gaussian_velocity(s), obj, noise.shape, {}, sampler=name, steps=steps, noise=noise)
        assert torch.isfinite(out).all()
        err[name, steps] = float((out - s * noise).abs().max())
    assert err["unipc", 8] < err["euler", 8] / 10
    assert err["unipc", 64] < err["unipc", 32] / 3
