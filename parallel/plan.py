"""Will it fit, and how fast: per-GPU memory and a roofline step time for a layout, before a job runs.

Pure arithmetic over :class:`dit.config.DiTConfig` and :mod:`dit.flops` (no process group, no GPU):
:func:`plan` predicts the peak memory of one GPU by category, the FLOPs and communication bytes of one
optimizer step, and a step time and MFU from a roofline. ``python -m benchmarks.plan`` is the CLI and
``benchmarks/plan_validate.py`` checks the memory model against FSDP2's memory tracker and real runs.

Memory: the peak of one GPU, the largest of early in backward (every saved activation alive, one
block recomputed and differentiated), late in backward (every gradient, the first block's
activations) and the optimizer step. P = parameters this rank holds
after tensor parallelism, S = dp_shard · cp (FSDP's shard degree; dp_replicate holds copies).

- FSDP2 (bf16): fp32 params, Adam m and v, EMA, sharded: 4 + 8 + 4 bytes · P / S. Gradients (fp32,
  sharded) are allocated block by block in backward: at the peak only the final layer's and a
  block's, all of them from the second micro-step on; reduce-scattered every micro-step, so
  grad_accum adds no unsharded gradient. ``fsdp_buffers``: the running block's bf16 weights, the
  prefetched next block's all-gather buffer, the previous block's fp32 reduce-scatter input (2 + 2 + 4
  bytes per block parameter), and the root's bf16 weights, unsharded from forward to backward.
  ``cpu_offload`` moves the sharded states to host memory.
- DeepSpeed (``torch_autocast``: fp32 module weights, bf16 compute): fp32 params (partitioned at
  stage 3), fp32 grads (partitioned at stage ≥ 2), Adam m, v partitioned; ZeRO-1/2 also clone an
  fp32 master partition (ZeRO-3 steps its partitioned module weights).
  Buffers: the reduce bucket (5e8 elements fp32, DeepSpeed's default) at stage ≥ 2, the live gathered
  parameters (two blocks fp32) at stage 3.
- Activations: what autograd saves under bf16 autocast on CUDA, term by term (:func:`block_terms`):
  the residual stream is fp32, LayerNorm and RMSNorm run in fp32 (CUDA autocast's fp32 list),
  ``modulate`` hands q, k and v one bf16 copy, ``gated_residual`` saves the sub-layer output in fp32.
  Context parallel divides tokens by cp; tensor parallel divides heads and the MLP width by tp and,
  with sequence parallelism, the residual stream too. ``full`` keeps each block's fp32 input;
  ``every_K`` does that for blocks 0, K, 2K…; ``selective`` keeps the input and the attention outputs
  with their log-sum-exp. Weight copies saved for backward: autocast's bf16 casts of fp32 weights
  (DeepSpeed, one GPU), in checkpointed blocks only while recomputed. Under FSDP none: the fp32
  layers (timestep embedding, modulation, head) are gathered in fp32 in their own groups, and backward
  keeps the gathered parameter itself.
- Temporaries: one block recomputed in backward (checkpointing) and the working set of its backward
  (:func:`activation_bytes`).
- Not counted: the CUDA context, NCCL and cuBLAS workspaces (:data:`OVERHEAD_GIB`) and the caching
  allocator's fragmentation (:data:`FRAGMENTATION`), both taken off the device before ``fits``.

Time (per GPU, per optimizer step = grad_accum micro-steps):

- Matmuls at :data:`MATMUL_EFF` of the dense bf16 peak (large cuBLAS GEMMs reach 70–85% in
  microbenchmarks; 0.70 on Hopper/Blackwell, whose peak is harder to reach, 0.80 on A100).
- Attention at its own efficiency (:data:`ATTENTION_EFF`, forward and backward: SDPA's FlashAttention-2
  / cuDNN kernels, or FlashAttention-3 with ``attention_backend=flash_attn`` on Hopper); backward counts
  2× the forward FLOPs, the kernel's recompute of QKᵀ is in its lower efficiency.
- Element-wise work from HBM bytes (:func:`elementwise_bytes` per token per block, eager PyTorch, no
  fusion) at :data:`HBM_EFF` of the bandwidth; the optimizer, EMA and clipping likewise.
- Communication: bytes per GPU over the group's link: NVLink when the group's ranks lie within one node
  (``gpus_per_node`` consecutive ranks; mesh order dp_replicate, dp_shard, cp, tp with tp innermost),
  else InfiniBand, at :data:`LINK_EFF`. FSDP's gathers and reduce-scatters overlap compute except the
  first gather and the last reduce-scatter; Ulysses all-to-alls and tensor-parallel collectives are on
  the critical path; ring attention's K/V passes overlap its attention.

LoRA and the memory-lean options (``finetune.*``, ``parallel.activation_offload``): what changes in
the states and activations is in :mod:`parallel.plan_lora`.

These are predictions, validated so far only against FSDP2's fake-tensor memory tracker and CPU runs
(``benchmarks/results/2026-12-01-plan-validation.md``); no GPU has run them. Step times are a roofline
with stated efficiencies, not a measurement.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from dit.config import DiTConfig
from dit.flops import macs_breakdown
from dit.model import block_axes
from parallel.context import check_cp_degrees
from parallel.plan_inputs import (  # noqa: F401  (re-exported: the planner's API)
    ATTENTION_EFF,
    DS_BUCKET,
    FRAGMENTATION,
    GIB,
    GPU,
    GPUS,
    HBM_EFF,
    LINK_EFF,
    MATMUL_EFF,
    OVERHEAD_GIB,
    Layout,
    checkpoint_blocks,
    elementwise_bytes,
)
from parallel.plan_lora import (  # noqa: F401  (BASE_BYTES re-exported: the planner's API)
    BASE_BYTES,
    Finetune,
    adapter_params,
    check_finetune,
    lora_params,
    lora_plan_states,
)

_PARAMS: dict[str, dict[str, int]] = {}


def param_counts(arch: DiTConfig) -> dict[str, int]:
    """Parameters: ``total``, per ``block``, and ``block_tp_split`` (the part tensor parallel divides)."""
    key = repr(arch)
    if key not in _PARAMS:
        _PARAMS[key] = _count_params(arch)
    return _PARAMS[key]


def _count_params(arch: DiTConfig) -> dict[str, int]:
    import torch

    from dit.embeddings import Fp32Linear
    from dit.model import SpacetimeDiT

    with torch.device("meta"):
        model = SpacetimeDiT(arch)
    total = sum(p.numel() for p in model.parameters())
    block = model.blocks[0]
    in_block = sum(p.numel() for p in block.parameters())
    # what tensor parallelism splits (parallel.tensor.tp_plan): q/k/v/fc1/gate weight and bias
    # column-wise, o/fc2 weights row-wise (their biases stay replicated)
    split = 0
    for name, p in block.named_parameters():
        leaf, _, kind = name.rpartition(".")
        if leaf.split(".")[-1] in ("q", "k", "v", "fc1", "gate") or (
            leaf.split(".")[-1] in ("o", "fc2") and kind == "weight"
        ):
            split += p.numel()
    # weights a linear saves for backward (autocast's bf16 copy of an fp32 weight: DeepSpeed, one GPU)
    # when its input needs a gradient: not the first layer of an input path; fp32_* counts the
    # Fp32Linear weights (FSDP's fp32 groups)
    first = ("patch_embed.proj", "text_proj.fc1", "t_embedder.fc1", "fps_embedder.fc1")

    def saved(mod: torch.nn.Module, fp32: bool) -> int:
        return sum(
            m.weight.numel()
            for name, m in mod.named_modules()
            if isinstance(m, torch.nn.Linear) and isinstance(m, Fp32Linear) == fp32 and name not in first
        )

    root = {"fp32": saved(model, True), "cast": saved(model, False)}
    fp32_block, cast_block = saved(block, True), saved(block, False)
    return {
        "total": total,
        "block": in_block,
        "block_tp_split": split,
        "fp32_block": fp32_block,
        "fp32_root": root["fp32"] - arch.depth * fp32_block,
        "cast_block": cast_block,
        "cast_root": root["cast"] - arch.depth * cast_block,
    }


@dataclass(frozen=True)
class _Cut:
    """How this rank's share of one micro-batch is cut."""

    n: int  # tokens of this rank's cp chunk, all samples of the micro-batch: B·N/cp
    ns: int  # residual-stream tokens on this rank: n / tp under sequence parallelism, else n
    l: int  # text tokens of the micro-batch: B·L (0 without text conditioning)
    tp: int
    cp_ulysses: int = 1  # Ulysses degree of the cp split (parallel.context.check_cp_degrees, cp_ring=0)
    cp_ring: int = 1  # ring degree: cp = cp_ulysses · cp_ring


