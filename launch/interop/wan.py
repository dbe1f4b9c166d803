"""diffusers' ``WanTransformer3DModel`` (Wan2.1 T2V, Wan2.2 TI2V-5B and each A14B expert) ↔ SpacetimeDiT.

Every tensor maps one to one; two change layout, both by a reshape only (so a round trip is bit-exact):
the Conv3d patch embedding (D, C, pt, ph, pw) is our linear on patches flattened in (c pt ph pw) order,
and the scale-shift tables (1, n, D) are our modulation tables (n, D). Wan's qk RMSNorm spans all heads
(``qk_norm='across_heads'``); its pipelines pad the UMT5 states to 512 tokens with zeros, mask nothing
and use the encoded empty prompt as the CFG null, which the text convention fields carry.
"""

from __future__ import annotations

import math
from pathlib import Path

from torch import Tensor

from dit.config import DiTConfig
from launch.interop.formats import Rename, refuse

CLASS_NAME = "WanTransformer3DModel"
QK_NORM = "rms_norm_across_heads"
# what every Wan2.x checkpoint in diffusers' format says (and the only values this mapping expresses)
NEUTRAL = {"image_dim": None, "added_kv_proj_dim": None, "pos_embed_seq_len": None, "qk_norm": QK_NORM}
FIELDS = (
    "patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
    "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "eps", "rope_max_seq_len", *NEUTRAL,
)  # fmt: skip
# Wan's text convention: WanPipeline pads to max_sequence_length=512, masks nothing, null = encoded ""
TEXT_LEN = 512
# published widths → heads (every Wan2.x has 128-wide heads), for a lone .safetensors without config.json
PUBLISHED_HEADS = {1536: 12, 3072: 24, 5120: 40}


def owns(keys: list[str]) -> bool:
    """Whether these tensor names are a Wan transformer's."""
    return "patch_embedding.weight" in keys and "condition_embedder.time_proj.weight" in keys


def renames(cfg: DiTConfig) -> list[Rename]:
    """Every tensor of a Wan model of this config: our name, diffusers' name, and the layout change."""
    d, c, p = cfg.hidden_size, cfg.in_channels + cfg.cond_channels, cfg.patch_size
    rs = [
        # Conv3d weight D×C×pt×ph×pw flattened in (c pt ph pw) order: our PatchEmbed's linear
        Rename("patch_embed.proj.weight", "patch_embedding.weight", lambda t: t.reshape(d, -1),
               lambda t: t.reshape(d, c, *p)),
        Rename("patch_embed.proj.bias", "patch_embedding.bias"),
        Rename("final.modulation.table", "scale_shift_table", lambda t: t.reshape(2, d),
               lambda t: t.reshape(1, 2, d)),
    ]  # fmt: skip
    linears = {
        "t_embedder.fc1": "condition_embedder.time_embedder.linear_1",
        "t_embedder.fc2": "condition_embedder.time_embedder.linear_2",
        "t_proj.1": "condition_embedder.time_proj",
        "text_proj.fc1": "condition_embedder.text_embedder.linear_1",
        "text_proj.fc2": "condition_embedder.text_embedder.linear_2",
        "final.linear": "proj_out",
    }
    for i in range(cfg.depth):
        rs.append(
            Rename(f"blocks.{i}.modulation.table", f"blocks.{i}.scale_shift_table",
                   lambda t: t.reshape(6, d), lambda t: t.reshape(1, 6, d))
        )  # fmt: skip
        for ours, theirs in (("attn", "attn1"), ("cross_attn", "attn2")):
            for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0")):
                linears[f"blocks.{i}.{ours}.{a}"] = f"blocks.{i}.{theirs}.{b}"
            for n in ("norm_q", "norm_k"):
                rs.append(Rename(f"blocks.{i}.{ours}.{n}.weight", f"blocks.{i}.{theirs}.{n}.weight"))
        linears[f"blocks.{i}.mlp.fc1"] = f"blocks.{i}.ffn.net.0.proj"
        linears[f"blocks.{i}.mlp.fc2"] = f"blocks.{i}.ffn.net.2"
        if cfg.cross_attn_norm:
            linears[f"blocks.{i}.norm_cross"] = f"blocks.{i}.norm2"  # an affine LayerNorm: weight, bias
    for ours, theirs in linears.items():
        rs += [Rename(f"{ours}.{k}", f"{theirs}.{k}") for k in ("weight", "bias")]
    return rs


