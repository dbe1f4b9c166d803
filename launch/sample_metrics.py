"""Scores of generated videos at evaluation time (``eval.sample_metrics``) and after training
(``python -m launch.evaluate``).

A fixed set of prompts (``eval.sample_prompts``, or the captions of the first ``eval.sample_count``
held-out clips) is sampled with the EMA weights and the ``sample`` section's settings, prompt ``i``
from its own seed :func:`prompt_seed` (``seed``, ``i``) and alone in its batch, so a video, and every
score, is the same whichever rank draws it and however many data-parallel ranks there are. Prompt
``i`` is drawn by data-parallel rank ``i % dp``; the shares are padded to one length with an
uncounted repeat, since every forward of a sharded model is a collective, and context/tensor-parallel
peers draw theirs together. The leader of each data-parallel group decodes its share, writes it
(``NNN.mp4`` with its prompt in ``NNN.txt``) and scores the files it wrote:

- with the probe (:mod:`data.probe`) when every prompt is in the built-in dataset's grammar: the
  per-clip results are gathered and summed in prompt order, so the logged numbers are exactly what
  ``python -m data.probe score`` prints for the folder (counts over ranks, not means of means);
- with the Fréchet and CLIP metrics of :mod:`launch.fidelity` when any is configured: each leader adds
  its generated share and its share of the held-out clips; ``compute()`` sums the states over ranks.

The values are flat keys (``probe_overall``, ``probe_color`` …, ``probe_jerk`` …, ``fid``, ``fvd``,
``clip_score``) for ``metrics.jsonl`` and sweeps; rank 0 also gets one grid image of every sample
(rows: prompts, columns: frames).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from data.batch import Batch
from data.probe import parse_caption, score_paths, summarize
from dit.config import DiTConfig
from dit.extras import MissingExtra
from launch.batches import derive_seed
from launch.config import JobConfig, SampleConfig
from launch.datacheck import NotScorable
from launch.distributed import all_reduce
from launch.evaluate import agreed_count, one_pass, share, text_from_rank0, val_loader
from launch.sample import latents_for, to_uint8, write_mp4

log = logging.getLogger(__name__)

SAMPLE_STREAM = 2
"""Tells the seeds of evaluation samples from any other seed made of the same numbers."""
GRID_HEIGHT = 64
"""Largest row height of the sample grid (frames are subsampled by a whole stride to fit)."""
GRID_COLUMNS = 16
"""Most frames shown per prompt in the grid (evenly spaced)."""


def prompt_seed(seed: int, i: int) -> int:
    """Seed of the noise of evaluation prompt ``i``: a function of (``seed``, ``i``) alone."""
    return derive_seed(seed, i, SAMPLE_STREAM)


def fidelity_paths(cfg: JobConfig) -> dict[str, str]:
    """The configured Fréchet/CLIP networks by :class:`launch.fidelity.FidelityConfig` field."""
    e = cfg.eval
    return {k: v for k, v in (("fid_features", e.fid_features), ("fvd_features", e.fvd_features),
                              ("clip_model", e.clip_model)) if v}  # fmt: skip


def build_fidelity(paths: dict[str, str], device: torch.device, settings: SampleConfig, key: str = "eval"):
    """:class:`launch.fidelity.VideoFidelity` of ``paths`` (None when empty; torchmetrics is imported only
    then: it costs seconds of start-up), its networks tried on clips of the ``sample`` settings' shape.
    Errors name ``key.field`` and the path."""
    if not paths:
        return None
    from launch.fidelity import FidelityConfig, VideoFidelity

    fc = FidelityConfig(**paths)
    fc.validate(key)
    return VideoFidelity(fc, device, key=key, clip=(settings.frames, settings.height, settings.width))


def probe_applies(prompts: list[str]) -> bool:
    """Whether every prompt is in the built-in dataset's grammar (the probe can score it)."""
    return all(parse_caption(p) is not None for p in prompts)


