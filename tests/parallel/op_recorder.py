"""A dispatch mode that records every aten/c10d op run under it, with its output shapes and dtypes."""

from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# the ring's own arithmetic on the merged output/LSE and the gradient accumulators
ACCUMULATING = ("aten.logaddexp", "aten.exp", "aten.sub", "aten.mul", "aten.add", "aten.zeros_like")


class OpRecorder(TorchDispatchMode):
    """``ops``: one ``(name, [(shape, dtype), ...])`` per op, outputs in order (tensors only)."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, list[tuple[tuple[int, ...], torch.dtype]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, tuple | list) else (out,)
        outs = [(tuple(t.shape), t.dtype) for t in flat if isinstance(t, torch.Tensor)]
        self.ops.append((str(func.overloadpacket), outs))
        return out

    def named(self, name: str) -> list[list[tuple[tuple[int, ...], torch.dtype]]]:
        return [outs for op, outs in self.ops if op == name]

    def largest(self) -> int:
        """Elements of the largest tensor any op returned."""
        return max((math.prod(s) for _, outs in self.ops for s, _ in outs), default=0)

    def accumulator_dtypes(self) -> set[torch.dtype]:
        """Dtypes of everything the merge and the gradient sums produced."""
        return {dt for op, outs in self.ops if op.rstrip("_") in ACCUMULATING for _, dt in outs}
