"""Generate videos from a checkpoint or an export.

    python -m launch.sample CHECKPOINT_OR_EXPORT --prompt "a red circle moves slowly from left to right" \\
        [--prompts FILE] [--image FIRST_FRAME] [--video INPUT --strength S] \\
        [--frames 8 --height 64 --width 64] [--steps 25 --sampler euler --cfg 4 --seed 0] --out OUT.mp4

Text-to-video by default; ``--image`` pins the first frame (image-to-video); ``--video`` noises an input
clip to ``--strength`` and denoises it (video-to-video). Several prompts (``--prompt`` repeated or one
per line in ``--prompts``) are sampled in batches and written as ``OUT-0.mp4``, ``OUT-1.mp4`` …
Latents are decoded through the codec/VAE the model was trained with.

``--grid diffusers`` walks the σ grid of the diffusers scheduler of the sampler (``FlowMatchEuler`` for
``euler``, ``UniPCMultistep`` for ``unipc``), so a model imported from a Wan pipeline samples what
``WanPipeline`` samples. Two experts (Wan2.2-A14B): ``--low-noise LOW`` takes the low-noise expert (the
source is the high-noise one) and ``--boundary B`` the switch (steps at network time ≥ 1000·B run
the source); ``B`` defaults to the pipeline root's ``boundary_ratio`` when the source is one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.encoders import TextEncoder, build_codec
from data.video import MediaError, decode_clip, decode_image, encode_h264, media_kind, probe
from dit.config import DiTConfig
from dit.diffusion import DiffusionConfig, make_objective
from dit.extras import MissingExtra
from dit.model import build_model
from dit.sampling import GRIDS, SAMPLER_NAMES, Experts, sample
from launch.batches import bf16_compute, encoder_dtype, null_condition, text_states
from launch.config import RunConfig, SampleConfig, load_config
from launch.export import TrainedTasks, export_config, read_export_config
from launch.finetune import read_weights
from parallel import checkpoint as ckpt
from parallel.checkpoint import CheckpointError
from parallel.config import check_choice, check_range


def load_for_inference(
    src: str | Path, use_ema: bool = True, device: str = "cpu", expert: str = ""
) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, info with ``arch``, ``diffusion``, ``codec``, ``text_encoder``, ``max_text_len``,
    ``sample``) from an export directory or a checkpoint / run directory (verified), or a diffusers model
    folder or pipeline root (:func:`load_diffusers`; ``expert`` picks one of a two-expert root). A damaged
    or foreign file (weights, ``config.json``) is a :class:`~parallel.checkpoint.CheckpointError` naming
    it."""
    src = Path(src)
    if _is_diffusers(src):
        return load_diffusers(src, expert, device)
    if (src / "config.json").is_file():
        weights, _ = read_weights(src, use_ema)
        info = read_export_config(src / "config.json")
    else:
        # one checkpoint for the weights, the config and the step (a run still training may add one)
        try:
            path = ckpt.resolve(src)
        except FileNotFoundError:
            path = src  # read_weights names what is there instead
        weights, _ = read_weights(path, use_ema)
        cfg = load_config(path / "config.yaml")
        info = export_config(cfg, ckpt.marker(path)["step"], path) | {
            "arch": cfg.model.arch,
            "diffusion": cfg.diffusion,
            "sample": cfg.sample,
            "train_tasks": TrainedTasks.of(cfg),
        }
    for key in ("arch", "diffusion"):
        if key not in info:
            raise CheckpointError(f"{src / 'config.json'}: no {key!r}: inference needs it")
    model = build_model(info["arch"], device=device)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:  # weights of another architecture than the config says
        raise CheckpointError(f"{src}: the weights do not fit the arch of its config: {e}") from None
    return model.eval(), info


def _is_diffusers(src: Path) -> bool:
    """A diffusers pipeline root or model folder (``config.json`` with ``_class_name``), not our export."""
    if (src / "model_index.json").is_file():
        return True
    from launch.interop import is_diffusers  # only when the source may be one

    return (src / "config.json").is_file() and is_diffusers(src)


