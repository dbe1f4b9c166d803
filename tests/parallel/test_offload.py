"""Activation offload and block swap (:mod:`parallel.offload`) on CPU, where the same code path runs as
an emulation: host copies are fresh host tensors, device copies fresh tensors too.

Checked here: every saved activation of a block goes through the offload hook (the host holds exactly
what autograd would have kept, once per tensor) and the device's live bytes after forward drop by as
much; with activation checkpointing only the checkpoint's inputs are offloaded, whichever of the two
was installed first; a swapped block's frozen weights are the host copies before and after forward
and backward, and the device copies (with the weight views a linear saves) are freed once the block
ran, and (built on meta) never allocated on the device; backward prefetches the offloaded activations
of the previous block; a weight gathered late in the block (ZeRO-3) is not offloaded; gradients equal
the plain run bit for bit. What only a GPU can confirm: that the pinned copies on the side stream
overlap compute, and the speed of both options.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.finetune_memory import LiveBytes
from dit.config import get_preset
from dit.model import build_model
from parallel.config import ParallelConfig
from parallel.offload import MIN_OFFLOAD_BYTES, apply_memory_options, memory_options
from parallel.parallelize import apply_activation_checkpointing, build_parallel_model, make_dims


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # a tiny model: one thread is fastest, and two spin against each other on a busy 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base():
    model = build_model(get_preset("tiny", depth=2), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # init_weights zeroes the gates and the head: make every path matter
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _batch(seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 8, 384, generator=g)
    return x, torch.tensor([500.0]), ctx, torch.ones(1, 8, dtype=torch.bool)


def _grads(model) -> dict[str, torch.Tensor]:
    x, t, ctx, mask = _batch()
    model(x, t, ctx, mask).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def want(base) -> dict[str, torch.Tensor]:
    """The plain model's gradients (every option must reproduce them bit for bit)."""
    return _grads(copy.deepcopy(base))


@pytest.fixture(scope="module")
def want_frozen(base) -> dict[str, torch.Tensor]:
    """The gradients with the blocks frozen (what block swap runs on)."""
    return _grads(_freeze_blocks(copy.deepcopy(base)))


@pytest.fixture(scope="module")
def offload_all_host(base) -> int:
    """The host bytes of activation offload without checkpointing after forward (every activation)."""
    model = copy.deepcopy(base)
    options = apply_memory_options(model, activation_offload=True, block_swap=0, device="cpu")
    return _after_forward(model, options)[1]


def _saved_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in _saved(model).values())


