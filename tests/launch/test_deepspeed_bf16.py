"""DeepSpeed bf16 as on a GPU: a real engine (ZeRO-1, 2, 3 on 2 gloo ranks) under the trainer's outer
autocast, seen by DeepSpeed as an active CUDA autocast (:func:`tests.dit.emulate.cuda_autocast_flag`);
samples and validation loss through ``launch.evaluate`` on ``engine.module``.

What this establishes: DeepSpeed's ``torch_autocast`` keeps the module's weights fp32 and runs the
forward under bf16 autocast even though an outer autocast is active (with DeepSpeed's ``bf16`` section
the same emulation fails as a GPU does: "mat1 and mat2 must have the same dtype"); training, validation
and samples compute in bf16 and agree with one process. Only a GPU confirms the CUDA kernels' values.
"""

from __future__ import annotations

import pytest
import torch

from dit.diffusion import make_objective
from launch import evaluate
from launch.batches import Conditioner
from tests.dit.helpers import random_model
from tests.launch.deepspeed_bf16_worker import Case, job, reference_loss, worker
from tests.parallel.group import run_group

pytestmark = pytest.mark.slow


CONTROL = Case("old_bf16_section", 2, old_bf16_section=True)  # first: DeepSpeed's autocast state is global
CASES = [CONTROL, Case("zero1", 1), Case("zero2", 2), Case("zero3", 3)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    got = run_group(2, worker, CASES, tmp_path_factory.mktemp("ds-bf16"))
    for name, r in got.items():
        assert "error" not in r, f"{name}:\n{r['error']}"
    return got


@pytest.fixture(scope="module")
def one_process_samples():
    cfg = job(2)
    cond = Conditioner(cfg, torch.device("cpu"))
    videos = evaluate.draw_samples(random_model(cfg.model.arch), make_objective(cfg.diffusion), cond, cfg, 3)
    return torch.from_numpy(videos)


def test_emulation_reproduces_the_gpu_failure_of_the_bf16_section(results):
    got = results[CONTROL.name]
    assert got["param_dtype"] == "torch.bfloat16"
    assert "the same dtype" in got["train_error"]  # (mat1 and mat2 | m1 and m2) must have …
    assert "the same dtype" in got["module_error"]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_trains_validates_and_samples_in_bf16_over_fp32_weights(results, one_process_samples, stage):
    got = results[f"zero{stage}"]
    assert got["param_dtypes"] == ["torch.float32"]  # the module's weights are the fp32 masters
    assert got["train_dtypes"] == got["val_dtypes"] == got["sample_dtypes"] == ["torch.bfloat16"]
    assert not got["cache_used"]  # no bf16 copy of every weight kept through a forward (ZeRO-3)
    assert got["applied"] and 0 < got["grad_norm"] < float("inf")
    cfg = job(stage)
    # ZeRO-3 replaces F.linear by DeepSpeed's own (a matmul, then the bias added in bf16; addmm adds
    # it before rounding): the same arithmetic up to bf16 rounding
    rtol = 1e-5 if stage < 3 else 8e-3
    for rank, losses in enumerate(got["losses"]):
        torch.testing.assert_close(losses, reference_loss(cfg, rank), rtol=rtol, atol=0)
    # the validation loss is the bf16 model's, within bf16 error of the fp32 one (and not equal to it)
    assert got["val"] != got["val_fp32"] and abs(got["val"] - got["val_fp32"]) < 2e-2 * got["val_fp32"]
    videos = got["videos"]
    assert videos.shape == one_process_samples.shape == (2, 1, 16, 16, 3)
    diff = (videos.int() - one_process_samples.int()).abs()
    if stage < 3:
        assert diff.max() == 0  # the same arithmetic as one process, bit for bit
    else:  # DeepSpeed's linear (above), through two guided sampler steps of a random model
        assert diff.float().mean() < 3 and diff.max() < 32
    assert videos.float().std() > 5  # pictures, not a constant
    # rank 1 ran the DiT but neither loaded the text encoder nor decoded
    assert got["rank1_videos_shape"][0] == 0
    assert got["loaded"] == [{"text": True, "codec": True}, {"text": False, "codec": False}]
