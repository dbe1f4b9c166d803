"""Patch, timestep, label, text and position embeddings.

Tokens are always ordered (t h w): frame-major, then row, then column. Position encodings are
computed on the fly from the patch grid (T, H, W), so any size divisible by the patch works and
nothing needs re-initialising after ``to_empty()``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.amp.autocast_mode import is_autocast_available


def autocast_on(x: Tensor) -> bool:
    """Whether autocast is on for x's device (False for devices without autocast, such as meta)."""
    dev = x.device.type
    return is_autocast_available(dev) and torch.is_autocast_enabled(dev)


class Fp32Linear(nn.Linear):
    """A linear computed in fp32 whatever autocast or the parameter dtype say (FSDP's bf16 copies are
    upcast for the call): the timestep embedding, the modulation vectors and the output head, as Wan
    runs them under ``autocast(float32)``. These act on B×F rows (and the head on a few channels per
    token), so fp32 costs nothing measurable; bf16 would round t = 999.3 and the adaLN scales.

    A subclass rather than a function so that hooks on the module still fire (ZeRO-3 gathers a
    module's parameters in its own pre-forward hook); state-dict keys are ``nn.Linear``'s.
    """

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.float()
        if not autocast_on(x):
            return F.linear(x.float(), self.weight.float(), bias)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float(), bias)


