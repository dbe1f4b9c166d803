"""What a run directory allows a starting trainer: one writer (its lock) and a resume only of what
its checkpoint was trained as (the same engine, architecture and objective)."""

from __future__ import annotations

from pathlib import Path

import yaml

from launch.config import JobConfig, resume_differences
from launch.distributed import DistEnv, all_reduce
from launch.runlock import RunDirLocked, RunLock
from parallel import checkpoint as ckpt


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
    own ``config.yaml`` is the reference; the run directory's, for checkpoints written without one)."""
    engine = ckpt.engine_of(found)
    if engine != cfg.parallel.engine:
        raise ResumeRefused(
            f"{found} was written by parallel.engine={engine}, and this run has "
            f"parallel.engine={cfg.parallel.engine}: their optimizer states differ. Keep the engine, or "
            f"start a new run (another run.dir) with init.from={found} (weights only)"
        )
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
