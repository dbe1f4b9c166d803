"""DeepSpeed ZeRO-1/2/3 and megatron-core tensor parallelism equal one process (docs/design.md §4).

Real DeepSpeed on real gloo groups, fp32, the tiny model: loss and gathered gradients of the first
step within 1e-5 relative of the single-process reference (the FSDP trainer's arithmetic), four
steps' losses and gradient norms too; a reload of the step-2 checkpoint continues bit for bit; the
export has the single-device keys and weights; the trainer's ZeRO-3 engine with activation offload
equals it without. One spawned group per world size runs all its cases.
"""

from __future__ import annotations

import math
import os
import pickle
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from dit.model import build_model
from parallel import checkpoint as ckpt
from parallel.megatron_tp import apply_megatron_tp, check_megatron_tp, tp_plan
from parallel.zero import SafeCheckpointEngine, deepspeed_config
from tests.dit.helpers import random_model
from tests.parallel.zero_worker import (
    SAVE_AFTER,
    STEPS,
    Case,
    OffloadCase,
    arch,
    reference,
    train_cfg,
    worker,
    write_failure_worker,
)

pytestmark = pytest.mark.slow


CASES_2 = [
    Case("zero1", 1, resume=True, export=True),
    Case("zero2", 2, resume=True),
    Case("zero3", 3, resume=True, export=True, freeze=True),
    Case("zero2_accum2", 2, grad_accum=2),
    Case("zero3_offload", 3, offload=True),
    # the across-heads qk norm's weight is a tp slice along dim 0 (megatron attributes): trained,
    # clipped, checkpointed and exported like the q/k projections
    Case("zero1_tp2_across_heads", 1, tp=2, resume=True, export=True, qk_norm="across_heads"),
]
CASES_4 = [
    Case("zero1_tp2", 1, tp=2, resume=True, export=True),
    Case("zero3_tp2", 3, tp=2, resume=True),
]
BF16 = Case("zero2_bf16", 2, bf16=True)  # runs in the world-2 group; checked loosely
OFFLOAD = OffloadCase("zero3_activation_offload")  # the trainer's engine, in the world-2 group


def _spawn(world: int, cases: list[Case], out: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(world, port, cases, str(out)), nprocs=world, start_method="spawn")
    return {c.name: torch.load(out / f"{c.name}.pt", weights_only=True) for c in cases}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = {}
    for world, cases in ((2, CASES_2 + [BF16, OFFLOAD]), (4, CASES_4)):
        d = tmp_path_factory.mktemp(f"zero-world{world}")
        for name, result in _spawn(world, cases, d).items():
            assert "error" not in result, f"{name}:\n{result['error']}"
            out[name] = (result, d)
    return out


_REFERENCES: dict[tuple, dict] = {}


def _reference(case: Case) -> dict:
    """:func:`reference` once per distinct input (architecture, training config, frozen embedder): the
    stages and layouts of one model share its single-process run (CI time: 4 runs for 15 uses)."""
    key = (repr(case.arch()), repr(train_cfg(case)), case.freeze)
    if key not in _REFERENCES:
        _REFERENCES[key] = reference(case)
    return _REFERENCES[key]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


@pytest.mark.parametrize("case", CASES_2 + CASES_4, ids=lambda c: c.name)
def test_matches_single_process(case, results):
    got, _ = results[case.name]
    want = _reference(case)
    assert got["keys"] == list(want["weights"])  # the single-device names, no megatron extras
    assert got["grads"].keys() == want["grads"].keys()
    assert got["q_type"] == ("TPColumnLinear" if case.tp > 1 else "Linear")
    worst = max(want["grads"], key=lambda k: _rel(got["grads"][k], want["grads"][k]))
    assert _rel(got["grads"][worst], want["grads"][worst]) < 1e-5, f"gradient of {worst}"
    assert want["grads"]["blocks.1.attn.norm_q.weight"].abs().max() > 0  # the comparison has signal
    assert min(want["grad_norms"]) > train_cfg(case).grad_clip  # clipping acted in every step
    assert got["grad_norms"] == pytest.approx(want["grad_norms"], rel=1e-5)
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-5)
    assert len(set(want["losses"])) == STEPS  # the steps changed the weights
    worst = max(_rel(got["weights"][k], v) for k, v in want["weights"].items())
    assert worst < 1e-5, f"weights after {STEPS} steps: {worst:.2e}"


