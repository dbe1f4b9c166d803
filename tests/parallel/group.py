"""Spawn one gloo process group per world size and run many cases in it.

The parent calls :func:`run_group`; each spawned rank calls :func:`serve` with the function that
runs one case, and rank 0 saves each case's result as ``<name>.pt`` for the test to read.
"""

from __future__ import annotations

import datetime
import gc
import os
import socket
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(world: int, worker, cases: list, out_dir, names: list[str] | None = None) -> dict:
    """Run ``worker(rank, world, port, cases, out_dir)`` on ``world`` processes; returns what rank 0
    saved as ``<name>.pt`` for each case (``{name: result}``; names default to ``case.name``)."""
    args = (world, free_port(), cases, str(out_dir))
    mp.start_processes(worker, args=args, nprocs=world, start_method="spawn")
    names = names if names is not None else [c.name for c in cases]
    return {n: torch.load(out_dir / f"{n}.pt", weights_only=True) for n in names}


def serve(
    rank: int,
    world: int,
    port: int,
    cases: list,
    out_dir: str,
    run_one: Callable[[object], dict],
    name: Callable[[object], str] = lambda case: case.name,
    env: dict[str, str] | None = None,
) -> None:
    """Join the group and run ``run_one(case)`` for every case; an exception is recorded as the case's
    result (``{"error": traceback}``) and the group carries on with the next case."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(env or {})
    torch.set_num_threads(1)
    # a case that fails on one rank must not leave the others waiting for the test's whole timeout
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        for case in cases:
            try:
                result = run_one(case)
            except Exception:
                result = {"error": traceback.format_exc()}
                dist.barrier()
            if rank == 0:
                torch.save(result, Path(out_dir) / f"{name(case)}.pt")
    finally:
        dist.destroy_process_group()
    exit_without_teardown()


def exit_without_teardown() -> None:
    """End a spawned rank whose work is saved without running interpreter teardown.

    CI twice saw a rank that had saved its results and destroyed its gloo group abort in teardown
    ("terminate called without an active exception", no Python frame in the fault handler's dump): a
    gloo object whose last reference dies while the interpreter is being finalized (pytorch/pytorch
    PR 179291 describes the mechanism). The results are on disk by now, so the rank skips teardown
    instead of letting a library's exit path fail a test about something else. Only for the success
    path: an exception still propagates to ``torch.multiprocessing``'s error file."""
    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
