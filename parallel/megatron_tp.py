"""Tensor parallelism with megatron-core's linears, swapped into an initialised model from outside.

:mod:`parallel.tp_plan`'s plan, the one :mod:`parallel.tensor` translates into DTensor styles, here
translated into modules: ``column`` and ``row`` linears become megatron's column/row-parallel linears
(one all-reduce per sub-layer), ``head_norm`` a qk RMSNorm summing its weight's gradient over the tp
group, ``across_heads_norm`` the across-heads qk RMSNorm on this rank's heads (its weight's rows of
those heads, one all-reduce of each token's sum of squares: :mod:`parallel.across_heads`); LTX's
per-head RoPE tables reach each self-attention cut to its heads (:mod:`parallel.rope_heads`). Everything
else stays a plain replicated module. A linear wrapped by peft's LoRA is replaced part by part (its base
and the split adapter; :mod:`parallel.tp_plan`), frozen weights staying frozen.
This path serves ``parallel.engine=deepspeed``: ZeRO partitions plain tensors and learns which are
tensor-parallel slices from megatron's parameter attributes and :class:`parallel.zero.DeepSpeedGroups`.

What megatron-core 0.16 needs, found on this machine (CPU, gloo):

- ``ColumnParallelLinear``/``RowParallelLinear`` take an explicit ``tp_group``; with it,
  ``megatron.core.parallel_state`` is never initialised and no module-level group is created
  (``get_tensor_model_parallel_group_if_none`` passes the group through).
- ``use_cpu_initialization=True`` allocates on the CPU without touching CUDA. With
  ``perform_initialization=False`` megatron leaves the weight uninitialised *and* without its
  ``tensor_model_parallel``/``partition_dim`` attributes (they are set by its init helper), so they
  are set here: DeepSpeed's gradient norm counts a parameter on every tp rank only if it carries them.
- Its weight-gradient path flattens 3-D inputs only (B×N×D here, as every planned linear sees).
  On CPU it warns that ``CUDA_DEVICE_MAX_CONNECTIONS`` should be 1; that orders its asynchronous
  all-reduce before the weight-gradient GEMM on a GPU (overlap, not correctness).
- Megatron sequence parallelism all-gathers and reduce-scatters along dim 0 of ``[s, b, h]``
  activations and allocates with ``torch.cuda.current_device()``. The DiT's activations are
  B×N×D, so dim 0 is the batch; it is refused here (use ``parallel.engine=fsdp`` for SP).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from torch import Tensor, nn

from dit.layers import AcrossHeadsRMSNorm
from parallel.across_heads import TPSumSquares
from parallel.collectives import group_rank, group_size, sum_grad
from parallel.rope_heads import cut_rope_heads
from parallel.tp_plan import (
    ACROSS_HEADS_NORM,
    COLUMN,
    HEAD_NORM,
    ROW,
    check_tp,
    check_tp_weights,
    resolve_plan,
)


def _no_init(weight: Tensor) -> None:
    """Megatron wants an init method; the weights are copied from the full model instead."""


class _Plain:
    """Mixin for megatron linears: plain-tensor output and ``nn.Linear``'s state-dict keys.

    Megatron returns ``(output, bias)`` and stores an ``_extra_state`` entry (for Transformer
    Engine) plus a load pre-hook that inserts one; both would change our checkpoint key set.
    """

    # torch writes ``_extra_state`` only when a class overrides these two
    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def _drop_extra_state_hook(self) -> None:
        self._load_state_dict_pre_hooks.clear()

    @torch.no_grad()
    def _copy_from(self, full: nn.Linear, tp_group, weight_dim: int, bias_split: bool) -> None:
        """This rank's slice of the full weight along ``weight_dim``; the bias sliced or whole."""
        n, r = group_size(tp_group), group_rank(tp_group)
        self.weight.copy_(full.weight.chunk(n, dim=weight_dim)[r])
        if full.bias is not None:
            self.bias.copy_(full.bias.chunk(n, dim=0)[r] if bias_split else full.bias)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = super().forward(x)  # bias already added (skip_bias_add=False)
        return out


