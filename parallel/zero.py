"""The same model under DeepSpeed ZeRO-1/2/3 (``parallel.engine=deepspeed``), optionally with
megatron-core tensor parallelism (:mod:`parallel.megatron_tp`).

The DeepSpeed config is built here from the two numbers of the job's ``train`` section it needs
(``grad_accum``, ``grad_clip``; no JSON files). The optimizer and schedule are the caller's, made by
``launch.optim.build_optimizer`` and ``build_scheduler`` exactly as for FSDP (parallel/ does not import
launch/), so hyper-parameters, decay groups and the learning-rate curve match the FSDP path. The loss
convention matches the FSDP engine's: a step's gradient is that of the per-sample mean over the global
batch (:func:`backward`).

What DeepSpeed 0.19 needs on a CPU, found on this machine (torch 2.13 CPU, gloo):

- The accelerator is detected as ``cpu`` without CUDA (``DS_ACCELERATOR=cpu`` only silences the
  warning); its communication backend is gloo. An existing gloo process group is reused.
- Creating DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce op (used only
  by inference kernels): 3 minutes on 2 cores in a fresh environment, and one run with it loaded
  aborted at exit ("terminate called without an active exception"). :func:`build_engine` marks the
  op incompatible first, in the probe cache that ``deepspeed/ops/__init__.py`` keeps editable.
- A client ``torch.optim.AdamW`` is accepted by ZeRO 1, 2 and 3 (it is in DeepSpeed's supported
  list). With optimizer offload DeepSpeed refuses it (``ZeRORuntimeException: You are using
  ZeRO-Offload with a client provided optimizer``) and wants its ``DeepSpeedCPUAdam`` (a C++ op
  compiled at first use) unless ``zero_force_ds_cpu_optimizer`` is false; it is false here so the
  optimizer math stays torch's, as on the FSDP path.
- ZeRO 1, 2 and 3 train on CPU in fp32 and equal one process (``tests/parallel/test_zero.py``).
- bf16 is DeepSpeed's ``torch_autocast`` (fp32 module weights, bf16 autocast compute), not its ``bf16``
  section. With the ``bf16`` section the module's weights are bf16 and DeepSpeed's forward, finding
  an outer ``torch.autocast`` (``torch.is_autocast_enabled()``, i.e. CUDA's) while its own
  ``torch_autocast`` is off, *disables* it: the trainer's fp32 latents meet bf16 weights on a GPU
  ("mat1 and mat2 must have the same dtype"), and so does every call of ``engine.module`` outside the
  engine (validation, samples). With ``torch_autocast`` the forward runs under autocast with or
  without an outer one, and ``engine.module`` takes fp32 inputs anywhere. On CPU the question never
  arises (CPU autocast is not what ``torch.is_autocast_enabled()`` asks about), so the tests raise
  CUDA's autocast flag beside CPU autocast to take the GPU's branch
  (``tests/launch/test_deepspeed_bf16.py``).
- DeepSpeed's checkpoint engine reads its files with ``weights_only=False``. :func:`build_engine`
  installs :class:`SafeCheckpointEngine`, which reads them with ``weights_only=True`` and allows
  exactly the three DeepSpeed classes its optimizer files hold (found with
  ``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO-1/2/3 checkpoints, fp32 and bf16).
  Every file ``load_checkpoint`` reads goes through it (read in deepspeed/runtime/engine.py and
  state_dict_factory.py); only the universal-checkpoint loaders call ``torch.load(weights_only=False)``
  themselves, and :func:`deepspeed_config` never enables them (no ``checkpoint.load_universal``).
- DeepSpeed's ``save_checkpoint`` writes between collectives (a barrier, ZeRO-3's all-gather of
  persistent parameters, a closing barrier): a rank raising from a failed write would leave the others
  waiting there. :class:`SafeCheckpointEngine` keeps the failure until the save is over, and
  :func:`save_checkpoint` then raises it on every rank (``tests/parallel/test_zero.py``).
- DeepSpeed keeps the model-parallel unit in a module global (``deepspeed.utils.groups.mpu``) that a
  later engine without one would inherit, so :func:`build_engine` always passes a
  :class:`DeepSpeedGroups`, with a one-rank tensor-parallel group when there is no tp.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils import safe_get_full_fp32_param
from deepspeed.utils.tensor_fragment import fragment_address
from torch import Tensor, nn

from parallel import checkpoint as ckpt
from parallel.checkpoint_safety import os_error_in
from parallel.collectives import group_rank, group_size
from parallel.megatron_tp import full_tensor

# our items inside DeepSpeed's client state (its own keys share that dict)
_CLIENT_KEY = "spacetime_dit"


@dataclass
class DeepSpeedGroups:
    """The model-parallel unit (``mpu``) DeepSpeed asks for its groups (Megatron's method names).

    DeepSpeed partitions ZeRO state and reduces gradients over the data-parallel group, and adds the
    gradient norms of tensor-parallel slices over the tensor-parallel group (counting replicated
    parameters on tp rank 0 only). No pipeline or sequence parallelism: those methods say one rank.
    """

    dp_group: dist.ProcessGroup
    tp_group: dist.ProcessGroup

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.dp_group

    def get_data_parallel_rank(self) -> int:
        return group_rank(self.dp_group)

    def get_data_parallel_world_size(self) -> int:
        return group_size(self.dp_group)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.dp_group)

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.tp_group

    def get_model_parallel_rank(self) -> int:
        return group_rank(self.tp_group)

    def get_model_parallel_world_size(self) -> int:
        return group_size(self.tp_group)

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_process_group_ranks(self.tp_group)[0]

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


def deepspeed_config(
    *, grad_accum: int, grad_clip: float, zero_stage: int, offload: bool = False, bf16: bool = False
) -> dict:
    """The DeepSpeed config dict for a job (the optimizer comes from the caller).

    Args:
        grad_accum: ``train.grad_accum``, micro-batches per optimizer step.
        grad_clip: ``train.grad_clip``, the global gradient-norm limit (0: off).
        zero_stage: 1 (optimizer state), 2 (+ gradients) or 3 (+ parameters) partitioned over dp.
        offload: keep the optimizer state (and its step) in host memory.
        bf16: DeepSpeed's ``torch_autocast``: the module's weights stay fp32 (they are the master
            weights; no bf16 copy), its forward runs under bf16 autocast, gradients are fp32 and
            reduced in fp32 (FSDP's ``reduce_dtype``). See :func:`build_engine` for why not DeepSpeed's
            ``bf16`` section.
    """
    if zero_stage not in (1, 2, 3):
        raise ValueError(f"parallel.zero_stage={zero_stage}: must be 1, 2 or 3")
    zero: dict = {"stage": zero_stage}
    if zero_stage == 3:
        # no parameter stays whole outside the partitions: the EMA swap writes the partitions only, so a
        # "persistent" small parameter (biases, norms, tables) would keep its training value while the
        # EMA is swapped in, and validation and samples would mix EMA and raw weights
        zero["stage3_param_persistence_threshold"] = 0
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    cfg = {
        # batches are ours (variable-size buckets): DeepSpeed uses these only for its sample counters
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(grad_clip),  # 0: off, as train.grad_clip
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,  # logging is the trainer's
        "wall_clock_breakdown": False,
    }
    if bf16:
        cfg["torch_autocast"] = {
            "enabled": True,
            "dtype": "bfloat16",
            # no module is "lower-precision safe": DeepSpeed would tag their parameters to reduce
            # gradients (and, at stage 3, gather weights) in bf16; fp32 keeps the sums over ranks exact
            # to fp32 as on the FSDP path, at 2x the bytes of a bf16 ZeRO-3 all-gather
            "lower_precision_safe_modules": [],
        }
        cfg["communication_data_type"] = "fp32"
    return cfg


def autocast(device_type: str, bf16: bool):
    """The trainer's autocast around the engine's forward (DeepSpeed's ``torch_autocast`` enters its
    own inside, inheriting these settings), without autocast's weight-cast cache.

    ZeRO-3 gathers a module's weights for its forward and frees them after, and DeepSpeed's linear
    (which replaces ``F.linear`` under ZeRO-3) saves the fp32 parameter, not a bf16 copy, for backward.
    The cache would keep the bf16 copy of every weight until the autocast region ends: the whole model
    per rank during the forward. Each weight is used once per forward here, so nothing is recast.
    """
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False)


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, reading with ``weights_only=True``: a checkpoint file can
    hold tensors, containers and the listed DeepSpeed records, never a callable or another class.

    A failed write does not raise inside DeepSpeed's save: it is kept (:attr:`failure`) and every later
    write of that save skipped, so the rank goes on through the save's remaining collectives (ZeRO-3's
    all-gather of persistent parameters, the closing barrier) in step with the others, and
    :func:`save_checkpoint` raises it afterwards. Raised inside, the rank would wait in the exchange of
    errors while the others wait in DeepSpeed's barrier, until the process group's timeout.
    """

    ALLOWED = (LossScaler, ZeroStageEnum, fragment_address)
    failure: BaseException | None = None
    phase = "idle"
    """``writing`` between DeepSpeed's ``create`` (after its opening barrier) and ``commit`` (before its
    closing barrier)."""

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(list(self.ALLOWED)):
            return torch.load(path, map_location=map_location, weights_only=True)

    def create(self, info) -> None:
        self.phase, self.failure = "writing", None
        super().create(info)

    def commit(self, info) -> bool:
        self.phase = "committed"
        return super().commit(info)

    def save(self, state_dict, path: str) -> None:
        if self.failure is not None:
            return  # this save has failed already: nothing more goes into its directory
        try:
            # opened here, so a failed write is an OSError naming the file (torch's own writer reports
            # ``unexpected pos``, the OSError only as its context), and synced as our own files are
            with open(path, "wb") as f:
                torch.save(state_dict, f, _use_new_zipfile_serialization=self.zipfile_serialization)
                f.flush()
                os.fsync(f.fileno())
        except Exception as e:
            cause = os_error_in(e)
            self.failure = e
            if cause is not None:
                self.failure = OSError(cause.errno, cause.strerror, path)
                self.failure.__cause__ = e


def _skip_shm_comm_build() -> None:
    # see the module docstring: an inference-only op whose JIT build costs minutes on a CPU
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_engine(
    model: nn.Module,
    *,
    grad_accum: int,
    grad_clip: float,
    optimizer: torch.optim.Optimizer,
    scheduler_fn: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler],
    zero_stage: int,
    groups: DeepSpeedGroups,
    offload: bool = False,
    bf16: bool = False,
) -> DeepSpeedEngine:
    """Wrap ``model`` (full weights, already tensor-parallel if tp > 1) in a DeepSpeed engine.

    Every rank must pass the same initial weights (build them with one seed); DeepSpeed broadcasts
    within each data-parallel group only. The process group must already exist (gloo or nccl).

    Args:
        model: the model, on its device.
        grad_accum, grad_clip: ``train.grad_accum`` and ``train.grad_clip`` (see :func:`deepspeed_config`).
        optimizer: ``launch.optim.build_optimizer(model, cfg.train, device)``, built after any
            :func:`~parallel.megatron_tp.apply_megatron_tp` (its groups name the final parameters).
        scheduler_fn: ``lambda opt: launch.optim.build_scheduler(opt, cfg.train)``; DeepSpeed calls
            it with the optimizer it steps and advances it after each applied update.
        zero_stage: 1, 2 or 3.
        groups: data- and tensor-parallel groups (a one-rank tp group without tensor parallelism).
        offload: optimizer state in host memory (ZeRO-Offload).
        bf16: see :func:`deepspeed_config`.
    """
    _skip_shm_comm_build()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler_fn,
        mpu=groups,
        config=deepspeed_config(
            grad_accum=grad_accum, grad_clip=grad_clip, zero_stage=zero_stage, offload=offload, bf16=bf16
        ),
        dist_init_required=False,
    )
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
    return engine


