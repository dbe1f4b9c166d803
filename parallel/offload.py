"""Memory-lean options for big frozen bases on small GPUs: activation offload and block swapping.

:func:`apply_memory_options` installs both on a plain ``SpacetimeDiT`` from outside (forward hooks
and saved-tensor hooks on each block; no wrapper, so parameter names and checkpoint keys stay the
plain model's):

- **Activation offload** (``parallel.activation_offload``): every tensor a block saves for backward,
  except parameters (and views of them) and tensors under ``min_bytes``, is copied to pinned host
  memory as it is saved, on a side CUDA stream (the copy overlaps the forward's compute). Back in
  backward it is prefetched: when backward reaches block k (a hook on the block's output gradient),
  blocks k's and k-1's offloaded tensors start back to the device on the side stream, so block k-1's
  copy overlaps block k's backward, and an unpack waits on its tensor's copy event (one not prefetched
  is copied when unpacked). A tensor saved several times in a block (its modulated input feeds q,
  k and v) is copied once each way; what every block saves of the same outer tensor (the caption's states) is
  copied by each (small next to the activations). With activation checkpointing only what the
  checkpoint itself keeps (the block's inputs) is offloaded: the hooks sit outside checkpoint's and
  stand aside while it recomputes.
- **Block swap** (``finetune.block_swap``): the frozen parameters and the buffers of the last
  ``block_swap`` blocks live in pinned host memory; each is copied to the device just before the
  block runs (forward, checkpoint recompute and backward), the next swapped block prefetched on a
  side stream, and evicted after use (musubi-tuner's ``blocks_to_swap``). Autograd would keep a view
  of each weight (the transposed weight a linear saves) and with it the device copy until backward:
  the block's saved-tensor hook stores a reference to the parameter instead and rebuilds the view on
  the device in backward. Trainable parameters (LoRA adapters) stay on the device. What autograd saves
  that is not a view of a parameter stays on the device: with an fp32 base under bf16 autocast that
  includes autocast's bf16 copy of each weight, so block swap pairs with ``finetune.base_dtype=bf16``
  (or activation offload). A model built on meta (the FSDP engine's) gets the swapped blocks' frozen
  tensors allocated in pinned host memory when :func:`parallel.parallelize.materialize` materialises it
  (:meth:`BlockSwap.allocate_host`): they never occupy the device, even at start-up.

Both run on CPU as an emulation of the same code path (the copies go to fresh host tensors, the
"device" copies are fresh tensors too), which is what the CPU tests check: saved tensors pass through
the hooks, swapped parameters are the host copies between uses and the device copies are freed after
use, the offloaded tensors come back prefetched (:meth:`MemoryOptions.copies_back`), gradients equal
the plain run. What only a GPU can confirm: that the copies overlap compute (side streams, events,
``non_blocking`` from pinned memory), the speed of either option, and the device memory they save
(``torch.cuda.max_memory_allocated``; with the prefetch two blocks' activations are on the device in
backward, the one computing and the previous).

Call order: after tensor/context parallelism and activation checkpointing, before FSDP (the hooks
register ahead of checkpoint's, so either order of the two works). Block swap needs whole (unsharded)
blocks: under FSDP sharding use ``parallel.cpu_offload``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.distributed._composable import checkpoint as composable_checkpoint

MIN_OFFLOAD_BYTES = 1024
"""Saved tensors smaller than this stay on the device (norm statistics, masks: a copy costs more
latency than it saves)."""


def _recomputing(block: nn.Module) -> bool:
    """Whether ``block`` runs inside a composable checkpoint's recompute (its hooks are disabled then)."""
    state = composable_checkpoint.state(block)
    return state is not None and not state.enable_hook


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _Counter:
    """Live bytes held in host memory by the options (what a GPU would not hold), and how the offloaded
    activations came back in backward: ``prefetched`` (started on the side stream when backward reached
    the next block) or ``on_demand`` (copied when unpacked, on the compute stream)."""

    def __init__(self) -> None:
        self.live = 0
        self.prefetched = 0
        self.on_demand = 0

    def hold(self, t: Tensor) -> None:
        n = t.numel() * t.element_size()
        self.live += n
        weakref.finalize(t, self._release, n)

    def _release(self, n: int) -> None:
        self.live -= n


