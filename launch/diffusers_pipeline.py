"""The pipeline root beside a diffusers export (``launch.export --format diffusers --pipeline``): the run's
VAE and text encoder copied in, its tokenizer, a flow-match scheduler at the run's shift and
``model_index.json``, so ``WanPipeline`` / ``LTXPipeline.from_pretrained`` loads it. Everything is checked
(:func:`pipeline_parts`) before anything is written, and the root is built beside its destination and
renamed into place (:func:`replace_folder`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from parallel.file_mode import as_opened

PIPELINES = {
    "WanTransformer3DModel": (
        "WanPipeline",
        {"text_mask": False, "text_null": "empty_prompt", "text_encoder_mask": True},
    ),
    "LTXVideoTransformer3DModel": (
        "LTXPipeline",
        {"text_mask": True, "text_null": "empty_prompt", "text_encoder_mask": False},
    ),
}
# WanPipeline's max_sequence_length: the text is zero-padded to it and nothing is masked, so the length
# is part of the function the model computes
_WAN_TEXT_LEN = 512
# transformers encoder classes for encoder-decoder model types (only the encoder is used)
_ENCODER_CLASSES = {"t5": "T5EncoderModel", "mt5": "T5EncoderModel", "umt5": "UMT5EncoderModel"}
# what a pipeline root we write holds (an existing OUT of only these is a root the new one replaces)
_ROOT_ENTRIES = {
    "model_index.json",
    "transformer",
    "transformer_2",
    "vae",
    "text_encoder",
    "tokenizer",
    "scheduler",
}


def pipeline_parts(info: dict, class_name: str, experts: bool = False) -> dict:
    """What a pipeline root is made of (VAE and text encoder folders and classes, the loaded tokenizer,
    scheduler shift), or a ValueError listing every setting of the source that a diffusers pipeline cannot
    take (nothing is written here). ``experts``: the source is one of two experts (its ``t_range`` is
    checked by :func:`launch.export._experts_boundary`)."""
    pipeline, _ = PIPELINES[class_name]
    errors = _pipeline_model_errors(info, class_name, experts)
    diffusion = info.get("diffusion")
    parts = {"class_name": class_name, "pipeline": pipeline}
    parts["shift"] = diffusion.shift if diffusion is not None else 1.0
    codec = Path(info.get("codec") or "pixel")
    vae = _json(codec / "config.json") if codec.is_dir() else {}
    if not isinstance(vae.get("_class_name"), str):
        errors.append(
            f"data.codec={str(codec)!r} is not a diffusers VAE folder (config.json with _class_name)"
        )
    elif not any(f.is_file() for f in codec.glob("diffusion_pytorch_model*.safetensors")):
        errors.append(f"data.codec={str(codec)!r} has no diffusion_pytorch_model*.safetensors weights")
    parts["vae"] = (codec, vae.get("_class_name"))
    text = Path(info.get("text_encoder") or "minilm")
    config = _json(text / "config.json") if str(text) != "minilm" and text.is_dir() else {}
    encoder = _ENCODER_CLASSES.get(config.get("model_type")) or (config.get("architectures") or [None])[0]
    if encoder is None or not any(f.is_file() for f in text.glob("*.safetensors")):
        errors.append(
            f"data.text_encoder={str(text)!r} is not a transformers model folder with safetensors weights"
        )
    else:
        parts["tokenizer"] = _tokenizer(text, errors)
    parts["text_encoder"] = (text, encoder)
    if errors:
        raise ValueError(f"--pipeline: {pipeline} cannot take this model: " + "; ".join(errors))
    return parts


def _pipeline_model_errors(info: dict, class_name: str, experts: bool = False) -> list[str]:
    """The settings of the model and its diffusion that the pipeline of ``class_name`` would not
    reproduce: its text convention and length, conditioning channels, the scheduler's flow time (one
    expert's ``t_range`` unless ``experts``: the pipeline then switches at the boundary)."""
    errors = []
    pipeline, convention = PIPELINES[class_name]
    arch = info["arch"]
    for name, want in convention.items():
        if getattr(arch, name) != want:
            errors.append(f"model.arch.{name}={getattr(arch, name)!r} ({pipeline} applies {want!r})")
    text_len = arch.text_len if arch.text_len is not None else info.get("max_text_len")
    if class_name == "WanTransformer3DModel" and text_len != _WAN_TEXT_LEN:
        errors.append(
            f"model.arch.text_len={arch.text_len!r} / data.max_text_len={info.get('max_text_len')!r} "
            f"({pipeline} zero-pads the text to {_WAN_TEXT_LEN} tokens unmasked: another length is "
            f"another function)"
        )
    if arch.cond_channels > 0:
        errors.append(
            f"model.arch.cond_channels={arch.cond_channels} ({pipeline} feeds the transformer the noisy "
            f"latents only, no conditioning channels)"
        )
    diffusion = info.get("diffusion")
    if diffusion is None or diffusion.objective != "flow" or diffusion.shift_base_tokens is not None:
        errors.append(
            "diffusion: a flow model with a fixed shift (diffusion.objective='flow', "
            "diffusion.shift_base_tokens=null) is what FlowMatchEulerDiscreteScheduler samples"
        )
    elif tuple(diffusion.t_range) != (0.0, 1.0) and not experts:
        errors.append(
            f"diffusion.t_range={tuple(diffusion.t_range)} (one expert's share of flow time; {pipeline} "
            f"runs this one transformer at every timestep: give the other expert with --low-noise)"
        )
    return errors


