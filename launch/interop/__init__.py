"""Pretrained video DiTs in and out of diffusers' format: Wan2.1 / Wan2.2 and LTX-Video.

Read a diffusers transformer (a model folder, a pipeline root, a sharded index or one ``.safetensors``),
turn it into a :class:`dit.config.DiTConfig` and our state dict, and back::

    m = read_diffusers("Wan2.1-T2V-1.3B-Diffusers")          # or its transformer/ folder
    cfg, state = to_ours(m)                                  # DiTConfig + SpacetimeDiT state dict
    write_diffusers(to_diffusers(cfg, state), "out/")        # what WanTransformer3DModel loads

Only safetensors are read (``safetensors.torch.load_file``), never pickles, and never through diffusers'
loader: diffusers is not needed at run time. Every source tensor is mapped or it is an error; every
config field we cannot express is a ``ValueError`` naming the class and the fields.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dit.config import DiTConfig
from launch.interop import ltx, wan
from launch.interop.formats import (
    DiffusersModel,
    check_shapes,
    is_diffusers,
    map_state,
    read_diffusers,
    refuse,
    wan_boundary,
    write_diffusers,
)

# diffusers class → the module that describes it: config_to_ours(config, where), inexpressible(cfg),
# diffusers_config(cfg) and renames(cfg); the mapping itself is done here, once for every class
_CLASSES = {wan.CLASS_NAME: wan, ltx.CLASS_NAME: ltx}


def _expected_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Our state dict's shapes for ``cfg`` (the model built on the meta device: no memory, no init)."""
    from dit.model import SpacetimeDiT

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in SpacetimeDiT(cfg).state_dict().items()}


def to_ours(m: DiffusersModel) -> tuple[DiTConfig, dict[str, Tensor]]:
    """The matching :class:`DiTConfig` (text convention included) and our state dict.

    Args:
        m: a model from :func:`read_diffusers`.

    Raises:
        ValueError: an unknown class, a config field we cannot express (named with the class), or a
            source tensor left unmapped or missing.
    """
    if m.class_name not in _CLASSES:
        raise ValueError(
            f"{m.path}: diffusers class {m.class_name!r} is not supported (supported: {sorted(_CLASSES)})"
        )
    module = _CLASSES[m.class_name]
    where = f"{m.path or 'diffusers model'} ({m.class_name})"
    cfg = module.config_to_ours(m.config, where)
    ours = map_state(module.renames(cfg), m.state, to_ours=True, where=where)
    check_shapes(ours, _expected_shapes(cfg), where)
    return cfg, ours


def to_diffusers(cfg: DiTConfig, state: dict[str, Tensor]) -> DiffusersModel:
    """The inverse of :func:`to_ours`: a :class:`DiffusersModel` (``path`` None until written).

    The class is LTX-Video's for an ``rope_ltx`` model, else Wan's.

    Args:
        cfg: our architecture.
        state: a SpacetimeDiT state dict of that architecture.

    Raises:
        ValueError: listing every field of ``cfg`` the diffusers class cannot express.
    """
    module = ltx if cfg.pos_embed == "rope_ltx" else wan
    refuse(module.CLASS_NAME, "DiTConfig", module.inexpressible(cfg))
    where = f"SpacetimeDiT state for {module.CLASS_NAME}"
    expected = _expected_shapes(cfg)
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ValueError(f"{where}: tensors the config has no place for: {', '.join(extra[:8])}")
    check_shapes({k: v for k, v in state.items() if k in expected}, expected, where)
    out = map_state(module.renames(cfg), state, to_ours=False, where=where)
    return DiffusersModel(module.CLASS_NAME, module.diffusers_config(cfg), out, None)


__all__ = [
    "DiffusersModel",
    "is_diffusers",
    "read_diffusers",
    "to_ours",
    "to_diffusers",
    "write_diffusers",
    "wan_boundary",
]
