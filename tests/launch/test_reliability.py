"""The trainer as a careless user or a scheduler treats it: a changed model on resume, a learning rate
that diverges, two runs on one directory, SIGTERM and Ctrl-C, malformed overrides.

Real CLI processes where the process is what is tested (signals, a second writer, an exit status as a
shell sees it), the CLI's main or the trainer in this process otherwise (CI time); real checkpoints and
real signals; no mocks."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from launch.config import load_config
from launch.runlock import LOCK, RunDirLocked, RunLock
from tests.launch.conftest import (
    assert_same_losses,
    losses_by_step,
    metrics,
    reference_losses_in_process,
    run,
    start,
    train_cmd,
    train_in_process,
    wait_for,
)


# ---- 7: resume refuses another architecture or objective ---------------------------------------
@pytest.mark.slow
def test_resume_with_another_model_or_objective_is_refused_naming_the_keys(tmp_path, overrides):
    rd = tmp_path / "run"
    train_in_process(rd, *overrides, "train.steps=2", "data.num_workers=0")  # the checkpoint to refuse
    saved_config = (rd / "config.yaml").read_text()

    # one run with three changes (one launch, not three): the refusal must name every one of them, so
    # each key is compared on its own
    changes = {
        "model.arch.depth=2": "model.arch.depth: 4 → 2",
        "model.arch.fps_conditioning=false": "model.arch.fps_conditioning: True → False",
        "diffusion.objective=ddpm": "diffusion.objective: 'flow' → 'ddpm'",
    }
    proc = run(train_cmd(rd, "train.steps=4", "data.num_workers=0", *changes, overrides=overrides))
    assert proc.returncode == 2, proc.stderr[-3000:]
    for key in changes.values():
        assert key in proc.stderr, (key, proc.stderr[-3000:])
    assert "init.from=" in proc.stderr and "step-00000002" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert max(r["step"] for r in metrics(rd)) == 2  # nothing trained
    assert (rd / "config.yaml").read_text() == saved_config  # the reference is not overwritten
    assert not (rd / LOCK).exists()  # a refused run leaves the directory unlocked

    # settings that do not change what the weights mean (steps, lr, data) still resume (this process)
    logged = train_in_process(rd, *overrides, "train.steps=3", "train.lr=5e-4", "data.num_workers=0")
    assert "resumed from" in logged, logged[-3000:]


@pytest.mark.slow
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


def _main_exits(capsys, *argv) -> tuple[int, str]:
    """``python -m launch.train ARGV`` through its ``main`` in this process, for a run that must stop
    before training: (exit status, stderr)."""
    from launch.train import main

    with pytest.raises(SystemExit) as stop:
        main(list(argv))
    return stop.value.code, capsys.readouterr().err


def test_lr_inf_on_the_command_line_stops_before_training(tmp_path, overrides, capsys):
    """Through the CLI's ``main`` in this process (CI time; a config error exits as in
    test_malformed_overrides_are_errors_naming_the_override's real processes)."""
    code, err = _main_exits(capsys, f"run.dir={tmp_path / 'r'}", *overrides, "train.lr=inf")
    assert code == 2 and "train.lr=inf" in err, err[-2000:]
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.slow
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
        assert stats.grad_norm == stats.grad_norm  # the loss and gradients were finite
        assert not all(torch.isfinite(p).all() for p in tr.model.parameters())
        with pytest.raises(FloatingPointError, match="no longer finite"):
            tr.checkpoint()
    finally:
        tr.close()
    assert sorted(p.name for p in (rd / "checkpoints").iterdir()) == ["step-00000001"]


# ---- 10: one writer per run directory ----------------------------------------------------------
@pytest.mark.slow
def test_a_second_run_on_the_same_directory_is_refused_and_the_first_is_untouched(tmp_path, overrides):
    rd = tmp_path / "run"
    extra = ["train.steps=8", "checkpoint.every=4", "data.num_workers=0"]
    want = reference_losses_in_process(tmp_path / "ref", *overrides, *extra, steps=8)
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


