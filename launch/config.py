"""The training job's configuration: typed dataclasses read by OmegaConf, YAML presets, CLI overrides.

Resolution order: the model preset named by ``model.preset`` fills ``model.arch``; the YAML file is
merged over the schema; ``key=value`` overrides are merged last. OmegaConf checks every key and type
against the dataclasses, so an unknown key or a wrong type is an error naming the key. Nothing is
instantiated by name: strings select among fixed choices that the code checks.

    cfg = load_config("launch/configs/tiny.yaml", ["train.steps=100", "model.arch.depth=4"])
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.pipeline import DataConfig
from dit.config import PRESETS, DiTConfig
from dit.diffusion import DiffusionConfig
from parallel.config import ParallelConfig, checkpoint_every

CONFIG_DIR = Path(__file__).parent / "configs"
SCHEDULES = ("cosine", "constant", "wsd")
ENGINES = ("fsdp", "deepspeed")


@dataclass
class RunConfig:
    """Where the run lives and how it behaves as a process."""

    dir: str = "runs/tiny"
    """Run directory: config.yaml, metrics.jsonl, tb/, checkpoints/, samples/. Rerunning with the same
    directory resumes from its newest complete checkpoint."""
    device: str = "auto"
    """``auto`` (CUDA if available, else CPU), ``cuda`` or ``cpu``."""
    precision: str = "auto"
    """``bf16`` (autocast on CUDA; fp32 master weights), ``fp32``, or ``auto`` (bf16 on CUDA, else fp32)."""
    preempt_signal: str = "SIGUSR2"
    """Signal that requests save-and-exit (SLURM's ``--signal``). Not SIGUSR1: NCCL uses it."""
    max_bad_steps: int = 5
    """Abort after this many consecutive steps with a non-finite loss or gradient (each is skipped)."""
    progress: str = "auto"
    """``auto`` (a bar on a terminal, plain lines otherwise), ``bar`` or ``lines``."""


@dataclass
class ModelConfig:
    """The network: a preset from :data:`dit.config.PRESETS`, optionally edited field by field."""

    preset: str = "tiny"
    """Preset name; fills ``arch`` before the YAML and overrides are applied."""
    arch: DiTConfig = field(default_factory=DiTConfig)
    """The architecture; set single fields to change the preset (``model.arch.depth=4``)."""


@dataclass
class TrainData(DataConfig):
    """Training data: the loader settings of :class:`data.pipeline.DataConfig` plus encoders and the
    held-out set. Raw shards are encoded on the fly; latent shards are used as they are."""

    bucket_file: str = ""
    """JSON bucket file (``{"fps", "image_ratio", "buckets": [[F, H, W, batch], ...]}``); replaces
    ``buckets`` when set."""
    val_shards: str = ""
    """Held-out shards for the validation loss (directory, glob or list; ``val-*.tar`` in a directory)."""
    codec: str = "pixel"
    """Pixels ↔ latents for raw shards and samples: ``pixel`` (space-to-depth, no weights) or a local
    diffusers VAE directory (Wan / CogVideoX / HunyuanVideo)."""
    text_encoder: str = "minilm"
    """Caption encoder for raw shards and samples: ``minilm`` (bundled) or a local transformers folder."""
    max_text_len: int = 32
    """Tokens per caption for the text encoder."""


@dataclass
class TrainConfig:
    """Optimiser, schedule and the shape of a step."""

    steps: int = 1000
    """Optimizer steps to train for (the run ends here)."""
    lr: float = 1e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr`` (cosine and wsd)."""
    schedule: str = "cosine"
    """``cosine`` (warmup then cosine), ``constant`` (warmup then flat) or ``wsd`` (warmup-stable-decay)."""
    warmup: int = 100
    """Linear warmup steps."""
    decay_fraction: float = 0.2
    """``wsd``: share of ``steps`` spent in the final linear decay."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases, norms and embedding tables)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: off)."""
    grad_accum: int = 1
    """Batches per optimizer step on each data-parallel rank."""
    ema_decay: float = 0.9999
    """EMA of the weights (0: no EMA)."""
    cfg_dropout: float = 0.1
    """Probability of replacing a caption (or label) by the null condition, for classifier-free guidance."""
    task_t2v: float = 1.0
    """Weight of text-to-video samples (the whole clip is noised)."""
    task_i2v: float = 0.0
    """Weight of image-to-video samples (the first latent frame stays clean and is not in the loss)."""
    task_continuation: float = 0.0
    """Weight of video-continuation samples (the first ``continuation_frames`` latent frames stay clean)."""
    continuation_frames: int = 2
    """Clean leading latent frames in a continuation sample."""


@dataclass
class EvalConfig:
    """Validation loss on held-out shards at a fixed grid of timesteps (the number sweeps compare)."""

    every: int = 0
    """Evaluate every N steps and at the end (0: never)."""
    batches: int = 4
    """Held-out batches per evaluation (the same ones every time)."""
    timesteps: int = 8
    """Points of the fixed grid t_i = (i + 0.5) / n at which every held-out sample is scored."""


@dataclass
class CheckpointConfig:
    """torch.distributed.checkpoint snapshots in ``run.dir/checkpoints/step-XXXXXXXX/``."""

    every: int = 500
    """Save every N steps, and at the end and on preemption (0: only then)."""
    keep: int = 3
    """Complete checkpoints to keep (0: all); the newest is never deleted."""


@dataclass
class LoggingConfig:
    """metrics.jsonl, tensorboard and sample videos."""

    every: int = 10
    """Log every N steps (metrics are averaged over the steps in between, across ranks)."""
    tensorboard: bool = True
    """Also write tensorboard events to ``run.dir/tb``."""
    sample_every: int = 0
    """Write sample videos every N steps and at the end (0: never)."""
    phase_times: bool = False
    """On CUDA, synchronise at each phase boundary so forward/backward/optim times are exact (costs
    throughput; on a CPU the phases are exact anyway)."""


@dataclass
class SampleConfig:
    """Samples drawn during training (and defaults for ``python -m launch.sample``)."""

    prompts: list[str] = field(default_factory=lambda: ["a red circle moves slowly from left to right"])
    """Captions to sample (one video each); class ids such as ``"207"`` for a class-conditional model."""
    frames: int = 8
    """Frames in pixels."""
    height: int = 64
    """Height in pixels."""
    width: int = 64
    """Width in pixels."""
    fps: float = 8.0
    """Frame rate written to the mp4 (and given to an fps-conditioned model)."""
    steps: int = 25
    """Sampler steps."""
    sampler: str = "euler"
    """``euler`` | ``heun`` | ``ddim`` | ``dpm++2m``."""
    cfg: float = 4.0
    """Classifier-free guidance scale (1: none)."""
    use_ema: bool = True
    """Sample with the EMA weights when the run keeps them."""


@dataclass
class InitConfig:
    """Start from existing weights (fine-tuning)."""

    from_: str = ""
    """An export directory (model.safetensors) or a DCP checkpoint; weights only, never optimizer,
    scheduler or loader state. Written ``init.from`` in YAML and overrides."""
    use_ema: bool = True
    """Take the EMA weights when the source has them."""
    freeze: list[str] = field(default_factory=list)
    """fnmatch patterns of parameter names to freeze (``blocks.*.attn.*``)."""


@dataclass
class JobConfig:
    """The whole training job."""

    seed: int = 0
    """Seeds model initialisation, noise, timesteps, dropout and task draws (data order: ``data.seed``)."""
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: TrainData = field(default_factory=TrainData)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    init: InitConfig = field(default_factory=InitConfig)


def _rename_from(node) -> None:
    # ``from`` is a Python keyword, so the dataclass field is ``from_``; users write ``init.from``.
    init = node.get("init") if hasattr(node, "get") else None
    if init is not None and "from" in init:
        init["from_"] = init.pop("from")


def _choice(value: str, choices: tuple, key: str) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r}: expected one of {', '.join(choices)}")


