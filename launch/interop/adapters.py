"""LoRA adapters in the files other tools load: diffusers' Wan / LTX-Video LoRA format and ComfyUI's.

The adapters come in our plain names (:func:`launch.lora.adapter_state`): ``blocks.0.attn.q.lora_A.weight``
(r × in) and ``blocks.0.attn.q.lora_B.weight`` (out × r), with ``alpha / rank`` already folded into B, so
every file written here means ``W + B·A`` at a scale of one:

- ``diffusers``: ``transformer.blocks.0.attn1.to_q.lora_A.weight`` / ``.lora_B.weight`` (Wan),
  ``transformer.transformer_blocks.0.attn1.to_q.lora_A.weight`` (LTX-Video), what
  ``WanPipeline.load_lora_weights`` / ``LTXPipeline.load_lora_weights`` and
  ``transformer.load_lora_adapter`` read. No ``lora_adapter_metadata`` is written, so diffusers infers
  the rank from B and takes alpha = rank: the scale of one the file needs.
- ``comfy``: the original checkpoint's module names under ``diffusion_model.``. Wan:
  ``diffusion_model.blocks.0.self_attn.q.lora_down.weight`` / ``.lora_up.weight`` and ``.alpha`` = the
  rank (a scale of one), as ComfyUI and diffusers' ``_convert_non_diffusers_wan_lora_to_diffusers``
  read them (the latter pops ``.alpha`` only inside blocks, so modules outside the blocks carry none:
  ComfyUI reads a missing alpha as a scale of one too). LTX-Video: LTX-Video-Trainer's layout,
  ``diffusion_model.transformer_blocks.0.attn1.to_q.lora_A.weight`` without alpha, the one layout
  both ComfyUI and diffusers' LTX converter (which only strips the prefix) read; modules outside the
  blocks get the original names (``adaln_single.linear`` …), which ComfyUI reads and that converter not.

A LoRA run's checkpoint holds the adapters only (peft's names) and ``base.json`` (``init.from`` and the
base's fingerprint): :func:`lora_weights` rebuilds the base where it is needed (merging, and the
pissa/olora inits, whose adapters are converted to ones of the base as published) and refuses one whose
fingerprint differs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from dit.config import DiTConfig
from dit.model import SpacetimeDiT
from launch.config import JobConfig, load_config
from launch.interop import ltx, wan
from launch.interop.formats import is_diffusers, refuse
from parallel import checkpoint as ckpt
from parallel.checkpoint import CheckpointError
from parallel.file_mode import save_safetensors

LORA_FILE = "pytorch_lora_weights.safetensors"
FORMATS = ("diffusers", "comfy")
_A, _B = ".lora_A.weight", ".lora_B.weight"


def split(adapters: dict[str, Tensor], where: str = "adapters") -> dict[str, tuple[Tensor, Tensor]]:
    """``{module: (A, B)}`` of a plain adapter state dict, checked: every tensor is an A or a B, each
    module has both, A is r × in and B out × r.

    Raises:
        ValueError: naming the offending tensors.
    """
    stray = sorted(k for k in adapters if not k.endswith((_A, _B)))
    if stray:
        raise ValueError(f"{where}: not LoRA A/B weights: {', '.join(stray[:6])}")
    modules = sorted({k.removesuffix(_A).removesuffix(_B) for k in adapters})
    lone = [m for m in modules if m + _A not in adapters or m + _B not in adapters]
    if lone:
        raise ValueError(f"{where}: modules with only one of lora_A / lora_B: {', '.join(lone[:6])}")
    out = {}
    for m in modules:
        a, b = adapters[m + _A], adapters[m + _B]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(
                f"{where}: {m}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not r × in, out × r"
            )
        out[m] = (a, b)
    if not out:
        raise ValueError(f"{where}: no adapters")
    return out


def _class_of(cfg: DiTConfig):
    """The interop module of the diffusers class ``cfg`` is (LTX-Video for ``rope_ltx``, else Wan), after
    refusing a config that class cannot express: the adapters would fit no model diffusers or ComfyUI
    has."""
    module = ltx if cfg.pos_embed == "rope_ltx" else wan
    try:
        refuse(module.CLASS_NAME, "--lora: the run's base (model.arch)", module.inexpressible(cfg))
    except ValueError as e:
        raise ValueError(
            f"{e}: its adapters load nowhere but here; export the merged model (launch.export RUN OUT)"
        ) from None
    return module


def diffusers_modules(cfg: DiTConfig) -> dict[str, str]:
    """Our linear modules → diffusers' (``blocks.0.attn.q`` → ``blocks.0.attn1.to_q``), from the weight
    renames of the class's interop module."""
    module = _class_of(cfg)
    return {
        r.ours.removesuffix(".weight"): r.theirs.removesuffix(".weight")
        for r in module.renames(cfg)
        if r.ours.endswith(".weight") and r.theirs.endswith(".weight")
    }


