"""bf16 is the same on one GPU and on N: FSDP2's bf16 parameters change neither the diffusion time, the
frame rates nor the RoPE tables the model sees, and the losses agree to bf16 tolerance.

Emulated bf16: CPU bf16 autocast where the trainer runs CUDA autocast, FSDP2's MixedPrecisionPolicy
applied on gloo by calling ``parallelize(..., bf16=True)`` directly (the trainer applies it on CUDA
only). One process keeps fp32 parameters under autocast, as a single GPU does. Only a GPU confirms
the CUDA kernels' numerics; the casts checked here are the same code on either device.
"""

from __future__ import annotations

import pytest
import torch

from tests.parallel.bf16_worker import Case, bf16_arch, bf16_batch, reference, worker
from tests.parallel.group import run_group

pytestmark = pytest.mark.slow


FSDP = Case("dp_shard2_bf16", {"dp_shard": 2})
CONTROL = Case("dp_shard2_casting_inputs", {"dp_shard": 2}, cast_forward_inputs=True)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    got = run_group(2, worker, [FSDP, CONTROL], tmp_path_factory.mktemp("bf16"))
    for name, r in got.items():
        assert "error" not in r, f"{name}:\n{r['error']}"
    return got, reference()


def test_fsdp_bf16_sees_the_fp32_inputs_of_one_process(results):
    got, want = results[0][FSDP.name], results[1]
    model_t = bf16_batch(bf16_arch())["t"] * 1000
    assert torch.equal(want["t"][:, -1], model_t)  # one process: 999.3 arrives as 999.3 (B×T times)
    assert torch.equal(got["t"], want["t"]) and got["t"].dtype == torch.float32
    assert torch.equal(got["fps"], want["fps"]) and got["fps"].dtype == torch.float32
    for a, b in zip(got["block0"]["rope"], want["block0"]["rope"], strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    # the residual stream and the modulation vectors reach the block in fp32 on both
    for r in (got, want):
        assert r["block0"]["x_dtype"] == r["block0"]["mod_dtype"] == torch.float32


def test_fsdp_bf16_gathers_the_fp32_layers_in_fp32(results):
    """The modulation vectors come from fp32 layers (time embedding, t_proj, adaLN tables): FSDP2 gathers
    those weights in fp32 (their own FSDP groups), so the vectors equal one process's to fp32 rounding
    (different batch splits of the same rows); gathered as bf16 copies they would be off by bf16's
    ~4e-3, which the control shows."""
    got, want, control = results[0][FSDP.name], results[1], results[0][CONTROL.name]
    scale = want["mod"].abs().max()
    assert scale > 0 and got["mod"].dtype == torch.float32
    assert (got["mod"] - want["mod"]).abs().max() <= 1e-6 * scale
    assert (control["mod"].float() - want["mod"]).abs().max() > 1e-4 * scale


def test_fsdp_bf16_losses_match_one_process_to_bf16_tolerance(results):
    got, want = results[0][FSDP.name], results[1]
    assert len(set(want["losses"])) == len(want["losses"])  # the step changed the weights
    for a, b in zip(got["losses"], want["losses"], strict=True):
        assert abs(a - b) <= 4e-3 * abs(b), (got["losses"], want["losses"])  # half a bf16 ulp


def test_control_fsdp_casting_forward_inputs_rounds_them(results):
    """FSDP's default policy (cast_forward_inputs=True) would hand the model bf16 times and RoPE
    tables: the checks above see it."""
    got, want = results[0][CONTROL.name], results[1]
    assert not torch.equal(got["t"], want["t"])
    assert got["t"].max() == 1000.0  # 999.3 rounded
    rope = zip(got["block0"]["rope"], want["block0"]["rope"], strict=True)
    assert all(a.dtype == torch.bfloat16 and not torch.equal(a, b) for a, b in rope)