def validate(cfg: JobConfig) -> None:
    """Cross-field checks OmegaConf's types cannot express; each error names the key."""
    _choice(cfg.run.device, ("auto", "cuda", "cpu"), "run.device")
    _choice(cfg.run.precision, ("auto", "bf16", "fp32"), "run.precision")
    _choice(cfg.run.progress, ("auto", "bar", "lines"), "run.progress")
    _choice(cfg.train.schedule, SCHEDULES, "train.schedule")
    _choice(cfg.parallel.engine, ENGINES, "parallel.engine")
    _choice(cfg.parallel.backend, ("auto", "nccl", "gloo"), "parallel.backend")
    _choice(cfg.sample.sampler, ("euler", "heun", "ddim", "dpm++2m"), "sample.sampler")
    positive = {
        "train.steps": cfg.train.steps,
        "train.grad_accum": cfg.train.grad_accum,
        "logging.every": cfg.logging.every,
        "eval.timesteps": cfg.eval.timesteps,
        "run.max_bad_steps": cfg.run.max_bad_steps,
    }
    for key, value in positive.items():
        if value < 1:
            raise ValueError(f"{key}={value}: must be at least 1")
    if not cfg.train.lr > 0:
        raise ValueError(f"train.lr={cfg.train.lr}: must be positive")
    if not 0 <= cfg.train.cfg_dropout < 1:
        raise ValueError(f"train.cfg_dropout={cfg.train.cfg_dropout}: must be in [0, 1)")
    if not 0 <= cfg.train.ema_decay < 1:
        raise ValueError(f"train.ema_decay={cfg.train.ema_decay}: must be in [0, 1)")
    tasks = (cfg.train.task_t2v, cfg.train.task_i2v, cfg.train.task_continuation)
    if min(tasks) < 0 or sum(tasks) <= 0:
        raise ValueError("train.task_t2v/task_i2v/task_continuation: weights must be >= 0, not all 0")
    for key in ("dp_replicate", "tp", "cp"):
        if getattr(cfg.parallel, key) < 1:
            raise ValueError(f"parallel.{key}={getattr(cfg.parallel, key)}: must be at least 1")
    if cfg.parallel.dp_shard == 0 or cfg.parallel.dp_shard < -1:
        raise ValueError(f"parallel.dp_shard={cfg.parallel.dp_shard}: must be -1 or at least 1")
    if cfg.parallel.cp_ring < 0:
        raise ValueError(f"parallel.cp_ring={cfg.parallel.cp_ring}: must be 0 (auto) or at least 1")
    if cfg.parallel.zero_stage not in (1, 2, 3):
        raise ValueError(f"parallel.zero_stage={cfg.parallel.zero_stage}: must be 1, 2 or 3")
    checkpoint_every(cfg.parallel.activation_checkpointing)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Schema ← model preset ← YAML ``path`` ← ``key=value`` overrides, checked; returns a JobConfig.

    Args:
        path: a YAML file (None: the built-in ``tiny.yaml``).
        overrides: dotted ``key=value`` strings (OmegaConf grammar: ``a.b=1``, ``a.l=[1,2]``).
    """
    path = Path(path) if path is not None else CONFIG_DIR / "tiny.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    try:
        file_cfg = OmegaConf.load(path)
        cli_cfg = OmegaConf.from_dotlist(list(overrides or []))
    except OmegaConfBaseException as e:
        raise ValueError(f"{path} or overrides: {e}") from e
    for node in (file_cfg, cli_cfg):
        _rename_from(node)
    preset = OmegaConf.select(cli_cfg, "model.preset") or OmegaConf.select(file_cfg, "model.preset") or "tiny"
    if preset not in PRESETS:
        raise ValueError(f"model.preset={preset!r}: expected one of {', '.join(sorted(PRESETS))}")
    schema = OmegaConf.structured(JobConfig(model=ModelConfig(preset=preset, arch=PRESETS[preset].replace())))
    try:
        # a ``???`` in the file means "the user must set this"; merging it would keep the schema default
        missing = sorted(k for k in OmegaConf.missing_keys(file_cfg) if OmegaConf.select(cli_cfg, k) is None)
        if missing:
            raise ValueError(f"{path}: set {', '.join(missing)} (marked ??? in the file)")
        merged = OmegaConf.merge(schema, file_cfg, cli_cfg)
        cfg: JobConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ValueError(f"config key {key}: {e.msg if hasattr(e, 'msg') else e}") from e
    if cfg.data.bucket_file:
        from data.buckets import load_bucket_file

        cfg.data.buckets = load_bucket_file(cfg.data.bucket_file)
        cfg.data.bucket_file = ""  # now inline, so the saved config stands on its own
    validate(cfg)
    return cfg


def to_yaml(cfg: JobConfig) -> str:
    """The resolved config as YAML (``init.from_`` written back as ``init.from``)."""
    node = OmegaConf.structured(cfg)
    container = OmegaConf.to_container(node)
    container["init"]["from"] = container["init"].pop("from_")
    return OmegaConf.to_yaml(container)


def save_config(cfg: JobConfig, path: str | os.PathLike) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(to_yaml(cfg), encoding="utf-8")
    os.replace(tmp, path)
