"""Apply parallelism to a plain SpacetimeDiT from outside, in docs/design.md §4's fixed order.

tensor parallel → sequence cut (context and sequence parallel hooks) → activation checkpointing →
memory options (activation offload, block swap: :mod:`parallel.offload`) → per-block torch.compile →
FSDP2 ``fully_shard`` per block and at the root (HSDP over dp_replicate × (dp_shard · cp)). A model
with peft LoRA adapters (``finetune.lora``, injected before any of this) goes through the same steps:
the tensor-parallel plan splits its adapters with their linears (:mod:`parallel.tp_plan`), and FSDP2
shards the frozen base and the trainable adapters of a block together (it needs one dtype among the
trainable parameters only, so a bf16-stored base next to fp32 adapters is fine). The model is
built on the meta device and only materialised afterwards, so no rank ever holds a full copy, except
rank 0 while it makes the initial weights (see :func:`materialize`). :func:`build_parallel_model` does
all of it, for the FSDP engine (``launch.engine``), the benchmarks and the parity tests alike.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from dit.config import DiTConfig
from dit.embeddings import Fp32Linear, LearnedPos3D
from dit.layers import AcrossHeadsRMSNorm, Fp32LayerNorm, TableModulation
from dit.model import SpacetimeDiT
from parallel.config import ParallelConfig, checkpoint_every, is_selective
from parallel.context import apply_sequence_cut, check_cp_degrees
from parallel.dims import ParallelDims
from parallel.offload import apply_memory_options, memory_options
from parallel.tensor import apply_tensor_parallel, check_tp


def make_dims(pcfg: ParallelConfig, world: int, arch) -> ParallelDims:
    """Resolve ``pcfg`` against the world size and the architecture (head splits), with errors
    naming the config field."""
    check_tp(arch, pcfg.tp)
    cp_ring = check_cp_degrees(pcfg.cp, pcfg.cp_ring, arch.num_heads, pcfg.tp)
    return ParallelDims(pcfg.dp_replicate, pcfg.dp_shard, pcfg.cp, pcfg.tp, world, cp_ring=cp_ring)


def parallelize(
    model: nn.Module,
    dims: ParallelDims,
    mesh: DeviceMesh | None,
    pcfg: ParallelConfig,
    bf16: bool = False,
    *,
    block_swap: int = 0,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Apply every enabled kind of parallelism to ``model`` in place (meta or materialised).

    Args:
        dims, mesh: from :class:`ParallelDims` (mesh None: one process).
        pcfg: activation checkpointing and offload, compile and FSDP offload choices.
        bf16: FSDP keeps bf16 copies of the parameters for compute and reduces gradients in fp32 (CUDA).
        block_swap: ``finetune.block_swap``: the last this many blocks' frozen weights live in host memory
            (:func:`parallel.offload.apply_memory_options`); one process without tensor parallelism.
        device: where the model computes (the memory options' copies); default: where its parameters
            are, CUDA's current device for a meta model when CUDA is there.
    """
    if pcfg.cpu_offload and not torch.cuda.is_available():
        raise ValueError(
            "parallel.cpu_offload moves FSDP shards between a GPU and host memory: it needs CUDA"
        )
    check_block_swap(block_swap, dims)
    sp = dims.tp > 1 and pcfg.sequence_parallel
    if dims.tp > 1:
        apply_tensor_parallel(model, mesh["tp"], sequence_parallel=sp)
    cut_sequence(model, dims, mesh, sequence_parallel=sp)
    apply_activation_checkpointing(model, pcfg.activation_checkpointing)
    if pcfg.activation_offload or block_swap:
        # hooks that enclose checkpoint's (either order works) and are traced with the block by compile;
        # FSDP's all-gathered weights are parameters, which the offload leaves on the device
        apply_memory_options(
            model,
            activation_offload=pcfg.activation_offload,
            block_swap=block_swap,
            device=device if device is not None else _compute_device(model),
        )
    if pcfg.compile:
        for block in model.blocks:
            block.compile()
    if dims.dp * dims.cp > 1:
        _shard(model, dims, mesh, bf16, pcfg.cpu_offload)
    return model


def check_block_swap(block_swap: int, dims: ParallelDims) -> None:
    """A ValueError naming the keys unless ``finetune.block_swap`` can run on this layout: it moves whole
    blocks' weights between host and device, so FSDP (which owns the shards and gathers them) and
    tensor parallelism (DTensor slices) are out; one process only."""
    if block_swap and dims.world > 1:
        raise ValueError(
            f"finetune.block_swap={block_swap} swaps whole blocks on one process, but the layout has "
            f"{dims.world} ranks (parallel.dp_replicate={dims.dp_replicate}, parallel.dp_shard="
            f"{dims.dp_shard}, parallel.cp={dims.cp}, parallel.tp={dims.tp}): with FSDP use "
            "parallel.cpu_offload instead, or set finetune.block_swap=0"
        )


