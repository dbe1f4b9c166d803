"""The LoRA model of the parallel tests: the tiny random model with peft adapters of every signal."""

from __future__ import annotations

import torch

from dit.config import DiTConfig
from launch.config import LoraConfig
from launch.lora import apply_lora
from tests.dit.helpers import random_model

LORA = LoraConfig(rank=4, alpha=8.0)
"""Rank 4 at scale 2 on the default targets (attention and cross-attention q/k/v/o, MLP fc1/fc2)."""


def lora_model(cfg: DiTConfig) -> torch.nn.Module:
    """The tiny random model (:func:`tests.dit.helpers.random_model`) with :data:`LORA`'s adapters, its
    base frozen. B, zero after peft's init, is drawn too, so the first gradients of A (through B) are not
    zero and a comparison of them has signal."""
    model = random_model(cfg)
    apply_lora(model, LORA, seed=0)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model
