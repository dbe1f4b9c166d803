"""The LoRA model of the parallel tests: the tiny random model with peft adapters of every signal."""

from __future__ import annotations

import torch

from dit.config import DiTConfig
from launch.config import LoraConfig
from launch.lora import apply_lora, store_base
from tests.dit.helpers import random_model

LORA = LoraConfig(rank=4, alpha=8.0)
"""Rank 4 at scale 2 on the default targets (attention and cross-attention q/k/v/o, MLP fc1/fc2)."""


def lora_model(cfg: DiTConfig, base_dtype: str = "fp32") -> torch.nn.Module:
    """The tiny random model (:func:`tests.dit.helpers.random_model`) with :data:`LORA`'s adapters, its
    base frozen and stored in ``base_dtype`` (``finetune.base_dtype``). B, zero after peft's init, is
    drawn too, so the first gradients of A (through B) are not zero and a comparison of them has signal."""
    model = random_model(cfg)
    apply_lora(model, LORA, seed=0)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    store_base(model, base_dtype)
    return model


def prepare_lora(model: torch.nn.Module, base_dtype: str = "fp32") -> None:
    """What the trainer's meta build does before parallelizing: the same adapters and base storage as
    :func:`lora_model` (names, shapes, dtypes; no values)."""
    apply_lora(model, LORA)
    store_base(model, base_dtype)
