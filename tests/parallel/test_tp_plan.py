"""The one tensor-parallel plan (:mod:`parallel.tp_plan`) and its two translations.

DTensor styles (``parallel.engine=fsdp``) and megatron-core modules (``parallel.engine=deepspeed``)
must split exactly the same modules the same way: checked on the plans for models with every option
the plan names, and on two gloo ranks by the local slices and gradients both produce.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

from dit.model import SpacetimeDiT
from launch.lora import apply_lora, is_adapter, store_base
from parallel import megatron_tp, tensor
from parallel.megatron_tp import (
    TPAcrossHeadsRMSNorm,
    TPColumnLinear,
    TPHeadRMSNorm,
    TPRowLinear,
    check_megatron_tp,
)
from parallel.tensor import AcrossHeadsNormParallel
from parallel.tp_plan import check_tp, check_tp_weights, resolve_plan
from tests.parallel.group import run_group
from tests.parallel.lora_helpers import LORA
from tests.parallel.tp_plan_worker import Case, every_option, worker

OPTIONS = [("gelu_tanh", "full"), ("swiglu", "factorized"), ("swiglu", "full"), ("gelu_tanh", "factorized")]


def _meta_model(mlp: str, layout: str, qk_norm: str = "per_head") -> SpacetimeDiT:
    with torch.device("meta"):
        return SpacetimeDiT(every_option(mlp, layout, qk_norm))


def _dtensor_kind(style) -> str | None:
    """What a DTensor style does to a module's weight, in the plan's words (None: replicated)."""
    if isinstance(style, ColwiseParallel) and not isinstance(style, RowwiseParallel):
        return "column"
    if isinstance(style, RowwiseParallel):
        return "row"
    if isinstance(style, SequenceParallel) and style.sequence_sharding[0].dim == 2:
        return "head_norm"  # input sharded on the head axis of B, N, H, Dh
    if isinstance(style, AcrossHeadsNormParallel):
        return "across_heads_norm"
    return None


_MEGATRON_KIND = {
    TPColumnLinear: "column",
    TPRowLinear: "row",
    TPHeadRMSNorm: "head_norm",
    TPAcrossHeadsRMSNorm: "across_heads_norm",
}


@pytest.mark.parametrize("mlp,layout", OPTIONS)
@pytest.mark.parametrize("sequence_parallel", [False, True])
@pytest.mark.parametrize("qk_norm", ["per_head", "across_heads"])
def test_both_translations_split_the_same_modules(mlp, layout, sequence_parallel, qk_norm):
    model = _meta_model(mlp, layout, qk_norm)
    styles = tensor.tp_plan(model, sequence_parallel)
    split_dt = {n: k for n, s in styles.items() if (k := _dtensor_kind(s)) is not None}
    # what apply_megatron_tp would build for each name (the class, not the plan's word for it)
    split_mg = {
        n: _MEGATRON_KIND[megatron_tp.MEGATRON_MODULES[k]] for n, k in megatron_tp.tp_plan(model).items()
    }
    assert split_dt == split_mg, set(split_dt.items()) ^ set(split_mg.items())
    # every linear of every attention and MLP is split: a layer renamed in dit/ and left out of the
    # plan would silently run replicated on every rank
    sublayers = (["attn"], ["cross_attn"], ["mlp"])  # the third part of blocks.<i>.<sub-layer>…
    linears = {
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[2:3] in sublayers
    }
    assert linears and linears <= set(split_dt)
    norms = {n for n in split_dt if n.endswith(("norm_q", "norm_k"))}
    assert len(norms) == 2 * 2 * model.cfg.depth  # q and k, self and cross, in every block
    assert {split_dt[n] for n in norms} == {"head_norm" if qk_norm == "per_head" else "across_heads_norm"}
    assert ("blocks.0.mlp.gate" in split_dt) == (mlp == "swiglu")
    # DTensor: every parameter-holding module gets a style, so every parameter becomes a DTensor
    owners = {n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    assert owners <= set(styles)


def test_plan_kinds_follow_the_options():
    with torch.device("meta"):
        plain = SpacetimeDiT(every_option("gelu_tanh", "full").replace(qk_norm=False, cross_attn_norm=False))
        no_text_cfg = every_option("gelu_tanh", "full").replace(
            conditioning="class", num_classes=3, text_pool=False
        )
        no_text = SpacetimeDiT(no_text_cfg)
    plan = resolve_plan(plain)
    assert "blocks.0.attn.norm_q" not in plan  # nn.Identity: the option is off
    assert "blocks.0.norm_cross" not in plan
    assert plan["blocks.0.cross_attn"] == "residual_input" and plan["blocks.1.mlp.fc2"] == "row"
    assert plan["final.linear"] == "replicate" and plan["blocks.0.modulation.linear"] == "replicate"
    assert not any("cross_attn" in n for n in resolve_plan(no_text))
    full = resolve_plan(_meta_model("swiglu", "full"))
    assert (
        full["blocks.1.norm_cross"] == "residual_norm" and full["blocks.1.cross_attn.norm_k"] == "head_norm"
    )


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_lora_is_planned_through_its_parts(sequence_parallel):
    """A planned linear wrapped by peft's LoRA: Megatron's split of the base applied to B·A (column: the
    base and B column-wise, A replicated; row: the base and A row-wise, B on the residual stream, so
    under sequence parallelism it sees a sequence chunk and sums its gradient). Both translations split
    the same parts; the wrapper itself is not planned (it holds no parameter of its own)."""
    model = _meta_model("swiglu", "full")
    apply_lora(model, LORA)
    plan = resolve_plan(model)
    q, o, fc2 = "blocks.1.attn.q", "blocks.0.cross_attn.o", "blocks.1.mlp.fc2"
    assert q not in plan and o not in plan
    assert [plan[f"{q}.{p}"] for p in ("base_layer", "lora_A.default", "lora_B.default")] == [
        "column", "replicate", "column",
    ]  # fmt: skip
    for row in (o, fc2):
        got = [plan[f"{row}.{p}"] for p in ("base_layer", "lora_A.default", "lora_B.default")]
        assert got == ["row", "row", "residual_linear"]
    assert plan["blocks.0.mlp.gate"] == "column"  # not a target: planned as before
    styles = tensor.tp_plan(model, sequence_parallel)
    split_dt = {n: k for n, s in styles.items() if (k := _dtensor_kind(s)) is not None}
    split_mg = {
        n: _MEGATRON_KIND[megatron_tp.MEGATRON_MODULES[k]] for n, k in megatron_tp.tp_plan(model).items()
    }
    assert split_dt == split_mg, set(split_dt.items()) ^ set(split_mg.items())
    b = styles[f"{fc2}.lora_B.default"]
    assert isinstance(b, SequenceParallel) == sequence_parallel  # the cut stream: gradient summed
    if sequence_parallel:
        assert b.sequence_sharding[0].dim == 1
    owners = {n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    assert owners <= set(styles)  # every parameter, adapters included, becomes a DTensor


def test_an_fp8_base_is_refused_and_a_bf16_base_splits():
    """``finetune.base_dtype=fp8`` (float8 weights with a per-tensor scale) cannot be cut into slices:
    a clear error naming both keys; a bf16-stored base keeps its linears' kinds (``nn.Linear``
    subclasses) and passes."""
    for dtype in ("bf16", "fp8"):
        model = _meta_model("swiglu", "full")
        apply_lora(model, LORA)
        store_base(model, dtype)
        check_tp_weights(model, 1)
        if dtype == "bf16":
            check_tp_weights(model, 2)
            assert resolve_plan(model)["blocks.0.mlp.gate"] == "column"
            continue
        with pytest.raises(ValueError, match=r"parallel.tp=2 with finetune.base_dtype=fp8.*bf16"):
            check_tp_weights(model, 2)


def test_a_stale_plan_is_an_error_naming_the_module():
    model = _meta_model("swiglu", "full")
    model.blocks[1].attn.norm_q = nn.LayerNorm(8, device="meta")  # not the per-head RMSNorm planned
    with pytest.raises(TypeError, match=r"'blocks\.1\.attn\.norm_q'.*head_norm.*LayerNorm"):
        resolve_plan(model)


def test_one_shape_check_for_both_engines():
    cfg = every_option("swiglu", "full")  # 4 heads, MLP width 128
    for tp in (1, 2, 4):
        check_tp(cfg, tp)
    assert tensor.check_tp is check_tp  # parallel.parallelize calls it from there
    for check in (check_tp, lambda c, tp: check_megatron_tp(c, tp, False, torch.device("cpu"))):
        with pytest.raises(ValueError, match=r"parallel.tp=3 must divide model.arch.num_heads=4"):
            check(cfg, 3)
        with pytest.raises(
            ValueError, match=r"parallel.tp=2 must divide the MLP width 101.*model.arch.ffn_dim"
        ):
            check(cfg.replace(ffn_dim=101), 2)
        with pytest.raises(ValueError, match=r"parallel.tp=0"):
            check(cfg, 0)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    cases = [
        Case("gelu_full", "gelu_tanh", "full"),
        Case("swiglu_factorized", "swiglu", "factorized"),
        Case("across_heads", "swiglu", "full", qk_norm="across_heads", compiled=True),
        Case("ltx", "gelu_tanh", "full", ltx=True, compiled=True),
        Case("lora", "swiglu", "full", lora=True),
    ]
    return run_group(2, worker, cases, tmp_path_factory.mktemp("tp_plan"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gelu_full", "swiglu_factorized", "across_heads", "ltx"])
def test_both_translations_give_the_same_slices_and_gradients(two_ranks, name):
    """On 2 gloo ranks: DTensor and megatron slice the same parameters and give every rank the same
    local gradients; both outputs equal one process's. A module only one translation splits gives a
    slice of another shape (inf below); a head norm only one sums gives a gradient off by the other
    rank's half."""
    got = two_ranks[name]
    assert "error" not in got, got.get("error")
    assert got["sliced_dt"] == got["sliced_mg"]
    assert any(n.endswith("mlp.fc2.weight") for n in got["sliced_dt"])
    # 1e-5 of the largest gradient: k's bias has a gradient of rounding noise only (softmax ignores a
    # shift common to every key), so a per-parameter relative bound would measure noise against noise
    tol = 1e-5 * max(got["grad_scale"].values())
    bad = {n: d for n, d in got["grad_diff"].items() if not d <= tol}
    assert not bad, (tol, bad)
    for key in ("out_dt", "out_mg"):
        torch.testing.assert_close(got[key], got["out_ref"], rtol=1e-5, atol=1e-6)
    # a replicated head norm's gradient on rank 0 is the whole one (summed over the two ranks' heads);
    # an across-heads norm's is the rows of rank 0's heads, the first half
    for n in ("blocks.0.attn.norm_q.weight", "blocks.1.cross_attn.norm_k.weight"):
        want = got["grads_ref"][n]
        assert want.abs().max() > 0
        if name in ("across_heads", "ltx"):
            want = want.chunk(2)[0]
        torch.testing.assert_close(got["grads_dt_rank0"][n], want, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,engine",
    [("gelu_full", "dt"), ("gelu_full", "mg"), ("across_heads", "dt"), ("across_heads", "mg"),
     ("across_heads", "compiled"), ("ltx", "dt"), ("ltx", "mg"), ("ltx", "compiled")],
)  # fmt: skip
def test_whole_gradients_equal_one_process(two_ranks, name, engine):
    """Every parameter's whole gradient (gathered over the 2 gloo ranks) equals one process's, for
    both translations and for DTensor with per-block torch.compile. With the across-heads qk norm this
    checks its collective's backward: the sum of squares' gradient summed over the ranks (passed
    through unsummed, the q/k weights' gradients miss the other rank's heads' share; summed twice,
    they double it). Compiled, AOTAutograd labels that gradient Replicate where eager DTensor says
    Partial: a backward that trusted the label got 4% wrong gradients."""
    got = two_ranks[name]
    assert "error" not in got, got.get("error")
    if engine == "compiled":
        torch.testing.assert_close(got["out_compiled"], got["out_ref"], rtol=1e-5, atol=1e-6)
    tol = 1e-5 * max(g.abs().max() for g in got["grads_ref"].values())
    bad = {n: d for n, d in got[f"whole_diff_{engine}"].items() if not d <= tol}
    assert not bad, (tol, bad)
    if name in ("across_heads", "ltx"):  # the norm's weight is split like the heads, and has a gradient
        assert "blocks.0.attn.norm_q.weight" in got["sliced_dt"]
        assert got["grads_ref"]["blocks.0.attn.norm_q.weight"].shape == (32,)
        assert got["grads_ref"]["blocks.1.cross_attn.norm_k.weight"].abs().max() > 0