def _names(cfg: DiTConfig, modules: list[str], fmt: str) -> dict[str, str]:
    """Each adapted module's name in ``fmt``; refuses one the format cannot carry."""
    module = _class_of(cfg)
    names = diffusers_modules(cfg) if fmt == "diffusers" else module.original_modules(cfg)
    refused = [f"{m} ({module.LORA_REFUSED[m]})" for m in modules if m in module.LORA_REFUSED]
    refused += [f"{m} (not a linear layer {module.CLASS_NAME} has)" for m in modules if m not in names]
    if refused:
        raise ValueError(
            f"--lora-format {fmt}: adapters on {'; '.join(refused[:4])}; drop these modules from "
            f"finetune.lora.targets, or export the merged model (--merge)"
        )
    return {m: names[m] for m in modules}


def lora_state(cfg: DiTConfig, adapters: dict[str, Tensor], fmt: str) -> dict[str, Tensor]:
    """The adapters renamed into a LoRA file's keys (see the module doc for each format).

    Args:
        cfg: the base model's architecture (picks the class: Wan or LTX-Video).
        adapters: our plain adapter state (B holding the scale).
        fmt: ``diffusers`` or ``comfy``.

    Raises:
        ValueError: an unknown format, a base diffusers cannot express, or an adapted module the
            format has no name for (listed, with what to do).
    """
    if fmt not in FORMATS:
        raise ValueError(f"--lora-format {fmt!r}: expected one of {list(FORMATS)}")
    is_wan = _class_of(cfg) is wan  # first: a base no loader has makes every other check moot
    pairs = split(adapters)
    names = _names(cfg, list(pairs), fmt)
    out: dict[str, Tensor] = {}
    for m, (a, b) in pairs.items():
        a, b = a.float().contiguous(), b.float().contiguous()
        if fmt == "diffusers":
            out[f"transformer.{names[m]}.lora_A.weight"] = a
            out[f"transformer.{names[m]}.lora_B.weight"] = b
        elif is_wan:
            key = f"diffusion_model.{names[m]}"
            out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = a, b
            if m.startswith("blocks."):  # alpha = rank: a scale of one (B holds the real scale)
                out[f"{key}.alpha"] = torch.tensor(float(a.shape[0]))
        else:
            out[f"diffusion_model.{names[m]}.lora_A.weight"] = a
            out[f"diffusion_model.{names[m]}.lora_B.weight"] = b
    return out


def write_lora(
    out: str | Path, cfg: DiTConfig, adapters: dict[str, Tensor], fmt: str, metadata: dict[str, str]
) -> Path:
    """Write ``OUT/pytorch_lora_weights.safetensors`` (fp32) in ``fmt``; returns the file.

    Args:
        out: the folder (created; an existing LoRA file there is replaced).
        cfg: the base's architecture.
        adapters: our plain adapter state.
        fmt: ``diffusers`` or ``comfy``.
        metadata: extra safetensors metadata (strings); ``lora_adapter_metadata`` is refused, as
            diffusers would build its LoraConfig from it.

    Raises:
        ValueError: see :func:`lora_state`; ``out`` is a file.
    """
    if "lora_adapter_metadata" in metadata:
        raise ValueError("metadata: lora_adapter_metadata is diffusers' LoraConfig, not written here")
    state = lora_state(cfg, adapters, fmt)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: a file; the LoRA is written into a folder (OUT names a file)")
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, out / LORA_FILE, metadata={"format": "pt", **metadata})
    return out / LORA_FILE


def merge(base: dict[str, Tensor], adapters: dict[str, Tensor]) -> dict[str, Tensor]:
    """``base`` (a plain state dict) with ``B·A`` added to each adapted module's weight, in fp32.

    The adapters must apply to this very base (those of a ``pissa`` / ``olora`` run already turn the
    original base into the trained model, see :func:`launch.lora.adapter_state`).

    Raises:
        ValueError: an adapted module the base has no weight of that shape for.
    """
    merged = {k: v.float().clone() for k, v in base.items()}
    for m, (a, b) in split(adapters).items():
        w = merged.get(f"{m}.weight")
        if w is None or tuple(w.shape) != (b.shape[0], a.shape[1]):
            have = "none" if w is None else tuple(w.shape)
            raise ValueError(
                f"adapter {m}: ΔW {(b.shape[0], a.shape[1])} does not fit the base's weight ({have})"
            )
        w += b.float() @ a.float()  # out × r @ r × in
    return merged