def load_diffusers(src: Path, expert: str = "", device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """A diffusers transformer (model folder or pipeline root) as :func:`load_for_inference` returns
    models: the architecture and text convention from its ``config.json`` (:func:`launch.interop.to_ours`),
    the flow shift from the root's ``scheduler/scheduler_config.json`` (``shift``, or UniPC's
    ``flow_shift``; 1 without one), the root's ``vae/`` and ``text_encoder/`` folders when it has them
    (else ``codec`` / ``text_encoder`` are None: the latents can be sampled, not decoded).

    Args:
        src: the folder or root.
        expert: ``high_noise`` / ``low_noise`` for a two-expert root (Wan2.2-A14B).
        device: where the model is built.
    """
    from launch.interop import read_diffusers, to_ours

    try:
        arch, state = to_ours(read_diffusers(src, expert=expert))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{src}: {e}") from None
    model = build_model(arch, device=device)
    model.load_state_dict(state, strict=True)
    shift = 1.0
    sched = src / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        conf = json.loads(sched.read_text())
        shift = float(conf.get("flow_shift", conf.get("shift", 1.0)))
    info = {
        "arch": arch,
        "diffusion": DiffusionConfig(objective="flow", shift=shift),
        "codec": str(src / "vae") if (src / "vae").is_dir() else None,
        "text_encoder": str(src / "text_encoder") if (src / "text_encoder").is_dir() else None,
        "max_text_len": arch.text_len or 512,
        "sample": None,
    }
    return model.eval(), info


def read_prompts(prompts: list[str] | None, prompts_file: str | None) -> list[str]:
    """The ``--prompt`` captions, then one per non-blank line of ``--prompts FILE``; at least one."""
    out = list(prompts or [])
    if prompts_file:
        lines = Path(prompts_file).read_text(encoding="utf-8").splitlines()
        out += [line.strip() for line in lines if line.strip()]
    if not out:
        raise SystemExit("give --prompt TEXT (repeatable) or --prompts FILE")
    return out


@dataclass
class SampleRequest:
    """What to generate and where (``launch.sample``'s options); None takes the run's ``sample`` value."""

    out: str
    """Output .mp4; numbered (``OUT-0.mp4`` …) when there are several prompts."""
    frames: int | None = None
    """Clip length in pixel frames."""
    height: int | None = None
    """Clip height in pixels."""
    width: int | None = None
    """Clip width in pixels."""
    fps: float | None = None
    """Frame rate of the clip (and the model's fps conditioning)."""
    steps: int | None = None
    """Sampler steps."""
    sampler: str | None = None
    """One of :data:`dit.sampling.SAMPLER_NAMES`."""
    cfg: float | None = None
    """Classifier-free guidance scale (1: off)."""
    seed: int = 0
    """Seed of the first batch; a batch starting at prompt ``i`` uses ``seed + i``."""
    batch_size: int = 4
    """Prompts sampled together."""
    device: str = "cpu"
    """Device the DiT, the codec and the text encoder run on."""
    precision: str = "auto"
    """``auto`` | ``bf16`` | ``fp32``: see :func:`launch.batches.bf16_compute`."""
    image: str | None = None
    """First frame (image-to-video)."""
    video: str | None = None
    """Input clip (video-to-video)."""
    strength: float = 0.6
    """Video-to-video: the share of the noise grid the input clip is noised to."""

    def __post_init__(self) -> None:
        """A ValueError naming the option (``--steps`` …) whose value cannot be right."""
        for name in ("frames", "height", "width", "steps"):
            if getattr(self, name) is not None:
                check_range(getattr(self, name), f"--{name}", 1)
        check_range(self.batch_size, "--batch-size", 1)
        if self.fps is not None:
            check_range(self.fps, "--fps", 0.0, math.inf, open_low=True, open_high=True)
        if self.cfg is not None:
            check_range(self.cfg, "--cfg", 0.0, math.inf, open_high=True)
        check_range(self.strength, "--strength", 0.0, 1.0)  # 0: the input clip back
        if self.sampler is not None:
            check_choice(self.sampler, SAMPLER_NAMES, "--sampler")
        check_choice(self.precision, RunConfig.PRECISIONS, "--precision")

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> SampleRequest:
        """The request of parsed :func:`build_parser` options (each field has an option of its name;
        ``--grid``, ``--low-noise`` and ``--boundary`` are read by :func:`main`)."""
        return cls(**{f.name: getattr(a, f.name) for f in dataclasses.fields(cls)})


def _pixels(path: str, frames: int, fps: float, size: tuple[int, int]) -> torch.Tensor:
    """1×3×T×H×W in [-1, 1] from an image (T = 1) or the first ``frames`` frames of a video."""
    data = Path(path).read_bytes()
    ext = Path(path).suffix.lower().lstrip(".")
    try:
        if media_kind(ext) == "image":
            arr = decode_image(data, size)
        else:
            probe(data, ext)  # names an unknown extension or an undecodable file
            arr = decode_clip(data, 0.0, frames, fps, size, ext=ext)  # the demuxer probe() used
    except (MediaError, OSError) as e:
        raise SystemExit(f"{path}: cannot use as {'an image' if frames == 1 else 'a video'}: {e}") from e
    return torch.from_numpy(arr.copy()).permute(3, 0, 1, 2)[None].float() / 127.5 - 1


def build_parser() -> argparse.ArgumentParser:
    """``launch.sample``'s options: the source and prompts, then one per :class:`SampleRequest` field."""
    p = argparse.ArgumentParser(prog="python -m launch.sample", description="Generate videos.")
    p.add_argument("source", help="an export directory, a checkpoint or a run directory")
    p.add_argument("--prompt", action="append", help="a caption (repeatable)")
    p.add_argument("--prompts", help="a text file with one caption per line")
    p.add_argument("--image", help="first frame (image-to-video)")
    p.add_argument("--video", help="input clip (video-to-video)")
    p.add_argument("--strength", type=float, default=0.6, help="video-to-video: share of the noise grid")
    p.add_argument("--frames", type=int, help="frames in pixels (default: the run's sample.frames)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--fps", type=float)
    p.add_argument("--steps", type=int)
    p.add_argument("--sampler", choices=SAMPLER_NAMES)
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (1: off)")
    p.add_argument(
        "--grid",
        choices=GRIDS,
        help="sampling grid: uniform (ours) or diffusers (the grid of the sampler's diffusers scheduler, "
        "as WanPipeline steps); default: the run's sample.grid",
    )
    p.add_argument(
        "--low-noise",
        dest="low_noise",
        help="the low-noise expert of a two-expert model (Wan2.2-A14B); the source is the high-noise one",
    )
    p.add_argument(
        "--boundary",
        type=float,
        help="two experts: the high-noise expert runs at t >= BOUNDARY (default: the pipeline root's "
        "boundary_ratio)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even if an EMA exists")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--precision",
        choices=RunConfig.PRECISIONS,
        default="auto",
        help="the DiT under bf16 autocast (fp32 weights), as the run trained; auto: bf16 on CUDA. On CUDA "
        "the text encoder and VAE then load in bf16 too",
    )
    p.add_argument("--out", required=True, help="output .mp4 (numbered when there are several prompts)")
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    try:
        req = SampleRequest.from_args(a)  # before any weight is read
        if a.boundary is not None:
            check_range(a.boundary, "--boundary", 0.0, 1.0)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    for path in (a.image, a.video, a.prompts):
        if path and not Path(path).is_file():
            raise SystemExit(f"{path}: no such file")
    prompts = read_prompts(a.prompt, a.prompts)
    try:
        if not a.low_noise and _root_boundary(Path(a.source)) is not None:  # a two-expert pipeline root
            model, info = load_for_inference(a.source, device=a.device, expert="high_noise")
            low, low_info = load_for_inference(a.source, device=a.device, expert="low_noise")
            model = experts(model, info, low, low_info, a.source, a.boundary)
        else:
            model, info = load_for_inference(a.source, use_ema=not a.no_ema, device=a.device)
        if a.low_noise:
            low, low_info = load_for_inference(a.low_noise, use_ema=not a.no_ema, device=a.device)
            model = experts(model, info, low, low_info, a.source, a.boundary)
    except (CheckpointError, ValueError) as e:  # a damaged or foreign file: the message names it
        raise SystemExit(f"error: {e}") from None
    if a.image and (note := untrained_i2v(info.get("train_tasks"))):
        print(f"warning: {a.source}: {note}", file=sys.stderr)
    try:
        written = generate(model, info, prompts, req, grid=a.grid)
    except MissingExtra as e:  # the export's codec is a diffusers VAE, and diffusers is not installed
        raise SystemExit(f"error: {e}") from None
    print("wrote " + ", ".join(str(w) for w in written))