@pytest.mark.slow
def test_ltx_rope_cut_to_each_ranks_heads(two_ranks):
    """LTX-Video's RoPE (``pos_embed=rope_ltx``) rotates the whole inner width, so its tables have a head
    axis and each tp rank must rotate its own heads with its part of them (:mod:`parallel.rope_heads`).
    Both translations equal one process with per-sample frame rates (N×B×H×Dh/2 tables, the trainer's;
    forward and whole gradients above) and with one frame rate for the batch (N×H×Dh/2, the sampler's).
    The control: each rank given the other rank's heads of the tables (every head rotated by another
    head's angles) changes the output a hundred times beyond the tolerance: the comparison sees a wrong
    cut (tiny random weights give small attention logits, so RoPE moves the output by parts per thousand)."""
    got = two_ranks["ltx"]
    assert "error" not in got, got.get("error")
    for key in ("out_dt_scalar_fps", "out_mg_scalar_fps"):
        torch.testing.assert_close(got[key], got["out_ref_scalar_fps"], rtol=1e-5, atol=1e-6)
    assert (got["out_ref_scalar_fps"] - got["out_ref"]).abs().max() > 1e-4  # sample 1 at 8 fps, not 24
    assert len(got["hooks"]) == 2 and all("RopeHeads" in h for h in got["hooks"])  # one per self-attention
    wrong = (got["out_dt_other_heads"] - got["out_ref"]).abs().max()
    assert wrong > 100 * 1e-5 * got["out_ref"].abs().max()  # a hundred times the tolerance
    assert "blocks.0.attn.q.weight" in got["sliced_dt"] and "blocks.0.attn.norm_q.weight" in got["sliced_mg"]