class TPColumnLinear(_Plain, ColumnParallelLinear):
    """``ColumnParallelLinear(gather_output=False)`` returning a tensor: this rank's output slice."""

    def __init__(self, full: nn.Linear, config: ModelParallelConfig, tp_group: dist.ProcessGroup):
        super().__init__(
            full.in_features, full.out_features, config=config, init_method=_no_init,
            bias=full.bias is not None, gather_output=False, skip_bias_add=False, tp_group=tp_group,
        )  # fmt: skip
        self._drop_extra_state_hook()
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1)
        self._copy_from(full, tp_group, weight_dim=0, bias_split=True)


class TPRowLinear(_Plain, RowParallelLinear):
    """``RowParallelLinear(input_is_parallel=True)`` returning a tensor: the all-reduced output.
    Its bias is replicated (added after the all-reduce), so it keeps no tp attributes."""

    def __init__(self, full: nn.Linear, config: ModelParallelConfig, tp_group: dist.ProcessGroup):
        super().__init__(
            full.in_features, full.out_features, config=config, init_method=_no_init,
            bias=full.bias is not None, input_is_parallel=True, skip_bias_add=False, tp_group=tp_group,
        )  # fmt: skip
        self._drop_extra_state_hook()
        set_tensor_model_parallel_attributes(self.weight, True, 1, 1)
        self._copy_from(full, tp_group, weight_dim=1, bias_split=False)


class TPHeadRMSNorm(nn.RMSNorm):
    """Per-head qk RMSNorm on this rank's heads. The weight (head_dim) is replicated but each rank
    only sees its own heads, so its gradient is partial: :func:`parallel.collectives.sum_grad`
    sums it over the tp group inside backward.

    Summing inside autograd rather than after ``backward()``: under ZeRO-2/3 DeepSpeed reduces each
    gradient over data parallel ranks from a hook as soon as it is accumulated and then frees
    ``p.grad``, so there is no "after backward" at which a tp sum could still be applied.
    """

    def __init__(self, full: nn.RMSNorm, tp_group: dist.ProcessGroup):
        w = full.weight
        super().__init__(full.normalized_shape, eps=full.eps, device=w.device, dtype=w.dtype)
        self.tp_group = tp_group
        with torch.no_grad():
            self.weight.copy_(w)

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.normalized_shape, sum_grad(self.weight, self.tp_group), self.eps)


class TPAcrossHeadsRMSNorm(AcrossHeadsRMSNorm):
    """The across-heads qk RMSNorm on this rank's heads: the rows of the (D,) weight for those heads
    (a tensor-parallel slice along dim 0, like the q/k projection's output features; its gradient is
    whole on each rank) and a :class:`~parallel.across_heads.TPSumSquares` hook. The width it divides
    by stays the whole D; the forward is the model's own."""

    def __init__(self, full: AcrossHeadsRMSNorm, tp_group: dist.ProcessGroup):
        w = full.weight
        super().__init__(full.dim, eps=full.eps)
        n, r = group_size(tp_group), group_rank(tp_group)
        self.weight = nn.Parameter(w.detach().chunk(n, dim=0)[r].clone(), requires_grad=w.requires_grad)
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1)
        self.sum_squares = TPSumSquares(tp_group)


# the plan's sharded kinds → the module that replaces a planned one; every other kind stays a plain
# replicated module (sequence parallelism, the only use of residual_input/residual_norm, is refused)
MEGATRON_MODULES: dict[str, type[nn.Module]] = {
    COLUMN: TPColumnLinear,
    ROW: TPRowLinear,
    HEAD_NORM: TPHeadRMSNorm,
    ACROSS_HEADS_NORM: TPAcrossHeadsRMSNorm,
}


def tp_plan(model: nn.Module) -> dict[str, str]:
    """Module name → ``column``, ``row``, ``head_norm`` or ``across_heads_norm``: the modules of
    ``model`` that :func:`apply_megatron_tp` replaces (:mod:`parallel.tp_plan`'s plan, sharded kinds
    only)."""
    return {name: kind for name, kind in resolve_plan(model).items() if kind in MEGATRON_MODULES}


