"""From a loader batch to the model's inputs: latents, conditioning, the training task of each sample.

Raw batches (``video`` + ``text``) are encoded here with the configured codec and text encoder; latent
batches (``latent`` + ``text_emb``/``text_mask``) pass through. Every random choice (caption dropout,
task) is drawn from the generator the caller passes, so a step's draws depend only on (seed, rank,
step) and resume exactly.

The text convention (``model.arch.text_mask`` / ``text_null``) is applied here for training and by
:func:`launch.sample.conditions` for sampling, with the same two functions (:func:`text_states`,
:func:`null_condition`), so caption dropout's null is the null classifier-free guidance uses.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from data.batch import Batch
from data.buckets import check_bucket
from data.encoders import TextEncoder, build_codec, codec_geometry
from data.stream import Expect
from dit.config import DiTConfig
from launch.config import JobConfig

TASKS = ("t2v", "i2v", "continuation")


def derive_seed(*entropy: int) -> int:
    """A 63-bit seed that is a function of the non-negative ints ``entropy`` alone (NumPy's
    SeedSequence mixing: nearby inputs give unrelated seeds)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0] >> 1)


def step_seed(seed: int, dp_rank: int, step: int) -> int:
    """Seed of a step's draws (noise, times, dropout, tasks): a function of (seed, data-parallel rank,
    step) alone, so the cp × tp ranks that share a sample draw the same numbers."""
    return derive_seed(seed, dp_rank, step)


@dataclass
class Prepared:
    x0: Tensor
    """B×C×T×H×W clean latents."""
    kwargs: dict
    """Model keyword arguments (context/context_mask or labels, fps, cond)."""
    cond_frames: Tensor | None
    """B×T bool: frames kept clean and left out of the loss (image-to-video, continuation)."""
    loss_frames: Tensor
    """B: frames of each sample that count in the loss."""


def expect_for(cfg: JobConfig) -> Expect:
    """What the model of ``cfg`` takes from latent shards, for ``build_loader(..., expect=...)``:
    ``model.arch.in_channels`` channels at ``data.codec``'s compression (from the codec's config, no
    weights loaded: the geometry :class:`Conditioner`'s codec has) and, with text conditioning,
    ``model.arch.text_dim``-wide text states. Raw-video samples are not affected."""
    compression, _ = codec_geometry(cfg.data.codec)  # its channels: Conditioner checks them
    arch = cfg.model.arch
    # a bucket the codec would truncate or the patch not divide trains on something else than it says
    # (raw video) or never matches a latent sample: refuse it at start-up, as --dry-run does
    problems = [p for b in cfg.data.buckets.buckets for p in check_bucket(b, compression, arch.patch_size)]
    if problems:
        raise ValueError(
            f"data.buckets (data.codec={cfg.data.codec!r}, model.arch.patch_size={tuple(arch.patch_size)}): "
            + "; ".join(problems)
        )
    return Expect(arch.in_channels, compression, arch.text_dim if arch.conditioning == "text" else None)


def bf16_compute(precision: str, device: torch.device | str) -> bool:
    """Whether ``precision`` (``bf16``, ``fp32`` or ``auto``) means bf16 autocast over fp32 weights on
    ``device``: ``bf16``, or ``auto`` on CUDA."""
    return precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda")


def run_bf16(cfg: JobConfig, device: torch.device | str) -> bool:
    """:func:`bf16_compute` of ``run.precision``: training, validation and samples all follow it."""
    return bf16_compute(cfg.run.precision, device)


def encoder_dtype(bf16: bool, device: torch.device | str) -> torch.dtype:
    """The frozen VAE's and text encoder's dtype: bf16 on CUDA in a bf16 run, else fp32."""
    return torch.bfloat16 if bf16 and torch.device(device).type == "cuda" else torch.float32


