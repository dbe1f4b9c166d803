"""LoRA training (``finetune.lora.*``) through the trainer: adapter-only checkpoints with ``base.json``,
exact resume after SIGKILL, the loss lowering on a trained base, the "no effect" guard's metrics, the
optimizer's LoRA / LoRA+ learning rates, an EMA of the adapters only, and the refusals (another base,
a full checkpoint for a LoRA run and the reverse, DeepSpeed)."""

import json
import math
import os
import signal
import subprocess
import threading

import pytest
import torch
from safetensors.torch import save_file

from dit.model import build_model
from launch.config import LoraConfig, TrainConfig, load_config
from parallel import checkpoint as ckpt
from tests.launch.conftest import (
    assert_same_losses,
    losses_by_step,
    metrics,
    start,
    train_cmd,
    wait_for,
)

TINY = ["model.arch.depth=2", "model.arch.hidden_size=64", "model.arch.ffn_dim=128"]
LORA = ["finetune.lora.rank=4", "finetune.lora.lr=1e-2", "finetune.lora.plus_ratio=4"]


def _base(tmp_path, seed=5):
    """A stand-in for a pretrained base: the tiny model with every weight perturbed. A freshly
    initialised DiT is adaLN-Zero (gates and output layer zero): frozen so, no adapter gets a gradient."""
    arch = load_config(None, TINY).model.arch
    model = build_model(arch, device="cpu", seed=0)
    g = torch.Generator().manual_seed(seed)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    out = tmp_path / f"base-{seed}"
    out.mkdir()
    save_file(state, out / "model.safetensors")
    return out, state


def _cfg(tmp_path, overrides, *extra):
    return load_config(None, [f"run.dir={tmp_path / 'run'}", *overrides, "data.num_workers=0", *TINY, *extra])


def test_build_optimizer_lora_lr_and_plus_ratio():
    """Only the adapters train; A at finetune.lora.lr, B at plus_ratio × it, group 0 (the logged lr) A's."""
    from launch.lora import apply_lora
    from launch.optim import build_optimizer

    arch = load_config(None, TINY).model.arch
    model = build_model(arch, device="cpu", seed=0)
    apply_lora(model, LoraConfig(rank=4, lr=3e-3, plus_ratio=8.0))
    opt = build_optimizer(
        model, TrainConfig(lr=1e-4), torch.device("cpu"), lora=LoraConfig(rank=4, lr=3e-3, plus_ratio=8.0)
    )
    by_param = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i].split(".")[-3] for i in by_param} == {"lora_A", "lora_B"}
    assert len(by_param) == sum(1 for n, _ in model.named_parameters() if ".lora_" in n)
    for i, lr in by_param.items():
        want = 3e-3 * (8.0 if ".lora_B." in names[i] else 1.0)
        assert math.isclose(lr, want, rel_tol=1e-12), (names[i], lr)
    assert math.isclose(opt.param_groups[0]["lr"], 3e-3)
    # finetune.lora.lr=0 is train.lr
    opt = build_optimizer(model, TrainConfig(lr=1e-4), torch.device("cpu"), lora=LoraConfig(rank=4))
    assert {g["lr"] for g in opt.param_groups} == {1e-4}


def _group_names(model, opt) -> list[list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in opt.param_groups]


