"""Export a checkpoint for inference or fine-tuning: ``python -m launch.export CHECKPOINT_OR_RUN OUT_DIR``.

Writes ``model.safetensors``, ``ema.safetensors`` (when the run kept an EMA) and ``config.json`` (the
architecture, diffusion objective, codec and text encoder: everything ``launch.sample`` and
``init.from`` need). Reads the checkpoint in one process, whatever world size wrote it: a DCP
checkpoint's shards, or the whole tensors a DeepSpeed checkpoint carries. The checkpoint is verified
first (see :mod:`parallel.checkpoint`); a run directory exports its newest intact checkpoint.

``--format diffusers`` writes what diffusers loads instead (``WanTransformer3DModel.from_pretrained`` or
``LTXVideoTransformer3DModel.from_pretrained``, by the architecture), from a run, a checkpoint or an export
folder (such as ``launch.convert`` writes); ``--pipeline`` makes it a pipeline root (``model_index.json``,
``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) that ``WanPipeline`` /
``LTXPipeline.from_pretrained`` loads, with the run's ``data.codec`` and ``data.text_encoder`` folders
copied in. :func:`load_model` gives users' scripts the model of any of these sources.

Two experts (Wan2.2-A14B): ``--low-noise LOW`` exports SRC as the high-noise expert (``transformer/``) and
LOW as the low-noise one (``transformer_2/``), with ``model_index.json``'s ``boundary_ratio`` from
``--boundary B`` or, by default, from the experts' ``diffusion.t_range`` (high [B, 1], low [0, B]). Without
``--pipeline`` the root holds only the two transformers, the scheduler (the flow shift) and
``model_index.json`` (no VAE or text encoder): ``init.from`` / ``launch.sample`` read it, ``WanPipeline``
needs ``--pipeline`` to generate.

A LoRA run (``finetune.lora.rank`` > 0) keeps adapters only; its base is rebuilt from ``init.from`` and must
have the fingerprint of its ``base.json``. Exported plainly (or with ``--merge``), in our format or
``--format diffusers``, it gives the full model with the adapters merged in; ``--lora`` writes the
adapters alone as ``OUT/pytorch_lora_weights.safetensors`` (``--lora-format diffusers``, the default, for
``pipe.load_lora_weights``; ``comfy`` for ComfyUI's LoRA loader; see :mod:`launch.interop.adapters`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import types
import typing
from dataclasses import fields
from pathlib import Path

import torch

from dit.config import DiTConfig
from dit.diffusion import DiffusionConfig
from dit.extras import MissingExtra
from dit.model import SpacetimeDiT, build_model
from launch import diffusers_pipeline
from launch.config import JobConfig, SampleConfig, load_config
from launch.interop import adapters
from parallel import checkpoint as ckpt
from parallel.checkpoint import CheckpointError


@dataclasses.dataclass
class TrainedTasks:
    """An export's ``train_tasks``: the task mix of the run that trained it (``train.task_*``), for
    ``launch.sample --image`` to say when the model never learned image-to-video. Exports written
    before it was recorded, and imported models, have none: unknown."""

    task_t2v: float = 1.0
    task_i2v: float = 0.0
    task_continuation: float = 0.0
    continuation_frames: int = 2
    init_from: str = ""
    """The run's ``init.from``: a fine-tuned model may keep what its source learned."""

    @classmethod
    def of(cls, cfg: JobConfig) -> TrainedTasks:
        t = cfg.train
        return cls(t.task_t2v, t.task_i2v, t.task_continuation, t.continuation_frames, cfg.init.from_)


def export_config(cfg: JobConfig, step: int | None, source: Path) -> dict:
    """What inference and ``init.from`` need to know about a run (``config.json`` of an export)."""
    return {
        "format": "spacetime-dit",
        "preset": cfg.model.preset,
        "arch": dataclasses.asdict(cfg.model.arch),
        "diffusion": dataclasses.asdict(cfg.diffusion),
        "codec": cfg.data.codec,
        "text_encoder": cfg.data.text_encoder,
        "max_text_len": cfg.data.max_text_len,
        "sample": dataclasses.asdict(cfg.sample),
        "train_tasks": dataclasses.asdict(TrainedTasks.of(cfg)),
        "seed": cfg.seed,  # the run's seed and precision: launch.evaluate reproduces its eval samples
        "precision": cfg.run.precision,
        "step": step,
        "source": str(source),
    }