def _compute_device(model: nn.Module) -> torch.device:
    p = next(model.parameters())
    if p.is_meta:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else p.device
    return p.device


def build_parallel_model(
    arch: DiTConfig,
    dims: ParallelDims,
    mesh: DeviceMesh | None,
    pcfg: ParallelConfig,
    init_fn: Callable[[], nn.Module],
    *,
    device: torch.device | str = "cpu",
    bf16: bool = False,
    prepare: Callable[[nn.Module], object] | None = None,
    block_swap: int = 0,
) -> nn.Module:
    """A SpacetimeDiT under ``pcfg``'s layout, holding ``init_fn()``'s weights: built on meta,
    parallelized (:func:`parallelize`), then materialised (:func:`materialize`).

    Args:
        arch: the architecture (``model.arch``).
        dims, mesh: the layout, from :func:`make_dims` and ``dims.build_mesh`` (mesh None: one process).
        pcfg: the ``parallel`` section (checkpointing, compile, offload, sequence parallelism).
        init_fn: builds the full initial model on CPU (called on rank 0 only with several processes).
        device: where the shards live (host memory under ``parallel.cpu_offload``).
        bf16: FSDP mixed precision (bf16 compute copies, fp32 reduction); the trainer asks for it on CUDA.
        prepare: runs on the meta model before any parallelism, e.g. freezing parameters (FSDP2
            groups parameters by ``requires_grad`` when it shards) or injecting LoRA adapters
            (``launch.lora.apply_lora``: the same names as ``init_fn``'s model).
        block_swap: ``finetune.block_swap`` (see :func:`parallelize`).
    """
    with torch.device("meta"):
        model = SpacetimeDiT(arch)
    if prepare is not None:
        prepare(model)
    parallelize(model, dims, mesh, pcfg, bf16, block_swap=block_swap, device=device)
    materialize(model, torch.device(device), mesh, init_fn, offload=pcfg.cpu_offload)
    return model


def cut_sequence(
    model: nn.Module, dims: ParallelDims, mesh: DeviceMesh | None, sequence_parallel: bool = False
) -> None:
    """The sequence cut of both engines: context parallelism over ``mesh["cp"]`` (Ulysses and ring
    parts) and, with ``sequence_parallel``, the tensor-parallel ranks' share of the sequence; nothing
    when neither is on."""
    if dims.cp == 1 and not sequence_parallel:
        return
    apply_sequence_cut(
        model,
        cp_group=mesh["cp"].get_group() if dims.cp > 1 else None,
        ulysses_group=mesh["cp_ulysses"].get_group() if dims.cp_ulysses > 1 else None,
        ring_group=mesh["cp_ring"].get_group() if dims.cp_ring > 1 else None,
        sp_group=mesh["tp"].get_group() if sequence_parallel else None,
    )


def _attention_ops() -> set:
    """The attention kernels whose outputs (and log-sum-exp) selective checkpointing keeps: every
    fused SDPA kernel (torch's own and the CPU one, also called by :mod:`parallel.ring`) and the
    ``flash_attn`` packages' ops when they are installed and registered as torch ops. Resolved when
    used, after :mod:`dit.attention` has imported flash-attn. A kernel not registered as a torch op
    (an old flash-attn build) is invisible to the policy and recomputed, as under ``full``."""
    aten = torch.ops.aten
    names = (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable",
        "_flash_attention_forward",
        "_efficient_attention_forward",
    )
    ops = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    for namespace, name in (("flash_attn", "_flash_attn_forward"), ("flash_attn_3", "fwd")):
        packet = getattr(getattr(torch.ops, namespace), name, None)  # None unless registered
        if packet is not None:
            ops.update(getattr(packet, o) for o in packet.overloads())
    return ops


