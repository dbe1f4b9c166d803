"""Samplers, classifier-free guidance, image-to-video and video-to-video.

Every sampler walks a decreasing grid of times (:func:`sampling_grid`: ours, or the one a diffusers
scheduler builds) and asks a ``predict(x, t)`` function for the network's (guided) prediction. DDIM,
DPM-Solver++ and UniPC only use the objective's ``alpha_sigma`` and ``to_x0_eps``, so they run on flow
and DDPM alike; Euler and Heun integrate the flow ODE ``dx/dt = v`` directly. Everything random comes
from one seeded generator. A two-expert model (Wan2.2-A14B) is an :class:`Experts`: the predictor
switches from the high-noise to the low-noise network below the boundary, as ``WanPipeline`` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dit.diffusion import FlowMatching, Objective, flow_shift

Predict = Callable[[Tensor, float], Tensor]
Project = Callable[[Tensor], Tensor]


def _identity(x: Tensor) -> Tensor:
    return x


def _cat_kwargs(a: dict, b: dict) -> dict | None:
    """Batch two kwarg dicts along dim 0, or None if their tensors do not line up."""
    if a.keys() != b.keys():
        return None
    out = {}
    for k in a:
        if a[k] is None and b[k] is None:
            out[k] = None
        elif isinstance(a[k], Tensor) and isinstance(b[k], Tensor) and a[k].shape == b[k].shape:
            out[k] = torch.cat([a[k], b[k]])
        else:
            return None
    return out


@dataclass
class Experts:
    """Two denoisers that split the noise levels (Wan2.2-A14B): ``high`` where the network time is at
    least ``boundary`` × 1000 (``WanPipeline``: ``t >= boundary_ratio * num_train_timesteps``), ``low``
    below it. Pass one wherever a sampler takes a model."""

    high: Callable
    """The high-noise expert (diffusers' ``transformer``)."""
    low: Callable
    """The low-noise expert (diffusers' ``transformer_2``)."""
    boundary: float
    """Share of the time axis above which ``high`` denoises (Wan2.2-A14B: 0.875)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.boundary <= 1.0:
            raise ValueError(f"expert boundary={self.boundary}: expected a value in [0, 1]")

    def at(self, model_time: Tensor) -> Callable:
        """The expert for a step whose network time (one float32 value, 0…1000) is ``model_time``."""
        return self.high if bool(model_time >= self.boundary * 1000) else self.low


def make_predictor(
    model,
    objective: Objective,
    model_kwargs: dict,
    uncond_kwargs: dict | None = None,
    cfg_scale: float = 1.0,
    cond_frames: Tensor | None = None,
    dtype: torch.dtype | None = None,
    model_times: dict[float, float] | None = None,
) -> Predict:
    """Wrap a network as ``predict(x, t)`` with classifier-free guidance.

    Args:
        model: called as ``model(x, model_time, **kwargs)``, or an :class:`Experts` pair (each step
            runs the expert its time belongs to).
        objective: gives the network's time scale.
        model_kwargs: the model's conditional keyword arguments (``context``/``context_mask``,
            ``labels``, ``cond`` channels, ``fps``).
        uncond_kwargs: the same keys with the null condition (empty-caption states, or the null class
            ``num_classes``); required when ``cfg_scale != 1``.
        cfg_scale: guidance w: ``pred_u + w · (pred_c - pred_u)`` of the two predictions; 1 is unguided.
        cond_frames: B×T bool frames held clean (told t = 0 through per-frame timesteps).
        dtype: the network's input dtype (e.g. bf16); the sampler's state and the returned
            prediction stay fp32 so the ODE does not accumulate in low precision.
        model_times: the network time of grid times whose time is not ``objective.model_time(t)``
            (diffusers' UniPC tells the network ``int(1000·t)``; see :func:`sampling_grid`).
    """
    if cfg_scale != 1.0 and uncond_kwargs is None:
        raise ValueError("cfg_scale != 1 needs the unconditional inputs (null context or null class)")
    both = _cat_kwargs(model_kwargs, uncond_kwargs) if uncond_kwargs is not None else None

    def predict(x: Tensor, t: float) -> Tensor:
        c = x.shape[1]
        x = x.to(dtype) if dtype is not None else x
        if model_times is not None and t in model_times:
            net_t = torch.full((x.shape[0],), model_times[t], device=x.device)
        else:
            net_t = objective.model_time(torch.full((x.shape[0],), float(t), device=x.device))
        net = model.at(net_t[0]) if isinstance(model, Experts) else model
        if cond_frames is not None:
            net_t = torch.where(cond_frames, torch.zeros_like(net_t[:, None]), net_t[:, None])  # B, T

        def run(x_in: Tensor, t_in: Tensor, kwargs: dict) -> Tensor:
            return net(x_in, t_in, **kwargs)[:, :c].float()  # learned-variance channels unused here

        if cfg_scale == 1.0:
            return run(x, net_t, model_kwargs)
        if both is not None:  # one batched call for both branches
            out_c, out_u = run(torch.cat([x, x]), torch.cat([net_t, net_t]), both).chunk(2)
        else:
            out_c, out_u = run(x, net_t, model_kwargs), run(x, net_t, uncond_kwargs)
        return out_u + cfg_scale * (out_c - out_u)

    return predict


def _require_flow(objective: Objective, name: str) -> None:
    if not isinstance(objective, FlowMatching):
        raise ValueError(f"sampler {name!r} integrates the flow ODE; use 'ddim' or 'dpm++2m' for DDPM")


def euler(
    predict: Predict, objective: Objective, x: Tensor, times: Tensor, project: Project = _identity
) -> Tensor:
    """Flow Euler: x ← x + (t_next - t) · v."""
    _require_flow(objective, "euler")
    for t, t_next in zip(times[:-1].tolist(), times[1:].tolist(), strict=True):
        x = project(x + (t_next - t) * predict(x, t))
    return x


def heun(
    predict: Predict, objective: Objective, x: Tensor, times: Tensor, project: Project = _identity
) -> Tensor:
    """Flow Heun (2nd order): average the slopes at both ends; a plain Euler step into t = 0."""
    _require_flow(objective, "heun")
    for t, t_next in zip(times[:-1].tolist(), times[1:].tolist(), strict=True):
        v = predict(x, t)
        x_euler = project(x + (t_next - t) * v)
        if t_next == 0:
            x = x_euler
        else:
            x = project(x + (t_next - t) * 0.5 * (v + predict(x_euler, t_next)))
    return x


def _alpha_sigma(objective: Objective, t: float) -> tuple[float, float]:
    a, s = objective.alpha_sigma(torch.tensor([t], dtype=torch.float64))
    return float(a), float(s)


def ddim(
    predict: Predict, objective: Objective, x: Tensor, times: Tensor, project: Project = _identity
) -> Tensor:
    """Deterministic DDIM (η = 0): x_next = α_next · x̂0 + σ_next · ε̂. On the flow path this equals Euler."""
    for t, t_next in zip(times[:-1].tolist(), times[1:].tolist(), strict=True):
        x0, eps = objective.to_x0_eps(predict(x, t), x, torch.full((x.shape[0],), t, device=x.device))
        a_next, s_next = _alpha_sigma(objective, t_next)
        x = project(a_next * x0 + s_next * eps)
    return x


def dpmpp_2m(
    predict: Predict, objective: Objective, x: Tensor, times: Tensor, project: Project = _identity
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), data prediction, multistep.

    With λ = log(α/σ) and h = λ_next - λ: x_next = (σ_next/σ)·x - α_next·(e^{-h} - 1)·D, where D is x̂0
    (first order) or the 2nd-order extrapolation from the previous x̂0. e^{-h} is computed as a ratio so a
    start at α = 0 (flow t = 1, zero-terminal-SNR DDPM) is exact; the step after it and the final step
    into σ = 0 are first order.
    """
    x0_prev, h_prev = None, math.inf
    for t, t_next in zip(times[:-1].tolist(), times[1:].tolist(), strict=True):
        x0, _ = objective.to_x0_eps(predict(x, t), x, torch.full((x.shape[0],), t, device=x.device))
        a, s = _alpha_sigma(objective, t)
        a_next, s_next = _alpha_sigma(objective, t_next)
        if s_next == 0:
            x = project(a_next * x0)
            continue
        exp_neg_h = (a * s_next) / (s * a_next)
        h = math.log(a_next / s_next) - (math.log(a / s) if a > 0 else -math.inf)
        d = x0
        if x0_prev is not None and math.isfinite(h_prev) and math.isfinite(h):
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = project((s_next / s) * x - a_next * (exp_neg_h - 1) * d)
        x0_prev, h_prev = x0, h
    return x


def _lam(a: float, s: float) -> float:
    """λ = log(α/σ), ±inf at the ends (α = 0: pure noise; σ = 0: clean)."""
    if a == 0:
        return -math.inf
    return math.inf if s == 0 else math.log(a) - math.log(s)


def _bh2(h: float) -> tuple[float, float, float, float]:
    """UniPC-bh2's coefficients of a step of log-SNR length ``h`` (data prediction): (e^{-h} - 1,
    B(h) = e^{-h} - 1, b_1, b_2), the b_k of diffusers' ``multistep_uni_*_bh_update`` (finite limits at
    h = inf, a step from pure noise or into the clean end)."""
    hh = -h
    phi_1 = math.expm1(hh)
    phi_k = phi_1 / hh - 1
    b1 = phi_k / phi_1
    b2 = (phi_k / hh - 0.5) * 2 / phi_1
    return phi_1, phi_1, b1, b2


def unipc(
    predict: Predict, objective: Objective, x: Tensor, times: Tensor, project: Project = _identity
) -> Tensor:
    """UniPC (Zhao et al. 2023) as diffusers' ``UniPCMultistepScheduler`` runs it with its defaults (Wan's
    sampler): data prediction, B(h) = e^{-h} - 1 ("bh2"), order 2, first order in the first and last
    step, and the corrector UniC after every step, with the model output at the new point (no extra
    network call). With λ = log(α/σ), h = λ_next - λ and D_i the x̂0 of the points: the predictor is
    x_next = (σ_next/σ)·x - α_next·(e^{-h} - 1)·(D_0 + ½·(D_0 - D_-1)/r), r = (λ_-1 - λ)/h. The network
    is evaluated at the uncorrected predictor output, as diffusers does.
    """
    ts = times.tolist()
    n = len(ts) - 1
    lam = [_lam(*_alpha_sigma(objective, t)) for t in ts]
    d: list[Tensor] = []  # x̂0 at the grid points so far
    x_last, order_last = None, 0
    for i in range(n):
        x0, _ = objective.to_x0_eps(predict(x, ts[i]), x, torch.full((x.shape[0],), ts[i], device=x.device))
        if x_last is not None:  # UniC: correct x (reached from x_last) with the model output at it
            x = project(_unic(objective, x_last, d, x0, ts, lam, i, order_last))
        d = (d + [x0])[-2:]
        order = 1 if i in (0, n - 1) else 2  # warm-up, and diffusers' lower_order_final
        x_last, order_last = x, order
        a_next, s_next = _alpha_sigma(objective, ts[i + 1])
        _, s = _alpha_sigma(objective, ts[i])
        h = lam[i + 1] - lam[i]
        phi_1, b_h, _, _ = _bh2(h)
        x = (s_next / s) * x - a_next * phi_1 * d[-1]
        if order == 2:
            r = (lam[i - 1] - lam[i]) / h
            x = x - a_next * b_h * 0.5 * (d[-2] - d[-1]) / r
        x = project(x)
    return x


def _unic(
    objective: Objective, x: Tensor, d: list[Tensor], x0_t: Tensor, ts: list, lam: list, i: int, order: int
) -> Tensor:
    """UniC of the step ``ts[i-1] → ts[i]`` taken from ``x`` at order ``order``: ``d`` holds x̂0 at
    ``ts[i-2], ts[i-1]`` (the last one or two), ``x0_t`` at ``ts[i]``."""
    a_t, s_t = _alpha_sigma(objective, ts[i])
    _, s_0 = _alpha_sigma(objective, ts[i - 1])
    h = lam[i] - lam[i - 1]
    phi_1, b_h, b1, b2 = _bh2(h)
    out = (s_t / s_0) * x - a_t * phi_1 * d[-1]
    if order == 1:
        return out - a_t * b_h * 0.5 * (x0_t - d[-1])
    r = (lam[i - 2] - lam[i - 1]) / h
    # R·ρ = b with R = [[1, 1], [r, 1]] (diffusers solves it with torch.linalg.solve)
    rho_0 = (b2 - b1) / (r - 1)
    rho_1 = b1 - rho_0
    return out - a_t * b_h * (rho_0 * (d[-2] - d[-1]) / r + rho_1 * (x0_t - d[-1]))


SAMPLERS = {"euler": euler, "heun": heun, "ddim": ddim, "dpm++2m": dpmpp_2m, "unipc": unipc}
# the one list of sampler names: ``sample.sampler``'s check and ``launch.sample --sampler`` read it
SAMPLER_NAMES = tuple(SAMPLERS)


GRIDS = ("uniform", "diffusers")
"""Sampling grids: ``uniform`` (ours: :meth:`Objective.sampling_times`) or ``diffusers`` (the grid the
diffusers scheduler of the sampler builds, see :func:`sampling_grid`)."""

TRAIN_TIMESTEPS = 1000
"""diffusers' ``num_train_timesteps`` of the flow schedulers (Wan's, LTX's)."""


def sampling_grid(
    objective: Objective, steps: int, sampler: str, grid: str = "uniform", tokens: int | None = None
) -> tuple[Tensor, dict[float, float] | None]:
    """The ``steps + 1`` decreasing times a sampler walks (float64) and, where the network is told
    another time than ``objective.model_time(t)``, a map from grid time to network time.

    Args:
        objective: the model's objective (its shift).
        steps: sampler steps.
        sampler: the sampler's name: ``grid=diffusers`` builds ``UniPCMultistepScheduler``'s grid
            (``use_flow_sigmas``) for ``unipc``, ``FlowMatchEulerDiscreteScheduler``'s for the others.
        grid: one of :data:`GRIDS`. ``uniform``: t_i = shift(1 - i/steps), ending at 0 (today's).
            ``diffusers``, flow only, as ``WanPipeline`` with ``flow_shift`` = our shift: Euler's
            σ_i = shift(linspace(1, shift(1/1000), steps)) (its σ_min is shifted twice, as diffusers
            does) then 0, the network told 1000·σ; UniPC's σ_i = shift(linspace(1, 1/1000, steps + 1))
            without the last, σ_0 lowered by 1e-6 from 1, then 0, the network told ``int(1000·σ)``. The
            times are rounded to float32 as diffusers keeps them.
        tokens: sequence length, for a token-dependent shift.
    """
    if grid == "uniform":
        return objective.sampling_times(steps, tokens), None
    if grid != "diffusers":
        raise ValueError(f"sampling grid {grid!r}: expected one of {', '.join(GRIDS)}")
    if not isinstance(objective, FlowMatching):
        raise ValueError("sampling grid 'diffusers' reproduces the flow schedulers; DDPM has its own")
    shift, n = objective.shift_for(tokens), TRAIN_TIMESTEPS
    f64 = torch.float64
    if sampler == "unipc":
        # numpy's linspace, as diffusers: torch's may differ in the last bit, and int() below would show it
        sigmas = flow_shift(torch.from_numpy(np.linspace(1, 1 / n, steps + 1)[:-1].copy()), shift)
        if abs(float(sigmas[0]) - 1) < 1e-6:
            sigmas[0] -= 1e-6  # diffusers: keeps log(α) finite in the first update
        times = torch.cat([sigmas.float().to(f64), sigmas.new_zeros(1)])
        net = (sigmas * n).long().tolist()  # diffusers casts the timesteps to int64
        return times, {float(t): float(v) for t, v in zip(times[:-1].tolist(), net, strict=True)}
    # FlowMatchEulerDiscreteScheduler: σ_min/σ_max are its 1000 training sigmas' ends (float32, shifted)
    train = flow_shift(torch.arange(n, 0, -1, dtype=torch.float32) / n, shift)
    hi, lo = float(train[0]), float(train[-1])
    sigmas = flow_shift(torch.from_numpy(np.linspace(hi * n, lo * n, steps)) / n, shift)
    return torch.cat([sigmas.float().to(f64), sigmas.new_zeros(1)]), None


def i2v_condition(first_frame: Tensor, frames: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs that pin the first latent frame for image-to-video.

    Args:
        first_frame: B×C×H×W (or B×C×1×H×W) latent of the given image.
        frames: latent frames T of the clip.

    Returns:
        ``clean``: B×C×T×H×W with the first frame set, zeros elsewhere;
        ``cond_frames``: B×T bool, True on the first frame;
        ``cond``: B×(C+1)×T×H×W channels for a model with ``cond_channels = C + 1`` (the clean
        latent and a 0/1 mask channel, Wan-I2V style).
    """
    if first_frame.ndim == 4:
        first_frame = first_frame[:, :, None]  # B, C, 1, H, W
    b, c, _, h, w = first_frame.shape
    clean = first_frame.new_zeros(b, c, frames, h, w)
    clean[:, :, :1] = first_frame
    cond_frames = torch.zeros(b, frames, dtype=torch.bool, device=first_frame.device)
    cond_frames[:, 0] = True
    mask = cond_frames[:, None, :, None, None].to(clean.dtype).expand(b, 1, frames, h, w)
    return clean, cond_frames, torch.cat([clean, mask], dim=1)


@torch.no_grad()
def sample(
    model,
    objective: Objective,
    shape: tuple[int, ...],
    model_kwargs: dict,
    uncond_kwargs: dict | None = None,
    *,
    sampler: str = "euler",
    steps: int = 50,
    cfg_scale: float = 1.0,
    first_frame: Tensor | None = None,
    first_frame_as: str = "frames",
    video: Tensor | None = None,
    strength: float = 1.0,
    tokens: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    grid: str = "uniform",
    noise: Tensor | None = None,
) -> Tensor:
    """Generate latents: text/class-to-video, image-to-video or video-to-video.

    Args:
        model, model_kwargs, uncond_kwargs, cfg_scale: see :func:`make_predictor` (``model`` may be
            an :class:`Experts` pair).
        objective: the objective the model was trained with.
        shape: B×C×T×H×W of the latents to generate.
        sampler: one of :data:`SAMPLER_NAMES`: ``euler`` | ``heun`` (flow) | ``ddim`` | ``dpm++2m`` |
            ``unipc``.
        steps: network evaluations per sample (Heun uses about twice as many).
        first_frame: B×C×H×W latent to start the clip from (image-to-video).
        first_frame_as: ``frames`` (clean first frame with per-frame t = 0), ``cond`` (as ``cond``
            channels, for a model trained with ``cond_channels = C + 1``) or ``both``.
        video: B×C×T×H×W input latents for video-to-video; noised to ``strength`` ∈ [0, 1] of the
            sampling grid (0 returns the input, 1 ignores it), then denoised.
        tokens: sequence length, for a token-dependent flow shift.
        seed: seeds all randomness; the same seed gives the same output.
        dtype: the network's input dtype; the sampler integrates in fp32 and returns ``dtype``.
        grid: one of :data:`GRIDS` (:func:`sampling_grid`); ``diffusers`` reproduces a diffusers
            pipeline's steps.
        noise: the initial noise (``shape``), e.g. a reference pipeline's ``latents``; None draws it
            from ``seed``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r}: expected one of {', '.join(SAMPLER_NAMES)}")
    gen = torch.Generator(device=device).manual_seed(seed)
    if noise is None:
        noise = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    elif tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise of shape {tuple(noise.shape)} for latents of shape {tuple(shape)}")
    noise = noise.to(device, torch.float32)
    times, model_times = sampling_grid(objective, steps, sampler, grid, tokens)
    x = noise
    if video is not None:
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength={strength}: expected a value in [0, 1]")
        keep = round(steps * strength)
        times = times[steps - keep :]
        t_start = times[:1].to(device=device, dtype=torch.float32).expand(shape[0])  # the grid is float64
        x = objective.add_noise(video.to(device, torch.float32), noise, t_start)
    project, cond_frames, model_kwargs = _identity, None, dict(model_kwargs)
    if first_frame is not None:
        if first_frame_as not in ("frames", "cond", "both"):
            raise ValueError(f"first_frame_as={first_frame_as!r}: frames|cond|both")
        clean, mask, channels = i2v_condition(first_frame.to(device, torch.float32), shape[2])
        if first_frame_as in ("cond", "both"):
            channels = channels.to(dtype)
            model_kwargs["cond"] = channels
            if uncond_kwargs is not None:
                uncond_kwargs = {**uncond_kwargs, "cond": channels}  # the image conditions both CFG branches
        if first_frame_as in ("frames", "both"):
            cond_frames = mask
            keep_mask = mask[:, None, :, None, None]

            def project(z: Tensor) -> Tensor:
                return torch.where(keep_mask, clean, z)

            x = project(x)
    predict = make_predictor(
        model, objective, model_kwargs, uncond_kwargs, cfg_scale, cond_frames, dtype, model_times
    )
    return SAMPLERS[sampler](predict, objective, x, times, project).to(dtype)