@pytest.mark.slow
def test_lora_under_both_translations_equals_one_process(two_ranks):
    """LoRA adapters on a frozen base under tp=2, DTensor and megatron: the output and every adapter's
    whole gradient equal one process's; the base has no gradient; both slice the same adapters (the
    column linears' B, the row linears' A) and the base stays frozen after megatron's swap."""
    got = two_ranks["lora"]
    assert "error" not in got, got.get("error")
    for key in ("out_dt", "out_mg"):
        torch.testing.assert_close(got[key], got["out_ref"], rtol=1e-5, atol=1e-6)
    assert got["grads_ref"] and all(is_adapter(n) for n in got["grads_ref"])
    assert got["grads_ref"]["blocks.1.attn.q.lora_A.default.weight"].abs().max() > 0
    tol = 1e-5 * max(g.abs().max() for g in got["grads_ref"].values())
    for engine in ("dt", "mg"):
        assert got[f"whole_diff_{engine}"].keys() == got["grads_ref"].keys()
        bad = {n: d for n, d in got[f"whole_diff_{engine}"].items() if not d <= tol}
        assert not bad, (engine, tol, bad)
    assert got["sliced_dt"] == got["sliced_mg"]
    assert {"blocks.0.attn.q.lora_B.default.weight", "blocks.1.mlp.fc2.lora_A.default.weight"} <= set(
        got["sliced_dt"]
    )
    assert "blocks.0.attn.q.lora_A.default.weight" not in got["sliced_dt"]  # replicated