@pytest.mark.parametrize("case", [c for c in CASES_2 + CASES_4 if c.resume], ids=lambda c: c.name)
def test_reload_continues_bitwise(case, results):
    got, root = results[case.name]
    assert ckpt.latest(root / case.name) == ckpt.step_dir(root / case.name, SAVE_AFTER)
    resumed = got["resume"]
    assert resumed["extra"] == {"step": SAVE_AFTER, "note": "x"}
    assert resumed["own_rank"] == 0
    assert resumed["losses"] == got["losses"][SAVE_AFTER:]
    for k, v in got["weights"].items():
        assert torch.equal(resumed["weights"][k], v), k


@pytest.mark.parametrize("case", [c for c in CASES_2 + CASES_4 if c.export], ids=lambda c: c.name)
def test_export_matches_reference_weights(case, results):
    _, root = results[case.name]
    keys = list(build_model(case.arch()).state_dict())  # what launch.export writes
    initial = random_model(case.arch()).state_dict()
    exported0 = load_file(root / f"{case.name}-export0" / "model.safetensors")
    assert sorted(exported0) == sorted(keys)
    for k in keys:
        assert torch.equal(exported0[k], initial[k]), k
    path = root / f"{case.name}-export" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "step": str(STEPS)}
    exported, want = load_file(path), _reference(case)["weights"]
    assert sorted(exported) == sorted(keys)
    for k in keys:
        assert exported[k].dtype == torch.float32
        assert _rel(exported[k], want[k]) < 1e-5, k


@pytest.mark.parametrize("case", CASES_2 + CASES_4, ids=lambda c: c.name)
def test_non_finite_step_is_skipped_everywhere(case, results):
    poisoned = results[case.name][0]["poisoned"]
    assert not poisoned["applied"]
    assert not math.isfinite(poisoned["grad_norm"])
    assert poisoned["unchanged"] and poisoned["schedule_unchanged"]


def test_bf16_trains_near_fp32(results):
    got, _ = results[BF16.name]
    want = _reference(BF16)
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-2)
    assert all(v.dtype == torch.float32 for v in got["weights"].values())  # fp32 master weights
    assert _rel(got["weights"]["blocks.0.attn.q.weight"], want["weights"]["blocks.0.attn.q.weight"]) < 1e-2


def test_deepspeed_checkpoints_load_with_weights_only(results, tmp_path):
    """DeepSpeed's own reader unpickles anything; the engine's reader takes the files of real ZeRO-1
    and ZeRO-3 checkpoints and refuses a file that holds a callable."""
    reader = SafeCheckpointEngine()
    for name in ("zero1", "zero3"):
        result, d = results[name]
        assert result["checkpoint_engine"] == "SafeCheckpointEngine"
        files = sorted(ckpt.step_dir(d / name, SAVE_AFTER).glob("*_states.pt"))
        assert any("optim_states" in f.name for f in files), files
        for f in files:
            assert isinstance(reader.load(str(f)), dict)
    poisoned = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "hook": os.system}, poisoned)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        reader.load(str(poisoned))


def test_deepspeed_checkpoint_is_verified_and_a_damaged_one_skipped(results, tmp_path, caplog):
    """The marker of a real ZeRO-3 checkpoint (two ranks) lists every file DeepSpeed and we wrote, with
    checksums; a bit flip in a ZeRO partition is named, and the one before it is taken instead."""
    import json
    import logging

    result, d = results["zero3"]
    saved = ckpt.step_dir(d / "zero3", SAVE_AFTER)
    marker = json.loads((saved / ckpt.MARKER).read_text())
    on_disk = sorted(p.name for p in saved.iterdir() if p.name != ckpt.MARKER)
    assert sorted(marker["files"]) == on_disk and marker["world_size"] == 2
    assert {"rank-00000.pt", "rank-00001.pt"} <= set(on_disk)
    assert sum("optim_states" in name for name in on_disk) == 2  # a ZeRO partition per rank
    root = tmp_path / "checkpoints"
    older, newer = ckpt.step_dir(root, 1), ckpt.step_dir(root, 2)
    shutil.copytree(saved, older)
    shutil.copytree(saved, newer)
    bad = next(newer.glob("*optim_states.pt"))
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="parallel.checkpoint"):
        assert ckpt.latest(root) == older
    assert f"{bad}: crc32" in caplog.text and "falling back to" in caplog.text
    with pytest.raises(ckpt.CheckpointError, match=f"{bad}: crc32"):
        ckpt.read_full(newer, {"model"})  # export, init.from
    assert int(ckpt.read_full(older, {"step"})["step"]) == SAVE_AFTER
    # a rank of the saved world without its file is damage; a rank beyond it is another world size
    (older / "rank-00001.pt").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"rank-00001\.pt: missing"):
        ckpt.verify(older)
    assert ckpt.rank_state(older, 2) is None


