"""Moved: the DeepSpeed engine is :mod:`launch.engine_deepspeed`. This name stays only for
``launch/dryrun.py``'s import of :func:`check_deepspeed` until that import names the new module."""

from launch.engine_deepspeed import check_deepspeed

__all__ = ["check_deepspeed"]
