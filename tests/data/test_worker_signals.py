"""Data workers and stop signals, with real DataLoader worker processes.

A worker ignores the signals a terminal or a scheduler sends to every process of a job (the trainer
decides when to stop: see ``tests/launch/test_reliability.py``, which signals a trainer's whole
process group), but still obeys the SIGTERM its own loader sends when shutting it down, so a worker
stuck in a slow read cannot keep the trainer from exiting."""

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.slow


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent(
    """
    import sys
    from data.buckets import Bucket, BucketConfig
    from data.pipeline import DataConfig, build_loader

    # the shard's command writes one good tar, then keeps the pipe open: the worker that read it
    # waits for the command to end, long after its batches are out
    cfg = DataConfig(
        shards=f"pipe:cat {sys.argv[1]}; sleep 300", allow_pipe=True, num_workers=1, seed=1, shuffle_buffer=0,
        buckets=BucketConfig([Bucket(1, 32, 32, 1), Bucket(4, 32, 32, 1)], fps=8),
    )
    batches = iter(build_loader(cfg))
    next(batches)
    print("got a batch", flush=True)
    sys.exit(0)  # the loader is mid-epoch, its worker blocked: exiting must end it
    """
)


def test_a_worker_blocked_in_a_read_does_not_keep_the_trainer_from_exiting(tmp_path):
    from data.synthetic import generate

    generate(tmp_path / "shards", num=4, seed=1, val_num=0, samples_per_shard=4, frames=(12, 16))
    shard = sorted((tmp_path / "shards").glob("train-*.tar"))[0]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    # output to files: the shard command's `sleep` inherits them, and would hold pipes open
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(shard)], cwd=ROOT, env=env, stdout=o, stderr=e,
            start_new_session=True,
        )  # fmt: skip
    try:
        # the worker's command sleeps 300 s: a worker that ignored its loader's SIGTERM would hold
        # the exit that long (multiprocessing waits for it), far past this bound
        proc.wait(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the orphaned `sleep`, whatever happened
    assert "got a batch" in out.read_text(), err.read_text()[-3000:]
    assert proc.returncode == 0, err.read_text()[-3000:]


def _worker(init, ready):
    init(0)  # what torch's worker loop does with worker_init_fn, in the worker
    ready.set()
    time.sleep(60)
    os._exit(3)  # never reached unless every signal below was ignored


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_workers_ignore_job_wide_signals_under_every_start_method(method):
    """Under spawn and forkserver (newer Pythons' default) a worker inherits no handler and its parent
    is not the trainer: it still ignores the trainer's preemption signal (here a custom one), Ctrl-C
    and a job-wide SIGTERM, and still obeys SIGTERM once its loader is shutting it down."""
    from data.worker_signals import StopFlag
    from launch.distributed import Preemption

    signals = Preemption("SIGPWR")  # the trainer's handlers, installed before the loader's workers start
    try:
        flag = StopFlag()
        ctx = multiprocessing.get_context(method)
        ready = ctx.Event()
        proc = ctx.Process(target=_worker, args=(flag.worker_init_fn(), ready))
        proc.start()
        assert ready.wait(60)
        for sig in (signal.SIGPWR, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            os.kill(proc.pid, sig)
        proc.join(1)  # a worker that obeyed any of them would have exited by now
        assert proc.exitcode is None
        flag.set()  # the loader shuts its workers down: SIGTERM now ends the worker
        os.kill(proc.pid, signal.SIGTERM)
        proc.join(60)
        assert proc.exitcode == 0
    finally:
        signals.close()
        if proc.is_alive():
            proc.kill()