class _Copier:
    """Host <-> device copies: pinned and on a side stream on CUDA, plain copies on CPU (emulation)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def to_host(self, t: Tensor) -> tuple[Tensor, object]:
        """A host copy of ``t`` and an event its copy completes on (None on CPU)."""
        host = torch.empty(t.size(), dtype=t.dtype, pin_memory=self.cuda)
        if not self.cuda:
            return host.copy_(t), None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # t is computed
        with torch.cuda.stream(self.stream):
            host.copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        t.record_stream(self.stream)  # the allocator must not reuse t's memory before the copy ends
        return host, event

    def to_device(self, host: Tensor, event: object = None, side: bool = False) -> tuple[Tensor, object]:
        """A device copy of ``host`` (after ``event``), on the side stream with ``side`` (prefetch),
        with the event that copy completes on."""
        if not self.cuda:
            return torch.empty_like(host).copy_(host), None
        stream = self.stream if side else torch.cuda.current_stream(self.device)
        with torch.cuda.stream(stream):
            if event is not None:
                stream.wait_event(event)
            out = host.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        return out, done

    def wait(self, tensors: list[Tensor], event: object) -> None:
        """Make the compute stream wait for ``event`` and own ``tensors`` (copied on the side stream)."""
        if self.cuda and event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in tensors:
                t.record_stream(current)


class _Offloaded:
    """One offloaded saved tensor: its host copy and the event that copy completes on; in backward its
    device copy (shared by every unpack of it) and the event that copy completes on."""

    __slots__ = ("host", "event", "device", "done", "__weakref__")

    def __init__(self, host: Tensor, event: object) -> None:
        self.host, self.event = host, event
        self.device: Tensor | None = None
        self.done: object = None


@dataclass
class _Swapped:
    """One swapped block: its host copies and, while loaded, its device copies."""

    name: str
    block: nn.Module
    host: dict[str, Tensor] = field(default_factory=dict)  # name in block -> host tensor
    event: object = None  # the prefetch copy's completion (CUDA)
    loaded: bool = False


class BlockSwap:
    """The swapped blocks and which of them are on the device (at most the running one and the
    prefetched next)."""

    def __init__(self, blocks: list[tuple[str, nn.Module]], copier: _Copier, counter: _Counter) -> None:
        self.blocks = [_Swapped(name, block) for name, block in blocks]
        self.copier, self.counter = copier, counter
        self.index = {id(s.block): i for i, s in enumerate(self.blocks)}
        self.evict_queued = False

    @staticmethod
    def tensors(block: nn.Module):
        """``(dotted name, tensor)`` of the block's frozen parameters and its buffers."""
        for mod_name, mod in block.named_modules():
            for attr, p in list(mod._parameters.items()) + list(mod._buffers.items()):
                if p is not None and not p.requires_grad:
                    yield f"{mod_name}.{attr}" if mod_name else attr, p

    def _host(self, s: _Swapped) -> None:
        """Make the host copies (once) of a block materialised elsewhere (a model materialised on the
        device by other means than :func:`parallel.parallelize.materialize`: copied out at first use)."""
        for name, p in self.tensors(s.block):
            if name in s.host:
                continue
            if p.is_meta:
                raise ValueError(
                    f"finetune.block_swap: {s.name}.{name} is on meta (materialise the model first)"
                )
            if type(p.data) is not Tensor:  # a DTensor: FSDP or tensor parallel sharded the block
                raise ValueError(
                    f"finetune.block_swap swaps whole blocks, but {s.name}.{name} is sharded "
                    f"({type(p.data).__name__}): with FSDP sharding use parallel.cpu_offload instead"
                )
            if p.device.type != "cpu":  # materialised on the device: copy out once
                host, event = self.copier.to_host(p.data)
                if event is not None:
                    event.synchronize()
            else:  # on the host already: pinned for asynchronous copies (CUDA), itself on CPU
                host = p.data.pin_memory() if self.copier.cuda else p.data
            s.host[name] = host
            self.counter.hold(host)
            p.data = host

    def allocate_host(self) -> list[Tensor]:
        """Allocate the swapped blocks' frozen tensors that are still on meta directly in host memory
        (pinned on CUDA) as their host copies, in place of the meta tensors (a model built on meta and
        not yet materialised). The caller materialises the rest on the device and fills both from the
        initial state (``load_state_dict`` copies into these in place), so the swapped base never
        passes through the device: without this its first forward would copy it out, after the whole
        base had sat on the device at start-up. Returns the new parameters and buffers."""
        placed = []
        for s in self.blocks:
            for mod_name, mod in s.block.named_modules():
                for store in (mod._parameters, mod._buffers):
                    for attr, t in list(store.items()):
                        if t is None or t.requires_grad or not t.is_meta:
                            continue
                        host = torch.empty(t.size(), dtype=t.dtype, pin_memory=self.copier.cuda)
                        new = nn.Parameter(host, requires_grad=False) if store is mod._parameters else host
                        store[attr] = new
                        s.host[f"{mod_name}.{attr}" if mod_name else attr] = host
                        self.counter.hold(host)
                        placed.append(new)
        return placed

    def evict_all(self) -> None:
        for i in range(len(self.blocks)):
            self.evict(i)
        self.evict_queued = False

    def load(self, i: int, side: bool = False) -> None:
        """Copy block ``i``'s frozen tensors to the device (on the side stream with ``side``)."""
        s = self.blocks[i]
        self._host(s)
        if not s.loaded:
            params = dict(self.tensors(s.block))
            for name, host in s.host.items():
                params[name].data, s.event = self.copier.to_device(host, side=side)
            s.loaded = True
        if not side:
            self.copier.wait([p for _, p in self.tensors(s.block)], s.event)
            s.event = None

    def evict(self, i: int) -> None:
        """Point block ``i``'s frozen tensors back at their host copies (the device copies are freed once
        nothing else holds them)."""
        s = self.blocks[i]
        if s.loaded:
            params = dict(self.tensors(s.block))
            for name, host in s.host.items():
                params[name].data = host
            s.loaded, s.event = False, None

    def use(self, block: nn.Module, step: int) -> None:
        """Block ``block`` is about to run: load it, evict every other swapped block but the next one
        (``step`` = +1 in forward, -1 in backward), and prefetch that one."""
        i = self.index[id(block)]
        keep = {i, i + step}
        for j, s in enumerate(self.blocks):
            if j not in keep and s.loaded:
                self.evict(j)
        self.load(i)
        if 0 <= i + step < len(self.blocks):
            self.load(i + step, side=True)

    def views(self, block: nn.Module) -> dict[int, Tensor]:
        """Storage address -> frozen tensor, of block ``block``'s tensors while loaded."""
        return {_storage(p): p for _, p in self.tensors(block)}


