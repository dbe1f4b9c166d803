"""The fine-tuning memory benchmark's logic (``benchmarks.finetune_memory``) on a tiny model, in
process: the live-bytes tracker against tensors of known sizes, the trainable counts against the
planner's own adapter formula, the memory ordering of the cases, and the ratios of the report rows.
The numbers of ``video-small`` come from running the script (its dated report in benchmarks/results)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.finetune_memory import LiveBytes, rows_with_ratios, run_case
from dit.config import get_preset
from parallel.plan_lora import adapter_params


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
    kw = dict(preset="tiny", shape="2x8x8", steps=0, text_len=8, depth=2)  # no timed steps: memory only
    return {c: run_case(case=c, **kw) for c in ("full", "lora16", "lora16+offload")}


def test_trainable_parameters_and_memory_order(cases):
    arch = get_preset("tiny", depth=2)
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


def test_rows_relate_each_case_to_full_at_its_shape():
    results = [
        dict(
            case="full",
            shape="s",
            tokens=4,
            trainable=10,
            total=10,
            step_s=2.0,
            peak_bytes=400,
            static_bytes=1,
        ),
        dict(
            case="lora16",
            shape="s",
            tokens=4,
            trainable=1,
            total=11,
            step_s=1.0,
            peak_bytes=100,
            static_bytes=1,
        ),
    ]
    rows = rows_with_ratios(results)
    assert [r["peak / full"] for r in rows] == ["1.000", "0.250"]
    assert [r["step / full"] for r in rows] == ["1.000", "0.500"]
    assert rows[1]["trainable %"] == "9.09"