def backward(engine: DeepSpeedEngine, per_sample: Tensor, global_samples: int) -> None:
    """Backward of one micro-batch with the FSDP trainer's loss convention.

    DeepSpeed averages gradients over its data-parallel ranks; multiplying by their number makes
    that a sum, and dividing by ``global_samples`` (every sample of the step, all micro-batches and
    dp ranks, counted once) makes the step's gradient that of the per-sample mean, however samples
    were split. ``scale_wrt_gas=False``: the division by the count already covers accumulation.

    Args:
        per_sample: this micro-batch's per-sample losses (B).
        global_samples: samples in the whole optimizer step (known before its first backward).
    """
    engine.backward(per_sample.sum() * (engine.dp_world_size / global_samples), scale_wrt_gas=False)


@dataclass
class StepResult:
    grad_norm: float
    """Global gradient norm before clipping (non-finite for a skipped step)."""
    applied: bool
    """False when DeepSpeed skipped the update (non-finite gradients); the schedule did not advance."""


def step(engine: DeepSpeedEngine) -> StepResult | None:
    """DeepSpeed's step after every micro-batch's :func:`backward`: an update (clip, AdamW, schedule)
    on the last micro-batch of the accumulation, else bookkeeping only (returns None then)."""
    boundary = engine.is_gradient_accumulation_boundary()
    engine.step()
    if not boundary:
        return None
    norm = engine.get_global_grad_norm()
    return StepResult(float(norm) if norm is not None else float("nan"), engine.was_step_applied())


