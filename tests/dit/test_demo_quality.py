"""The demo's model learns text-conditioned colour, read back by the probe on held-out captions.

A short training of ``launch/configs/demo.yaml``'s model (its arch, objective, codec, text encoder,
caption dropout and sampler settings) on still 32×32 scenes from :mod:`data.synthetic`, with some
(colour, background) pairs held out of training; the samples for the held-out captions must show the
asked-for object colour (measured by :mod:`data.probe`) far more often than chance. This checks the whole
text path the demo relies on (token states, mask, cross-attention, the null caption under dropout and
as CFG's unconditional branch, the sampler) end to end, at the cost of seconds rather than the
demo's minutes; a break anywhere in it (ignored text, a CFG branch that pushes away from the prompt, a
sampler sign) leaves the colour at chance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.encoders import PixelCodec, TextEncoder
from data.probe import score
from data.synthetic import COLOURS as SYN_COLOURS
from data.synthetic import describe, render, shape_mask
from dit.diffusion import make_objective
from dit.model import build_model
from dit.sampling import sample
from launch.batches import null_condition
from launch.config import load_config
from launch.sample import to_uint8

COLOURS = ("red", "blue", "green", "yellow")
BACKGROUNDS = ("white", "black", "gray", "purple")
# one held-out background per colour (a Latin-square diagonal): every word is trained, these pairs not
HELD_OUT = {(c, BACKGROUNDS[i]) for i, c in enumerate(COLOURS)}
FRAMES = 2  # the demo's temporal patch is 2: the shortest clip it takes


def scene(colour: str, background: str, shape: str) -> tuple[np.ndarray, str]:
    """A centred still scene in the dataset's palette and shapes, as FRAMES identical 32×32 frames, and
    its caption. Centred and larger than the dataset's objects (radius 6 px, not 4.5) so that a few
    hundred steps learn to draw it and the test is about colour, not placement."""
    frame = np.empty((32, 32, 3), np.uint8)
    frame[:] = SYN_COLOURS[background]
    frame[shape_mask(shape, 32, 32, 16.0, 16.0, 6.0)] = SYN_COLOURS[colour]
    return np.repeat(frame[None], FRAMES, axis=0), f"a {colour} {shape} on a {background} background"


def test_fixed_fps_and_size_change_nothing_else():
    """The demo's ``--fps 8 --size 32x32`` pin those two values; every other drawn attribute (and so
    every caption) of a (seed, index) is the one it has without them, and the clip is drawn at 32×32."""
    for i in range(20):
        plain = describe(np.random.default_rng([0, i]), still=False, frames=(8, 8))
        pinned = describe(np.random.default_rng([0, i]), still=False, frames=(8, 8), fps=8, size=(32, 32))
        assert (pinned["fps"], pinned["width"], pinned["height"]) == (8, 32, 32)
        for key in ("caption", "shape", "colour", "background", "direction", "speed", "frames"):
            assert pinned[key] == plain[key], (i, key)
        assert render(pinned, np.random.default_rng(i)).shape == (8, 32, 32, 3)


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="open (issue 14): after 300 steps the samples show the held-out background half the time but "
    "never the object colour (measured 2026-12-01: colour 0.0, background 0.5); the full demo run scores "
    "chance on held-out and training captions alike. Remove this mark when the cause is fixed.",
)
def test_demo_model_follows_colour_of_held_out_captions():
    cfg = load_config("launch/configs/demo.yaml")
    arch, codec = cfg.model.arch, PixelCodec()
    text = TextEncoder(cfg.data.text_encoder, cfg.data.max_text_len)
    obj = make_objective(cfg.diffusion)
    pairs = [(c, b) for c in COLOURS for b in BACKGROUNDS if (c, b) not in HELD_OUT]
    clips, captions = [], []
    for c, b, shape in ((c, b, s) for c, b in pairs for s in ("circle", "square")):
        frames, caption = scene(c, b, shape)
        clips.append(torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1)  # 3, T, H, W
        captions.append(caption)
    x_all = codec.encode(torch.stack(clips))  # N, 48, T, 8, 8
    ctx_all, mask_all = text(captions)

    torch.manual_seed(0)
    model = build_model(arch, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    for step in range(300):
        idx = torch.randint(len(captions), (16,), generator=gen)
        kw = {"context": ctx_all[idx], "context_mask": mask_all[idx], "fps": torch.full((16,), 8.0)}
        drop = torch.rand(16, generator=gen) < cfg.train.cfg_dropout  # the trainer's caption dropout
        for k, v in null_condition(arch, kw).items():
            kw[k] = torch.where(drop.view(-1, *[1] * (v.ndim - 1)), v, kw[k])
        for g in opt.param_groups:
            g["lr"] = cfg.train.lr * min(1.0, (step + 1) / 25)
        loss = obj.loss(model, x_all[idx], kw, generator=gen).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    prompts = [f"a {c} {s} on a {b} background" for c, b in sorted(HELD_OUT) for s in ("circle", "square")]
    ctx, mask = text(prompts)
    kw = {"context": ctx, "context_mask": mask, "fps": torch.full((len(prompts),), 8.0)}
    z = sample(
        model.eval(),
        obj,
        (len(prompts), arch.in_channels, FRAMES, 8, 8),
        kw,
        {**kw, **null_condition(arch, kw)},
        steps=cfg.sample.steps,
        cfg_scale=cfg.sample.cfg,
        seed=0,
    )
    result = score(zip(to_uint8(codec.decode(z)), prompts, strict=True))
    # chance is about 1/9 (the probe names one of the nine palette colours that are not the background)
    assert result["accuracy"]["color"] >= 0.5, result
    assert result["accuracy"]["background"] >= 0.5, result
