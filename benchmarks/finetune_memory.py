"""Peak memory and step time of fine-tuning: full vs LoRA (rank 16, 64) vs LoRA + activation offload.

:class:`LiveBytes` measures a step's peak memory on CPU (live tensor bytes by storage).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Live tensor bytes, by storage, at every op dispatched while active, and their peak.

    Every storage an op returns is counted once (views share it) until Python frees it (a finalizer on
    the storage); tensors made before the mode (parameters, optimizer states, inputs) are counted with
    :meth:`track`. ``host`` (e.g. :meth:`parallel.offload.MemoryOptions.host_bytes`) is what of the live
    bytes a GPU would hold in host memory: ``peak`` is of ``live - host()``, the device's share. Ops'
    internal workspaces (a kernel's scratch buffers) are not seen.
    """

    def __init__(self, host: Callable[[], int] = lambda: 0) -> None:
        super().__init__()
        self.host, self.live, self.peak = host, 0, 0
        self._ids: set[int] = set()

    def track(self, tensors: Iterable) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._add(t.untyped_storage())
        self._update()

    def _add(self, storage) -> None:
        key = id(storage)
        if key in self._ids:
            return
        n = storage.nbytes()
        self._ids.add(key)
        self.live += n
        weakref.finalize(storage, self._free, key, n)

    def _free(self, key: int, n: int) -> None:
        self._ids.discard(key)
        self.live -= n

    def _update(self) -> None:
        self.peak = max(self.peak, self.live - self.host())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._add(t.untyped_storage())
        self._update()
        return out