def untrained_i2v(tasks: TrainedTasks | None) -> str:
    """Why image-to-video from a model trained with ``tasks`` may not follow the image, or "": it was
    trained with ``train.task_i2v`` > 0 (or continuation from one clean frame, the same task), or its
    training is unknown (None: an older export, an imported model; Wan2.2 TI2V learned it)."""
    if tasks is None or tasks.task_i2v > 0:
        return ""
    if tasks.task_continuation > 0 and tasks.continuation_frames == 1:
        return ""
    if tasks.task_continuation > 0:
        note = (
            f"this model was trained with train.task_i2v=0 and task_continuation={tasks.task_continuation:g} "
            f"(continuation_frames={tasks.continuation_frames}): it saw clean leading latent frames, never "
            "one alone; expect the frames after the image to follow it loosely"
        )
    else:
        note = (
            "this model was trained with train.task_i2v=0: it never saw a clean first frame; expect the "
            "frames after the image to ignore it"
        )
    if tasks.init_from:
        note += f" (unless init.from={tasks.init_from}, which it was fine-tuned from, learned image-to-video)"
    return note + ". Train with train.task_i2v > 0 for image-to-video"


def experts(high, info: dict, low, low_info: dict, source: str | Path, boundary: float | None) -> Experts:
    """The two-expert model of ``launch.sample SOURCE --low-noise LOW [--boundary B]``: ``high`` runs at
    network times ≥ 1000·B, ``low`` below (as ``WanPipeline`` with ``transformer_2``).

    Args:
        high, info: the source's model and info (:func:`load_for_inference`).
        low, low_info: the low-noise expert's.
        source: the source path: a Wan2.2 pipeline root gives the default boundary.
        boundary: ``--boundary``; None takes the root's ``boundary_ratio``.

    Raises:
        ValueError: the experts' architectures or text conventions differ, or no boundary is known.
    """
    fields = ("in_channels", "text_dim", "conditioning", "text_mask", "text_null", "text_len", "patch_size")
    differ = [f for f in fields if getattr(info["arch"], f) != getattr(low_info["arch"], f)]
    if differ:
        raise ValueError(f"--low-noise: the experts differ in model.arch.{', model.arch.'.join(differ)}")
    if boundary is None:
        boundary = _root_boundary(Path(source))
    if boundary is None:
        raise ValueError(
            f"--low-noise: give --boundary (the source {source} is no pipeline root with a boundary_ratio)"
        )
    return Experts(high, low, boundary)


