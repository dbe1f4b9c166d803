"""The trainer under torchrun (2 CPU processes, gloo, FSDP2): preemption agreed across ranks, exact resume."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.launch.conftest import ROOT, losses_by_step, metrics, run


def torchrun_cmd(run_dir, *extra, overrides=()):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "launch.train",
        f"run.dir={run_dir}",
        *overrides,
        *extra,
    ]


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
    tmp_path, overrides
):
    extra = ["train.steps=12", "checkpoint.every=0"]
    ref = tmp_path / "ref"
    proc = run(torchrun_cmd(ref, *extra, overrides=overrides))
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = {s: v[0] for s, v in losses_by_step(metrics(ref)).items()}
    assert sorted(want) == list(range(1, 13))

    rd = tmp_path / "preempted"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    agent = subprocess.Popen(
        torchrun_cmd(rd, *extra, overrides=overrides),
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and agent.poll() is None:
        if (rd / "metrics.jsonl").is_file() and any(r["step"] >= 2 for r in metrics(rd)):
            break
        time.sleep(0.05)
    pid = _worker_pid(agent.pid, rank=1)
    assert pid is not None, "rank 1 not found (did the run end early?)"
    os.kill(pid, signal.SIGUSR2)  # only rank 1 is told; rank 0 must learn it at the step boundary
    out, _ = agent.communicate(timeout=180)
    assert agent.returncode == 0, out[-3000:]
    stopped = max(r["step"] for r in metrics(rd))
    assert stopped < 12 and f"preempted at step {stopped}" in out
    saved = rd / "checkpoints" / f"step-{stopped:08d}"
    assert (saved / "COMPLETE").is_file()
    assert (saved / "rank-00000.pt").is_file() and (saved / "rank-00001.pt").is_file()

    proc = run(torchrun_cmd(rd, *extra, overrides=overrides))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = losses_by_step(metrics(rd))
    assert sorted(got) == list(range(1, 13))
    for step, values in got.items():
        assert all(v == want[step] for v in values), (step, values, want[step])