def save_checkpoint(
    engine: DeepSpeedEngine,
    root: str | os.PathLike,
    step_num: int,
    *,
    extra: dict | None = None,
    rank_state: dict | None = None,
    files: dict[str, str] | None = None,
    tensors: dict[str, dict[str, Tensor]] | None = None,
    keep: int = 0,
) -> Path:
    """Write ``root/step-XXXXXXXX/`` collectively, in :mod:`parallel.checkpoint`'s layout and atomicity
    (written under ``.tmp-…``, renamed after a ``COMPLETE`` marker with every file's checksum), so
    ``checkpoint.latest``, ``verify`` and ``prune`` work on it; a failed write (a full disk) raises
    ``CheckpointError`` on every rank and leaves the earlier checkpoints.

    DeepSpeed writes the weights, the ZeRO partitions of the optimizer, and the scheduler; ``extra``
    (step, EMA …, the same on every rank) rides in its client state, ``rank_state`` (RNG, loader
    position) goes to ``rank-XXXXX.pt`` like the FSDP trainer's. ``tensors`` (file name → whole
    state dict, significant on rank 0 only) are written by rank 0 as safetensors: the trainer puts
    the whole weights and EMA there (:data:`parallel.checkpoint.WHOLE_FILES`), which is what export
    and ``init.from`` read.
    """
    root = Path(root)
    rank = dist.get_rank()
    client = {_CLIENT_KEY: {"step": step_num, **(extra or {})}}

    def write(tmp: Path) -> None:
        _deepspeed_save(engine, root, tmp.name, client)
        ckpt.save_pt(rank_state or {}, tmp / f"rank-{rank:05d}.pt")
        if rank == 0:  # before the checksums, so that the ranks share the summing of these too
            ckpt.write_safetensors(tmp, tensors or {}, step_num)

    return ckpt.write_checkpoint(root, step_num, write, files, keep, engine="deepspeed")


