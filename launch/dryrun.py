"""Start-up validation of a training config, without GPUs, process groups or weights:
``python -m launch.train --config FILE --dry-run [--world-size N] [--gpu h100] [key=value ...]``.

Resolves the config, builds the model on the meta device, and checks what would otherwise fail (or,
worse, silently train on something else) minutes into a job on many GPUs:

- every bucket against the codec's compression (read from its ``config.json`` alone) and the model's
  patch: a causal VAE encodes 1 + k·temporal frames and would drop the rest, H and W must be whole
  latents divisible by the patch, and so must the latent frames;
- the codec's latent channels against ``model.arch.in_channels`` (latent and raw shards alike), the
  text encoder's width against ``model.arch.text_dim`` when its folder is here;
- the settings :func:`launch.config.cross_field_errors` checks (``eval.every`` without
  ``data.val_shards``, …);
- with ``eval.sample_metrics``: the feature-network files and CLIP folder exist, fixed prompts are in
  the built-in grammar unless a network scores them, a Fréchet distance gets at least 2 prompts;
- the parallel layout against ``--world-size`` and the heads (:func:`parallel.parallelize.make_dims`),
  ``finetune.block_swap`` on one process only (:func:`parallel.parallelize.check_block_swap`),
  the DeepSpeed engine's own constraints, and every bucket's (and the samples') tokens against the
  context-parallel cut: tokens divisible by cp (× tp under sequence parallelism), whole latent frames
  per rank for the factorized layout and for per-frame timesteps (image-to-video, continuation);
- the memory plan (:func:`parallel.plan.plan`) of every valid bucket on ``--gpu`` under the config's
  layout, checkpointing, grad_accum, engine, EMA and offload: the report carries the full plan of the
  bucket predicted to need the most memory (usually the one with the most tokens per batch; caption
  tokens count too); a bucket not fitting is a warning with what the planner predicts would fit;
- for a LoRA (``finetune.lora.rank`` > 0; the plan counts ``finetune.base_dtype``, ``block_swap`` and
  ``parallel.activation_offload``): ``lora_fit``, whether that bucket fits a 24, 48 and 80 GB GPU and
  the first options that make it (:func:`lora_options`: full checkpointing, a bf16 base, activation
  offload, block swap, an fp8 base, in that order).

Prints one JSON object on stdout: ``ok``, ``errors``, ``warnings``, ``preset``, ``params``,
``world_size``, ``gpu``, ``layout``, ``codec``, ``buckets`` (each: pixel and latent sizes, batch size,
``tokens`` per sample, ``tokens_per_batch``, ``flops_train_step`` of the batch, ``memory_gib``,
``fits``), ``largest_bucket`` (most tokens per batch) and ``flops_per_step`` (its model FLOPs per
optimizer step per data-parallel rank, × grad_accum), ``plan_bucket``, ``plan`` and ``lora_fit``.
Returns the exit code: 0, or 2 when anything is wrong, with the errors also on stderr. Nothing is
written (``run.dir`` is not touched) and nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

from data.buckets import Bucket, Compression, check_bucket, latent_size
from data.encoders import codec_geometry, minilm_path
from dit.extras import MissingExtra
from dit.flops import macs_breakdown
from dit.model import SpacetimeDiT, num_params
from launch.config import JobConfig, cross_field_errors
from launch.datacheck import source_errors, val_shards_warnings
from parallel.dims import ParallelDims
from parallel.parallelize import check_block_swap, make_dims


def dry_run(cfg: JobConfig, world_size: int = 1, gpu: str = "h100") -> int:
    """Check ``cfg`` for a job of ``world_size`` GPUs of kind ``gpu``; print the report (one JSON
    object) on stdout and the errors on stderr; return the exit code (0 ok, 2 errors)."""
    # libraries imported on the way (DeepSpeed's accelerator notice) print on stdout: keep it JSON only
    with contextlib.redirect_stdout(sys.stderr):
        report = check(cfg, world_size, gpu)
    print(json.dumps(report))
    for w in report["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    for e in report["errors"]:
        print(f"error: {e}", file=sys.stderr)
    return 0 if report["ok"] else 2


def check(cfg: JobConfig, world_size: int = 1, gpu: str = "h100") -> dict:
    """The dry run's report as a dict (see the module doc); every check runs, whatever fails first.

    Args:
        cfg: a resolved job config.
        world_size: GPUs the job will run on (all nodes together).
        gpu: a key of :data:`parallel.plan.GPUS` for the memory plan.
    """
    errors, warnings = list(cross_field_errors(cfg)), []
    arch = cfg.model.arch
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        params = num_params(SpacetimeDiT(arch))
    dims = _layout(cfg, world_size, errors)
    comp = _codec(cfg, errors)
    _text_encoder(cfg, errors, warnings)
    errors += sample_metric_errors(cfg)
    errors += source_errors(cfg)  # clips where shards belong (a missing path may be on the cluster)
    warnings += val_shards_warnings(cfg)
    if not cfg.data.buckets.buckets:
        errors.append("data.buckets: no buckets (set data.bucket_file or data.buckets.buckets)")
    buckets = [_bucket(cfg, b, comp, dims, errors) for b in cfg.data.buckets.buckets]
    if cfg.logging.sample_every > 0 and comp is not None:
        s = cfg.sample
        what = f"sample.frames/height/width={s.frames}×{s.height}×{s.width}"
        _bucket(cfg, Bucket(s.frames, s.height, s.width, len(s.prompts)), comp, dims, errors, what)
    sized = [b for b in buckets if "tokens" in b]
    # the most tokens per batch; of equals, the longest sequence (attention grows with it)
    largest = max(sized, key=lambda b: (b["tokens_per_batch"], b["tokens"]), default=None)
    report = {
        "ok": False,
        "errors": errors,
        "warnings": warnings,
        "preset": cfg.model.preset,
        "params": params,
        "world_size": world_size,
        "gpu": gpu,
        "layout": _layout_dict(dims),
        "codec": None if comp is None else {"spec": cfg.data.codec, **dataclasses.asdict(comp)},
        "buckets": buckets,
        "largest_bucket": largest and largest["name"],
        "flops_per_step": largest and largest["flops_train_step"] * cfg.train.grad_accum,
        "plan_bucket": None,
        "plan": None,
        "lora_fit": None,
    }
    if dims is not None and sized:
        report["plan_bucket"], report["plan"] = _plans(cfg, sized, dims, gpu, errors, warnings)
    if report["plan"] is not None and cfg.finetune.lora.enabled:
        bucket = next(b for b in sized if b["name"] == report["plan_bucket"])
        report["lora_fit"] = {"bucket": bucket["name"], "gpus": lora_options(cfg, bucket, dims)}
    report["ok"] = not errors
    return report


def sample_metric_errors(cfg: JobConfig) -> list[str]:
    """What ``eval.sample_metrics`` would refuse at start-up, from the config and the files it names
    (kept out of :func:`launch.config.cross_field_errors`: a checkpoint's config is loaded on machines
    without the run's feature networks, e.g. to sample from it)."""
    e = cfg.eval
    if not e.sample_metrics:
        return []
    errors = []
    for key, path in (("fid_features", e.fid_features), ("fvd_features", e.fvd_features)):
        if path and not Path(path).is_file():
            errors.append(f"eval.{key}={path!r}: no such file")
    if e.clip_model and not Path(e.clip_model).is_dir():
        errors.append(f"eval.clip_model={e.clip_model!r}: no such folder")
    networks = bool(e.fid_features or e.fvd_features or e.clip_model)
    if e.sample_prompts and not networks:
        from data.probe import parse_caption  # scipy: only when asked for

        bad = [q for q in e.sample_prompts if parse_caption(q) is None]
        if bad:
            errors.append(
                f"eval.sample_prompts: {bad[0]!r} is not in the built-in dataset's grammar, so the probe "
                "cannot score it, and no eval.fid_features/fvd_features/clip_model is set: nothing would"
            )
    count = len(e.sample_prompts) or e.sample_count
    if (e.fid_features or e.fvd_features) and count < 2:
        errors.append(
            f"eval.fid_features/eval.fvd_features: a Fréchet distance needs at least 2 generated clips; "
            f"{count} prompt (eval.sample_prompts / eval.sample_count)"
        )
    return errors


def _layout(cfg: JobConfig, world_size: int, errors: list[str]) -> ParallelDims | None:
    """The resolved layout, or None with the reason in ``errors``."""
    if world_size < 1:
        errors.append(f"--world-size {world_size}: must be at least 1")
        return None
    try:
        dims = make_dims(cfg.parallel, world_size, cfg.model.arch)
    except ValueError as e:
        errors.append(f"--world-size {world_size}: {e}")
        return None
    try:  # the run's own refusal (parallelize): block swap moves whole blocks on one process
        check_block_swap(cfg.finetune.block_swap, dims)
    except ValueError as e:
        errors.append(f"--world-size {world_size}: {e}")
    if cfg.parallel.engine == "deepspeed":
        from launch.engine import require_deepspeed

        try:
            require_deepspeed()
            # imports DeepSpeed (and megatron-core): only for configs that use it
            from launch.engine_deepspeed import check_deepspeed

            check_deepspeed(cfg, dims)
        except (ValueError, MissingExtra) as e:
            errors.append(str(e))
    return dims


def _layout_dict(dims: ParallelDims | None) -> dict | None:
    if dims is None:
        return None
    names = ("dp_replicate", "dp_shard", "cp", "cp_ring", "cp_ulysses", "tp")
    return {k: getattr(dims, k) for k in names}


def _codec(cfg: JobConfig, errors: list[str]) -> Compression | None:
    """The codec's compression from its config alone (None with the reason in ``errors``); its
    channels checked against the model."""
    spec, arch = cfg.data.codec, cfg.model.arch
    try:
        comp, channels = codec_geometry(spec)
    except (OSError, ValueError, KeyError, TypeError) as e:
        errors.append(f"data.codec={spec!r}: {e}")
        return None
    except MissingExtra as e:  # names the key itself
        errors.append(str(e))
        return None
    if channels != arch.in_channels:
        errors.append(
            f"model.arch.in_channels={arch.in_channels} but data.codec={spec!r} makes {channels}-channel "
            "latents (latent shards made with it and raw shards encoded by it alike)"
        )
    return comp


def _text_encoder(cfg: JobConfig, errors: list[str], warnings: list[str]) -> None:
    """The text encoder's width (its ``config.json``, no weights) against ``model.arch.text_dim``."""
    arch, spec = cfg.model.arch, cfg.data.text_encoder
    if arch.conditioning != "text":
        return
    try:
        path = minilm_path() if spec in ("", "minilm") else Path(spec)
    except (ImportError, FileNotFoundError) as e:
        errors.append(f"data.text_encoder={spec!r}: {e}")
        return
    config = path / "config.json"
    if not config.is_file():
        warnings.append(
            f"data.text_encoder={spec!r}: no config.json here, so its width is not checked against "
            f"model.arch.text_dim={arch.text_dim} (it encodes sample prompts and raw shards' captions)"
        )
        return
    try:
        tc = json.loads(config.read_text(encoding="utf-8"))
        width = tc.get("d_model", tc.get("hidden_size"))
    except (OSError, ValueError, AttributeError) as e:
        errors.append(f"data.text_encoder={spec!r}: {config} is not a readable JSON object ({e})")
        return
    if width != arch.text_dim:
        errors.append(
            f"model.arch.text_dim={arch.text_dim} but data.text_encoder={spec!r} gives {width}-wide states"
        )


def _bucket(
    cfg: JobConfig,
    b: Bucket,
    comp: Compression | None,
    dims: ParallelDims | None,
    errors: list[str],
    what: str | None = None,
) -> dict:
    """One bucket's entry of the report (latent size, tokens, FLOPs when its shape is valid); its
    problems appended to ``errors``, named by ``what`` (default: the bucket)."""
    arch = cfg.model.arch
    entry: dict = {
        "name": b.name,
        "frames": b.frames,
        "height": b.height,
        "width": b.width,
        "batch_size": b.batch_size,
    }
    if comp is None:
        return entry
    problems = check_bucket(b, comp, arch.patch_size)
    if what:
        problems = [p.replace(f"bucket {b.name}", what, 1) for p in problems]
    t, h, w = latent_size(b, comp)
    entry["latent"] = {"t": t, "h": h, "w": w}
    if problems:
        errors.extend(problems)
        return entry
    text_len = cfg.data.max_text_len if arch.conditioning == "text" else 0
    pt, ph, pw = arch.patch_size
    grid = (t // pt, h // ph, w // pw)
    entry["tokens"] = math.prod(grid)  # per sample
    entry["tokens_per_batch"] = entry["tokens"] * b.batch_size
    # dit.flops.count's training-step FLOPs (3 forwards of 2 FLOPs per multiply-add: what the trainer
    # logs), from its MAC count alone: count() also builds the model for its parameter count
    macs = macs_breakdown(arch, t, h, w, batch=b.batch_size, text_len=text_len)
    entry["flops_train_step"] = 3 * 2 * sum(macs.values())
    problems = _split_errors(cfg, t, entry["tokens"], dims, what or f"bucket {b.name}", sample=bool(what))
    if arch.pos_embed == "learned" and any(g > m for g, m in zip(grid, arch.max_latent_size, strict=True)):
        problems.append(
            f"{what or f'bucket {b.name}'}: patch grid {grid} exceeds model.arch.max_latent_size="
            f"{arch.max_latent_size} (the learned position table)"
        )
    errors.extend(problems)
    entry["ok"] = not problems
    return entry


def _split_errors(
    cfg: JobConfig, t: int, tokens: int, dims: ParallelDims | None, what: str, sample: bool
) -> list[str]:
    """What keeps a clip of ``t`` latent frames and ``tokens`` tokens from being cut over the context
    (and sequence) parallel ranks: :func:`parallel.context.apply_sequence_cut`'s own checks."""
    if dims is None:
        return []
    arch, p = cfg.model.arch, cfg.parallel
    sp = dims.tp if dims.tp > 1 and p.sequence_parallel and p.engine == "fsdp" else 1
    ways = dims.cp * sp
    if ways == 1:
        return []
    cut = f"parallel.cp={dims.cp}" + (f" × (sequence-parallel) tp={sp}" if sp > 1 else "")
    frames = t // arch.patch_size[0]  # latent frames in patches: what the cut sees
    out = []
    if tokens % ways:
        out.append(f"{what}: {tokens} tokens do not split over {cut} ranks")
    if arch.attention_layout == "factorized" and dims.cp > 1 and frames % dims.cp:
        out.append(
            f"{what}: the factorized layout cuts the sequence at frame boundaries, and {frames} latent "
            f"frames are not divisible by parallel.cp={dims.cp}"
        )
    per_frame = cfg.train.task_i2v > 0 or cfg.train.task_continuation > 0
    if per_frame and not sample and frames > 1 and frames % ways:  # one modulation vector: no per-frame cut
        out.append(
            f"{what}: image-to-video and continuation (train.task_i2v / task_continuation > 0) use "
            f"per-frame timesteps, which need whole latent frames on each rank: {frames} are not "
            f"divisible by {cut} (set both to 0, or change the frames or the layout)"
        )
    return out


def _plans(cfg: JobConfig, buckets: list[dict], dims: ParallelDims, gpu: str, errors: list, warnings: list):
    """``(bucket name, plan)`` of the bucket predicted to need the most memory per GPU among the valid
    ``buckets`` (each gets its ``memory_gib`` and ``fits``); any not fitting the GPU is a warning with
    what would make the worst fit. ``(None, None)`` with an error when the planner refuses."""
    from parallel.plan import GPUS

    if gpu not in GPUS:
        errors.append(f"--gpu {gpu}: expected one of {', '.join(sorted(GPUS))}")
        return None, None
    plans = {}
    for b in (b for b in buckets if b["ok"]):
        try:
            plans[b["name"]] = _plan(cfg, b, dims, gpu)
        except ValueError as e:
            errors.append(f"memory plan for bucket {b['name']}: {e}")
            return None, None
        b["memory_gib"], b["fits"] = plans[b["name"]]["memory_gib"], plans[b["name"]]["fits"]
    if not plans:
        return None, None
    worst = max(plans, key=lambda name: plans[name]["memory_gib"])
    result = plans[worst]
    over = [name for name, p in plans.items() if not p["fits"]]
    if over:
        bucket = next(b for b in buckets if b["name"] == worst)
        names = ", ".join(over[:3]) + (f" and {len(over) - 3} more" if len(over) > 3 else "")
        warnings.append(
            f"{len(over)} of {len(plans)} buckets may not fit on {gpu} ({names}): bucket {worst} is "
            f"predicted to need {result['memory_gib']:.1f} GiB per GPU, {result['usable_gib']:.1f} GiB "
            f"usable; {_suggestion(cfg, bucket, dims, gpu)}"
        )
    return worst, result


def _plan(cfg: JobConfig, bucket: dict, dims: ParallelDims, gpu: str, **changes) -> dict:
    """:func:`parallel.plan.plan` of ``bucket`` under the config's layout and settings (``changes``
    replace some of the planner's arguments)."""
    from parallel.plan import Layout, plan

    p, arch, lat = cfg.parallel, cfg.model.arch, bucket["latent"]
    kwargs = {
        "batch": bucket["batch_size"],
        "text_len": cfg.data.max_text_len if arch.conditioning == "text" else 0,
        "gpu": gpu,
        "layout": Layout(dp_replicate=dims.dp_replicate, dp_shard=dims.dp_shard, cp=dims.cp, tp=dims.tp),
        "ac": p.activation_checkpointing,
        "grad_accum": cfg.train.grad_accum,
        "engine": p.engine,
        "zero_stage": p.zero_stage,
        "ema": cfg.train.ema_decay > 0,
        "cpu_offload": p.cpu_offload,
        "sequence_parallel": p.sequence_parallel,
        "finetune": _finetune(cfg),
    }
    return plan(arch, lat["t"], lat["h"], lat["w"], **(kwargs | changes))


def _finetune(cfg: JobConfig):
    from parallel.plan_lora import Finetune

    ft = cfg.finetune
    targets = tuple(ft.lora.targets)
    return Finetune(ft.lora.rank, ft.base_dtype, ft.block_swap, cfg.parallel.activation_offload, targets)


LORA_GPU_GB = (24, 48, 80)
"""The GPU sizes :func:`lora_options` answers for (an RTX 4090 / L4-class 24 GB, an L40S / A6000 48 GB,
an A100 / H100 80 GB)."""


def lora_options(cfg: JobConfig, bucket: dict, dims: ParallelDims, sizes=LORA_GPU_GB) -> list[dict]:
    """For each GPU size (GiB): the predicted memory of ``bucket`` as configured, whether it fits, and
    the first set of options that makes it fit (``fits_with_options``; when none does, all of them),
    adding one at a time in this order: full activation checkpointing, a bf16 base, activation
    offload, block swap (as few blocks as fit; whole blocks only, so not under FSDP sharding or tensor
    parallel), an fp8 base (last: it rounds the base's weights) with block swap again. Capacity is
    taken as the planner does: less :data:`parallel.plan.FRAGMENTATION` and
    :data:`parallel.plan.OVERHEAD_GIB`."""
    from parallel.plan import FRAGMENTATION, OVERHEAD_GIB

    ft, depth = _finetune(cfg), cfg.model.arch.depth
    swappable = dims.tp == 1 and not (cfg.parallel.engine == "fsdp" and dims.dp_shard * dims.cp > 1)
    steps = [{}, {"ac": "full"}, {"base_dtype": "bf16"}, {"activation_offload": True}, {"block_swap": 0}]
    steps += [{"base_dtype": "fp8", "block_swap": ft.block_swap}, {"block_swap": 0}]
    memo: dict = {}

    def memory(opts: dict) -> float:
        key = tuple(sorted(opts.items()))
        if key not in memo:
            changes = {"ac": opts["ac"]} if "ac" in opts else {}
            fields = {k: v for k, v in opts.items() if k != "ac"}
            memo[key] = _plan(
                cfg, bucket, dims, "h100", finetune=dataclasses.replace(ft, **fields), **changes
            )
        return memo[key]["memory_gib"]

    out = []
    for size in sizes:
        usable = size * (1 - FRAGMENTATION) - OVERHEAD_GIB
        opts: dict = {}
        found = None
        for step in steps:
            if step == {"block_swap": 0}:  # the fewest swapped blocks that fit, if any does
                if not swappable:
                    continue
                k = next((k for k in range(1, depth + 1) if memory(opts | {"block_swap": k}) <= usable), None)
                step = {"block_swap": k if k is not None else depth}
            opts = opts | step
            if memory(opts) <= usable:
                found = opts
                break
        entry = {
            "gpu_gib": size,
            "usable_gib": usable,
            "memory_gib": memory({}),
            "fits": memory({}) <= usable,
        }
        # nothing fitting: every option, and how far it still is
        entry["options"] = _option_keys(found if found is not None else opts, cfg)
        entry["memory_with_options_gib"] = memory(found if found is not None else opts)
        entry["fits_with_options"] = found is not None
        out.append(entry)
    return out


def _option_keys(opts: dict, cfg: JobConfig) -> dict:
    """The config keys (and values) of an options set, only those that change the config."""
    keys = {
        "ac": "parallel.activation_checkpointing",
        "base_dtype": "finetune.base_dtype",
        "activation_offload": "parallel.activation_offload",
        "block_swap": "finetune.block_swap",
    }
    now = {"ac": cfg.parallel.activation_checkpointing, **dataclasses.asdict(_finetune(cfg))}
    return {keys[k]: v for k, v in opts.items() if now.get(k) != v}


def _suggestion(cfg: JobConfig, bucket: dict, dims: ParallelDims, gpu: str) -> str:
    """What the planner predicts would make ``bucket`` fit: full checkpointing, a larger GPU, or a
    smaller batch (in that order of preference)."""
    from parallel.plan import GPUS

    ac = cfg.parallel.activation_checkpointing
    if ac != "full":
        full = _plan(cfg, bucket, dims, gpu, ac="full")
        if full["fits"]:
            return f"with parallel.activation_checkpointing=full: {full['memory_gib']:.1f} GiB"
    for other in sorted(GPUS, key=lambda g: GPUS[g].memory_gib):
        if GPUS[other].memory_gib > GPUS[gpu].memory_gib:
            bigger = _plan(cfg, bucket, dims, other, ac="full")
            if bigger["fits"]:
                return f"on --gpu {other} with full checkpointing: {bigger['memory_gib']:.1f} GiB"
    return (
        "it does not fit even with full checkpointing on the largest GPU: raise parallel.cp (or "
        "parallel.tp) or lower its batch size"
    )
