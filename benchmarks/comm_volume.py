"""Per-layer communication volume of context-parallel self-attention: Ulysses against ring.

The formulas follow what ``parallel/`` actually sends (``parallel.context.UlyssesAttention``,
``parallel.ring``), so they can be checked byte for byte against a real run with
:class:`CommCounter`, which wraps the two torch.distributed calls those paths use.

    python -m benchmarks.comm_volume        # the table for small and video-1b3-sized layers
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import report


def attention_comm_bytes(
    tokens: int, hidden: int, p: int, batch: int = 1, act_bytes: int = 4, grad_accum_bytes: int = 4
) -> dict[str, int]:
    """Bytes one rank sends to other ranks in one self-attention layer, forward and backward.

    Args:
        tokens: N, the whole sequence (each rank holds N/p of it).
        hidden: D = heads · head_dim of the exchanged q/k/v (D/tp under tensor parallelism).
        p: context-parallel degree.
        act_bytes: bytes per element of q/k/v/out (2 under bf16 autocast, 4 in fp32).
        grad_accum_bytes: ring backward passes dK/dV in its fp32 accumulators whatever ``act_bytes``.

    Returns:
        ``ulysses_fwd/bwd`` and ``ring_fwd/bwd`` in bytes (0 when p = 1).
    """
    chunk = batch * (tokens // p) * hidden  # elements of one rank's q (or k, v, out): B·N/P·D
    # Ulysses: each all-to-all keeps 1/p of the chunk and sends the rest; forward moves q, k, v and
    # the output, backward runs the four inverse all-to-alls on their gradients.
    ulysses = 4 * (p - 1) * (chunk // p) * act_bytes
    # Ring forward: p-1 shifts of the K and V blocks. Backward (parallel/ring.py): K and V travel
    # p-1 steps again, and the dK/dV accumulators p steps (a block's gradient rides with it and
    # lands back at its owner after a full turn).
    ring_fwd = 2 * (p - 1) * chunk * act_bytes
    ring_bwd = ring_fwd + (2 * p * chunk * grad_accum_bytes if p > 1 else 0)
    return {"ulysses_fwd": ulysses, "ulysses_bwd": ulysses, "ring_fwd": ring_fwd, "ring_bwd": ring_bwd}


class CommCounter(TorchDispatchMode):
    """Counts the bytes this rank sends to other ranks through the functional all-to-all (Ulysses,
    forward and its registered backward) and ``dist.batch_isend_irecv`` (ring), by phase (set
    :attr:`phase` to ``"fwd"``/``"bwd"``). Those are the only calls Ulysses and ring attention make;
    FSDP, tensor parallel and the final gather use others, so they are not counted. Use as a context
    manager (a dispatch mode, plus a patch of ``dist.batch_isend_irecv``, which ``parallel.collectives``
    looks up at call time)."""

    def __init__(self):
        super().__init__()
        self.phase = "fwd"
        self.sent: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops._c10d_functional.all_to_all_single.default:
            x, _, input_splits, group_name = args
            me = dist.get_rank(_resolve_process_group(group_name))
            row = x.nbytes // max(x.shape[0], 1)  # bytes per row of dim 0, the split dimension
            self.sent[self.phase] += row * sum(s for i, s in enumerate(input_splits) if i != me)
        return func(*args, **(kwargs or {}))

    def _batch_isend_irecv(self, ops):
        self.sent[self.phase] += sum(op.tensor.nbytes for op in ops if op.op is dist.isend)
        return self._orig(ops)

    def __enter__(self) -> CommCounter:
        self._orig, dist.batch_isend_irecv = dist.batch_isend_irecv, self._batch_isend_irecv
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        dist.batch_isend_irecv = self._orig
        return super().__exit__(*exc)


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


# (label, tokens N, hidden D, heads, act bytes): the CPU benchmark's layer and a video-1b3 layer at
# an 81-frame 480p clip (21×60×104 latents, patch 1×2×2 → 32,760 tokens) in bf16.
SIZES = [
    ("bench layer (fp32)", 2048, 256, 8, 4),
    ("video-1b3 (bf16)", 32760, 1536, 12, 2),
    ("video-1b3 121 frames (bf16)", 31 * 30 * 52, 1536, 12, 2),
]


def comm_table(sizes=SIZES, degrees=(2, 4, 8)) -> str:
    """Markdown table of MiB sent per rank per self-attention layer, Ulysses against ring."""
    rows = []
    for label, n, d, heads, eb in sizes:
        for p in degrees:
            if n % p:
                continue
            b = attention_comm_bytes(n, d, p, act_bytes=eb)
            uly, ring = b["ulysses_fwd"] + b["ulysses_bwd"], b["ring_fwd"] + b["ring_bwd"]
            rows.append(
                {
                    "layer": label,
                    "N": f"{n:,}",
                    "D": d,
                    "P": p,
                    "Ulysses fwd / bwd MiB": f"{_mib(b['ulysses_fwd'])} / {_mib(b['ulysses_bwd'])}",
                    "ring fwd / bwd MiB": f"{_mib(b['ring_fwd'])} / {_mib(b['ring_bwd'])}",
                    "ring / Ulysses": f"{ring / uly:.2f}",
                    # Ulysses splits heads over the degree; otherwise only ring (or 2D) can run
                    "Ulysses runs?": "yes" if heads % p == 0 else f"no ({heads} heads)",
                }
            )
    return report.table(rows)


def main() -> None:
    print(comm_table())


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
