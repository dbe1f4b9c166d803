"""What a run directory allows a starting trainer: one writer (its lock) and a resume only of what
its checkpoint was trained as (the same engine, architecture and objective; for a LoRA run, adapters
on the same base)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch.distributed as dist
import yaml

from launch.config import JobConfig, TrainConfig, resume_differences
from launch.distributed import DistEnv, all_reduce
from launch.optim import horizon, lr_factor
from launch.runlock import RunDirLocked, RunLock
from parallel import checkpoint as ckpt

log = logging.getLogger(__name__)

BASE_FILE = "base.json"
"""A LoRA checkpoint's record of its frozen base: ``{"init_from": path, "fingerprint": sha256}``."""


class ResumeRefused(ValueError):
    """The run directory's checkpoint cannot be resumed by this config (another engine, model or
    objective): a deliberate change is a new run with ``init.from``."""


def lock_run_dir(run_dir: Path, env: DistEnv) -> RunLock | None:
    """Rank 0 takes ``run.dir``'s lock; every rank raises :class:`RunDirLocked` if it could not."""
    lock, error = None, ""
    if env.is_main:
        try:
            lock = RunLock(run_dir).acquire()
        except RunDirLocked as e:
            error = str(e)
        except OSError as e:  # not a directory, read-only, full: the other ranks must hear of it too
            error = f"run.dir={run_dir}: cannot create its lock file ({e})"
    if all_reduce(1.0 if error else 0.0, "max", env.device) > 0:
        raise RunDirLocked(error or f"run.dir={run_dir} is in use by another run (see rank 0's error)")
    return lock


