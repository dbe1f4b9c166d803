"""Tensor parallelism with DTensor: :mod:`parallel.tp_plan`'s plan translated into DTensor styles.

``column`` and ``row`` linears become ``ColwiseParallel``/``RowwiseParallel`` (one all-reduce per
sub-layer). The per-head qk RMSNorm runs on the local heads: its weight is a replicated DTensor whose
input is sharded along the head axis (``SequenceParallel(sequence_dim=2)``), so DTensor sums its
gradient over the ranks. The across-heads qk RMSNorm (:class:`AcrossHeadsNormParallel`) runs on them
too, with its weight sharded like the heads and one all-reduce of each token's sum of squares. LTX's
RoPE tables, which have a head axis, reach each self-attention cut to its heads
(:mod:`parallel.rope_heads`). The LayerNorms of the block carry no parameters (adaLN supplies scale and
shift) and run on the replicated residual stream.

Everything outside the sharded kinds (patch and timestep embeddings, modulation, caption projection, the
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
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.utils._pytree import tree_map

from parallel.across_heads import TPSumSquares
from parallel.rope_heads import cut_rope_heads

# check_tp is the shared shape check, imported from here by parallel.parallelize
from parallel.tp_plan import (
    ACROSS_HEADS_NORM,
    COLUMN,
    HEAD_NORM,
    RESIDUAL_INPUT,
    RESIDUAL_LINEAR,
    RESIDUAL_NORM,
    ROW,
    check_tp,
    check_tp_weights,
    resolve_plan,
)


class ReplicateParallel(ParallelStyle):
    """A module whose parameters are ``Replicate`` DTensors but which computes on this rank's plain
    tensors: inputs are wrapped as replicated DTensors (no communication), outputs unwrapped.

    For modules whose inputs, and whose outputs' gradients, are already the same on every rank of
    the mesh: the gradient each rank computes is then the whole gradient, and the unwrapping declares
    it replicated, so DTensor sums nothing (torchtitan's ``NoParallel``).
    """

    def __init__(self, hooks: bool = True):
        super().__init__()
        self.hooks = hooks  # False inside a replicated module: its forward passes DTensors in and out

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
        if not self.hooks:
            return module
        module.register_forward_pre_hook(pre, with_kwargs=True)
        module.register_forward_hook(lambda mod, args, out: tree_map(unwrap, out))
        return module


class AcrossHeadsNormParallel(ParallelStyle):
    """An :class:`dit.layers.AcrossHeadsRMSNorm` on this rank's heads (:mod:`parallel.across_heads`).

    Its (D,) weight becomes a ``Shard(0)`` DTensor (this rank's heads' rows, as ``ColwiseParallel`` cuts
    the q/k output features), its B×N×H/tp×Dh input a DTensor sharded on the head axis, and its
    ``sum_squares`` hook a :class:`~parallel.across_heads.TPSumSquares` (one all-reduce of B×N floats).
    The module's forward runs on these DTensors: the weight's view to H×Dh keeps the shard on the head
    axis, so each rank scales its heads by its rows and the weight's gradient is local, as DTensor
    sees it. Output: this rank's heads as a plain tensor, as the attention core expects.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def shard_weight(name: str, mod: nn.Module, mesh: DeviceMesh) -> None:
            if mod is module:  # the hook below holds no parameters
                w = distribute_tensor(mod.weight, mesh, [Shard(0)])
                mod.register_parameter("weight", nn.Parameter(w, requires_grad=mod.weight.requires_grad))

        def heads(mod: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
            x = inputs[0]  # B, N, H/tp, Dh
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, mesh, [Shard(2)], run_check=False)
            return (x, *inputs[1:])

        def local(mod: nn.Module, out: DTensor, mesh: DeviceMesh) -> Tensor:
            return out.to_local()  # B, N, H/tp, Dh

        distribute_module(module, device_mesh, shard_weight, heads, local)
        module.sum_squares = TPSumSquares(device_mesh.get_group(), device_mesh)
        return module


class GatherResidualInput(ParallelStyle):
    """A sub-layer whose first input is the residual stream cut along the sequence (B×N/tp×D):
    all-gathered to the whole sequence as a replicated DTensor, kept a DTensor so its backward
    reduce-scatters. Its other inputs (grid and rope, or the caption) pass untouched, whatever their
    number (torch's ``PrepareModuleInput`` would need a layout for each positional input)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def pre(mod: nn.Module, args: tuple) -> tuple:
            if not args or not isinstance(args[0], Tensor):
                raise TypeError(f"{type(mod).__name__}: sequence parallelism needs the residual stream first")
            x = args[0]
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, device_mesh, [Shard(1)], run_check=False)
            return (x.redistribute(device_mesh, [Replicate()]), *args[1:])

        module.register_forward_pre_hook(pre)
        return module


def tp_plan(model: nn.Module, sequence_parallel: bool = False) -> dict[str, ParallelStyle]:
    """Module name → DTensor style for every module of ``model``'s plan (:mod:`parallel.tp_plan`).

    With ``sequence_parallel`` the residual stream arrives cut along the sequence (B×N/tp×D, see
    :func:`parallel.context.apply_sequence_cut`): each sub-layer all-gathers its input and its
    row-wise output reduce-scatters back to the cut instead of all-reducing; an affine norm on the
    cut stream sums its weight's gradient over the tp ranks. A linear wrapped by peft's LoRA is planned
    through its parts (:mod:`parallel.tp_plan`).

    Args:
        model: a :class:`dit.model.SpacetimeDiT` (meta device fine).
        sequence_parallel: ``parallel.sequence_parallel``.
    """
    seq = Shard(1) if sequence_parallel else Replicate()
    styles: dict[str, ParallelStyle] = {}
    for name, kind in resolve_plan(model).items():
        if kind == COLUMN:
            styles[name] = ColwiseParallel()
        elif kind == ROW:
            styles[name] = RowwiseParallel(output_layouts=seq)
        elif kind == HEAD_NORM:  # B, N, H/tp, Dh: sharded on the head axis
            styles[name] = SequenceParallel(sequence_dim=2, use_local_output=True)
        elif kind == ACROSS_HEADS_NORM:  # B, N, H/tp, Dh and the weight rows of those heads
            styles[name] = AcrossHeadsNormParallel()
        elif kind == RESIDUAL_INPUT:
            if sequence_parallel:
                styles[name] = GatherResidualInput()
        elif kind in (RESIDUAL_NORM, RESIDUAL_LINEAR) and sequence_parallel:
            # affine LayerNorm (or a row linear's LoRA B) on a sequence chunk: a replicated DTensor
            # weight sums its gradient over the tp ranks
            styles[name] = SequenceParallel(use_local_output=True)
        else:  # replicate, or a residual norm on the whole (replicated) stream
            # inside a replicated module (text_proj holds its position table next to fc1/fc2) a child
            # computes on the DTensors its parent's forward hands it and returns DTensors: unwrapped,
            # its output would meet the parent's own DTensor parameter as a plain tensor
            inside = any(
                name.startswith(f"{o}.") and isinstance(s, ReplicateParallel) for o, s in styles.items()
            )
            styles[name] = ReplicateParallel(hooks=not inside)
    return styles


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = False) -> None:
    """Shard ``model``'s blocks over ``tp_mesh`` in place (works on the meta device); every other
    parameter becomes a replicated DTensor on the same mesh (see the module docstring).

    Args:
        model: a :class:`dit.model.SpacetimeDiT`.
        tp_mesh: the 1-D tensor-parallel mesh.
        sequence_parallel: ``parallel.sequence_parallel`` (the residual stream is cut along the sequence).
    """
    check_tp(model.cfg, tp_mesh.size())
    check_tp_weights(model, tp_mesh.size())
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}  # init.freeze
    parallelize_module(model, tp_mesh, tp_plan(model, sequence_parallel))
    cut_rope_heads(model, tp_mesh.get_local_rank(), tp_mesh.size())  # rope_ltx: this rank's heads
    # torch's styles register new nn.Parameters, trainable whatever the old ones were
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
