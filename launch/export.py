"""Export a checkpoint for inference or fine-tuning: ``python -m launch.export CHECKPOINT_OR_RUN OUT_DIR``.

Writes ``model.safetensors``, ``ema.safetensors`` (when the run kept an EMA) and ``config.json`` (the
architecture, diffusion objective, codec and text encoder: everything ``launch.sample`` and
``init.from`` need). Reads the checkpoint in one process, whatever world size wrote it: a DCP
checkpoint's shards, or the whole tensors a DeepSpeed checkpoint carries. The checkpoint is verified
first (see :mod:`parallel.checkpoint`); a run directory exports its newest intact checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path

import torch

from dit.config import DiTConfig
from dit.diffusion import DiffusionConfig
from launch.config import JobConfig, SampleConfig, load_config
from parallel import checkpoint as ckpt
from parallel.checkpoint import CheckpointError


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
_SECTIONS = {"arch": DiTConfig, "diffusion": DiffusionConfig, "sample": SampleConfig}


def read_export_config(path: str | Path) -> dict:
    """An export's ``config.json``, checked: known keys with values of the right type, ``arch``,
    ``diffusion`` and ``sample`` as :class:`DiTConfig`, :class:`DiffusionConfig` and :class:`SampleConfig`
    (missing fields take their defaults). Every error names the file and the key."""
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


def export(src: str | Path, out_dir: str | Path) -> Path:
    """Export the newest intact checkpoint at ``src`` (a checkpoint, its folder or a run directory)."""
    path = ckpt.resolve(src)
    cfg = load_config(path / "config.yaml")
    state = ckpt.read_full(path, {"model", "ema", "step"})
    for key in ("model", "ema"):
        bad = [name for name, t in (state.get(key) or {}).items() if not torch.isfinite(t).all()]
        if bad:  # the trainer never saves such a state: this checkpoint was altered or is foreign
            raise CheckpointError(f"{path}: {key} weights {', '.join(bad[:3])} hold NaN or inf; not exported")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    step = int(state["step"])
    ckpt.write_safetensors(
        out, {"model.safetensors": state["model"], "ema.safetensors": state.get("ema")}, step
    )
    config = export_config(cfg, step, path)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m launch.export", description=__doc__.splitlines()[0])
    p.add_argument("source", help="a checkpoint directory, a checkpoints/ folder or a run directory")
    p.add_argument("out_dir")
    a = p.parse_args(argv)
    try:
        out = export(a.source, a.out_dir)
    except CheckpointError as e:  # a damaged or foreign file: the message names it, a traceback would not
        raise SystemExit(f"error: {e}") from None
    print(f"exported {ckpt.resolve(a.source)} → {out} ({', '.join(sorted(f.name for f in out.iterdir()))})")


if __name__ == "__main__":
    main()
