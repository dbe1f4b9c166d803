"""ParallelDims: how the world is split, and the named DeviceMesh it builds."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class ParallelDims:
    """Degrees whose product is the world size (``dp_shard = -1`` takes what is left)."""

    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    world: int

    def __post_init__(self) -> None:
        rest = self.dp_replicate * self.cp * self.tp
        if self.dp_shard == -1:
            if self.world % rest:
                raise ValueError(
                    f"world size {self.world} is not divisible by parallel.dp_replicate·cp·tp = {rest}"
                )
            self.dp_shard = self.world // rest
        if self.dp_replicate * self.dp_shard * self.cp * self.tp != self.world:
            raise ValueError(
                f"parallel.dp_replicate={self.dp_replicate} × dp_shard={self.dp_shard} × cp={self.cp} × "
                f"tp={self.tp} must equal the world size {self.world}"
            )

    @property
    def dp(self) -> int:
        """Data-parallel replicas: ranks that see different batches."""
        return self.dp_replicate * self.dp_shard

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        """The mesh ``(dp_replicate, dp_shard, cp, tp)``; None with one process."""
        if self.world == 1:
            return None
        return init_device_mesh(
            device_type,
            (self.dp_replicate, self.dp_shard, self.cp, self.tp),
            mesh_dim_names=("dp_replicate", "dp_shard", "cp", "tp"),
        )

    def dp_rank(self, mesh: DeviceMesh | None) -> int:
        """This rank's index among data-parallel replicas (what the data loader is split by)."""
        if mesh is None:
            return 0
        return mesh["dp_replicate"].get_local_rank() * self.dp_shard + mesh["dp_shard"].get_local_rank()


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
