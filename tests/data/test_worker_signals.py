"""Data workers and stop signals, with real DataLoader worker processes.

A worker ignores the signals a terminal or a scheduler sends to every process of a job (the trainer
decides when to stop: see ``tests/launch/test_reliability.py``, which signals a trainer's whole
process group), but still obeys the SIGTERM its own loader sends when shutting it down, so a worker
stuck in a slow read cannot keep the trainer from exiting."""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap

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
