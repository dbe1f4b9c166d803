"""Checkpoints that cannot be trusted: crafted ``.metadata``, damaged files, a kill during retention, a
full disk. Real DCP checkpoints written by torch.distributed.checkpoint, real files, real signals."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import pytest
import torch

from launch.finetune import read_weights
from parallel import checkpoint as ckpt
from parallel import checkpoint_safety as safety
from parallel.checkpoint import CheckpointError, CheckpointUnreadable
from parallel.checkpoint_safety import file_sum


def _state(value: float) -> dict:
    return {
        "model": {"w": torch.full((64,), value), "b": torch.arange(8.0)},
        "ema": {"w": torch.full((64,), value / 2), "b": torch.zeros(8)},
        "step": torch.tensor(int(value)),
    }


def _save(root, step: int, keep: int = 0):
    return ckpt.save(root, step, _state(step), {"own": torch.tensor([step])}, rank=0, keep=keep)


def _rewrite_marker(path, **changes):
    """What someone who can write the checkpoint can do: change the marker to match their files."""
    m = json.loads((path / ckpt.MARKER).read_text())
    m.update(changes)
    (path / ckpt.MARKER).write_text(json.dumps({k: v for k, v in m.items() if v is not None}))


# ---- 1. no code runs from a checkpoint's .metadata ------------------------------------------------------
class _Touch:
    """Unpickling this creates ``path``: a stand-in for any code a crafted checkpoint would run."""

    def __init__(self, path):
        self.path = pathlib.Path(path)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


def plant_metadata_payload(path, target) -> None:
    """Hide a payload in a real checkpoint's ``.metadata`` (which still describes the real data, so an
    unprotected load would succeed silently) and fix the marker's checksum, as an attacker would."""
    md = pickle.loads((path / ".metadata").read_bytes())  # our own file, written by this test
    md.planner_data = {**md.planner_data, "_": _Touch(target)}
    (path / ".metadata").write_bytes(pickle.dumps(md))
    files = json.loads((path / ckpt.MARKER).read_text())["files"]
    files[".metadata"] = file_sum(path / ".metadata")
    _rewrite_marker(path, files=files)


def test_crafted_metadata_is_refused_on_resume_and_init_from(tmp_path):
    root, target = tmp_path / "c", tmp_path / "pwned"
    path = _save(root, 1)
    intact = tmp_path / "intact"
    shutil.copytree(path, intact)
    plant_metadata_payload(path, target)
    refused = r"\.metadata: refused to load pathlib\.Path\.touch"
    with pytest.raises(CheckpointError, match=refused):
        ckpt.load(path, _state(0), rank=0)  # resume
    with pytest.raises(CheckpointError, match=refused):
        read_weights(path)  # init.from (and launch.sample, which reads weights through it)
    _rewrite_marker(path, files=None, checksum=None)  # a marker from before checksums: still refused
    with pytest.raises(CheckpointError, match=refused):
        ckpt.load(path, _state(0), rank=0)
    assert not target.exists()

    state = _state(0)  # the same checkpoint without the payload loads
    assert ckpt.load(intact, state, rank=0) == {"own": torch.tensor([1])}
    assert torch.equal(state["model"]["w"], torch.full((64,), 1.0))
    weights, _ = read_weights(intact)
    assert torch.equal(weights["w"], torch.full((64,), 0.5))  # the EMA by default


def test_metadata_pointing_outside_the_checkpoint_is_refused(tmp_path):
    path = _save(tmp_path / "c", 1)
    md = pickle.loads((path / ".metadata").read_bytes())
    info = next(iter(md.storage_data.values()))
    info.relative_path = "../../etc/passwd"
    (path / ".metadata").write_bytes(pickle.dumps(md))
    _rewrite_marker(path, files=None, checksum=None)
    with pytest.raises(CheckpointError, match="not a plain file of this checkpoint"):
        ckpt.read_full(path, {"model"})


# ---- 2. integrity ----------------------------------------------------------------------------------------
def _flip(f):
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x04
    f.write_bytes(bytes(data))


def _truncate(f):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


