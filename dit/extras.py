"""Optional packages: which pip extra brings each, and the one-line error when a feature needs one.

The core install (``pip install -e .``) runs the built-in demo and the train / sample / export /
convert path. Engines and integrations are extras (``[project.optional-dependencies]`` in
pyproject.toml): code that needs one imports it through :func:`require` where the feature starts, never
at the top of a module the core path imports, so a core install never touches them. Here in ``dit/``
(which itself needs none of them) because every package may import ``dit``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS: dict[str, tuple[str, str]] = {
    # top-level import name: (the package as users know it, the extra that installs it)
    "deepspeed": ("DeepSpeed", "deepspeed"),
    "megatron": ("megatron-core", "megatron"),
    "diffusers": ("diffusers", "diffusers"),
    "peft": ("peft", "lora"),
    "matplotlib": ("matplotlib", "plots"),
}
"""Every optional package :func:`require` knows; tests hold it against pyproject.toml's extras."""


class MissingExtra(ImportError):
    """A feature needs an optional package that is not installed. The message is the whole story (the
    feature or config key, the package, the pip command): command-line tools print it and exit 2."""


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature``, or raise :class:`MissingExtra` naming the extra to install.

    Args:
        module: a module of a package in :data:`EXTRAS` (``"deepspeed"``, ``"megatron.core"``).
        feature: what needs it, as the user asked for it: a config key and value
            (``"parallel.engine=deepspeed"``) or an option.

    Raises:
        MissingExtra: ``{feature} needs {package}: pip install 'spacetime-dit[{extra}]'``; when the
            package is there but one of its own dependencies is not, that import error too (installing
            the extra brings it).
    """
    top = module.partition(".")[0]
    package, extra = EXTRAS[top]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = (e.name or "").partition(".")[0]
        detail = "" if missing == top else f" (importing it failed: {e})"
        raise MissingExtra(
            f"{feature} needs {package}{detail}: pip install 'spacetime-dit[{extra}]'", name=module
        ) from e
