"""Placement from the caption at t = 1: does the demo model learn where the caption's motion puts the object
in each frame? (Issue 14's open question; ``benchmarks/results/demo-2026-12-01.md``, session 6.)

    python -m benchmarks.placement [--steps 300] [--clips 1024] [--eval-every 50] [--pos-std S]
        [--unit-embeddings] [--one-direction | --two-directions] [--one-clip] [--one-look]
        [--oracle-direction STD [--oracle-frames [--oracle-tokens]]] [--text-pool] [--text-frames]
        [--patch-t 2] [--prompts 16] [--seed 0]

On the built-in dataset's 32×32 8-frame clips, an object's position along its motion axis is fixed in every
frame by its caption (only the cross-axis position is random), so at t = 1, where the input is pure noise,
the best prediction E[x0 | caption] is a band that moves. A sampler that starts from a static blob ends
with a static object. This trains the ``demo`` model at t = 1 only (velocity target, as the trainer's
flow objective, on clips rendered in memory, captions through MiniLM) and, every ``--eval-every`` steps,
measures the mean one-step x0 of ``--draws`` noise draws for held-out captions
(:func:`benchmarks.quality.held_out_prompts`). It reports the travel of the object from the first frame
to the last along each caption's direction (px) and how many prompts move the right way, next to the
truth (the mean of rendered clips of the same caption, measured the same way).

Switches for the diagnosis: ``--pos-std`` re-draws the learned absolute position tables at that std (the
model's own init is N(0, 0.02)); ``--unit-embeddings`` makes the timestep, fps and text projections
Xavier and the text position table N(0, 0.5); ``--one-direction`` moves every clip (and prompt) from
left to right, ``--two-directions`` turns vertical motion horizontal (left to right or right to left, one
axis); ``--one-clip`` trains on a single clip; ``--one-look`` makes every clip and prompt a red circle moving
slowly on white (only the direction varies); ``--oracle-direction STD`` hands the model each clip's direction:
a table of the four directions, N(0, STD), trained with the model and added to the conditioning vector c
that modulates every block (as a class label is), and ``--oracle-frames`` makes that oracle one row per
(direction, speed, latent frame), so c is per frame, and ``--oracle-tokens`` adds those rows to each latent
frame's tokens instead of to c; ``--text-pool`` builds the model with ``text_pool`` (the caption's pooled
states in c), ``--text-frames`` with ``text_pool_frames`` as well (c per latent frame from the caption);
``--patch-t`` sets the temporal patch (the demo's is 2). One JSON line
per evaluation on stdout.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import numpy as np
import torch
from torch import nn

from benchmarks.quality import held_out_prompts
from data.encoders import PixelCodec, TextEncoder
from data.probe import parse_caption
from data.synthetic import COLOURS, DIRECTIONS, SPEEDS, describe, render
from dit.config import get_preset
from dit.model import SpacetimeDiT

SIZE, FRAMES = 32, 8  # the demo's clips


def travel(frames: np.ndarray, caption: str) -> float:
    """Net displacement (px) from the first frame to the last along the caption's direction of the
    centroid of the pixels far from the caption's background colour (T×H×W×3, 0…255; a smeared band
    counts by its weight)."""
    p = parse_caption(caption)
    far = np.linalg.norm(frames.astype(np.float32) - np.array(COLOURS[p["background"]], np.float32), axis=-1)
    far = np.maximum(far - 0.2 * far.max(), 0)  # T, H, W: drop the faint residue around the object
    ys, xs = np.mgrid[0 : far.shape[1], 0 : far.shape[2]]
    mass = far.sum((1, 2)) + 1e-6
    cx, cy = (far * xs).sum((1, 2)) / mass, (far * ys).sum((1, 2)) / mass
    dx, dy = DIRECTIONS[p["direction"]]
    along = cx * dx + cy * dy
    return float(along[-1] - along[0])


def _spec(caption: str) -> dict:
    p = parse_caption(caption)
    return {
        "shape": p["shape"], "colour": p["colour"], "background": p["background"], "width": SIZE,
        "height": SIZE, "direction": p["direction"], "speed": p["speed"], "frames": FRAMES,
    }  # fmt: skip


def truth_travel(caption: str, renders: int = 32) -> float:
    """:func:`travel` of the mean of ``renders`` clips of ``caption`` (E[x0 | caption])."""
    spec = _spec(caption)
    clips = np.stack([render(spec, np.random.default_rng(k)) for k in range(renders)]).astype(np.float32)
    return travel(clips.mean(0), caption)


def left_to_right(caption: str) -> str:
    return re.sub(r"from \w+ to \w+", "from left to right", caption)


def horizontal(caption: str) -> str:
    """Vertical motion turned horizontal (top to bottom → left to right, bottom to top → right to left)."""
    return caption.replace("from top to bottom", "from left to right").replace(
        "from bottom to top", "from right to left"
    )


ONE_LOOK = "a red circle moves slowly {} on a white background"


def one_look(caption: str) -> str:
    """The caption's direction on the one look of ``--one-look``."""
    return ONE_LOOK.format(parse_caption(caption)["direction"])