DAMAGE = {
    "bit_flip": ("__0_0.distcp", _flip, "crc32 .* the marker says .*damaged"),
    "truncated_data": ("__0_0.distcp", _truncate, "bytes, the marker says"),
    "truncated_rank_file": ("rank-00000.pt", _truncate, "bytes, the marker says"),
    "missing_data": ("__0_0.distcp", lambda f: f.unlink(), "missing"),
    "missing_rank_file": ("rank-00000.pt", lambda f: f.unlink(), "missing"),
    "empty_marker": (ckpt.MARKER, lambda f: f.write_text(""), "empty or invalid marker"),
    "invalid_marker": (ckpt.MARKER, lambda f: f.write_text('{"step": 2, "fi'), "empty or invalid marker"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_newest_checkpoint_is_named_and_skipped(kind, tmp_path, caplog):
    from launch.config import load_config, to_yaml

    root = tmp_path / "run" / "checkpoints"
    files = {"config.yaml": to_yaml(load_config())}
    for step in (1, 2):
        ckpt.save(root, step, _state(step), {"own": step}, rank=0, files=files)
    name, damage, what = DAMAGE[kind]
    bad = root / "step-00000002" / name
    damage(bad)

    with caplog.at_level(logging.WARNING, logger="parallel.checkpoint"):
        assert ckpt.latest(root) == root / "step-00000001"  # what resume starts from
    said = caplog.text
    assert "step-00000002 is damaged" in said and str(bad) in said and "falling back to" in said
    with pytest.raises(CheckpointError, match=f"{bad}.*{what}"):
        ckpt.verify(root / "step-00000002")
    with pytest.raises(CheckpointError, match=f"{bad}.*{what}"):
        ckpt.load(root / "step-00000002", _state(0), rank=0)
    with pytest.raises(CheckpointError, match=f"{bad}.*{what}"):
        read_weights(root / "step-00000002")  # init.from naming this checkpoint: no silent fallback

    from safetensors import safe_open

    from launch.export import export

    out = export(tmp_path / "run", tmp_path / "export")  # a run directory: its newest intact checkpoint
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "1"


def test_only_damaged_checkpoints_is_an_error_not_a_fresh_start(tmp_path):
    root = tmp_path / "checkpoints"
    path = _save(root, 1)
    _flip(path / "__0_0.distcp")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint.*__0_0\.distcp"):
        ckpt.latest(root)
    assert ckpt.latest(tmp_path / "nothing") is None  # no checkpoint at all: a fresh start


def test_checkpoint_from_before_checksums_loads_with_a_warning(tmp_path, caplog):
    path = _save(tmp_path / "c", 1)
    _rewrite_marker(path, files=None, checksum=None, world_size=None)
    with caplog.at_level(logging.WARNING, logger="parallel.checkpoint"):
        assert ckpt.latest(tmp_path / "c") == path
    assert "before per-file checksums" in caplog.text
    state = _state(0)
    assert ckpt.load(path, state, rank=0) == {"own": torch.tensor([1])}
    assert torch.equal(state["ema"]["w"], torch.full((64,), 0.5))
    # without checksums, .metadata still says how long each data file must be
    _truncate(path / "__0_0.distcp")
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: \d+ bytes, \.metadata needs \d+"):
        ckpt.load(path, _state(0), rank=0)


def test_truncated_rank_file_of_an_old_checkpoint_is_named(tmp_path):
    path = _save(tmp_path / "c", 1)
    _rewrite_marker(path, files=None, checksum=None, world_size=None)
    _truncate(path / "rank-00000.pt")
    with pytest.raises(
        CheckpointError, match=r"rank-00000\.pt: unreadable \(truncated or not a torch file\)"
    ):
        ckpt.load(path, _state(0), rank=0)


def test_missing_rank_file_is_damage_not_another_layout(tmp_path):
    path = _save(tmp_path / "c", 1)
    assert json.loads((path / ckpt.MARKER).read_text())["world_size"] == 1
    assert ckpt.rank_state(path, 1) is None  # saved by one rank: rank 1 legitimately has no file
    (path / "rank-00000.pt").unlink()
    with pytest.raises(CheckpointError, match=r"rank-00000\.pt: missing"):
        ckpt.load(path, _state(0), rank=0)
    _rewrite_marker(path, files=None, checksum=None)  # even without checksums, the world size says so
    with pytest.raises(CheckpointError, match=r"rank-00000\.pt: missing, but the checkpoint was saved by 1"):
        ckpt.rank_state(path, 0)


def _prune_killed_at(root, n: int) -> int:
    """Run ``prune(root, keep=1)`` in a forked child that is SIGKILLed just before its ``n``-th file
    deletion (an audit hook sees each ``os.remove`` before it happens); returns the wait status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns to pytest
        seen = [0]

        def hook(event, args):
            if event == "os.remove":
                seen[0] += 1
                if seen[0] == n:
                    os.kill(os.getpid(), signal.SIGKILL)

        sys.addaudithook(hook)
        ckpt.prune(root, keep=1)
        os._exit(0)
    return os.waitpid(pid, 0)[1]


def test_kill_during_retention_never_leaves_a_marked_incomplete_checkpoint(tmp_path):
    template = tmp_path / "template"
    for step in (1, 2):
        _save(template, step)
    n_files = len(list((template / "step-00000001").iterdir()))
    for n in range(1, n_files + 1):
        root = tmp_path / f"kill{n}"
        shutil.copytree(template, root)
        status = _prune_killed_at(root, n)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        for _, path in ckpt.complete_checkpoints(root):
            ckpt.verify(path)  # whatever has a marker is whole
        assert ckpt.latest(root) == root / "step-00000002"
        ckpt.prune(root, keep=1)  # the next retention removes what the killed one left
        assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]


def _in_child_as_nobody(fn) -> dict:
    """``fn()`` in a forked child that runs as user ``nobody`` when this process is root (root opens any
    file whatever its mode); its JSON result, or ``{"error": repr}``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns to pytest
        try:
            os.close(r)
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            out = fn()
        except BaseException as e:  # noqa: BLE001 (reported to the parent)
            out = {"error": repr(e)}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def test_unreadable_file_is_an_error_not_damage():
    """A file the reader may not open (EACCES: a checkpoint copied by another user with mode 0600) says
    nothing of its content: an error naming the checkpoint, the file and the error, no fallback to an
    older step (a chmod, and the run resumes from its newest)."""
    base = Path(
        tempfile.mkdtemp(prefix="ckpt-unreadable-")
    )  # outside pytest's 0700 folder: nobody reaches it
    try:
        base.chmod(0o755)
        root = base / "checkpoints"
        for step in (1, 2):
            _save(root, step)
        bad = root / "step-00000002" / "__0_0.distcp"
        bad.chmod(0)

        def child() -> dict:
            said = {}
            for name, call in (
                ("latest", lambda: ckpt.latest(root, quarantine=True)),
                ("verify", lambda: ckpt.verify(root / "step-00000002")),
            ):
                try:
                    said[name] = f"returned {call()}"
                except CheckpointUnreadable as e:
                    said[name] = str(e)
            return said

        got = _in_child_as_nobody(child)
        listing = sorted(os.listdir(root))
    finally:
        shutil.rmtree(base)
    assert "error" not in got, got.get("error")
    for said in got.values():
        assert f"checkpoint {root / 'step-00000002'} could not be checked" in said, said
        assert f"{bad}: could not be read (Permission denied)" in said, said
    assert listing == ["step-00000001", "step-00000002"]


def _fail_reads(path: Path, name: str) -> None:
    """Make reading file ``name`` of the checkpoint at ``path`` fail with a real EIO from the kernel: a
    symlink to /proc/self/mem (the reading process's memory, whose offset 0 is never mapped), which the
    marker lists with the size stat gives it, as a file on failing storage keeps its size."""
    f = path / name
    f.unlink()
    f.symlink_to("/proc/self/mem")
    files = json.loads((path / ckpt.MARKER).read_text())["files"]
    files[name] = {"size": 0, "crc32": "00000000"}
    _rewrite_marker(path, files=files)


@pytest.mark.parametrize("fault", ["EIO", "MemoryError summing", "MemoryError unpickling"])
def test_a_file_that_cannot_be_read_stops_the_resume_and_moves_nothing(fault, tmp_path, monkeypatch):
    """A transient fault while verifying the newest checkpoint (EIO, ESTALE, no memory) must not send the
    run back to an older step nor move the newest aside: an error naming the checkpoint, the file and the
    error; once the storage answers, the newest is resumed. EIO is real (see :func:`_fail_reads`); a
    MemoryError is injected into the checksumming or the reading of ``.metadata`` (a real one needs an
    address-space limit under which torch itself cannot run)."""
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        _save(root, step)
    newest = root / "step-00000002"
    kept = tmp_path / "kept"
    shutil.copytree(newest, kept)
    f = newest / "__0_0.distcp"
    if fault == "EIO":
        _fail_reads(newest, f.name)
        said = f"{f}: could not be read (Input/output error)"
    elif fault == "MemoryError summing":
        real_sum = safety.file_sum

        def no_memory(p):
            if p == f:
                raise MemoryError
            return real_sum(p)

        monkeypatch.setattr(safety, "file_sum", no_memory)
        said = f"{newest}: MemoryError while checking it"
    else:
        from parallel import checkpoint_metadata

        def no_memory(self):
            raise MemoryError

        monkeypatch.setattr(checkpoint_metadata._Unpickler, "load", no_memory)
        said = f"{newest}: MemoryError while checking it"
    for attempt in (
        lambda: ckpt.latest(root, quarantine=True),  # the trainer's resume
        lambda: ckpt.latest(root),  # export, sampling of a run directory
        lambda: ckpt.load(newest, _state(0), rank=0),
        lambda: read_weights(newest),  # init.from
    ):
        with pytest.raises(CheckpointUnreadable) as e:
            attempt()
        assert f"checkpoint {newest} could not be checked: {said}" in str(e.value)
        assert sorted(os.listdir(root)) == ["step-00000001", "step-00000002"]  # nothing moved aside
    monkeypatch.undo()
    shutil.rmtree(newest)
    shutil.copytree(kept, newest)  # the storage answers again
    assert ckpt.latest(root, quarantine=True) == newest  # the fault was not remembered as damage


# ---- 3. a full disk ---------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A real 512 KiB file system (tmpfs; mounting needs root)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.mark.parametrize("big", ["state", "rank_state"])
def test_full_disk_is_reported_and_keeps_the_previous_checkpoint(big, small_disk):
    root = small_disk / "checkpoints"
    _save(root, 1)
    huge = torch.zeros(256 * 1024)  # 1 MiB: more than the disk holds
    state, own = (_state(2), {"own": huge}) if big == "rank_state" else ({"w": huge}, {})
    with pytest.raises(CheckpointError) as e:
        ckpt.save(root, 2, state, own, rank=0)
    msg = str(e.value)
    assert "checkpoint step-00000002 not saved: no space left on the device writing" in msg
    assert str(root / ".tmp-step-00000002") in msg and "earlier checkpoints are kept" in msg
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001"]  # the partial one removed
    assert ckpt.latest(root) == root / "step-00000001"
    restored = _state(0)
    ckpt.load(root / "step-00000001", restored, rank=0)
    assert torch.equal(restored["model"]["w"], torch.full((64,), 1.0))


_FSIZE_CHILD = """
import resource, signal, sys, torch
from parallel import checkpoint as ckpt
root = sys.argv[1]
ckpt.save(root, 1, {"w": torch.ones(16)}, {}, rank=0)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
try:
    ckpt.save(root, 2, {"w": torch.ones(16)}, {"own": torch.zeros(64 * 1024)}, rank=0)
except ckpt.CheckpointError as e:
    print(e)
"""


@pytest.mark.slow
def test_write_failure_of_a_rank_file_is_reported(tmp_path):
    """The same path without root: a file-size limit (RLIMIT_FSIZE) makes the rank file's write fail."""
    root = tmp_path / "c"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    proc = subprocess.run(
        [sys.executable, "-c", _FSIZE_CHILD, str(root)], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step-00000002 not saved: file too large" in proc.stdout and "rank-00000.pt" in proc.stdout
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001"]


def test_checksum_speed_is_reported(tmp_path, capsys):
    """Not a benchmark: the CRC of 32 MiB must equal zlib's, and its rate is printed for the report."""
    import time

    data = os.urandom(32 << 20)
    (tmp_path / "f").write_bytes(data)
    t = time.perf_counter()
    got = file_sum(tmp_path / "f")
    rate = 32 / (time.perf_counter() - t)
    assert got == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}
    print(f"crc32 of a cached file: {rate:.0f} MiB/s")


# ---- two ranks: shared checksumming and verification, one rank failing to write ---------------------------
def _two_ranks(case: str, out_dir: Path) -> dict:
    import resource

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if case == "unreadable":
        return _two_ranks_unreadable(out_dir)
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,))
    root = out_dir / "c"
    full = torch.arange(64.0).reshape(8, 8)
    for step in (1, 2):  # each rank writes its half of w into its own __<rank>_0.distcp
        ckpt.save(root, step, {"w": distribute_tensor(full * step, mesh, [Shard(0)])}, {"rank": rank}, rank)
    files = json.loads((root / "step-00000002" / ckpt.MARKER).read_text())
    dist.barrier()
    if rank == 0:
        _flip(root / "step-00000002" / "__1_0.distcp")  # rank 1's shard
    dist.barrier()
    found = ckpt.latest(root, distributed=True, quarantine=True)  # rank 0 moves step 2 aside
    target = {"w": distribute_tensor(torch.zeros(8, 8), mesh, [Shard(0)])}
    own = ckpt.load(found, target, rank)
    # a fault on one rank only: its rank file passes a file-size limit (RLIMIT_FSIZE, soft, per process)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if rank == 1:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        own_state = {"big": torch.zeros(64 * 1024)} if rank == 1 else {}
        ckpt.save(root, 3, {"w": distribute_tensor(full, mesh, [Shard(0)])}, own_state, rank)
        error = None
    except CheckpointError as e:
        error = str(e)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    errors: list = [None, None]
    dist.all_gather_object(errors, error)
    return {
        "files": files,
        "found": found.name,
        "own": own,
        "w": target["w"].full_tensor(),
        "errors": errors,
        "listing": sorted(os.listdir(root)),
    }


