"""The fine-tuning memory benchmark's logic (``benchmarks.finetune_memory``) on a tiny model, in
process: the live-bytes tracker against tensors of known sizes, the trainable counts against the
planner's own adapter formula, the memory ordering of the cases, with and without activation
checkpointing, the bf16 base's bytes, and the ratios and target lines of the report. The numbers of
``video-small`` come from running the script (its dated report in benchmarks/results)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.finetune_memory import LiveBytes, rows_with_ratios, run_case, verdicts
from dit.config import get_preset
from dit.model import SpacetimeDiT
from parallel.plan_lora import adapter_params

# three blocks: activation offload keeps two blocks' activations on the device in backward (the one
# running and the one prefetched), so at depth 2 it would bring everything back and save nothing
DEPTH = 3


def test_live_bytes_counts_storages_once_and_takes_off_the_host_share():
    host = {"n": 0}
    tracker = LiveBytes(lambda: host["n"])
    with tracker:
        a = torch.ones(1000)  # 4000 bytes
        view = a[10:]  # a view: no new storage
        b = a * 2  # 4000 more: peak 8000
        del a, view
        c = torch.zeros(500)  # a is still referenced? no: 4000 (b) + 2000
        host["n"] = 2000  # c counted as held on the host from here
        d = c + 1  # 2000 more: live 8000, device share 6000
    assert tracker.peak == 8000 and tracker.live == 8000
    del b, d
    assert tracker.live == 2000  # c alone
    assert c.numel() == 500


@pytest.fixture(scope="module")
def cases():
    kw = dict(preset="tiny", shape="2x8x8", steps=0, text_len=8, depth=DEPTH)  # no timed steps: memory only
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, two spin on a busy 2-core machine
    try:
        out = {c: run_case(case=c, **kw) for c in ("full", "lora16", "lora16+offload")}
        out |= {f"{c} ac": run_case(case=c, ac="full", **kw) for c in ("lora16", "lora16+bf16")}
    finally:
        torch.set_num_threads(n)
    return out


def test_trainable_parameters_and_memory_order(cases):
    arch = get_preset("tiny", depth=DEPTH)
    full, lora, off = cases["full"], cases["lora16"], cases["lora16+offload"]
    assert full["trainable"] == full["total"]  # everything trains
    assert lora["trainable"] == arch.depth * adapter_params(arch, 16) == off["trainable"]
    assert lora["total"] == full["total"] + lora["trainable"]  # the base plus its adapters
    # before the step: fp32 parameters and AdamW's two states of what trains (and the inputs)
    assert full["static_bytes"] >= 12 * full["total"]
    # ... and the same inputs and buffers, up to AdamW's 4-byte step counters (one per trainable tensor)
    rest_full = full["static_bytes"] - 12 * full["total"]
    rest_lora = lora["static_bytes"] - 4 * lora["total"] - 8 * lora["trainable"]
    assert abs(rest_full - rest_lora) <= 4 * 200
    # the step: gradients of what trains on top; offload takes activations off the device
    assert full["peak_bytes"] > lora["peak_bytes"] > off["peak_bytes"] > off["static_bytes"]
    assert full["tokens"] == 2 * 4 * 4


def test_checkpointing_lowers_the_lora_peak_and_a_bf16_base_halves_the_linears(cases):
    lora, lora_ac, bf16_ac = cases["lora16"], cases["lora16 ac"], cases["lora16+bf16 ac"]
    assert lora_ac["ac"] == bf16_ac["ac"] == "full" and lora_ac["static_bytes"] == lora["static_bytes"]
    # checkpointing keeps each block's input only: less than every activation
    assert lora_ac["peak_bytes"] < lora["peak_bytes"]
    # bf16 storage: every frozen plain linear (the blocks' projections and FFN, the patch and text
    # projections) at 2 bytes instead of 4; the fp32-compute layers and the adapters as they were
    with torch.device("meta"):
        plain = SpacetimeDiT(get_preset("tiny", depth=DEPTH))
    linears = sum(p.numel() for m in plain.modules() if type(m) is torch.nn.Linear for p in m.parameters())
    assert lora_ac["static_bytes"] - bf16_ac["static_bytes"] == 2 * linears
    assert bf16_ac["trainable"] == lora_ac["trainable"] and bf16_ac["peak_bytes"] < lora_ac["peak_bytes"]


def _result(case: str, ac: str, peak: int, step: float, trainable: int = 1, total: int = 11) -> dict:
    return dict(case=case, ac=ac, shape="s", tokens=4, trainable=trainable, total=total, step_s=step) | dict(
        peak_bytes=peak, static_bytes=1
    )


def test_rows_relate_each_case_to_full_under_its_checkpointing_at_its_shape():
    results = [
        _result("full", "none", 400, 2.0, trainable=10, total=10),
        _result("lora16", "none", 100, 1.0),
        _result("full", "full", 200, 4.0, trainable=10, total=10),
        _result("lora16", "full", 100, 5.0),
    ]
    rows = rows_with_ratios(results)
    assert [r["checkpointing"] for r in rows] == ["none", "none", "full", "full"]
    assert [r["peak / full"] for r in rows] == ["1.000", "0.250", "1.000", "0.500"]
    assert [r["step / full"] for r in rows] == ["1.000", "0.500", "1.000", "1.250"]
    assert rows[1]["trainable %"] == "9.09"
    # the targets: peak <= 0.40 of full's and step <= full's, said for each LoRA case
    lines = verdicts(results)
    assert len(lines) == 2
    assert (
        "none, 4 tokens, lora16: peak / full 0.250 (≤ 0.40: holds); step / full 0.500 (≤ 1: holds)"
        in lines[0]
    )
    assert "peak / full 0.500 (≤ 0.40: does NOT hold); step / full 1.250 (≤ 1: does NOT hold)" in lines[1]
