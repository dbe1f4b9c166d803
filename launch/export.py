"""Export a checkpoint for inference or fine-tuning: ``python -m launch.export CHECKPOINT_OR_RUN OUT_DIR``.

Writes ``model.safetensors``, ``ema.safetensors`` (when the run kept an EMA) and ``config.json`` (the
architecture, diffusion objective, codec and text encoder: everything ``launch.sample`` and
``init.from`` need). Reads the checkpoint in one process, whatever world size wrote it: a DCP
checkpoint's shards, or the whole tensors a DeepSpeed checkpoint carries.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from launch.config import JobConfig, load_config
from parallel import checkpoint as ckpt


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
        "step": step,
        "source": str(source),
    }


def export(src: str | Path, out_dir: str | Path) -> Path:
    """Export the newest complete checkpoint at ``src`` (a checkpoint, its folder or a run directory)."""
    path = ckpt.resolve(src)
    cfg = load_config(path / "config.yaml")
    state = ckpt.read_full(path, {"model", "ema", "step"})
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
    out = export(a.source, a.out_dir)
    print(f"exported {ckpt.resolve(a.source)} → {out} ({', '.join(sorted(f.name for f in out.iterdir()))})")


if __name__ == "__main__":
    main()
