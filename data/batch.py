"""The loader's hand-off to training: one bucket's samples, stacked (docs/design.md §1's batch, typed).

Every sample of a batch has the bucket's shape, so the tensors stack. A batch carries either raw
``video`` (decoded pixels, encoded by the trainer's codec) or ``latent`` (written by ``data.encode``),
and either captions alone or precomputed ``text_emb`` (+ ``text_mask``); ``text`` and ``key`` are
always there (captions for samples and logs, keys for seeding and error reports).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Batch:
    bucket: str
    """The bucket's name, ``FxHxW`` (frames × height × width in pixels)."""
    key: list[str]
    """The samples' keys in the shards (B)."""
    text: list[str]
    """Captions (B; empty strings for class-conditioned data)."""
    fps: Tensor
    """B float32 frame rates the clips were sampled at."""
    video: Tensor | None = None
    """B×3×F×H×W float32 pixels in [-1, 1] (raw shards)."""
    latent: Tensor | None = None
    """B×C×t×h×w float32 latents (encoded shards)."""
    text_emb: Tensor | None = None
    """B×L×D precomputed text-encoder states."""
    text_mask: Tensor | None = None
    """B×L bool, True for real (unpadded) text tokens; None: every token is real."""
    label: Tensor | None = None
    """B int64 class ids (class-conditioned data)."""

    def __post_init__(self) -> None:
        if (self.video is None) == (self.latent is None):
            raise ValueError(f"batch of bucket {self.bucket}: exactly one of video and latent is needed")

    def __len__(self) -> int:
        return len(self.key)

    def tensors(self) -> dict[str, Tensor]:
        """The batch's tensors by field name (the fields that are set)."""
        return {f.name: v for f in dataclasses.fields(self) if isinstance(v := getattr(self, f.name), Tensor)}

    def pin_memory(self) -> Batch:
        """Page-locked copies of the tensors (torch's DataLoader calls this under ``pin_memory``)."""
        return dataclasses.replace(self, **{k: v.pin_memory() for k, v in self.tensors().items()})


def collate(items: list[dict], bucket_name: str) -> Batch:
    """Stack same-shape decoded samples (``data.stream.decode_sample``'s dicts) into a :class:`Batch`."""
    first = items[0]

    def stacked(name: str) -> Tensor | None:
        return torch.stack([i[name] for i in items]) if first.get(name) is not None else None

    return Batch(
        bucket=bucket_name,
        key=[i["key"] for i in items],
        text=[i["text"] for i in items],
        fps=torch.tensor([i["fps"] for i in items], dtype=torch.float32),
        video=stacked("video"),
        latent=stacked("latent"),
        text_emb=stacked("text_emb"),
        text_mask=stacked("text_mask"),
        label=torch.tensor([i["label"] for i in items], dtype=torch.long)
        if all("label" in i for i in items)
        else None,
    )
