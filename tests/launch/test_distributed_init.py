"""Process-group set-up: the backend chosen per device (the CUDA branch as a pure function), the
collective timeout from ``parallel.timeout_minutes`` on a real gloo group and the DeviceMesh groups
made after it, TF32 on CUDA.

Only a GPU run confirms that nccl with a gloo side-backend (``cuda:nccl,cpu:gloo``) initialises with
``device_id`` and carries FSDP2's CPU-offloaded collectives; here the choice is checked as a decision,
and the timeout on a real gloo group.
"""

from __future__ import annotations

import datetime
import math
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launch.distributed import collective_timeout, enable_tf32, init_distributed, process_group_backend
from parallel.dims import ParallelDims
from tests.parallel.group import free_port


@pytest.mark.parametrize(
    ("device", "backend", "offload", "want"),
    [
        ("cuda", "auto", False, "nccl"),
        ("cuda", "auto", True, "cuda:nccl,cpu:gloo"),
        ("cuda", "nccl", True, "cuda:nccl,cpu:gloo"),
        ("cuda", "nccl", False, "nccl"),
        ("cuda", "gloo", True, "gloo"),
        ("cpu", "auto", False, "gloo"),
        ("cpu", "gloo", False, "gloo"),
    ],
)
def test_backend_per_device(device, backend, offload, want):
    assert process_group_backend(device, backend, offload) == want


def test_bad_backend_names_the_key():
    with pytest.raises(ValueError, match="parallel.backend='mpi'"):
        process_group_backend("cuda", "mpi")
    with pytest.raises(ValueError, match="parallel.backend=nccl needs CUDA"):
        process_group_backend("cpu", "nccl")


def test_timeout_from_config():
    assert collective_timeout(45) == datetime.timedelta(minutes=45)
    assert collective_timeout(0.5) == datetime.timedelta(seconds=30)
    for bad in (0, -1, math.inf, math.nan, "ten", True):
        with pytest.raises(ValueError, match="parallel.timeout_minutes"):
            collective_timeout(bad)


def test_bad_timeout_is_refused_before_any_group():
    with pytest.raises(ValueError, match="parallel.timeout_minutes=0"):
        init_distributed("cpu", "auto", timeout_minutes=0)


def test_tf32_for_fp32_matmuls():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        enable_tf32()
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cuda.matmul.allow_tf32  # the legacy flag reads the same setting
    finally:
        torch.set_float32_matmul_precision(before)


MINUTES = 0.02  # 1.2 s


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    precision = torch.get_float32_matmul_precision()
    env = init_distributed("cpu", "auto", cpu_offload=True, timeout_minutes=MINUTES)
    group = dist.distributed_c10d._get_default_group()
    result = {
        "backend": dist.get_backend(),
        "timeout_ms": group._get_backend(torch.device("cpu")).options._timeout
        / datetime.timedelta(milliseconds=1),
        "device": str(env.device),
        "precision_unchanged": torch.get_float32_matmul_precision() == precision,
    }
    # a group made afterwards, as the DeviceMesh makes its sub-groups (here a 1-rank tp group)
    mesh = ParallelDims(1, 2, 1, 1, world).build_mesh("cpu")
    sub = mesh["tp"].get_group()._get_backend(torch.device("cpu"))
    result["subgroup_timeout_ms"] = sub.options._timeout / datetime.timedelta(milliseconds=1)
    dist.barrier()
    if rank == 0:
        # rank 1 never joins this one: it must fail by the configured timeout, not the default
        try:
            dist.all_reduce(torch.ones(1))
            result["error"] = ""
        except RuntimeError as e:
            result["error"] = str(e)
        torch.save(result, Path(out) / "result.pt")
    else:  # stays connected until rank 0 is done (a bound, should rank 0 die first)
        deadline = time.monotonic() + 60
        while not (Path(out) / "result.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    os._exit(0)  # the group is broken on purpose: skip destroying it


@pytest.mark.slow
def test_gloo_group_has_the_configured_timeout(tmp_path):
    mp.start_processes(_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    got = torch.load(tmp_path / "result.pt", weights_only=True)
    assert got["backend"] == "gloo" and got["device"] == "cpu"  # no side backend without CUDA
    assert got["timeout_ms"] == pytest.approx(MINUTES * 60_000)
    assert got["subgroup_timeout_ms"] == pytest.approx(MINUTES * 60_000)
    assert "Timed out" in got["error"] and "1200ms" in got["error"], got["error"]
    assert got["precision_unchanged"]  # TF32 only on CUDA
