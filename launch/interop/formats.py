"""Reading and writing diffusers transformer weights: model folders, pipeline roots, sharded indexes and
single ``.safetensors`` files. Safetensors only: a pickle (``.bin``, ``.pt`` …) is never opened."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from parallel.file_mode import save_safetensors

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"
PIPELINE_INDEX = "model_index.json"
# weight files that are pickles underneath: loading one can run arbitrary code
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# init.expert → the pipeline root's folder (WanPipeline: transformer runs t ≥ boundary, transformer_2 below)
EXPERT_FOLDERS = {"high_noise": "transformer", "low_noise": "transformer_2"}


@dataclass
class DiffusersModel:
    """A diffusers transformer as plain data."""

    class_name: str
    """diffusers class (``config.json``'s ``_class_name``), e.g. ``WanTransformer3DModel``."""
    config: dict
    """``config.json`` without the ``_``-prefixed bookkeeping keys."""
    state: dict[str, Tensor]
    """diffusers parameter name → tensor."""
    path: Path | None
    """Where it was read from or written to; None for one made in memory."""


def is_diffusers(path: str | Path) -> bool:
    """Whether ``path`` looks like a diffusers transformer or pipeline root (what
    :func:`read_diffusers` takes), judged from file names, ``config.json``'s ``_class_name`` or, for
    a lone ``.safetensors``, its tensor names. Nothing but JSON and safetensors headers is read."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            return False
        if _class_beside(path) is not None:
            return True
        with safe_open(path, "pt") as f:
            return _guess_class(list(f.keys())) is not None
    if not path.is_dir():
        return False
    if (path / PIPELINE_INDEX).is_file():
        return True
    return _class_beside(path / WEIGHTS) is not None


def read_diffusers(path: str | Path, expert: str = "", meta: bool = False) -> DiffusersModel:
    """Read a diffusers transformer.

    Args:
        path: a model folder (``config.json`` and ``diffusion_pytorch_model.safetensors``, or shards
            listed by ``diffusion_pytorch_model.safetensors.index.json``), a pipeline root
            (``model_index.json``: its ``transformer/``, or ``transformer_2/`` for the low-noise expert),
            or one ``.safetensors`` file (with a ``config.json`` beside it, or one whose class and shapes
            follow from its tensors).
        expert: ``high_noise`` or ``low_noise`` (``init.expert``): which transformer of a two-expert
            pipeline root (Wan2.2-A14B); empty for everything else.
        meta: read only the safetensors headers: every tensor is a ``meta`` tensor of its shape and dtype
            (enough for :func:`launch.interop.to_ours` to give the config and check the names and shapes,
            without reading tens of GB of weights).

    A folder's pickle weights (``.bin``, ``.pt`` …) are never opened: beside safetensors they are
    ignored, alone they are an error naming them.

    Raises:
        ValueError: a two-expert root without ``expert`` (or ``expert`` on anything else), pickle-only
            weights, an index naming shards outside the folder, a config that is not diffusers'.
        FileNotFoundError: no weights where they should be.
    """
    path = Path(path)
    if expert and expert not in EXPERT_FOLDERS:
        raise ValueError(f"init.expert={expert!r}: expected one of {sorted(EXPERT_FOLDERS)} (or empty)")
    if path.is_dir() and (path / PIPELINE_INDEX).is_file():
        path = _pipeline_transformer(path, expert)
    elif expert:
        raise ValueError(
            f"init.expert={expert!r} picks a transformer of a two-expert pipeline root, but {path} is not "
            f"one (no {PIPELINE_INDEX}): leave init.expert empty"
        )
    if path.is_file():
        return _read_file(path, meta)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such diffusers model folder or .safetensors file")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (a diffusers model folder has one)")
    class_name, config = _read_config(config_file)
    return DiffusersModel(class_name, config, _read_folder_weights(path, meta), path)


def write_diffusers(m: DiffusersModel, out: str | Path) -> Path:
    """Write ``config.json`` (with ``_class_name`` and ``_diffusers_version``) and
    ``diffusion_pytorch_model.safetensors`` into folder ``out`` (created); sets and returns ``m.path``.

    Writing into a folder that already holds a diffusers model replaces it: every diffusers weight file
    there (``diffusion_pytorch_model*``: other shards, their ``.index.json``, variants) is removed first,
    since an old index or variant would otherwise be loaded in place of what was just written. A folder
    holding another kind of model (a spacetime-dit export's ``model.safetensors``, a pipeline root's
    ``model_index.json``) is refused, not mixed into.

    Args:
        m: the model.
        out: the folder ``from_pretrained`` will be pointed at.

    Raises:
        ValueError: ``out`` is a file, or a folder holding another kind of model.
    """
    out = Path(out)
    _clear_model_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in m.state.items()}
    save_safetensors(state, out / WEIGHTS, metadata={"format": "pt"})
    config = {"_class_name": m.class_name, "_diffusers_version": _diffusers_version(), **m.config}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    m.path = out
    return out


# files that make a folder another kind of model than a diffusers model folder: writing one into it
# would leave a folder our reader and diffusers read differently
_NOT_A_MODEL_FOLDER = ("model.safetensors", "ema.safetensors", PIPELINE_INDEX)


def _clear_model_folder(out: Path) -> None:
    """Remove the diffusers weight files of an existing model folder ``out`` (nothing else), after
    refusing a file or a folder holding another kind of model; see :func:`write_diffusers`."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: a file; a diffusers model is written to a folder")
    if not out.is_dir():
        return
    foreign = [name for name in _NOT_A_MODEL_FOLDER if (out / name).exists()]
    if foreign:
        raise ValueError(
            f"{out}: holds {', '.join(foreign)} (a spacetime-dit export or a pipeline root), not a "
            f"diffusers model folder: write the diffusers model to another folder"
        )
    for f in out.iterdir():
        if f.name.startswith("diffusion_pytorch_model") and (f.is_file() or f.is_symlink()):
            f.unlink()