class PatchEmbed(nn.Module):
    """Cut B×C×T×H×W into (pt, ph, pw) spacetime patches and project each to width D.

    A linear on flattened patches is a Conv3d with kernel = stride = patch; the flattening order
    (c pt ph pw) is that of a Conv3d weight, so DiT/Wan conv weights load with a reshape.
    """

    def __init__(self, in_channels: int, dim: int, patch_size: tuple[int, int, int]):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_channels * math.prod(patch_size), dim)

    def forward(self, x: Tensor) -> Tensor:
        pt, ph, pw = self.patch_size
        x = rearrange(x, "b c (t pt) (h ph) (w pw) -> b (t h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)
        return self.proj(x)  # B, N, D


def timestep_features(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of (possibly fractional) timesteps, DiT's convention (cos, then sin).

    Args:
        t: any shape; values on the model's time scale (0…1000).
        dim: even feature width.

    Returns:
        ``(*t.shape, dim)`` float32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[..., None] * freqs  # ..., half
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features → Linear → SiLU → Linear (DiT), all in fp32 (Wan's time embedding runs
    under ``autocast(float32)``): the output is the fp32 conditioning vector every modulation starts
    from. Also embeds frame rates."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = Fp32Linear(freq_dim, dim)
        self.fc2 = Fp32Linear(dim, dim)

    def forward(self, t: Tensor) -> Tensor:
        feats = timestep_features(t, self.freq_dim)  # *t.shape, freq_dim; fp32
        return self.fc2(F.silu(self.fc1(feats)))  # *t.shape, D


class TextProjection(nn.Module):
    """Text encoder states (text_dim) → model width: Linear → GELU-tanh → Linear (PixArt-α, Wan)."""

    def __init__(self, text_dim: int, dim: int, positions: int = 0):
        super().__init__()
        self.fc1 = nn.Linear(text_dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        # DiTConfig.text_pos_embed: a learned row per text position (none when positions is 0)
        self.pos = nn.Parameter(torch.empty(positions, dim)) if positions else None

    def forward(self, context: Tensor) -> Tensor:
        out = self.fc2(F.gelu(self.fc1(context), approximate="tanh"))  # B, L, D
        if self.pos is None:
            return out
        if out.shape[1] > self.pos.shape[0]:
            raise ValueError(f"{out.shape[1]} text tokens; the text position table has {self.pos.shape[0]}")
        return out + self.pos[: out.shape[1]]


class TextPool(nn.Module):
    """``DiTConfig.text_pool``: projected text states B×L×D and their mask B×L → one vector B×D.

    Each real token goes through LayerNorm → Linear → SiLU before the masked mean (a mean of the linear
    states alone would be the same for any order of the tokens); an all-masked caption (the null text of
    CFG) pools to zeros, so its vector is the output bias. In fp32 whatever autocast says, like the
    timestep embedding it is added to: the conditioning vector c stays fp32.
    """

    def __init__(self, dim: int, frames: int = 0):
        super().__init__()
        self.frames = frames
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.fc1 = Fp32Linear(dim, dim)
        # DiTConfig.text_pool_frames: one D-wide output per latent frame, so frame f's vector is its own
        # linear map of the pooled caption
        self.fc2 = Fp32Linear(dim, dim * max(frames, 1))

    def forward(self, tokens: Tensor, mask: Tensor | None, frames: int = 1) -> Tensor:
        """B×1×D, or B×``frames``×D (the first ``frames`` latent frames' vectors) with ``self.frames``."""
        if self.frames and frames > self.frames:
            raise ValueError(f"{frames} latent frames; DiTConfig.text_pool_frames={self.frames}")
        with torch.autocast(tokens.device.type, enabled=False):
            h = F.silu(self.fc1(self.norm(tokens.float())))  # B, L, D
            keep = torch.ones(h.shape[:2], device=h.device) if mask is None else mask.float()  # B, L
            pooled = (h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1)  # B, D
            out = self.fc2(pooled).unflatten(1, (-1, tokens.shape[-1]))  # B, max(frames, 1), D
        return out[:, :frames] if self.frames else out


def grid_positions(grid: tuple[int, int, int], device: torch.device | str | None = None) -> Tensor:
    """(t, h, w) integer coordinates of every token in (t h w) order: N×3."""
    t, h, w = grid
    axes = [torch.arange(n, device=device) for n in (t, h, w)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # N, 3


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of each head given to (t, h, w) rotations: h and w get 2·⌊Dh/6⌋ each, t the rest
    (Wan's split; for Dh=128 that is 44/42/42)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


class Rope3D(nn.Module):
    """3D rotary position embedding: each head's channel pairs are split between the t, h and w
    coordinates. In factorized attention the coordinates shared by a group (the frame, or the pixel)
    rotate q and k alike and cancel in q·k, so one table serves every layout."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def forward(
        self, grid: tuple[int, int, int], device: torch.device | str | None = None
    ) -> tuple[Tensor, Tensor]:
        pos = grid_positions(grid, device).float()  # N, 3
        angles = []
        for axis, dim in enumerate(rope_split(self.head_dim)):
            inv_freq = self.theta ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
            angles.append(pos[:, axis, None] * inv_freq)  # N, dim/2
        angle = torch.cat(angles, dim=-1)  # N, Dh/2
        return angle.cos(), angle.sin()


class RopeLTX(nn.Module):
    """LTX-Video's rotary embedding (diffusers' ``LTXVideoRotaryPosEmbed``): one rotation over the whole
    inner width D = H·Dh of a token, not per head.

    A token's (f, h, w) patch index becomes a fractional coordinate ``index × scale``, with scale =
    (compression_t / fps, compression_s, compression_s) × patch / base: its place in pixels (and, in
    time, in seconds) relative to the base size. ``D // 6`` frequencies ``theta^linspace(0, 1) · π/2``
    each rotate one channel pair per axis, interleaved (frequency-major, then f/h/w), at angle
    ``freq · (2·coord − 1)``; the ``D % 6`` leading channels are not rotated. Parameter-free.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        patch_size: tuple[int, int, int],
        base: tuple[int, int, int],
        compression: tuple[int, int, int],
        theta: float = 10000.0,
    ):
        super().__init__()
        self.dim, self.heads, self.theta = dim, heads, theta
        self.patch_size, self.base, self.compression = patch_size, base, compression

    def forward(
        self, grid: tuple[int, int, int], fps: Tensor, device: torch.device | str | None = None
    ) -> tuple[Tensor, Tensor]:
        """The cos and sin tables of the tokens of ``grid``.

        Args:
            grid: the patch grid (frames, height, width).
            fps: the clip's frame rate: a 0-dim tensor (one table for the batch) or B values.
            device: where the tables are made.

        Returns:
            N×H×Dh/2 tables for a 0-dim ``fps``, else N×B×H×Dh/2 (token-first, so a context-parallel cut
            along the tokens slices dim 0 of every table kind); :func:`apply_rope` takes either.
        """
        pos = grid_positions(grid, device).float()  # N, 3
        fps = fps.to(device=device, dtype=torch.float32)
        per_sample = fps.ndim == 1
        fps = fps[:, None] if per_sample else fps  # B, 1 or ()
        # the operations in diffusers' order: index × interpolation scale × patch / base
        coords = [
            pos[:, 0] * (self.compression[0] / fps) * self.patch_size[0] / self.base[0],  # B, N or N
            pos[:, 1] * float(self.compression[1]) * self.patch_size[1] / self.base[1],  # N
            pos[:, 2] * float(self.compression[2]) * self.patch_size[2] / self.base[2],
        ]
        coords = torch.stack(torch.broadcast_tensors(*coords), dim=-1)  # (B,) N, 3
        freqs = self.theta ** torch.linspace(0.0, 1.0, self.dim // 6, device=device, dtype=torch.float32)
        freqs = freqs * math.pi / 2.0
        angle = (freqs * (coords[..., None] * 2 - 1)).transpose(-1, -2).flatten(-2)  # (B,) N, 3·(D//6)
        pad = (self.dim % 6) // 2  # channel pairs left unrotated, before the rotated ones
        angle = F.pad(angle, (pad, 0))  # (B,) N, D/2
        angle = angle.unflatten(-1, (self.heads, -1))  # (B,) N, H, Dh/2
        if per_sample:
            angle = angle.transpose(0, 1)  # N, B, H, Dh/2
        return angle.cos(), angle.sin()


def apply_rope(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate adjacent channel pairs of B×N×H×Dh queries or keys; computed in fp32.

    Args:
        x: B×N×H×Dh.
        rope: cos and sin tables, token-first: N×Dh/2 (one angle per head channel pair, every head
            alike: :class:`Rope3D`), N×H×Dh/2 (per head: :class:`RopeLTX`) or N×B×H×Dh/2 (per sample
            and head: :class:`RopeLTX` with per-sample frame rates). A table with a head axis must hold
            exactly x's heads (under tensor parallelism, this rank's).
    """
    cos, sin = rope
    if cos.ndim == 2:
        cos, sin = (r[None, :, None, :] for r in (cos, sin))  # 1, N, 1, Dh/2
    else:
        if cos.shape[-2] != x.shape[-2]:
            raise ValueError(f"RoPE table for {cos.shape[-2]} heads applied to {x.shape[-2]} heads")
        if cos.ndim == 3:
            cos, sin = cos[None], sin[None]  # 1, N, H, Dh/2
        else:
            cos, sin = cos.transpose(0, 1), sin.transpose(0, 1)  # B, N, H, Dh/2 (a view)
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # B, N, H, Dh/2 each
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # B, N, H, Dh/2, 2
    return out.flatten(-2).type_as(x)


def _sincos_1d(pos: Tensor, dim: int) -> Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, device=pos.device, dtype=torch.float64) / (dim / 2))
    out = pos.double()[:, None] * omega  # N, dim/2
    return torch.cat([out.sin(), out.cos()], dim=-1)


class SinCos3D(nn.Module):
    """Fixed additive sin-cos positions: exactly DiT's 2D table in space (first half of D encodes
    the column, second half the row), plus a full-width 1D table of the frame index taken relative
    to frame 0, so an image (T = 1) and the first frame of a video get DiT's positions. Parameter-free."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 4:
            raise ValueError(f"sincos3d needs hidden_size divisible by 4, got {dim}")
        self.dim = dim

    def forward(self, grid: tuple[int, int, int], device: torch.device | str | None = None) -> Tensor:
        pos = grid_positions(grid, device)  # N, 3 as (t, h, w)
        half = self.dim // 2
        space = torch.cat([_sincos_1d(pos[:, 2], half), _sincos_1d(pos[:, 1], half)], dim=-1)  # N, D
        time = _sincos_1d(pos[:, 0], self.dim) - _sincos_1d(torch.zeros(1, device=device), self.dim)
        return (space + time).float()  # N, D


class LearnedPos3D(nn.Module):
    """Learned additive positions as a sum of per-axis tables, so any (T, H, W) up to
    ``max_size`` (in patches) works, including sizes never seen in training."""

    def __init__(self, dim: int, max_size: tuple[int, int, int]):
        super().__init__()
        self.max_size = max_size
        self.t = nn.Parameter(torch.empty(max_size[0], dim))
        self.h = nn.Parameter(torch.empty(max_size[1], dim))
        self.w = nn.Parameter(torch.empty(max_size[2], dim))

    def forward(self, grid: tuple[int, int, int], device: torch.device | str | None = None) -> Tensor:
        if any(g > m for g, m in zip(grid, self.max_size, strict=True)):
            raise ValueError(f"patch grid {grid} exceeds DiTConfig.max_latent_size={self.max_size}")
        t, h, w = grid
        emb = self.t[:t, None, None] + self.h[None, :h, None] + self.w[None, None, :w]  # T, H, W, D
        return emb.reshape(t * h * w, -1)  # N, D