def test_optimizer_groups_do_not_depend_on_lora_learning_rates_and_resume_takes_the_new_ones():
    """LoRA+ at resume: the parameter groups are the same whatever ``finetune.lora.plus_ratio`` (1 too)
    and ``lr`` (a checkpoint's optimizer state loads), and a resumed optimizer and schedule train at
    the new settings from the checkpoint's place in the schedule, in either loading order (the FSDP
    engine loads the optimizer first, DeepSpeed the scheduler), the next scheduler step too; unchanged
    settings give back the saved bits."""
    import copy

    from launch.lora import apply_lora
    from launch.optim import build_optimizer, build_scheduler, lr_factor

    arch = load_config(None, TINY).model.arch
    model = build_model(arch, device="cpu", seed=0)
    apply_lora(model, LoraConfig(rank=4))
    tcfg = TrainConfig(lr=1e-4, warmup=2, steps=10, schedule="cosine")
    cpu = torch.device("cpu")

    def build(lr, plus):
        opt = build_optimizer(model, tcfg, cpu, lora=LoraConfig(rank=4, lr=lr, plus_ratio=plus))
        return opt, build_scheduler(opt, tcfg)

    layouts = {plus: _group_names(model, build(3e-3, plus)[0]) for plus in (1.0, 4.0, 16.0, 0.5)}
    assert all(groups == layouts[1.0] for groups in layouts.values()), layouts
    assert len(layouts[1.0]) == 2 and all(".lora_B." in n for n in layouts[1.0][1])

    opt, sched = build(1e-2, 16.0)
    for _ in range(3):  # past the warmup: the factor differs from 1 and from the first steps'
        opt.step()
        sched.step()
    saved_opt, saved_sched = copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict())
    saved_lrs = [g["lr"] for g in opt.param_groups]
    factor = lr_factor(3, tcfg)
    assert saved_lrs == [1e-2 * factor, 16e-2 * factor]
    for fsdp_order in (True, False):
        opt, sched = build(1e-2, 16.0)  # unchanged: the saved bits
        _load(opt, sched, saved_opt, saved_sched, fsdp_order)
        assert [g["lr"] for g in opt.param_groups] == saved_lrs
        for lr, plus in ((1e-2, 8.0), (5e-3, 1.0)):
            opt, sched = build(lr, plus)
            _load(opt, sched, saved_opt, saved_sched, fsdp_order)
            for got, want in zip(opt.param_groups, (lr, lr * plus), strict=True):
                assert got["lr"] == pytest.approx(want * factor, rel=1e-12), (fsdp_order, lr, plus)
                assert got["initial_lr"] == want and got["lr_mult"] == want / lr
            assert opt.state_dict()["state"].keys() == saved_opt["state"].keys()  # moments loaded
            opt.step()
            sched.step()
            want = [lr * lr_factor(4, tcfg), lr * plus * lr_factor(4, tcfg)]
            assert [g["lr"] for g in opt.param_groups] == pytest.approx(want, rel=1e-12)


def _load(opt, sched, opt_state: dict, sched_state: dict, optimizer_first: bool) -> None:
    if optimizer_first:
        opt.load_state_dict(opt_state)
        sched.load_state_dict(sched_state)
    else:
        sched.load_state_dict(sched_state)
        opt.load_state_dict(opt_state)


