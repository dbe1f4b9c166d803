"""Preempt-and-requeue through real SLURM daemons on localhost: `python -m launch.slurm submit` →
train.sbatch → srun → torchrun → 2 gloo ranks of `launch.train`; SIGUSR2 from outside → the ranks
agree → checkpoint → `scontrol requeue` → the requeued job resumes and finishes.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.config import CONFIG_DIR
from tests.launch.conftest import PREEMPT_RUN, PREEMPT_STEPS, ROOT, assert_same_losses, metrics
from tests.launch.slurm_cluster import SlurmCluster, start_slurm_cluster

# An override with a space, quotes and shell metacharacters: it must arrive as one argv item.
TRICKY = 'note=it\'s a $HOME; `true` && "x"'


@pytest.fixture(scope="module")
def slurm_cluster():
    with start_slurm_cluster() as cluster:
        yield cluster


def _wait_for(predicate, what: str, cluster: SlurmCluster, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{cluster.logs()}")
        time.sleep(0.1)


@pytest.mark.slow
def test_usr2_saves_requeues_and_resumes_with_the_losses_of_an_uninterrupted_run(
    slurm_cluster: SlurmCluster, tmp_path: Path, overrides, torchrun_reference
):
    steps = PREEMPT_RUN  # the uninterrupted torchrun run of torchrun_reference

    # The job inherits this environment (sbatch --export=ALL): the venv's torchrun on PATH, the
    # project importable, and SLURM_CONF for the trainer's `scontrol requeue`.
    env = slurm_cluster.env
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    run_dir = tmp_path / "run"
    argv = [
        sys.executable,
        "-m",
        "launch.slurm",
        "submit",
        str(CONFIG_DIR / "tiny.yaml"),
        f"run.dir={run_dir}",
    ]
    argv += [*overrides, *steps, "--nodes", "1", "--gpus-per-node", "0", "--procs-per-node", "2"]
    argv += ["--time", "10", "--job-name", "requeue-test"]
    result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    jobid = result.stdout.strip()
    assert jobid.isdigit(), jobid

    jsonl = run_dir / "metrics.jsonl"
    _wait_for(lambda: jsonl.is_file() and len(metrics(run_dir)) >= 2, "the first steps", slurm_cluster, 90)
    # What an admin or a preempting scheduler does; --signal=USR2@lead takes the same path.
    slurm_cluster.run("scancel", "--signal=USR2", jobid)
    info = slurm_cluster.wait_for_job(jobid, {"COMPLETED"}, timeout=150)
    log = (tmp_path / "slurm-logs" / f"requeue-test-{jobid}.log").read_text()

    assert int(info["Restarts"]) == 1, (info, log)
    # srun reports a task (torchrun) killed by a signal as "task 0: User defined signal 2".
    assert "User defined signal 2" not in log, log
    assert "preempted at step" in log and "resumed from" in log and f"done: {PREEMPT_STEPS} steps" in log, log
    assert_same_losses(run_dir, torchrun_reference, log)


def test_submit_dry_run_builds_sbatch_argv(tmp_path: Path, capsys):
    from launch.slurm.__main__ import SBATCH_SCRIPT, main

    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    # another entry point (its config is its own business): user text only ever becomes argv items
    common = [str(config), "a=1", TRICKY, "--time", "1:00:00", "--dry-run", "--module", "tests.stand_in"]
    assert main(["submit", *common, "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu"]) == 0
    gpu = shlex.split(capsys.readouterr().out)
    assert gpu[:4] == ["sbatch", "--parsable", "--nodes=2", "--time=1:00:00"]
    assert {"--gpus-per-node=8", "--signal=USR2@120", "--partition=gpu", "--job-name=c"} <= set(gpu)
    assert gpu[-7:] == [str(SBATCH_SCRIPT), "8", "tests.stand_in", "--config", str(config), "a=1", TRICKY]

    assert main(["submit", *common, "--gpus-per-node", "0", "--signal-lead", "300"]) == 0
    cpu = shlex.split(capsys.readouterr().out)
    assert not any(arg.startswith(("--gpus", "--gres")) for arg in cpu)
    assert "--signal=USR2@300" in cpu and cpu[cpu.index(str(SBATCH_SCRIPT)) + 1] == "1"

    with pytest.raises(SystemExit):
        main(["submit", str(config), "not-an-override", "--gpus-per-node", "0", "--time", "5"])


def test_submit_loads_the_training_config_before_queueing(capsys):
    """A ``???`` path left unset (or a bad key) is an error at submit time, naming it, not a job that
    waits in the queue to fail at start-up."""
    from launch.config import CONFIG_DIR
    from launch.slurm.__main__ import main

    args = ["submit", str(CONFIG_DIR / "video-1b3.yaml"), "data.shards=/l", "data.codec=pixel"]
    args += ["data.text_encoder=minilm", "--nodes", "8", "--gpus-per-node", "8", "--time", "1", "--dry-run"]
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2 and "data.val_shards" in capsys.readouterr().err
    assert main([*args, "data.val_shards=/v"]) == 0 and "sbatch" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*args, "data.val_shards=/v", "train.stepz=3"])


@pytest.mark.slow
def test_a_sweep_runs_as_one_job_array(slurm_cluster: SlurmCluster, tmp_path: Path, overrides):
    """``benchmarks.sweep run --slurm``: one array, each task one run (under torchrun, as a training job
    would), then ``collect`` finds them finished with their wall time."""
    from benchmarks import sweep

    grid = tmp_path / "grid.yaml"
    grid.write_text(
        json.dumps({"overrides": [*overrides, "data.num_workers=1"], "widths": [32], "head_dim": 16,
                    "budgets": [1.5e9], "lrs": [1e-3, 2e-3]})
    )  # fmt: skip
    out = tmp_path / "sweep"
    runs = sweep.plan(grid, out)["runs"]
    assert len(runs) == 2 and all(3 <= r["steps"] <= 20 for r in runs), runs

    env = slurm_cluster.env
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "benchmarks.sweep", "run", str(out), "--slurm", "--gpus-per-node", "0"]
    result = subprocess.run(
        [*argv, "--time", "10"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    jobid = result.stdout.strip()
    assert jobid.isdigit(), jobid
    _wait_for(
        lambda: all(sweep.status(r)["status"] == "ok" for r in runs), "both array tasks", slurm_cluster, 240
    )
    rows = sweep.collect(out)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    _wait_for(lambda: all(r["wall_s"] > 0 for r in sweep.collect(out)), "the attempt records", slurm_cluster)
    for i in range(2):
        assert "done:" in (out / "slurm-logs" / f"sweep-sweep-{jobid}_{i}.log").read_text()
