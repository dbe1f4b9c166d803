"""Model configuration: one typed dataclass and a plain dict of named presets.

Presets that name a published model reproduce its architecture (DiT-S/B/L/XL with patch 2, from
Peebles & Xie 2023; ``wan2.1-*``, ``wan2.2-*`` and ``ltx-video-2b`` exactly as their diffusers
``transformer/config.json``, parameter for parameter), or its size where only the size is the point
(``video-1b3``/``video-14b``: Wan-2.1 shapes with our own per-head qk norm and text convention).
Fields are plain ``str``/``int``/``float``/``tuple`` so OmegaConf structured configs can hold them.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass

MLP_KINDS = ("gelu_tanh", "swiglu")
LAYOUTS = ("full", "factorized")
POS_EMBEDS = ("rope3d", "sincos3d", "learned", "rope_ltx")
ABS_POS_EMBEDS = ("none", "sincos3d", "learned")
MODULATIONS = ("per_block", "shared")
CONDITIONINGS = ("text", "class", "none")
BACKENDS = ("sdpa", "flash_attn", "math")
TEXT_NULLS = ("masked", "empty_prompt")
QK_NORMS = ("none", "per_head", "across_heads")
BLOCK_NORMS = ("layernorm", "rmsnorm")
# run configs and exports written before qk_norm was a choice hold a bool (YAML/JSON ``true``), or the
# string OmegaConf makes of one when it merges a bool into a str field
_LEGACY_QK_NORM = {True: "per_head", False: "none", "True": "per_head", "true": "per_head",
                   "False": "none", "false": "none"}  # fmt: skip
PARAMETRIZATIONS = ("standard", "mup")


LORA_TARGETS = [
    "blocks.*.attn.q",
    "blocks.*.attn.k",
    "blocks.*.attn.v",
    "blocks.*.attn.o",
    "blocks.*.cross_attn.q",
    "blocks.*.cross_attn.k",
    "blocks.*.cross_attn.v",
    "blocks.*.cross_attn.o",
    "blocks.*.mlp.fc1",
    "blocks.*.mlp.fc2",
]
"""The default LoRA targets (``finetune.lora.targets``): the attention projections and FFN linears of
every block (the modules diffusers' and ComfyUI's Wan/LTX LoRA formats name). Here, with the model's
module names, so the planner (``parallel/``) can count them without importing ``launch/``."""


def match_targets(names: list[str], patterns: list[str] | tuple[str, ...]) -> list[str]:
    """The module ``names`` (a model's ``nn.Linear`` names, in model order) that any of the fnmatch
    ``patterns`` (``finetune.lora.targets``) matches, in model order, each once. The LoRA injection
    (``launch.lora``) and the planner (``parallel.plan_lora``) both resolve targets with it.

    Raises:
        ValueError: a pattern matches none, naming the key, the pattern and a few of the names there are
            (a typo would otherwise train nothing: the "LoRA had no effect" complaint).
    """
    chosen: set[str] = set()
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            # the first block's linears and those outside the blocks: every kind of name, once
            examples = ", ".join([n for n in names if not re.match(r"blocks\.[1-9]", n)][:20])
            raise ValueError(
                f"finetune.lora.targets: pattern {pattern!r} matches no nn.Linear of the model; its linears "
                f"are named like {examples}"
            )
        chosen.update(hits)
    return [n for n in names if n in chosen]


def qk_norm_kind(value):
    """``DiTConfig.qk_norm`` as written today: a legacy bool (or its ``"True"``/``"false"`` string) becomes
    ``per_head``/``none``; anything else is returned as is (the dataclass checks it). For comparing a
    saved config with a current one (resume)."""
    if isinstance(value, bool | str) and value in _LEGACY_QK_NORM:
        return _LEGACY_QK_NORM[value]
    return value


@dataclass
class DiTConfig:
    """Architecture of a :class:`dit.model.SpacetimeDiT`."""

    in_channels: int = 4
    """Latent channels of the video/image the model denoises (C in B×C×T×H×W)."""
    out_channels: int | None = None
    """Output channels; ``None`` means ``in_channels`` (doubled when ``learn_sigma``)."""
    learn_sigma: bool = False
    """Also predict a per-element variance interpolation (DiT / improved DDPM): output is 2×C."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """Spacetime patch (pt, ph, pw) in latent units; T, H, W must be divisible by it."""
    hidden_size: int = 384
    """Transformer width D."""
    depth: int = 12
    """Number of transformer blocks."""
    num_heads: int = 6
    """Attention heads; ``hidden_size / num_heads`` is the head dimension."""
    mlp_ratio: float = 4.0
    """FFN hidden width as a multiple of ``hidden_size`` (ignored when ``ffn_dim`` is set)."""
    ffn_dim: int | None = None
    """Explicit FFN hidden width (Wan uses 8960 for width 1536); overrides ``mlp_ratio``."""
    mlp: str = "gelu_tanh"
    """FFN kind: ``gelu_tanh`` (DiT/Wan, two linears) or ``swiglu`` (three linears)."""
    attention_layout: str = "full"
    """``full``: joint attention over all T·H·W tokens (Sora/Wan). ``factorized``: blocks
    alternate spatial attention within a frame and temporal attention across frames (Latte)."""
    qk_norm: str | bool = "none"
    """RMSNorm of the queries and keys before attention (stabilises large models): ``none``,
    ``per_head`` (over each head's Dh channels, weight (Dh,); SD3/Flux) or ``across_heads`` (over all
    H·Dh channels of a token, weight (D,); Wan, LTX-Video: diffusers' ``rms_norm_across_heads``). A
    bool (configs written before this was a choice) means ``per_head`` (True) or ``none`` (False)."""
    block_norm: str = "layernorm"
    """The two parameter-free pre-norms of every block (before self-attention and before the MLP):
    ``layernorm`` (DiT, Wan) or ``rmsnorm`` (LTX-Video). The final layer's norm is a LayerNorm either way."""
    pos_embed: str = "rope3d"
    """Position encoding: ``rope3d`` (rotary on t/h/w slices of each head, Wan), ``sincos3d`` (fixed
    additive, DiT-style), ``learned`` (additive, separate t/h/w tables) or ``rope_ltx`` (LTX-Video's
    rotary over the whole inner width, on fractional coordinates scaled by the VAE compression and the
    clip's frame rate: the forward needs ``fps``)."""
    abs_pos_embed: str = "none"
    """An absolute position table added to the patch embedding next to a rotary ``pos_embed``
    (``rope3d``/``rope_ltx``, which stays): ``none`` (default), ``sincos3d`` or ``learned`` (the tables
    of those ``pos_embed`` choices). RoPE alone tells a token only relative positions, so from pure noise
    a model cannot place what the caption asks for at a place in the frame ("from left to right": on the
    left in the first frame); the additive table gives it where it is."""
    text_pos_embed: bool = False
    """Add a learned table of text-token positions to the projected text states. Cross-attention is
    blind to the order of the text tokens it attends to, so it can only read order from the encoder's
    states; a sentence encoder trained for pooled meaning (MiniLM) keeps little of it ("from left to
    right" and "from right to left" become nearly the same set of states). Its size is ``text_len`` (512
    when that is None)."""
    text_pool: bool = False
    """Add a pooled text vector to the conditioning vector c that modulates every block (adaLN), as
    Flux's and HunyuanVideo's ``vector_in`` add a pooled CLIP embedding: the projected text states (with
    their position rows, when ``text_pos_embed``) each through LayerNorm → Linear → SiLU, averaged over
    the real tokens, then a Linear (Xavier, not the N(0, 0.02) of the embedding MLPs). The per-token
    nonlinearity before the mean keeps word order ("left … right" against "right … left"). Cross-attention
    makes a token's output depend on the caption only through products of learned terms that all start
    near zero; through c the caption reaches every modulation directly (the demo model at t = 1, one look,
    four directions: 7.9 of 9.3 px of the caption's motion at step 500 with it, 0.0 at 500 and 3.8 at 750
    without; benchmarks/results/demo-2026-12-01.md, session 7)."""
    text_pool_frames: int = 0
    """With ``text_pool``: give each latent frame (up to this many) its own linear map of the pooled
    caption, so the conditioning vector c is per frame (B×F'×D, the per-frame modulation path of per-frame
    timesteps). 0 (default): one vector for the whole clip. What a caption implies about each frame
    ("from left to right": on the left in the first frame, on the right in the last) then reaches that
    frame's modulation directly instead of as a product of the token's frame and one clip-wide vector
    that the blocks have to learn. A clip with more latent frames than this is refused. Measured on the
    demo model at t = 1 (benchmarks/results/demo-2026-12-01.md, sessions 9-10): not enough by itself to
    place the object from the caption within 800 steps."""
    max_latent_size: tuple[int, int, int] = (64, 128, 128)
    """Largest (T, H, W) in patches a ``learned`` position table covers (``pos_embed`` or
    ``abs_pos_embed``)."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies."""
    rope_base: tuple[int, int, int] = (20, 2048, 2048)
    """``rope_ltx``: the (frames, height, width) in pixels that coordinate 1 stands for (LTX-Video's
    ``base_num_frames``/``base_height``/``base_width``)."""
    rope_compression: tuple[int, int, int] = (8, 32, 32)
    """``rope_ltx``: the VAE's (temporal, spatial, spatial) compression. A token's coordinate is its
    patch index × compression × patch / base, the temporal one divided by the clip's fps (LTXPipeline's
    ``rope_interpolation_scale = (8 / frame_rate, 32, 32)``)."""
    modulation: str = "per_block"
    """Timestep modulation: ``per_block`` adaLN-Zero (a linear per block, DiT) or ``shared``
    adaLN-single (one projection for all blocks plus a learned table per block, PixArt-α/Wan)."""
    conditioning: str = "text"
    """``text`` (cross-attention to projected text states), ``class`` (label embedding added to
    the timestep embedding; label ``num_classes`` is the null class for CFG) or ``none``."""
    text_dim: int = 4096
    """Width of the text encoder states fed as ``context`` (4096 for T5/UMT5-XXL, 384 MiniLM)."""
    num_classes: int = 1000
    """Class count for ``class`` conditioning (the table has one extra null row)."""
    cond_channels: int = 0
    """Extra input channels concatenated to ``x`` (I2V first frame + mask, control maps)."""
    fps_conditioning: bool = False
    """Add an embedding of the clip's frame rate to the timestep embedding (needs ``fps``)."""
    text_mask: bool = True
    """Mask the padded text tokens in cross-attention. Wan's pipelines pad the UMT5 states with zeros to
    ``text_len`` and mask nothing (the zero rows are attended): a model trained so is ``False``."""
    text_null: str = "masked"
    """The null caption of CFG and caption dropout: ``masked`` (an all-masked context, attended nowhere)
    or ``empty_prompt`` (the encoded empty string, as Wan's pipelines use)."""
    text_len: int | None = None
    """Tokens every caption is padded to, when the model's function depends on it (an unmasked pad:
    Wan 512); ``None``: the data's ``max_text_len``, which must otherwise equal this."""
    text_encoder_mask: bool = True
    """Whether the text encoder's own attention is given the padding mask. LTX-Video's pipeline runs T5 on
    the padded token ids without one (the padding takes part in T5's attention and changes the caption's
    states): a model trained so is ``False``. ``text_mask`` is the DiT's cross-attention mask."""
    cross_attn_norm: bool = True
    """LayerNorm (with affine) on the residual stream before cross-attention (Wan)."""
    norm_eps: float = 1e-6
    """Epsilon of every LayerNorm/RMSNorm (the q/k norms' too, unless ``qk_norm_eps`` is set)."""
    qk_norm_eps: float | None = None
    """Epsilon of the q/k RMSNorms; ``None``: ``norm_eps``. LTX-Video's attention fixes it at 1e-5 while
    its other norms use 1e-6."""
    freq_dim: int = 256
    """Width of the sinusoidal timestep features before the timestep MLP."""
    attention_backend: str = "sdpa"
    """``sdpa`` (default; flash/cuDNN/efficient kernels on CUDA), ``flash_attn`` (the
    FlashAttention package on CUDA, else SDPA) or ``math`` (reference)."""
    parametrization: str = "standard"
    """``standard`` or ``mup`` (μP, Yang et al. 2022, "Tensor Programs V"): hyper-parameters tuned at
    ``mup_base_width`` transfer to wider models. μP changes the initialisation of input-side and
    hidden embedding layers, scales attention logits by 1/head_dim, multiplies the output by
    base/width, and gives hidden matrices a learning rate × base/width (``dit.mup``)."""
    mup_base_width: int = 128
    """μP's base hidden size: at this width the μP model is the standard one, bit for bit."""
    mup_base_head_dim: int = 0
    """Head width of the μP base model; 0 means this model's ``head_dim`` (width grows by heads)."""

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)
        self.max_latent_size = tuple(int(p) for p in self.max_latent_size)
        self.rope_base = tuple(int(p) for p in self.rope_base)
        self.rope_compression = tuple(int(p) for p in self.rope_compression)
        self.qk_norm = qk_norm_kind(self.qk_norm)
        for name, allowed in (
            ("mlp", MLP_KINDS),
            ("attention_layout", LAYOUTS),
            ("pos_embed", POS_EMBEDS),
            ("abs_pos_embed", ABS_POS_EMBEDS),
            ("modulation", MODULATIONS),
            ("conditioning", CONDITIONINGS),
            ("attention_backend", BACKENDS),
            ("text_null", TEXT_NULLS),
            ("qk_norm", QK_NORMS),
            ("block_norm", BLOCK_NORMS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"DiTConfig.{name}={getattr(self, name)!r}: expected one of {allowed}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"DiTConfig.patch_size={self.patch_size}: expected three positive ints")
        positive = ("in_channels", "hidden_size", "depth", "num_heads", "freq_dim", "text_dim", "num_classes")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"DiTConfig.{name}={getattr(self, name)}: must be at least 1")
        if self.qk_norm_eps is not None and not self.qk_norm_eps > 0:
            raise ValueError(f"DiTConfig.qk_norm_eps={self.qk_norm_eps}: must be > 0 (or None)")
        if self.text_len is not None and self.text_len < 1:
            raise ValueError(f"DiTConfig.text_len={self.text_len}: must be at least 1 (or None)")
        if self.cond_channels < 0 or (self.ffn_dim is not None and self.ffn_dim < 1) or self.mlp_ratio <= 0:
            raise ValueError("DiTConfig: cond_channels must be ≥ 0, ffn_dim ≥ 1 (or None), mlp_ratio > 0")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"DiTConfig.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"DiTConfig: head_dim={self.head_dim} must be even")
        if self.parametrization not in PARAMETRIZATIONS:
            raise ValueError(
                f"DiTConfig.parametrization={self.parametrization!r}: expected one of {PARAMETRIZATIONS}"
            )
        if self.mup_base_width < 1 or self.mup_base_head_dim < 0:
            raise ValueError("DiTConfig.mup_base_width must be ≥ 1 and mup_base_head_dim ≥ 0")
        if self.pos_embed == "rope3d" and self.head_dim < 6:
            raise ValueError(f"DiTConfig: rope3d needs head_dim >= 6, got {self.head_dim}")
        if self.pos_embed == "rope_ltx" and self.hidden_size < 6:
            raise ValueError(f"DiTConfig: rope_ltx needs hidden_size >= 6, got {self.hidden_size}")
        if self.abs_pos_embed != "none" and self.pos_embed not in ("rope3d", "rope_ltx"):
            raise ValueError(
                f"DiTConfig.abs_pos_embed={self.abs_pos_embed!r} goes next to a rotary pos_embed (rope3d, "
                f"rope_ltx); pos_embed={self.pos_embed!r} is already additive"
            )
        if self.text_pool and self.conditioning != "text":
            raise ValueError(
                f"DiTConfig.text_pool=True pools the caption's states; conditioning={self.conditioning!r} "
                "has none"
            )
        if self.text_pool_frames < 0 or (self.text_pool_frames and not self.text_pool):
            raise ValueError(
                f"DiTConfig.text_pool_frames={self.text_pool_frames}: expected 0, or > 0 with text_pool=True "
                f"(text_pool={self.text_pool})"
            )
        for name in ("rope_base", "rope_compression"):
            if len(getattr(self, name)) != 3 or min(getattr(self, name)) < 1:
                raise ValueError(f"DiTConfig.{name}={getattr(self, name)}: expected three positive ints")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def needs_fps(self) -> bool:
        """Whether the forward needs the clip's ``fps`` (fps conditioning, or LTX's RoPE)."""
        return self.fps_conditioning or self.pos_embed == "rope_ltx"

    @property
    def ffn_hidden(self) -> int:
        return self.ffn_dim if self.ffn_dim is not None else int(self.hidden_size * self.mlp_ratio)

    @property
    def out_ch(self) -> int:
        base = self.out_channels if self.out_channels is not None else self.in_channels
        return base * 2 if self.learn_sigma else base

    @property
    def patch_volume(self) -> int:
        pt, ph, pw = self.patch_size
        return pt * ph * pw

    def replace(self, **changes) -> DiTConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _dit(hidden: int, depth: int, heads: int) -> DiTConfig:
    # DiT (Peebles & Xie 2023): class-conditional, adaLN-Zero in every block, learned sigma,
    # fixed sin-cos positions, GELU-tanh MLP ×4, on 4×32×32 SD-VAE latents with patch 2.
    return DiTConfig(
        in_channels=4,
        learn_sigma=True,
        patch_size=(1, 2, 2),
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4.0,
        mlp="gelu_tanh",
        attention_layout="full",
        qk_norm="none",
        pos_embed="sincos3d",
        modulation="per_block",
        conditioning="class",
        num_classes=1000,
        cross_attn_norm=False,
    )


def _wan(hidden: int, depth: int, heads: int, ffn: int, text_dim: int = 4096, in_ch: int = 16) -> DiTConfig:
    # Wan-2.1-shaped video model: joint 3D attention with 3D RoPE, qk RMSNorm (per head, where Wan's is
    # across heads: these presets are our own models, not Wan's weights), adaLN-single,
    # text cross-attention (UMT5-XXL states, 4096 wide), patch 1×2×2 on 16-channel Wan-VAE latents.
    return DiTConfig(
        in_channels=in_ch,
        patch_size=(1, 2, 2),
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        ffn_dim=ffn,
        mlp="gelu_tanh",
        attention_layout="full",
        qk_norm="per_head",
        pos_embed="rope3d",
        modulation="shared",
        conditioning="text",
        text_dim=text_dim,
        cross_attn_norm=True,
    )


def _wan_published(hidden: int, depth: int, heads: int, ffn: int, in_ch: int = 16) -> DiTConfig:
    # The published Wan 2.x transformers (diffusers' WanTransformer3DModel, transformer/config.json): our
    # Wan-shaped model (head_dim 128, affine cross-attention norm, eps 1e-6, freq_dim 256, patch 1×2×2,
    # UMT5-XXL states) with Wan's qk RMSNorm across heads and WanPipeline's text convention: states
    # padded with zeros to 512 tokens and attended unmasked, the encoded empty prompt as CFG's null.
    return _wan(hidden, depth, heads, ffn, in_ch=in_ch).replace(
        qk_norm="across_heads", text_mask=False, text_null="empty_prompt", text_len=512
    )


def _ltx_video_2b() -> DiTConfig:
    # LTX-Video 2B (diffusers' LTXVideoTransformer3DModel defaults = the published transformer/config.json:
    # 28 layers, 32 heads × 64, 128 latent channels, patch 1, caption_channels 4096): RMSNorm block
    # norms without affine, qk RMSNorm across heads, no norm before cross-attention, LTX's RoPE over the
    # whole inner width; T5-XXL states padded to 128 tokens with a mask, the encoded empty prompt as the
    # CFG null (LTXPipeline's default negative prompt "").
    return DiTConfig(
        in_channels=128,
        patch_size=(1, 1, 1),
        hidden_size=2048,
        depth=28,
        num_heads=32,
        ffn_dim=8192,
        mlp="gelu_tanh",
        attention_layout="full",
        qk_norm="across_heads",
        block_norm="rmsnorm",
        pos_embed="rope_ltx",
        modulation="shared",
        conditioning="text",
        text_dim=4096,
        text_mask=True,
        text_null="empty_prompt",
        text_encoder_mask=False,  # LTXPipeline: self.text_encoder(text_input_ids), no attention_mask
        qk_norm_eps=1e-5,  # LTXAttention's RMSNorm(eps=1e-5) whatever norm_eps says
        text_len=128,
        cross_attn_norm=False,
        norm_eps=1e-6,
        freq_dim=256,
    )


PRESETS: dict[str, DiTConfig] = {
    "dit-s/2": _dit(384, 12, 6),
    "dit-b/2": _dit(768, 12, 12),
    "dit-l/2": _dit(1024, 24, 16),
    "dit-xl/2": _dit(1152, 28, 16),
    # The smallest text model (the tests' and tools' base, launch/configs/tiny.yaml): all-MiniLM-L6-v2
    # states (384 wide) on 4-channel latents.
    "tiny": _wan(64, 2, 4, 256, text_dim=384, in_ch=4),
    # The built-in CPU demo (launch/configs/demo.yaml): 4×4 RGB pixel patches (48 channels), one token
    # per 2 frames × 4×4 pixels, MiniLM states read in order (text_pos_embed) and an absolute position
    # table next to the RoPE so the caption can place the object from pure noise
    # (benchmarks/results/demo-2026-12-01.md).
    "demo": _wan(128, 4, 4, 512, text_dim=384, in_ch=48).replace(
        patch_size=(2, 1, 1), fps_conditioning=True, text_pos_embed=True, abs_pos_embed="learned", text_len=24
    ),
    "video-small": _wan(768, 12, 12, 3072),
    "video-1b3": _wan(1536, 30, 12, 8960),
    "video-14b": _wan(5120, 40, 40, 13824),
    # Published models, exactly (their weights load through init.from): the Wan2.2-T2V-A14B preset is one
    # expert (the high- and low-noise experts are two models of this shape); Wan2.2-TI2V-5B takes
    # per-frame timesteps (t = 0 on the clean first frame for I2V) on 48-channel Wan2.2-VAE latents.
    "wan2.1-t2v-1.3b": _wan_published(1536, 30, 12, 8960),
    "wan2.1-t2v-14b": _wan_published(5120, 40, 40, 13824),
    "wan2.2-ti2v-5b": _wan_published(3072, 30, 24, 14336, in_ch=48),
    "wan2.2-t2v-a14b": _wan_published(5120, 40, 40, 13824),
    "ltx-video-2b": _ltx_video_2b(),
}

# Latent (T, H, W) each preset is usually measured at: DiT at 256² images (32² SD-VAE latents),
# video presets at an 81-frame 480p clip through a 4×8×8 VAE (21×60×104 latents).
DEFAULT_LATENT_SIZE: dict[str, tuple[int, int, int]] = {
    "dit-s/2": (1, 32, 32),
    "dit-b/2": (1, 32, 32),
    "dit-l/2": (1, 32, 32),
    "dit-xl/2": (1, 32, 32),
    "tiny": (4, 8, 8),
    "demo": (8, 8, 8),
    "video-small": (9, 32, 32),
    "video-1b3": (21, 60, 104),
    "video-14b": (21, 60, 104),
    # the published models at their pipelines' default clip: Wan 81 frames at 480×832 (1.3B) or 720×1280
    # through a 4×8×8 VAE; Wan2.2-TI2V 121 frames at 704×1280 through its 4×16×16 VAE; LTX-Video 161
    # frames at 512×704 through its 8×32×32 VAE
    "wan2.1-t2v-1.3b": (21, 60, 104),
    "wan2.1-t2v-14b": (21, 90, 160),
    "wan2.2-ti2v-5b": (31, 44, 80),
    "wan2.2-t2v-a14b": (21, 90, 160),
    "ltx-video-2b": (21, 16, 22),
}


def get_preset(name: str, **overrides) -> DiTConfig:
    """A fresh copy of preset ``name`` with ``overrides`` applied.

    Args:
        name: a key of :data:`PRESETS`.
        **overrides: DiTConfig fields to change.
    """
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


__all__ = ["DiTConfig", "PRESETS", "DEFAULT_LATENT_SIZE", "get_preset", "qk_norm_kind"]
