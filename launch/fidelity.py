"""Fréchet distances (FID on frames, FVD on clips) and a CLIP text–video score for generated videos.

The arithmetic is torchmetrics' (:class:`~torchmetrics.image.fid.FrechetInceptionDistance` for both
Fréchet distances: running feature sums and cross-products in float64, summed over ranks at compute;
:class:`~torchmetrics.multimodal.clip_score.CLIPScore` for the CLIP score); this module is the glue:
loading the user's networks from local files, bringing frames to each network's input convention,
and checking what a network returns before any sample is scored.

Every network comes from a local path the user names in the config; nothing is downloaded:

- ``eval.fid_features``: an image feature network as a TorchScript file, e.g. the reference
  ``inception-2015-12-05.pt``. It receives B×3×299×299 **uint8** frames
  in [0, 255] (frames resized bilinearly, ``align_corners=False``, and rounded), the convention of
  the reference TorchScript Inception and of torchmetrics' own, and returns B×F features.
- ``eval.fvd_features``: a video feature network, a TorchScript file too, e.g. the reference FVD I3D
  ``i3d_torchscript.pt``. It receives B×3×T×224×224 **float32 in [-1, 1]**: every frame resized
  bilinearly so that its shorter side is 224, then centre-cropped to 224×224 (the preprocessing of
  the StyleGAN-V-derived FVD implementations that call the I3D with its own resizing turned off).
  The I3D needs enough frames for its temporal pooling (16 is the usual clip length).
- A network whose ``forward`` takes ``return_features`` / ``rescale`` / ``resize`` arguments (the
  reference Inception and I3D do) is called with ``return_features=True, rescale=False,
  resize=False``: raw pre-logit features, with this module doing the resizing and scaling.
- ``eval.clip_model``: a transformers CLIP folder (``config.json`` with ``model_type: clip``,
  ``model.safetensors``, tokenizer and preprocessor files), loaded with ``local_files_only`` and
  safetensors only.

Loading a TorchScript file runs the TorchScript program stored in it (TorchScript's own interpreter
and unpickler, which rebuild tensors and TorchScript objects only, never arbitrary Python): that is
the format the reference FVD I3D ships in, and the user names the file. This is the one place the
framework loads a program from a file, and only on that explicit request; shards and checkpoints never
are. A ``torch.export`` ``.pt2`` is refused: ``torch.export.load`` falls back to full pickle for its
sample inputs, so a crafted file could run any Python. A ``.safetensors`` file holds weights without a
network and is refused too. Every network is run once at construction on a small input of the clips'
own length (a wrong file, a wrong output shape or non-finite features fail at start-up, not at the
first evaluation).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.multimodal.clip_score import CLIPScore

FID_SIZE = 299
"""Side of the square uint8 frames the image feature network receives (the Inception's input)."""
FVD_SIZE = 224
"""Side of the square [-1, 1] frames the video feature network receives (the I3D's input)."""
PROBE_FRAMES = 16
"""Frames of the test clip run through the video network at construction (the I3D's clip length)."""
CHUNK = 64
"""Frames (FID, CLIP) or clips (FVD) per feature-network call, to bound activation memory."""
_FEATURE_KWARGS = {"return_features": True, "rescale": False, "resize": False}
"""Keyword arguments given to a network whose forward accepts them (the reference Inception / I3D)."""


@dataclass
class FidelityConfig:
    """Feature networks for FID, FVD and the CLIP score, all local files (empty: that metric is off)."""

    fid_features: str = ""
    """A TorchScript image feature network: B×3×299×299 uint8 in [0, 255]
    → B×F, e.g. the reference ``inception-2015-12-05.pt``. FID uses every frame of every clip."""
    fvd_features: str = ""
    """A TorchScript video feature network: B×3×T×224×224 float in [-1, 1] → B×F, e.g.
    the reference FVD I3D ``i3d_torchscript.pt``."""
    clip_model: str = ""
    """A local transformers CLIP folder (config.json, model.safetensors, tokenizer and preprocessor
    files); the CLIP score is the mean over frames of the frame–prompt CLIPScore."""

    def enabled(self) -> bool:
        """Whether any metric is configured."""
        return bool(self.fid_features or self.fvd_features or self.clip_model)

    def validate(self, key: str = "eval") -> None:
        """Cheap checks before any training: every configured path exists (files are loaded and their
        networks probed when :class:`VideoFidelity` is built)."""
        for name in ("fid_features", "fvd_features"):
            path = getattr(self, name)
            if not isinstance(path, str):
                raise ValueError(f"{key}.{name}={path!r}: expected a file path")
            if path and not Path(path).is_file():
                raise ValueError(f"{key}.{name}={path!r}: no such file")
        if not isinstance(self.clip_model, str):
            raise ValueError(f"{key}.clip_model={self.clip_model!r}: expected a folder path")
        if self.clip_model and not Path(self.clip_model).is_dir():
            raise ValueError(f"{key}.clip_model={self.clip_model!r}: no such folder")


def load_feature_net(path: str, key: str, device: torch.device) -> nn.Module:
    """A TorchScript network (``torch.jit.load``) from a local file.

    Args:
        path: the file the user named.
        key: the config key it came from, for errors (``eval.fid_features``).
        device: where the network runs.
    """
    where = f"{key}={path!r}"
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{where}: no such file")
    if p.suffix == ".safetensors":
        raise ValueError(
            f"{where}: a .safetensors file holds weights without a network; give a TorchScript file "
            "(torch.jit.script/trace(net).save(...))"
        )
    if p.suffix == ".pt2":
        # torch.export.load retries its sample inputs with full pickle when the safe load fails: a
        # crafted .pt2 could run any Python, so it is not opened at all
        raise ValueError(
            f"{where}: a torch.export .pt2 is not accepted (loading one may unpickle arbitrary objects); "
            "save the network as TorchScript: torch.jit.script/trace(net).save(...)"
        )
    try:
        with warnings.catch_warnings():
            # torch 2.13 deprecates TorchScript; the reference Inception and I3D ship only as TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(p, map_location=device)
    except Exception as e:
        raise ValueError(
            f"{where}: not a TorchScript file ({_first_line(e)}); a plain state dict or pickled module "
            "is not accepted: save the network with torch.jit.script/trace(net).save(...)"
        ) from e
    return net.eval()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _accepted_kwargs(net: nn.Module) -> dict[str, bool]:
    """The subset of :data:`_FEATURE_KWARGS` that ``net.forward`` takes (TorchScript keeps the schema;
    an exported program is called with its input only)."""
    try:
        names = {a.name for a in net.forward.schema.arguments}
    except AttributeError:
        return {}
    return {k: v for k, v in _FEATURE_KWARGS.items() if k in names}


class _Features(nn.Module):
    """The user's network behind this module's input convention; ``prepare`` maps uint8 frames/clips to
    what the network receives. torchmetrics calls ``forward`` and reads ``num_features``."""

    def __init__(
        self, net: nn.Module, key: str, path: str, prepare: Callable, what: str, probe: torch.Tensor
    ) -> None:
        super().__init__()
        self.net, self.key, self.path, self.prepare, self.what = net, key, path, prepare, what
        self.kwargs = _accepted_kwargs(net)
        # run a small input through now, so a wrong file fails at start-up instead of at the first eval
        with torch.no_grad(), torch.autocast(probe.device.type, enabled=False):
            out = self(probe)
        self.num_features = int(out.shape[1])

    def train(self, mode: bool = True) -> _Features:
        # an exported program refuses .train()/.eval(); the loaded network stays in inference mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp = self.prepare(x)
        try:
            out = self.net(inp, **self.kwargs)
        except Exception as e:
            hint = ""
            if inp.ndim == 5:  # a video network's temporal pooling needs enough frames (the I3D ~10+)
                hint = f"; clips of {inp.shape[2]} frames may be too short for it"
            raise ValueError(
                f"{self.key}={self.path!r}: the network failed on a {_shape(inp)} {inp.dtype} input "
                f"({self.what}): {_first_line(e)}{hint}"
            ) from e
        if not (
            isinstance(out, torch.Tensor)
            and out.ndim == 2
            and out.shape[0] == inp.shape[0]
            and out.shape[1] > 0
        ):
            got = f"a {_shape(out)} tensor" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
            raise ValueError(
                f"{self.key}={self.path!r}: for a {_shape(inp)} input ({self.what}) the network returned "
                f"{got}; expected a {inp.shape[0]}×F feature tensor"
            )
        out = out.float()
        if not bool(torch.isfinite(out).all()):
            raise ValueError(
                f"{self.key}={self.path!r}: for a {_shape(inp)} input ({self.what}) the network returned "
                "non-finite features (NaN or inf)"
            )
        return out


def _shape(t: torch.Tensor) -> str:
    return "×".join(str(s) for s in t.shape)


def frames_for_fid(frames: torch.Tensor) -> torch.Tensor:
    """N×3×H×W uint8 → N×3×299×299 uint8: bilinear resize (``align_corners=False``) and rounding."""
    x = F.interpolate(frames.float(), size=(FID_SIZE, FID_SIZE), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def clips_for_fvd(clips: torch.Tensor) -> torch.Tensor:
    """B×3×T×H×W uint8 → B×3×T×224×224 float32 in [-1, 1]: each frame resized bilinearly so that its
    shorter side is 224, centre-cropped, then scaled."""
    b, c, t, h, w = clips.shape
    scale = FVD_SIZE / min(h, w)
    size = (max(FVD_SIZE, math.ceil(h * scale)), max(FVD_SIZE, math.ceil(w * scale)))
    frames = clips.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w).float() / 255  # B*T, 3, H, W
    frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False)
    top, left = (size[0] - FVD_SIZE) // 2, (size[1] - FVD_SIZE) // 2
    frames = frames[:, :, top : top + FVD_SIZE, left : left + FVD_SIZE]
    x = frames.reshape(b, t, c, FVD_SIZE, FVD_SIZE).permute(0, 2, 1, 3, 4)  # B, 3, T, 224, 224
    return (x * 2 - 1).contiguous()