def _saved(model) -> dict:
    """What autograd saves inside the blocks that offload would move: non-parameter tensors of at least
    MIN_OFFLOAD_BYTES that are not views of a parameter, each tensor once per block (by storage and
    view: what is made outside and used by every block, the caption's states, is counted by each)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, hooks, blocks = {}, [], []

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        big = t.numel() * t.element_size() >= MIN_OFFLOAD_BYTES
        if not isinstance(t, torch.nn.Parameter) and ptr not in params and big:
            seen[(len(blocks), ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)] = t
        return t

    def pre(mod, args):
        ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        ctx.__enter__()
        hooks.append(ctx)
        blocks.append(mod)

    handles = [b.register_forward_pre_hook(pre) for b in model.blocks]
    handles += [
        b.register_forward_hook(lambda *a: hooks.pop().__exit__(None, None, None)) for b in model.blocks
    ]
    x, t, ctx, mask = _batch()
    model(x, t, ctx, mask)
    for h in handles:
        h.remove()
    return seen


def _after_forward(model, options) -> tuple[int, int, torch.Tensor]:
    """(device bytes live after forward, host bytes held, the loss); the model's own tensors count
    (minus what the options hold on the host)."""
    x, t, ctx, mask = _batch()
    tracker = LiveBytes(options.host_bytes if options else lambda: 0)
    tracker.track([*model.parameters(), *model.buffers()])
    with tracker:
        loss = model(x, t, ctx, mask).square().mean()
    return (
        tracker.live - (options.host_bytes() if options else 0),
        options.host_bytes() if options else 0,
        loss,
    )


def test_offload_moves_every_saved_activation_to_the_host_and_keeps_the_gradients(base, want):
    expected = _saved_bytes(copy.deepcopy(base))
    plain_live, _, plain_loss = _after_forward(copy.deepcopy(base), None)
    model = copy.deepcopy(base)
    options = apply_memory_options(model, activation_offload=True, block_swap=0, device="cpu")
    live, host, loss = _after_forward(model, options)
    assert expected > 0 and host == expected  # every saved activation went through the hook, once
    assert plain_live - live >= 0.9 * expected  # and the device copies were freed
    loss.backward()
    del loss
    assert options.host_bytes() == 0  # backward consumed (and freed) the host copies
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    assert plain_loss.item() == _after_forward(model, options)[2].item()


@pytest.mark.parametrize("order", ["checkpoint_first", "offload_first"])
def test_offload_under_checkpointing_moves_only_the_checkpoint_inputs(base, want, offload_all_host, order):
    full_host = offload_all_host
    model = copy.deepcopy(base)
    if order == "checkpoint_first":
        apply_activation_checkpointing(model, "full")
    options = apply_memory_options(model, activation_offload=True, block_swap=0, device="cpu")
    if order == "offload_first":
        apply_activation_checkpointing(model, "full")
    _, host, loss = _after_forward(model, options)
    # each block's fp32 input (1 × 64 tokens × 64 wide) at least, and far less than every activation
    assert 2 * 64 * 64 * 4 <= host < full_host / 4
    loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert all(torch.equal(got[n], want[n]) for n in want)
    copies = options.copies_back()  # the checkpoints' inputs came back prefetched too
    assert copies["prefetched"] >= 2 and copies["on_demand"] == 0


def test_backward_prefetches_the_previous_blocks_activations(base, want):
    """When backward reaches block k, the offloaded tensors of blocks k and k-1 start back to the device
    (a side stream on CUDA) and the unpack waits on that copy instead of copying on demand: every
    offloaded tensor comes back prefetched, block 0's already when the last block's backward begins, and
    the gradients are those of the plain run. What only a GPU can confirm: that the copies overlap the
    backward's compute (streams and events; on CPU they run in place)."""
    model = copy.deepcopy(base)
    expected = len(_saved(copy.deepcopy(base)))
    options = apply_memory_options(model, activation_offload=True, block_swap=0, device="cpu")
    at_last_block = []

    def probe(module, args, output):  # after the options' own hook on the last block's output
        output.register_hook(lambda g: at_last_block.append(options.copies_back()["prefetched"]))

    handle = model.blocks[-1].register_forward_hook(probe)
    _, host, loss = _after_forward(model, options)
    handle.remove()
    loss.backward()
    assert options.copies_back() == {"prefetched": expected, "on_demand": 0} and expected > 0
    assert at_last_block == [expected]  # depth 2: both blocks' copies started at the last block
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)


def test_weights_gathered_later_in_the_block_are_not_offloaded(base, want, offload_all_host):
    """ZeRO-3 gathers each submodule's weights as it runs (``param.data`` becomes the gathered tensor),
    after the block's first saved tensor: the offload must still see a linear's saved weight view as a
    weight (not copy it to the host). Emulated here by a pre-hook that gives each linear's weight a new
    storage, as ZeRO-3's gather does; a real ZeRO-3 run is ``tests/launch/test_lora_train.py``'s."""

    def gather(module, args):
        module.weight.data = module.weight.data.clone()

    model = copy.deepcopy(base)
    for block in model.blocks:
        for m in block.modules():
            if isinstance(m, torch.nn.Linear):
                m.register_forward_pre_hook(gather)
    options = apply_memory_options(model, activation_offload=True, block_swap=0, device="cpu")
    _, host, loss = _after_forward(model, options)
    assert host == offload_all_host  # the activations, not one weight more
    loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)


def _freeze_blocks(model):
    for p in model.blocks.parameters():
        p.requires_grad_(False)
    return model


