"""Spawn one gloo process group per world size and run many layout cases in it."""

from __future__ import annotations

import socket

import torch
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
