"""Samplers, classifier-free guidance, image-to-video and video-to-video.

Every sampler walks a decreasing grid of times from :meth:`Objective.sampling_times` and asks a
``predict(x, t)`` function for the network's (guided) prediction. DDIM and DPM-Solver++ only use the
objective's ``alpha_sigma`` and ``to_x0_eps``, so they run on flow and DDPM alike; Euler and Heun
integrate the flow ODE ``dx/dt = v`` directly. Everything random comes from one seeded generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from dit.diffusion import FlowMatching, Objective

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


def make_predictor(
    model,
    objective: Objective,
    model_kwargs: dict,
    uncond_kwargs: dict | None = None,
    cfg_scale: float = 1.0,
    cond_frames: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> Predict:
    """Wrap a network as ``predict(x, t)`` with classifier-free guidance.

    Args:
        model: called as ``model(x, model_time, **kwargs)``.
        objective: gives the network's time scale.
        model_kwargs: the model's conditional keyword arguments (``context``/``context_mask``,
            ``labels``, ``cond`` channels, ``fps``).
        uncond_kwargs: the same keys with the null condition (empty-caption states, or the null class
            ``num_classes``); required when ``cfg_scale != 1``.
        cfg_scale: guidance w: ``pred_u + w · (pred_c - pred_u)`` of the two predictions; 1 is unguided.
        cond_frames: B×T bool frames held clean (told t = 0 through per-frame timesteps).
        dtype: the network's input dtype (e.g. bf16); the sampler's state and the returned
            prediction stay fp32 so the ODE does not accumulate in low precision.
    """
    if cfg_scale != 1.0 and uncond_kwargs is None:
        raise ValueError("cfg_scale != 1 needs the unconditional inputs (null context or null class)")
    both = _cat_kwargs(model_kwargs, uncond_kwargs) if uncond_kwargs is not None else None

    def predict(x: Tensor, t: float) -> Tensor:
        c = x.shape[1]
        x = x.to(dtype) if dtype is not None else x
        net_t = objective.model_time(torch.full((x.shape[0],), float(t), device=x.device))
        if cond_frames is not None:
            net_t = torch.where(cond_frames, torch.zeros_like(net_t[:, None]), net_t[:, None])  # B, T

        def run(x_in: Tensor, t_in: Tensor, kwargs: dict) -> Tensor:
            return model(x_in, t_in, **kwargs)[:, :c].float()  # learned-variance channels unused here

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


SAMPLERS = {"euler": euler, "heun": heun, "ddim": ddim, "dpm++2m": dpmpp_2m}
# the one list of sampler names: ``sample.sampler``'s check and ``launch.sample --sampler`` read it
SAMPLER_NAMES = tuple(SAMPLERS)


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
) -> Tensor:
    """Generate latents: text/class-to-video, image-to-video or video-to-video.

    Args:
        model, model_kwargs, uncond_kwargs, cfg_scale: see :func:`make_predictor`.
        objective: the objective the model was trained with.
        shape: B×C×T×H×W of the latents to generate.
        sampler: one of :data:`SAMPLER_NAMES`: ``euler`` | ``heun`` (flow) | ``ddim`` | ``dpm++2m``.
        steps: network evaluations per sample (Heun uses about twice as many).
        first_frame: B×C×H×W latent to start the clip from (image-to-video).
        first_frame_as: ``frames`` (clean first frame with per-frame t = 0), ``cond`` (as ``cond``
            channels, for a model trained with ``cond_channels = C + 1``) or ``both``.
        video: B×C×T×H×W input latents for video-to-video; noised to ``strength`` ∈ [0, 1] of the
            sampling grid (0 returns the input, 1 ignores it), then denoised.
        tokens: sequence length, for a token-dependent flow shift.
        seed: seeds all randomness; the same seed gives the same output.
        dtype: the network's input dtype; the sampler integrates in fp32 and returns ``dtype``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r}: expected one of {', '.join(SAMPLER_NAMES)}")
    gen = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    times = objective.sampling_times(steps, tokens)
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
    predict = make_predictor(model, objective, model_kwargs, uncond_kwargs, cfg_scale, cond_frames, dtype)
    return SAMPLERS[sampler](predict, objective, x, times, project).to(dtype)