def check_scorable(prompts: list[str], fidelity_on: bool, source: str) -> None:
    """:class:`NotScorable` when nothing would score the samples of ``prompts`` (named by ``source``)."""
    if not prompts:
        raise NotScorable(f"{source}: no prompts to sample")
    if not fidelity_on and not probe_applies(prompts):
        bad = next(p for p in prompts if parse_caption(p) is None)
        raise NotScorable(
            f"{source}: prompt {bad!r} is not in the built-in dataset's grammar, so the probe cannot score "
            "it, and none of eval.fid_features, eval.fvd_features, eval.clip_model is set: nothing would "
            "score the samples (eval.sample_metrics=false turns the sample scores off)"
        )


def held_out(
    cfg: JobConfig,
    count: int,
    keep_real: Callable[[int], bool],
    to_pixels: Callable[[Batch, int], np.ndarray],
) -> tuple[list[str], list[np.ndarray]]:
    """The prompts of the first ``count`` held-out samples of ``data.val_shards`` (one pass, fixed order:
    captions, or class ids for class-conditioned data) and the pixels of those ``keep_real(i)`` selects
    (``to_pixels(batch, j)``: T×H×W×3 uint8). Every rank reads the same set; an error on any rank is
    raised on every rank, naming ``data.val_shards``."""
    prompts: list[str] = []
    real: list[np.ndarray] = []
    error = None
    try:
        for batch in one_pass(val_loader(cfg), lambda _: len(prompts) >= count):
            for j in range(min(len(batch), count - len(prompts))):
                label = batch.label
                text = batch.text[j] if label is None else str(int(label[j]))
                if keep_real(len(prompts)):
                    real.append(to_pixels(batch, j))
                prompts.append(text)
    except Exception as e:  # noqa: BLE001 (the other ranks must hear of it before the next collective)
        error = e
    if agreed_count(0 if error is None else -1) < 0:
        if error is not None:
            raise error
        raise ValueError(f"data.val_shards={cfg.data.val_shards!r}: another rank could not read it (its log)")
    return prompts, real