@pytest.fixture
def one_thread():
    """One thread, as the trainer's subprocesses run (``OMP_NUM_THREADS=1``): an in-process run then
    computes the same bits as they do."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _train_in_process(run_dir, *args) -> None:
    """``python -m launch.train run.dir=RUN_DIR ARGS`` in this process (an interpreter start-up less)."""
    from launch.train import run as train

    train(load_config(None, [f"run.dir={run_dir}", *args]))


@pytest.mark.slow
def test_lora_run_lowers_the_loss_saves_adapters_only_and_resumes_bit_for_bit_after_sigkill(
    tmp_path, overrides, one_thread
):
    """One uninterrupted LoRA run (the reference: loss, guard metrics, checkpoint contents and size)
    and one killed by SIGKILL after its first checkpoint and rerun: the same losses and adapters.

    For CI time the killed run is a subprocess started first, and the reference and the rerun run in
    this process: the reference while the other starts up (a thread kills it at its checkpoint)."""
    base, state = _base(tmp_path)
    extra = [*TINY, *LORA, f"init.from={base}", "train.steps=4", "checkpoint.every=2", "checkpoint.keep=0"]
    extra += ["eval.every=2", "eval.batches=1", "train.ema_decay=0.5", "data.num_workers=0"]
    rd = tmp_path / "killed"
    killed = start(
        train_cmd(rd, *extra, overrides=overrides), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    marker = rd / "checkpoints" / "step-00000002" / "COMPLETE"
    reached = []

    def kill_at_checkpoint():
        reached.append(wait_for(marker.is_file, killed))
        if reached[0]:
            os.killpg(killed.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_at_checkpoint)
    killer.start()
    ref_dir = tmp_path / "ref"
    try:
        _train_in_process(ref_dir, *overrides, *extra)
    finally:
        killer.join()
        killed.wait()
    assert reached == [True], "the killed run ended before its first checkpoint"
    want = {s: v[0] for s, v in losses_by_step(metrics(ref_dir)).items()}
    assert sorted(want) == list(range(1, 5))

    recs = metrics(ref_dir)
    val = {r["step"]: r for r in recs if "val_loss" in r}
    assert sorted(val) == [2, 4]
    # the guard: the adapters moved the weights and the output, more with more steps
    for r in val.values():
        assert r["lora/adapter_norm"] > 0 and r["lora/output_change"] > 0, r
    assert val[4]["lora/adapter_norm"] > val[2]["lora/adapter_norm"]
    assert val[4]["val_loss"] < val[2]["val_loss"], val

    saved = ref_dir / "checkpoints" / "step-00000004"
    from launch.lora import base_fingerprint

    plain = build_model(load_config(None, TINY).model.arch, device="cpu", seed=0)
    plain.load_state_dict(state)
    assert json.loads((saved / "base.json").read_text()) == {
        "init_from": str(base),
        "fingerprint": base_fingerprint(plain),
    }
    full = ckpt.read_full(saved, {"model", "ema"})
    for key in ("model", "ema"):  # adapters only, peft's names
        assert full[key] and all(".lora_A." in k or ".lora_B." in k for k in full[key]), sorted(full[key])[:3]
    # the tensors: adapters, their two AdamW moments, their EMA (fp32), and the step counters
    from torch.distributed.checkpoint import FileSystemReader

    n_adapters = sum(v.numel() for v in full["model"].values())
    tensors = FileSystemReader(str(saved)).read_metadata().state_dict_metadata.values()
    stored = sum(math.prod(m.size) * 4 for m in tensors if hasattr(m, "size"))
    assert 16 * n_adapters <= stored <= 16 * n_adapters + 4 * (len(full["model"]) + 1)
    # a full checkpoint holds 4 fp32 copies of the model (weights, AdamW moments, EMA); DCP's overhead
    # per tensor weighs on a model this small (the tiny preset's: about 6%)
    n_base = sum(v.numel() for v in state.values())
    size = sum(f.stat().st_size for f in saved.iterdir())
    assert size < 0.25 * 16 * n_base, (size, n_base)

    assert max(losses_by_step(metrics(rd))) < 4
    _train_in_process(rd, *overrides, *extra)
    assert_same_losses(rd, want)
    again = ckpt.read_full(rd / "checkpoints" / "step-00000004", {"model", "ema"})
    for key in ("model", "ema"):
        assert all(torch.equal(again[key][k], v) for k, v in full[key].items())


def test_resume_refuses_another_base_and_the_other_kind_of_checkpoint(tmp_path, overrides):
    """A changed base (its fingerprint), a full checkpoint for a LoRA run and a LoRA one for full
    training are refused naming what differs; a LoRA trainer's EMA holds the adapters alone; another
    ``finetune.lora.plus_ratio`` and ``lr`` resume, at the new learning rates."""
    from launch.optim import lr_factor
    from launch.resume import ResumeRefused
    from launch.train import setup

    base, _ = _base(tmp_path)
    lora = [*LORA, f"init.from={base}", "train.ema_decay=0.9"]
    # saved without LoRA+ (plus_ratio=1), resumed with it and another adapters' lr (below)
    tr = setup(_cfg(tmp_path, overrides, *lora, "finetune.lora.plus_ratio=1", "finetune.lora.lr=5e-3"))
    try:
        assert tr.ema.names and all(".lora_" in n for n in tr.ema.names)
        assert tr.engine.n_trainable == sum(
            p.numel() for n, p in tr.model.named_parameters() if ".lora_" in n
        )
        tr.train_step(iter(tr.loader))  # optimizer moments and a step of the schedule to resume
        saved = tr.checkpoint()
    finally:
        tr.close()
    # the parameter groups still load (the old grouping by learning rate had one group, now two), and
    # the new learning rates apply at the checkpoint's place in the schedule
    cfg = _cfg(tmp_path, overrides, *lora)
    tr = setup(cfg)
    try:
        assert tr.step == 1  # resumed
        groups = _group_names(tr.model, tr.engine.opt)
        assert [all(".lora_B." in n for n in names) for names in groups] == [False, True]
        lrs = [g["lr"] for g in tr.engine.opt.param_groups]
        lora_lr = cfg.finetune.lora.lr * lr_factor(1, cfg.train)
        assert lrs == pytest.approx([lora_lr, cfg.finetune.lora.plus_ratio * lora_lr], rel=1e-12)
    finally:
        tr.close()
    other, _ = _base(tmp_path, seed=6)
    with pytest.raises(ResumeRefused, match="another base") as e:
        setup(_cfg(tmp_path, overrides, *lora[:-2], f"init.from={other}", "train.ema_decay=0.9"))
    fingerprint = json.loads((saved / "base.json").read_text())["fingerprint"]
    assert fingerprint in str(e.value) and f"init.from={other}" in str(e.value)
    with pytest.raises(ResumeRefused, match="holds LoRA adapters only") as e:
        setup(_cfg(tmp_path, overrides, f"init.from={base}"))
    assert f"new run (another run.dir) with init.from={saved}, which loads a LoRA run merged" in str(e.value)

    full_dir = tmp_path / "full"
    tr = setup(load_config(None, [f"run.dir={full_dir}", *overrides, "data.num_workers=0", *TINY]))
    try:
        tr.checkpoint()
    finally:
        tr.close()
    cfg = load_config(None, [f"run.dir={full_dir}", *overrides, "data.num_workers=0", *TINY, *lora])
    with pytest.raises(ResumeRefused, match="full-training checkpoint"):
        setup(cfg)


def test_deepspeed_refuses_lora_a_low_precision_base_and_block_swap_naming_the_keys(overrides):
    from launch.engine import check_finetune_deepspeed

    cfg = load_config(None, [*overrides, *TINY, *LORA, "parallel.engine=deepspeed"])
    with pytest.raises(ValueError, match=r"finetune\.lora\.rank=4 with parallel\.engine=deepspeed"):
        check_finetune_deepspeed(cfg)
    freeze = [*overrides, *TINY, "init.freeze=[blocks.*]"]
    for key, said in (("finetune.base_dtype=bf16", "bf16"), ("finetune.block_swap=1", "1")):
        cfg = load_config(None, [*freeze, key, "parallel.activation_offload=true"])
        check_finetune_deepspeed(cfg)  # the FSDP engine's
        cfg.parallel.engine = "deepspeed"
        with pytest.raises(ValueError, match=rf"{key.split('=')[0]}={said} with parallel\.engine=deepspeed"):
            check_finetune_deepspeed(cfg)
    cfg = load_config(None, [*freeze, "parallel.activation_offload=true", "parallel.engine=deepspeed"])
    check_finetune_deepspeed(cfg)  # activation offload runs under ZeRO (tests/parallel/test_zero.py)


def _memory_hooks(block) -> tuple[bool, bool]:
    """(activation offload, block swap) as :func:`parallel.offload.apply_memory_options` installed them on
    ``block`` (its forward pre-hook)."""
    from parallel.offload import _BlockHooks

    pre = [getattr(h, "__self__", None) for h in block._forward_pre_hooks.values()]
    (hooks,) = [h for h in pre if isinstance(h, _BlockHooks)]
    return hooks.offload, hooks.swap is not None


def test_fp8_base_with_block_swap_and_activation_offload_trains_and_saves(tmp_path, overrides):
    """A float8 base (``finetune.base_dtype=fp8``), the last block swapped (``finetune.block_swap``) and
    activations offloaded, under the trainer (the FSDP engine, one process): the options are installed
    on the trainer's model, a step moves the adapters alone, and the save's finiteness check reads the
    trainable weights (float8 has no isfinite). What a GPU alone shows (overlap, memory saved): see
    ``tests/parallel/test_offload.py``."""
    from launch.train import setup

    base, _ = _base(tmp_path)
    memory = ["finetune.block_swap=1", "parallel.activation_offload=true"]
    tr = setup(_cfg(tmp_path, overrides, *LORA, f"init.from={base}", "finetune.base_dtype=fp8", *memory))
    try:
        assert [_memory_hooks(b) for b in tr.model.blocks] == [(True, False), (True, True)]
        frozen = {n: p.detach().clone() for n, p in tr.model.named_parameters() if not p.requires_grad}
        assert any(p.dtype == torch.float8_e4m3fn for p in frozen.values())
        tr.train_step(iter(tr.loader))
        assert all(torch.equal(p, frozen[n]) for n, p in tr.model.named_parameters() if n in frozen)
        saved = tr.checkpoint()
    finally:
        tr.close()
    assert (saved / "base.json").is_file()


def test_lora_guard_metrics_keep_their_tensorboard_section(tmp_path):
    """``lora/*`` records are tagged as they are (next to ``val/loss``), not ``train/lora/...``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from launch.metrics import Metrics, Progress, scalar_tag

    assert scalar_tag("lora/adapter_norm") == "lora/adapter_norm"
    assert scalar_tag("loss") == "train/loss" and scalar_tag("val_loss") == "val/loss"
    m = Metrics(tmp_path, True, torch.device("cpu"), True, Progress(1, "lines"))
    m.write({"step": 4, "lora/adapter_norm": 0.5, "lora/output_change": 0.25, "val_loss": 1.5})
    m.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"lora/adapter_norm", "lora/output_change", "val/loss"}
    assert [s.value for s in acc.Scalars("lora/output_change")] == [0.25]