def _tokenizer(text: Path, errors: list[str]):
    """The tokenizer of the text encoder folder ``text`` (its own files or a pipeline root's sibling
    ``tokenizer/``, as :func:`data.encoders.tokenizer_folder` finds it), loaded; None and an entry in
    ``errors`` when there is none or it does not load."""
    from transformers import AutoTokenizer

    from data.encoders import tokenizer_folder

    try:
        return AutoTokenizer.from_pretrained(tokenizer_folder(text), local_files_only=True)
    except FileNotFoundError:
        errors.append(
            f"data.text_encoder={str(text)!r} has no tokenizer (in it or in a sibling tokenizer/ folder)"
        )
    except (OSError, ValueError, TypeError) as e:  # files transformers cannot build a tokenizer from
        errors.append(f"data.text_encoder={str(text)!r}: its tokenizer does not load ({e})")
    return None


def check_destination(out: Path) -> None:
    """Refuse ``out`` unless it is absent, an empty folder or a pipeline root (only its entries)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: a file; a pipeline root is written to a folder")
    if not out.is_dir():
        return
    names = {p.name for p in out.iterdir()}
    if names and ("model_index.json" not in names or names - _ROOT_ENTRIES):
        other = sorted(names - _ROOT_ENTRIES) or sorted(names)
        raise ValueError(
            f"{out}: not empty and not a pipeline root (holds {', '.join(other[:4])}): a new root "
            f"would replace it; choose an empty or new folder"
        )


def replace_folder(new: Path, out: Path) -> None:
    """Rename the complete folder ``new`` to ``out``; an existing ``out`` (checked by
    :func:`check_destination`) is moved aside first and removed once ``new`` is in place."""
    if not out.exists():
        new.rename(out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    out.rename(old)
    try:
        new.rename(out)
    except OSError:
        old.rename(out)  # put the previous root back
        raise
    shutil.rmtree(old)


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def write_pipeline(out: Path, parts: dict) -> None:
    """The rest of a pipeline root next to ``out/transformer`` (and ``out/transformer_2`` when
    ``parts['boundary']`` is set): the VAE and text encoder weights copied, the tokenizer saved by
    transformers (so its class is the one ``model_index.json`` names), a FlowMatchEulerDiscreteScheduler
    with the run's shift, and ``model_index.json``. Without ``parts['vae']`` (two experts, no
    ``--pipeline``) the root names no VAE, text encoder or tokenizer, and no scheduler when the shift is
    None (a model FlowMatchEulerDiscreteScheduler cannot sample)."""
    version = _json(out / "transformer" / "config.json").get("_diffusers_version", "0.0.0")
    index = {"_class_name": parts["pipeline"], "_diffusers_version": version}
    if "vae" in parts:
        index |= _copy_components(out, parts)
    else:
        index |= {name: [None, None] for name in ("text_encoder", "tokenizer", "vae")}
    index["scheduler"] = [None, None]
    if parts["shift"] is not None:
        scheduler = {
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "_diffusers_version": version,
            "num_train_timesteps": 1000,
            "shift": parts["shift"],
            "use_dynamic_shifting": False,
        }
        (out / "scheduler").mkdir(parents=True, exist_ok=True)
        (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
        index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    index["transformer"] = ["diffusers", parts["class_name"]]
    if parts["pipeline"] == "WanPipeline":
        # Wan2.2-TI2V's root (its VAE patchifies 2×2: 4×16×16) sets expand_timesteps: a timestep per
        # token, so WanImageToVideoPipeline keeps the image's latent frame at t = 0. Two experts
        # (Wan2.2-A14B): transformer_2 runs below boundary_ratio × 1000
        codec = parts["vae"][0] if "vae" in parts else None
        ti2v = codec is not None and (_json(codec / "config.json").get("patch_size") or 1) > 1
        boundary = parts.get("boundary")
        second = ["diffusers", parts["class_name"]] if boundary is not None else [None, None]
        index |= {"transformer_2": second, "boundary_ratio": boundary, "expand_timesteps": ti2v}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _copy_components(out: Path, parts: dict) -> dict:
    """Copy the VAE and text encoder into ``out`` and save the tokenizer; their ``model_index.json`` rows."""
    codec, vae_class = parts["vae"]
    _copy(codec, out / "vae", lambda n: n == "config.json" or n.startswith("diffusion_pytorch_model"))
    text, encoder_class = parts["text_encoder"]
    _copy(text, out / "text_encoder", lambda n: n == "config.json" or ".safetensors" in n)
    tokenizer = parts["tokenizer"]  # loaded by pipeline_parts (its own files or the root's tokenizer/)
    tokenizer.save_pretrained(out / "tokenizer")
    return {
        "text_encoder": ["transformers", encoder_class],
        "tokenizer": ["transformers", type(tokenizer).__name__],
        "vae": ["diffusers", vae_class],
    }


def _copy(src: Path, dst: Path, keep) -> None:
    """Copy the files of ``src`` whose names ``keep`` accepts into ``dst`` (weights, their index, config)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and keep(f.name):
            shutil.copy2(f, dst / f.name)
            as_opened(dst / f.name)  # not the source's: one saved by safetensors is 0600
