"""The trainer under DeepSpeed (``parallel.engine=deepspeed``, 2 CPU processes, gloo): the losses of the
FSDP trainer, exact resume (weights, EMA, losses), export and ``init.from`` from its checkpoints, and
clear errors where a DeepSpeed checkpoint cannot be resumed."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.launch.conftest import (
    assert_same_losses,
    losses_by_step,
    metrics,
    reference_losses_in_process,
    run,
    torchrun_cmd,
    train_in_process,
)

pytestmark = pytest.mark.slow


STEPS = ["train.steps=4", "run.progress=lines"]
DS = "parallel.engine=deepspeed"


def _losses(run_dir) -> dict[int, float]:
    return {s: v[-1] for s, v in losses_by_step(metrics(run_dir)).items()}


def _assert_close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for step, loss in got.items():
        assert abs(loss - want[step]) <= 1e-5 * want[step], (what, step, loss, want[step])


def _torchrun(run_dir, *extra, overrides):
    proc = run(torchrun_cmd(run_dir, *STEPS, *extra, overrides=overrides))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, overrides):
    """step → loss of the single-process FSDP trainer (4 steps), run in this process."""
    return reference_losses_in_process(tmp_path_factory.mktemp("one"), *overrides, *STEPS, steps=4)


def test_zero_stages_with_tensor_and_data_parallel_match_the_fsdp_trainer(tmp_path, overrides, one_process):
    """ZeRO-1 × megatron tp=2 logs the single-process losses; ZeRO-2 over dp=2 logs the losses of FSDP2
    over dp=2 (two data-parallel ranks read other batches than one process does)."""
    _torchrun(tmp_path / "tp", DS, "parallel.zero_stage=1", "parallel.tp=2", overrides=overrides)
    _assert_close(_losses(tmp_path / "tp"), one_process, "zero1 x tp2")

    _torchrun(tmp_path / "fsdp-dp", overrides=overrides)
    _torchrun(tmp_path / "ds-dp", DS, "parallel.zero_stage=2", overrides=overrides)
    _assert_close(_losses(tmp_path / "ds-dp"), _losses(tmp_path / "fsdp-dp"), "zero2 dp2")


def test_zero3_with_context_parallel_resumes_exactly_and_exports(tmp_path, overrides, one_process):
    rd = tmp_path / "run"
    # ZeRO-3 gathers parameters in hooks, which recomputation under checkpointing must fire again
    layout = [DS, "parallel.zero_stage=3", "parallel.cp=2", "parallel.activation_checkpointing=every_2"]
    _torchrun(rd, *layout, "checkpoint.every=2", overrides=overrides)
    first = {s: v[0] for s, v in losses_by_step(metrics(rd)).items()}
    _assert_close(first, one_process, "zero3 x cp2 + checkpointing")

    final = rd / "checkpoints" / "step-00000004"
    assert (final / "COMPLETE").is_file() and (final / "rank-00001.pt").is_file()
    saved = {name: load_file(final / name) for name in ("model.safetensors", "ema.safetensors")}
    # the EMA is an average of the weights, not a copy of them
    key = "blocks.0.attn.q.weight"
    gap = (saved["ema.safetensors"][key] - saved["model.safetensors"][key]).abs().max()
    assert 0 < gap < 0.1 * saved["model.safetensors"][key].abs().max()

    # crash after step 4's checkpoint was lost: resume from step 2, the same losses, weights and EMA
    shutil.rmtree(final)
    proc = _torchrun(rd, *layout, "checkpoint.every=2", overrides=overrides)
    assert "resumed from" in proc.stderr
    assert_same_losses(rd, first)
    for name, want in saved.items():
        got = load_file(final / name)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), name

    # export and init.from read the checkpoint's whole tensors in one process (this one: CI time)
    from launch.export import main as export

    out = tmp_path / "export"
    export([str(rd), str(out)])
    exported = load_file(out / "model.safetensors")
    assert all(torch.equal(exported[k], v) for k, v in saved["model.safetensors"].items())
    assert (out / "config.json").is_file() and (out / "ema.safetensors").is_file()
    logged = train_in_process(tmp_path / "ft", *overrides, "train.steps=1", f"init.from={rd}")
    assert f"{len(saved['ema.safetensors'])} loaded" in logged

    # ZeRO partitions do not reshard, and an FSDP run cannot take DeepSpeed's optimizer state
    proc = run(torchrun_cmd(rd, "train.steps=5", DS, "parallel.zero_stage=3", overrides=overrides))
    assert proc.returncode != 0 and "ZeRO partitions do not reshard" in proc.stderr
    assert f"init.from={final}" in proc.stderr
    proc = run(torchrun_cmd(rd, "train.steps=5", "parallel.cp=2", overrides=overrides))
    assert proc.returncode != 0 and "written by parallel.engine=deepspeed" in proc.stderr
