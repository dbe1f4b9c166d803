"""Atomic checkpoints, retention, safe loading (single process; the multi-rank path is in test_torchrun)."""

import logging
import subprocess

import pytest
import torch

from parallel import checkpoint as ckpt


def _save(root, step, value, keep=0):
    return ckpt.save(root, step, {"w": torch.full((3,), float(value))}, {"own": step}, rank=0, keep=keep)


def test_incomplete_directories_are_ignored_and_retention_keeps_the_newest(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        _save(root, step, step, keep=2)
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [2, 3]
    # a crash mid-save leaves a temp dir; a copied dir without its marker is not complete either
    (root / ".tmp-step-00000004").mkdir()
    (root / "step-00000005").mkdir()
    assert ckpt.latest(root).name == "step-00000003"
    assert ckpt.resolve(tmp_path).name == "step-00000003"  # a run dir resolves to its newest
    state = {"w": torch.zeros(3)}
    own = ckpt.load(ckpt.latest(root), state, rank=0)
    assert torch.equal(state["w"], torch.full((3,), 3.0)) and own == {"own": 3}
    assert ckpt.prune(root, keep=1) == [root / "step-00000002"]
    assert ckpt.prune(root, keep=1) == []  # the newest is never deleted
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.resolve(tmp_path / "nothing")


class Payload:
    """An arbitrary class: unpickling it would run code of the checkpoint's choosing."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_non_tensor_items_load_with_weights_only(tmp_path, capsys):
    root = tmp_path / "c"
    ckpt.save(root, 1, {"w": torch.ones(2), "obj": Payload()}, {}, rank=0)
    for attempt in (
        lambda: ckpt.load(ckpt.latest(root), {"w": torch.zeros(2), "obj": None}, rank=0),
        lambda: ckpt.read_full(ckpt.latest(root), {"obj"}),
    ):
        try:
            attempt()
        except BaseException as e:  # DCP wraps it in a CheckpointException (a BaseException)
            assert "Unsupported global: GLOBAL print" in str(e)
        else:
            raise AssertionError("a pickled callable was loaded")
    assert "unpickled!" not in capsys.readouterr().out


def _flip(path):
    f = path / "__0_0.distcp"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x04
    f.write_bytes(bytes(data))


def _names(root):
    return sorted(p.name for p in root.iterdir())


def test_resume_moves_damaged_newer_checkpoints_aside(tmp_path, caplog):
    """Resume falls back past a damaged step 300 to step 200; retention ranks by step, so a damaged 300
    left in place would outrank the run's new saves (keep=1 would delete step 250 and leave only 300)."""
    root = tmp_path / "checkpoints"
    for step in (100, 200, 300):
        _save(root, step, step)
    _flip(root / "step-00000300")
    assert ckpt.latest(root) == root / "step-00000200"  # export, sampling: read only
    assert (root / "step-00000300").is_dir()
    with caplog.at_level(logging.WARNING, logger="parallel.checkpoint"):
        found = ckpt.latest(root, quarantine=True)  # the trainer's resume
    assert found == root / "step-00000200"
    assert _names(root) == ["damaged-step-00000300", "step-00000100", "step-00000200"]
    assert (
        f"moved the damaged checkpoint {root / 'step-00000300'} aside to {root / 'damaged-step-00000300'}"
        in (caplog.text)
    )
    ckpt.load(found, {"w": torch.zeros(3)}, rank=0)
    _save(root, 250, 250, keep=1)
    assert _names(root) == ["damaged-step-00000300", "step-00000250"]
    assert ckpt.latest(root, quarantine=True) == root / "step-00000250"
    # another damaged step 300 later: moved aside next to the first, which is never overwritten
    _save(root, 300, 300)
    _flip(root / "step-00000300")
    assert ckpt.latest(root, quarantine=True) == root / "step-00000250"
    assert _names(root) == ["damaged-step-00000300", "damaged-step-00000300-2", "step-00000250"]


def test_retention_never_deletes_the_checkpoint_just_saved(tmp_path):
    """Without moving aside (a resume that only read, as export does), a damaged newer checkpoint
    outranks the new save: retention keeps the new save all the same, and the next resume finds it."""
    root = tmp_path / "checkpoints"
    for step in (100, 200, 300):
        _save(root, step, step)
    _flip(root / "step-00000300")
    assert ckpt.latest(root) == root / "step-00000200"
    assert _save(root, 250, 250, keep=1) == root / "step-00000250"
    assert _names(root) == ["step-00000250", "step-00000300"]
    assert ckpt.latest(root) == root / "step-00000250"


@pytest.fixture
def immutable():
    """Make files undeletable for real (``chattr +i``: root, on ext4, xfs or btrfs); undone afterwards."""
    made = []

    def make(path):
        proc = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot make a file immutable here (chattr +i): {proc.stderr.strip()}")
        made.append(path)

    yield make
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], check=False)


def test_a_retention_failure_is_a_warning_and_the_checkpoint_is_saved(tmp_path, caplog, immutable):
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        _save(root, step, step)
    immutable(root / "step-00000001" / ckpt.MARKER)  # cannot go: step 1 stays whole
    immutable(root / "step-00000002" / "__0_0.distcp")  # its marker goes, this file stays
    with caplog.at_level(logging.WARNING, logger="parallel.checkpoint"):
        assert _save(root, 3, 3, keep=1) == root / "step-00000003"
    said = caplog.text
    assert "retention could not delete" in said and "not saved" not in said
    assert (
        f"{root / 'step-00000001' / ckpt.MARKER}: Operation not permitted (the checkpoint is left whole)"
        in said
    )
    assert f"{root / 'step-00000002' / '__0_0.distcp'}: Operation not permitted" in said
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [1, 3]
    assert ckpt.latest(root) == root / "step-00000003"
    ckpt.verify(root / "step-00000001")  # left whole
    state = {"w": torch.zeros(3)}
    assert ckpt.load(root / "step-00000003", state, rank=0) == {"own": 3}
