import json
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dit.config import get_preset
from dit.flops import count, mfu, peak_flops
from tests.dit.helpers import inputs, random_model

CASES = [
    ("tiny", {}),
    ("tiny", {"attention_layout": "factorized", "mlp": "swiglu", "modulation": "per_block"}),
    ("tiny", {"fps_conditioning": True, "cond_channels": 5, "pos_embed": "learned", "patch_size": (2, 2, 2)}),
    ("dit-s/2", {"depth": 2, "hidden_size": 96, "num_heads": 4}),
    (
        "dit-s/2",
        {
            "depth": 3,
            "hidden_size": 96,
            "num_heads": 4,
            "attention_layout": "factorized",
            "modulation": "shared",
        },
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("per_frame_t", [False, True])
@pytest.mark.parametrize("name,overrides", CASES)
def test_macs_equal_flop_counter(name, overrides, per_frame_t):
    # FlopCounterMode does not count CPU SDPA kernels, so count the math backend's explicit matmuls.
    cfg = get_preset(name, attention_backend="math", **overrides)
    model = random_model(cfg)
    b, t, h, w, text_len = 2, 4, 8, 12, 7
    x, times, kw = inputs(cfg, b=b, t=t, h=h, w=w, text_len=text_len)
    if per_frame_t:
        times = times[:, None].repeat(1, t)
    with FlopCounterMode(display=False) as counter:
        model(x, times, **kw)
    ours = count(cfg, t, h, w, batch=b, text_len=text_len, per_frame_t=per_frame_t)
    assert ours["flops_fwd"] == counter.get_total_flops() == 2 * ours["macs_fwd"]
    assert ours["flops_train_step"] == 3 * ours["flops_fwd"]


def test_factorized_attention_is_cheaper_at_length():
    full = count(get_preset("video-1b3"), 21, 60, 104)
    fact = count(get_preset("video-1b3", attention_layout="factorized"), 21, 60, 104)
    assert full["tokens"] == 21 * 30 * 52 == 32760
    assert fact["macs_breakdown"]["attn_scores_values"] < full["macs_breakdown"]["attn_scores_values"] / 10
    assert fact["macs_breakdown"]["mlp"] == full["macs_breakdown"]["mlp"]


@pytest.mark.slow
def test_cli_prints_one_json_object():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dit.flops",
            "video-1b3",
            "--frames",
            "21",
            "--height",
            "60",
            "--width",
            "104",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout)
    for key in ("params", "macs_fwd", "flops_fwd", "flops_train_step", "tokens"):
        assert key in result
    assert result["flops_fwd"] == 2 * result["macs_fwd"] and result["tokens"] == 32760
    assert result == json.loads(json.dumps(result | count(get_preset("video-1b3"), 21, 60, 104)))


@pytest.mark.slow
def test_cli_rejects_sizes_not_divisible_by_the_patch():
    out = subprocess.run(
        [sys.executable, "-m", "dit.flops", "tiny", "--height", "7"], capture_output=True, text=True
    )
    assert out.returncode == 2 and "--height=7" in out.stderr


def test_mfu_peaks():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 == peak_flops("NVIDIA H200")
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12 and peak_flops("NVIDIA H100 NVL") == 835e12
    assert peak_flops("Some CPU") is None and mfu(1e12, device_name="Some CPU") is None
    assert mfu(494.5e12, device_name="NVIDIA H100") == pytest.approx(0.5)
    assert mfu(2e12, peak=4e12) == 0.5
    if not torch.cuda.is_available():
        assert peak_flops() is None