# our module → the original Wan checkpoint's (Wan-AI's repository; ComfyUI keeps these names): what LoRA
# files in the ComfyUI / "non-diffusers" layout are keyed by. Blocks: see original_modules.
ORIGINAL_TOP = {
    "t_embedder.fc1": "time_embedding.0",
    "t_embedder.fc2": "time_embedding.2",
    "t_proj.1": "time_projection.1",
    "text_proj.fc1": "text_embedding.0",
    "text_proj.fc2": "text_embedding.2",
    "final.linear": "head.head",
}
# modules whose adapters no Wan LoRA format can carry as they are, and why
LORA_REFUSED = {
    "patch_embed.proj": "Wan's patch embedding is a Conv3d (patch_embedding), ours a linear on patches; "
    "no LoRA loader maps a linear adapter onto it",
}


def original_modules(cfg: DiTConfig) -> dict[str, str]:
    """Our linear modules → their names in the original Wan checkpoint (``blocks.0.self_attn.q``,
    ``blocks.0.ffn.0``, ``head.head`` …), the names ComfyUI's Wan model and diffusers'
    ``_convert_non_diffusers_wan_lora_to_diffusers`` use."""
    names = dict(ORIGINAL_TOP)
    for i in range(cfg.depth):
        for ours, theirs in (("attn", "self_attn"), ("cross_attn", "cross_attn")):
            for a in ("q", "k", "v", "o"):
                names[f"blocks.{i}.{ours}.{a}"] = f"blocks.{i}.{theirs}.{a}"
        names[f"blocks.{i}.mlp.fc1"] = f"blocks.{i}.ffn.0"
        names[f"blocks.{i}.mlp.fc2"] = f"blocks.{i}.ffn.2"
    return names


def config_to_ours(config: dict, where: object) -> DiTConfig:
    """Our architecture for a Wan ``config.json`` (without the ``_`` keys).

    Args:
        config: the fields of ``WanTransformer3DModel``.
        where: the source, for errors.

    Raises:
        ValueError: naming the class and every field we cannot express (Wan2.1-I2V's image embedder
            ``image_dim``/``added_kv_proj_dim``, FLF2V's ``pos_embed_seq_len``, another ``qk_norm``, a
            field this mapping does not know).
    """
    config = {k: v for k, v in config.items() if not k.startswith("_")}  # _class_name, _diffusers_version
    problems = [f"unknown field {k}={v!r}" for k, v in config.items() if k not in FIELDS]
    problems += [
        f"{k}={config[k]!r} (supported: {v!r})" for k, v in NEUTRAL.items() if k in config and config[k] != v
    ]
    refuse(CLASS_NAME, where, problems)
    heads, head_dim = config.get("num_attention_heads", 40), config.get("attention_head_dim", 128)
    in_ch = config.get("in_channels", 16)
    out_ch = config.get("out_channels") or in_ch
    try:
        return DiTConfig(
            in_channels=in_ch,
            out_channels=None if out_ch == in_ch else out_ch,
            patch_size=tuple(config.get("patch_size", (1, 2, 2))),
            hidden_size=heads * head_dim,
            depth=config.get("num_layers", 40),
            num_heads=heads,
            ffn_dim=config.get("ffn_dim", 13824),
            mlp="gelu_tanh",
            attention_layout="full",
            qk_norm="across_heads",
            block_norm="layernorm",
            # Wan's RoPE: per head, t/h/w slices as rope_split; rope_max_seq_len only bounds the grid
            pos_embed="rope3d",
            rope_theta=10000.0,
            modulation="shared",
            conditioning="text",
            text_dim=config.get("text_dim", 4096),
            cross_attn_norm=bool(config.get("cross_attn_norm", True)),
            norm_eps=float(config.get("eps", 1e-6)),
            freq_dim=config.get("freq_dim", 256),
            text_mask=False,
            text_null="empty_prompt",
            text_len=TEXT_LEN,
        )
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {CLASS_NAME} config gives no valid DiTConfig: {e}") from None