def _root_boundary(root: Path) -> float | None:
    """``boundary_ratio`` of a diffusers pipeline root (Wan2.2-A14B), or None."""
    if not (root / "model_index.json").is_file():
        return None
    from launch.interop import wan_boundary  # only for a diffusers root

    return wan_boundary(root)


def generate(
    model, info: dict, prompts: list[str], req: SampleRequest, grid: str | None = None
) -> list[Path]:
    """Sample, decode and write one mp4 per prompt; returns the paths written.

    Args:
        model: The DiT in eval mode (:func:`load_for_inference`), or an :class:`~dit.sampling.Experts`
            pair (:func:`experts`).
        info: Its ``arch``, ``diffusion``, ``codec``, ``text_encoder``, ``max_text_len`` and ``sample``
            (the run's sampling defaults, for the request's None fields).
        prompts: Captions, or class ids as strings for a class-conditional model.
        req: What to generate and where.
        grid: The sampling grid (``--grid``, :func:`dit.sampling.sampling_grid`); None: the run's.
    """
    arch, defaults = info["arch"], info.get("sample") or SampleConfig()
    frames, height = req.frames or defaults.frames, req.height or defaults.height
    width, fps = req.width or defaults.width, req.fps or defaults.fps
    bf16 = bf16_compute(req.precision, req.device)
    enc_dtype = encoder_dtype(bf16, req.device)
    missing = [k for k in ("codec", "text_encoder") if info.get(k) is None]
    if missing and (missing != ["text_encoder"] or arch.conditioning == "text"):
        raise SystemExit(
            f"error: the source has no {' and no '.join(m.replace('codec', 'vae') + '/' for m in missing)} "
            "folder to decode / encode with (a diffusers transformer alone samples latents only: "
            "launch.sample.latents_for)"
        )
    codec = build_codec(info["codec"], device=req.device, dtype=enc_dtype)
    if not getattr(codec, "decodes", True):  # before any sampling, not after it
        raise SystemExit(
            f"error: the run's data.codec={info['codec']!r} only declares latent geometry and cannot decode "
            "samples; decode the latents with the VAE they were made with"
        )
    obj = make_objective(info["diffusion"])
    text = None
    if arch.conditioning == "text":
        text = TextEncoder(
            info["text_encoder"], info["max_text_len"], req.device, enc_dtype, arch.text_encoder_mask
        )
    first = video = None
    if req.image:
        image = _pixels(req.image, 1, fps, (width, height)).to(req.device)  # 1, 3, 1, H, W
        first = codec.encode(image)[:, :, 0]  # 1, C, H, W
    if req.video:
        video = codec.encode(_pixels(req.video, frames, fps, (width, height)).to(req.device))
    out, written = Path(req.out), []
    for start in range(0, len(prompts), req.batch_size):
        clips = videos_for(
            model,
            obj,
            arch,
            codec,
            text,
            prompts[start : start + req.batch_size],
            frames=frames,
            height=height,
            width=width,
            fps=fps,
            steps=req.steps or defaults.steps,
            sampler=req.sampler or defaults.sampler,
            cfg_scale=req.cfg if req.cfg is not None else defaults.cfg,
            seed=req.seed + start,
            device=req.device,
            first_frame=first,
            video=video,
            strength=req.strength,
            bf16=bf16,
            grid=grid or defaults.grid,
        )
        for n, clip in enumerate(clips, start):
            path = out if len(prompts) == 1 else out.with_name(f"{out.stem}-{n}{out.suffix}")
            path.parent.mkdir(parents=True, exist_ok=True)
            write_mp4(path, clip, fps, caption=prompts[n])
            written.append(path)
    return written


