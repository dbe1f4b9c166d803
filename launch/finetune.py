"""Start from existing weights: ``init.from`` (an export, a checkpoint or a diffusers model), inflation,
freezing.

Only weights are read, never optimizer, scheduler or data-loader state. A LoRA run (or one of its
checkpoints: adapters only, with ``base.json``) gives the model it trained: its base, rebuilt from the
run's own ``init.from`` and checked against the fingerprint in ``base.json``, with the adapters merged in
(:func:`launch.interop.adapters.lora_weights`); so ``init.from``, ``launch.sample``, ``launch.evaluate``
and :func:`launch.export.load_model` all take a LoRA run as they take any run.

A diffusers model (a model folder, a pipeline root, a sharded index or one ``.safetensors``) is read
with :func:`launch.interop.read_diffusers` and renamed to this model's parameters by
:func:`launch.interop.to_ours`. Where the new model differs from the source it is adapted so that, at
step 0, it computes what the source computed wherever the source is defined:

- more input channels (``cond_channels`` for image-to-video): the source's channels are copied, the
  new ones start at zero;
- a temporal patch (image model, pt = 1 → video model, pt > 1): the patch embedding is spread evenly
  over the pt frames and the output projection repeated for each, so a still clip maps as before;
- blocks or embedders the source lacks start as the identity (their output projections are zero);
- a different text width re-initialises the text projection (``text_proj.*``).

Loading is strict: every parameter of the model must come from the source (copied or inflated), except
those matching a pattern of ``init.new`` (new blocks, a new text projection), else it is an error naming
what the source lacks, before any weight changes. Any other shape mismatch is an error naming the
parameter. So is a source whose names do not fit the model (none matching, or fewer than
``init.min_match`` of the source's tensors: another library's layout or another model).

Loading is also refused when it would give a model that computes another function than the source with
the same tensors. Where the source names its architecture (a diffusers model's config.json through
:func:`launch.interop.to_ours`, an export's config.json, a run's config.yaml), every ``model.arch`` field
that changes the function without changing a parameter's shape (:func:`arch_changes`: norms and their
epsilons, position encoding, heads, attention layout, modulation, the text convention, μP) must equal the
source's, and a diffusers source's tensors must all have a place in the model (a Wan source into
``qk_norm=none`` would drop its q/k norms). Each is an error naming ``model.arch.FIELD: source → model``
and suggesting ``model.preset=from_init``, unless ``init.allow_arch_changes`` lists the field: a change
made on purpose (fine-tuning a Wan model into the masked text convention, a shallower model from a deeper
diffusers source with ``depth``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dit.config import DiTConfig
from dit.model import SpacetimeDiT
from launch.export import read_export_config
from parallel import checkpoint as ckpt
from parallel.checkpoint import CheckpointError

# the last layer of each residual branch or embedder: zero makes a module the source lacks an identity
_ZERO_WHEN_NEW = ("attn.o.", "cross_attn.o.", "mlp.fc2.", "fps_embedder.fc2.", "label_embed.")
ACCEPTS = (
    "init.from takes an export directory (model.safetensors + config.json, from python -m launch.export), "
    "a checkpoint (a step-XXXXXXXX/ directory with COMPLETE) or a run or checkpoints/ directory holding one, "
    "or a diffusers model: a model folder (config.json + diffusion_pytorch_model*.safetensors, sharded with "
    "an index or not), a pipeline root (model_index.json; init.expert picks transformer_2/ of a two-expert "
    "one) or a single .safetensors file"
)
# DiTConfig fields not compared with the source's (every other field is, so a field added later is too):
# those that set a parameter's shape or add parameters, which the shape and strict checks cover and
# where the deliberate adaptations live (inflation of channels and of the temporal patch, a deeper
# model, a new text width, new embedders: learn_sigma doubles the output rows), and the attention
# kernel, which computes the same attention
_NOT_COMPARED = frozenset(
    {
        "in_channels", "out_channels", "learn_sigma", "patch_size", "hidden_size", "depth", "mlp_ratio",
        "ffn_dim", "text_dim", "num_classes", "cond_channels", "freq_dim", "max_latent_size",
        "attention_backend",
    }
)  # fmt: skip


@dataclass
class InitReport:
    loaded: list[str] = field(default_factory=list)
    inflated: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    """In the model, not in the source: kept fresh (identity where that applies); each matches
    ``init.new``."""
    unexpected: list[str] = field(default_factory=list)
    """In the source, not in the model: ignored (an error for a diffusers source, see the module doc)."""

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} loaded"]
        for name in ("inflated", "reinitialised", "missing", "unexpected"):
            items = getattr(self, name)
            if items:
                shown = ", ".join(items[:6]) + (" …" if len(items) > 6 else "")
                parts.append(f"{len(items)} {name} ({shown})")
        return "; ".join(parts)


def read_weights(
    path: str | Path, use_ema: bool = True, expert: str = "", key: str = "init.from"
) -> tuple[dict, dict | None]:
    """(state dict, source arch as a dict or None) from an export directory, a checkpoint/run (verified,
    see :mod:`parallel.checkpoint`) or a diffusers model (``expert``: ``init.expert`` for a two-expert
    pipeline root). A damaged or foreign file is a :class:`CheckpointError` naming it; a diffusers
    configuration this model cannot express is a ``ValueError`` naming its class and fields. ``key`` is
    what the errors call ``path`` (``init.from``)."""
    state, arch, _ = _read_source(path, use_ema, expert, key)
    return state, arch


def _read_source(path: str | Path, use_ema: bool, expert: str, key: str) -> tuple[dict, dict | None, bool]:
    """:func:`read_weights`, and whether the source is a diffusers model."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        _no_expert(path, expert)
        name = "ema.safetensors" if use_ema and (path / "ema.safetensors").is_file() else "model.safetensors"
        config = path / "config.json"
        arch = read_export_config(config).get("arch") if config.is_file() else None
        return (
            ckpt.read_safetensors(path / name),
            dataclasses.asdict(arch) if arch is not None else None,
            False,
        )
    if not path.exists():
        raise FileNotFoundError(f"{key}={path}: no such file or directory; {ACCEPTS}")
    if path.is_file() and path.name in ("model.safetensors", "ema.safetensors"):
        raise FileNotFoundError(f"{key}={path}: {_what_is_there(path)}; {ACCEPTS}")
    cfg, state = _read_diffusers(path, expert, key=key)
    if cfg is not None:
        return state, dataclasses.asdict(cfg), True
    _no_expert(path, expert)
    try:
        found = ckpt.resolve(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{key}={path}: {_what_is_there(path)}; {ACCEPTS}") from None
    lora = _lora_run(found, key)
    if lora is not None:
        # adapters alone (peft's names): the model it trained is its base, rebuilt from the run's own
        # init.from with its fingerprint checked, with the adapters merged in
        from launch.interop.adapters import lora_weights

        model, ema, _ = lora_weights(found, lora, merged=True, use_ema=use_ema)
        return (ema if ema is not None else model), dataclasses.asdict(lora.model.arch), False
    state = ckpt.read_full(found, {"model", "ema"})
    weights = state.get("ema") if use_ema and state.get("ema") else state["model"]
    arch = None
    if (found / "config.yaml").is_file():
        from omegaconf import OmegaConf

        arch = OmegaConf.to_container(OmegaConf.load(found / "config.yaml")).get("model", {}).get("arch")
    return weights, arch, False


def _lora_run(found: Path, key: str):
    """The config (a :class:`launch.config.JobConfig`) of the LoRA run whose checkpoint ``found`` is:
    ``finetune.lora.rank`` > 0 in its config.yaml, or a ``base.json`` (what the trainer writes next to
    adapter-only checkpoints); None for any other checkpoint.

    Raises:
        CheckpointError: a ``base.json`` without a config.yaml naming a LoRA rank (the adapters' scale,
            targets and base are unknown), naming ``key``.
    """
    from launch.resume import BASE_FILE

    config, has_base = found / "config.yaml", (found / BASE_FILE).is_file()
    rank = 0
    if config.is_file():
        from omegaconf import OmegaConf

        # the raw file first: a config of another version of this code still gives its arch below
        raw = OmegaConf.to_container(OmegaConf.load(config))
        rank = ((raw.get("finetune") or {}).get("lora") or {}).get("rank") or 0
    if not rank and not has_base:
        return None
    if not rank:
        said = "config.yaml has finetune.lora.rank=0" if config.is_file() else "there is no config.yaml"
        raise CheckpointError(
            f"{key}={found}: holds {BASE_FILE}, so LoRA adapters only, but {said}: the adapters' rank, "
            "scale, targets and base are unknown"
        )
    from launch.config import load_config

    return load_config(config)


def _read_diffusers(
    path: Path, expert: str, key: str = "init.from", meta: bool = False
) -> tuple[DiTConfig | None, dict]:
    """(our config, our state) of a diffusers source at ``path``; (None, {}) when it is not one. With
    ``meta`` only the safetensors headers are read (meta tensors: names, shapes and dtypes)."""
    from safetensors import SafetensorError

    from launch import interop

    try:
        if not interop.is_diffusers(path):
            return None, {}
        return interop.to_ours(interop.read_diffusers(path, expert=expert, meta=meta))
    except (ValueError, KeyError) as e:  # what we cannot express, or a two-expert root without expert
        raise ValueError(f"{key}={path}: {e}") from None
    except FileNotFoundError as e:  # a diffusers folder without its weights (renamed, deleted)
        raise FileNotFoundError(f"{key}={path}: {e}") from None
    except SafetensorError as e:  # an empty or truncated weights file
        raise CheckpointError(f"{key}={path}: a weights file is not readable safetensors ({e})") from None


def _no_expert(path: Path, expert: str) -> None:
    if expert:
        raise ValueError(
            f"init.expert={expert!r} picks one transformer of a two-expert diffusers pipeline root, but "
            f"init.from={path} is not a diffusers model: leave init.expert empty"
        )


def _what_is_there(path: Path) -> str:
    """What ``path`` (a file or directory that is none of init.from's formats) holds, in words."""
    if not path.is_dir():
        if path.name in ("model.safetensors", "ema.safetensors"):
            return f"a weights file of an export; name its directory instead (init.from={path.parent})"
        return f"a file ({path.suffix or 'no extension'}, {path.stat().st_size} bytes), not a directory"
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return "an empty directory"
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return f"a directory holding {shown}, and no complete checkpoint"


def arch_dict_to_config(arch: dict, where: str) -> DiTConfig:
    """A :class:`DiTConfig` from a plain dict (YAML/JSON lists become tuples); an error names ``where``."""
    try:
        return DiTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: its model.arch is not this version's DiTConfig ({e})") from None


def source_arch(path: str | Path, expert: str = "") -> DiTConfig:
    """The architecture of ``init.from`` (``model.preset=from_init``): an export's config.json ``arch``,
    a run's or checkpoint's config.yaml ``model.arch``, or the :class:`DiTConfig` of a diffusers model
    (:func:`launch.interop.to_ours`, text convention included). Every error names ``init.from``."""
    path = Path(path)
    where = f"model.preset=from_init: init.from={path}"
    if not path.exists():
        raise FileNotFoundError(f"{where}: no such file or directory")
    # only config.json and the safetensors headers: to_ours checks the tensor names and shapes against
    # the config without the weights (a 14B model's are tens of GB, read on every rank at start-up)
    cfg, _ = _read_diffusers(path, expert, key="init.from", meta=True)
    if cfg is not None:
        return cfg
    if path.is_dir() and (path / "config.json").is_file():
        arch = read_export_config(path / "config.json").get("arch")
        if arch is None:
            raise ValueError(f"{where}: {path / 'config.json'} names no architecture ('arch')")
        return arch
    if path.is_dir() and not (path / "config.yaml").is_file():
        try:
            path = ckpt.resolve(path)  # a checkpoints/ folder: its newest intact checkpoint's config
        except FileNotFoundError:
            raise FileNotFoundError(f"{where}: {_what_is_there(path)}; {ACCEPTS}") from None
    config = path / "config.yaml"
    if not config.is_file():
        raise ValueError(f"{where}: names no architecture (no config.json or config.yaml); {ACCEPTS}")
    from omegaconf import OmegaConf

    arch = (OmegaConf.to_container(OmegaConf.load(config)).get("model") or {}).get("arch")
    if not isinstance(arch, dict):
        raise ValueError(f"{where}: {config} has no model.arch")
    return arch_dict_to_config(arch, f"{where} ({config})")


def _source_config(src_arch: dict | None) -> DiTConfig | None:
    """The source's own architecture as a :class:`DiTConfig` (None: none named, or an arch of another
    version of this code, which only the name checks then judge)."""
    if src_arch is None:
        return None
    try:
        return DiTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in src_arch.items()})
    except (TypeError, ValueError):
        return None


