"""Atomic checkpoints, retention, safe loading (single process; the multi-rank path is in test_torchrun)."""

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