def test_deepspeed_config_from_train_config():
    tcfg = train_cfg(Case("c", 1, grad_accum=3))
    numbers = {"grad_accum": tcfg.grad_accum, "grad_clip": tcfg.grad_clip}
    cfg = deepspeed_config(**numbers, zero_stage=3, offload=True)
    assert cfg["gradient_clipping"] == tcfg.grad_clip
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 0  # EMA swaps reach all
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "bf16" not in cfg
    bf16 = deepspeed_config(**numbers, zero_stage=1, bf16=True)
    assert "bf16" not in bf16  # DeepSpeed's bf16 section disables an outer autocast (parallel.zero)
    assert bf16["torch_autocast"] == {
        "enabled": True,
        "dtype": "bfloat16",
        "lower_precision_safe_modules": [],
    }
    with pytest.raises(ValueError, match="parallel.zero_stage=4"):
        deepspeed_config(**numbers, zero_stage=4)


def test_megatron_plan_names_and_errors():
    model = build_model(arch())
    plan = tp_plan(model)
    for name in plan:
        model.get_submodule(name)  # every planned name exists in the model
    assert plan["blocks.1.cross_attn.o"] == "row" and plan["blocks.0.mlp.gate"] == "column"
    assert plan["blocks.0.attn.norm_k"] == "head_norm"
    assert apply_megatron_tp(model, None) is model  # one rank: nothing swapped
    assert type(model.blocks[0].attn.q) is nn.Linear
    with pytest.raises(ValueError, match="model.arch.num_heads"):
        check_megatron_tp(arch(), 3, False, torch.device("cpu"))
    with pytest.raises(ValueError, match="model.arch.ffn_dim"):
        check_megatron_tp(arch().replace(ffn_dim=101), 2, False, torch.device("cpu"))
    with pytest.raises(ValueError, match="parallel.sequence_parallel.*CUDA"):
        apply_megatron_tp(model, None, sequence_parallel=True)


def test_a_failed_write_on_one_rank_is_one_error_on_every_rank(tmp_path):
    """DeepSpeed's save ends in collectives (ZeRO-3's all-gather of persistent parameters, a barrier): a
    rank whose ZeRO partition cannot be written (a real file-size limit in that rank) must still pass
    them, then both ranks raise the same error naming the file, and the earlier checkpoint is kept. The
    group's 30 s timeout makes a rank left waiting fail the test rather than hang it."""
    from tests.parallel.group import free_port

    mp.start_processes(
        write_failure_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    got = torch.load(tmp_path / "write_failure.pt", weights_only=True)
    first, second = got["errors"]
    assert first == second and first is not None
    assert "checkpoint step-00000002 not saved: file too large" in first
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in first
    # (DeepSpeed also copies its conversion scripts next to the checkpoints)
    assert [n for n in got["listing"] if "step" in n] == ["step-00000001"]
    assert got["latest"] == "step-00000001"


def test_zero3_with_activation_offload_equals_it_without(results):
    """``parallel.activation_offload`` under ``parallel.engine=deepspeed`` (ZeRO-3 over 2 ranks, the
    trainer's engine and mesh): the hooks are on every block, the forward's saved activations sit in
    host memory, and the step (losses, gradient norm, losses after the update) is bit for bit the one
    without offload. Only a GPU shows the device memory saved and the copies overlapping compute."""
    got, _ = results[OFFLOAD.name]
    plain, offload = got["plain"], got["offload"]
    assert offload["hooks"] == [(True, False), (True, False)] and plain["hooks"] == [None, None]
    assert offload["host"] > 0 and plain["host"] == 0
    assert plain["applied"] and offload["applied"] and plain["grad_norm"] > 0
    assert torch.equal(offload["loss"], plain["loss"]) and offload["grad_norm"] == plain["grad_norm"]
    assert torch.equal(offload["after"], plain["after"])
    assert not torch.equal(plain["after"], plain["loss"])  # the step changed the model