def _deepspeed_save(engine: DeepSpeedEngine, root: Path, tag: str, client: dict) -> None:
    """``engine.save_checkpoint`` with every rank in the same collectives, whichever rank fails to write.

    A failed write of DeepSpeed's checkpoint engine raises after the save (see
    :class:`SafeCheckpointEngine`). Anything else a rank raises between the engine's ``create`` and
    ``commit`` (DeepSpeed's copy of its recovery script, on rank 0) skips the closing ``dist.barrier()``
    the other ranks wait in: the rank calls it here before raising (under ZeRO-3 with persistent
    parameters an all-gather precedes that barrier, so only the engine's own writes are certain to
    keep every rank in step).
    """
    writer = engine.checkpoint_engine
    writer.phase = "idle"
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client, save_latest=False)
    except Exception:
        if getattr(writer, "phase", None) == "writing":
            with contextlib.suppress(Exception):  # the original error is the one to report
                dist.barrier()  # DeepSpeed's closing one, where the other ranks are
        raise
    failure = getattr(writer, "failure", None)
    if failure is not None:
        writer.failure = None
        raise failure


def load_checkpoint(engine: DeepSpeedEngine, path: str | os.PathLike) -> tuple[dict, dict | None]:
    """Restore weights, optimizer partitions and scheduler from :func:`save_checkpoint`'s ``path``
    (same world size and layout: ZeRO partitions are per rank), after verifying its checksums (the
    ranks share the reading). Returns ``(extra, rank_state)``: ``extra["step"]`` and what was saved
    with it, and this rank's own items (None if the checkpoint had fewer ranks)."""
    path = Path(path)
    ckpt.verify(path, distributed=True)
    loaded, client = engine.load_checkpoint(
        str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if loaded is None:
        raise FileNotFoundError(f"{path}: DeepSpeed found no checkpoint there")
    return client[_CLIENT_KEY], ckpt.rank_state(path, dist.get_rank())


def _whole_master(p: nn.Parameter) -> Tensor:
    """The fp32 master copy of ``p`` assembled over data parallel ranks (a collective under ZeRO)."""
    master = safe_get_full_fp32_param(p) if p.requires_grad else None
    if master is not None:
        return master
    # frozen (init.freeze): no optimizer copy to read; ZeRO-3 still partitions the parameter
    # itself (this rank's ``p`` is an empty placeholder), ZeRO-1/2 keep it whole
    with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
        return p.detach().float().clone()


def full_state_dict(
    engine: DeepSpeedEngine, tp_group: dist.ProcessGroup | None = None, *, all_ranks: bool = True
) -> dict[str, Tensor]:
    """Whole fp32 master weights (the optimizer's, not a bf16 copy) under the single-device names,
    on CPU, on every rank (``all_ranks=False``: rank 0 only, the others get ``{}``). Collective over
    the world: call it on all ranks.

    ZeRO partitions are assembled by DeepSpeed (``safe_get_full_fp32_param``, which gathers a
    ZeRO-3 parameter on its own), then tensor-parallel slices by :func:`~parallel.megatron_tp.full_tensor`;
    one parameter at a time, so no rank ever holds more than the result.
    """
    model = engine.module
    keep = all_ranks or dist.get_rank() == 0
    out = {}
    for name, p in model.named_parameters():
        whole = full_tensor(_whole_master(p), tp_group, like=p)
        if keep:
            out[name] = whole.cpu().clone()
    if not keep:
        return {}
    for name, b in model.named_buffers():
        out[name] = b.detach().cpu().clone()
    return {k: out[k] for k in model.state_dict()}


def export(
    engine: DeepSpeedEngine,
    out_dir: str | os.PathLike,
    *,
    step_num: int,
    tp_group: dist.ProcessGroup | None = None,
    config: dict | None = None,
    ema: dict[str, Tensor] | None = None,
) -> Path:
    """``model.safetensors`` (and ``ema.safetensors``, ``config.json``) as ``launch.export`` writes
    them: single-device keys, whole fp32 tensors, metadata ``{"format": "pt", "step": …}``.
    Collective (see :func:`full_state_dict`); rank 0 writes.

    Args:
        config: ``launch.export.export_config(cfg, step, source)``, written as ``config.json``.
        ema: whole EMA weights by name, if the run keeps them.
    """
    state = full_state_dict(engine, tp_group, all_ranks=False)
    out = Path(out_dir)
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        whole = {ckpt.WHOLE_FILES["model"]: state, ckpt.WHOLE_FILES["ema"]: ema}
        ckpt.write_safetensors(out, whole, step_num)
        if config is not None:
            (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    ckpt.barrier()
    return out


__all__ = [
    "DeepSpeedGroups",
    "SafeCheckpointEngine",
    "StepResult",
    "deepspeed_config",
    "autocast",
    "build_engine",
    "backward",
    "step",
    "save_checkpoint",
    "load_checkpoint",
    "full_state_dict",
    "export",
]
