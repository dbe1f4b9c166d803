"""The training-metrics record: means over every value any rank reported since the last record
(NaN and None left out), token and FLOP totals summed over ranks, peak memory maximised, and a key
that no rank reported logged as null; one process and two gloo ranks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from launch.metrics import MEAN_KEYS, Metrics
from tests.parallel.group import run_group, serve


class _Quiet:
    def record(self, record: dict) -> None:
        pass


def _window(m: Metrics, rank: int) -> dict:
    """Rank 0 reports loss 1, 3 and a NaN; rank 1 reports loss 5 and the only grad_norm; then a
    second window with nothing but tokens."""
    if rank == 0:
        m.update(tokens=10, memory_gib=1.5, flops=2.0, loss=1.0, lr=0.1)
        m.update(tokens=10, memory_gib=0.5, flops=2.0, loss=3.0, lr=0.1, grad_norm=None)
        m.update(tokens=10, memory_gib=0.5, flops=2.0, loss=math.nan)
    else:
        m.update(tokens=7, memory_gib=4.0, flops=1.0, loss=5.0, lr=0.1, grad_norm=2.0)
    first = m.log(3)
    m.update(tokens=1, memory_gib=0.25)
    second = m.log(4, extra={"val_loss": 0.5})
    return {"first": first, "second": second}


def test_one_process_record(tmp_path):
    m = Metrics(tmp_path, True, torch.device("cpu"), tensorboard=False, progress=_Quiet())
    got = _window(m, rank=0)
    m.close()
    first, second = got["first"], got["second"]
    assert first["loss"] == pytest.approx(2.0)  # the NaN is left out, not averaged in as 0
    assert first["grad_norm"] is None and first["mfu"] is None  # nobody reported them
    assert first["tokens"] == 30 and first["flops"] == 6.0 and first["max_memory"] == 1.5
    assert second["loss"] is None and second["tokens"] == 1 and second["max_memory"] == 0.25  # reset
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [3, 4] and lines[1]["val_loss"] == 0.5
    with pytest.raises(KeyError, match="'lose'"):
        m.update(tokens=1, memory_gib=0.0, lose=1.0)


def _two(case, out_dir):
    import torch.distributed as dist

    m = Metrics(out_dir, dist.get_rank() == 0, torch.device("cpu"), tensorboard=False, progress=_Quiet())
    try:
        return _window(m, dist.get_rank())
    finally:
        m.close()


def _worker(rank: int, world: int, port: int, cases: list, out_dir: str) -> None:
    from pathlib import Path

    serve(rank, world, port, cases, out_dir, lambda c: _two(c, Path(out_dir) / f"rank{rank}"), name=str)


@pytest.mark.slow
def test_two_ranks_reduce_every_value_once(tmp_path):
    for r in range(2):
        (tmp_path / f"rank{r}").mkdir()
    got = run_group(2, _worker, ["metrics"], tmp_path, names=["metrics"])["metrics"]
    assert "error" not in got, got.get("error")
    first = got["first"]
    assert first["loss"] == pytest.approx(3.0)  # (1 + 3 + 5) / 3 values, not the mean of rank means
    assert first["grad_norm"] == pytest.approx(2.0)  # reported on rank 1 alone
    assert first["lr"] == pytest.approx(0.1)
    assert first["tokens"] == 37 and first["flops"] == 7.0 and first["max_memory"] == 4.0
    assert set(MEAN_KEYS) <= set(first)
    assert got["second"]["tokens"] == 2 and got["second"]["loss"] is None
