"""Convert a pretrained diffusers video transformer into a spacetime-dit export.

``python -m launch.convert from-diffusers SRC OUT`` reads a diffusers Wan2.1 / Wan2.2 or LTX-Video
transformer (a model folder, a pipeline root, a sharded index or one ``.safetensors``: see
:func:`launch.interop.read_diffusers`) and writes ``OUT/model.safetensors`` and ``OUT/config.json`` in
``launch.export``'s format, which ``launch.sample`` and ``init.from`` read. Only safetensors are read.

The export's ``arch`` carries the source's text convention (Wan: 512 zero-padded tokens, no mask, the
empty prompt as null) and its ``diffusion`` the flow shift of the pipeline root's scheduler and, for one
expert of Wan2.2-A14B, that expert's timestep range (``diffusion.t_range``) at the root's boundary.
LTX-Video's scheduler shifts by sequence length (``use_dynamic_shifting``, exponential in diffusers'
``mu``), which ``diffusion.shift`` cannot state: its export keeps the scheduler's static ``shift``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dit.diffusion import DiffusionConfig
from launch import interop
from launch.interop.formats import PIPELINE_INDEX
from parallel.checkpoint import CheckpointError


def _pipeline_root(src: Path) -> Path | None:
    if (src / PIPELINE_INDEX).is_file():
        return src
    if (src.parent / PIPELINE_INDEX).is_file() and src.is_dir():  # its transformer/ folder
        return src.parent
    return None


def _scheduler_shift(root: Path | None) -> float:
    """The flow shift of a pipeline root's scheduler (``shift``, or UniPC's ``flow_shift``); 1 without."""
    file = root / "scheduler" / "scheduler_config.json" if root is not None else None
    if file is None or not file.is_file():
        return 1.0
    config = json.loads(file.read_text(encoding="utf-8"))
    shift = config.get("flow_shift") if config.get("use_flow_sigmas") else config.get("shift")
    if shift is None:
        return 1.0
    if not isinstance(shift, int | float) or shift <= 0:
        raise ValueError(f"{file}: shift={shift!r} is not a positive number")
    return float(shift)


def diffusion_for(src: Path, expert: str) -> DiffusionConfig:
    """The flow-matching settings of the source: its scheduler's shift and, for an expert of a two-expert
    root, the expert's share of flow time (the high-noise expert runs t ≥ boundary, WanPipeline's rule).

    Args:
        src: the source given to the converter.
        expert: ``init.expert``'s value, or empty.
    """
    root = _pipeline_root(src)
    boundary = interop.wan_boundary(root) if root is not None and expert else None
    t_range = (0.0, 1.0)
    if boundary is not None:
        t_range = (boundary, 1.0) if expert == "high_noise" else (0.0, boundary)
    return DiffusionConfig(objective="flow", shift=_scheduler_shift(root), t_range=t_range)


def from_diffusers(
    src: str | Path, out: str | Path, expert: str = "", codec: str = "", text_encoder: str = ""
) -> Path:
    """Write the export of a diffusers transformer; returns ``out``.

    Args:
        src: a diffusers model folder, pipeline root, sharded index or ``.safetensors`` file.
        out: the export folder (created).
        expert: ``high_noise`` / ``low_noise`` for a two-expert pipeline root (Wan2.2-A14B).
        codec: ``data.codec`` for inference; default the pipeline root's ``vae/`` when it has one.
        text_encoder: ``data.text_encoder``; default the pipeline root's ``text_encoder/`` when it has one.

    Raises:
        ValueError: what the source has that we cannot express (named), or a malformed source.
        FileNotFoundError: no weights at ``src``.
    """
    from launch.export import write_export

    src = Path(src)
    cfg, state = interop.to_ours(interop.read_diffusers(src, expert=expert))
    root = _pipeline_root(src)
    extra: dict = {"diffusion": diffusion_for(src, expert), "source": str(src), "step": None}
    if cfg.text_len is not None:
        extra["max_text_len"] = cfg.text_len
    for key, given, folder in (("codec", codec, "vae"), ("text_encoder", text_encoder, "text_encoder")):
        if given:
            extra[key] = given
        elif root is not None and (root / folder).is_dir():
            extra[key] = str(root / folder)
    return write_export(out, cfg, state, extra)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m launch.convert", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("from-diffusers", help="a diffusers Wan / LTX-Video transformer → our export")
    f.add_argument("source", help="diffusers model folder, pipeline root, sharded index or .safetensors file")
    f.add_argument("out_dir", help="the export folder to write (model.safetensors + config.json)")
    f.add_argument(
        "--expert",
        choices=("high_noise", "low_noise"),
        default="",
        help="which transformer of a two-expert pipeline root (Wan2.2-A14B)",
    )
    f.add_argument("--codec", default="", help="data.codec for inference (default: the root's vae/)")
    f.add_argument("--text-encoder", default="", help="data.text_encoder (default: the root's text_encoder/)")
    a = p.parse_args(argv)
    if Path(a.out_dir).exists() and not Path(a.out_dir).is_dir():  # before reading GBs of weights
        p.error(f"OUT {a.out_dir} is a file: the export is a folder (model.safetensors + config.json)")
    try:
        out = from_diffusers(a.source, a.out_dir, a.expert, a.codec, a.text_encoder)
    except (CheckpointError, ValueError, FileNotFoundError) as e:  # the message names the file or the fields
        raise SystemExit(f"error: {e}") from None
    print(f"converted {a.source} → {out} ({', '.join(sorted(f.name for f in out.iterdir()))})")


if __name__ == "__main__":
    main()