def _own_names(src_arch: dict | None) -> set[str] | None:
    """The parameter names a model of the source's own architecture has (None: no usable arch)."""
    own = _source_config(src_arch)
    if own is None:
        return None
    with torch.device("meta"):
        return {n for n, _ in SpacetimeDiT(own).named_parameters()}


def _check_complete(path: str | Path, source: dict, src_arch: dict | None, min_match: float) -> None:
    """Refuse a source holding under ``min_match`` of the parameters its own architecture has (a
    truncated or partial file): the rest would start fresh and the run would silently train from
    (nearly) scratch. Only a source whose config names its architecture is checked."""
    own = _own_names(src_arch)
    if own is None:
        return
    present = len(own & set(source))
    if present < max(min_match * len(own), 1):
        lacking = sorted(own - set(source))
        raise ValueError(
            f"init.from={path}: the source holds {present} of the {len(own)} parameters of its own "
            f"architecture (its config; below init.min_match={min_match:g}), lacking e.g. {lacking[:4]}: "
            "a partial or truncated weights file, not a model to start from"
        )


def arch_changes(source: DiTConfig, model: DiTConfig) -> dict[str, tuple]:
    """``{field: (source's value, model's value)}`` for each field where ``model`` computes another
    function than ``source`` with the same tensors: every field but those of ``_NOT_COMPARED``, each only
    where it has an effect in both (an epsilon of a q/k norm both have, a RoPE setting both use, the
    caption length where the padding is attended). Dropping the frame-rate embedding counts; adding one
    does not (it starts as the identity)."""
    changes = {}
    for f in dataclasses.fields(DiTConfig):
        a, b = getattr(source, f.name), getattr(model, f.name)
        if f.name not in _NOT_COMPARED and a != b and _has_effect(f.name, source, model):
            changes[f.name] = (a, b)
    return changes


