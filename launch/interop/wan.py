"""diffusers' ``WanTransformer3DModel``  ↔ SpacetimeDiT (being written: the mapping lands next)."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from dit.config import DiTConfig

CLASS_NAME = "WanTransformer3DModel"


def owns(keys: list[str]) -> bool:
    """Whether these tensor names are this class's."""
    return False


def infer_config(state: dict[str, Tensor], path: Path) -> dict:
    """The class's config.json fields, from the tensors' names and shapes."""
    raise NotImplementedError


def to_ours(config: dict, state: dict[str, Tensor], path: Path | None) -> tuple[DiTConfig, dict[str, Tensor]]:
    """Our config and state dict."""
    raise NotImplementedError


def to_diffusers(cfg: DiTConfig, state: dict[str, Tensor]) -> tuple[dict, dict[str, Tensor]]:
    """The diffusers config and state dict."""
    raise NotImplementedError
