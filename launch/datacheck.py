"""The data keys, checked before a model is built.

- ``data.shards`` (and ``data.val_shards`` when evaluating) must name shards: a folder of clips, a
  video or a manifest (what ``python -m data.shards write`` reads) is an error naming the key and the
  command that writes shards, before the model is built (a path with nothing there is the loader's
  one-line error, ``data.pipeline.NoShards``).
- ``data.val_shards`` still naming the built-in demo's held-out clips while ``data.shards`` names
  other data (the demo config edited with ``data.shards=...`` only) is a warning: the validation loss
  and the sample metrics would score the demo's synthetic clips, not the user's.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import sys
from pathlib import Path

import yaml

from data.pipeline import NotShards, list_shards
from launch.config import JobConfig

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
DEMO_CONFIGS = ("demo.yaml", "tiny.yaml")  # the built-in configs on the synthetic shapes dataset


def _sources(cfg: JobConfig) -> list[tuple[str, object]]:
    """(key, the loader's config) of each shard set the run reads."""
    out = [("data.shards", cfg.data)]
    if cfg.eval.every and cfg.data.val_shards:
        out.append(
            ("data.val_shards", dataclasses.replace(cfg.data, shards=cfg.data.val_shards, prefix="val"))
        )
    return out


def source_errors(cfg: JobConfig) -> list[str]:
    """The shard keys that name clips or a manifest instead of shards, one message each (with the
    command that writes shards). A path that is not there is the loader's error, later: the dry run
    may plan on a machine without the data."""
    errors = []
    for key, data in _sources(cfg):
        try:
            list_shards(data, key)
        except NotShards as e:
            errors.append(str(e))
        except (OSError, ValueError):
            pass
    return errors


def _demo_values(key: str) -> set[str]:
    """``data.<key>`` of the built-in demo configs, as real paths."""
    out = set()
    for name in DEMO_CONFIGS:
        try:
            value = yaml.safe_load((CONFIG_DIR / name).read_text(encoding="utf-8"))["data"][key]
        except (OSError, KeyError, TypeError, yaml.YAMLError):
            continue
        out.add(os.path.realpath(value))
    return out


def val_shards_warnings(cfg: JobConfig) -> list[str]:
    """A warning when ``data.val_shards`` is the built-in demo's while ``data.shards`` is not."""
    val, shards = cfg.data.val_shards.strip(), cfg.data.shards.strip()
    if not (cfg.eval.every and val and shards):
        return []
    real = lambda p: os.path.realpath(p.rstrip("/"))  # noqa: E731
    if real(val) not in _demo_values("val_shards") or real(shards) in _demo_values("shards"):
        return []
    return [
        f"data.val_shards={val!r} is the built-in demo's held-out set, but data.shards={shards!r} is other "
        "data: the validation loss and sample metrics would score the demo's synthetic clips. Set "
        "data.val_shards=OUT (held-out clips: python -m data.shards write VAL_FOLDER OUT --prefix val), or "
        "turn validation off: eval.every=0 eval.sample_metrics=false"
    ]


def suggest_command(cfg: JobConfig) -> str:
    """``python -m data.buckets suggest`` for this run's shards, codec, patch and frame rate: buckets
    that fit the clips and the model (the generic command would use the tool's own defaults)."""
    patch = ",".join(str(p) for p in cfg.model.arch.patch_size)
    shards, codec = shlex.quote(cfg.data.shards), shlex.quote(cfg.data.codec)
    return (
        f"python -m data.buckets suggest {shards} --codec {codec} --patch {patch} "
        f"--fps {cfg.data.buckets.fps:g} > buckets.json"
    )


class NotScorable(ValueError):
    """``eval.sample_metrics``: nothing configured can score this run's samples (a user's error, said in
    one line; raised by :func:`launch.sample_metrics.check_scorable` once the held-out prompts are read)."""


def check_sources(cfg: JobConfig) -> None:
    """For the trainer, before the model is built: errors printed (``error: ...``) and exit 2; warnings
    logged once (by rank 0 of a launch)."""
    errors = source_errors(cfg)
    if errors:
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    if os.environ.get("RANK", "0") == "0":
        for w in val_shards_warnings(cfg):
            log.warning("%s", w)