def _has_effect(name: str, src: DiTConfig, dst: DiTConfig) -> bool:
    """Whether a difference in field ``name`` changes what the model computes (see :func:`arch_changes`)."""
    both = lambda field, *values: getattr(src, field) in values and getattr(dst, field) in values  # noqa: E731
    if name == "qk_norm_eps":  # None means norm_eps: compare the epsilon each q/k norm uses
        eps = lambda c: c.norm_eps if c.qk_norm_eps is None else c.qk_norm_eps  # noqa: E731
        return both("qk_norm", "per_head", "across_heads") and eps(src) != eps(dst)
    if name == "rope_theta":
        return both("pos_embed", "rope3d", "rope_ltx")
    if name in ("rope_base", "rope_compression"):
        return both("pos_embed", "rope_ltx")
    if name in ("mup_base_width", "mup_base_head_dim"):
        base = lambda c: (c.mup_base_width, c.mup_base_head_dim or c.head_dim)  # noqa: E731
        return both("parametrization", "mup") and base(src) != base(dst)
    if name in ("text_mask", "text_null", "text_encoder_mask"):
        return both("conditioning", "text")
    if name == "text_len":  # masked padding is attended nowhere: its length matters only unmasked
        return both("conditioning", "text") and not (src.text_mask and dst.text_mask)
    if name == "fps_conditioning":
        return src.fps_conditioning  # a new fps embedder starts as the identity: an adaptation
    return True


