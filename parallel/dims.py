"""ParallelDims: how the world is split, and the named DeviceMesh it builds."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

# Mesh dimensions, outermost first. tp is innermost so a tensor-parallel group sits within a node
# (it communicates every layer); the cp ranks of a sequence are next; replicas are outermost.
MESH_DIMS = ("dp_replicate", "dp_shard", "cp_ring", "cp_ulysses", "tp")


@dataclass
class ParallelDims:
    """Degrees whose product is the world size (``dp_shard = -1`` takes what is left).

    ``cp = cp_ring · cp_ulysses``: context parallel runs Ulysses all-to-all inside groups of
    ``cp_ulysses`` ranks and ring attention across ``cp_ring`` of those groups.
    """

    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    world: int
    cp_ring: int = 1

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "cp", "tp", "cp_ring"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name}={getattr(self, name)} must be ≥ 1")
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
        if self.cp % self.cp_ring:
            raise ValueError(f"parallel.cp_ring={self.cp_ring} must divide parallel.cp={self.cp}")

    @property
    def dp(self) -> int:
        """Data-parallel replicas: ranks that see different batches."""
        return self.dp_replicate * self.dp_shard

    @property
    def cp_ulysses(self) -> int:
        return self.cp // self.cp_ring

    @property
    def grad_scale(self) -> int:
        """The FSDP reduction averages over dp_replicate · dp_shard · cp ranks; a loss multiplied by
        this makes it a sum: of the batches' gradients over dp, of the partial (own-token) gradients
        over cp. tp ranks hold whole gradients of their own shards and are not reduced over."""
        return self.dp * self.cp

    @property
    def copies(self) -> int:
        """Ranks that process the same samples (a cp × tp group): global sample counts summed over
        the world count each sample this many times."""
        return self.cp * self.tp

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        """The 5-D mesh of :data:`MESH_DIMS` with flattened views ``cp`` (cp_ring × cp_ulysses),
        ``dp_shard_cp`` (what FSDP shards over) and ``dp`` (what the data is split over); None with
        one process."""
        if self.world == 1:
            return None
        shape = (self.dp_replicate, self.dp_shard, self.cp_ring, self.cp_ulysses, self.tp)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
        mesh["cp_ring", "cp_ulysses"]._flatten("cp")
        mesh["dp_shard", "cp_ring", "cp_ulysses"]._flatten("dp_shard_cp")
        mesh["dp_replicate", "dp_shard"]._flatten("dp")
        return mesh

    def dp_rank(self, mesh: DeviceMesh | None) -> int:
        """This rank's index among data-parallel replicas (what the data loader is split by)."""
        return 0 if mesh is None else mesh["dp"].get_local_rank()