def wan_boundary(root: str | Path) -> float | None:
    """The boundary of a two-expert Wan2.2 pipeline root (``model_index.json``'s ``boundary_ratio``: the
    high-noise expert runs t ≥ ratio × 1000); None for anything else.

    Args:
        root: a pipeline root (or any path: None when it has no ``model_index.json``).
    """
    index = Path(root) / PIPELINE_INDEX
    if not index.is_file():
        return None
    ratio = _read_json(index).get("boundary_ratio")
    if ratio is not None and not (isinstance(ratio, int | float) and 0 < ratio < 1):
        raise ValueError(f"{index}: boundary_ratio={ratio!r} is not a number in (0, 1)")
    return None if ratio is None else float(ratio)


# ---- reading -----------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a JSON object expected, not {type(data).__name__}")
    return data


def _read_config(path: Path) -> tuple[str, dict]:
    data = _read_json(path)
    class_name = data.get("_class_name")
    if not isinstance(class_name, str):
        raise ValueError(f"{path}: no _class_name: not a diffusers model config")
    return class_name, {k: v for k, v in data.items() if not k.startswith("_")}


def _class_beside(weights: Path) -> str | None:
    """``_class_name`` of the ``config.json`` in ``weights``' folder, if it has a readable one."""
    config = weights.parent / "config.json"
    try:
        return _read_config(config)[0] if config.is_file() else None
    except ValueError:
        return None


def _pipeline_transformer(root: Path, expert: str) -> Path:
    """The transformer folder of a pipeline root for ``expert``."""
    index = _read_json(root / PIPELINE_INDEX)

    def present(name: str) -> bool:
        entry = index.get(name)
        return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None

    two = present("transformer") and present("transformer_2")
    if two and not expert:
        raise ValueError(
            f"{root} is a two-expert pipeline root (transformer/ for high noise, transformer_2/ for low "
            f"noise): set init.expert to 'high_noise' or 'low_noise'"
        )
    if expert and not two:
        raise ValueError(f"init.expert={expert!r}: {root} has one transformer, not two experts")
    name = EXPERT_FOLDERS[expert] if expert else "transformer"
    if not present(name) or not (root / name).is_dir():
        raise FileNotFoundError(f"{root / PIPELINE_INDEX}: no {name}/ transformer in this pipeline root")
    return root / name


def _refuse_pickles(folder: Path) -> None:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{folder}: weights only in pickle files ({', '.join(pickles)}), which can run code when "
            f"loaded; only safetensors are read: convert them to {WEIGHTS} with a trusted tool"
        )


_META_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def _load(file: Path, meta: bool) -> dict[str, Tensor]:
    """A safetensors file's tensors, or (``meta``) meta tensors of the shapes and dtypes its header lists:
    the 8-byte header length and the JSON header are all that is read (plain JSON, nothing executed)."""
    if not meta:
        return load_file(file)
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 2 <= size <= 100 * 2**20:
            raise SafetensorError(f"{file}: not a safetensors file (header length {size})")
        try:
            header = json.loads(f.read(size))
        except ValueError as e:
            raise SafetensorError(f"{file}: unreadable safetensors header ({e})") from None
    out = {}
    for name, entry in header.items() if isinstance(header, dict) else ():
        if name == "__metadata__":
            continue
        dtype = _META_DTYPES.get(entry.get("dtype")) if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        sizes_ok = isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
        if dtype is None or not sizes_ok:
            raise SafetensorError(f"{file}: tensor {name!r} has no readable dtype and shape in the header")
        out[name] = torch.empty(shape, dtype=dtype, device="meta")
    return out


def _read_folder_weights(folder: Path, meta: bool = False) -> dict[str, Tensor]:
    if (folder / INDEX).is_file():
        return _read_sharded(folder / INDEX, meta)
    if (folder / WEIGHTS).is_file():
        return _load(folder / WEIGHTS, meta)
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:  # e.g. a variant such as diffusion_pytorch_model.fp16.safetensors
        return _load(found[0], meta)
    _refuse_pickles(folder)
    what = f"{len(found)} .safetensors files ({', '.join(p.name for p in found)})" if found else "none"
    raise FileNotFoundError(f"{folder}: expected {WEIGHTS} or {INDEX}; found {what}")