def _check_arch(path: str | Path, src: DiTConfig, arch: DiTConfig, allow: Sequence[str]) -> None:
    """Refuse a model that computes another function than the source (:func:`arch_changes`) in a field
    ``init.allow_arch_changes`` does not list."""
    changes = {k: v for k, v in arch_changes(src, arch).items() if k not in allow}
    if not changes:
        return
    said = "; ".join(f"model.arch.{k}: {a!r} → {b!r}" for k, (a, b) in changes.items())
    raise ValueError(
        f"init.from={path}: the model would compute another function than the source with the same "
        f"weights (source → model): {said}. Take the source's architecture with model.preset=from_init "
        "(or set these model.arch fields to the source's values); to change them on purpose, list them "
        f"in init.allow_arch_changes={json.dumps(list(changes))}"
    )


def _check_unexpected(
    path: str | Path, unexpected: list[str], src: DiTConfig, arch: DiTConfig, allow: Sequence[str]
) -> None:
    """Refuse a diffusers source whose tensors do not all have a place in the model (to_ours mapped each
    to our names, so one left over is a part of the source the model would drop). Blocks past the
    model's depth are dropped on purpose only with ``depth`` in ``init.allow_arch_changes``; any other
    tensor only as the consequence of a function change the list allows (:func:`_check_arch` ran first,
    so every change left is allowed: ``qk_norm=none`` drops the q/k norms)."""
    deeper = [n for n in unexpected if (m := re.match(r"blocks\.(\d+)\.", n)) and int(m[1]) >= arch.depth]
    rest = [n for n in unexpected if n not in deeper]
    refused = (deeper if "depth" not in allow else []) + (rest if not arch_changes(src, arch) else [])
    if not refused:
        return
    shown = ", ".join(refused[:6]) + (" …" if len(refused) > 6 else "")
    if deeper and "depth" not in allow:
        why = f"the source has {src.depth} blocks, the model {arch.depth}: to drop the rest on purpose, "
        why += 'list init.allow_arch_changes=["depth"]'
    else:
        why = "the model's architecture has no place for them: take the source's with model.preset=from_init"
    raise ValueError(
        f"init.from={path}: {len(refused)} of the source's tensors would be dropped ({shown}); {why}"
    )