def _qk_norm_bytes(arch: DiTConfig, tokens: int, tp: int) -> int:
    """What one qk norm of ``tokens`` tokens saves on a rank holding 1/``tp`` of the heads, in fp32.

    ``per_head``: the fused RMSNorm's input and one rstd per head. ``across_heads`` (unfused, see
    :class:`dit.layers.AcrossHeadsRMSNorm`): its input, the normalised product the weight multiplies,
    and one rstd per token (whole on every tp rank: the statistic is all-reduced)."""
    d, h = arch.hidden_size, arch.num_heads
    if arch.qk_norm == "per_head":
        return (4 * tokens * d + 4 * tokens * h) // tp
    if arch.qk_norm == "across_heads":
        return 2 * 4 * tokens * d // tp + 4 * tokens
    return 0


def block_terms(arch: DiTConfig, cut: _Cut) -> dict[str, int]:
    """Bytes autograd saves in one block's forward under bf16 autocast on CUDA, by what saves them.

    The residual stream is fp32 (:class:`dit.model.DiTBlock`); LayerNorm and RMSNorm run in fp32
    (CUDA autocast's fp32 list; RMSNorm's fused kernel saves its fp32 input and rstd); ``modulate``
    saves its fp32 LayerNorm output and hands one bf16 copy to q, k and v; ``gated_residual`` saves the
    sub-layer output in fp32.

    Args:
        arch: the architecture.
        cut: this rank's tokens (see :class:`_Cut`).
    """
    n, ns, l, t = cut.n, cut.ns, cut.l, cut.tp
    d, f, h = arch.hidden_size, arch.ffn_hidden, arch.num_heads
    ln = lambda tokens: 4 * tokens * d + 8 * tokens  # noqa: E731  fp32 input + fp32 mean, rstd
    terms = {
        "residual_in": ln(ns),  # norm1's input: the block input (what `full` checkpointing keeps)
        "modulate_attn": 4 * ns * d,  # fp32 LayerNorm output, saved by the × (1 + scale)
        "qkv_in": 2 * n * d,  # the bf16 modulated input (all-gathered over tp under sequence parallelism)
        "qk_norm": 2 * _qk_norm_bytes(arch, n, t),  # fp32 RMSNorm inputs + rstd, for q and k
        "attn_qkv_out": (4 * 2 * n * d + 4 * n * h) // t,  # the kernel's q, k, v, output, fp32 LSE
        "ulysses_out": 2 * n * d // t if cut.cp_ulysses > 1 else 0,  # o's input: all-to-all result
        "gate_attn": 4 * ns * d,  # fp32 attention output, saved by × gate
    }
    if arch.conditioning == "text":
        terms |= {
            "cross_norm_in": ln(ns),
            "cross_q_in": 2 * n * d,
            "cross_q_norm": _qk_norm_bytes(arch, n, t),
            "cross_attn_q_out": (2 * 2 * n * d + 4 * n * h) // t,
            "cross_kv": _qk_norm_bytes(arch, l, t) + 2 * 2 * l * d // t,
            "cross_o_in": 2 * n * d // t,  # output × has-caption mask, a new tensor
        }
    terms |= {
        "mlp_norm_in": ln(ns),
        "modulate_mlp": 4 * ns * d,
        "mlp_in": 2 * n * d,
        "mlp_hidden": (8 if arch.mlp == "swiglu" else 4) * n * f // t,  # gelu in + fc2 in (SwiGLU: four)
        "gate_mlp": 4 * ns * d,
    }
    return terms