def test_a_run_dir_that_cannot_hold_a_lock_is_a_clear_error(tmp_path, capsys):
    """Through the CLI's ``main`` in this process (CI time; a refused lock exits as in
    test_a_second_run_on_the_same_directory_is_refused_and_the_first_is_untouched's real process): an
    error, not a traceback, is what escapes."""
    (tmp_path / "afile").write_text("x")
    code, err = _main_exits(capsys, f"run.dir={tmp_path / 'afile' / 'run'}", "train.steps=1")
    assert code == 2 and "cannot create its lock file" in err, err[-2000:]
    assert "Traceback" not in err


HOLDER = """
import sys, time
from launch.runlock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def _holder(run_dir):
    """Another process that takes the lock for real (and holds it until killed)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.dirname(__file__)))},
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_owner_is_refused_and_a_dead_one_taken_over_whatever_its_file_says(tmp_path):
    """Liveness is the owner's flock, which the kernel drops however the owner dies: a live owner is
    refused even when its file claims another host; a SIGKILLed one is taken over even when its file
    claims a live process in another container (what a restarted container leaves behind)."""
    lock = tmp_path / LOCK
    holder = _holder(tmp_path)
    try:
        with pytest.raises(RunDirLocked, match=f"pid {holder.pid} on {socket.gethostname()}.*{LOCK}"):
            RunLock(tmp_path).acquire()
        lock.write_text(json.dumps({"pid": 1, "host": "elsewhere"}))  # what the file says is not asked
        with pytest.raises(RunDirLocked, match="pid 1 on elsewhere"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock.write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "pidns": 1}))
    held = RunLock(tmp_path).acquire()
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    with pytest.raises(RunDirLocked, match=f"pid {os.getpid()}"):  # and now it is ours, flock and all
        subprocess_acquire(tmp_path)
    held.release()
    assert not lock.exists()


def subprocess_acquire(run_dir):
    code = "import sys; from launch.runlock import RunLock; RunLock(sys.argv[1]).acquire()"
    proc = run([sys.executable, "-c", code, str(run_dir)])
    if proc.returncode != 0:
        raise RunDirLocked(proc.stderr)


def test_without_flock_only_a_provably_dead_owner_is_stale(monkeypatch):
    """The fallback for file systems without flock (Lustre mounted noflock): what the file says."""
    from launch.runlock import _me, _stale, _start_time

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    me = _me()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = {"host": me["host"], "pidns": me["pidns"], "slurm_job": None}
    try:
        assert _stale({**here, "pid": live.pid, "start": _start_time(live.pid)}, me) is None
        assert (
            _stale({**here, "pid": dead.pid, "start": None}, me) == f"pid {dead.pid} on {me['host']} is gone"
        )
        assert "now another process" in _stale({**here, "pid": live.pid, "start": "1"}, me)
        assert _stale({**here, "host": "elsewhere", "pid": dead.pid}, me) is None  # cannot be checked
        assert _stale({**here, "pidns": 1, "pid": dead.pid}, me) is None  # another container's pids
        job = {"host": "elsewhere", "pid": live.pid, "slurm_job": "77"}
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        assert "requeue #1" in _stale({**job, "slurm_restart": 0}, _me())  # requeued: the old one is dead
        assert _stale({**job, "slurm_restart": 1}, _me()) is None
    finally:
        live.kill()
        live.wait()


def test_a_stale_lock_judged_by_two_starters_is_taken_by_one(tmp_path):
    """Without flock: two processes that judged the same dead owner; the first takes the lock over,
    the second, acting on its stale verdict, must not remove the first's fresh lock."""
    (tmp_path / LOCK).write_text(json.dumps({"pid": 1, "host": "gone"}))
    judged = (tmp_path / LOCK).read_text()
    first = RunLock(tmp_path).acquire()  # takes over the dead owner's lock
    fresh = (tmp_path / LOCK).read_text()
    assert fresh != judged
    assert RunLock(tmp_path)._take_over(judged, {}) is False  # a verdict about another lock: put back
    assert (tmp_path / LOCK).read_text() == fresh
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK]  # nothing left aside
    first.release()


