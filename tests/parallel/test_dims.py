"""Layout validation: errors name the config field; the mesh and its flattened views."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from dit.config import DiTConfig
from dit.model import SpacetimeDiT
from parallel.config import ParallelConfig, checkpoint_every
from parallel.context import check_cp_degrees
from parallel.dims import ParallelDims
from parallel.parallelize import check_block_swap, make_dims, parallelize

ARCH = DiTConfig(hidden_size=64, num_heads=4, depth=2, text_dim=16, ffn_dim=90)


def test_dp_shard_takes_what_is_left_and_scales_follow_the_layout():
    d = make_dims(ParallelConfig(cp=2, tp=2), world=16, arch=ARCH)
    assert (d.dp_replicate, d.dp_shard, d.cp, d.tp) == (1, 4, 2, 2)
    assert d.dp == 4 and d.grad_scale == 8 and d.copies == 4
    assert d.cp_ring == 1 and d.cp_ulysses == 2  # heads/tp = 2 allow Ulysses at cp=2


def _largest_ulysses(cp: int, local_heads: int) -> int:
    # the definition, by enumeration: the largest degree dividing both
    return max(u for u in range(1, cp + 1) if cp % u == 0 and local_heads % u == 0)


def test_cp_ring_auto_takes_as_much_ulysses_as_the_heads_allow():
    # 4 heads / tp 2 = 2 local heads: Ulysses 2 inside, a ring of 2 across
    d = make_dims(ParallelConfig(cp=4, tp=2), world=8, arch=ARCH)
    assert (d.cp_ulysses, d.cp_ring) == (2, 2)
    assert make_dims(ParallelConfig(cp=4, cp_ring=2, tp=1), world=4, arch=ARCH).cp_ulysses == 2


@pytest.mark.parametrize(
    ("cp", "heads", "tp", "ulysses", "ring"),
    [
        (8, 12, 1, 4, 2),  # the example: 12 heads do not split 8 ways, 4 × 2 does
        (8, 40, 1, 8, 1),  # 40 heads split 8 ways: pure Ulysses
        (4, 6, 1, 2, 2),
        (4, 24, 2, 4, 1),  # 12 heads per tp rank
        (8, 24, 2, 4, 2),
        (6, 16, 1, 2, 3),
        (5, 12, 1, 1, 5),  # no common factor: pure ring
        (3, 3, 3, 1, 3),  # one head per tp rank
    ],
)
def test_cp_ring_auto_split(cp, heads, tp, ulysses, ring, caplog):
    assert ulysses == _largest_ulysses(cp, heads // tp) and ulysses * ring == cp  # the table itself
    with caplog.at_level(logging.INFO, logger="parallel.context"):
        assert check_cp_degrees(cp, 0, heads, tp) == ring
    assert f"Ulysses {ulysses} × ring {ring}" in caplog.text


def test_cp_ring_auto_is_the_largest_ulysses_degree():
    for cp in range(2, 17):
        for local_heads in (1, 2, 3, 5, 6, 12, 16, 20, 24, 40):
            ring = check_cp_degrees(cp, 0, local_heads, 1)
            assert ring == cp // _largest_ulysses(cp, local_heads), (cp, local_heads)
            assert check_cp_degrees(cp, ring, local_heads, 1) == ring  # the explicit setting is accepted


@pytest.mark.parametrize(
    ("pcfg", "world", "field"),
    [
        (ParallelConfig(tp=3), 3, "parallel.tp=3 must divide model.arch.num_heads"),
        (ParallelConfig(tp=4, dp_shard=1, sequence_parallel=False), 4, "MLP width 90"),
        (ParallelConfig(cp=4, cp_ring=1, tp=2), 8, "num_heads/tp"),
        (ParallelConfig(cp=4, cp_ring=3), 4, "parallel.cp_ring=3 must divide parallel.cp=4"),
        (ParallelConfig(dp_shard=3), 4, "must equal the world size 4"),
        (ParallelConfig(dp_replicate=3), 4, "not divisible by parallel.dp_replicate"),
    ],
)
def test_impossible_layouts_name_the_field(pcfg, world, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        make_dims(pcfg, world, ARCH)


def test_activation_checkpointing_modes():
    assert [checkpoint_every(m) for m in ("none", "full", "every_3")] == [0, 1, 3]
    with pytest.raises(ValueError, match="parallel.activation_checkpointing='every_0'"):
        checkpoint_every("every_0")
    with pytest.raises(ValueError, match="'sometimes'"):
        checkpoint_every("sometimes")


def test_one_process_has_no_mesh():
    assert ParallelDims(1, -1, 1, 1, world=1).build_mesh("cpu") is None


def test_cpu_offload_without_a_gpu_is_a_config_error():
    with torch.device("meta"):
        model = SpacetimeDiT(ARCH)
    pcfg = ParallelConfig(cpu_offload=True)
    with pytest.raises(ValueError, match="parallel.cpu_offload"):
        parallelize(model, make_dims(pcfg, 1, ARCH), None, pcfg)


def test_block_swap_needs_one_process():
    """``finetune.block_swap`` moves whole blocks between host and device: refused under FSDP or tensor
    parallelism (several ranks), naming the keys and the alternative."""
    check_block_swap(2, make_dims(ParallelConfig(), 1, ARCH))
    check_block_swap(0, make_dims(ParallelConfig(dp_shard=2), 2, ARCH))
    for pcfg in (ParallelConfig(dp_shard=2), ParallelConfig(dp_shard=1, tp=2)):
        with pytest.raises(ValueError, match=r"finetune.block_swap=2 .*2 ranks.*parallel.cpu_offload"):
            check_block_swap(2, make_dims(pcfg, 2, ARCH))