def _probe_input(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Random uint8 frames from a private generator: building the metrics leaves the global RNG (and so
    the training run's random stream) untouched."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).to(device)


def _frechet(features: _Features, device: torch.device) -> FrechetInceptionDistance:
    metric = FrechetInceptionDistance(feature=features, reset_real_features=True).to(device)
    # torchmetrics records the feature dtype in update(); a rank that scored nothing computes too
    metric.orig_dtype = torch.float32
    return metric


class _CLIPFeatures(nn.Module):
    """A transformers CLIPModel as torchmetrics' CLIPScore calls it: ``get_*_features`` returning
    tensors (transformers 5 returns a model output whose ``pooler_output`` is the projection)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def _pooled(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def load_clip(path: str, key: str) -> tuple[nn.Module, object]:
    """A transformers CLIP model and processor from a local folder, offline, safetensors only.

    Args:
        path: the folder the user named.
        key: the config key it came from, for errors (``eval.clip_model``).
    """
    where = f"{key}={path!r}"
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{where}: no such folder")
    config = folder / "config.json"
    if not config.is_file():
        raise ValueError(f"{where}: not a transformers CLIP folder (no config.json)")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{where}: not a transformers CLIP folder (config.json unreadable: {e})") from e
    if model_type != "clip":
        raise ValueError(
            f"{where}: not a transformers CLIP folder "
            f"(config.json model_type {model_type!r}, expected 'clip')"
        )
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ValueError(
            f"{where}: cannot load the CLIP model or processor offline ({_first_line(e)})"
        ) from e
    return _CLIPFeatures(model.eval()), processor


def as_videos(videos: np.ndarray | torch.Tensor, name: str, device: torch.device) -> torch.Tensor:
    """B×T×H×W×3 uint8 (the framework's sample layout) → B×3×T×H×W uint8 on ``device``."""
    v = torch.from_numpy(np.ascontiguousarray(videos)) if isinstance(videos, np.ndarray) else videos
    if not isinstance(v, torch.Tensor) or v.dtype != torch.uint8 or v.ndim != 5 or v.shape[-1] != 3:
        got = f"{_shape(v)} {v.dtype}" if isinstance(v, torch.Tensor) else type(videos).__name__
        raise ValueError(f"VideoFidelity.update: {name} must be B×T×H×W×3 uint8 videos, got {got}")
    return v.to(device).permute(0, 4, 1, 2, 3)  # B, 3, T, H, W


class VideoFidelity:
    """FID (every frame as an image), FVD (clips) and the CLIP score of generated videos.

    ``compute()`` is a collective when torch.distributed is initialised: torchmetrics sums every
    metric's states over the default group, so each rank updates with its own share of the clips and
    a rank that generated nothing still calls ``compute()`` (and contributes nothing).

    Args:
        cfg: which networks to load (empty fields: metric off).
        device: where the networks run and the states live.
        key: the config section the fields came from, for errors.
        clip: (frames, height, width) of the clips that will be scored: the networks are tried on two
            such clips at construction (default: 16 frames of 32×32).
    """

    def __init__(
        self,
        cfg: FidelityConfig,
        device: torch.device,
        key: str = "eval",
        clip: tuple[int, int, int] | None = None,
    ):
        self.device = torch.device(device)
        self.fid = self.fvd = self.clip = None
        if cfg.fid_features:
            where = (f"{key}.fid_features", cfg.fid_features)
            net = load_feature_net(cfg.fid_features, where[0], self.device)
            probe = _probe_input((2, 3, *(clip or (1, 32, 32))[1:]), self.device)
            features = _Features(net, *where, frames_for_fid, "N×3×299×299 uint8 frames in [0, 255]", probe)
            self.fid = _frechet(features, self.device)
        if cfg.fvd_features:
            where = (f"{key}.fvd_features", cfg.fvd_features)
            net = load_feature_net(cfg.fvd_features, where[0], self.device)
            probe = _probe_input((2, 3, *(clip or (PROBE_FRAMES, 32, 32))), self.device)
            features = _Features(net, *where, clips_for_fvd, "B×3×T×224×224 clips in [-1, 1]", probe)
            self.fvd = _frechet(features, self.device)
        if cfg.clip_model:
            model, processor = load_clip(cfg.clip_model, f"{key}.clip_model")
            self.clip = CLIPScore(model_name_or_path=lambda: (model, processor)).to(self.device)

    @torch.no_grad()
    def update(
        self,
        fake: np.ndarray | torch.Tensor,
        prompts: list[str] | None = None,
        real: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Add generated clips (and, for FID/FVD, real reference clips) to the running statistics.

        Args:
            fake: B×T×H×W×3 uint8 generated videos (``launch.sample.to_uint8``'s layout).
            prompts: the B prompts they were generated for (needed by the CLIP score).
            real: reference videos in the same layout (any B, T, H, W), for FID and FVD.
        """
        fake_v = as_videos(fake, "fake", self.device)
        real_v = None if real is None else as_videos(real, "real", self.device)
        if self.clip is not None and (prompts is None or len(prompts) != fake_v.shape[0]):
            n = None if prompts is None else len(prompts)
            raise ValueError(
                f"VideoFidelity.update: the CLIP score needs one prompt per clip "
                f"({n} prompts for {fake_v.shape[0]} clips)"
            )
        # the feature networks run in fp32 whatever autocast the caller is in
        with torch.autocast(self.device.type, enabled=False):
            for videos, is_real in ((fake_v, False), (real_v, True)):
                if videos is None or videos.shape[0] == 0:
                    continue
                if self.fid is not None:
                    frames = videos.permute(0, 2, 1, 3, 4).flatten(0, 1)  # B*T, 3, H, W
                    for chunk in frames.split(CHUNK):
                        self.fid.update(chunk, real=is_real)
                if self.fvd is not None:
                    for chunk in videos.split(max(1, CHUNK // videos.shape[2])):
                        self.fvd.update(chunk, real=is_real)
            if self.clip is not None:
                for clip, prompt in zip(fake_v, prompts, strict=True):
                    frames = clip.permute(1, 0, 2, 3)  # T, 3, H, W
                    self.clip.update(frames, [prompt] * frames.shape[0])

    def compute(self) -> dict[str, float]:
        """``{"fid", "fvd", "clip_score"}`` for what is configured (a collective under torch.distributed).

        Raises ValueError (on every rank alike) when, over all ranks, a Fréchet distance has fewer than
        two generated or two real samples, or the CLIP score has no frame.
        """
        self._check_counts()
        out = {}
        if self.fid is not None:
            out["fid"] = float(self.fid.compute())
        if self.fvd is not None:
            out["fvd"] = float(self.fvd.compute())
        if self.clip is not None:
            out["clip_score"] = float(self.clip.compute())
        return out

    def reset(self) -> None:
        """Forget every sample (generated and real)."""
        for metric in (self.fid, self.fvd, self.clip):
            if metric is not None:
                metric.reset()

    def _check_counts(self) -> None:
        """One small all-reduce of the sample counts, so that too few samples is one clear error on every
        rank rather than torchmetrics' RuntimeError mid-collective."""
        names, counts = [], []
        for name, metric in (("fid", self.fid), ("fvd", self.fvd)):
            if metric is not None:
                names += [f"{name} generated", f"{name} real"]
                counts += [metric.fake_features_num_samples, metric.real_features_num_samples]
        if self.clip is not None:
            names.append("clip_score frames")
            counts.append(self.clip.n_samples)
        if not counts:
            return
        total = torch.stack([c.to(self.device, torch.long) for c in counts])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
        least = [1 if name.startswith("clip") else 2 for name in names]
        short = [f"{n} {c}" for n, c, m in zip(names, total.tolist(), least, strict=True) if c < m]
        if short:
            raise ValueError(
                "VideoFidelity.compute: too few samples over all ranks (a Fréchet distance needs at least 2 "
                "generated and 2 real, passed as update(real=...); the CLIP score at least 1 frame): "
                + ", ".join(short)
            )