@dataclass
class SampleEval:
    """What to sample and how to score it; :meth:`run` does it (a collective: every rank calls it)."""

    prompts: list[str]
    settings: SampleConfig
    """Sampler, steps, cfg, frames, size and fps (the run's ``sample`` section)."""
    seed: int
    probe: bool
    """Score with the probe (every prompt is in the built-in grammar)."""
    fidelity: object | None = None
    """A :class:`launch.fidelity.VideoFidelity`, built on every rank (its ``compute`` is a collective)."""
    real: list[np.ndarray] = field(default_factory=list)
    """This data-parallel rank's share of the held-out clips (T×H×W×3 uint8), for FID and FVD."""
    dp_rank: int = 0
    dp_size: int = 1
    leader: bool = True
    """Whether this rank decodes and scores its data-parallel group's share (its cp/tp peers do not)."""

    @torch.no_grad()
    def run(
        self,
        model: nn.Module,
        obj,
        arch: DiTConfig,
        compression,
        encode_text,
        decode: Callable[[torch.Tensor], np.ndarray],
        out_dir: Path,
        device,
        bf16: bool,
    ) -> tuple[dict, np.ndarray | None]:
        """Sample this rank's share, write and score it, combine over ranks.

        Args:
            model: the DiT (sharded or plain) in the weights to score (the EMA's).
            obj: its diffusion objective.
            arch: its architecture (conditioning, channels).
            compression: the codec's geometry, for the latent shape.
            encode_text: captions → (states, mask); called once with every prompt on every rank.
            decode: latents → B×T×H×W×3 uint8 (leaders only).
            out_dir: where the leaders write ``NNN.mp4`` + ``NNN.txt``.
            device: where the model runs.
            bf16: sample under bf16 autocast (the training precision).

        Returns:
            (flat metric values, the sample grid on rank 0 / None elsewhere).
        """
        s, n = self.settings, len(self.prompts)
        indices, scored = share(n, self.dp_rank, self.dp_size)
        states = encode_text(self.prompts) if arch.conditioning == "text" else None
        # the lambda below hands out rows of ``states`` whatever it is asked: the CFG null of an
        # empty-prompt model is encoded here, alone, as the trainer's dropout null is
        empty = None
        if arch.conditioning == "text" and arch.text_null == "empty_prompt":
            empty = encode_text([""])
        was_training = model.training
        model.eval()
        latents = []
        for i in indices:
            z = latents_for(
                model, obj, arch, compression,
                lambda _, i=i: (states[0][i : i + 1], states[1][i : i + 1]),  # this prompt's row of all
                [self.prompts[i]], frames=s.frames, height=s.height, width=s.width, fps=s.fps,
                steps=s.steps, sampler=s.sampler, cfg_scale=s.cfg, seed=prompt_seed(self.seed, i),
                device=device, bf16=bf16, grid=s.grid, empty_prompt=empty,
            )  # fmt: skip
            latents.append(z)
        model.train(was_training)
        mine, error = {}, None
        if self.leader:
            try:
                mine = self._score_share(indices[:scored], latents[:scored], decode, Path(out_dir))
            except Exception as e:  # noqa: BLE001 (raised on every rank below, after the gather)
                error, mine = e, {}
        gathered = _gather((mine, None if error is None else f"{type(error).__name__}: {error}"))
        failed = [msg for _, msg in gathered if msg]
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"sample metrics: another rank failed: {failed[0]}")
        by_index = {i: item for part, _ in gathered for i, item in part.items()}
        values = self._probe_values([by_index[i]["row"] for i in range(n)]) if self.probe else {}
        if self.fidelity is not None:
            values |= self.fidelity.compute()
            self.fidelity.reset()
        main = not dist.is_initialized() or dist.get_rank() == 0
        grid = np.concatenate([by_index[i]["thumb"] for i in range(n)]) if main else None
        return values, grid

    def _score_share(self, indices: list[int], latents: list[torch.Tensor], decode, out_dir: Path) -> dict:
        """Decode, write and score this group's samples: ``{index: {"row": probe row, "thumb": frames}}``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        videos, files = [], []
        for i, z in zip(indices, latents, strict=True):
            frames = decode(z)[0]  # T, H, W, 3 uint8
            path = out_dir / f"{i:03d}.mp4"
            write_mp4(path, frames, self.settings.fps, caption=self.prompts[i])
            videos.append(frames)
            files.append(path)
        rows = [None] * len(files)
        if self.probe and files:
            # the files as written (H.264 and all): what `python -m data.probe score out_dir` reads
            result = score_paths(files, per_clip=True)
            if result["skipped"]:
                raise ValueError(f"the probe could not read {result['skipped_files']}")
            rows = result["clips"]
        if self.fidelity is not None:
            fake = np.stack(videos) if videos else np.zeros((0, 1, 1, 1, 3), np.uint8)
            self.fidelity.update(fake, prompts=[self.prompts[i] for i in indices])
            for clip in self.real:  # one at a time: held-out clips come in several sizes
                self.fidelity.update(np.zeros((0, 1, 1, 1, 3), np.uint8), prompts=[], real=clip[None])
        return {i: {"row": r, "thumb": thumbnail(v)} for i, r, v in zip(indices, rows, videos, strict=True)}

    @staticmethod
    def _probe_values(rows: list[dict]) -> dict:
        """:func:`data.probe.summarize` of the per-clip rows, in prompt order, as flat keys."""
        summary = summarize(rows)
        values = {f"probe_{a}": v for a, v in summary["accuracy"].items()}
        values["probe_overall"] = summary["overall"]
        values["probe_found"] = summary["found"]
        values |= {f"probe_{k}": v for k, v in summary["temporal"].items()}
        values["probe_n"] = summary["n"]
        return values


def _gather(obj) -> list:
    """Every rank's ``obj`` (pickled by torch.distributed between our own processes), or ``[obj]``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def thumbnail(frames: np.ndarray) -> np.ndarray:
    """One grid row: up to :data:`GRID_COLUMNS` evenly spaced frames side by side, subsampled by a whole
    stride to at most :data:`GRID_HEIGHT` pixels high (h × (columns · w) × 3 uint8)."""
    t, h = frames.shape[:2]
    keep = np.unique(np.linspace(0, t - 1, min(t, GRID_COLUMNS)).round().astype(int))
    stride = -(-h // GRID_HEIGHT)
    small = frames[keep, ::stride, ::stride]  # k, h', w', 3
    return np.concatenate(list(small), axis=1)  # h', k·w', 3


def pixels_of(batch: Batch, j: int, decode: Callable[[torch.Tensor], np.ndarray]) -> np.ndarray:
    """Held-out sample ``j`` of ``batch`` as T×H×W×3 uint8: its pixels, or its latents decoded."""
    if batch.video is not None:
        return to_uint8(batch.video[j : j + 1])[0]
    return decode(batch.latent[j : j + 1])[0]


def from_config(
    cfg: JobConfig, conditioner, dp_rank: int, dp_size: int, leader: bool, device: torch.device
) -> SampleEval:
    """The :class:`SampleEval` of a training run: prompts and held-out clips read once (every rank reads
    the same pass), the fidelity networks loaded on every rank. Errors name the config keys."""
    fidelity = build_fidelity(fidelity_paths(cfg), device, cfg.sample)
    need_real = bool(cfg.eval.fid_features or cfg.eval.fvd_features)
    prompts, source = list(cfg.eval.sample_prompts), "eval.sample_prompts"
    real: list[np.ndarray] = []
    if not prompts or need_real:
        from launch.sample import decode

        found, real = held_out(
            cfg,
            cfg.eval.sample_count,
            lambda i: need_real and leader and i % dp_size == dp_rank,
            lambda batch, j: pixels_of(batch, j, lambda z: decode(conditioner.codec, z)),
        )
        if not prompts:
            prompts, source = found, f"data.val_shards={cfg.data.val_shards!r} (eval.sample_prompts is empty)"
    if need_real:
        real = [c for c in real if c.shape[0] > 1 or cfg.sample.frames == 1]  # clips, not stills
        if all_reduce(float(len(real)), "sum", device) < 2:
            raise ValueError(
                f"eval.fid_features/eval.fvd_features: the first eval.sample_count={cfg.eval.sample_count} "
                f"samples of data.val_shards={cfg.data.val_shards!r} hold under 2 video clips to compare the "
                "generated ones against: raise eval.sample_count"
            )
    check_scorable(prompts, fidelity is not None, source)
    if need_real and len(prompts) < 2:  # known now, not after the first stretch of training
        raise ValueError(
            f"eval.fid_features/eval.fvd_features: a Fréchet distance needs at least 2 generated clips, but "
            f"{source} gives {len(prompts)} prompt: give more eval.sample_prompts or raise eval.sample_count"
        )
    return SampleEval(
        prompts=prompts,
        settings=cfg.sample,
        seed=cfg.seed,
        probe=probe_applies(prompts),
        fidelity=fidelity,
        real=real,
        dp_rank=dp_rank,
        dp_size=dp_size,
        leader=leader,
    )


def for_trainer(tr) -> Callable:
    """The trainer's hook: ``score(metrics) -> values`` for the current step (a collective; call it with
    the EMA swapped in). Rank 0 adds the sample grid to ``metrics`` as ``eval/samples``.

    Args:
        tr: the :class:`launch.train.Trainer` (its config, model, conditioner and layout).
    """
    from launch.batches import run_bf16
    from launch.sample import decode

    cfg, dev = tr.cfg, tr.env.device
    # init_device_mesh lays the ranks out row-major with tp, then cp innermost: the first rank of every
    # run of cp·tp consecutive ranks is its data-parallel group's leader
    leader = tr.env.rank % tr.dims.copies == 0
    ev = from_config(cfg, tr.conditioner, tr.dp_rank, tr.dims.dp, leader, dev)
    log.info(
        "sample metrics: %d prompts scored by %s", len(ev.prompts),
        " and ".join(["the probe"] * ev.probe + ["launch.fidelity"] * (ev.fidelity is not None)),
    )  # fmt: skip
    encode = text_from_rank0(tr.conditioner)

    def score(metrics) -> dict:
        values, grid = ev.run(
            tr.model,
            tr.objective,
            cfg.model.arch,
            tr.conditioner.compression,
            encode,
            lambda z: decode(tr.conditioner.codec, z),
            tr.run_dir / "samples" / f"eval-{tr.step:08d}",
            dev,
            run_bf16(cfg, dev),
        )
        if grid is not None:
            metrics.image("eval/samples", grid, tr.step)
        return values

    return score


# ---- python -m launch.evaluate ---------------------------------------------------------------------------
def _parser():
    import argparse

    from dit.sampling import SAMPLER_NAMES

    p = argparse.ArgumentParser(
        prog="python -m launch.evaluate",
        description="Sample a fixed prompt set with fixed seeds from a run (its newest checkpoint's EMA) or "
        "an export and score the videos (the probe and/or FID, FVD, CLIP score), as eval.sample_metrics "
        "does during training; prints one JSON object.",
    )
    p.add_argument("source", help="a run directory, a checkpoint or an export directory")
    p.add_argument("--prompts-file", help="one prompt per line (default: the run's eval.sample_prompts, "
                   "else the captions of its first eval.sample_count held-out clips)")  # fmt: skip
    p.add_argument(
        "--count", type=int, help="prompts taken from the held-out set (default: eval.sample_count)"
    )
    p.add_argument("--steps", type=int, help="sampler steps (default: the run's sample.steps)")
    p.add_argument("--sampler", choices=SAMPLER_NAMES, help="default: the run's sample.sampler")
    p.add_argument("--cfg", type=float, help="guidance scale (default: the run's sample.cfg)")
    p.add_argument(
        "--seed",
        type=int,
        help="seed of the prompts' noise (default: the run's seed, as in training; 0 for an "
        "older export without one)",
    )
    p.add_argument(
        "--out", help="folder for the samples (NNN.mp4 + NNN.txt; default: SOURCE/samples/evaluate-STEP)"
    )
    p.add_argument(
        "--fid-features", help="a local file/folder (the run's eval.fid_features is not read: name it here)"
    )
    p.add_argument(
        "--fvd-features", help="a local file/folder (the run's eval.fvd_features is not read: name it here)"
    )
    p.add_argument(
        "--clip-model", help="a local file/folder (the run's eval.clip_model is not read: name it here)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--precision", choices=("auto", "bf16", "fp32"),
        help="default: the run's run.precision (as its training-time samples), auto for an older export",
    )  # fmt: skip
    return p


def _source_config(src: Path) -> tuple[JobConfig | None, int | None]:
    """The run's config and step for a run/checkpoint directory; (None, the export's step) for an export."""
    from launch.config import load_config
    from launch.export import read_export_config
    from parallel import checkpoint as ckpt

    if (src / "config.json").is_file():
        return None, read_export_config(src / "config.json").get("step")
    path = ckpt.resolve(src)
    step = int(path.name.rsplit("-", 1)[1]) if path.name.startswith("step-") else None
    return load_config(path / "config.yaml"), step


def cli(argv: list[str] | None = None) -> int:
    """``python -m launch.evaluate``'s body (see :func:`_parser`); exit status 2 on a bad input."""
    import json

    a = _parser().parse_args(argv)
    try:
        # libraries imported on the way print on stdout (DeepSpeed's accelerator notice, which
        # transformers pulls in through accelerate): stdout carries the JSON object only
        with contextlib.redirect_stdout(sys.stderr):
            result = _evaluate(a)
    except (ValueError, OSError, MissingExtra) as e:  # FileNotFoundError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


def _evaluate(a) -> dict:
    from data.encoders import TextEncoder, build_codec
    from dit.diffusion import make_objective
    from launch.batches import bf16_compute, encoder_dtype
    from launch.sample import decode, load_for_inference
    from parallel.checkpoint import CheckpointError
    from parallel.config import check_range

    for name in ("count", "steps"):
        if getattr(a, name) is not None:
            check_range(getattr(a, name), f"--{name}", 1)
    if a.cfg is not None:
        check_range(a.cfg, "--cfg", 0.0, float("inf"), open_high=True)
    src = Path(a.source)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such run directory, checkpoint or export")
    if a.prompts_file and not Path(a.prompts_file).is_file():
        raise FileNotFoundError(f"--prompts-file {a.prompts_file}: no such file")
    try:
        cfg, step = _source_config(src)
        model, info = load_for_inference(src, use_ema=True, device=a.device)
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    settings = _with_options(info.get("sample") or SampleConfig(), a)
    precision = a.precision or (cfg.run.precision if cfg else info.get("precision", "auto"))
    bf16 = bf16_compute(precision, a.device)
    codec = build_codec(info["codec"], device=a.device, dtype=encoder_dtype(bf16, a.device))
    if not getattr(codec, "decodes", True):
        raise ValueError(f"{src}: its codec {info['codec']!r} only declares latent geometry: cannot decode")
    # the networks come from this command line only, never from the run's config.yaml: a TorchScript
    # file is a program, and a checkpoint directory (with its config) may come from someone else
    paths = {k: getattr(a, k) for k in ("fid_features", "fvd_features", "clip_model") if getattr(a, k)}
    try:
        fidelity = build_fidelity(paths, torch.device(a.device), settings, key="eval")
    except ValueError as e:  # named by its flag
        msg = str(e)
        for k in paths:
            msg = msg.replace(f"eval.{k}=", f"--{k.replace('_', '-')} ")
        raise ValueError(msg) from None
    need_real = "fid_features" in paths or "fvd_features" in paths
    prompts = list(cfg.eval.sample_prompts) if cfg else []
    if a.prompts_file:
        try:
            lines = Path(a.prompts_file).read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise ValueError(f"--prompts-file {a.prompts_file}: not UTF-8 text") from None
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts-file {a.prompts_file}: no prompts (one per non-blank line)")
    real: list[np.ndarray] = []
    if (not prompts or need_real) and not (cfg and cfg.data.val_shards):
        raise ValueError(f"{src}: no held-out set to take {'real clips' if need_real else 'prompts'} from "
                         "(an export, or a run without data.val_shards): give --prompts-file")  # fmt: skip
    if not prompts or need_real:
        count = a.count or cfg.eval.sample_count
        to_pixels = lambda b, j: pixels_of(b, j, lambda z: decode(codec, z))  # noqa: E731
        found, real = held_out(cfg, count, lambda _: need_real, to_pixels)
        prompts = prompts or found
        real = [c for c in real if c.shape[0] > 1 or settings.frames == 1]
        if need_real and len(real) < 2:
            raise ValueError(
                f"--fid-features/--fvd-features: under 2 video clips in the first {count} held-out samples "
                "to compare against: raise --count"
            )
    check_scorable(prompts, fidelity is not None, a.prompts_file or str(src))
    arch = info["arch"]
    text = TextEncoder(
        info["text_encoder"], info["max_text_len"], a.device, encoder_dtype(bf16, a.device),
        encoder_mask=arch.text_encoder_mask,
    ) if arch.conditioning == "text" else None  # fmt: skip
    seed = a.seed if a.seed is not None else (cfg.seed if cfg else info.get("seed", 0))
    out = Path(a.out) if a.out else src / "samples" / f"evaluate-{step if step is not None else 'export'}"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    ev = SampleEval(prompts, settings, seed, probe_applies(prompts), fidelity, real)
    values, _ = ev.run(model, make_objective(info["diffusion"]), arch, codec.compression, text,
                       lambda z: decode(codec, z), out, a.device, bf16)  # fmt: skip
    return {"source": str(src), "step": step, "out": str(out), "seed": seed, "prompts": len(prompts)} | values


def _with_options(settings: SampleConfig, a) -> SampleConfig:
    """The run's ``sample`` settings with the command line's ``--steps``, ``--sampler``, ``--cfg``."""
    import dataclasses

    changes = {k: getattr(a, k) for k in ("steps", "sampler", "cfg") if getattr(a, k) is not None}
    return dataclasses.replace(settings, **changes)
