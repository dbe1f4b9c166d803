"""The training job's configuration: typed dataclasses read by OmegaConf, YAML presets, CLI overrides.

Resolution order: the model preset named by ``model.preset`` fills ``model.arch``; the YAML file is
merged over the schema; ``key=value`` overrides are merged last. OmegaConf checks every key and type
against the dataclasses, so an unknown key or a wrong type is an error naming the key. Nothing is
instantiated by name: strings select among fixed choices that the code checks.

    cfg = load_config("launch/configs/tiny.yaml", ["train.steps=100", "model.arch.depth=4"])
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.pipeline import DataConfig, limits
from dit.config import LORA_TARGETS, PRESETS, DiTConfig, qk_norm_kind
from dit.diffusion import DiffusionConfig
from dit.sampling import GRIDS, SAMPLER_NAMES
from launch.config_help import expanded_error, leaf_keys, list_keys, override_error
from launch.distributed import preempt_signum
from parallel.config import ParallelConfig, check_choice, check_range

CONFIG_DIR = Path(__file__).parent / "configs"
INF = math.inf


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
    """``auto`` (a bar on a terminal, plain lines otherwise), ``bar`` or ``lines``: step/total, steps/s,
    ETA, loss, lr; a plain line per metrics record (``logging.every``), log records above the bar."""

    DEVICES: ClassVar[tuple[str, ...]] = ("auto", "cuda", "cpu")
    PRECISIONS: ClassVar[tuple[str, ...]] = ("auto", "bf16", "fp32")
    PROGRESS: ClassVar[tuple[str, ...]] = ("auto", "bar", "lines")

    def validate(self, key: str = "run") -> None:
        check_choice(self.device, self.DEVICES, f"{key}.device")
        check_choice(self.precision, self.PRECISIONS, f"{key}.precision")
        check_choice(self.progress, self.PROGRESS, f"{key}.progress")
        check_range(self.max_bad_steps, f"{key}.max_bad_steps", 1)
        preempt_signum(self.preempt_signal)


@dataclass
class ModelConfig:
    """The network: a preset from :data:`dit.config.PRESETS`, optionally edited field by field."""

    preset: str = "tiny"
    """Preset name; fills ``arch`` before the YAML and overrides are applied. ``from_init`` takes the
    architecture (and the text convention, ``arch.text_*``) from ``init.from`` instead: an export's
    config.json, a run's or checkpoint's config.yaml, or a diffusers model's config.json; the YAML's
    and the overrides' ``model.arch.*`` still apply on top. A config that sets every ``model.arch``
    field (a run's saved config.yaml) does not read the source."""
    arch: DiTConfig = field(default_factory=DiTConfig)
    """The architecture; set single fields to change the preset (``model.arch.depth=4``)."""


@dataclass
class TrainData(DataConfig):
    """Training data: the loader settings of :class:`data.pipeline.DataConfig` plus encoders and the
    held-out set. Raw shards are encoded on the fly; latent shards are used as they are."""

    bucket_file: str = ""
    """JSON bucket file (``{"fps", "image_ratio", "buckets": [[F, H, W, batch], ...]}``); replaces
    ``buckets`` when set, unless a ``key=value`` override sets ``data.buckets.buckets`` and not this
    (an override is the last word: the file's buckets are then not used)."""
    val_shards: str = ""
    """Held-out shards for the validation loss (directory, glob or list; ``val-*.tar`` in a directory)."""
    codec: str = "pixel"
    """Pixels ↔ latents for raw shards and samples: ``pixel`` (space-to-depth, no weights), a local
    diffusers VAE directory (Wan / CogVideoX / HunyuanVideo), or ``latents:C,T,S[,causal]``: only the
    geometry of latent shards made by another codec (C channels, T× temporal, S× spatial; DiT's SD
    image VAE is ``latents:4,1,8``), which trains on latent shards but cannot encode or decode."""
    text_encoder: str = "minilm"
    """Caption encoder for raw shards and samples: ``minilm`` (bundled) or a local transformers folder."""
    max_text_len: int = 32
    """Tokens per caption for the text encoder."""
    text_cache: int = 0
    """Captions of raw shards whose encoder states stay in memory (the least recently used is dropped),
    so a caption seen again is not encoded again (0: off). With the cache each caption is encoded on its
    own, so its states never depend on the batch it came in (resume stays exact). It costs
    ``max_text_len × text_dim × 4`` bytes a caption: 37 KB for MiniLM at 24 tokens, 8 MB for UMT5-XXL at
    512 (4096 of those: 32 GB of host memory a rank). It pays only when captions repeat, as in the CPU
    demo (~20 % of a step): each miss is encoded as a batch of one, so mostly unique captions are slower."""

    def validate(self, key: str = "data") -> None:
        for name, low, high in (
            ("num_workers", 0, 1024),
            ("prefetch_factor", 1, INF),
            ("shuffle_buffer", 0, INF),
            ("error_threshold", 0.0, 1.0),
            ("min_samples_for_threshold", 0, INF),
            ("max_text_len", 1, INF),
            ("text_cache", 0, INF),
        ):
            check_range(getattr(self, name), f"{key}.{name}", low, high)
        check_range(self.buckets.fps, f"{key}.buckets.fps", 0.0, open_low=True)
        ratio = self.buckets.image_ratio
        if ratio is not None and not 0 <= ratio <= 1:
            raise ValueError(f"{key}.buckets.image_ratio={ratio}: must be in [0, 1] (or null)")
        limits(self)  # the loader's own check of its size limits (finite, positive), at load time


@dataclass
class TrainConfig:
    """Optimiser, schedule and the shape of a step."""

    steps: int = 1000
    """Optimizer steps to train for (the run ends here)."""
    schedule_steps: int | None = None
    """Steps the learning-rate schedule spans (null: ``steps``); after them the lr stays at its final
    value. Extending a finished 800-step run with ``train.steps=1200 train.schedule_steps=800`` keeps
    the schedule it trained with (the 400 new steps at its final lr); ``train.steps=1200`` alone
    stretches the schedule over 1200 steps, which the resume warns about."""
    lr: float = 1e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr`` (cosine and wsd)."""
    schedule: str = "cosine"
    """``cosine`` (warmup then cosine), ``constant`` (warmup then flat) or ``wsd`` (warmup-stable-decay)."""
    warmup: int = 100
    """Linear warmup steps."""
    decay_fraction: float = 0.2
    """``wsd``: share of the schedule (``schedule_steps``, else ``steps``) spent in the final linear decay."""
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

    SCHEDULES: ClassVar[tuple[str, ...]] = ("cosine", "constant", "wsd")

    def validate(self, key: str = "train") -> None:
        check_choice(self.schedule, self.SCHEDULES, f"{key}.schedule")
        check_range(self.lr, f"{key}.lr", 0.0, open_low=True)
        check_range(self.eps, f"{key}.eps", 0.0, open_low=True)
        for name, low, high in (
            ("steps", 1, INF),
            ("grad_accum", 1, INF),
            ("grad_clip", 0.0, INF),
            ("warmup", 0, INF),
            ("min_lr_ratio", 0.0, 1.0),
            ("decay_fraction", 0.0, 1.0),
            ("weight_decay", 0.0, INF),
            ("continuation_frames", 1, INF),
        ):
            check_range(getattr(self, name), f"{key}.{name}", low, high)
        if self.schedule_steps is not None:
            check_range(self.schedule_steps, f"{key}.schedule_steps", 1)
        for i, beta in enumerate(self.betas):
            check_range(beta, f"{key}.betas.{i}", 0.0, 1.0, open_high=True)
        check_range(self.cfg_dropout, f"{key}.cfg_dropout", 0.0, 1.0, open_high=True)
        check_range(self.ema_decay, f"{key}.ema_decay", 0.0, 1.0, open_high=True)
        tasks = (self.task_t2v, self.task_i2v, self.task_continuation)
        if min(tasks) < 0 or sum(tasks) <= 0:
            raise ValueError(f"{key}.task_t2v/task_i2v/task_continuation: weights must be >= 0, not all 0")


@dataclass
class EvalConfig:
    """Validation loss on held-out shards at a fixed grid of timesteps (the number sweeps compare)."""

    every: int = 0
    """Evaluate every N steps and at the end (0: never)."""
    batches: int = 4
    """Held-out batches per evaluation, over all data-parallel ranks (the first ones of one pass over
    ``data.val_shards``, the same every time and under every layout; a multiple of the data-parallel
    size keeps every rank busy)."""
    timesteps: int = 8
    """Points of the fixed grid t_i = (i + 0.5) / n at which every held-out sample is scored."""
    sample_metrics: bool = False
    """At every evaluation (``eval.every`` and the end), also generate one video per prompt of a fixed
    set with fixed seeds (EMA weights, the ``sample`` section's sampler, steps, cfg, frames, size, fps)
    and score them: with the probe (:mod:`data.probe`) when every prompt is in the built-in dataset's
    grammar, with the configured Fréchet/CLIP metrics otherwise (both when both apply). Logged as
    ``probe_*``, ``fid``, ``fvd``, ``clip_score`` with the validation loss, the samples written to
    ``run.dir/samples/eval-STEP/`` (see :mod:`launch.sample_metrics`)."""
    sample_prompts: list[str] = field(default_factory=list)
    """The fixed prompts (empty: the captions of the first ``sample_count`` clips of
    ``data.val_shards``, in their fixed order)."""
    sample_count: int = 16
    """Prompts taken from ``data.val_shards`` when ``sample_prompts`` is empty, and the number of
    held-out clips the Fréchet metrics compare against."""
    fid_features: str = ""
    """FID on frames: a local Inception-style feature network as a TorchScript file (e.g. the reference
    ``inception-2015-12-05.pt``; empty: no FID). Nothing is downloaded (:mod:`launch.fidelity`)."""
    fvd_features: str = ""
    """FVD on clips: a local I3D-style feature network as a TorchScript file (e.g. the reference
    ``i3d_torchscript.pt``; empty: no FVD)."""
    clip_model: str = ""
    """CLIP text–video score: a local transformers CLIP folder (empty: no CLIP score)."""

    def validate(self, key: str = "eval") -> None:
        check_range(self.every, f"{key}.every", 0)
        check_range(self.batches, f"{key}.batches", 1)
        check_range(self.timesteps, f"{key}.timesteps", 1)
        check_range(self.sample_count, f"{key}.sample_count", 1)
        for i, prompt in enumerate(self.sample_prompts):
            if not prompt.strip():
                raise ValueError(f"{key}.sample_prompts.{i}: an empty prompt")


@dataclass
class CheckpointConfig:
    """torch.distributed.checkpoint snapshots in ``run.dir/checkpoints/step-XXXXXXXX/``."""

    every: int = 500
    """Save every N steps, and at the end and on preemption (0: only then)."""
    keep: int = 3
    """Complete checkpoints to keep (0: all); the newest is never deleted."""

    def validate(self, key: str = "checkpoint") -> None:
        check_range(self.every, f"{key}.every", 0)
        check_range(self.keep, f"{key}.keep", 0)


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

    def validate(self, key: str = "logging") -> None:
        check_range(self.every, f"{key}.every", 1)
        check_range(self.sample_every, f"{key}.sample_every", 0)


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
    """One of :data:`dit.sampling.SAMPLER_NAMES` (``euler``, ``heun``, ``ddim``, ``dpm++2m``)."""
    cfg: float = 4.0
    """Classifier-free guidance scale (1: none)."""
    grid: str = "uniform"
    """Sampling grid (:data:`dit.sampling.GRIDS`): ``uniform`` (t from 1 to 0 in equal steps, shifted) or
    ``diffusers`` (the σ grid of the sampler's diffusers scheduler: FlowMatchEuler for ``euler``, UniPC
    for ``unipc``, so samples equal ``WanPipeline``'s)."""
    use_ema: bool = True
    """Sample with the EMA weights when the run keeps them."""

    def validate(self, key: str = "sample") -> None:
        check_choice(self.sampler, SAMPLER_NAMES, f"{key}.sampler")
        check_choice(self.grid, GRIDS, f"{key}.grid")
        for name in ("steps", "frames", "height", "width"):
            check_range(getattr(self, name), f"{key}.{name}", 1)
        check_range(self.fps, f"{key}.fps", 0.0, open_low=True)


@dataclass
class InitConfig:
    """Start from existing weights (fine-tuning)."""

    from_: str = ""
    """Where the weights come from: an export directory (model.safetensors + config.json), a checkpoint
    (or a run directory: its newest intact one), or a diffusers model (a folder with config.json and
    diffusion_pytorch_model*.safetensors, sharded with an index or not; a pipeline root with
    model_index.json; or one .safetensors file). Weights only, never optimizer, scheduler or loader
    state. Written ``init.from`` in YAML and overrides."""
    use_ema: bool = True
    """Take the EMA weights when the source has them."""
    expert: str = ""
    """For a two-expert diffusers pipeline root (Wan2.2-A14B): ``high_noise`` (its ``transformer/``,
    used at t ≥ the boundary) or ``low_noise`` (``transformer_2/``); empty for every other source."""
    min_match: float = 0.5
    """Least share of the source's tensors whose names are parameters of the model, and of the
    parameters of the source's own architecture (its config) that the source holds; below either (and
    always when none match: another library's names) ``init.from`` is an error naming the keys. Lower
    it to load part of a deeper model, or a partial file on purpose (the model's own parameters the
    source lacks must then be listed in ``init.new``)."""
    new: list[str] = field(default_factory=list)
    """fnmatch patterns of the model's parameters that may start fresh (``["blocks.12.*",
    "fps_embedder.*"]``): layers the source does not have, or ``text_proj.*`` for a new text encoder
    width. Every other parameter must come from the source (copied, or inflated for more input channels
    or a temporal patch), else ``init.from`` is an error naming the missing ones; a pattern that names
    no parameter of the model is an error too."""
    allow_arch_changes: list[str] = field(default_factory=list)
    """``model.arch`` fields that may differ from the source's architecture although the model then
    computes another function with the same weights (``[text_mask, text_null]`` to fine-tune a Wan model
    into the masked text convention; ``[depth]`` to drop a diffusers source's last blocks). Where the
    source names its architecture, any other such difference is an error naming
    ``model.arch.FIELD: source → model``."""
    freeze: list[str] = field(default_factory=list)
    """fnmatch patterns of parameter names to freeze (``blocks.*.attn.*``)."""

    def validate(self, key: str = "init") -> None:
        check_range(self.min_match, f"{key}.min_match", 0.0, 1.0)


@dataclass
class LoraConfig:
    """LoRA adapters through peft on a frozen base (``finetune.lora.*``); off while ``rank`` is 0."""

    rank: int = 0
    """The adapters' rank r (0: no LoRA, every parameter not in ``init.freeze`` trains)."""
    alpha: float | None = None
    """Scale numerator: an adapter adds ``alpha / rank · B·A`` (None: alpha = rank, a scale of 1)."""
    dropout: float = 0.0
    """Dropout on the adapters' input (peft's ``lora_dropout``)."""
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """fnmatch patterns of module names (``blocks.*.attn.q``) that get adapters; each must match at
    least one ``nn.Linear`` of the model, else an error naming the pattern."""
    init: str = "default"
    """How A and B start (peft's ``init_lora_weights``): ``default`` (A Kaiming-uniform, B zero),
    ``gaussian`` (A normal with std 1/r, B zero), ``pissa`` (the principal singular directions of each
    base weight move into A and B and out of the base; a full SVD of every target, minutes on a 14B
    base), ``pissa_niter_N`` (the same from a randomized SVD with N subspace iterations: seconds; N = 4
    is usually close) or ``olora`` (a QR factor of each base weight). Every one starts at the base
    model's function."""
    lr: float = 0.0
    """The adapters' learning rate (0: ``train.lr``)."""
    plus_ratio: float = 1.0
    """LoRA+: B learns at ``plus_ratio`` × the adapters' learning rate (musubi-tuner's
    ``loraplus_lr_ratio``; the LoRA+ paper suggests 16). 1 is plain LoRA."""

    INITS: ClassVar[tuple[str, ...]] = ("default", "gaussian", "pissa", "olora")

    def validate(self, key: str = "finetune.lora") -> None:
        check_range(self.rank, f"{key}.rank", 0)
        if self.alpha is not None:
            check_range(self.alpha, f"{key}.alpha", 0.0, open_low=True)
        check_range(self.dropout, f"{key}.dropout", 0.0, 1.0, open_high=True)
        if self.init not in self.INITS and not re.fullmatch(r"pissa_niter_[1-9]\d*", self.init):
            inits = ", ".join(self.INITS)
            raise ValueError(f"{key}.init={self.init!r}: expected one of {inits} or pissa_niter_<N>, N ≥ 1")
        check_range(self.lr, f"{key}.lr", 0.0)
        check_range(self.plus_ratio, f"{key}.plus_ratio", 0.0, open_low=True)
        if self.rank > 0 and not self.targets:
            raise ValueError(f"{key}.targets is empty: name the modules that get adapters")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        """``alpha / rank``, the factor on every adapter's B·A."""
        return (self.alpha if self.alpha is not None else self.rank) / max(self.rank, 1)


@dataclass
class FinetuneConfig:
    """Parameter-efficient and memory-lean fine-tuning of a (usually pretrained, ``init.from``) base."""

    lora: LoraConfig = field(default_factory=LoraConfig)
    base_dtype: str = "fp32"
    """How the frozen base's weights are stored: ``fp32``, ``bf16`` (half the memory; the matmuls run in
    bf16 as they do under bf16 autocast anyway) or ``fp8`` (float8_e4m3fn storage with a per-tensor
    scale, dequantised to bf16 for each matmul: a quarter of fp32). Adapters, their gradients, optimizer
    states and EMA stay fp32. Needs ``finetune.lora.rank`` > 0 or ``init.freeze`` (only frozen weights
    are stored so)."""
    block_swap: int = 0
    """Hold the frozen base weights of this many blocks (the last ones) in pinned host memory and copy
    each onto the GPU just before it runs, forward and backward (musubi-tuner's ``blocks_to_swap``): for
    bases larger than the GPU. Single-GPU or data-parallel without sharding; with FSDP sharding use
    ``parallel.cpu_offload`` instead."""

    BASE_DTYPES: ClassVar[tuple[str, ...]] = ("fp32", "bf16", "fp8")

    def validate(self, key: str = "finetune") -> None:
        self.lora.validate(f"{key}.lora")
        check_choice(self.base_dtype, self.BASE_DTYPES, f"{key}.base_dtype")
        check_range(self.block_swap, f"{key}.block_swap", 0)


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
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    SECTIONS: ClassVar[tuple[str, ...]] = (
        "run", "data", "train", "eval", "parallel", "checkpoint", "logging", "sample", "init", "finetune",
    )  # fmt: skip
    """The sections with a ``validate(key)`` of their own; ``model.arch`` checks itself when it is built,
    and :meth:`validate` checks the two ranges of ``diffusion`` (``dit/`` does not import these
    helpers)."""

    def validate(self) -> None:
        """Every section's own checks, then the settings that contradict each other; each error names
        the key. OmegaConf has checked the types already."""
        bad = non_finite(self)
        if bad:
            raise ValueError(f"{bad[0]}={_lookup(self, bad[0])}: must be a finite number")
        for name in self.SECTIONS:
            getattr(self, name).validate(name)
        check_range(self.diffusion.shift, "diffusion.shift", 0.0, open_low=True)
        check_range(self.diffusion.num_timesteps, "diffusion.num_timesteps", 1)
        lo, hi = self.diffusion.t_range
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"diffusion.t_range={[lo, hi]}: expected 0 ≤ lo < hi ≤ 1")
        text_len = self.model.arch.text_len
        if text_len is not None and self.data.max_text_len != text_len:
            raise ValueError(
                f"data.max_text_len={self.data.max_text_len} but model.arch.text_len={text_len}: the model "
                "was trained on captions padded to that length (an unmasked pad changes its output)"
            )
        errors = cross_field_errors(self)
        if errors:
            raise ValueError("; ".join(errors))


def _rename_from(node) -> None:
    # ``from`` is a Python keyword, so the dataclass field is ``from_``; users write ``init.from``.
    init = node.get("init") if hasattr(node, "get") else None
    if init is None or "from" not in init.keys():  # noqa: SIM118 (``in`` is False for a ``???`` value)
        return
    if OmegaConf.is_missing(init, "from"):  # a recipe's required source, set on the command line
        init["from_"] = "???"
        del init["from"]
    else:
        init["from_"] = init.pop("from")


def _strings_as_written(schema, cli_cfg, overrides: list[str]) -> None:
    """An override of a string field keeps what the user wrote. YAML reads ``key=`` (and ``key=null``) as
    None, which a string field refuses, though it is how one clears a file's value
    (``data.val_shards=``: no validation); and ``off``/``no``/``on``/``yes`` as bools, which OmegaConf
    turns into ``'False'``/``'True'`` (``run.progress=off`` was refused as 'False')."""
    for item in overrides:
        key, _, text = (part.strip() for part in item.partition("="))
        key = "init.from_" if key == "init.from" else key  # the field's name (see _rename_from)
        value = OmegaConf.select(cli_cfg, key, default=None)
        default = OmegaConf.select(schema, key, default=None)
        if isinstance(default, str) and (value is None or isinstance(value, bool)):
            OmegaConf.update(cli_cfg, key, "" if value is None else text, merge=False)


def _lookup(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def non_finite(obj, prefix: str = "") -> list[str]:
    """Dotted keys of every NaN or infinite float in a config (dataclasses, lists, tuples)."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [prefix]
    if dataclasses.is_dataclass(obj):
        items = ((f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj))
    elif isinstance(obj, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(obj))
    else:
        return []
    return [k for name, v in items for k in non_finite(v, f"{prefix}.{name}" if prefix else name)]


def cross_field_errors(cfg: JobConfig) -> list[str]:
    """Settings that contradict each other, found from the config alone (no file is read), one
    sentence naming the keys for each; ``python -m launch.train --dry-run`` checks what needs the
    codec's files, the world size and the planner."""
    errors = []
    if cfg.eval.every > 0 and not cfg.data.val_shards:
        errors.append(
            f"eval.every={cfg.eval.every} scores held-out shards, but data.val_shards is empty: set it "
            "(a directory, glob or list of val-*.tar) or eval.every=0"
        )
    errors += _sample_metric_errors(cfg)
    ft = cfg.finetune
    if ft.base_dtype != "fp32" and not (ft.lora.enabled or cfg.init.freeze):
        errors.append(
            f"finetune.base_dtype={ft.base_dtype} stores the frozen base, but nothing is frozen: set "
            "finetune.lora.rank (LoRA) or init.freeze, or finetune.base_dtype=fp32"
        )
    if ft.base_dtype == "fp8" and cfg.parallel.tp > 1:
        errors.append(
            f"finetune.base_dtype=fp8 with parallel.tp={cfg.parallel.tp}: an fp8 weight has one scale for "
            "the whole tensor, a tensor-parallel slice cannot carry: use finetune.base_dtype=bf16 or tp=1"
        )
    if ft.block_swap and not (ft.lora.enabled or cfg.init.freeze):
        errors.append(
            f"finetune.block_swap={ft.block_swap} swaps the frozen base's blocks, but nothing is frozen: "
            "set finetune.lora.rank (LoRA) or init.freeze, or finetune.block_swap=0"
        )
    if cfg.logging.sample_every > 0 and cfg.data.codec.startswith("latents:"):
        errors.append(
            f"logging.sample_every={cfg.logging.sample_every}: data.codec={cfg.data.codec!r} only declares "
            "the latents' geometry and cannot decode samples: set logging.sample_every=0"
        )
    return errors


def _sample_metric_errors(cfg: JobConfig) -> list[str]:
    e = cfg.eval
    if not e.sample_metrics:
        return []
    errors = []
    if e.every == 0:
        errors.append(
            "eval.sample_metrics=true scores samples at every evaluation, but eval.every=0: set eval.every "
            "(and data.val_shards), or eval.sample_metrics=false"
        )
    if cfg.data.codec.startswith("latents:"):
        errors.append(
            f"eval.sample_metrics=true: data.codec={cfg.data.codec!r} only declares the latents' geometry "
            "and cannot decode samples to score: set eval.sample_metrics=false"
        )
    return errors


def validate(cfg: JobConfig) -> None:
    """:meth:`JobConfig.validate` (kept for callers holding a config they built in code)."""
    cfg.validate()


def parse_overrides(overrides: list[str]):
    """``key=value`` strings as one OmegaConf node; a malformed one is an error that names it.

    Values are YAML, so a value starting with ``*``, ``&``, ``!``, ``[`` or ``{`` must be quoted for
    YAML as well as for the shell: ``'data.shards="/data/*.tar"'``."""
    expanded = expanded_error(overrides)  # the shell's work on an unquoted pattern: named, not merged
    if expanded:
        raise ValueError(expanded)
    nodes = []
    for i, item in enumerate(overrides):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():  # a space for '=', or the file names of an unquoted glob
            schema = JobConfig()
            raise ValueError(override_error(overrides, i, leaf_keys(schema), list_keys(schema)))
        try:
            nodes.append(OmegaConf.from_dotlist([item]))
        except (OmegaConfBaseException, yaml.YAMLError) as e:
            first = str(e).strip().splitlines()[0]
            # a leading * & ! is YAML syntax (alias, anchor, tag), so a glob must be quoted for YAML too
            quote = f"; quote it inside the shell's quotes: '{key}=\"{value}\"'"
            hint = quote if value[:1] in "*&!%@`" else ""
            raise ValueError(f"override {item!r}: the value is not valid YAML ({first}){hint}") from e
    return OmegaConf.merge(*nodes) if nodes else OmegaConf.create({})


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
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ValueError(f"--config {path}: not valid YAML: {e}") from e
    cli_cfg = parse_overrides(overrides or [])
    for node in (file_cfg, cli_cfg):
        _rename_from(node)
    preset = OmegaConf.select(cli_cfg, "model.preset") or OmegaConf.select(file_cfg, "model.preset") or "tiny"
    arch = _preset_arch(preset, file_cfg, cli_cfg)
    schema = OmegaConf.structured(JobConfig(model=ModelConfig(preset=preset, arch=arch)))
    _strings_as_written(schema, cli_cfg, overrides or [])
    try:
        # a ``???`` in the file means "the user must set this"; merging it would keep the schema default
        missing = sorted(k for k in OmegaConf.missing_keys(file_cfg) if OmegaConf.select(cli_cfg, k) is None)
        if missing:
            named = (k.replace("init.from_", "init.from") for k in missing)
            raise ValueError(f"{path}: set {', '.join(named)} (marked ??? in the file)")
        merged = OmegaConf.merge(schema, file_cfg, cli_cfg)
        cfg: JobConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e.msg if hasattr(e, "msg") else e).split("\n    full_key:")[0]  # one line: the key is said
        raise ValueError(f"config key {key}: {msg}") from e
    except TypeError as e:  # OmegaConf's merge of a value into a list or a section (``sample.prompts.0=x``)
        raise ValueError(f"--config {path} and the overrides do not merge: {e}") from e
    text_len = cfg.model.arch.text_len
    given = any(OmegaConf.select(n, "data.max_text_len") is not None for n in (file_cfg, cli_cfg))
    if text_len is not None and not given:
        cfg.data.max_text_len = text_len  # the length the model was trained at (Wan: 512)
    inline = OmegaConf.select(cli_cfg, "data.buckets.buckets") is not None
    if inline and OmegaConf.select(cli_cfg, "data.bucket_file") is None:
        cfg.data.bucket_file = ""  # the file's bucket_file would silently replace the override
    if cfg.data.bucket_file:
        from data.buckets import load_bucket_file

        cfg.data.buckets = load_bucket_file(cfg.data.bucket_file)
        cfg.data.bucket_file = ""  # now inline, so the saved config stands on its own
    cfg.validate()
    return cfg


FROM_INIT = "from_init"
"""``model.preset`` that takes the architecture from ``init.from``."""


def _preset_arch(preset: str, file_cfg, cli_cfg) -> DiTConfig:
    """The architecture ``model.preset`` names, before the file's and overrides' ``model.arch.*``."""
    if preset != FROM_INIT:
        if preset not in PRESETS:
            choices = ", ".join([*sorted(PRESETS), FROM_INIT])
            raise ValueError(f"model.preset={preset!r}: expected one of {choices}")
        return PRESETS[preset].replace()
    given: set[str] = set()
    for node in (file_cfg, cli_cfg):
        arch = OmegaConf.select(node, "model.arch")
        if OmegaConf.is_dict(arch):
            given |= set(arch.keys())
    if {f.name for f in dataclasses.fields(DiTConfig)} <= given:
        return DiTConfig()  # every field is set (a run's saved config.yaml): the source is not read
    source = OmegaConf.select(cli_cfg, "init.from_") or OmegaConf.select(file_cfg, "init.from_")
    expert = OmegaConf.select(cli_cfg, "init.expert") or OmegaConf.select(file_cfg, "init.expert") or ""
    if not source:
        raise ValueError(
            "model.preset=from_init takes the architecture from init.from, but init.from is not set: name "
            "the source (an export, a run or checkpoint, or a diffusers model) or another preset"
        )
    from launch.finetune import source_arch  # imports launch.export, which imports this module

    return source_arch(str(source), str(expert))


# what a checkpoint's weights and optimizer state mean: resuming with one of these changed would load
# them into another network, or train them toward another target (that is init.from, not a resume)
RESUME_FIXED = (
    "model.arch",
    "diffusion.objective",
    "diffusion.prediction",
    "diffusion.num_timesteps",
    "diffusion.beta_schedule",
    "diffusion.beta_start",
    "diffusion.beta_end",
    "diffusion.zero_terminal_snr",
    "data.codec",
    "data.text_encoder",
    # an adapter checkpoint holds A and B of these shapes and scale, on these modules, from this start
    "finetune.lora.rank",
    "finetune.lora.alpha",
    "finetune.lora.targets",
    "finetune.lora.init",
)


_DDPM = {"diffusion.objective": "ddpm"}
# settings that mean something only in some configurations (compared only when they do in the saved
# config or in this one), and one that never changes what the weights compute
_ONLY_WHEN = {
    "diffusion.num_timesteps": _DDPM,
    "diffusion.beta_schedule": _DDPM,
    "diffusion.beta_start": _DDPM,
    "diffusion.beta_end": _DDPM,
    "diffusion.zero_terminal_snr": _DDPM,
    "diffusion.prediction": _DDPM,
    "model.arch.max_latent_size": {"model.arch.pos_embed": "learned"},
    "model.arch.num_classes": {"model.arch.conditioning": "class"},
    "model.arch.text_dim": {"model.arch.conditioning": "text"},
    "model.arch.mup_base_width": {"model.arch.parametrization": "mup"},
    "model.arch.mup_base_head_dim": {"model.arch.parametrization": "mup"},
}
_NEVER = ("model.arch.attention_backend",)  # sdpa, flash_attn and math compute the same attention


def _flat(node, prefix: str = "") -> dict:
    """A nested dict as ``{"a.b.c": leaf}``."""
    if isinstance(node, dict):
        return {k: v for name, sub in node.items() for k, v in _flat(sub, f"{prefix}{name}.").items()}
    return {prefix[:-1]: node}


def resume_differences(saved: dict, cfg: JobConfig) -> list[str]:
    """``key: saved → now`` for every :data:`RESUME_FIXED` setting that differs between a saved
    config (the plain dict of a run's ``config.yaml``) and ``cfg``. A key the saved config lacks
    (written by an older version) is not compared."""
    a, b = _flat(saved), _flat(yaml.safe_load(to_yaml(cfg)))
    if "model.arch.qk_norm" in a:  # a run saved before qk_norm had kinds wrote a bool
        a["model.arch.qk_norm"] = qk_norm_kind(a["model.arch.qk_norm"])

    def fixed(k: str) -> bool:
        if k in _NEVER or not any(k == f or k.startswith(f + ".") for f in RESUME_FIXED):
            return False
        when = _ONLY_WHEN.get(k, {})
        return all(a.get(w) == v or b.get(w) == v for w, v in when.items())

    return [f"{k}: {a[k]!r} → {b[k]!r}" for k in sorted(a.keys() & b.keys()) if fixed(k) and a[k] != b[k]]


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
