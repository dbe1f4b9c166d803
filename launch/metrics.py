"""Training metrics: averaged over the steps between logs and across ranks, written to
``run.dir/metrics.jsonl`` and tensorboard by rank 0, shown by :mod:`launch.progress` as a bar or
plain lines.

The reduction is two collectives per record (one sum of every running total and count, one max),
kept here instead of torchmetrics' aggregation classes: importing ``torchmetrics`` costs about 3 s of
start-up on every rank of every launch (it imports its audio and text packages, scipy.signal and
transformers), and a sum and a max of a dozen floats do not need it. The real metric arithmetic
(Fréchet distances, CLIP score in ``launch.fidelity``) does use torchmetrics, imported when asked for.

Units in a record: ``loss``/``val_loss`` per-sample means; ``tokens_per_s`` latent tokens per second
summed over ranks; ``step_time``/``data_wait`` seconds per optimizer step, and the rest of the step
split into ``encode_time`` (codec + text encoder), ``forward_time``, ``backward_time`` and ``optim_time``
(gradient reduction, clipping, step, EMA); ``tflops_per_device`` model
TFLOP/s per rank; ``mfu`` a fraction of the device's bf16 peak (null where the peak is unknown, e.g. a
CPU); ``tokens``/``flops`` the latent tokens and model FLOPs of the steps since the previous record,
summed over ranks; ``max_memory`` GiB (peak CUDA allocation, or peak resident memory on a CPU)
maximised over ranks.
"""

from __future__ import annotations

import io
import json
import math
import resource
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from launch.progress import Progress

MEAN_KEYS = (
    "loss",
    "lr",
    "grad_norm",
    "step_time",
    "data_wait",
    "encode_time",
    "forward_time",
    "backward_time",
    "optim_time",
    "tflops_per_device",
    "mfu",
)


EVAL_KEYS = ("fid", "fvd", "clip_score")
"""Scores of generated samples (with the ``probe_*`` keys): tensorboard's ``eval/`` section."""


def scalar_tag(key: str) -> str:
    """Tensorboard tag of a record key: ``val/loss``, ``eval/<key>`` for sample scores, a key that
    names its own group (``lora/adapter_norm``) as it is, else ``train/<key>``."""
    if key == "val_loss":
        return "val/loss"
    if key.startswith("lora/"):  # the LoRA guard's own section, next to val/ (not train/lora/...)
        return key
    return f"eval/{key}" if key in EVAL_KEYS or key.startswith("probe_") else f"train/{key}"


def max_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Metrics:
    """Accumulates per-step values on every rank; :meth:`log` reduces them and rank 0 writes them."""

    def __init__(
        self, run_dir: Path, is_main: bool, device: torch.device, tensorboard: bool, progress: Progress
    ):
        self.is_main, self.progress = is_main, progress
        self.device = device if device.type == "cuda" else torch.device("cpu")  # NCCL reduces CUDA tensors
        self._reset()
        self.window_start = time.perf_counter()
        # held open for the run (appends survive restarts); closed in close()
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if is_main else None  # noqa: SIM115
        self.tb = None
        if is_main and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))

    def _reset(self) -> None:
        # running totals of this rank since the last record: per mean key a sum and a count of the
        # values given (None and NaN are left out, so a key no rank reported is logged as null)
        self.sums = dict.fromkeys(MEAN_KEYS, 0.0)
        self.counts = dict.fromkeys(MEAN_KEYS, 0)
        self.tokens = self.flops = self.memory = 0.0

    def update(self, tokens: int, memory_gib: float, flops: float = 0.0, **values: float | None) -> None:
        for k, v in values.items():
            if v is None:
                continue
            if k not in self.sums:
                raise KeyError(f"metric {k!r}: not one of {', '.join(MEAN_KEYS)}")
            if not math.isnan(float(v)):
                self.sums[k] += float(v)
                self.counts[k] += 1
        self.tokens += float(tokens)
        self.flops += float(flops)
        self.memory = max(self.memory, float(memory_gib))

    def _reduced(self) -> tuple[list[float], float]:
        """This window's totals summed over ranks (sums, counts, tokens, flops) and the max memory."""
        totals = [*self.sums.values(), *self.counts.values(), self.tokens, self.flops]
        memory = self.memory
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            buf = torch.tensor(totals, dtype=torch.float64, device=self.device)
            dist.all_reduce(buf)
            peak = torch.tensor([memory], dtype=torch.float64, device=self.device)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            totals, memory = buf.tolist(), float(peak.item())
        return totals, memory

    def log(self, step: int, extra: dict | None = None) -> dict:
        """Reduce over ranks (a collective: every rank calls it), write, reset; returns the record."""
        elapsed = time.perf_counter() - self.window_start
        totals, memory = self._reduced()
        n = len(MEAN_KEYS)
        record: dict = {"step": step}
        for i, k in enumerate(MEAN_KEYS):
            record[k] = totals[i] / totals[n + i] if totals[n + i] > 0 else None
        tokens, flops = totals[2 * n], totals[2 * n + 1]
        record["tokens_per_s"] = tokens / max(elapsed, 1e-9)
        # totals of the steps since the previous record, over all ranks (what a scaling sweep sums)
        record["tokens"] = tokens
        record["flops"] = flops
        record["max_memory"] = memory
        record.update(extra or {})
        self._reset()
        self.window_start = time.perf_counter()
        self.write(record)
        return record

    def write(self, record: dict) -> None:
        """Rank 0: one JSON line, tensorboard scalars and a progress line."""
        if not self.is_main:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(scalar_tag(k), v, record["step"])
        self.progress.record(record)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """One H×W×3 uint8 image in tensorboard's image tab (rank 0; nothing without tensorboard)."""
        if self.tb is None:
            return
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"Metrics.image({tag!r}): expected H×W×3 uint8, got {image.shape} {image.dtype}")
        self.tb.add_image(tag, image, step, dataformats="HWC")

    def video(self, tag: str, frames: np.ndarray, step: int, fps: float) -> None:
        """An animated GIF of T×H×W×3 uint8 frames in tensorboard's image tab (tensorboard shows
        encoded GIFs as animations; this avoids add_video's moviepy dependency)."""
        if self.tb is None:
            return
        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary

        buf = io.BytesIO()
        images = [Image.fromarray(f) for f in frames]
        images[0].save(
            buf, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0
        )
        t, h, w, _ = frames.shape
        image = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=buf.getvalue())
        self.tb._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