# ---- LoRA runs -----------------------------------------------------------------------------------------
def lora_checkpoint(src: str | Path) -> tuple[Path, JobConfig] | None:
    """(checkpoint, config) when ``src`` is a LoRA run, its ``checkpoints/`` folder or one of its
    checkpoints (``finetune.lora.rank`` > 0: the checkpoint holds adapters only); None for anything else
    (an export folder, a diffusers model, a full-training run)."""
    src = Path(src)
    if not src.is_dir() or (src / "model.safetensors").is_file():
        return None
    if is_diffusers(src):
        return None
    try:
        path = ckpt.resolve(src)
    except FileNotFoundError:
        return None
    if not (path / "config.yaml").is_file():  # names no architecture: the caller's error, not ours
        return None
    cfg = load_config(path / "config.yaml")
    return (path, cfg) if cfg.finetune.lora.enabled else None


def _base_record(path: Path) -> dict:
    """A LoRA checkpoint's ``base.json``: ``{"init_from": str, "fingerprint": str}``, checked."""
    from launch.resume import BASE_FILE

    file = path / BASE_FILE
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: a LoRA checkpoint (finetune.lora.rank > 0 in its config.yaml) without {BASE_FILE}: "
            "which base its adapters belong to is unknown"
        ) from None
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not (
        isinstance(record, dict) and all(isinstance(record.get(k), str) for k in ("init_from", "fingerprint"))
    ):
        raise CheckpointError(f"{file}: expected {{'init_from': str, 'fingerprint': str}}, got {record!r}")
    return record


def lora_base(cfg: JobConfig, record: dict) -> SpacetimeDiT:
    """A LoRA run's frozen base rebuilt as training built it (:func:`launch.engine.base_model`: the run's
    seed, then ``init.from``), in fp32 whatever ``finetune.base_dtype`` trained on: the base
    as published, which diffusers and ComfyUI apply the adapters to.

    Raises:
        CheckpointError: its fingerprint is not the one in ``base.json`` (another file at ``init.from``
            now, or another version of it), naming both.
    """
    from launch.engine import base_model  # the trainer's own build: the fingerprints cannot drift
    from launch.lora import base_fingerprint

    init = cfg.init
    model = base_model(cfg)
    found = base_fingerprint(model)
    if found != record["fingerprint"]:
        raise CheckpointError(
            f"init.from={init.from_ or '(none: the seeded initialisation)'}: the base built from it now has "
            f"fingerprint {found}, but the LoRA run was trained on {record['fingerprint']} (its base.json, "
            f"init_from={record['init_from']}): its adapters belong to another base. Put that base back at "
            "init.from to export"
        )
    return model.eval()


def lora_weights(
    path: Path, cfg: JobConfig, merged: bool, use_ema: bool = True
) -> tuple[dict, dict | None, int]:
    """(model, ema or None, step) of the LoRA checkpoint at ``path``: its adapters in our plain names
    (:func:`launch.lora.adapter_state_from`: B holds ``alpha / rank``; for pissa/olora the adapters
    that turn the original base into the trained model), or with ``merged`` the base's state with them
    merged in (fp32). The base is rebuilt (and its fingerprint checked) when merging or for pissa/olora.
    ``use_ema=False`` leaves the EMA out (None)."""
    from launch.lora import adapter_state_from, apply_lora, initial_adapters, is_mutating

    lora = cfg.finetune.lora
    record = _base_record(path)
    state = ckpt.read_full(path, {"model", "ema", "step"})
    base = initial = None
    if merged or is_mutating(lora.init):
        model = lora_base(cfg, record)
        base = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if is_mutating(lora.init):  # the adapters it started from, as training drew them
            apply_lora(model, lora, seed=cfg.seed)
            initial = initial_adapters(model)
    out = {}
    for key in ("model", "ema"):
        held = state.get(key)
        if not held or (key == "ema" and not use_ema):
            out[key] = None
            continue
        adapters = adapter_state_from(held, lora, initial)
        out[key] = merge(base, adapters) if merged else adapters
    return out["model"], out["ema"], int(state["step"])


def lora_metadata(cfg: JobConfig, path: Path, step: int, fmt: str, use_ema: bool) -> dict[str, str]:
    """The safetensors metadata of an exported LoRA file (strings): what it was trained as and on."""
    lora, record = cfg.finetune.lora, _base_record(path)
    return {
        "spacetime_dit.lora_format": fmt,
        "spacetime_dit.rank": str(lora.rank),
        "spacetime_dit.alpha": str(lora.alpha if lora.alpha is not None else lora.rank),
        "spacetime_dit.scale_in_lora_B": "true",  # load at alpha = rank (the loaders' default)
        "spacetime_dit.init": lora.init,
        "spacetime_dit.targets": json.dumps(list(lora.targets)),
        "spacetime_dit.base_init_from": record["init_from"],
        "spacetime_dit.base_fingerprint": record["fingerprint"],
        "spacetime_dit.step": str(step),
        "spacetime_dit.ema": str(use_ema).lower(),
        "spacetime_dit.source": str(path),
    }
