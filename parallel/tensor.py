"""Tensor parallelism with DTensor: a plan keyed by module name (names in ``dit/layers.py`` are API).

Megatron's split: q/k/v, the MLP input (and SwiGLU gate) column-wise, so each rank holds whole heads
and a slice of the hidden units; the attention output and MLP output row-wise, ending in one
all-reduce per sub-layer. The per-head qk RMSNorm runs on the local heads: its weight is a replicated
DTensor whose input is sharded along the head axis (``SequenceParallel(sequence_dim=2)``), so DTensor
sums its gradient over the ranks. The LayerNorms of the block carry no parameters (adaLN supplies
scale and shift) and run on the replicated residual stream.

Everything not in the plan (patch and timestep embeddings, modulation, caption projection, the
final layer) is replicated: its inputs and output gradients are identical on every tensor-parallel
rank, so its gradients are too. Its parameters become ``Replicate`` DTensors on the same mesh
(:class:`ReplicateParallel`), so that every parameter of the model is a DTensor: a fused or foreach
optimizer step (one kernel over a list of tensors) refuses a list that mixes DTensors and plain
tensors, and with FSDP all of them then shard over the same 2-D (dp, tp) mesh. These modules still
compute on plain tensors; their gradients, already whole on every rank, are taken as they are: no
collective is added, so nothing is summed twice.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.utils._pytree import tree_map


class ReplicateParallel(ParallelStyle):
    """A module whose parameters are ``Replicate`` DTensors but which computes on this rank's plain
    tensors: inputs are wrapped as replicated DTensors (no communication), outputs unwrapped.

    For modules whose inputs, and whose outputs' gradients, are already the same on every rank of
    the mesh: the gradient each rank computes is then the whole gradient, and the unwrapping declares
    it replicated, so DTensor sums nothing (torchtitan's ``NoParallel``).
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def wrap(t):
            if isinstance(t, Tensor) and not isinstance(t, DTensor):
                return DTensor.from_local(t, device_mesh, [Replicate()], run_check=False)
            return t

        def unwrap(t):
            return t.to_local(grad_placements=[Replicate()]) if isinstance(t, DTensor) else t

        def pre(mod: nn.Module, args: tuple, kwargs: dict) -> tuple:
            return tree_map(wrap, args), tree_map(wrap, kwargs)

        # default partition_fn: every parameter of the module becomes a Replicate DTensor
        distribute_module(module, device_mesh)
        module.register_forward_pre_hook(pre, with_kwargs=True)
        module.register_forward_hook(lambda mod, args, out: tree_map(unwrap, out))
        return module


def replicate_plan(model: nn.Module, plan: dict[str, ParallelStyle]) -> dict[str, ParallelStyle]:
    """:class:`ReplicateParallel` for every module outside ``plan`` (and outside the modules it
    names) that holds parameters of its own: the leaves of the embeddings, modulation and final layer."""
    plan_names = tuple(plan)
    out: dict[str, ParallelStyle] = {}
    for name, module in model.named_modules():
        covered = any(name == p or name.startswith(p + ".") for p in plan_names)
        if not covered and any(True for _ in module.parameters(recurse=False)):
            out[name] = ReplicateParallel()
    return out


def tp_plan(model: nn.Module, sequence_parallel: bool = False) -> dict[str, ParallelStyle]:
    """Module name → DTensor style for every block of ``model``.

    With ``sequence_parallel`` the residual stream arrives cut along the sequence (B×N/tp×D, see
    :func:`parallel.context.apply_sequence_cut`): each sub-layer all-gathers its input and its
    row-wise output reduce-scatters back to the cut instead of all-reducing.
    """
    seq = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, ParallelStyle] = {}
    for i, block in enumerate(model.blocks):
        attns = ["attn"] + (["cross_attn"] if block.cross_attn is not None else [])
        for a in attns:
            if sequence_parallel:  # the input stays a DTensor so the backward reduce-scatters
                rest = (None, None)  # (grid, rope) or (context, context_mask)
                plan[f"blocks.{i}.{a}"] = PrepareModuleInput(
                    input_layouts=(Shard(1), *rest), desired_input_layouts=(Replicate(), *rest)
                )
            for name in ("q", "k", "v"):
                plan[f"blocks.{i}.{a}.{name}"] = ColwiseParallel()
            plan[f"blocks.{i}.{a}.o"] = RowwiseParallel(output_layouts=seq)
            if isinstance(getattr(block, a).norm_q, nn.RMSNorm):
                for norm in ("norm_q", "norm_k"):  # B, N, H/tp, Dh: sharded on the head axis
                    plan[f"blocks.{i}.{a}.{norm}"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        if sequence_parallel and isinstance(getattr(block, "norm_cross", None), nn.LayerNorm):
            # affine LayerNorm on a sequence chunk: a replicated DTensor weight sums its gradient
            plan[f"blocks.{i}.norm_cross"] = SequenceParallel(use_local_output=True)
        if sequence_parallel:
            plan[f"blocks.{i}.mlp"] = PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
            )
        plan[f"blocks.{i}.mlp.fc1"] = ColwiseParallel()
        if block.mlp.gate is not None:
            plan[f"blocks.{i}.mlp.gate"] = ColwiseParallel()
        plan[f"blocks.{i}.mlp.fc2"] = RowwiseParallel(output_layouts=seq)
    return plan


def check_tp(cfg, tp: int) -> None:
    """Clear errors for shapes that do not split over ``tp`` ranks."""
    if cfg.num_heads % tp:
        raise ValueError(f"parallel.tp={tp} must divide model.arch.num_heads={cfg.num_heads}")
    if cfg.ffn_hidden % tp:
        raise ValueError(f"parallel.tp={tp} must divide the MLP width {cfg.ffn_hidden} (model.arch.ffn_dim)")


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = False) -> None:
    """Shard ``model``'s blocks over ``tp_mesh`` in place (works on the meta device); every other
    parameter becomes a replicated DTensor on the same mesh (see the module docstring)."""
    check_tp(model.cfg, tp_mesh.size())
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}  # init.freeze
    plan = tp_plan(model, sequence_parallel)
    parallelize_module(model, tp_mesh, plan | replicate_plan(model, plan))
    # torch's styles register new nn.Parameters, trainable whatever the old ones were
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