def _two_ranks_unreadable(out_dir: Path) -> dict:
    """A file of rank 1's share of the newest checkpoint (``rank-00000.pt``: a data file would also look
    truncated to rank 0, which checks ``.metadata`` against the sizes) fails with EIO: both ranks raise."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    rank, mesh, root = dist.get_rank(), init_device_mesh("cpu", (2,)), out_dir / "u"
    for step in (1, 2):
        w = distribute_tensor(torch.full((8, 8), float(step)), mesh, [Shard(0)])
        ckpt.save(root, step, {"w": w}, {"rank": rank}, rank)
    dist.barrier()
    if rank == 0:
        _fail_reads(root / "step-00000002", "rank-00000.pt")
    dist.barrier()
    try:
        ckpt.latest(root, distributed=True, quarantine=True)
        error = None
    except CheckpointUnreadable as e:
        error = str(e)
    errors: list = [None, None]
    dist.all_gather_object(errors, error)
    dist.barrier()
    return {"errors": errors, "listing": sorted(os.listdir(root))}


def _two_rank_worker(rank: int, world: int, port: int, cases: list, out_dir: str) -> None:
    from tests.parallel.group import serve

    serve(rank, world, port, cases, out_dir, lambda c: _two_ranks(c, Path(out_dir)), name=lambda c: c)


@pytest.mark.slow
def test_two_ranks_share_verification_and_agree_on_failures(tmp_path):
    from tests.parallel.group import run_group

    cases = ["two_ranks", "unreadable"]
    results = run_group(2, _two_rank_worker, cases, tmp_path, names=cases)
    # rank 1 alone could not read its share of the newest checkpoint: both raised, nothing moved aside
    unreadable = results["unreadable"]
    assert "error" not in unreadable, unreadable.get("error")
    newest = tmp_path / "u" / "step-00000002"
    first, second = unreadable["errors"]
    assert first == second and f"checkpoint {newest} could not be checked" in first
    assert f"{newest / 'rank-00000.pt'}: could not be read (Input/output error)" in first
    assert unreadable["listing"] == ["step-00000001", "step-00000002"]

    got = results["two_ranks"]
    assert "error" not in got, got.get("error")
    m = got["files"]
    assert m["world_size"] == 2
    assert sorted(m["files"]) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "rank-00000.pt",
        "rank-00001.pt",
    ]
    # rank 1's damaged shard sent both ranks back to step 1, whole (step 2 moved aside by rank 0)
    assert got["found"] == "step-00000001" and got["own"] == {"rank": 0}
    assert torch.equal(got["w"], torch.arange(64.0).reshape(8, 8))
    # rank 1 alone failed to write: both ranks raised the same error, nothing was committed
    assert got["errors"][0] == got["errors"][1] and "rank-00001.pt" in got["errors"][0]
    assert "step-00000003 not saved: file too large" in got["errors"][0]
    assert got["listing"] == ["damaged-step-00000002", "step-00000001"]