def _directions(caption: str, one_direction: bool, two_directions: bool, look: bool = False) -> str:
    caption = left_to_right(caption) if one_direction else horizontal(caption) if two_directions else caption
    return one_look(caption) if look else caption


class OracleDirection(nn.Module):
    """``--oracle-direction``: a learned row per direction, added to the model's conditioning vector c by a
    hook on its timestep embedder (c = timestep + fps embeddings there). Set ``ids`` (B indices from
    :func:`direction_ids`) before each forward.

    With ``frames`` (``--oracle-frames``) the rows are per (direction, speed, latent frame): frame f of a
    clip gets its own row, so c becomes B×frames×D, the per-frame modulation that per-frame timesteps use,
    and what the caption says about where the object is in each frame reaches that frame's modulation
    directly instead of as a product of the frame's position and one clip-wide vector."""

    def __init__(self, model: nn.Module, std: float, frames: int | None = None, tokens: bool = False):
        super().__init__()
        if tokens and frames is None:
            raise ValueError("OracleDirection(tokens=True) adds per-frame rows: give frames")
        self.frames = frames
        rows = len(DIRECTIONS) if frames is None else len(DIRECTIONS) * len(SPEEDS) * frames
        self.table = nn.Embedding(rows, model.cfg.hidden_size)
        nn.init.normal_(self.table.weight, std=std)
        self.ids: torch.Tensor | None = None
        if tokens:  # --oracle-tokens: frame f's row added to frame f's tokens (after the patch embedding)
            model.patch_embed.register_forward_hook(
                lambda mod, args, out: out + self.rows().repeat_interleave(out.shape[1] // self.frames, 1)
            )
        else:
            model.t_embedder.register_forward_hook(lambda mod, args, out: out + self.rows())

    def rows(self) -> torch.Tensor:
        """B×1×D (one row a clip) or B×frames×D (one a latent frame)."""
        if self.frames is None:
            return self.table(self.ids)[:, None]
        return self.table(self.ids[:, None] * self.frames + torch.arange(self.frames, device=self.ids.device))


def direction_ids(captions: list[str], speeds: bool = False) -> torch.Tensor:
    """Each caption's index into ``DIRECTIONS`` (or, with ``speeds``, into DIRECTIONS × SPEEDS)."""
    names, rates = list(DIRECTIONS), list(SPEEDS)
    parsed = [parse_caption(c) for c in captions]
    if speeds:
        return torch.tensor(
            [names.index(p["direction"]) * len(rates) + rates.index(p["speed"]) for p in parsed]
        )
    return torch.tensor([names.index(p["direction"]) for p in parsed])


def training_clips(
    n: int, seed: int, one_direction: bool, one_clip: bool, two_directions: bool = False, look: bool = False
) -> tuple[torch.Tensor, list[str]]:
    """``n`` rendered clips in [-1, 1] as the pixel codec's latents (N×48×8×8×8) and their captions."""
    n = 1 if one_clip else n
    captions, videos = [], []
    for i in range(n):
        caption = describe(np.random.default_rng([seed, i]), still=False)["caption"]
        caption = _directions(caption, one_direction, two_directions, look)
        captions.append(caption)
        videos.append(render(_spec(caption), np.random.default_rng([seed + 1, i])))
    video = torch.from_numpy(np.stack(videos)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # N, 3, T, H, W
    return PixelCodec(1, 4).encode(video), captions


def build(
    pos_std: float | None,
    unit_embeddings: bool,
    seed: int,
    text_pool: bool = False,
    patch_t: int = 2,
    text_frames: bool = False,
) -> nn.Module:
    torch.manual_seed(seed)
    model = SpacetimeDiT(
        get_preset("demo").replace(
            text_pool=text_pool or text_frames,
            text_pool_frames=FRAMES // patch_t if text_frames else 0,
            patch_size=(patch_t, 1, 1),
        )
    )
    model.init_weights()
    with torch.no_grad():
        if pos_std is not None:
            for p in model.pos_embed.parameters():
                nn.init.normal_(p, std=pos_std)
        if unit_embeddings:
            for part in (model.t_embedder, model.fps_embedder, model.text_proj):
                for m in part.modules():
                    if isinstance(m, nn.Linear):
                        nn.init.xavier_uniform_(m.weight)
            nn.init.normal_(model.text_proj.pos, std=0.5)
    return model


@torch.no_grad()
def mean_frames(model, codec: PixelCodec, states, mask, draws: int) -> np.ndarray:
    """The mean one-step x0 at t = 1 over ``draws`` noise draws per prompt, as P×T×H×W×3 pixels."""
    model.eval()
    p = states.shape[0]
    side = SIZE // codec.spatial
    noise = torch.randn(p * draws, codec.latent_channels, FRAMES, side, side)
    rep = dict(context=states.repeat_interleave(draws, 0), context_mask=mask.repeat_interleave(draws, 0))
    v = model(noise, torch.full((p * draws,), 1000.0), fps=torch.full((p * draws,), 8.0), **rep)
    x0 = (noise - v).view(p, draws, *noise.shape[1:]).mean(1)  # t = 1: x0 = x_t - v
    model.train()
    return ((codec.decode(x0).clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 4, 1).numpy()


def run(args) -> list[dict]:
    codec = PixelCodec(1, 4)
    x0, captions = training_clips(
        args.clips, args.seed, args.one_direction, args.one_clip, args.two_directions, args.one_look
    )
    prompts = captions * args.prompts if args.one_clip else held_out_prompts(args.prompts, args.seed)
    prompts = [_directions(c, args.one_direction, args.two_directions, args.one_look) for c in prompts]
    prompts = prompts[: args.prompts]
    encoder = TextEncoder(None, max_length=24)
    states, mask = encoder(captions)
    p_states, p_mask = encoder(prompts)
    truth = [truth_travel(c) for c in prompts]
    model = build(
        args.pos_std, args.unit_embeddings, args.seed, args.text_pool, args.patch_t, args.text_frames
    )
    oracle = None
    if args.oracle_direction is not None:
        frames = FRAMES // args.patch_t if args.oracle_frames else None
        # registered as a submodule, so the optimiser below trains its table with the model
        oracle = model.oracle_direction = OracleDirection(
            model, args.oracle_direction, frames, args.oracle_tokens
        )
        clip_ids = direction_ids(captions, args.oracle_frames)
        prompt_ids = direction_ids(prompts, args.oracle_frames).repeat_interleave(args.draws)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, step / 50)  # the demo's 50 warm-up steps
        idx = torch.randint(0, len(captions), (args.batch,), generator=gen)
        noise = torch.randn(args.batch, *x0.shape[1:], generator=gen)
        if oracle is not None:
            oracle.ids = clip_ids[idx]
        v = model(
            noise, torch.full((args.batch,), 1000.0), context=states[idx], context_mask=mask[idx],
            fps=torch.full((args.batch,), 8.0),
        )  # fmt: skip
        loss = ((v - (noise - x0[idx])) ** 2).mean()  # flow's velocity target at t = 1
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            if oracle is not None:
                oracle.ids = prompt_ids
            frames = mean_frames(model, codec, p_states, p_mask, args.draws)
            moved = [travel(f, c) for f, c in zip(frames, prompts, strict=True)]
            row = {
                "step": step, "loss": round(loss.item(), 5), "prompts": len(prompts),
                "travel_px": round(float(np.mean(moved)), 3), "right": sum(m > 1 for m in moved),
                "truth_travel_px": round(float(np.mean(truth)), 3), "truth_right": sum(m > 1 for m in truth),
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.placement", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--clips", type=int, default=1024, help="rendered training clips")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--draws", type=int, default=4, help="noise draws averaged per prompt")
    ap.add_argument("--pos-std", type=float, default=None, help="re-draw the absolute position tables")
    ap.add_argument("--unit-embeddings", action="store_true")
    ap.add_argument("--text-pool", action="store_true", help="the model with model.arch.text_pool")
    ap.add_argument(
        "--text-frames", action="store_true", help="model.arch.text_pool_frames: c per latent frame"
    )
    ap.add_argument("--patch-t", type=int, default=2, choices=(1, 2, 4, 8), help="temporal patch size")
    only = ap.add_mutually_exclusive_group()
    only.add_argument("--one-direction", action="store_true", help="every clip moves from left to right")
    only.add_argument("--two-directions", action="store_true", help="vertical motion made horizontal")
    ap.add_argument("--one-clip", action="store_true", help="train on a single clip")
    ap.add_argument(
        "--one-look", action="store_true", help="a red circle, slowly, on white: only direction varies"
    )
    ap.add_argument(
        "--oracle-direction", type=float, default=None, metavar="STD", help="hand c the direction"
    )
    ap.add_argument(
        "--oracle-frames", action="store_true", help="the oracle per (direction, speed, latent frame)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--oracle-tokens",
        action="store_true",
        help="the per-frame oracle added to each frame's tokens, not c",
    )
    args = ap.parse_args(argv)
    if args.oracle_frames and args.oracle_direction is None:
        ap.error("--oracle-frames shapes the oracle of --oracle-direction STD: give both")
    if args.oracle_tokens and not args.oracle_frames:
        ap.error("--oracle-tokens adds the per-frame rows of --oracle-frames to the tokens: give both")
    if min(args.steps, args.clips, args.batch, args.eval_every, args.prompts, args.draws) < 1:
        ap.error("--steps, --clips, --batch, --eval-every, --prompts and --draws must be ≥ 1")
    for name in ("pos_std", "oracle_direction"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            ap.error(f"--{name.replace('_', '-')}={value}: expected a standard deviation > 0")
    return run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