class _BlockHooks:
    """A block's forward hooks: swap its frozen tensors in and out, and the saved-tensor hooks
    (offload, references to swapped weights) around its forward."""

    def __init__(self, block: nn.Module, offload: bool, swap: BlockSwap | None, copier, counter, min_bytes):
        self.block, self.offload, self.swap = block, offload, swap
        self.copier, self.counter, self.min_bytes = copier, counter, min_bytes
        self.ctx = None
        self.seen: dict = {}  # one forward's offloaded tensors: the same tensor is copied once
        self.params: set[int] | None = None
        self.swapped: dict[int, Tensor] = {}
        self.records: list[weakref.ref] = []  # the last forward's offloaded tensors, for the prefetch
        self.previous: _BlockHooks | None = None  # the block before (whose backward comes after this one's)

    def pre(self, module, args) -> None:
        recomputing = _recomputing(self.block)
        if self.swap is not None:
            self.swap.use(self.block, -1 if recomputing else +1)  # a recompute runs in backward
            self.swapped = self.swap.views(self.block)
        if recomputing or not torch.is_grad_enabled():
            return  # a checkpoint's recompute saves through checkpoint's own hooks
        self.params, self.seen, self.records = None, {}, []
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self.ctx.__enter__()

    def post(self, module, args, output) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(None, None, None)
            self.ctx, self.seen, self.params = None, {}, None
        if _recomputing(self.block):
            return  # recomputed for this block's backward, which comes next: stay loaded
        if isinstance(output, Tensor) and output.requires_grad:
            # backward reaches this block when its output's gradient is ready: load it then (and
            # prefetch the previous swapped block and offloaded activations), before checkpoint
            # recomputes or anything unpacks
            output.register_hook(self._backward_hook)
        if self.swap is not None:
            self.swap.evict(self.swap.index[id(self.block)])

    def _backward_hook(self, grad: Tensor) -> None:
        if self.swap is not None:
            self.swap.use(self.block, -1)
            if not self.swap.evict_queued:  # back to the host when this backward ends
                self.swap.evict_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self.swap.evict_all)
        if self.offload:
            # this block's activations (already on their way unless it is the last block), and the
            # previous block's, copied on the side stream while this block's backward computes
            self.prefetch()
            if self.previous is not None:
                self.previous.prefetch()

    def prefetch(self) -> None:
        """Start copying the last forward's offloaded tensors back to the device on the side stream
        (each once; the unpack waits on the copy's event)."""
        for ref in self.records:
            r = ref()
            if r is not None and r.device is None:
                r.device, r.done = self.copier.to_device(r.host, r.event, side=True)
                self.counter.prefetched += 1
        self.records = []

    def pack(self, t: Tensor):
        key = _storage(t)
        p = self.swapped.get(key)
        if p is not None and p.dtype == t.dtype:  # a view of a swapped weight: keep a reference
            return ("swapped", p, t.size(), t.stride(), t.storage_offset() - p.storage_offset())
        if not self.offload or isinstance(t, nn.Parameter) or t.numel() * t.element_size() < self.min_bytes:
            return ("kept", t)
        if self.copier.cuda and t.device.type == "cpu":
            return ("kept", t)
        if self.params is None or key not in self.params:
            # the parameters' storages as they are now: FSDP gathers a block's parameters after pre(),
            # and ZeRO-3 each submodule's as it runs, so one not seen yet may be a weight gathered since
            self.params = {_storage(q) for q in self.block.parameters()}
        if key in self.params:  # a view of a weight (w.t() of a linear): no copy
            return ("kept", t)
        meta = (key, t.storage_offset(), tuple(t.size()), tuple(t.stride()), t.dtype, t._version)
        if meta not in self.seen:
            host, event = self.copier.to_host(t)
            self.counter.hold(host)
            record = _Offloaded(host, event)
            self.records.append(weakref.ref(record))
            self.seen[meta] = (t, ("offloaded", record))  # t held: its address stays unique
        return self.seen[meta][1]

    def unpack(self, packed) -> Tensor:
        kind = packed[0]
        if kind == "kept":
            return packed[1]
        if kind == "swapped":
            _, p, size, stride, offset = packed
            if self.swap is not None:
                self.swap.use(self.block, -1)  # normally loaded already by the backward hook
            return p.data.as_strided(size, stride, p.data.storage_offset() + offset)
        record = packed[1]
        if record.device is None:  # not prefetched (a backward that skipped this block's hook)
            record.device, record.done = self.copier.to_device(record.host, record.event)
            self.counter.on_demand += 1
        self.copier.wait([record.device], record.done)
        return record.device


