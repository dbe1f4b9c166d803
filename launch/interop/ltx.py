"""diffusers' ``LTXVideoTransformer3DModel`` (LTX-Video 0.9.x, 2B) ↔ SpacetimeDiT.

Every tensor maps one to one with no layout change (LTX's patch is 1×1×1: ``proj_in`` on a token's
channels is our patch embedding). LTX's block norms are RMSNorms without affine (``block_norm='rmsnorm'``),
its qk RMSNorm spans all heads, nothing normalises before cross-attention, and its RoPE covers the whole
width with fractional coordinates (``pos_embed='rope_ltx'``: patch index × VAE compression / base, the
temporal one divided by the fps, as ``LTXPipeline`` passes ``rope_interpolation_scale``). Its pipeline
masks the padded T5 tokens (128) and uses the encoded empty prompt as the CFG null.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from dit.config import DiTConfig
from launch.interop.formats import Rename, refuse

CLASS_NAME = "LTXVideoTransformer3DModel"
# the fields this mapping expresses only at these values (LTX-Video's own)
FIXED = {
    "patch_size": 1,
    "patch_size_t": 1,
    "activation_fn": "gelu-approximate",
    "qk_norm": "rms_norm_across_heads",
    "norm_elementwise_affine": False,
    "attention_bias": True,
    "attention_out_bias": True,
}
FIELDS = ("in_channels", "out_channels", "num_attention_heads", "attention_head_dim", "cross_attention_dim",
          "num_layers", "norm_eps", "caption_channels", *FIXED)  # fmt: skip
# LTXVideoTransformer3DModel's RoPE constants and LTXPipeline's VAE compression (rope_interpolation_scale)
ROPE_BASE, ROPE_COMPRESSION = (20, 2048, 2048), (8, 32, 32)
# LTXPipeline: max_sequence_length=128, the attention mask of the T5 tokens, negative prompt ""
TEXT_LEN = 128
# LTX's final LayerNorm has eps 1e-6 whatever norm_eps says; our one norm_eps must agree
FINAL_EPS = 1e-6
QK_EPS = 1e-5  # LTXAttention's q/k RMSNorm: eps fixed at 1e-5
PUBLISHED_HEADS = {2048: 32}  # LTX-Video 2B: 64-wide heads


def owns(keys: list[str]) -> bool:
    """Whether these tensor names are an LTX-Video transformer's."""
    return "proj_in.weight" in keys and "caption_projection.linear_1.weight" in keys


def renames(cfg: DiTConfig) -> list[Rename]:
    """Every tensor of an LTX-Video model of this config: our name and diffusers' (no layout change)."""
    linears = {
        "patch_embed.proj": "proj_in",
        "t_embedder.fc1": "time_embed.emb.timestep_embedder.linear_1",
        "t_embedder.fc2": "time_embed.emb.timestep_embedder.linear_2",
        "t_proj.1": "time_embed.linear",
        "text_proj.fc1": "caption_projection.linear_1",
        "text_proj.fc2": "caption_projection.linear_2",
        "final.linear": "proj_out",
    }
    rs = [Rename("final.modulation.table", "scale_shift_table")]
    for i in range(cfg.depth):
        theirs = f"transformer_blocks.{i}"
        rs.append(Rename(f"blocks.{i}.modulation.table", f"{theirs}.scale_shift_table"))
        for ours, attn in (("attn", "attn1"), ("cross_attn", "attn2")):
            for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0")):
                linears[f"blocks.{i}.{ours}.{a}"] = f"{theirs}.{attn}.{b}"
            for n in ("norm_q", "norm_k"):
                rs.append(Rename(f"blocks.{i}.{ours}.{n}.weight", f"{theirs}.{attn}.{n}.weight"))
        linears[f"blocks.{i}.mlp.fc1"] = f"{theirs}.ff.net.0.proj"
        linears[f"blocks.{i}.mlp.fc2"] = f"{theirs}.ff.net.2"
    for ours, theirs in linears.items():
        rs += [Rename(f"{ours}.{k}", f"{theirs}.{k}") for k in ("weight", "bias")]
    return rs


# our module → the original LTX-Video checkpoint's (Lightricks' repository; ComfyUI keeps these names).
# Inside the blocks the original names are diffusers' (transformer_blocks.N.attn1.to_q …).
ORIGINAL_TOP = {
    "patch_embed.proj": "patchify_proj",
    "t_embedder.fc1": "adaln_single.emb.timestep_embedder.linear_1",
    "t_embedder.fc2": "adaln_single.emb.timestep_embedder.linear_2",
    "t_proj.1": "adaln_single.linear",
    "text_proj.fc1": "caption_projection.linear_1",
    "text_proj.fc2": "caption_projection.linear_2",
    "final.linear": "proj_out",
}
LORA_REFUSED: dict[str, str] = {}  # every linear of ours is a linear of LTX's


def original_modules(cfg: DiTConfig) -> dict[str, str]:
    """Our linear modules → their names in the original LTX-Video checkpoint (what ComfyUI's LTXV model
    and LTX-Video-Trainer's LoRA files use)."""
    names = dict(ORIGINAL_TOP)
    for i in range(cfg.depth):
        for ours, attn in (("attn", "attn1"), ("cross_attn", "attn2")):
            for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0")):
                names[f"blocks.{i}.{ours}.{a}"] = f"transformer_blocks.{i}.{attn}.{b}"
        names[f"blocks.{i}.mlp.fc1"] = f"transformer_blocks.{i}.ff.net.0.proj"
        names[f"blocks.{i}.mlp.fc2"] = f"transformer_blocks.{i}.ff.net.2"
    return names


