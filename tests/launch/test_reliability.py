"""The trainer as a careless user or a scheduler treats it: a changed model on resume, a learning rate
that diverges, two runs on one directory, SIGTERM and Ctrl-C, malformed overrides.

Real CLI processes, real checkpoints and real signals; no mocks."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from launch.config import load_config
from launch.runlock import LOCK, RunDirLocked, RunLock
from tests.launch.conftest import (
    assert_same_losses,
    losses_by_step,
    metrics,
    reference_losses,
    run,
    start,
    train_cmd,
    wait_for,
)


# ---- 7: resume refuses another architecture or objective ---------------------------------------
def test_resume_with_another_model_or_objective_is_refused_naming_the_keys(tmp_path, overrides):
    rd = tmp_path / "run"
    proc = run(train_cmd(rd, "train.steps=2", "data.num_workers=0", overrides=overrides))
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved_config = (rd / "config.yaml").read_text()

    for change, key in (
        ("model.arch.depth=2", "model.arch.depth: 4 → 2"),
        ("model.arch.fps_conditioning=false", "model.arch.fps_conditioning: True → False"),
        ("diffusion.objective=ddpm", "diffusion.objective: 'flow' → 'ddpm'"),
    ):
        proc = run(train_cmd(rd, "train.steps=4", "data.num_workers=0", change, overrides=overrides))
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert key in proc.stderr and "init.from=" in proc.stderr and "step-00000002" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert max(r["step"] for r in metrics(rd)) == 2  # nothing trained
        assert (rd / "config.yaml").read_text() == saved_config  # the reference is not overwritten
        assert not (rd / LOCK).exists()  # a refused run leaves the directory unlocked

    # settings that do not change what the weights mean (steps, lr, data) still resume
    proc = run(train_cmd(rd, "train.steps=3", "train.lr=5e-4", "data.num_workers=0", overrides=overrides))
    assert proc.returncode == 0 and "resumed from" in proc.stderr, proc.stderr[-3000:]


def test_resume_compares_only_what_changes_the_weights_meaning():
    import yaml

    from launch.config import resume_differences, to_yaml

    def diffs(before, after):
        return resume_differences(
            yaml.safe_load(to_yaml(load_config(None, before))), load_config(None, after)
        )

    assert diffs([], ["model.arch.attention_backend=math"]) == []  # the same attention, computed otherwise
    assert diffs([], ["diffusion.num_timesteps=500"]) == []  # a DDPM setting, in a flow run
    assert diffs([], ["model.arch.max_latent_size=[8,8,8]"]) == []  # only sizes a learned table
    ddpm = ["diffusion.objective=ddpm"]
    assert diffs(ddpm, [*ddpm, "diffusion.num_timesteps=500"]) == ["diffusion.num_timesteps: 1000 → 500"]
    assert diffs([], ["model.arch.text_dim=128"]) == ["model.arch.text_dim: 384 → 128"]


# ---- 8: non-finite weights are never saved; numeric config is checked --------------------------
@pytest.mark.parametrize(
    "bad, key",
    [
        ("train.lr=inf", "train.lr"),
        ("train.lr=.nan", "train.lr"),
        ("train.grad_clip=-1", "train.grad_clip"),
        ("train.warmup=-3", "train.warmup"),
        ("data.num_workers=-1", "data.num_workers"),
        ("train.betas=[0.9,1.0]", "train.betas.1"),
        ("sample.cfg=inf", "sample.cfg"),
    ],
)
def test_numeric_settings_out_of_range_are_errors_naming_the_key(bad, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(None, [bad])


def test_lr_inf_on_the_command_line_stops_before_training(tmp_path, overrides):
    proc = run(train_cmd(tmp_path / "r", "train.lr=inf", overrides=overrides))
    assert proc.returncode == 2 and "train.lr=inf" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_weights_that_go_non_finite_after_an_update_are_never_saved(tmp_path, overrides):
    """The update itself overflows (finite loss and gradients, an infinite step size): the weights
    become NaN; the trainer refuses to write them and the newest checkpoint stays the good one."""
    from launch.train import setup

    rd = tmp_path / "run"
    cfg = load_config(None, [f"run.dir={rd}", *overrides, "data.num_workers=0", "train.ema_decay=0.9"])
    tr = setup(cfg)
    try:
        batches = iter(tr.loader)
        tr.train_step(batches)
        good = tr.checkpoint()
        assert good.name == "step-00000001"
        for g in tr.opt.param_groups:
            g["lr"] = float("inf")  # what an exploding schedule does; the config check refuses inf
        stats = tr.train_step(batches)
        assert stats["grad_norm"] == stats["grad_norm"]  # the loss and gradients were finite
        assert not all(torch.isfinite(p).all() for p in tr.model.parameters())
        with pytest.raises(FloatingPointError, match="no longer finite"):
            tr.checkpoint()
    finally:
        tr.close()
    assert sorted(p.name for p in (rd / "checkpoints").iterdir()) == ["step-00000001"]


# ---- 10: one writer per run directory ----------------------------------------------------------
def test_a_second_run_on_the_same_directory_is_refused_and_the_first_is_untouched(tmp_path, overrides):
    rd = tmp_path / "run"
    extra = ["train.steps=8", "checkpoint.every=4", "data.num_workers=0"]
    want = reference_losses(train_cmd(tmp_path / "ref", *extra, overrides=overrides), 8)
    first = start(train_cmd(rd, *extra, overrides=overrides), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert wait_for((rd / LOCK).is_file, first), "the first run ended before taking its lock"
    os.kill(first.pid, signal.SIGSTOP)  # hold it mid-run, so the second surely meets a live writer
    try:
        second = run(train_cmd(rd, *extra, overrides=overrides))
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"in use by pid {first.pid} on {socket.gethostname()}" in second.stderr
    assert first.returncode == 0, err[-3000:]
    # only the first run wrote: every step logged once, with the uninterrupted losses
    assert all(len(v) == 1 for v in losses_by_step(metrics(rd)).values())
    assert_same_losses(rd, want)
    assert not (rd / LOCK).exists()  # released on exit


def test_a_run_dir_that_cannot_hold_a_lock_is_a_clear_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    proc = run(train_cmd(tmp_path / "afile" / "run", "train.steps=1"))
    assert proc.returncode == 2 and "cannot create its lock file" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def _write_lock(path, **owner):
    from launch.runlock import _pid_namespace

    path.parent.mkdir(parents=True, exist_ok=True)
    mine = {"host": socket.gethostname(), "pidns": _pid_namespace(), "slurm_job": None}
    path.write_text(json.dumps({**mine, **owner}))


def _start_time(pid):
    from launch.runlock import _start_time

    return _start_time(pid)


def test_lock_owners_that_are_certainly_dead_are_taken_over_and_live_ones_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    lock = tmp_path / LOCK
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        # a live process on this host: refused, the message names it and the lock file
        _write_lock(lock, pid=live.pid, start=_start_time(live.pid))
        with pytest.raises(RunDirLocked, match=f"pid {live.pid}.*{LOCK}"):
            RunLock(tmp_path).acquire()
        # another host cannot be checked from here: refused
        _write_lock(lock, pid=dead.pid, host="elsewhere", start=None)
        with pytest.raises(RunDirLocked, match="on elsewhere"):
            RunLock(tmp_path).acquire()
        # the same host name in another pid namespace (a container): its pids mean nothing here
        _write_lock(lock, pid=dead.pid, pidns=1, start=None)
        with pytest.raises(RunDirLocked, match=f"pid {dead.pid}"):
            RunLock(tmp_path).acquire()
        # unreadable: nothing says its owner is dead
        lock.write_text("")
        with pytest.raises(RunDirLocked, match="unreadable lock"):
            RunLock(tmp_path).acquire()
        # a dead pid, and a live pid whose start time says it is another process now: taken over
        for owner in ({"pid": dead.pid, "start": None}, {"pid": live.pid, "start": "1"}):
            _write_lock(lock, **owner)
            held = RunLock(tmp_path).acquire()
            assert json.loads(lock.read_text())["pid"] == os.getpid()
            held.release()
            assert not lock.exists()
        # the same SLURM job after a requeue, even from another host: the old holder is dead
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        _write_lock(lock, pid=live.pid, host="elsewhere", slurm_job="77", slurm_restart=0)
        RunLock(tmp_path).acquire().release()
        _write_lock(lock, pid=live.pid, host="elsewhere", slurm_job="77", slurm_restart=1)
        with pytest.raises(RunDirLocked, match="SLURM job 77"):
            RunLock(tmp_path).acquire()
    finally:
        live.kill()
        live.wait()


def test_a_stale_lock_judged_by_two_starters_is_taken_by_one(tmp_path):
    """Two processes that judged the same dead owner: the first takes the lock over; the second,
    acting on its stale verdict, must not remove the first's fresh lock."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path / LOCK, pid=dead.pid, start=None)
    judged = (tmp_path / LOCK).read_text()
    first = RunLock(tmp_path).acquire()  # takes over the dead owner's lock
    fresh = (tmp_path / LOCK).read_text()
    assert fresh != judged
    late = RunLock(tmp_path)
    assert late._take_over(judged) is False  # the verdict was about another lock: it is put back
    assert (tmp_path / LOCK).read_text() == fresh
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK]  # nothing left aside
    first.release()


