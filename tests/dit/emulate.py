"""CUDA mixed precision on a CPU-only machine, for the tests of what a GPU run would do.

Two emulations, each saying what it can and cannot stand for:

- :func:`fake_cuda`: ``FakeTensorMode`` tensors with ``device="cuda"`` and CUDA's autocast flag raised
  for the thread. ``torch.autocast("cuda")`` cannot be entered without a GPU (it warns and disables
  itself), but the flag can be set, and ops on fake ``cuda`` tensors then go through the AutocastCUDA
  kernels this CPU build registers: the real CUDA dtype rules (layer_norm and rms_norm to fp32,
  linear to bf16 …), shapes and dtypes only, no values. Python indexing and ``~ | &`` on a tensor
  open a device guard in C++ before any dispatch, which a CPU build has none of for CUDA; a
  function mode sends them to their aten ops (slice, select, unsqueeze, bitwise_*) instead.
- :func:`gpu_like_autocast`: CPU bf16 autocast does the arithmetic on real CPU tensors, and CUDA's
  flag is raised too, so code that asks ``torch.is_autocast_enabled()`` (which means CUDA's), as
  DeepSpeed's engine does before its forward, sees an active autocast exactly as on a GPU. CPU and
  CUDA autocast cast some ops differently; only a GPU confirms the CUDA kernels' numerics.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode


@contextlib.contextmanager
def cuda_autocast_flag(dtype: torch.dtype = torch.bfloat16) -> Iterator[None]:
    """CUDA's autocast flag (and dtype) raised for this thread, restored after."""
    prev = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        with warnings.catch_warnings():
            # torch.autocast("cuda", enabled=False) inside (the model's fp32 islands) warns that CUDA is
            # missing; disabling is all it has to do, and it does
            warnings.filterwarnings("ignore", message="CUDA is not available")
            yield
    finally:
        torch.set_autocast_enabled("cuda", prev[0])
        torch.set_autocast_dtype("cuda", prev[1])


def _getitem(x: torch.Tensor, index) -> torch.Tensor:
    """Basic indexing (ints, slices, None, ...) by aten ops."""
    index = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in index):
        at = next(n for n, i in enumerate(index) if i is Ellipsis)
        named = sum(1 for i in index if i is not None and i is not Ellipsis)
        index = index[:at] + (slice(None),) * (x.ndim - named) + index[at + 1 :]
    dim = 0
    for i in index:
        if i is None:
            x = torch.ops.aten.unsqueeze.default(x, dim)
            dim += 1
        elif isinstance(i, int):
            x = torch.ops.aten.select.int(x, dim, i)
        elif isinstance(i, slice):
            x = torch.ops.aten.slice.Tensor(x, dim, i.start, i.stop, i.step or 1)
            dim += 1
        else:
            raise NotImplementedError(f"fake_cuda: index {i!r} (only basic indexing is routed)")
    return x


class _NoDeviceGuard(TorchFunctionMode):
    BITWISE = {
        torch.Tensor.__invert__: torch.ops.aten.bitwise_not.default,
        torch.Tensor.__or__: torch.ops.aten.bitwise_or.Tensor,
        torch.Tensor.__and__: torch.ops.aten.bitwise_and.Tensor,
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__:
            return _getitem(*args)
        if func in self.BITWISE and all(isinstance(a, torch.Tensor) for a in args):
            return self.BITWISE[func](*args)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def fake_cuda(dtype: torch.dtype | None = torch.bfloat16) -> Iterator[FakeTensorMode]:
    """Fake ``cuda`` tensors under CUDA autocast in ``dtype`` (None: no autocast). Real tensors may
    enter (a model built on meta and ``to_empty(device="cuda")`` here, for instance)."""
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, _NoDeviceGuard():
        if dtype is None:
            yield mode
            return
        with cuda_autocast_flag(dtype):
            yield mode


@contextlib.contextmanager
def gpu_like_autocast(dtype: torch.dtype = torch.bfloat16) -> Iterator[None]:
    """CPU autocast in ``dtype`` that code checking CUDA's autocast flag also sees as on."""
    with torch.autocast("cpu", dtype=dtype), cuda_autocast_flag(dtype):
        yield