@torch.no_grad()
def videos_for(model, obj, arch: DiTConfig, codec, encode_text, prompts: list[str], **kw) -> np.ndarray:
    """One video per prompt, decoded: B×T×H×W×3 uint8 (see :func:`latents_for` for the arguments;
    ``codec`` decodes the latents and sets their shape through its compression)."""
    z = latents_for(model, obj, arch, codec.compression, encode_text, prompts, **kw)
    return decode(codec, z)


def decode(codec, z: torch.Tensor) -> np.ndarray:
    """Latents → B×T×H×W×3 uint8 through ``codec`` (its own dtype: bf16 VAE weights on CUDA)."""
    return to_uint8(codec.decode(z.float()))


@torch.no_grad()
def latents_for(
    model,
    obj,
    arch: DiTConfig,
    compression,
    encode_text,
    prompts: list[str],
    *,
    frames: int,
    height: int,
    width: int,
    fps: float,
    steps: int,
    sampler: str,
    cfg_scale: float,
    seed: int,
    device,
    first_frame: torch.Tensor | None = None,
    video: torch.Tensor | None = None,
    strength: float = 1.0,
    bf16: bool = False,
    grid: str = "uniform",
    noise: torch.Tensor | None = None,
    empty_prompt: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sampled latents, one per prompt (class ids as strings for a class-conditional model).

    Args:
        model: the DiT, or an :class:`~dit.sampling.Experts` pair.
        compression: the codec's :class:`~data.buckets.Compression`, for the latent shape.
        encode_text: captions → (states, mask); used by text-conditioned models.
        frames, height, width: the clip in pixels.
        first_frame: 1×C×H×W latent for image-to-video; video: 1×C×T×H×W latents for video-to-video.
        bf16: run the model under bf16 autocast (the training precision; the weights stay as they
            are, the sampler integrates in fp32).
        grid: the sampling grid (:func:`dit.sampling.sampling_grid`).
        noise: the initial noise (B×C×T×H×W latents), e.g. a reference pipeline's; None: from ``seed``.
        empty_prompt: see :func:`conditions`.
    """
    b, comp = len(prompts), compression
    shape = (b, arch.in_channels, comp.latent_frames(frames), height // comp.spatial, width // comp.spatial)
    model_kwargs, uncond_kwargs = conditions(
        arch, encode_text, prompts, fps=fps, cfg_scale=cfg_scale, device=device, empty_prompt=empty_prompt
    )
    # no weight-cast cache across the sampler's steps: under ZeRO-3 it would hold a bf16 copy of every
    # weight for the whole loop; recasting each step costs little next to the matmuls
    dev = torch.device(device).type
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
        return sample(
            model,
            obj,
            shape,
            model_kwargs,
            uncond_kwargs,
            sampler=sampler,
            steps=steps,
            cfg_scale=cfg_scale,
            seed=seed,
            device=device,
            first_frame=None if first_frame is None else first_frame.expand(b, -1, -1, -1),
            first_frame_as="cond" if arch.cond_channels else "frames",
            video=None if video is None else video.expand(b, -1, -1, -1, -1),
            strength=strength,
            grid=grid,
            noise=noise,
        )


def conditions(
    arch: DiTConfig,
    encode_text,
    prompts: list[str],
    *,
    fps: float,
    cfg_scale: float,
    device,
    empty_prompt: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[dict, dict | None]:
    """The model's conditional keyword arguments for ``prompts`` and, with guidance, the unconditional
    ones, under the model's text convention (``arch.text_mask`` / ``arch.text_null``, the functions
    caption dropout uses: the CFG null is the training null).

    Args:
        arch: the model's architecture.
        encode_text: captions → (states, mask) as the text encoder returns them.
        prompts: captions (class ids as strings for a class-conditional model).
        fps: the clip's frame rate (fps-conditioned models).
        cfg_scale: guidance; 1 makes no unconditional inputs.
        device: where the inputs go.
        empty_prompt: the encoded empty caption for ``text_null=empty_prompt``; None encodes it with
            ``encode_text([""])`` (alone, as :meth:`launch.batches.Conditioner.empty_prompt` does).
            A caller whose ``encode_text`` does not encode what it is given must pass it.
    """
    b, model_kwargs = len(prompts), {}
    if arch.conditioning == "text":
        emb, mask = text_states(arch, *encode_text(prompts))
        model_kwargs = {"context": emb.to(device), "context_mask": None if mask is None else mask.to(device)}
    elif arch.conditioning == "class":
        model_kwargs = {"labels": torch.tensor([_class_id(p, arch) for p in prompts], device=device)}
    if arch.needs_fps:
        model_kwargs["fps"] = torch.full((b,), float(fps), device=device)
    if cfg_scale == 1:
        return model_kwargs, None
    if arch.conditioning == "text" and arch.text_null == "empty_prompt" and empty_prompt is None:
        empty_prompt = encode_text([""])
    return model_kwargs, {**model_kwargs, **null_condition(arch, model_kwargs, empty_prompt)}


def _class_id(prompt: str, arch: DiTConfig) -> int:
    if not prompt.strip().isdigit() or int(prompt) >= arch.num_classes:
        raise ValueError(
            f"prompt {prompt!r}: a class-conditional model takes class ids 0..{arch.num_classes - 1}"
        )
    return int(prompt)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """B×3×T×H×W in [-1, 1] → B×T×H×W×3 uint8."""
    v = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return v.permute(0, 2, 3, 4, 1).cpu().numpy()


def write_mp4(path: Path, frames: np.ndarray, fps: float, caption: str | None = None) -> None:
    """T×H×W×3 uint8 → H.264 mp4 (odd sizes are cropped by one pixel; yuv420p needs even sizes), and
    with ``caption`` its sidecar ``.txt`` (the prompt it was sampled for), the layout ``data.shards
    write`` and ``python -m data.probe score`` read, so a samples folder can be scored as it is."""
    t, h, w, _ = frames.shape
    frames = np.ascontiguousarray(frames[:, : h - h % 2, : w - w % 2])
    path.write_bytes(encode_h264(frames, fps))
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")


if __name__ == "__main__":
    main()
