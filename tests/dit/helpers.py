"""Small builders shared by the dit tests."""

import torch

from dit.config import DiTConfig
from dit.model import SpacetimeDiT, build_model


def randomize(model: SpacetimeDiT, std: float = 0.1, seed: int = 0) -> SpacetimeDiT:
    """Replace every parameter with noise so zero-initialised paths (adaLN-Zero) carry signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def inputs(cfg: DiTConfig, b: int = 2, t: int = 3, h: int = 6, w: int = 10, text_len: int = 7, seed: int = 0):
    """(x, t, kwargs) for a forward of ``cfg`` on B×C×T×H×W latents; the second sample's caption is padded."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.in_channels, t, h, w, generator=g)
    times = torch.rand(b, generator=g) * 1000
    kw = {}
    if cfg.conditioning == "text":
        mask = torch.ones(b, text_len, dtype=torch.bool)
        mask[-1, text_len // 2 :] = False
        kw = {"context": torch.randn(b, text_len, cfg.text_dim, generator=g), "context_mask": mask}
    elif cfg.conditioning == "class":
        kw = {"labels": torch.randint(0, cfg.num_classes, (b,), generator=g)}
    if cfg.cond_channels:
        kw["cond"] = torch.randn(b, cfg.cond_channels, t, h, w, generator=g)
    if cfg.fps_conditioning:
        kw["fps"] = torch.tensor([8.0, 24.0, 30.0, 12.0][:b])
    return x, times, kw


def random_model(cfg: DiTConfig, seed: int = 0) -> SpacetimeDiT:
    return randomize(build_model(cfg, seed=seed), seed=seed)