def inexpressible(cfg: DiTConfig) -> list[str]:
    """Fields of ``cfg`` that ``WanTransformer3DModel`` cannot express (empty when it can)."""
    wanted = dict(
        mlp="gelu_tanh", attention_layout="full", qk_norm="across_heads", block_norm="layernorm",
        pos_embed="rope3d", rope_theta=10000.0, modulation="shared", conditioning="text",
        fps_conditioning=False, parametrization="standard",
        abs_pos_embed="none", text_pos_embed=False, text_pool=False,  # tables diffusers has no place for
        # WanTransformer3DModel takes no text mask: padded tokens are attended, as WanPipeline pads
        text_mask=False,
    )  # fmt: skip
    return [f"{k}={getattr(cfg, k)!r} (Wan: {v!r})" for k, v in wanted.items() if getattr(cfg, k) != v]


def diffusers_config(cfg: DiTConfig) -> dict:
    """The ``WanTransformer3DModel`` ``config.json`` fields of ``cfg`` (one :func:`inexpressible` accepts);
    image-to-video ``cond_channels`` become extra ``in_channels`` (Wan I2V concatenates them so)."""
    config = {
        "patch_size": list(cfg.patch_size),
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_channels + cfg.cond_channels,
        "out_channels": cfg.out_ch,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_hidden,
        "num_layers": cfg.depth,
        "cross_attn_norm": cfg.cross_attn_norm,
        "eps": cfg.norm_eps,
        "rope_max_seq_len": 1024,
        **NEUTRAL,
    }
    return config


def infer_config(state: dict[str, Tensor], path: Path) -> dict:
    """The ``config.json`` fields of a lone Wan ``.safetensors``, from its tensors' names and shapes.

    Everything but the head count follows from shapes; the heads are known only for the published
    widths (128-wide heads), else this asks for the folder.
    """
    d, c_in, *patch = state["patch_embedding.weight"].shape
    if d not in PUBLISHED_HEADS:
        raise ValueError(
            f"{path}: a Wan transformer {d} wide, whose head count its tensors do not tell (no config.json "
            f"beside it): pass the diffusers model folder with its config.json"
        )
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    config = {
        "patch_size": list(patch),
        "num_attention_heads": PUBLISHED_HEADS[d],
        "attention_head_dim": d // PUBLISHED_HEADS[d],
        "in_channels": c_in,
        "out_channels": state["proj_out.weight"].shape[0] // math.prod(patch),
        "text_dim": state["condition_embedder.text_embedder.linear_1.weight"].shape[1],
        "freq_dim": state["condition_embedder.time_embedder.linear_1.weight"].shape[1],
        "ffn_dim": state["blocks.0.ffn.net.0.proj.weight"].shape[0],
        "num_layers": layers,
        "cross_attn_norm": "blocks.0.norm2.weight" in state,
        "eps": 1e-6,
        "rope_max_seq_len": 1024,
        **NEUTRAL,
    }
    if any(k.startswith("condition_embedder.image_embedder.") for k in state):
        # Wan2.1-I2V-14B: to_ours then names what we cannot express
        config["image_dim"] = state["condition_embedder.image_embedder.norm1.weight"].shape[0]
        config["added_kv_proj_dim"] = config["image_dim"]
    return config