def _check_allowed(allow: Sequence[str]) -> None:
    """Refuse an ``init.allow_arch_changes`` entry that is not a field of ``model.arch`` (a typo)."""
    names = {f.name for f in dataclasses.fields(DiTConfig)}
    for name in allow:
        if name not in names:
            raise ValueError(
                f"init.allow_arch_changes: {name!r} is not a model.arch field: one of {sorted(names)}"
            )


def _check_names(path: str | Path, source: dict, params: dict, min_match: float) -> None:
    """Refuse a source whose tensor names do not fit the model (see the module doc)."""
    matched = [n for n in source if n in params]
    if len(matched) >= max(min_match * len(source), 1):
        return
    unmatched = sorted(set(source) - set(params))[:4]
    missing = sorted(set(params) - set(source))[:4]
    said = (
        f"none of the source's {len(source)} tensors"
        if not matched
        else f"{len(matched)} of the source's {len(source)} tensors ({len(matched) / len(source):.0%}, below "
        f"init.min_match={min_match:g})"
    )
    raise ValueError(
        f"init.from={path}: {said} match a parameter name of this model: the source has {unmatched} "
        f"where the model has {missing}. Is it another model, or another library's names? {ACCEPTS}"
    )


@torch.no_grad()
def apply_init(
    model: nn.Module,
    path: str | Path,
    arch: DiTConfig,
    use_ema: bool = True,
    min_match: float = 0.5,
    expert: str = "",
    new: Sequence[str] = (),
    allow_arch_changes: Sequence[str] = (),
) -> InitReport:
    """Copy (and adapt) the weights at ``path`` into a freshly initialised ``model``; see the module doc.

    Args:
        model: the freshly initialised model.
        path: ``init.from``.
        arch: the model's architecture.
        use_ema: take the source's EMA weights when it has them.
        min_match: least share of the source's tensors whose names the model has (``init.min_match``);
            below it, or with none, this raises before changing any weight.
        expert: ``init.expert`` (which transformer of a two-expert diffusers pipeline root).
        new: ``init.new``: fnmatch patterns of the model's parameters that may start fresh; any other
            parameter the source does not provide raises before changing any weight.
        allow_arch_changes: ``init.allow_arch_changes``: ``model.arch`` fields that may differ from the
            source's although the model then computes another function (see the module doc); any
            other such difference raises before changing any weight.
    """
    _check_allowed(allow_arch_changes)
    source, src_arch, from_diffusers = _read_source(path, use_ema, expert, "init.from")
    pt_src = (src_arch or {}).get("patch_size", arch.patch_size)[0]
    report = InitReport()
    params = dict(model.named_parameters())
    _check_names(path, source, params, min_match)
    _check_complete(path, source, src_arch, min_match)
    src_cfg = _source_config(src_arch)
    if src_cfg is not None:
        _check_arch(path, src_cfg, arch, allow_arch_changes)
    plan = _plan(path, source, params)
    for name, action in plan.items():
        getattr(report, action).append(name)
    _check_strict(path, report, params, new)
    report.unexpected = sorted(set(source) - set(params))
    if from_diffusers:
        _check_unexpected(path, report.unexpected, src_cfg, arch, allow_arch_changes)
    for name, p in params.items():
        action = plan[name]
        if action == "missing" and any(k in name for k in _ZERO_WHEN_NEW):
            p.zero_()
        elif action == "loaded":
            p.copy_(source[name].to(p.dtype))
        elif action == "inflated" and name == "patch_embed.proj.weight":
            p.copy_(_inflate_patch_in(source[name].to(p.dtype), p, arch, pt_src))
        elif action == "inflated":
            p.copy_(_inflate_patch_out(source[name].to(p.dtype), p, arch, pt_src))
    return report