def check_megatron_tp(cfg, tp: int, sequence_parallel: bool, device: torch.device) -> None:
    """Clear errors, naming the config field, for what this path cannot do: the shared shape check
    (:func:`parallel.tp_plan.check_tp`), then sequence parallelism, which this path refuses."""
    check_tp(cfg, tp)
    if sequence_parallel and device.type != "cuda":
        raise ValueError(
            "parallel.sequence_parallel=true with parallel.engine=deepspeed: megatron-core's sequence "
            "parallelism needs CUDA (its mappings allocate on torch.cuda.current_device()); set "
            "parallel.sequence_parallel=false"
        )
    if sequence_parallel:
        raise ValueError(
            "parallel.sequence_parallel=true with parallel.engine=deepspeed: megatron-core's sequence "
            "parallelism cuts dim 0 of [s, b, h] activations, and the DiT's are B×N×D; set "
            "parallel.sequence_parallel=false, or use parallel.engine=fsdp for sequence parallelism"
        )


def apply_megatron_tp(
    model: nn.Module, tp_group: dist.ProcessGroup | None, sequence_parallel: bool = False
) -> nn.Module:
    """Replace the planned modules of an initialised full model by their tensor-parallel versions.

    Every rank must hold the same full weights (build them with the same seed); each keeps its slice.
    Parameter names are unchanged (``blocks.0.attn.q.weight`` …), so :func:`tp_plan` names and
    state-dict keys match the single-device model. A group of one rank leaves the model as it is.

    Args:
        model: a :class:`dit.model.SpacetimeDiT` with real (not meta) weights.
        tp_group: the tensor-parallel process group (None: one rank).
        sequence_parallel: megatron sequence parallelism; refused (see :func:`check_megatron_tp`).

    Returns:
        ``model``, changed in place.
    """
    tp = group_size(tp_group)
    device = next(model.parameters()).device
    check_megatron_tp(model.cfg, tp, sequence_parallel, device)
    check_tp_weights(model, tp)
    if tp == 1:
        return model
    for name, kind in tp_plan(model).items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        full, cls = getattr(parent, attr), MEGATRON_MODULES[kind]
        # the qk norms are our own modules, not megatron layers: they take no ModelParallelConfig
        norm = cls in (TPHeadRMSNorm, TPAcrossHeadsRMSNorm)
        new = cls(full, tp_group) if norm else cls(full, _megatron_config(tp, full.weight.dtype), tp_group)
        # megatron's parameters are new and trainable: a frozen weight (init.freeze, LoRA's base) stays
        # frozen (megatron then takes its frozen-weight path: no weight gradient)
        for (_, old), (_, p) in zip(full.named_parameters(), new.named_parameters(), strict=True):
            p.requires_grad_(old.requires_grad)
        setattr(parent, attr, new.to(device))
    cut_rope_heads(model, group_rank(tp_group), tp)  # rope_ltx: this rank's heads of the tables
    return model


def _megatron_config(tp: int, dtype: torch.dtype) -> ModelParallelConfig:
    """Megatron's config for a linear of ``dtype`` (a bf16-stored LoRA base next to fp32 adapters)."""
    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        use_cpu_initialization=True,  # no CUDA call while building; moved to `device` by the caller
        perform_initialization=False,
        params_dtype=dtype,
    )


def is_tp_sharded(p: Tensor) -> bool:
    """Whether ``p`` is a tensor-parallel slice (megatron's attribute, also read by DeepSpeed)."""
    return bool(getattr(p, "tensor_model_parallel", False))


def full_tensor(p: Tensor, tp_group: dist.ProcessGroup | None, like: Tensor | None = None) -> Tensor:
    """The whole tensor of which ``p`` is this rank's slice (``p`` itself if it is replicated).

    A collective over ``tp_group`` for sliced parameters: every tp rank must call it in the same order.

    Args:
        p: a parameter, or a gradient (then pass its parameter as ``like`` for the slicing attributes).
        tp_group: the tensor-parallel group.
        like: where to read ``tensor_model_parallel``/``partition_dim`` from (default: ``p``).
    """
    ref = p if like is None else like
    n = group_size(tp_group)
    if n == 1 or not is_tp_sharded(ref):
        return p.detach()
    parts = [torch.empty_like(p) for _ in range(n)]
    dist.all_gather(parts, p.detach().contiguous(), group=tp_group)
    return torch.cat(parts, dim=ref.partition_dim)


__all__ = [
    "TPColumnLinear",
    "TPRowLinear",
    "TPHeadRMSNorm",
    "TPAcrossHeadsRMSNorm",
    "tp_plan",
    "check_megatron_tp",
    "apply_megatron_tp",
    "is_tp_sharded",
    "full_tensor",
]
