"""SpacetimeDiT: a Diffusion Transformer over 3D latent spacetime patches.

A plain single-device ``nn.Module``: no process groups, no parallel flags. Build it on the meta
device, parallelize it from outside (``parallel/``), then ``to_empty()`` and ``init_weights()``;
:func:`build_model` does the single-device version of that.

Where ``parallel/`` reaches in, the model has named, parameter-free points (the way
:class:`dit.attention.AttentionCore` is the attention's): ``seq_start`` where the token sequence
begins, ``blocks_end`` where it leaves the blocks for the final layer, ``seq_end`` before unpatchify,
and the ``modulation`` of every block and of the final layer, where per-frame vectors are made.
Context parallelism (:func:`parallel.context.apply_sequence_cut`) cuts the sequence at the first,
gathers it at the other two, and keeps each rank's frames of the modulation vectors. Names used in
this file: ``t`` is diffusion time only; frame counts are ``frames``/``f``.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from dit import mup
from dit.config import DiTConfig
from dit.embeddings import (
    Fp32Linear,
    LearnedPos3D,
    PatchEmbed,
    Rope3D,
    RopeLTX,
    SinCos3D,
    TextPool,
    TextProjection,
    TimestepEmbedder,
    autocast_on,
)
from dit.layers import (
    MLP,
    AcrossHeadsRMSNorm,
    AdaLNModulation,
    CrossAttention,
    Fp32LayerNorm,
    Grid,
    SelfAttention,
    TableModulation,
    block_norm_module,
    compute_dtype,
    gated_residual,
    modulate,
)


def _modulation(cfg: DiTConfig, n: int) -> nn.Module:
    return (
        AdaLNModulation(cfg.hidden_size, n)
        if cfg.modulation == "per_block"
        else TableModulation(cfg.hidden_size, n)
    )


def _additive_pos_embed(cfg: DiTConfig) -> nn.Module | None:
    kind = cfg.pos_embed if cfg.abs_pos_embed == "none" else cfg.abs_pos_embed  # the latter next to a RoPE
    if kind == "sincos3d":
        return SinCos3D(cfg.hidden_size)
    if kind == "learned":
        return LearnedPos3D(cfg.hidden_size, cfg.max_latent_size)
    return None  # rope3d rotates q and k inside attention instead


def _rope(cfg: DiTConfig) -> nn.Module | None:
    if cfg.pos_embed == "rope3d":
        return Rope3D(cfg.head_dim, cfg.rope_theta)
    if cfg.pos_embed == "rope_ltx":
        base, comp = cfg.rope_base, cfg.rope_compression
        return RopeLTX(cfg.hidden_size, cfg.num_heads, cfg.patch_size, base, comp, cfg.rope_theta)
    return None  # additive positions


def block_axes(cfg: DiTConfig) -> list[str]:
    """Attention axis of each block: all ``full``, or ``space``/``time`` alternating (Latte)."""
    if cfg.attention_layout == "full":
        return ["full"] * cfg.depth
    return ["space" if i % 2 == 0 else "time" for i in range(cfg.depth)]


# the cos and sin tables of the RoPE, token-first: N×Dh/2 (rope3d), N×H×Dh/2 or N×B×H×Dh/2 (rope_ltx)
Rope = tuple[Tensor, Tensor]


class SequenceStart(nn.Module):
    """Identity where the token sequence starts (patch embedding and positions added): the point where
    :func:`parallel.context.apply_sequence_cut` keeps this rank's chunk of the tokens and RoPE tables.

    ``forward(h, rope, grid, per_frame) -> (h, rope)``: h is B×N×D; rope the tables for those N
    tokens (or None); grid the whole sample's :class:`Grid`; ``per_frame`` whether the modulation
    vectors are per frame (per-frame timesteps) rather than one per sample. A replacement keeps this
    contract, and every block still receives the whole sample's grid.
    """

    def forward(
        self, h: Tensor, rope: Rope | None, grid: Grid, per_frame: bool
    ) -> tuple[Tensor, Rope | None]:
        return h, rope


class BlocksEnd(nn.Module):
    """Identity on the residual stream (B×N×D) after the last block, before the final layer: where
    sequence parallelism gathers its tensor-parallel cut, as the final layer runs on whole
    context-parallel chunks."""

    def forward(self, h: Tensor) -> Tensor:
        return h


class SequenceEnd(nn.Module):
    """Identity on the per-token output (B×N×p·C_out) before unpatchify: where context parallelism
    gathers the sequence again."""

    def forward(self, out: Tensor) -> Tensor:
        return out


class DiTBlock(nn.Module):
    """adaLN-modulated self-attention, optional text cross-attention, modulated MLP.

    Under autocast the residual stream x is fp32 and each sub-layer computes in bf16 (Wan 2.1's
    split): the modulation vectors are fp32, the sub-layer inputs are cast to bf16 once, and their
    outputs are added to x in fp32.

    ``modulation`` makes the six B×F×D vectors (F = 1, or one per frame): the point where context
    parallelism keeps this rank's frames of them.
    """

    def __init__(self, cfg: DiTConfig, axis: str):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.norm_eps
        self.modulation = _modulation(cfg, 6)
        self.norm1 = block_norm_module(cfg.block_norm, d, eps)
        qk_eps = cfg.qk_norm_eps if cfg.qk_norm_eps is not None else eps
        self.attn = SelfAttention(
            d, cfg.num_heads, cfg.qk_norm, qk_eps, cfg.attention_backend, axis, mup.logit_mult(cfg)
        )
        self.cross_attn = None
        if cfg.conditioning == "text":
            self.norm_cross = Fp32LayerNorm(d, eps=eps) if cfg.cross_attn_norm else nn.Identity()
            self.cross_attn = CrossAttention(
                d, cfg.num_heads, cfg.qk_norm, qk_eps, cfg.attention_backend, mup.logit_mult(cfg)
            )
        self.norm2 = block_norm_module(cfg.block_norm, d, eps)
        self.mlp = MLP(d, cfg.ffn_hidden, cfg.mlp)

    def forward(
        self,
        x: Tensor,
        mod: Tensor,
        grid: Grid,
        rope: Rope | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(mod)  # each B, F, D
        x = gated_residual(x, self.attn(modulate(self.norm1(x), shift1, scale1), grid, rope), gate1)
        if self.cross_attn is not None:
            # x + bf16 stays fp32 under autocast (type promotion), bf16 in a model cast to bf16
            x = x + self.cross_attn(self.norm_cross(x).to(compute_dtype(x)), context, context_mask)
        return gated_residual(x, self.mlp(modulate(self.norm2(x), shift2, scale2)), gate2)


class FinalLayer(nn.Module):
    """Modulated LayerNorm and a linear to one patch of output channels per token, in fp32 (Wan's
    head runs under ``autocast(float32)``; it is D × p·C, a sliver of the compute)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps, elementwise_affine=False)
        self.modulation = _modulation(cfg, 2)
        self.linear = Fp32Linear(d, cfg.patch_volume * cfg.out_ch)
        self.output_mult = mup.output_mult(cfg)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.modulation(c)  # B, F, D each
        out = self.linear(modulate(self.norm(x), shift, scale, torch.float32))  # B, N, p·C_out
        return out * self.output_mult if self.output_mult != 1.0 else out