def _plan(path: str | Path, source: dict, params: dict) -> dict[str, str]:
    """What happens to each parameter (an :class:`InitReport` field name), decided before any copy."""
    # a new text encoder width makes the whole text projection new, not just its first layer
    new_text = any(
        n.startswith("text_proj.") and n in source and source[n].shape != p.shape for n, p in params.items()
    )
    plan = {}
    for name, p in params.items():
        if new_text and name.startswith("text_proj."):
            plan[name] = "reinitialised"  # keep the fresh init
        elif name not in source:
            plan[name] = "missing"
        elif source[name].shape == p.shape:
            plan[name] = "loaded"
        elif name == "patch_embed.proj.weight" or name.startswith("final.linear."):
            plan[name] = "inflated"
        else:
            raise ValueError(
                f"init.from={path}: parameter {name} has shape {tuple(source[name].shape)} in the source but "
                f"{tuple(p.shape)} in the model"
            )
    return plan


def _check_strict(path: str | Path, report: InitReport, params: dict, new: Sequence[str]) -> None:
    """Refuse to start any parameter fresh that ``init.new`` does not name, and an ``init.new`` pattern
    naming no parameter of the model (a typo would otherwise hide a fresh layer)."""
    for pattern in new:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in params):
            raise ValueError(f"init.new: pattern {pattern!r} matches no parameter name of the model")
    fresh = [n for n in (*report.reinitialised, *report.missing) if not _matches(n, new)]
    if not fresh:
        return
    suggest = list(dict.fromkeys(_pattern_of(n) for n in fresh))
    raise ValueError(
        f"init.from={path}: {len(fresh)} of the model's {len(params)} parameters would start fresh, not "
        f"from the source (e.g. {', '.join(fresh[:5])}{' …' if len(fresh) > 5 else ''}). If they are new "
        f"on purpose, list them in init.new (fnmatch patterns), e.g. init.new={json.dumps(suggest[:8])}; "
        "otherwise init.from names another architecture than model.arch (model.preset=from_init takes "
        "the source's)"
    )


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _pattern_of(name: str) -> str:
    """A pattern covering ``name``'s block or top-level module (``blocks.3.*``, ``text_proj.*``)."""
    m = re.match(r"(blocks\.\d+\.|[^.]+\.)", name)
    return f"{m.group(1)}*" if m else name


def _inflate_patch_in(src: torch.Tensor, dst: torch.Tensor, arch: DiTConfig, pt_src: int) -> torch.Tensor:
    """Patch embedding (D, C·pt·ph·pw) from a source with fewer channels and/or pt = 1."""
    pt, ph, pw = arch.patch_size
    if pt_src not in (1, pt):
        raise ValueError(f"patch_embed: source temporal patch {pt_src} → {pt}: only 1 → pt inflates")
    c_dst = arch.in_channels + arch.cond_channels
    c_src = src.shape[1] // (pt_src * ph * pw)
    w = src.view(src.shape[0], c_src, pt_src, ph, pw)
    if pt_src != pt:  # spread the image kernel over pt frames: a static clip embeds as the image did
        w = w.expand(-1, -1, pt, -1, -1) / pt
    out = torch.zeros(dst.shape[0], c_dst, pt, ph, pw, dtype=dst.dtype)
    out[:, :c_src] = w  # new (conditioning) channels start at zero
    return out.view_as(dst)


def _inflate_patch_out(src: torch.Tensor, dst: torch.Tensor, arch: DiTConfig, pt_src: int) -> torch.Tensor:
    """Output projection (pt·ph·pw·C, D) or its bias from a pt = 1 source: repeated for each frame."""
    pt = arch.patch_size[0]
    if pt_src != 1 or src.shape[0] * pt != dst.shape[0]:
        raise ValueError(f"final.linear: source rows {src.shape[0]} × pt={pt} != {dst.shape[0]}")
    return src.repeat(pt, *([1] * (src.ndim - 1)))  # (pt, ph·pw·C) blocks, pt outermost


def freeze(model: nn.Module, patterns: list[str]) -> int:
    """Turn off gradients for parameters whose names match any fnmatch pattern; returns the count."""
    if not patterns:
        return 0
    n = 0
    for name, p in model.named_parameters():
        if any(fnmatch.fnmatchcase(name, pat) for pat in patterns):
            p.requires_grad_(False)
            n += 1
    if n == 0:
        raise ValueError(f"init.freeze={list(patterns)}: no parameter name matches")
    return n