@dataclass
class MemoryOptions:
    """What :func:`apply_memory_options` installed: the swapped block names, and ``host_bytes()``,
    the bytes now held in host memory by offloaded activations and swapped weights."""

    offloaded: list[str]
    swapped: list[str]
    counter: _Counter
    handles: list = field(default_factory=list)
    swap: BlockSwap | None = None

    def host_bytes(self) -> int:
        return self.counter.live

    def copies_back(self) -> dict[str, int]:
        """How many offloaded activations came back to the device ``prefetched`` (on the side stream,
        when backward reached the next block) and ``on_demand`` (when unpacked), since installed."""
        return {"prefetched": self.counter.prefetched, "on_demand": self.counter.on_demand}

    def remove(self) -> None:
        """Remove the hooks (swapped blocks stay where they are)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()


_INSTALLED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def memory_options(model: nn.Module) -> MemoryOptions | None:
    """What :func:`apply_memory_options` installed on ``model`` (None: nothing), e.g. for
    :func:`parallel.parallelize.materialize` to place the swapped blocks in host memory."""
    return _INSTALLED.get(model)


def apply_memory_options(
    model: nn.Module,
    *,
    activation_offload: bool,
    block_swap: int,
    device: torch.device | str,
    min_bytes: int = MIN_OFFLOAD_BYTES,
) -> MemoryOptions:
    """Install activation offload and block swapping on ``model.blocks`` (in place; see the module doc).

    Args:
        model: a SpacetimeDiT (anything with ``.blocks``), on meta or materialised. Materialised: the
            swapped blocks' frozen tensors are moved to host copies now. On meta: materialise it with
            :func:`parallel.parallelize.materialize`, which allocates them in host memory
            (:meth:`BlockSwap.allocate_host`) and only the rest on the device.
        activation_offload: ``parallel.activation_offload``: saved activations of every block to host.
        block_swap: ``finetune.block_swap``: the last this many blocks' frozen tensors live on the host.
        device: where the model computes (``cuda``: pinned copies on side streams; ``cpu``: emulation).
        min_bytes: saved tensors smaller than this are not offloaded.

    Returns:
        A :class:`MemoryOptions` (``host_bytes()``, ``remove()``).
    """
    device = torch.device(device)
    depth = len(model.blocks)
    if not 0 <= block_swap <= depth:
        raise ValueError(f"finetune.block_swap={block_swap}: the model has {depth} blocks (0 … {depth})")
    counter, copier = _Counter(), _Copier(device)
    names = [f"blocks.{i}" for i in range(depth)]
    swap = None
    if block_swap:
        swap = BlockSwap(list(zip(names, model.blocks, strict=True))[depth - block_swap :], copier, counter)
    swapped_names = [s.name for s in swap.blocks] if swap is not None else []
    options = MemoryOptions(names if activation_offload else [], swapped_names, counter, swap=swap)
    _INSTALLED[model] = options
    previous = None
    for i, block in enumerate(model.blocks):
        swapped = swap is not None and i >= depth - block_swap
        if not (activation_offload or swapped):
            continue
        hooks = _BlockHooks(block, activation_offload, swap if swapped else None, copier, counter, min_bytes)
        hooks.previous, previous = previous, hooks
        # ahead of checkpoint's pre-hook and (always_call, appended) after its prepended post-hook:
        # these saved-tensor hooks enclose checkpoint's whichever was installed first
        options.handles.append(block.register_forward_pre_hook(hooks.pre, prepend=True))
        options.handles.append(block.register_forward_hook(hooks.post, always_call=True))
    if swap is not None and not any(p.is_meta for s in swap.blocks for _, p in swap.tensors(s.block)):
        for i in range(len(swap.blocks)):
            swap._host(swap.blocks[i])
    return options