def selective_terms(arch: DiTConfig, cut: _Cut) -> dict[str, int]:
    """What ``selective`` checkpointing keeps of a block: its input and each attention's output + LSE."""
    n, t, d, h = cut.n, cut.tp, arch.hidden_size, arch.num_heads
    kept = {"residual_in": 4 * cut.ns * d, "attn_out": (2 * n * d + 4 * n * h) // t}
    if arch.conditioning == "text":
        kept["cross_attn_out"] = (2 * n * d + 4 * n * h) // t
    return kept


def rope_bytes(arch: DiTConfig, tokens: int, batch: int) -> int:
    """The RoPE's cos and sin tables, fp32, saved by every block's rotation: made whole on every rank
    (a cp rank's tokens and a tp rank's heads of them are views). ``rope3d``: N×Dh/2 each, shared by the
    batch. ``rope_ltx``: N×B×H×Dh/2 = N×B×D/2 each (one frame rate per sample, as the trainer passes
    it; LTX rotates the whole inner width)."""
    if arch.pos_embed == "rope3d":
        return 2 * 4 * tokens * arch.head_dim // 2
    if arch.pos_embed == "rope_ltx":
        return 2 * 4 * tokens * batch * arch.hidden_size // 2
    return 0


def outside_terms(arch: DiTConfig, cut: _Cut, batch: int, tokens: int) -> dict[str, int]:
    """Saved bytes outside the blocks: the patch embedding's input (full sequence on every cp rank),
    the RoPE tables (:func:`rope_bytes`), the caption projection and its output (shared by every block's
    k/v), the final layer in fp32 on the cp chunk, the loss."""
    n, d = cut.n, arch.hidden_size
    out_ch = arch.patch_volume * arch.out_ch
    in_ch = (arch.in_channels + arch.cond_channels) * arch.patch_volume
    return {
        "patch_embed_in": 2 * batch * tokens * in_ch,
        "rope": rope_bytes(arch, tokens, batch),
        "text_proj": cut.l * (2 * arch.text_dim + 6 * d) if arch.conditioning == "text" else 0,
        "final_layer": 12 * n * d + 8 * n,  # fp32 norm input, modulate input, linear input
        "loss": batch * tokens * out_ch * (4 + 4),  # gathered fp32 prediction, fp32 difference
    }


def activation_bytes(arch: DiTConfig, cut: _Cut, ac: str, outside: dict[str, int]) -> dict[str, int]:
    """Saved activations at the end of forward (``saved``) and the extra peak of a block's backward
    (``recompute``: the block recomputed under checkpointing; ``working``: its gradient buffers).
    Context-parallel buffers (all-to-all, ring K/V) live in the attention's backward, after the MLP's
    activations are freed, and stay under that peak."""
    kind, n_ckpt = checkpoint_blocks(ac, arch.depth)
    full = block_terms(arch, cut)
    per_block = sum(full.values())
    kept = {"none": per_block, "input": 4 * cut.ns * arch.hidden_size}
    kept["selective"] = sum(selective_terms(arch, cut).values())
    saved = n_ckpt * kept[kind] + (arch.depth - n_ckpt) * per_block + sum(outside.values())
    n, t, d, f = cut.n, cut.tp, arch.hidden_size, arch.ffn_hidden
    # the peak of a block's backward comes in its MLP: the bf16 gradients of the MLP output and hidden
    # layer and of the fc weight (unsharded), while the fp32 residual-stream gradient takes the place of
    # the gated residual's fp32 tensor, already freed (checked against FSDPMemTracker, 14B)
    working = 2 * n * d + 2 * n * f // t + 2 * d * f // t
    out = {"saved": saved, "outside": sum(outside.values()), "per_block": per_block, "working": working}
    return out | {"recompute": per_block - kept[kind] if n_ckpt else 0}


def state_bytes(
    arch: DiTConfig, layout: Layout, engine: str, zero_stage: int, ema: bool, offload: bool
) -> dict[str, int]:
    """Per-GPU bytes of parameters, gradients, optimizer state, EMA and the sharding engine's buffers
    (see the module docstring), and ``host`` bytes moved off the GPU by ``offload``."""
    pc = param_counts(arch)
    t = layout.tp
    block = pc["block"] - pc["block_tp_split"] * (t - 1) // t  # one block's parameters on this tp rank
    root = pc["total"] - arch.depth * pc["block"]  # embeddings, final layer: replicated over tp
    local = arch.depth * block + root
    s = layout.dp_shard * layout.cp  # what FSDP / ZeRO shard over
    if engine == "fsdp" and layout.dp_replicate * s > 1:
        sharded = 4 * local // s
        out = {"params": sharded, "grads": sharded, "optimizer": 2 * sharded, "ema": sharded if ema else 0}
        # the fp32 layers (Fp32Linear's weights here) are their own fp32 FSDP groups
        # (parallel.parallelize._shard): 4 more bytes each of gather, gradient and reduce buffers than
        # bf16; outside the root group they reshard after forward, so only the rest of the root's
        # bf16 weights stay gathered from forward to backward
        out["fsdp_buffers"] = (2 + 2 + 4) * block + 4 * pc["fp32_block"] + 2 * (root - pc["fp32_root"])
        # FSDP's mixed precision hands bf16 (or, to the fp32 layers, fp32) weights to autocast and the
        # fp32 layers: what backward keeps is the gathered parameter itself, no cast copy
        out["casts_block"], out["casts_root"] = 0, 0
    else:  # DeepSpeed, or one FSDP rank (plain fp32 module under autocast)
        z = s if engine == "deepspeed" else 1
        stage = zero_stage if engine == "deepspeed" else 0
        out = {
            "params": 4 * local // (z if stage >= 3 else 1),
            "grads": 4 * local // (z if stage >= 2 else 1),
            # ZeRO-1/2 clone an fp32 master partition even of fp32 module weights (torch_autocast);
            # ZeRO-3 steps the partitioned module weights themselves
            "optimizer": (12 if engine == "deepspeed" and stage < 3 else 8) * local // z,
            "ema": (4 * local // (z if stage >= 3 else 1)) if ema else 0,
        }
        bucket = 4 * min(DS_BUCKET, local) if stage >= 2 else 0
        out["fsdp_buffers"] = bucket + (2 * 4 * block if stage >= 3 else 0)
        # autocast's bf16 copy of each weight a linear saves for backward (Fp32Linear needs none)
        out["casts_block"] = 2 * (pc["cast_block"] - pc["block_tp_split"] * (t - 1) // t)
        out["casts_root"] = 2 * pc["cast_root"]
    host = 0
    if offload:  # FSDP2 CPUOffloadPolicy: all sharded states; DeepSpeed ZeRO-Offload: the optimizer
        moved = ("params", "grads", "optimizer", "ema") if engine == "fsdp" else ("optimizer",)
        host = sum(out[k] for k in moved)
        out |= {k: 0 for k in moved}
    return out | {"host": host, "local_params": local, "block_params": block, "root_params": root}


def _span_bw(gpu: GPU, span: int, gpus_per_node: int) -> float:
    """Bytes/s per GPU for a group over ``span`` consecutive ranks."""
    return 1e9 * LINK_EFF * (gpu.intra_node_gbps if span <= gpus_per_node else gpu.inter_node_gbps)


def comm_bytes(
    arch: DiTConfig, layout: Layout, cut: _Cut, states: dict, engine: str, zero_stage: int, ac: str
) -> dict[str, float]:
    """Bytes one GPU sends per micro-step, by kind (``fsdp``, ``hsdp``, ``cp``, ``tp``); ``fsdp_edge``
    is the part that cannot overlap (the first gather and the last reduce-scatter)."""
    s, r, t = layout.dp_shard * layout.cp, layout.dp_replicate, layout.tp
    local, block, root = states["local_params"], states["block_params"], states["root_params"]
    frac = (s - 1) / s
    if engine == "fsdp":
        # gather bf16 (forward, again for backward except the root), reduce-scatter fp32
        fsdp = frac * (2 * local + 2 * (local - root) + 4 * local) if s > 1 else 0.0
        edge = frac * (2 * (root + block) + 4 * block) if s > 1 else 0.0
    else:
        gathers = 2 if zero_stage >= 3 else 0  # fp32 module weights, forward and backward
        fsdp = frac * 4 * local * (gathers + 1) + (frac * 4 * local if zero_stage < 3 else 0)
        edge = frac * 4 * (block if zero_stage >= 3 else local)  # stage 1/2 gather after the step
    hsdp = 2 * 4 * (local / s) * (r - 1) / r if engine == "fsdp" else 0.0
    kind, n_ckpt = checkpoint_blocks(ac, arch.depth)
    rc = n_ckpt / arch.depth  # fraction of blocks whose forward runs again in backward
    chunk = cut.n * arch.hidden_size // t  # elements of one rank's q (or k, v, out)
    n_cp_blocks = sum(axis != "space" for axis in block_axes(arch))
    # benchmarks.comm_volume.attention_comm_bytes, bf16: Ulysses inside groups of u ranks, then a ring
    # over r of them whose K/V blocks hold as many elements as a rank's chunk (N/r tokens, D/u wide)
    u, r = cut.cp_ulysses, cut.cp_ring
    cp_u = cp_r = 0.0
    if u > 1:
        fwd = 4 * (u - 1) * (chunk // u) * 2
        cp_u = n_cp_blocks * fwd * (2 + (rc if kind == "input" else 0.75 * rc))
    if r > 1:
        fwd = 2 * (r - 1) * chunk * 2
        cp_r = n_cp_blocks * (2 * fwd + 2 * r * chunk * 4 + (fwd * rc if kind == "input" else 0))
    cp = cp_u + cp_r
    # tensor parallel, per sub-layer: all-gather of the fp32 modulated input and reduce-scatter of the
    # bf16 output (or their all-reduce without sequence parallelism), the reverse in backward
    sub = 3 if arch.conditioning == "text" else 2
    tp = arch.depth * sub * (t - 1) / t * cut.n * arch.hidden_size * (12 + 6 * rc) if t > 1 else 0.0
    return {"fsdp": fsdp, "hsdp": hsdp, "cp": cp, "tp": tp, "fsdp_edge": edge, "cp_ring": cp_r}


def flops(arch: DiTConfig, thw: tuple[int, int, int], batch: int, text_len: int, layout: Layout, ac: str):
    """Per-GPU FLOPs of one micro-step: ``model`` (6 × forward MACs × 2 of this GPU's share of the
    global batch, what MFU credits) and the hardware work by kind (``matmul``, ``attention_fwd``,
    ``attention_bwd``), which counts replicated embedding work and checkpoint recomputation."""
    parts = macs_breakdown(arch, *thw, batch=batch, text_len=text_len)
    cp, t = layout.cp, layout.tp
    l = text_len if arch.conditioning == "text" else 0
    d = arch.hidden_size
    text_kv = arch.depth * 2 * l * d * d * batch  # cross-attention k/v of the caption: every cp rank
    split = cp * t
    block_mm = (parts["attn_proj"] + parts["mlp"] + parts["cross_attn_proj"] - text_kv) / split + text_kv / t
    attn = (parts["attn_scores_values"] + parts["cross_attn_scores_values"]) / split
    # embeddings run whole on every rank; the final layer on the cp chunk
    other = sum(parts[k] for k in ("patch_embed", "timestep_embed", "fps_embed", "text_proj", "modulation"))
    other += parts["final_linear"] / cp
    kind, n_ckpt = checkpoint_blocks(ac, arch.depth)
    rc = n_ckpt / arch.depth
    recompute_mm = rc * block_mm if kind != "none" else 0.0
    recompute_attn = rc * attn if kind == "input" else 0.0
    return {
        "model": 6 * sum(parts.values()) / (cp * t),
        "matmul": 2 * (3 * (block_mm + other) + recompute_mm),
        "attention_fwd": 2 * (attn + recompute_attn),
        "attention_bwd": 2 * 2 * attn,
    }


def _memory(arch, states: dict, act: dict, ac: str, grad_accum: int, engine: str, layout: Layout, off=False):
    """The breakdown at the peak and where it falls, of three candidates: early in backward (every
    saved activation, a block recomputed and differentiated; FSDP2 gradients are allocated block by
    block, zero_grad having set them to None, so only a few exist unless an earlier micro-step made
    them), late in backward (every gradient, the first block's activations), the optimizer step.
    ``off`` (activation offload): of the blocks' saved activations two blocks' are on the device in
    backward (the one computing and the previous, prefetched: :mod:`parallel.offload`)."""
    n_ckpt = checkpoint_blocks(ac, arch.depth)[1]
    kept = {k: states[k] for k in ("params", "grads", "optimizer", "ema")}
    temporaries = act["recompute"] + act["working"] + (states["casts_block"] if n_ckpt else 0)
    every = act["saved"] - act["outside"] + states["casts_block"] * (arch.depth - n_ckpt)
    blocks = every * min(2, arch.depth) // arch.depth if off else every
    early = kept | {
        "activations": act["outside"] + states["casts_root"] + blocks,
        "fsdp_buffers": states["fsdp_buffers"],
        "temporaries": temporaries,
    }
    if engine == "fsdp" and grad_accum == 1:
        s = layout.dp_shard * layout.cp
        early["grads"] = min(states["grads"], 4 * (states["root_params"] + states["block_params"]) // s)
    late = early | kept | {"activations": act["outside"] + states["casts_root"] + every // arch.depth}
    step = kept | {"activations": 0, "fsdp_buffers": 0, "temporaries": 0}
    candidates = {"backward (first blocks)": early, "backward (last blocks)": late, "optimizer step": step}
    where = max(candidates, key=lambda k: sum(candidates[k].values()))
    return candidates[where], where


def _check(
    arch: DiTConfig,
    thw: tuple,
    layout: Layout,
    gpu: str,
    engine: str,
    stage: int,
    batch: int,
    ga: int,
    sp: bool = False,
    text_len: int = 0,
):
    """Raise naming the argument for what cannot run; returns the tokens per sample."""
    if gpu not in GPUS:
        raise ValueError(f"gpu={gpu!r}: expected one of {sorted(GPUS)}")
    if engine not in ("fsdp", "deepspeed"):
        raise ValueError(f"engine={engine!r}: expected 'fsdp' or 'deepspeed'")
    if engine == "deepspeed" and stage not in (1, 2, 3):
        raise ValueError(f"zero_stage={stage}: expected 1, 2 or 3")
    if engine == "deepspeed" and layout.dp_replicate > 1:
        raise ValueError("layout dp_replicate > 1 needs engine=fsdp (DeepSpeed shards over dp_shard·cp)")
    if batch < 1 or ga < 1:
        raise ValueError(f"batch={batch} and grad_accum={ga} must be ≥ 1")
    if text_len < 0:
        raise ValueError(f"text_len={text_len} must be ≥ 0")
    for name, v, p in zip(("frames", "height", "width"), thw, arch.patch_size, strict=True):
        if v < 1 or v % p:
            raise ValueError(f"{name}={v} (latent) is not a positive multiple of the patch size {p}")
    if arch.num_heads % layout.tp or arch.ffn_hidden % layout.tp:
        raise ValueError(f"layout tp={layout.tp} must divide num_heads={arch.num_heads} and the MLP width")
    tokens = math.prod(v // p for v, p in zip(thw, arch.patch_size, strict=True))
    # the trainer's own cut (parallel.context): cp ranks, and the tp ranks of each under sequence
    # parallelism, each take an equal share of every sample's tokens
    ways = layout.cp * (layout.tp if sp else 1)
    if tokens % ways:
        what = f"cp={layout.cp}" + (f" × tp={layout.tp} (sequence parallel)" if sp else "")
        raise ValueError(f"layout {what} must divide the {tokens} tokens of a sample")
    if arch.attention_layout == "factorized" and (thw[0] // arch.patch_size[0]) % layout.cp:
        raise ValueError(f"layout cp={layout.cp} must divide the latent frames (factorized attention)")
    return tokens


def plan(
    arch: DiTConfig,
    frames: int,
    height: int,
    width: int,
    *,
    batch: int = 1,
    text_len: int = 512,
    gpu: str = "h100",
    layout: Layout = Layout(),  # noqa: B008  (frozen: one shared default is safe)
    ac: str = "none",
    grad_accum: int = 1,
    engine: str = "fsdp",
    zero_stage: int = 2,
    ema: bool = True,
    cpu_offload: bool = False,
    gpus_per_node: int = 8,
    sequence_parallel: bool = True,
    finetune: Finetune = Finetune(),  # noqa: B008  (frozen)
) -> dict:
    """Predict one GPU's peak memory, and the step time and MFU, of a training job.

    Args:
        arch: the architecture.
        frames, height, width: LATENT T, H, W (as :mod:`dit.flops`).
        batch: samples per data-parallel rank per micro-step.
        text_len: caption tokens.
        gpu: a key of :data:`GPUS`.
        layout: degrees; their product is the GPU count.
        ac: activation checkpointing, ``none | full | every_K | selective``.
        grad_accum: micro-steps per optimizer step.
        engine, zero_stage: ``fsdp`` or ``deepspeed`` (ZeRO stage 1–3).
        ema: an fp32 EMA of the weights is kept (sharded like them).
        cpu_offload: FSDP2 CPU offload of the sharded states / DeepSpeed optimizer offload.
        gpus_per_node: consecutive ranks sharing NVLink.
        sequence_parallel: with tp > 1 on FSDP, cut the residual stream over tp too.
        finetune: LoRA, base storage, block swap, activation offload (:class:`Finetune`).

    Returns:
        A JSON-serialisable dict (see ``plan_api`` in the module docstring): ``memory_gib``,
        ``capacity_gib``, ``fits``, ``memory_breakdown_gib``, ``tokens``, ``flops``, ``comm_bytes``,
        ``step_s``, ``mfu``, ``time_breakdown_s``, ``layout`` and the details behind them.
    """
    thw = (frames, height, width)
    sp = sequence_parallel and layout.tp > 1 and engine == "fsdp"
    tokens = _check(arch, thw, layout, gpu, engine, zero_stage, batch, grad_accum, sp, text_len)
    check_finetune(arch, layout, engine, finetune)
    checkpoint_blocks(ac, arch.depth)
    g = GPUS[gpu]
    # the split the trainer makes with parallel.cp_ring=0: the largest Ulysses degree the heads allow
    ring = check_cp_degrees(layout.cp, 0, arch.num_heads, layout.tp)
    l = batch * text_len if arch.conditioning == "text" else 0
    n = batch * tokens // layout.cp
    ns = n // layout.tp if sp else n
    cut = _Cut(n=n, ns=ns, l=l, tp=layout.tp, cp_ulysses=layout.cp // ring, cp_ring=ring)
    states = state_bytes(arch, layout, engine, zero_stage, ema, cpu_offload)
    outside = outside_terms(arch, cut, batch, tokens)
    act = activation_bytes(arch, cut, ac, outside)
    if finetune.lora_rank:
        states = lora_plan_states(arch, layout, engine, ema, cpu_offload, states, act, finetune)
    off = finetune.activation_offload
    mem, peak_at = _memory(arch, states, act, ac, grad_accum, engine, layout, off)
    blocks_saved = act["saved"] - act["outside"]
    states["host"] += blocks_saved if off else 0  # every block's host copy lives until its backward
    casts = states["casts_root"] + states["casts_block"] * (arch.depth - checkpoint_blocks(ac, arch.depth)[1])
    total = sum(mem.values())
    usable = g.memory_gib * (1 - FRAGMENTATION) - OVERHEAD_GIB
    fl = flops(arch, thw, batch, text_len, layout, ac)
    comm = comm_bytes(arch, layout, cut, states, engine, zero_stage, ac)
    times = _times(arch, gpu, layout, cut, fl, comm, states["optimizer"] // 8, ac, gpus_per_node)
    step = grad_accum * times["micro_step"] + times["optimizer"]
    model_flops = grad_accum * fl["model"]
    hw = grad_accum * (fl["matmul"] + fl["attention_fwd"] + fl["attention_bwd"])
    breakdown = {k: grad_accum * times[k] for k in ("attention", "matmuls", "elementwise", "communication")}
    breakdown["elementwise"] += times["optimizer"]
    return {
        "memory_gib": total / GIB,
        "peak_at": peak_at,
        "capacity_gib": g.memory_gib,
        "usable_gib": usable,
        "fits": total / GIB <= usable,
        "memory_breakdown_gib": {k: v / GIB for k, v in mem.items()},
        "host_memory_gib": states["host"] / GIB,
        "activation_detail_gib": {
            "per_block_uncheckpointed": act["per_block"] / GIB,
            "recompute": act["recompute"] / GIB,
            "backward_working": act["working"] / GIB,
            "after_forward": (act["saved"] + casts) / GIB,
            "weight_casts": casts / GIB,
            **{f"outside_{k}": v / GIB for k, v in outside.items()},
        },
        "tokens": {"per_sample": tokens, "per_gpu_micro_step": n, "text_len": text_len},
        "params": {"total": param_counts(arch)["total"], "per_gpu_unsharded": states["local_params"]}
        | {
            "trainable": lora_params(arch, finetune.lora_rank, finetune.targets)[0]
            if finetune.lora_rank
            else None
        },
        "flops": {"model_per_step": model_flops, "hardware_per_step": hw},
        "comm_bytes": {k: grad_accum * comm[k] for k in ("fsdp", "cp", "tp")}
        | {"hsdp": grad_accum * comm["hsdp"]},
        "step_s": step,
        "mfu": model_flops / (step * g.bf16_tflops * 1e12),
        "time_breakdown_s": breakdown,
        "layout": asdict(layout)
        | {"world": layout.world, "cp_ulysses": layout.cp // ring, "cp_ring": ring, "sequence_parallel": sp},
        "settings": dict(gpu=gpu, ac=ac, grad_accum=grad_accum, engine=engine, batch=batch, ema=ema)
        | dict(zero_stage=zero_stage if engine == "deepspeed" else None, cpu_offload=cpu_offload)
        | {"finetune": asdict(finetune)},
    }


def _times(
    arch, gpu: str, layout: Layout, cut: _Cut, fl: dict, comm: dict, opt_elems: int, ac: str, per_node: int
):
    """Roofline seconds of one micro-step by kind (exposed communication only) and of the optimizer."""
    g = GPUS[gpu]
    peak = g.bf16_tflops * 1e12
    eff_f, eff_b = ATTENTION_EFF[gpu]["flash_attn" if arch.attention_backend == "flash_attn" else "sdpa"]
    matmuls = fl["matmul"] / (peak * MATMUL_EFF[gpu])
    attention = fl["attention_fwd"] / (peak * eff_f) + fl["attention_bwd"] / (peak * eff_b)
    kind, n_ckpt = checkpoint_blocks(ac, arch.depth)
    passes = 3 + (n_ckpt / arch.depth if kind != "none" else 0)  # forward, backward (2×), recompute
    ew = arch.depth * cut.ns * elementwise_bytes(arch.hidden_size, arch.ffn_hidden, arch.mlp == "swiglu")
    elementwise = passes * ew / (g.hbm_tbps * 1e12 * HBM_EFF)
    compute = matmuls + attention + elementwise
    t = layout.tp
    fsdp_bw = _span_bw(g, layout.dp_shard * layout.cp * t, per_node)
    fsdp_total = comm["fsdp"] / fsdp_bw
    edge = comm["fsdp_edge"] / fsdp_bw
    exposed = edge + max(0.0, fsdp_total - edge - compute)
    exposed += max(0.0, comm["hsdp"] / _span_bw(g, layout.world, per_node) - compute)
    # Ulysses' all-to-alls sit on the critical path (inner groups); the ring's K/V passes overlap the
    # attention of the block in hand
    exposed += (comm["cp"] - comm["cp_ring"]) / _span_bw(g, cut.cp_ulysses * t, per_node)
    exposed += max(0.0, comm["cp_ring"] / _span_bw(g, layout.cp * t, per_node) - attention)
    exposed += comm["tp"] / _span_bw(g, t, per_node)
    # fused AdamW (p, g, m, v read; p, m, v written), EMA lerp, clipping: fp32, on the GPU's share
    optimizer = 52 * opt_elems / (g.hbm_tbps * 1e12 * HBM_EFF)
    return {
        "attention": attention,
        "matmuls": matmuls,
        "elementwise": elementwise,
        "communication": exposed,
        "micro_step": compute + exposed,
        "optimizer": optimizer,
    }