def check_resumable(found: Path, cfg: JobConfig, run_dir: Path) -> None:
    """Refuse to resume ``found`` under another engine, architecture or objective (the checkpoint's
    own ``config.yaml`` is the reference; the run directory's, for checkpoints written without one).
    A resume that would change the learning-rate schedule is allowed, with a warning on rank 0
    (:func:`schedule_change`)."""
    engine = ckpt.engine_of(found)
    if engine != cfg.parallel.engine:
        raise ResumeRefused(
            f"{found} was written by parallel.engine={engine}, and this run has "
            f"parallel.engine={cfg.parallel.engine}: their optimizer states differ. Keep the engine, or "
            f"start a new run (another run.dir) with init.from={found} (weights only)"
        )
    check_kind(found, cfg)
    ref = found / "config.yaml" if (found / "config.yaml").is_file() else run_dir / "config.yaml"
    if not ref.is_file():
        return
    try:
        saved = yaml.safe_load(ref.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ResumeRefused(f"{ref}: unreadable ({e}); cannot tell what {found} was trained as") from e
    diffs = resume_differences(saved if isinstance(saved, dict) else {}, cfg)
    if diffs:
        raise ResumeRefused(
            f"run.dir={run_dir} holds {found.name}, trained with other settings than this config "
            f"({'; '.join(diffs)}, per {ref}): resuming would load its weights into another model or "
            f"objective. Keep those settings to resume, or start a new run (another run.dir) with "
            f"init.from={found} to train from its weights deliberately"
        )
    warning = schedule_change(saved if isinstance(saved, dict) else {}, cfg, ckpt.marker(found)["step"], ref)
    if warning and (not dist.is_initialized() or dist.get_rank() == 0):
        log.warning("%s", warning)


SCHEDULE_KEYS = ("steps", "schedule_steps", "schedule", "warmup", "min_lr_ratio", "decay_fraction", "lr")
"""The ``train.*`` settings the learning-rate schedule is made of (:func:`launch.optim.lr_factor`)."""


def schedule_change(saved: dict, cfg: JobConfig, step: int, ref: Path | str) -> str:
    """The warning for resuming at ``step`` under another learning-rate schedule than the one the saved
    config (the plain dict of ``ref``, a ``config.yaml``) trained with, or "" when every step still to
    train gets the same share of its peak lr under both: the same shape, or one that differs only where
    nothing trains any more. A new peak alone (``train.lr``, ``finetune.lora.lr``) is the warning of
    :class:`launch.optim.ConfigSchedule`. The warning names the keys (old → new), the lr of the next
    step under each schedule, and the overrides that restore the old shape while keeping the new
    ``train.steps`` (``train.schedule_steps`` = the old horizon). A key the saved config lacks (an older
    version) is not compared; ``schedule_steps`` did not exist then, so it was ``train.steps``."""
    new = cfg.train
    train = saved.get("train")
    if not isinstance(train, dict) or step >= new.steps:
        return ""
    values = {"schedule_steps": None} | {k: train[k] for k in SCHEDULE_KEYS if k in train}
    try:
        old = dataclasses.replace(new, **values)
        old.validate()
        if all(lr_factor(s, old) == lr_factor(s, new) for s in range(step, new.steps)):
            return ""
    except (TypeError, ValueError):  # a hand-edited saved config: not a schedule this code can draw
        return ""
    changed = [k for k in SCHEDULE_KEYS if getattr(old, k) != getattr(new, k)]
    keep = [f"train.{k}={getattr(old, k)}" for k in changed if k not in ("steps", "schedule_steps", "lr")]
    if horizon(old) != horizon(new):
        keep.append(f"train.schedule_steps={horizon(old)}")
    lora = saved.get("finetune", {}).get("lora", {}) if isinstance(saved.get("finetune"), dict) else {}
    was, now = _peak(old, cfg, lora.get("lr") if isinstance(lora, dict) else None), _peak(new, cfg)
    return (
        f"resuming at step {step} with another learning-rate schedule than the one it trained with "
        f"({', '.join(f'train.{k}: {getattr(old, k)} → {getattr(new, k)}' for k in changed)}; per {ref}): "
        f"step {step + 1} trains at lr {now * lr_factor(step, new):.4g}, where the schedule it trained "
        f"with gives {was * lr_factor(step, old):.4g} (that schedule spans {horizon(old)} steps, this one "
        f"{horizon(new)}; after its span the lr stays at its final value). "
        + (f"The new peak train.lr={new.lr} applies either way. " if old.lr != new.lr else "")
        + f"To keep the schedule it trained with and still train to step {new.steps}, add to the command: "
        + " ".join(keep)
    )


def _peak(train: TrainConfig, cfg: JobConfig, lora_lr=None) -> float:
    """The lr the trainer logs (parameter group 0) at the schedule's peak: a LoRA run's
    ``finetune.lora.lr`` (``lora_lr``: the saved config's), else ``train.lr``."""
    lora = cfg.finetune.lora
    if not lora.enabled:
        return train.lr
    given = lora.lr if lora_lr is None else lora_lr
    return given if isinstance(given, (int, float)) and given else train.lr


def check_kind(found: Path, cfg: JobConfig) -> None:
    """A LoRA checkpoint (adapters only, with ``base.json``) resumes a LoRA run, a full one full
    training; either way round is refused, whatever the saved config says (one written before
    ``finetune`` existed is not compared by :func:`check_resumable`)."""
    lora = cfg.finetune.lora
    if (found / BASE_FILE).is_file() and not lora.enabled:
        raise ResumeRefused(
            f"{found} holds LoRA adapters only (it has {BASE_FILE}), and this run has "
            f"finetune.lora.rank=0 (full training): set finetune.lora.* as that run did to resume it, or "
            f"train all weights from it in a new run (another run.dir) with init.from={found}, which loads "
            f"a LoRA run merged (its adapters added to the base it was trained on)"
        )
    if lora.enabled and not (found / BASE_FILE).is_file():
        raise ResumeRefused(
            f"{found} is a full-training checkpoint (no {BASE_FILE}), and this run has "
            f"finetune.lora.rank={lora.rank}: a LoRA run resumes only its own adapter checkpoints. Use "
            f"another run.dir with init.from={found} to put adapters on its weights"
        )


def check_base(found: Path, base: dict | None, cfg: JobConfig, env: DistEnv) -> None:
    """Refuse to resume a LoRA checkpoint onto another base: the fingerprint of the base this run
    built from ``init.from`` (known on rank 0, which built it) against the checkpoint's ``base.json``.
    A collective: every rank raises, the others pointing at rank 0's message.

    Args:
        base: the engine's record (:class:`launch.engine.BaseRecord`); None in full training.
    """
    error = ""
    if base is not None and env.is_main:
        error = _base_error(found, base, cfg)
    if all_reduce(1.0 if error else 0.0, "max", env.device) > 0:
        raise ResumeRefused(error or f"{found}: the base differs from its {BASE_FILE} (see rank 0's error)")


def _base_error(found: Path, base: dict, cfg: JobConfig) -> str:
    path = found / BASE_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        want = saved["fingerprint"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        return f"{path}: unreadable ({type(e).__name__}: {e}); cannot tell which base its adapters belong to"
    if want == base["fingerprint"]:
        return ""
    return (
        f"{found} holds adapters trained on another base model: init.from={cfg.init.from_ or '(none)'} "
        f"now gives a base of fingerprint {base['fingerprint']}, and the checkpoint's was {want} "
        f"(init.from={saved.get('init_from') or '(none)'}, per {path}). Point init.from at the model the "
        f"run started from, or start a new run (another run.dir)"
    )
