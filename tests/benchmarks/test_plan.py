"""The memory and step-time planner (parallel.plan) and its CLI (python -m benchmarks.plan).

Memory terms must scale as the layout says; the CLI prints one JSON object and ``--fit`` ranks what
fits; bad layouts are errors naming the part. One real CPU forward measures activation bytes against
the prediction. What only a GPU can confirm (allocator fragmentation, CUDA kernels' own workspaces,
the step time) is not tested here: see benchmarks/results/2026-12-01-plan-validation.md.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import plan as cli
from benchmarks.comm_volume import attention_comm_bytes
from dit.config import get_preset
from parallel.plan import GIB, Layout, _Cut, block_terms, plan

ARCH = get_preset("video-1b3")
THW = (21, 60, 104)  # 81 frames at 480p: 21·30·52 = 32760 tokens


def _mem(**kw) -> dict:
    return plan(ARCH, *THW, **kw)["memory_breakdown_gib"]


def test_sharded_states_divide_by_the_fsdp_shard_degree():
    # dp_shard · cp is what FSDP shards over; dp_replicate holds copies
    a = _mem(layout=Layout(dp_shard=2), grad_accum=2)
    b = _mem(layout=Layout(dp_shard=4, cp=2), grad_accum=2)
    c = _mem(layout=Layout(dp_replicate=4, dp_shard=2), grad_accum=2)
    for key in ("params", "grads", "optimizer", "ema"):
        assert b[key] == pytest.approx(a[key] / 4, rel=1e-6), key
        assert c[key] == pytest.approx(a[key], rel=1e-6), key
    assert a["optimizer"] == pytest.approx(2 * a["params"], rel=1e-6)  # Adam m and v, fp32


def _acts(**kw) -> float:
    return plan(ARCH, *THW, **kw)["activation_detail_gib"]["after_forward"]


def test_activations_divide_by_cp():
    n = 32760
    one = block_terms(ARCH, _Cut(n=n, ns=n, l=512, tp=1))
    four = block_terms(ARCH, _Cut(n=n // 4, ns=n // 4, l=512, tp=1, cp_ulysses=4))
    # everything is per token except the caption's k/v (every cp rank holds the whole caption) and
    # Ulysses' extra copy of the attention output
    per_token = sum(v for k, v in one.items() if k != "cross_kv")
    assert sum(v for k, v in four.items() if k not in ("cross_kv", "ulysses_out")) == pytest.approx(
        per_token / 4, rel=1e-6
    )
    a = _acts(layout=Layout(dp_shard=8), ac="none")
    b = _acts(layout=Layout(dp_shard=2, cp=4), ac="none")
    assert a / 4.5 < b < a / 3.5


def test_checkpointing_order():
    acts = {ac: _acts(layout=Layout(dp_shard=8), ac=ac) for ac in ("none", "every_2", "full", "selective")}
    assert acts["full"] < acts["selective"] < acts["every_2"] < acts["none"]
    # every_2 checkpoints blocks 0, 2, 4…: half the blocks keep everything
    assert acts["every_2"] == pytest.approx((acts["none"] + acts["full"]) / 2, rel=0.02)


def test_grad_accum_does_not_grow_gradients_or_activations():
    # FSDP2 reduce-scatters every micro-step: sharded fp32 gradients only, whatever grad_accum
    two, eight = (_mem(layout=Layout(dp_shard=8), ac="full", grad_accum=g) for g in (2, 8))
    assert two == eight
    p = plan(ARCH, *THW, layout=Layout(dp_shard=8), ac="full", grad_accum=4)
    assert p["memory_breakdown_gib"]["grads"] == pytest.approx(p["memory_breakdown_gib"]["params"])
    one = plan(ARCH, *THW, layout=Layout(dp_shard=8), ac="full", grad_accum=1)
    assert p["flops"]["model_per_step"] == 4 * one["flops"]["model_per_step"]
    assert 3.9 * one["step_s"] < p["step_s"] < 4 * one["step_s"]  # the optimizer runs once


def test_small_activations_peak_with_every_gradient():
    # a short clip: the states dominate, and the peak comes late in backward or at the optimizer
    # step, when every sharded gradient exists
    p = plan(ARCH, 1, 8, 8, layout=Layout(dp_shard=8), ac="full")
    m = p["memory_breakdown_gib"]
    assert p["peak_at"] != "backward (first blocks)"
    assert m["grads"] == pytest.approx(m["params"])
    assert p["memory_gib"] >= m["params"] + m["grads"] + m["optimizer"] + m["ema"]


def test_ulysses_bytes_match_the_comm_volume_benchmark():
    layout = Layout(dp_shard=2, cp=4)
    p = plan(ARCH, *THW, layout=layout, ac="none")
    per_layer = attention_comm_bytes(32760, ARCH.hidden_size, 4, act_bytes=2)
    assert (p["layout"]["cp_ulysses"], p["layout"]["cp_ring"]) == (4, 1)
    assert p["comm_bytes"]["cp"] == ARCH.depth * (per_layer["ulysses_fwd"] + per_layer["ulysses_bwd"])


def test_cp_that_does_not_divide_the_heads_is_planned_as_the_trainers_ulysses_by_ring_split():
    """cp=8 with 12 heads: the trainer (parallel.context.check_cp_degrees, cp_ring=0) runs Ulysses 4 ×
    ring 2; the plan's bytes are Ulysses within 4 ranks plus a ring of 2 over blocks of the same size
    (N/8 tokens · D elements = N/2 tokens · D/4), each as benchmarks.comm_volume counts them."""
    assert ARCH.num_heads % 8 and ARCH.num_heads % 4 == 0
    p = plan(ARCH, *THW, layout=Layout(cp=8), ac="none")
    assert (p["layout"]["cp_ulysses"], p["layout"]["cp_ring"]) == (4, 2)
    uly = attention_comm_bytes(32760 // 2, ARCH.hidden_size, 4, act_bytes=2)  # chunk: N/8 · D
    ring = attention_comm_bytes(32760 // 4, ARCH.hidden_size, 2, act_bytes=2)  # chunk: N/8 · D
    want = ARCH.depth * (uly["ulysses_fwd"] + uly["ulysses_bwd"] + ring["ring_fwd"] + ring["ring_bwd"])
    assert p["comm_bytes"]["cp"] == want


def _run(capsys, *args) -> dict:
    cli.main(list(args))
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one JSON object on one line
    return json.loads(out)


def test_cli_prints_one_plan(capsys):
    p = _run(
        capsys, "video-1b3", "--gpus", "16", "--layout", "dp_shard=4,cp=4", "--ac", "full", "--gpu", "a100"
    )
    for key in (
        "memory_gib",
        "fits",
        "step_s",
        "mfu",
        "memory_breakdown_gib",
        "time_breakdown_s",
        "comm_bytes",
    ):
        assert key in p
    assert set(p["time_breakdown_s"]) == {"attention", "matmuls", "elementwise", "communication"}
    assert p["memory_gib"] == pytest.approx(sum(p["memory_breakdown_gib"].values()))
    assert 0 < p["mfu"] < 1 and p["fits"] is True


def test_cli_fit_ranks_what_fits(capsys):
    r = _run(
        capsys, "video-14b", "--frames", "21", "--height", "90", "--width", "160", "--gpus", "64", "--fit"
    )
    rows = r["ranked"]
    assert rows and r["fitting"] >= len(rows)
    assert [x["step_s"] for x in rows] == sorted(x["step_s"] for x in rows)
    arch = get_preset("video-14b")
    for row in rows:
        layout = Layout.parse(row["layout"])
        assert layout.world == 64
        again = plan(arch, 21, 90, 160, layout=layout, ac=row["ac"], grad_accum=row["grad_accum"])
        assert again["fits"] and again["step_s"] == pytest.approx(row["step_s"])
        assert layout.dp_replicate * layout.dp_shard * row["grad_accum"] == r["global_batch"]
    # 75.6k tokens of a 14B model do not fit one H100 without checkpointing and context parallelism
    assert not any(row["ac"] == "none" and Layout.parse(row["layout"]).cp == 1 for row in rows)


@pytest.mark.parametrize(
    ("layout", "needle"),
    [
        ("dp_shard=8,cq=8", "'cq'"),
        ("dp_shard=x", "'dp_shard=x'"),
        ("dp_shard=0,cp=64", "≥ 1"),
        ("cp", "'cp'"),
    ],
)
def test_cli_bad_layout_names_the_part(capsys, layout, needle):
    with pytest.raises(SystemExit) as e:
        cli.main(["video-14b", "--gpus", "64", "--layout", layout])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--layout" in err and needle in err


def test_cli_layout_must_cover_the_gpus(capsys):
    with pytest.raises(SystemExit):
        cli.main(["video-14b", "--gpus", "64", "--layout", "dp_shard=8,cp=4"])
    err = capsys.readouterr().err
    assert "32 GPUs" in err and "--gpus=64" in err


def test_cli_infeasible_split_names_the_flag(capsys):
    with pytest.raises(SystemExit):
        cli.main(["video-14b", "--gpus", "48", "--layout", "dp_shard=16,tp=3"])  # 40 heads
    assert "--layout tp=3" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("ac", ["none", "full"])
def test_activation_bytes_match_a_real_cpu_run(ac):
    """A real forward under bf16 autocast on CPU (norms in fp32 as CUDA autocast runs them), bytes
    alive at the end of forward (torch's MemTracker) against the planner: within 15%."""
    from benchmarks.plan_validate import measure_activations

    arch = get_preset("tiny")
    thw, text_len = (8, 16, 16), 16
    got = measure_activations(arch, thw, text_len, ac)["activations"]
    want = plan(arch, *thw, text_len=text_len, ac=ac)["activation_detail_gib"]["after_forward"] * GIB
    assert want == pytest.approx(got, rel=0.15)


def test_fit_offers_only_layouts_the_trainer_accepts():
    """Under sequence parallelism the trainer cuts every sample's tokens over cp × tp ranks
    (parallel.context): 75,600 tokens do not split over cp=16 × tp=2, so --fit must not rank it (it
    once did, first)."""
    arch = get_preset("video-14b")
    with pytest.raises(ValueError, match=r"cp=16 × tp=2 \(sequence parallel\) must divide the 75600 tokens"):
        plan(arch, 21, 90, 160, layout=Layout(dp_replicate=2, cp=16, tp=2), ac="full")
    plan(arch, 21, 90, 160, layout=Layout(dp_replicate=2, cp=16, tp=2), ac="full", sequence_parallel=False)
    got = cli_fit(arch)
    assert got and all(75600 % (r["cp"] * (r["tp"] if r["tp"] > 1 else 1)) == 0 for r in got)


def cli_fit(arch) -> list[dict]:
    from benchmarks.plan import fit

    kw = dict(batch=1, gpu="h100", engine="fsdp", gpus_per_node=8)
    result = fit(arch, (21, 90, 160), 64, ("full",), 64, top=500, **kw)
    return [Layout.parse(r["layout"]).__dict__ for r in result["ranked"]]


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--text-len", "-5"], "--text-len"),
        (["--batch", "-1", "--fit"], "--batch"),
        (["--top", "-3", "--fit"], "--top"),
        (["--gpus-per-node", "0"], "--gpus-per-node"),
        (["--fit", "--layout", "dp_shard=8"], "--layout"),
    ],
)
def test_cli_refuses_nonsense_numbers_naming_the_flag(args, flag, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["video-14b", "--gpus", "8", *args])
    assert stop.value.code == 2 and flag in capsys.readouterr().err


