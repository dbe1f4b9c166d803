"""Diffusion objectives: rectified flow and DDPM behind one interface.

Both describe the noisy latent as ``x_t = alpha(t) * x0 + sigma(t) * noise`` and differ in the time
axis, the schedule and the network's target:

- ``FlowMatching``: t ∈ [0, 1] continuous, alpha = 1 - t, sigma = t (t = 1 is pure noise); the
  network predicts the velocity ``noise - x0`` (rectified flow, SD3/Wan conventions).
- ``DDPM``: t ∈ {0 … N-1} integer, alpha = sqrt(ᾱ_t), sigma = sqrt(1 - ᾱ_t); the network predicts ε
  or v = alpha·ε - sigma·x0. ``t = -1`` stands for the clean end of a sampling grid (alpha 1,
  sigma 0) and is never fed to the network.

The network always sees time on a 0…1000 scale (:meth:`Objective.model_time`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DiffusionConfig:
    """Training objective and noise schedule."""

    objective: str = "flow"
    """``flow`` (rectified flow, velocity target) or ``ddpm``."""
    timestep_sampling: str = "logit_normal"
    """Flow training times: ``uniform``, ``logit_normal`` (SD3) or ``mode`` (SD3's heavy-tailed)."""
    logit_mean: float = 0.0
    """Mean m of logit-normal sampling: t = sigmoid(m + s·n)."""
    logit_std: float = 1.0
    """Std s of logit-normal sampling."""
    mode_scale: float = 1.29
    """Scale of ``mode`` sampling (SD3 uses 1.29)."""
    shift: float = 1.0
    """Flow time shift α: t ← α·t / (1 + (α-1)·t); > 1 spends more time at high noise."""
    shift_base_tokens: int | None = None
    """If set, the shift depends on the sequence: α = shift·sqrt(tokens / shift_base_tokens), so
    longer or larger clips are noised harder (SD3's resolution-dependent shift)."""
    num_timesteps: int = 1000
    """DDPM: number of discrete steps N."""
    beta_schedule: str = "linear"
    """DDPM betas: ``linear`` (DDPM/DiT), ``scaled_linear`` (Stable Diffusion) or ``cosine``."""
    beta_start: float | None = None
    """First beta; ``None`` uses the schedule's default (1e-4 linear, 0.00085 scaled_linear)."""
    beta_end: float | None = None
    """Last beta; ``None`` uses the schedule's default (0.02 linear, 0.012 scaled_linear)."""
    prediction: str = "eps"
    """DDPM target: ``eps`` or ``v``."""
    zero_terminal_snr: bool = False
    """DDPM: rescale so ᾱ_{N-1} = 0 (Lin et al. 2024); requires ``prediction='v'``."""
    t_range: tuple[float, float] = (0.0, 1.0)
    """Flow: train only on times in [lo, hi] (after the shift), the share of the noise levels one expert
    of a mixture-of-experts model owns: Wan2.2-A14B's high-noise expert takes t ≥ its boundary 0.875,
    the low-noise expert the rest. (0, 1) is every time. Inside the range the times keep the configured
    distribution (``timestep_sampling`` and the shift, truncated to [lo, hi] and renormalised: drawn by
    inverting its CDF, one uniform draw per sample); the validation loss grid covers [lo, hi]."""


@dataclass
class LossOutput:
    loss: Tensor
    """Scalar: mean over the frames that count."""
    per_frame: Tensor
    """B×T loss of each frame (zero where masked)."""
    t: Tensor
    """B training times drawn (objective units)."""


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    """B (or B×T) → broadcastable against B×C×T×H×W."""
    return v[:, None, None, None, None] if v.ndim == 1 else v[:, None, :, None, None]


class Objective:
    """Shared loss; subclasses define times, schedule and target."""

    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg

    # -- to be defined by each objective -------------------------------------------------
    def sample_t(self, b: int, tokens: int | None, device, generator=None) -> Tensor:
        raise NotImplementedError

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def model_time(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError

    def to_x0_eps(self, pred: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Network prediction → (x0, noise) estimates."""
        raise NotImplementedError

    def sampling_times(self, steps: int, tokens: int | None = None) -> Tensor:
        """``steps + 1`` decreasing times from pure noise to the clean end."""
        raise NotImplementedError

    def extra_loss(self, out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor | None:
        """Per-element term for the learned-variance channels (B×C×T×H×W), or None."""
        return None

    # -- shared ------------------------------------------------------------------------------
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        alpha, sigma = self.alpha_sigma(t)
        return _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * noise

    def loss(
        self,
        model,
        x0: Tensor,
        model_kwargs: dict | None = None,
        *,
        cond_frames: Tensor | None = None,
        tokens: int | None = None,
        noise: Tensor | None = None,
        t: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        """The training loss for one batch.

        Args:
            model: called as ``model(x_t, model_time, **model_kwargs)``; returns C or 2·C channels
                (2·C: learned variance, used by DDPM's VLB term, ignored by flow).
            x0: clean latents B×C×T×H×W.
            model_kwargs: context, context_mask, labels, cond, fps …
            cond_frames: B×T bool: conditioning frames (e.g. the first frame for image-to-video). They
                stay clean, the network is told t = 0 for them (per-frame timesteps), and they are
                masked out of the loss.
            tokens: sequence length, for a token-dependent shift.
            noise, t: fixed noise / times (drawn with ``generator`` when None).
        """
        b, c, frames = x0.shape[:3]
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        if t is None:
            t = self.sample_t(b, tokens, x0.device, generator)
        x_t = self.add_noise(x0, noise, t)
        net_t = self.model_time(t)
        weight = torch.ones(b, frames, device=x0.device)
        if cond_frames is not None:
            keep = cond_frames[:, None, :, None, None]
            x_t = torch.where(keep, x0, x_t)
            net_t = torch.where(cond_frames, torch.zeros_like(net_t[:, None]), net_t[:, None])  # B, T
            weight = (~cond_frames).float()
        out = model(x_t, net_t, **(model_kwargs or {}))
        if out.shape[1] not in (c, 2 * c):
            raise ValueError(
                f"model returned {out.shape[1]} channels for {c}-channel latents (expected {c} or {2 * c})"
            )
        err = (out[:, :c].float() - self.target(x0, noise, t).float()) ** 2  # B, C, T, H, W
        extra = self.extra_loss(out, x0, x_t, t) if out.shape[1] == 2 * c else None
        if extra is not None:
            err = err + extra
        per_frame = err.mean(dim=(1, 3, 4)) * weight  # B, T
        loss = per_frame.sum() / weight.sum().clamp(min=1)
        return LossOutput(loss=loss, per_frame=per_frame, t=t)


def flow_shift(t: Tensor, alpha: float) -> Tensor:
    """The flow time shift t ← α·t / (1 + (α-1)·t) (SD3's, Wan's ``flow_shift``)."""
    return alpha * t / (1 + (alpha - 1) * t)


_shift = flow_shift


class FlowMatching(Objective):
    """Rectified flow: x_t = (1-t)·x0 + t·noise, velocity target noise - x0."""

    def shift_for(self, tokens: int | None) -> float:
        cfg = self.cfg
        if cfg.shift_base_tokens is None:
            return cfg.shift
        if tokens is None:
            raise ValueError("DiffusionConfig.shift_base_tokens is set: pass tokens= (the sequence length)")
        return cfg.shift * math.sqrt(tokens / cfg.shift_base_tokens)

    def sample_t(self, b: int, tokens: int | None, device, generator=None) -> Tensor:
        cfg = self.cfg
        if tuple(cfg.t_range) != (0.0, 1.0):
            return self._sample_t_in_range(b, tokens, device, generator)
        u = torch.rand(b, device=device, generator=generator)
        if cfg.timestep_sampling == "uniform":
            t = u
        elif cfg.timestep_sampling == "logit_normal":
            n = torch.randn(b, device=device, generator=generator)
            t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * n)
        elif cfg.timestep_sampling == "mode":
            t = 1 - u - cfg.mode_scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
        else:
            raise ValueError(
                f"DiffusionConfig.timestep_sampling={cfg.timestep_sampling!r}: uniform|logit_normal|mode"
            )
        return _shift(t, self.shift_for(tokens))

    def _time_of_quantile(self, u: Tensor, shift: float) -> Tensor:
        """The training time at quantile ``u`` of the configured distribution (float64): monotone in
        ``u``, increasing except for ``mode``, whose formula already maps u to t decreasingly."""
        cfg = self.cfg
        if cfg.timestep_sampling == "uniform":
            t = u
        elif cfg.timestep_sampling == "logit_normal":
            t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.special.ndtri(u))
        elif cfg.timestep_sampling == "mode":
            t = 1 - u - cfg.mode_scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
        else:
            raise ValueError(
                f"DiffusionConfig.timestep_sampling={cfg.timestep_sampling!r}: uniform|logit_normal|mode"
            )
        return _shift(t, shift)

    def _sample_t_in_range(self, b: int, tokens: int | None, device, generator=None) -> Tensor:
        """Times of the configured distribution conditioned on ``t_range``: the quantiles whose times
        bound the range are found by bisection, then one uniform draw between them per sample."""
        cfg = self.cfg
        lo, hi = (float(v) for v in cfg.t_range)
        if cfg.timestep_sampling == "mode" and not -1 <= cfg.mode_scale <= 1 / (math.pi / 2 - 1):
            raise ValueError(
                f"DiffusionConfig.mode_scale={cfg.mode_scale}: with t_range the mode density must be "
                "monotone in its quantile (mode_scale in [-1, 1.75])"
            )
        shift = self.shift_for(tokens)
        sign = -1.0 if cfg.timestep_sampling == "mode" else 1.0  # make the quantile map increasing

        def quantile_of(t: float) -> float:
            a, z = torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)
            for _ in range(60):  # bisection to float64 resolution
                mid = (a + z) / 2
                if sign * float(self._time_of_quantile(mid, shift)) < sign * t:
                    a = mid
                else:
                    z = mid
            return float((a + z) / 2)

        q_lo, q_hi = sorted((quantile_of(lo), quantile_of(hi)))
        u = q_lo + (q_hi - q_lo) * torch.rand(b, device=device, generator=generator, dtype=torch.float64)
        return self._time_of_quantile(u, shift).clamp(lo, hi).float()

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return 1 - t, t

    def model_time(self, t: Tensor) -> Tensor:
        return t * 1000

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return noise - x0

    def to_x0_eps(self, pred: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        tb = _bcast(t, x_t)
        return x_t - tb * pred, x_t + (1 - tb) * pred

    def sampling_times(self, steps: int, tokens: int | None = None) -> Tensor:
        return _shift(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), self.shift_for(tokens))


def make_betas(cfg: DiffusionConfig) -> Tensor:
    """β_1…β_N in float64 for the configured schedule (before zero-terminal-SNR rescaling)."""
    n = cfg.num_timesteps
    if cfg.beta_schedule == "linear":
        return torch.linspace(cfg.beta_start or 1e-4, cfg.beta_end or 0.02, n, dtype=torch.float64)
    if cfg.beta_schedule == "scaled_linear":
        lo, hi = math.sqrt(cfg.beta_start or 0.00085), math.sqrt(cfg.beta_end or 0.012)
        return torch.linspace(lo, hi, n, dtype=torch.float64) ** 2
    if cfg.beta_schedule == "cosine":
        # Nichol & Dhariwal 2021, with s = 0.008 and betas clipped at 0.999.
        steps = torch.arange(n + 1, dtype=torch.float64) / n
        abar = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ValueError(f"DiffusionConfig.beta_schedule={cfg.beta_schedule!r}: linear|scaled_linear|cosine")


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Shift and scale sqrt(ᾱ) so the last step has zero SNR and the first is unchanged."""
    s = alphas_cumprod.sqrt()
    first, last = s[0].clone(), s[-1].clone()
    s = (s - last) * first / (first - last)
    return s**2


class DDPM(Objective):
    """Discrete-time DDPM with ε or v prediction."""

    def __init__(self, cfg: DiffusionConfig):
        super().__init__(cfg)
        if cfg.prediction not in ("eps", "v"):
            raise ValueError(f"DiffusionConfig.prediction={cfg.prediction!r}: eps|v")
        if tuple(cfg.t_range) != (0.0, 1.0):
            raise ValueError(f"diffusion.t_range={list(cfg.t_range)} applies to objective=flow only")
        if cfg.zero_terminal_snr and cfg.prediction != "v":
            raise ValueError(
                "DiffusionConfig.zero_terminal_snr needs prediction='v' (ε is undefined at zero SNR)"
            )
        abar = torch.cumprod(1 - make_betas(cfg), dim=0)
        if cfg.zero_terminal_snr:
            abar = rescale_zero_terminal_snr(abar)
        self.alphas_cumprod = abar  # float64, N
        self.betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
        # index t + 1: position 0 is the clean end (t = -1)
        self._abar_ext = torch.cat([abar.new_ones(1), abar])

    def sample_t(self, b: int, tokens: int | None, device, generator=None) -> Tensor:
        return torch.randint(0, self.cfg.num_timesteps, (b,), device=device, generator=generator)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        abar = self._abar_ext.to(t.device)[t.long() + 1].float()
        return abar.sqrt(), (1 - abar).sqrt()

    def model_time(self, t: Tensor) -> Tensor:
        return t.float() * (1000 / self.cfg.num_timesteps)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        if self.cfg.prediction == "eps":
            return noise
        alpha, sigma = self.alpha_sigma(t)
        return _bcast(alpha, x0) * noise - _bcast(sigma, x0) * x0

    def to_x0_eps(self, pred: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        alpha, sigma = (_bcast(v, x_t) for v in self.alpha_sigma(t))
        if self.cfg.prediction == "eps":
            return (x_t - sigma * pred) / alpha, pred
        return alpha * x_t - sigma * pred, sigma * x_t + alpha * pred

    def sampling_times(self, steps: int, tokens: int | None = None) -> Tensor:
        # "trailing" spacing (Lin et al. 2024): always starts at the last, noisiest step.
        n = self.cfg.num_timesteps
        if not 1 <= steps <= n:
            raise ValueError(f"steps={steps}: a DDPM grid has 1 to num_timesteps={n} steps")
        t = torch.round(torch.arange(n, 0, -n / steps, dtype=torch.float64)) - 1
        return torch.cat([t, t.new_tensor([-1.0])])

    def extra_loss(self, out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Improved-DDPM VLB term for a learned variance (DiT's hybrid loss), mean from a detached
        prediction so only the variance channels learn from it. In bits per element."""
        c = x0.shape[1]
        t = t.long()
        abar = self.alphas_cumprod.to(x0.device)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        beta = self.betas.to(x0.device)
        post_var = beta * (1 - abar_prev) / (1 - abar)
        # the posterior variance is 0 at t = 0; use the next one for its log, as improved DDPM does
        post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        coef_x0 = beta * abar_prev.sqrt() / (1 - abar)
        coef_xt = (1 - abar_prev) * (1 - beta).sqrt() / (1 - abar)
        g = lambda v: _bcast(v[t].float(), x0)  # noqa: E731
        x0_hat, _ = self.to_x0_eps(out[:, :c].detach().float(), x_t.float(), t)
        mean_p = g(coef_x0) * x0_hat + g(coef_xt) * x_t.float()
        mean_q = g(coef_x0) * x0.float() + g(coef_xt) * x_t.float()
        frac = (out[:, c:].float() + 1) / 2
        logvar_p = frac * g(torch.log(beta.clamp(min=1e-20))) + (1 - frac) * g(post_logvar)
        logvar_q = g(post_logvar)
        kl = 0.5 * (
            -1
            + logvar_p
            - logvar_q
            + (logvar_q - logvar_p).exp()
            + (mean_q - mean_p) ** 2 * (-logvar_p).exp()
        )
        # t = 0: negative log-likelihood of x0 under the predicted Gaussian (continuous, not
        # discretised to 8-bit bins: these are latents, not pixels)
        nll = 0.5 * (math.log(2 * math.pi) + logvar_p + (x0.float() - mean_p) ** 2 * (-logvar_p).exp())
        return torch.where(_bcast(t == 0, x0), nll, kl) / math.log(2)


def make_objective(cfg: DiffusionConfig) -> Objective:
    """The objective named by ``cfg.objective``."""
    if cfg.objective == "flow":
        return FlowMatching(cfg)
    if cfg.objective == "ddpm":
        return DDPM(cfg)
    raise ValueError(f"DiffusionConfig.objective={cfg.objective!r}: flow|ddpm")