class SpacetimeDiT(nn.Module):
    """The video/image DiT (see docs/design.md §3 for the contract)."""

    SMALL_INIT = ("t_embedder", "fps_embedder", "text_proj", "label_embed", "pos_embed")
    """The embedding MLPs and tables ``init_weights`` draws from N(0, 0.02) (μP rescales their D→D layers)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.patch_embed = PatchEmbed(cfg.in_channels + cfg.cond_channels, d, cfg.patch_size)
        self.t_embedder = TimestepEmbedder(d, cfg.freq_dim)
        self.fps_embedder = TimestepEmbedder(d, cfg.freq_dim) if cfg.fps_conditioning else None
        self.label_embed = nn.Embedding(cfg.num_classes + 1, d) if cfg.conditioning == "class" else None
        rows = (cfg.text_len or 512) if cfg.text_pos_embed else 0  # the text position table
        self.text_proj = TextProjection(cfg.text_dim, d, rows) if cfg.conditioning == "text" else None
        self.text_pool = TextPool(d, cfg.text_pool_frames) if cfg.text_pool else None
        # adaLN-single computes the six modulation vectors once for all blocks; per-block adaLN-Zero
        # hands every block the conditioning vector itself.
        self.t_proj = (
            nn.Sequential(nn.SiLU(), Fp32Linear(d, 6 * d)) if cfg.modulation == "shared" else nn.Identity()
        )
        self.rope = _rope(cfg)
        self.pos_embed = _additive_pos_embed(cfg)
        self.seq_start = SequenceStart()
        self.blocks = nn.ModuleList(DiTBlock(cfg, axis) for axis in block_axes(cfg))
        self.blocks_end = BlocksEnd()
        self.final = FinalLayer(cfg)
        self.seq_end = SequenceEnd()

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        labels: Tensor | None = None,
        cond: Tensor | None = None,
        fps: Tensor | None = None,
    ) -> Tensor:
        """Predict the diffusion target for noisy latents.

        Args:
            x: B×C×F×H×W latents (F frames, 1 for images); F, H, W divisible by ``patch_size``.
            t: diffusion time on the model's 0…1000 scale, shape B, or B×F for per-frame timesteps
                (e.g. t = 0 on a clean conditioning frame); with a temporal patch pt > 1 the first
                frame of each patch gives the patch's time.
            context: B×L×text_dim text encoder states (``conditioning='text'``).
            context_mask: B×L bool, True for real (unpadded) text tokens.
            labels: B class ids; ``cfg.num_classes`` is the null class (``conditioning='class'``).
            cond: B×cond_channels×F×H×W extra input channels (I2V first frame + mask, control maps).
            fps: the clip's frame rate, B values (``fps_conditioning``, ``pos_embed='rope_ltx'``); for
                ``rope_ltx`` alone a 0-dim tensor or a number also works (one table for the batch).

        Returns:
            B×C_out×F×H×W.
        """
        grid = self.grid(x, cond)
        h, rope = self._tokens(x, cond, grid, fps)  # B, N, D
        c = self._conditioning(t, x, labels, fps)  # B, F', D  (F' = 1 or grid frames)
        if self.text_proj is not None:
            if context is None:
                raise ValueError("SpacetimeDiT(conditioning='text') needs context (a null context for CFG)")
            context = self.text_proj(context)  # B, L, D
            if self.text_pool is not None:
                c = c + self.text_pool(context, context_mask, grid.frames)  # B, F', D
        mod = self.t_proj(c)  # B, F', 6D (shared) or B, F', D (per block)

        h, rope = self.seq_start(h, rope, grid, c.shape[1] > 1)
        for block in self.blocks:
            h = block(h, mod, grid, rope, context, context_mask)
        h = self.blocks_end(h)
        out = self.seq_end(self.final(h, c))  # B, N, pt·ph·pw·C_out
        pt, ph, pw = self.cfg.patch_size
        return rearrange(
            out,
            "b (f h w) (pt ph pw c) -> b c (f pt) (h ph) (w pw)",
            f=grid.frames, h=grid.height, w=grid.width, pt=pt, ph=ph, pw=pw,
        )  # fmt: skip

    def grid(self, x: Tensor, cond: Tensor | None = None) -> Grid:
        """The patch grid of latents ``x`` (B×C×F×H×W), after checking x and ``cond`` against the config.

        Args:
            x: the latents the forward takes.
            cond: its extra input channels, or None.
        """
        cfg = self.cfg
        if x.ndim != 5:
            raise ValueError(f"x must be B×C×F×H×W, got shape {tuple(x.shape)}")
        if x.shape[1] != cfg.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels, DiTConfig.in_channels={cfg.in_channels}")
        got = 0 if cond is None else cond.shape[1]
        if got != cfg.cond_channels:
            raise ValueError(f"cond has {got} channels, DiTConfig.cond_channels={cfg.cond_channels}")
        size = tuple(x.shape[2:])
        if any(s % p for s, p in zip(size, cfg.patch_size, strict=True)):
            raise ValueError(f"latent size (F, H, W)={size} is not divisible by patch_size={cfg.patch_size}")
        return Grid(*(s // p for s, p in zip(size, cfg.patch_size, strict=True)))

    def _tokens(
        self, x: Tensor, cond: Tensor | None, grid: Grid, fps: Tensor | float | None
    ) -> tuple[Tensor, Rope | None]:
        """The embedded patches with their additive positions (B×N×D), and the RoPE tables."""
        if cond is not None:
            x = torch.cat([x, cond], dim=1)  # B, C + Cc, F, H, W
        h = self.patch_embed(x)  # B, N, D
        if autocast_on(h):
            # mixed precision: the residual stream is fp32 from here on (as Wan 2.1 keeps it); every
            # block adds its bf16 sub-layer outputs to it in fp32
            h = h.float()
        if self.pos_embed is not None:
            h = h + self.pos_embed(grid, x.device).to(h.dtype)
        if isinstance(self.rope, RopeLTX):
            if fps is None:
                raise ValueError("SpacetimeDiT(pos_embed='rope_ltx') needs fps (the clip's frame rate)")
            rope = self.rope(grid, torch.as_tensor(fps), x.device)
        else:
            rope = self.rope(grid, x.device) if self.rope is not None else None
        return h, rope

    def _conditioning(self, t: Tensor, x: Tensor, labels: Tensor | None, fps: Tensor | None) -> Tensor:
        """The conditioning vector c, B×F'×D: timestep (per sample, or per frame of patches), class
        label and frame rate."""
        c = self.t_embedder(self._frame_times(t, x))  # B, F', D
        if self.label_embed is not None:
            if labels is None:
                raise ValueError("SpacetimeDiT(conditioning='class') needs labels (null class = num_classes)")
            c = c + self.label_embed(labels)[:, None]
        if self.fps_embedder is not None:
            if fps is None:
                raise ValueError("SpacetimeDiT(fps_conditioning=True) needs fps")
            c = c + self.fps_embedder(fps)[:, None]
        return c

    def _frame_times(self, t: Tensor, x: Tensor) -> Tensor:
        """Diffusion time per sample (B×1) or per frame of patches (B×F/pt)."""
        b, frames = x.shape[0], x.shape[2]
        if t.ndim == 0:
            t = t.expand(b)
        if t.ndim == 1:
            return t[:, None]  # B, 1
        if t.shape != (b, frames):
            raise ValueError(f"per-frame t must be B×F = {(b, frames)}, got {tuple(t.shape)}")
        pt = self.cfg.patch_size[0]
        if pt > 1 and not torch.compiler.is_compiling():
            per_patch = t.unflatten(1, (-1, pt))  # B, F/pt, pt
            if not (per_patch == per_patch[:, :, :1]).all():
                raise ValueError(f"per-frame t must be constant within each temporal patch of pt={pt} frames")
        return t[:, ::pt]  # B, F/pt

    @torch.no_grad()
    def init_weights(self) -> None:
        """All initialisation (DiT's scheme); call after ``to_empty()``.

        Linears are Xavier-uniform with zero bias; embedding MLPs and tables N(0, 0.02); every
        modulation, the cross-attention output and the final linear are zero, so each block starts as
        the identity and the fresh model predicts exactly zero (adaLN-Zero). Under μP the
        width-dependent layers are then rescaled (:func:`dit.mup.rescale_init`).
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, AcrossHeadsRMSNorm) or (
                isinstance(m, nn.LayerNorm | nn.RMSNorm) and m.weight is not None
            ):
                m.reset_parameters()
        for m in filter(None, (getattr(self, name) for name in self.SMALL_INIT)):
            for name, p in m.named_parameters():
                if name.endswith("bias"):
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, std=0.02)
        zero = [self.t_proj, self.final.modulation, self.final.linear]
        for block in self.blocks:
            zero.append(block.modulation)
            if block.cross_attn is not None:
                zero.append(block.cross_attn.o)
        for m in zero:
            for p in m.parameters():
                nn.init.zeros_(p)
        if mup.enabled(self.cfg):
            mup.rescale_init(self)


def build_model(cfg: DiTConfig, device: torch.device | str = "cpu", seed: int | None = None) -> SpacetimeDiT:
    """Single-device build: construct on meta, materialise on ``device``, run ``init_weights``.

    Args:
        cfg: the architecture.
        device: where the parameters live.
        seed: if given, seeds the initialisation (CPU generator) so builds are reproducible.
    """
    with torch.device("meta"):
        model = SpacetimeDiT(cfg)
    model.to_empty(device=device)
    if seed is not None:
        torch.manual_seed(seed)
    model.init_weights()
    return model


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "SpacetimeDiT",
    "DiTBlock",
    "FinalLayer",
    "Grid",
    "SequenceStart",
    "BlocksEnd",
    "SequenceEnd",
    "build_model",
    "block_axes",
    "num_params",
]