def test_lora_states_count_the_stored_base_and_the_configured_targets():
    """The LoRA plan's parameters are the bytes ``launch.lora.store_base`` leaves (plain linears in the
    base dtype, the fp32-compute layers, norms and tables in fp32) plus fp32 adapters on the linears
    ``finetune.lora.targets`` resolves to (``launch.lora.resolve_targets``), not the default targets; the
    swapped blocks' base is on the host; an unmatched pattern is an error naming the key."""
    import copy

    import torch

    from dit.model import SpacetimeDiT
    from launch.lora import resolve_targets, store_base
    from parallel.plan_lora import Finetune

    arch = get_preset("tiny", depth=4)
    targets = ("blocks.*.attn.q", "blocks.1.mlp.fc1", "text_proj.fc1")
    with torch.device("meta"):
        model = SpacetimeDiT(arch).requires_grad_(False)
    modules = dict(model.named_modules())
    trainable = sum(
        4 * (modules[n].in_features + modules[n].out_features) for n in resolve_targets(model, targets)
    )
    for dtype in ("fp32", "bf16", "fp8"):
        stored = copy.deepcopy(model)
        store_base(stored, dtype)
        block = sum(p.numel() * p.element_size() for p in stored.blocks[0].parameters())
        base = sum(p.numel() * p.element_size() for p in stored.parameters())
        for swap in (0, 4):  # 4: two blocks resident (running, prefetched), two on the host
            ft = Finetune(4, dtype, block_swap=swap, targets=targets)
            p = plan(arch, 4, 8, 8, text_len=8, finetune=ft, ema=True)
            mem = {k: v * GIB for k, v in p["memory_breakdown_gib"].items()}
            assert p["params"]["trainable"] == trainable
            assert mem["optimizer"] == pytest.approx(8 * trainable) and mem["grads"] == pytest.approx(
                4 * trainable
            )
            assert mem["params"] == pytest.approx(base - 2 * block * (swap > 0) + 4 * trainable), (
                dtype,
                swap,
            )
            assert p["host_memory_gib"] * GIB == pytest.approx(2 * block * (swap > 0)), (dtype, swap)
    with pytest.raises(ValueError, match=r"finetune.lora.targets: pattern 'blocks.\*.attn.qq' matches no"):
        plan(arch, 4, 8, 8, text_len=8, finetune=Finetune(4, targets=("blocks.*.attn.qq",)))