def _read_sharded(index_file: Path, meta: bool = False) -> dict[str, Tensor]:
    """All shards an index lists; each must be a plain file name in the index's folder and hold exactly
    the tensors the index assigns it.

    The NAME is checked, not where it leads: in the Hugging Face hub cache every file of
    ``snapshots/<rev>/transformer/`` is a symlink into ``blobs/``, and the shards are opened through
    those links as diffusers does; a name with a folder part (``../x``, ``sub/x``) or an absolute path
    is refused."""
    weight_map = _read_json(index_file).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_file}: no weight_map")
    folder = index_file.parent  # not resolved: the index itself may be a link into blobs/
    by_shard: dict[str, set[str]] = {}
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            raise ValueError(f"{index_file}: shard {shard!r} of {key!r} is not a file name; refused")
        by_shard.setdefault(shard, set()).add(key)
    state: dict[str, Tensor] = {}
    for shard, keys in sorted(by_shard.items()):
        plain = shard not in ("", ".", "..") and "\\" not in shard and Path(shard).name == shard
        if not plain:
            raise ValueError(f"{index_file}: shard {shard!r} is not a file name inside {folder}; refused")
        file = folder / shard
        if file.suffix != ".safetensors":
            raise ValueError(f"{index_file}: shard {shard!r} is not a .safetensors file; refused")
        tensors = _load(file, meta)
        if set(tensors) != keys:
            missing, extra = sorted(keys - set(tensors)), sorted(set(tensors) - keys)
            raise ValueError(
                f"{file}: does not match {index_file.name} (missing {missing}, unlisted {extra})"
            )
        state.update(tensors)
    return state


def _read_file(path: Path, meta: bool = False) -> DiffusersModel:
    if path.suffix in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: a pickle file, which can run code when loaded; only safetensors are read")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: not a .safetensors file")
    state = _load(path, meta)
    if _class_beside(path) is not None:
        class_name, config = _read_config(path.parent / "config.json")
        return DiffusersModel(class_name, config, state, path)
    from launch.interop import ltx, wan

    for module in (wan, ltx):
        if module.owns(list(state)):
            return DiffusersModel(module.CLASS_NAME, module.infer_config(state, path), state, path)
    raise ValueError(
        f"{path}: no config.json beside it and its tensor names are neither Wan's nor LTX-Video's; pass the "
        f"diffusers model folder (config.json + weights) instead"
    )


def _guess_class(keys: list[str]) -> str | None:
    from launch.interop import ltx, wan

    return next((m.CLASS_NAME for m in (wan, ltx) if m.owns(keys)), None)


def _diffusers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusers")
    except PackageNotFoundError:  # not needed at run time; any release with both classes reads this
        return "0.32.0"


# ---- mapping -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rename:
    """One tensor's two names, and the exact (reshape-only) transforms between its two layouts."""

    ours: str
    theirs: str
    to_ours: Callable[[Tensor], Tensor] = lambda t: t
    to_theirs: Callable[[Tensor], Tensor] = lambda t: t


def map_state(
    renames: list[Rename], state: dict[str, Tensor], to_ours: bool, where: str
) -> dict[str, Tensor]:
    """Rename every tensor of ``state`` by ``renames`` (diffusers → ours when ``to_ours``, else back).

    Args:
        renames: the complete mapping of this architecture.
        state: the source state dict; each of its tensors must be named in ``renames`` and each name of
            the source side of ``renames`` must be in it.
        to_ours: direction.
        where: the source (class name and path), for the error.

    Raises:
        ValueError: listing the source tensors nothing maps, and the expected ones that are missing.
    """
    src = {(r.theirs if to_ours else r.ours): r for r in renames}
    unmapped, missing = sorted(set(state) - set(src)), sorted(set(src) - set(state))
    if unmapped or missing:
        raise ValueError(
            f"{where}: tensors do not match the config: "
            + "; ".join(
                f"{what} ({len(names)}): {', '.join(names[:8])}{' …' if len(names) > 8 else ''}"
                for what, names in (("unmapped source tensors", unmapped), ("missing tensors", missing))
                if names
            )
        )
    out = {}
    for name, r in src.items():
        out[r.ours if to_ours else r.theirs] = (r.to_ours if to_ours else r.to_theirs)(state[name])
    return out


def check_shapes(state: dict[str, Tensor], expected: dict[str, tuple[int, ...]], where: str) -> None:
    """Every tensor has the shape the config implies (``expected``: name → shape), else an error."""
    wrong = [
        f"{k} {tuple(v.shape)} (config implies {tuple(expected[k])})"
        for k, v in state.items()
        if tuple(v.shape) != tuple(expected[k])
    ]
    if wrong:
        raise ValueError(f"{where}: tensor shapes do not match its config: {'; '.join(wrong[:8])}")


def refuse(class_name: str, where: object, problems: list[str]) -> None:
    """A ``ValueError`` naming the class and every field we cannot express, if there are any."""
    if problems:
        raise ValueError(f"{where}: {class_name} with {'; '.join(problems)}: not expressible, refused")