# the keys of config.json (export_config) and their types; the sections are config dataclasses
_SCALARS = {
    "format": str,
    "preset": str,
    "codec": str,
    "text_encoder": str,
    "max_text_len": int,
    "step": int | None,
    "source": str,
    "seed": int,
    "precision": str,
}
_SECTIONS = {
    "arch": DiTConfig,
    "diffusion": DiffusionConfig,
    "sample": SampleConfig,
    "train_tasks": TrainedTasks,
}


def read_export_config(path: str | Path) -> dict:
    """An export's ``config.json``, checked: known keys with values of the right type, ``arch``,
    ``diffusion``, ``sample`` and ``train_tasks`` as :class:`DiTConfig`, :class:`DiffusionConfig`,
    :class:`SampleConfig` and :class:`TrainedTasks` (missing fields take their defaults; an export
    without ``train_tasks``, older or imported, has none). Every error names the file and the key."""
    path = Path(path)
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: a JSON object expected, not {type(info).__name__}")
    for key, value in info.items():
        if key in _SECTIONS:
            info[key] = _section(path, key, value, _SECTIONS[key])
        elif key not in _SCALARS:
            raise CheckpointError(
                f"{path}: unknown key {key!r} (known: {', '.join([*_SCALARS, *_SECTIONS])})"
            )
        elif not _is(value, _SCALARS[key]):
            raise CheckpointError(f"{path}: {key}={value!r} is not {_SCALARS[key]}")
    if info.get("format", "spacetime-dit") != "spacetime-dit":
        raise CheckpointError(f"{path}: format={info['format']!r}, not a spacetime-dit export")
    return info