class Conditioner:
    """Encodes text and video on the training device and applies dropout and tasks.

    The codec (VAE) and the text encoder are frozen and load on first use, in bf16 on CUDA when the run
    is bf16: with latent shards (which carry text states) a rank that never decodes samples never
    loads either (see :func:`launch.evaluate.draw_samples`). Caption dropout's empty-prompt null
    (``model.arch.text_null=empty_prompt``, ``train.cfg_dropout`` > 0) is encoded at construction by
    rank 0 alone with an encoder it then frees, and broadcast: with ``torch.distributed`` initialised,
    construct the Conditioner on every rank (a collective).
    """

    def __init__(self, cfg: JobConfig, device: torch.device):
        self.cfg, self.arch, self.device = cfg, cfg.model.arch, device
        self.encoder_dtype = encoder_dtype(run_bf16(cfg, device), device)
        # the codec's geometry from its config alone: no weights loaded until something is encoded
        self.compression, channels = codec_geometry(cfg.data.codec)
        self._codec = None
        self.text: TextEncoder | None = None
        self._text_cache: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()  # data.text_cache
        self._empty: tuple[Tensor, Tensor] | None = None  # the encoded "" (text_null=empty_prompt)
        if channels != self.arch.in_channels:
            raise ValueError(
                f"data.codec={cfg.data.codec!r} makes {channels}-channel latents but "
                f"model.arch.in_channels={self.arch.in_channels}"
            )
        weights = torch.tensor([cfg.train.task_t2v, cfg.train.task_i2v, cfg.train.task_continuation])
        self.task_probs = weights / weights.sum()
        a = self.arch
        if a.conditioning == "text" and a.text_null == "empty_prompt" and cfg.train.cfg_dropout > 0:
            # caption dropout's null, encoded now: rank 0 loads the text encoder, encodes "", frees it and
            # broadcasts the states, so a run on latent shards keeps no text encoder on any GPU (UMT5-XXL
            # is ~11 GB in bf16); a raw-video run loads it again for its captions on first use
            self._empty = broadcast_from_rank0(self._encode_once, [""], device)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the freed encoder's memory back to the other users of the GPU

    @property
    def codec(self):
        """The ``data.codec`` codec or VAE, built on first use (in :attr:`encoder_dtype`)."""
        if self._codec is None:
            self._codec = build_codec(self.cfg.data.codec, device=str(self.device), dtype=self.encoder_dtype)
        return self._codec

    def _text_encoder(self) -> TextEncoder:
        """A new ``data.text_encoder`` on the training device, its width checked against the model's."""
        data = self.cfg.data
        a = self.arch
        text = TextEncoder(
            data.text_encoder, data.max_text_len, str(self.device), self.encoder_dtype, a.text_encoder_mask
        )
        if text.dim != self.arch.text_dim:
            raise ValueError(
                f"data.text_encoder={data.text_encoder!r} gives {text.dim}-wide states but "
                f"model.arch.text_dim={self.arch.text_dim}"
            )
        return text

    def _encode_once(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """``texts`` encoded by the kept encoder if there is one, else by one loaded for this call alone
        (freed on return): each text alone, as :meth:`encode_text` encodes a cache miss."""
        if self.text is not None:
            return self.encode_text(texts)
        encoder = self._text_encoder()
        out = [encoder([text]) for text in texts]
        return torch.cat([e for e, _ in out]), torch.cat([m for _, m in out])

    def encode_text(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Captions → (B×L×D fp32 states, B×L bool mask) on the CPU."""
        if self.text is None:
            self.text = self._text_encoder()
        if self.cfg.data.text_cache == 0:
            return self.text(texts)
        return self._cached_text(texts)

    def _cached_text(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """:meth:`encode_text` through the ``data.text_cache`` LRU: each caption is encoded alone, so its
        states are a function of the caption only, whether they come from the cache or not."""
        cache, out = self._text_cache, []
        for text in texts:
            hit = cache.get(text)
            if hit is None:
                emb, mask = self.text([text])
                hit = cache[text] = (emb[0], mask[0])
                if len(cache) > self.cfg.data.text_cache:
                    cache.popitem(last=False)
            else:
                cache.move_to_end(text)
            out.append(hit)
        return torch.stack([e for e, _ in out]), torch.stack([m for _, m in out])

    def empty_prompt(self) -> tuple[Tensor, Tensor] | None:
        """The encoded empty caption (1×L×D, 1×L), the null of ``model.arch.text_null=empty_prompt``;
        None for the other nulls. Encoded once, alone (as :meth:`encode_text` encodes a cache miss), so it
        is the same tensor whichever batch drops a caption: at construction when caption dropout uses it
        (see the class), else here on first use, by this process alone and without keeping an encoder
        that was not loaded."""
        if self.arch.conditioning != "text" or self.arch.text_null != "empty_prompt":
            return None
        if self._empty is None:
            self._empty = self._encode_once([""])
        return self._empty

    def __call__(self, batch: Batch, gen: torch.Generator, train: bool = True) -> Prepared:
        dev = self.device
        if batch.latent is not None:
            x0 = batch.latent.to(dev, non_blocking=True).float()
        else:
            # the codecs return their latents on the CPU (DiffusersVAE moves them there)
            x0 = self.codec.encode(batch.video.to(dev, non_blocking=True)).to(dev).float()
        b, t = x0.shape[0], x0.shape[2]
        kwargs = self._condition(batch, b)
        if self.arch.needs_fps:
            kwargs["fps"] = batch.fps.to(dev, non_blocking=True)
        if train and self.cfg.train.cfg_dropout > 0 and self.arch.conditioning != "none":
            drop = torch.rand(b, generator=gen) < self.cfg.train.cfg_dropout
            null = null_condition(self.arch, kwargs, self.empty_prompt())
            for k, v in null.items():
                mask = drop.to(dev).view(-1, *([1] * (v.ndim - 1)))
                kept = kwargs.get(k)
                if kept is None:  # no mask (text_mask=False) but a masked null: the kept rows attend all
                    kept = torch.ones_like(v)
                kwargs[k] = torch.where(mask, v, kept)
        cond_frames = self._tasks(x0, kwargs, gen) if train else None
        frames = torch.full((b,), t, device=dev)
        if cond_frames is not None:
            frames = (~cond_frames).sum(1)
        return Prepared(x0, kwargs, cond_frames, frames)

    def _condition(self, batch: Batch, b: int) -> dict:
        dev, kind = self.device, self.arch.conditioning
        if kind == "text":
            if batch.text_emb is not None:
                emb, mask = batch.text_emb, batch.text_mask
                mask = mask if mask is not None else torch.ones(emb.shape[:2], dtype=torch.bool)
            else:
                emb, mask = self.encode_text(batch.text)
            emb, mask = text_states(self.arch, emb, mask)
            # loader tensors may be pinned: copies overlap with the host's work
            return {
                "context": emb.to(dev, non_blocking=True).float(),
                "context_mask": None if mask is None else mask.to(dev, non_blocking=True),
            }
        if kind == "class":
            if batch.label is None:
                raise ValueError(
                    f"model.arch.conditioning=class but batch {batch.key[:1]} has no 'label' (an integer "
                    "'label' in each sample's json)"
                )
            return {"labels": batch.label.to(dev, non_blocking=True)}
        return {}

    def _tasks(self, x0: Tensor, kwargs: dict, gen: torch.Generator) -> Tensor | None:
        """Per-sample task draw → B×T clean-frame mask (None when every sample is text-to-video)."""
        b, c, t = x0.shape[:3]
        if t == 1 or self.task_probs[0] == 1:
            if self.arch.cond_channels:
                kwargs["cond"] = x0.new_zeros(b, self.arch.cond_channels, *x0.shape[2:])
            return None
        task = torch.multinomial(self.task_probs, b, replacement=True, generator=gen)  # B: 0/1/2
        clean = torch.zeros(b, t, dtype=torch.bool)
        clean[task == 1, 0] = True
        clean[task == 2, : min(self.cfg.train.continuation_frames, t - 1)] = True
        clean = clean.to(x0.device)
        if self.arch.cond_channels:
            kwargs["cond"] = cond_channels(x0, clean, self.arch)
        return clean if clean.any() else None


def broadcast_from_rank0(encode, texts: list[str], device: torch.device | str) -> tuple[Tensor, Tensor]:
    """``encode(texts)`` (→ B×L×D states, B×L bool mask) run on rank 0 alone and broadcast to every rank
    of the default group, on ``device`` (the backend's: CUDA for NCCL); without ``torch.distributed``
    (or with one process) it is simply called. A collective: every rank must call it. Rank 0's error
    is raised there after the others are told, and they raise a RuntimeError pointing to its log.

    Args:
        encode: the text encoder call, made on rank 0 only.
        texts: the captions.
        device: where the broadcast tensors live, and where the states are returned.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return encode(texts)
    rank0 = dist.get_rank() == 0
    emb = mask = error = None
    if rank0:
        try:
            emb, mask = encode(texts)
        except Exception as e:  # the others wait in the broadcast: tell them, then raise
            error = e
    shape = torch.tensor(emb.shape if emb is not None else (-1, 0, 0), device=device)
    dist.broadcast(shape, 0)
    if error is not None:
        raise error
    b, length, d = shape.tolist()
    if b < 0:
        raise RuntimeError(f"rank 0 could not encode the captions {texts[:3]!r}; see its log")
    emb = emb.to(device) if rank0 else torch.empty(b, length, d, device=device)
    keep = mask.to(device, torch.uint8) if rank0 else torch.empty(b, length, dtype=torch.uint8, device=device)
    dist.broadcast(emb, 0)
    dist.broadcast(keep, 0)  # as bytes: not every backend broadcasts bool
    return emb, keep.bool()


def text_states(arch: DiTConfig, emb: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None]:
    """Encoder states and their padding mask (B×L×D, B×L) as the model takes them under
    ``model.arch.text_mask``: unchanged when True; when False (Wan) the states past each caption's
    length are zero and the mask is None: every token is attended (the zero rows too, as the model was
    trained), and cross-attention takes the unmasked kernels (FlashAttention, SDPA's flash), which an
    all-True mask would keep it from."""
    if arch.text_mask:
        return emb, mask
    return emb * mask[..., None].to(emb.dtype), None


def null_condition(arch: DiTConfig, like: dict, empty_prompt: tuple[Tensor, Tensor] | None = None) -> dict:
    """The unconditional inputs for classifier-free guidance and caption dropout, shaped like the
    conditional ``like``: under ``model.arch.text_null=masked`` zero, fully masked text states; under
    ``empty_prompt`` the encoded empty caption ``empty_prompt`` (1×L×D states, 1×L mask, as the text
    encoder returns them; :func:`text_states` applies the convention) on every row, and under
    ``text_mask=False`` only those states (the conditional inputs' mask, None, stays); for a
    class-conditional model the null class label ``num_classes``."""
    if arch.conditioning == "text":
        ctx = like["context"]
        if arch.text_null == "masked":
            nowhere = torch.zeros(ctx.shape[:2], dtype=torch.bool, device=ctx.device)  # B×L
            return {"context": torch.zeros_like(ctx), "context_mask": nowhere}
        if empty_prompt is None:
            raise ValueError("model.arch.text_null=empty_prompt: the encoded empty caption is needed")
        emb, mask = text_states(arch, *empty_prompt)
        if emb.shape[1:] != ctx.shape[1:]:
            raise ValueError(
                f"model.arch.text_null=empty_prompt: the empty caption's states are {tuple(emb.shape[1:])} "
                f"but the captions' {tuple(ctx.shape[1:])} (latent shards encoded at another "
                "data.max_text_len or with another data.text_encoder?)"
            )
        b = ctx.shape[0]
        null = {"context": emb.to(ctx.device, ctx.dtype).expand(b, -1, -1)}
        if mask is not None:
            null["context_mask"] = mask.to(ctx.device).expand(b, -1)
        return null
    if arch.conditioning == "class":
        return {"labels": torch.full_like(like["labels"], arch.num_classes)}
    return {}


def cond_channels(x0: Tensor, clean: Tensor, arch: DiTConfig) -> Tensor:
    """Wan-I2V-style ``cond`` input: the clean frames (zeros elsewhere) and a 0/1 mask channel."""
    if arch.cond_channels != x0.shape[1] + 1:
        raise ValueError(
            f"model.arch.cond_channels={arch.cond_channels}: image-to-video conditioning needs "
            f"in_channels + 1 = {x0.shape[1] + 1}"
        )
    b, _, t, h, w = x0.shape
    keep = clean[:, None, :, None, None]  # B, 1, T, 1, 1
    return torch.cat(
        [torch.where(keep, x0, torch.zeros_like(x0)), keep.to(x0.dtype).expand(b, 1, t, h, w)], 1
    )