# ---- 11: SIGTERM and Ctrl-C stop at a step boundary with a checkpoint -----------------------------
SIGNAL_RUN = ["train.steps=30", "checkpoint.every=0", "data.num_workers=1", "run.progress=lines"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, overrides):
    rd = tmp_path_factory.mktemp("uninterrupted") / "run"
    return reference_losses_in_process(rd, *overrides, *SIGNAL_RUN, steps=30)


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


@pytest.mark.slow
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
    # the signals are the subprocess's; the rerun that resumes from its checkpoint runs in this process
    train_in_process(rd, *overrides, *SIGNAL_RUN)
    assert_same_losses(rd, uninterrupted)


CTRL_C_TWICE = """
import datetime, os, signal
import torch.distributed as dist
from launch.distributed import Preemption

signals = Preemption("SIGUSR2")
os.kill(os.getpid(), signal.SIGTERM)
assert signals.agreed() == Preemption.STOP and signals.received == signal.SIGTERM
os.kill(os.getpid(), signal.SIGUSR2)
assert signals.agreed() == Preemption.PREEMPT
store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
print("blocked", flush=True)
try:  # blocked in C++ with the GIL released, as in a hung collective: no Python handler runs here
    store.wait(["never"], datetime.timedelta(seconds=60))
except Exception:
    pass
print("still alive", flush=True)
"""


def test_a_second_ctrl_c_ends_a_process_blocked_in_a_collective(tmp_path):
    """SIGTERM is a stop request and the preemption signal a requeue request; while the main thread
    is blocked in C++ (a store wait standing in for a hung collective), the first Ctrl-C still gets
    its one-line notice and the second ends the process at once."""
    err = tmp_path / "err.txt"
    with open(err, "w") as e:
        proc = start([sys.executable, "-c", CTRL_C_TWICE], stdout=subprocess.PIPE, stderr=e, text=True)
    try:
        assert proc.stdout.readline().strip() == "blocked", err.read_text()
        os.kill(proc.pid, signal.SIGINT)
        assert wait_for(lambda: "Ctrl-C: stopping after this step" in err.read_text(), proc, timeout=30)
        time.sleep(0.1)  # a person's second press (presses within 20 ms count as one)
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=40) == 130, err.read_text()  # well before the 60 s wait ends
    finally:
        proc.kill()
    assert "still alive" not in proc.stdout.read()
    assert err.read_text().count("Ctrl-C: stopping after this step") == 1
    assert "aborted (second Ctrl-C)" in err.read_text()


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT", "SIGUSR1", "SIGFOO"])
def test_a_preemption_signal_that_also_means_stop_is_refused(name):
    with pytest.raises(ValueError, match="run.preempt_signal"):
        load_config(None, [f"run.preempt_signal={name}"])


# ---- 12: malformed overrides name the override -------------------------------------------------
@pytest.mark.parametrize(
    "override, says, real",
    [
        # an unquoted glob is a YAML alias; a real process: the exit status and stderr a shell sees
        pytest.param("data.shards=*.tar", "'data.shards=\"*.tar\"'", True, marks=pytest.mark.slow),
        # the same main in this process (CI time)
        ("train.steps=[1", "override 'train.steps=[1'", False),
        ("train.steps", "expected key=value", False),
    ],
)
def test_malformed_overrides_are_errors_naming_the_override(tmp_path, capsys, override, says, real):
    if real:
        proc = run(train_cmd(tmp_path / "r", override))
        code, err = proc.returncode, proc.stderr
    else:
        code, err = _main_exits(capsys, f"run.dir={tmp_path / 'r'}", override)
    assert code == 2 and says in err, err[-2000:]
    assert "Traceback" not in err