def _selective_context(ops: set):
    """``context_fn`` for checkpoint: keep the outputs of ``ops``, recompute everything else."""

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in ops else CheckpointPolicy.PREFER_RECOMPUTE

    return functools.partial(create_selective_checkpoint_contexts, policy)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Checkpoint ``model.blocks`` as ``parallel.activation_checkpointing`` says (in place).

    torch's composable ``checkpoint`` (module hooks, no wrapper), so parameter names and checkpoint
    keys are those of the plain model. ``selective`` checkpoints every block with a policy that keeps
    the attention kernels' outputs and log-sum-exp (:func:`_attention_ops`): the backward recomputes
    the linears, norms and element-wise work of the block, not attention, the dominant cost of long
    sequences. Call it after tensor and context parallelism (the recomputed forward includes their
    hooks and collectives) and before ``torch.compile`` and FSDP.

    Args:
        model: a SpacetimeDiT (anything with ``.blocks``).
        mode: ``none``, ``full``, ``every_K`` or ``selective``.
    """
    every = checkpoint_every(mode)
    kwargs = {"context_fn": _selective_context(_attention_ops())} if is_selective(mode) else {}
    for i, block in enumerate(model.blocks):
        if every and i % every == 0:
            checkpoint(block, **kwargs)


def _shard(model: nn.Module, dims: ParallelDims, mesh: DeviceMesh, bf16: bool, offload: bool) -> None:
    # cp ranks hold the same parameters and partial gradients (their tokens), so FSDP shards over
    # them too and its reduce-scatter sums the partial gradients (torchtitan's dp_shard_cp)
    dp_mesh = mesh["dp_replicate", "dp_shard_cp"] if dims.dp_replicate > 1 else mesh["dp_shard_cp"]
    kwargs: dict = {"mesh": dp_mesh}
    if bf16:
        # cast_forward_inputs=False: the diffusion time (0…1000), fps and RoPE tables must reach the
        # model in fp32 as they do on one GPU (bf16 rounds t=999.3 to 1000); autocast casts the matmuls
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    # what the model computes in fp32 whatever autocast says is gathered in fp32: one GPU uses these
    # weights unrounded, so N GPUs must too (one extra group per block, and one at the root)
    full = MixedPrecisionPolicy(torch.float32, torch.float32, cast_forward_inputs=False)
    fp32 = kwargs | {"mp_policy": full}
    for block in model.blocks:
        if bf16 and (group := fp32_compute_modules(block)):
            fully_shard(group, **fp32)
        fully_shard(block, **kwargs)
    if bf16 and (group := fp32_compute_modules(model, skip=model.blocks)):
        fully_shard(group, **fp32)
    fully_shard(model, **kwargs)


# Modules whose parameters enter fp32 arithmetic under bf16 autocast: the fp32 layers of dit/ (time
# embedding, modulation, output head, the affine cross-attention norm), the adaLN tables and learned
# positions added to the fp32 residual, and the qk RMSNorms (CUDA autocast runs nn.RMSNorm in fp32;
# AcrossHeadsRMSNorm computes in fp32 itself)
FP32_COMPUTE = (Fp32Linear, Fp32LayerNorm, TableModulation, LearnedPos3D, nn.RMSNorm, AcrossHeadsRMSNorm)


def fp32_compute_modules(root: nn.Module, skip: nn.Module | None = None) -> list[nn.Module]:
    """The :data:`FP32_COMPUTE` modules with parameters under ``root``, outside ``skip``."""
    inside = set(skip.modules()) if skip is not None else set()
    return [
        m
        for m in root.modules()
        if isinstance(m, FP32_COMPUTE) and m not in inside and any(True for _ in m.parameters(recurse=False))
    ]


def reshard(model: nn.Module) -> None:
    """Free every gathered FSDP2 parameter of ``model`` (no-op without FSDP).

    Call after forwards that have no backward (validation, samples): FSDP2 keeps the root's
    parameters gathered after a forward, for the backward it expects. Left so, the next forward
    reuses them, even after the shards were changed in between (an EMA swapped in and out): the
    training step would run on the EMA's root weights.
    """
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def materialize(
    model: nn.Module,
    device: torch.device,
    mesh: DeviceMesh | None,
    reference: Callable[[], nn.Module],
    offload: bool = False,
) -> None:
    """Allocate ``model``'s (sharded) parameters on ``device`` and fill them with the initial weights.

    ``reference()`` builds the full initialised model on CPU (``init_weights`` with the job's seed, plus
    any ``init.from`` weights). With several processes only rank 0 calls it, and its state dict is
    broadcast into every rank's shards: the initial weights are then the same bits whatever the
    layout, which is what makes every parallel mode comparable to one process (DTensor's own random
    initialisation is layout-dependent on CPU).

    Under block swap (``finetune.block_swap``, :func:`parallel.offload.apply_memory_options` installed by
    :func:`parallelize`) the swapped blocks' frozen tensors are allocated in (pinned) host memory and
    filled there; only the rest is allocated on ``device``, so the start-up peak is not the whole base.
    """
    target = torch.device("cpu") if offload else device  # FSDP2 offload keeps shards in host memory
    options = memory_options(model)
    on_host = options.swap.allocate_host() if options is not None and options.swap is not None else []
    if on_host:
        _to_empty_except(model, target, {id(t) for t in on_host})
    else:
        model.to_empty(device=target)
    if mesh is None:
        model.load_state_dict(reference().state_dict())
        return
    rank0 = torch.distributed.get_rank() == 0
    full = reference().state_dict() if rank0 else {}
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full, options=opts)


def _to_empty_except(model: nn.Module, device: torch.device, keep: set[int]) -> None:
    """``model.to_empty(device=device)`` (the same ``_apply``) for every parameter and buffer but those
    whose ``id`` is in ``keep`` (already materialised elsewhere: the swapped blocks' host copies)."""
    model._apply(lambda t: t if id(t) in keep else torch.empty_like(t, device=device))