@pytest.mark.parametrize("ac", ["none", "full"])
def test_block_swap_keeps_frozen_weights_on_the_host_between_uses(base, want_frozen, ac):
    want = want_frozen
    model = _freeze_blocks(copy.deepcopy(base))
    apply_activation_checkpointing(model, ac)
    plain_live = _after_forward(copy.deepcopy(model), None)[0]
    options = apply_memory_options(model, activation_offload=False, block_swap=1, device="cpu")
    assert options.swapped == ["blocks.1"]
    swapped = {n: p for n, p in model.blocks[1].named_parameters()}
    host = {n: p.data_ptr() for n, p in swapped.items()}
    during = {}
    probe = model.blocks[1].register_forward_pre_hook(  # runs after the swap's own pre-hook
        lambda m, a: during.update({n: p.data_ptr() for n, p in swapped.items()})
    )
    live, held, loss = _after_forward(model, options)
    probe.remove()
    assert held == sum(p.numel() * p.element_size() for p in swapped.values())
    assert all(during[n] != host[n] for n in host)  # the block ran on a device copy
    assert all(p.data_ptr() == host[n] for n, p in swapped.items())  # and is back on the host
    if ac == "none":  # the linears' saved weight views no longer hold the device copy
        weights = sum(p.numel() * 4 for n, p in swapped.items() if n.endswith("weight") and p.ndim == 2)
        assert plain_live - live >= weights
    loss.backward()
    assert all(p.data_ptr() == host[n] for n, p in swapped.items())  # evicted when backward ended
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)


def test_bad_block_swap_names_the_key(base):
    with pytest.raises(ValueError, match=r"finetune.block_swap=3: the model has 2 blocks"):
        apply_memory_options(copy.deepcopy(base), activation_offload=False, block_swap=3, device="cpu")


class _Allocations(TorchDispatchMode):
    """The storages of the tensors factory ops make, by the device the call asked for (``to_empty``
    passes its device; the host copies ask for none)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_device: dict[str, set[int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        device = (kwargs or {}).get("device")
        if isinstance(out, torch.Tensor) and device is not None:
            self.by_device.setdefault(str(device), set()).add(out.untyped_storage().data_ptr())
        return out


def test_block_swap_materialises_the_swapped_base_in_host_memory_only(base, want_frozen):
    """``build_parallel_model(..., block_swap=1)`` (meta build, then materialise): the swapped block's
    frozen tensors are allocated as the swap's host copies and filled there from the initial state; only
    the rest is allocated on the device. CPU emulation: the "device" is ``cpu:0``, which ``to_empty``
    passes to its allocations, so a swapped tensor made there is seen (the bug: the whole base sat on the
    device at start-up). Only a GPU shows the device memory saved and the pinned host allocation."""
    arch = get_preset("tiny", depth=2)
    dims = make_dims(ParallelConfig(), 1, arch)
    allocations = _Allocations()
    with allocations:
        model = build_parallel_model(
            arch, dims, None, ParallelConfig(), lambda: copy.deepcopy(base), device=torch.device("cpu", 0),
            prepare=_freeze_blocks, block_swap=1,
        )  # fmt: skip
    on_device = allocations.by_device["cpu:0"]
    swap = memory_options(model).swap
    host = swap.blocks[0].host
    frozen = dict(model.blocks[1].named_parameters())
    assert host.keys() == frozen.keys() and len(host) > 0
    for name, p in frozen.items():
        storage = p.untyped_storage().data_ptr()
        assert storage == host[name].untyped_storage().data_ptr() and storage not in on_device, name
        assert torch.equal(p, base.get_parameter(f"blocks.1.{name}")), name  # filled from the initial state
    rest = [n for n, _ in model.named_parameters() if not n.startswith("blocks.1.")]
    assert all(model.get_parameter(n).untyped_storage().data_ptr() in on_device for n in rest)
    got = _grads(model)
    assert got.keys() == want_frozen.keys() and all(torch.equal(got[n], want_frozen[n]) for n in got)
    assert all(
        p.untyped_storage().data_ptr() == host[n].untyped_storage().data_ptr() for n, p in frozen.items()
    )