def _section(path: Path, key: str, values, cls):
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: {key} must be an object, not {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if name not in hints:
            raise CheckpointError(f"{path}: unknown key {key}.{name} (not a field of {cls.__name__})")
        if not _is(value, hints[name]):
            raise CheckpointError(f"{path}: {key}.{name}={value!r} is not {hints[name]}")
    try:
        # JSON has no tuples: a tuple field (patch_size) comes back as a list
        return cls(**{k: tuple(v) if typing.get_origin(hints[k]) is tuple else v for k, v in values.items()})
    except (ValueError, TypeError) as e:  # the dataclass's own checks (allowed kinds, divisibility)
        raise CheckpointError(f"{path}: {key}: {e}") from None


def _is(value, hint) -> bool:
    """Whether a JSON value fits a config field's type (bool is not a number here, an int is a float)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_is(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool or hint is str:
        return isinstance(value, hint)
    if hint is int or hint is float:
        return isinstance(value, int if hint is int else (int, float)) and not isinstance(value, bool)
    if origin is tuple:
        fixed = len(args) != 2 or args[1] is not Ellipsis
        return (
            isinstance(value, list)
            and (not fixed or len(value) == len(args))
            and all(_is(v, args[i] if fixed else args[0]) for i, v in enumerate(value))
        )
    if origin is list:
        return isinstance(value, list) and all(_is(v, args[0]) for v in value)
    return False


def write_export(out: str | Path, arch: DiTConfig, state: dict, extra: dict, ema: dict | None = None) -> Path:
    """Write an export folder: ``model.safetensors`` (and ``ema.safetensors``) and ``config.json`` with
    ``format``, ``arch`` and the ``extra`` keys (those of :func:`export_config`: ``diffusion``, ``codec``,
    ``source`` …). The config is read back with :func:`read_export_config`, so a key it would refuse is
    an error here, before anyone relies on the folder.

    Exporting into an existing export folder replaces that export (``launch.export RUN OUT`` run again
    writes the newer checkpoint): an ``ema.safetensors`` that this write does not replace is removed, as
    readers prefer it to ``model.safetensors``. A folder holding a diffusers model or pipeline root is
    refused rather than mixed into.

    Args:
        out: the folder (created).
        arch: the architecture of ``state``.
        state: the model's state dict.
        extra: further config.json keys (sections as dataclasses or dicts).
        ema: EMA weights, when there are any.

    Raises:
        ValueError: ``out`` is a file, or a folder holding a diffusers model.
    """
    out = Path(out)
    check_export_folder(out)
    if not ema:
        (out / "ema.safetensors").unlink(missing_ok=True)  # an older export's EMA would be loaded instead
    out.mkdir(parents=True, exist_ok=True)
    step = extra.get("step")
    ckpt.write_safetensors(
        out, {"model.safetensors": state, "ema.safetensors": ema}, -1 if step is None else step
    )
    config = {"format": "spacetime-dit", **extra, "arch": arch}
    config = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in config.items()}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    read_export_config(out / "config.json")
    return out


def check_export_folder(out: str | Path) -> None:
    """Refuse ``out`` as an export folder when it is a file or holds a diffusers model (its
    ``diffusion_pytorch_model*`` weights or a pipeline root's ``model_index.json``): an export written
    there would leave a folder that readers take for one or the other depending on their rules.

    Raises:
        ValueError: naming ``out`` and what it holds.
    """
    from launch.interop.formats import PIPELINE_INDEX

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: a file; an export is written to a folder (OUT names a file)")
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name.startswith("diffusion_pytorch_model"))
    foreign += [PIPELINE_INDEX] if (out / PIPELINE_INDEX).exists() else []
    if foreign:
        raise ValueError(
            f"{out}: holds a diffusers model ({', '.join(foreign[:4])}); write the export to another folder"
        )


def export(src: str | Path, out_dir: str | Path) -> Path:
    """Export the newest intact checkpoint at ``src`` (a checkpoint, its folder or a run directory); a
    LoRA run's adapters merged into its base (:func:`launch.interop.adapters.lora_weights`)."""
    path = ckpt.resolve(src)
    cfg = load_config(path / "config.yaml")
    if cfg.finetune.lora.enabled:
        model, ema, step = adapters.lora_weights(path, cfg, merged=True)
        state = {"model": model, "ema": ema, "step": step}
    else:
        state = ckpt.read_full(path, {"model", "ema", "step"})
    _check_finite(path, state)
    step = int(state["step"])
    config = export_config(cfg, step, path)
    extra = {k: v for k, v in config.items() if k not in ("format", "arch")}
    return write_export(out_dir, cfg.model.arch, state["model"], extra, ema=state.get("ema"))


def _check_finite(path: Path, state: dict) -> None:
    for key in ("model", "ema"):
        bad = [name for name, t in (state.get(key) or {}).items() if not torch.isfinite(t).all()]
        if bad:  # the trainer never saves such a state: this checkpoint was altered or is foreign
            raise CheckpointError(f"{path}: {key} weights {', '.join(bad[:3])} hold NaN or inf; not exported")


def export_lora(src: str | Path, out: str | Path, fmt: str = "diffusers", use_ema: bool = True) -> Path:
    """Write a LoRA run's adapters as ``OUT/pytorch_lora_weights.safetensors`` in ``fmt`` (``diffusers``
    or ``comfy``, see :mod:`launch.interop.adapters`); returns the file.

    Args:
        src: a LoRA run, its ``checkpoints/`` folder or a checkpoint.
        out: the folder.
        fmt: ``diffusers`` or ``comfy``.
        use_ema: the EMA of the adapters when the run kept one.

    Raises:
        ValueError: ``src`` is no LoRA run, or an adapted module the format cannot carry.
        CheckpointError: a damaged checkpoint, or (pissa/olora) a base that is not the run's.
    """
    found = adapters.lora_checkpoint(src)
    if found is None:
        raise ValueError(f"--lora: {src} is not a LoRA run (no checkpoint with finetune.lora.rank > 0)")
    path, cfg = found
    model, ema, step = adapters.lora_weights(path, cfg, merged=False, use_ema=use_ema)
    state = ema if ema is not None else model
    _check_finite(path, {"model": state})
    meta = adapters.lora_metadata(cfg, path, step, fmt, ema is not None)
    return adapters.write_lora(out, cfg.model.arch, state, fmt, meta)


def load_model(path: str | Path, use_ema: bool = True, expert: str = "") -> SpacetimeDiT:
    """The model at ``path`` in eval mode on the CPU, for users' own scripts.

    Args:
        path: an export folder, a checkpoint (or a run / checkpoints/ folder: its newest intact one), or
            a diffusers model (model folder, pipeline root, sharded index or single ``.safetensors``).
        use_ema: the EMA weights when the source has them.
        expert: ``high_noise`` or ``low_noise`` for a two-expert diffusers pipeline root.

    Raises:
        CheckpointError: a damaged file, a source naming no architecture, or weights that do not fit it.
    """
    from launch.finetune import arch_dict_to_config, read_weights  # finetune imports this module

    # a LoRA run comes back merged: read_weights rebuilds its base (fingerprint checked) and adds B·A·scale
    state, arch = read_weights(path, use_ema, expert, key="load_model")
    if arch is None:
        raise CheckpointError(f"{path}: names no architecture (no config.json 'arch' or config.yaml)")
    model = build_model(arch_dict_to_config(arch, str(path)), device="cpu")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # weights of another architecture than the config says
        raise CheckpointError(f"{path}: the weights do not fit the arch of its config: {e}") from None
    return model.eval()


def _read_source(src: str | Path, use_ema: bool) -> tuple[dict, dict]:
    """(weights, export config with ``arch``) of an export folder or a checkpoint / run (verified)."""
    src = Path(src)
    if (src / "model.safetensors").is_file():
        if not (src / "config.json").is_file():
            raise CheckpointError(f"{src}: an export without config.json names no architecture")
        info = read_export_config(src / "config.json")
        name = "ema.safetensors" if use_ema and (src / "ema.safetensors").is_file() else "model.safetensors"
        state = ckpt.read_safetensors(src / name)
    else:
        path = ckpt.resolve(src)
        cfg = load_config(path / "config.yaml")
        if cfg.finetune.lora.enabled:  # a LoRA run: adapters merged into its base
            model, ema, _ = adapters.lora_weights(path, cfg, merged=True, use_ema=use_ema)
            full = {"model": model, "ema": ema}
        else:
            full = ckpt.read_full(path, {"model", "ema"})
        state = full["ema"] if use_ema and full.get("ema") else full["model"]
        info = export_config(cfg, None, path) | {"arch": cfg.model.arch, "diffusion": cfg.diffusion}
    if "arch" not in info:
        raise CheckpointError(f"{src / 'config.json'}: no 'arch': the architecture is needed")
    return state, info


def export_diffusers(
    src: str | Path,
    out: str | Path,
    pipeline: bool = False,
    use_ema: bool = True,
    low_noise: str | Path | None = None,
    boundary: float | None = None,
) -> Path:
    """Write the model at ``src`` (run, checkpoint or export folder) in diffusers' format.

    A pipeline root is written whole or not at all: every refusal comes before anything is written, the
    root is assembled in a hidden sibling folder (``.OUT.tmp-PID``) and renamed to ``OUT`` at the end,
    so a failure leaves no partial root. An existing ``OUT`` must be empty or a pipeline root (only
    ``model_index.json`` and component folders), which the new root then replaces; anything else there
    is refused, never deleted. A model folder replaces the diffusers weights of an existing one (see
    :func:`launch.interop.write_diffusers`).

    Args:
        src: the source (with ``low_noise``: the high-noise expert).
        out: the model folder (``config.json`` + ``diffusion_pytorch_model.safetensors``), or with
            ``pipeline`` or ``low_noise`` the pipeline root (the model in ``transformer/``).
        pipeline: also copy the run's VAE and text encoder in and write the scheduler and
            ``model_index.json``.
        use_ema: export the EMA weights when the source has them (both experts).
        low_noise: the low-noise expert of a two-expert WanPipeline (Wan2.2-A14B), written to
            ``transformer_2/``; without ``pipeline`` the root holds the two transformers, the
            scheduler and ``model_index.json`` only.
        boundary: ``boundary_ratio`` (the high-noise expert runs t ≥ boundary); None: where the experts'
            ``diffusion.t_range`` meet.

    Raises:
        ValueError: the architecture (or, for a pipeline, the codec, text encoder or diffusion settings)
            has no diffusers equivalent, the two experts differ or their ranges do not meet at the
            boundary, or ``out`` holds something else; the message lists the fields.
    """
    from launch import interop

    state, info = _read_source(src, use_ema)
    model = interop.to_diffusers(info["arch"], state)  # a ValueError lists what diffusers cannot express
    out = Path(out)
    models = {"transformer": model}
    if low_noise is not None:
        low_state, low_info = _read_source(low_noise, use_ema)
        boundary = _experts_boundary(info, low_info, boundary, model.class_name)
        models["transformer_2"] = interop.to_diffusers(low_info["arch"], low_state)
    elif boundary is not None:
        raise ValueError("--boundary is the switch between two experts: give the low-noise one (--low-noise)")
    if not pipeline and low_noise is None:
        interop.write_diffusers(model, out)
        return out
    if pipeline:  # every refusal before any file is written
        parts = diffusers_pipeline.pipeline_parts(info, model.class_name, experts=low_noise is not None)
    else:
        pipeline_class = diffusers_pipeline.PIPELINES[model.class_name][0]
        parts = {"class_name": model.class_name, "pipeline": pipeline_class}
        parts["shift"] = _static_shift(info.get("diffusion"))
    parts["boundary"] = boundary
    diffusers_pipeline.check_destination(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of this same process id: ours
    try:
        for name, m in models.items():
            interop.write_diffusers(m, tmp / name)
        diffusers_pipeline.write_pipeline(tmp, parts)
        diffusers_pipeline.replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; a partial root on failure
    return out


def _experts_boundary(high: dict, low: dict, boundary: float | None, class_name: str) -> float:
    """The boundary of the two experts ``high`` and ``low`` (their :func:`_read_source` infos): ``boundary``
    when given, else where their ``diffusion.t_range`` meet (high [b, 1], low [0, b]).

    Raises:
        ValueError: not Wan (only WanPipeline has a ``transformer_2``), or listing every field in which
            the experts differ (architecture, text convention, codec, text encoder, objective) and
            ranges that do not meet at one boundary (or not at ``boundary``).
    """
    if class_name != "WanTransformer3DModel":
        raise ValueError(f"--low-noise: two experts are WanPipeline's (transformer_2); {class_name} has one")
    pairs = {f.name: (getattr(high["arch"], f.name), getattr(low["arch"], f.name)) for f in fields(DiTConfig)}
    errors = [f"model.arch.{k} (high: {a!r}, low: {b!r})" for k, (a, b) in pairs.items() if a != b]
    for key in ("max_text_len", "codec", "text_encoder"):  # unknown (None) in an export without them
        a, b = high.get(key), low.get(key)
        if a is not None and b is not None and a != b:
            errors.append(f"data.{key} (high: {a!r}, low: {b!r})")
    dh, dl = high.get("diffusion") or DiffusionConfig(), low.get("diffusion") or DiffusionConfig()
    if dh.objective != dl.objective:
        errors.append(f"diffusion.objective (high: {dh.objective!r}, low: {dl.objective!r})")
    hi, lo = tuple(map(float, dh.t_range)), tuple(map(float, dl.t_range))
    if boundary is None:
        if hi[1] == 1.0 and lo[0] == 0.0 and hi[0] == lo[1] and 0.0 < hi[0] < 1.0:
            boundary = hi[0]
        else:
            errors.append(
                f"diffusion.t_range: the high-noise expert's {hi} and the low-noise expert's {lo} do not "
                f"meet at one boundary b (high [b, 1], low [0, b]); experts trained on every time need "
                f"--boundary B"
            )
    else:  # each expert's own share at B, or every time (an expert whose range was not recorded)
        for name, got, share in (("high", hi, (boundary, 1.0)), ("low", lo, (0.0, boundary))):
            if got not in (share, (0.0, 1.0)):
                errors.append(
                    f"diffusion.t_range={got} of the {name}-noise expert is not its share {share} at "
                    f"--boundary {boundary}"
                )
    if errors:
        raise ValueError("--low-noise: the two experts do not make one WanPipeline: " + "; ".join(errors))
    return boundary


def _static_shift(diffusion: DiffusionConfig | None) -> float | None:
    """The scheduler's shift of a flow model with a fixed one; None (no scheduler) for anything else."""
    if diffusion is None:
        return 1.0
    if diffusion.objective != "flow" or diffusion.shift_base_tokens is not None:
        return None
    return diffusion.shift


# per transformer class: its pipeline and the text convention the pipeline applies (arch.text_mask,
# arch.text_null): WanPipeline pads with zeros and masks nothing, LTXPipeline masks; both encode "" as
# the null
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m launch.export", description=__doc__.splitlines()[0])
    p.add_argument(
        "source",
        help="a checkpoint directory, a checkpoints/ folder, a run directory (or, with "
        "--format diffusers, an export folder)",
    )
    p.add_argument("out_dir")
    p.add_argument(
        "--format",
        choices=("spacetime-dit", "diffusers"),
        default="spacetime-dit",
        help="spacetime-dit: our export (init.from, launch.sample); diffusers: what diffusers loads",
    )
    p.add_argument(
        "--pipeline",
        action="store_true",
        help="--format diffusers: a whole pipeline root with the run's VAE and text encoder",
    )
    p.add_argument(
        "--low-noise",
        dest="low_noise",
        metavar="LOW",
        help="--format diffusers: the low-noise expert of a two-expert WanPipeline (Wan2.2-A14B), written "
        "to transformer_2/; the source is the high-noise one (transformer/)",
    )
    p.add_argument(
        "--boundary",
        type=float,
        metavar="B",
        help="with --low-noise: the pipeline's boundary_ratio (the high-noise expert runs t >= B); default: "
        "where the experts' diffusion.t_range meet",
    )
    p.add_argument(
        "--no-ema", action="store_true", help="--format diffusers, --lora: the raw weights, not the EMA"
    )
    p.add_argument(
        "--lora",
        action="store_true",
        help="a LoRA run's adapters alone: OUT/pytorch_lora_weights.safetensors (pipe.load_lora_weights)",
    )
    p.add_argument(
        "--lora-format",
        choices=("diffusers", "comfy"),
        help="with --lora: diffusers' keys (default) or ComfyUI's (diffusion_model.<original names>)",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="a LoRA run's adapters merged into its base: a full model (ours, or --format diffusers); "
        "what a LoRA run exports without --lora anyway",
    )
    a = p.parse_args(argv)
    if a.lora_format and not a.lora:
        p.error("--lora-format needs --lora")
    if a.lora and (a.merge or a.format != "spacetime-dit"):
        p.error(
            "--lora writes the adapters alone (--lora-format picks their keys): not with --merge or --format"
        )
    for flag, given in (("--pipeline", a.pipeline), ("--low-noise", a.low_noise)):
        if given and a.format != "diffusers":
            p.error(f"{flag} needs --format diffusers")
    if a.boundary is not None and not a.low_noise:
        p.error("--boundary needs --low-noise (it is the switch between two experts)")
    if a.boundary is not None and not 0.0 < a.boundary < 1.0:
        p.error(f"--boundary {a.boundary}: expected a number in (0, 1)")
    if Path(a.out_dir).exists() and not Path(a.out_dir).is_dir():
        p.error(f"OUT {a.out_dir} is a file: the export is written to a folder")
    try:
        if a.merge and adapters.lora_checkpoint(a.source) is None:
            raise ValueError(f"--merge: {a.source} is not a LoRA run; its export is the full model already")
        if a.lora:
            out = export_lora(a.source, a.out_dir, a.lora_format or "diffusers", use_ema=not a.no_ema)
            print(f"exported the adapters of {a.source} → {out}")
            return
        if a.format == "diffusers":
            out = export_diffusers(
                a.source,
                a.out_dir,
                pipeline=a.pipeline,
                use_ema=not a.no_ema,
                low_noise=a.low_noise,
                boundary=a.boundary,
            )
        else:
            out = export(a.source, a.out_dir)
    except (CheckpointError, ValueError, OSError, MissingExtra) as e:  # the message names the file or key
        raise SystemExit(f"error: {e}") from None
    print(f"exported {a.source} → {out} ({', '.join(sorted(f.name for f in out.iterdir()))})")


if __name__ == "__main__":
    main()