def config_to_ours(config: dict, where: object) -> DiTConfig:
    """Our architecture for an LTX-Video ``config.json``.

    Args:
        config: the fields of ``LTXVideoTransformer3DModel``.
        where: the source, for errors.

    Raises:
        ValueError: naming the class and every field we cannot express (a patch other than 1, affine
            block norms, a cross-attention width other than the model's, a field this mapping does not
            know …).
    """
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    problems = [f"unknown field {k}={v!r}" for k, v in config.items() if k not in FIELDS]
    problems += [
        f"{k}={config[k]!r} (supported: {v!r})" for k, v in FIXED.items() if k in config and config[k] != v
    ]
    heads, head_dim = config.get("num_attention_heads", 32), config.get("attention_head_dim", 64)
    width = heads * head_dim
    if config.get("cross_attention_dim", 2048) != width:
        problems.append(
            f"cross_attention_dim={config.get('cross_attention_dim', 2048)} (supported: the width {width})"
        )
    if config.get("norm_eps", 1e-6) != FINAL_EPS:
        problems.append(f"norm_eps={config['norm_eps']!r} (supported: {FINAL_EPS}, its final norm's)")
    refuse(CLASS_NAME, where, problems)
    in_ch = config.get("in_channels", 128)
    out_ch = config.get("out_channels") or in_ch
    try:
        return DiTConfig(
            in_channels=in_ch,
            out_channels=None if out_ch == in_ch else out_ch,
            patch_size=(1, 1, 1),
            hidden_size=width,
            depth=config.get("num_layers", 28),
            num_heads=heads,
            ffn_dim=4 * width,  # diffusers' FeedForward(dim): mult 4
            mlp="gelu_tanh",
            attention_layout="full",
            qk_norm="across_heads",
            block_norm="rmsnorm",
            pos_embed="rope_ltx",
            rope_theta=10000.0,
            rope_base=ROPE_BASE,
            rope_compression=ROPE_COMPRESSION,
            modulation="shared",
            conditioning="text",
            text_dim=config.get("caption_channels", 4096),
            cross_attn_norm=False,
            norm_eps=FINAL_EPS,
            qk_norm_eps=QK_EPS,
            freq_dim=256,  # PixArtAlphaCombinedTimestepSizeEmbeddings: 256 sinusoidal channels
            text_mask=True,
            text_null="empty_prompt",
            text_len=TEXT_LEN,
            text_encoder_mask=False,  # LTXPipeline runs T5 without attention_mask
        )
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {CLASS_NAME} config gives no valid DiTConfig: {e}") from None


def inexpressible(cfg: DiTConfig) -> list[str]:
    """Fields of ``cfg`` that ``LTXVideoTransformer3DModel`` cannot express (empty when it can)."""
    wanted = dict(
        patch_size=(1, 1, 1), mlp="gelu_tanh", ffn_hidden=4 * cfg.hidden_size, attention_layout="full",
        qk_norm="across_heads", block_norm="rmsnorm", pos_embed="rope_ltx", rope_theta=10000.0,
        rope_base=ROPE_BASE, modulation="shared", conditioning="text", cross_attn_norm=False,
        norm_eps=FINAL_EPS, qk_norm_eps=QK_EPS, freq_dim=256, fps_conditioning=False,
        parametrization="standard", abs_pos_embed="none", text_pos_embed=False, text_pool=False,
    )  # fmt: skip
    return [f"{k}={getattr(cfg, k)!r} (LTX: {v!r})" for k, v in wanted.items() if getattr(cfg, k) != v]


def diffusers_config(cfg: DiTConfig) -> dict:
    """The ``LTXVideoTransformer3DModel`` ``config.json`` fields of ``cfg`` (one :func:`inexpressible`
    accepts)."""
    config = {
        "in_channels": cfg.in_channels + cfg.cond_channels,
        "out_channels": cfg.out_ch,
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "cross_attention_dim": cfg.hidden_size,
        "num_layers": cfg.depth,
        "norm_eps": cfg.norm_eps,
        "caption_channels": cfg.text_dim,
        **FIXED,
    }
    return config


def infer_config(state: dict[str, Tensor], path: Path) -> dict:
    """The ``config.json`` fields of a lone LTX-Video ``.safetensors``, from its tensors' names and shapes
    (the head count only for the published width, else this asks for the folder)."""
    d, c_in = state["proj_in.weight"].shape
    if d not in PUBLISHED_HEADS:
        raise ValueError(
            f"{path}: an LTX-Video transformer {d} wide, whose head count its tensors do not tell (no "
            f"config.json beside it): pass the diffusers model folder with its config.json"
        )
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks."))
    config = {
        "in_channels": c_in,
        "out_channels": state["proj_out.weight"].shape[0],
        "num_attention_heads": PUBLISHED_HEADS[d],
        "attention_head_dim": d // PUBLISHED_HEADS[d],
        "cross_attention_dim": state["transformer_blocks.0.attn2.to_k.weight"].shape[1],
        "num_layers": layers,
        "norm_eps": FINAL_EPS,
        "caption_channels": state["caption_projection.linear_1.weight"].shape[1],
        **FIXED,
    }
    if "transformer_blocks.0.norm1.weight" in state:
        config["norm_elementwise_affine"] = True  # to_ours then names it
    return config
