"""The trainer under torchrun (2 CPU processes, gloo, FSDP2): preemption agreed across ranks, exact resume."""

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.launch.conftest import (
    PREEMPT_RUN,
    PREEMPT_STEPS,
    assert_same_losses,
    losses_by_step,
    metrics,
    reference_losses_in_process,
    run,
    start,
    torchrun_cmd,
    wait_for,
)

pytestmark = pytest.mark.slow


def _worker_pid(agent: int, rank: int) -> int | None:
    """The training process of ``rank`` among the torchrun agent's children."""
    for task in Path(f"/proc/{agent}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(child)
    return None


def test_preemption_signal_on_one_rank_saves_the_same_step_everywhere_and_resumes_exactly(
    tmp_path, overrides, torchrun_reference
):
    extra = PREEMPT_RUN  # the reference's run (shared with the SLURM requeue test)

    rd = tmp_path / "preempted"
    agent = start(
        torchrun_cmd(rd, *extra, overrides=overrides),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for(lambda: (rd / "metrics.jsonl").is_file() and any(r["step"] >= 2 for r in metrics(rd)), agent)
    pid = _worker_pid(agent.pid, rank=1)
    assert pid is not None, "rank 1 not found (did the run end early?)"
    os.kill(pid, signal.SIGUSR2)  # only rank 1 is told; rank 0 must learn it at the step boundary
    out, _ = agent.communicate(timeout=180)
    assert agent.returncode == 0, out[-3000:]
    stopped = max(r["step"] for r in metrics(rd))
    assert stopped < PREEMPT_STEPS and f"preempted at step {stopped}" in out
    saved = rd / "checkpoints" / f"step-{stopped:08d}"
    assert (saved / "COMPLETE").is_file()
    assert (saved / "rank-00000.pt").is_file() and (saved / "rank-00001.pt").is_file()

    proc = run(torchrun_cmd(rd, *extra, overrides=overrides))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_losses(rd, torchrun_reference)


def _losses(run_dir) -> dict[int, float]:
    return {s: v[-1] for s, v in losses_by_step(metrics(run_dir)).items()}


def test_context_and_tensor_parallel_training_matches_one_process_and_reshards_on_resume(tmp_path, overrides):
    """The trainer under cp=2 and tp=2 logs the single-process losses (the same batch, noise and initial
    weights on every rank of a group); a cp=2 checkpoint resumes under tp=2 (DCP resharding)."""
    extra = ["train.steps=3", "checkpoint.every=2", "run.progress=lines"]
    want = reference_losses_in_process(tmp_path / "one", *overrides, *extra, steps=3)
    for layout in ("parallel.cp=2", "parallel.tp=2"):
        rd = tmp_path / layout
        proc = run(torchrun_cmd(rd, *extra, layout, overrides=overrides))
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = _losses(rd)
        assert got.keys() == want.keys()
        for step, loss in got.items():
            assert abs(loss - want[step]) <= 1e-5 * want[step], (layout, step, loss, want[step])

    rd = tmp_path / "parallel.cp=2"
    shutil.rmtree(rd / "checkpoints" / "step-00000003")
    proc = run(torchrun_cmd(rd, "train.steps=4", "checkpoint.every=2", "parallel.tp=2", overrides=overrides))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "saved under another parallel layout" in proc.stderr
    assert max(r["step"] for r in metrics(rd)) == 4