# ---- 11: SIGTERM and Ctrl-C stop at a step boundary with a checkpoint -----------------------------
SIGNAL_RUN = ["train.steps=30", "checkpoint.every=0", "data.num_workers=1", "run.progress=lines"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, overrides):
    rd = tmp_path_factory.mktemp("uninterrupted") / "run"
    return reference_losses(train_cmd(rd, *SIGNAL_RUN, overrides=overrides), 30)


def _signal_mid_run(rd, overrides, send):
    proc = start(
        train_cmd(rd, *SIGNAL_RUN, overrides=overrides),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = wait_for(lambda: (rd / "metrics.jsonl").is_file() and len(metrics(rd)) >= 2, proc)
    assert seen, "the run ended before its second step"
    send(proc)
    out, err = proc.communicate(timeout=300)
    return proc, out, err


@pytest.mark.parametrize(
    "name, send, why",
    [
        ("sigterm", lambda p: os.kill(p.pid, signal.SIGTERM), "SIGTERM"),
        # what SLURM's scancel and a terminal's Ctrl-C do: every process of the group, data workers too
        ("sigterm-group", lambda p: os.killpg(p.pid, signal.SIGTERM), "SIGTERM"),
        ("ctrl-c", lambda p: os.killpg(p.pid, signal.SIGINT), "SIGINT"),
    ],
)
def test_sigterm_and_ctrl_c_save_at_the_step_boundary_and_resume_exactly(
    tmp_path, overrides, uninterrupted, name, send, why
):
    rd = tmp_path / name
    proc, out, err = _signal_mid_run(rd, overrides, send)
    assert proc.returncode == 0, err[-3000:]
    stopped = max(r["step"] for r in metrics(rd))
    assert stopped < 30 and f"stopped at step {stopped} ({why})" in out, out[-2000:]
    assert (rd / "checkpoints" / f"step-{stopped:08d}" / "COMPLETE").is_file()
    if why == "SIGINT":
        assert err.count("Ctrl-C: stopping after this step") == 1  # one line, not one per process
    proc = run(train_cmd(rd, *SIGNAL_RUN, overrides=overrides))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_losses(rd, uninterrupted)


CTRL_C_TWICE = """
import os, signal, time
from launch.distributed import Preemption

signals = Preemption("SIGUSR2")
os.kill(os.getpid(), signal.SIGTERM)
assert signals.agreed() == Preemption.STOP and signals.received == signal.SIGTERM
os.kill(os.getpid(), signal.SIGUSR2)
assert signals.agreed() == Preemption.PREEMPT
os.kill(os.getpid(), signal.SIGINT)
assert signals.agreed() == Preemption.PREEMPT  # the strongest request stands
print("first Ctrl-C handled", flush=True)
os.kill(os.getpid(), signal.SIGINT)
time.sleep(60)  # blocked in C, as in a collective: the second Ctrl-C must still end the process
print("still alive", flush=True)
"""


def test_ctrl_c_asks_once_then_a_second_ctrl_c_kills_at_once():
    """The handler itself, signalled for real: SIGTERM is a stop request, the preemption signal a
    requeue request, the first Ctrl-C a stop request with one line of explanation, and the second
    ends the process by SIGINT at once, even inside a blocking call."""
    proc = run([sys.executable, "-c", CTRL_C_TWICE], timeout=50)
    assert proc.returncode == -signal.SIGINT, proc.stderr[-3000:]
    assert "first Ctrl-C handled" in proc.stdout and "still alive" not in proc.stdout
    assert proc.stderr.count("Ctrl-C: stopping after this step") == 1
    assert "aborted (second Ctrl-C)" in proc.stderr


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT", "SIGUSR1", "SIGFOO"])
def test_a_preemption_signal_that_also_means_stop_is_refused(name):
    with pytest.raises(ValueError, match="run.preempt_signal"):
        load_config(None, [f"run.preempt_signal={name}"])


# ---- 12: malformed overrides name the override -------------------------------------------------
@pytest.mark.parametrize(
    "override, says",
    [
        ("data.shards=*.tar", "'data.shards=\"*.tar\"'"),  # an unquoted glob is a YAML alias
        ("train.steps=[1", "override 'train.steps=[1'"),
        ("train.steps", "expected key=value"),
    ],
)
def test_malformed_overrides_are_errors_naming_the_override(tmp_path, override, says):
    proc = run(train_cmd(tmp_path / "r", override))
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
