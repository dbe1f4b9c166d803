"""The context-parallel sequence cut on clips whose frames do not divide by cp (docs/design.md §4).

Two gloo ranks cut one sample's sequence with :func:`parallel.context.apply_sequence_cut` (no FSDP:
each rank's parameter gradients are its own tokens' part, summed here over the cp group). A cut that
runs must give the single-process output and gradients (the cp parity tolerance, 1e-5 relative); one
that cannot be exact must raise naming ``parallel.cp`` and the latent grid. The gloo ranks run the
same kernels a GPU would; only the NCCL transport is not exercised.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from dit.config import DiTConfig
from parallel.context import apply_sequence_cut
from tests.dit.helpers import inputs, random_model
from tests.parallel.group import run_group, serve


@dataclass
class Cut:
    name: str
    frames: int
    layout: str = "full"
    core: str = "ulysses"  # the cp group as the Ulysses or the ring factor
    per_frame: bool = False  # per-frame timesteps (image-to-video): one modulation vector per frame
    pos_embed: str = "rope3d"
    patch_t: int = 1


CASES = [
    Cut("full_3frames_ulysses", 3),
    Cut("full_3frames_ring", 3, core="ring"),
    Cut("full_image_ulysses", 1),
    Cut("full_3frames_learned_pos", 3, pos_embed="learned"),
    Cut("full_3frames_sincos_pos_ring", 3, core="ring", pos_embed="sincos3d"),
    Cut("full_4frames_per_frame", 4, per_frame=True),
    Cut("full_8frames_patch_t2_per_frame", 8, per_frame=True, patch_t=2),
    Cut("full_2frames_patch_t2_per_frame", 2, per_frame=True, patch_t=2),  # one frame of patches: F = 1
    Cut("factorized_4frames_ulysses", 4, layout="factorized"),
    Cut("factorized_4frames_ring", 4, layout="factorized", core="ring"),
    # cannot be cut exactly: the error must name parallel.cp and the grid
    Cut("full_3frames_per_frame", 3, per_frame=True),
    Cut("factorized_3frames", 3, layout="factorized"),
]
# the latent and its patch grid (frames × height × width), then the config key
NAMED = r"latent of 3×4×4 \(frames × height × width; patch grid 3×2×2\).*parallel\.cp=2"
RAISES = {"full_3frames_per_frame": NAMED, "factorized_3frames": NAMED}


def _arch(case: Cut) -> DiTConfig:
    return DiTConfig(
        in_channels=4, hidden_size=32, depth=2, num_heads=4, text_dim=16, patch_size=(case.patch_t, 2, 2),
        mlp="swiglu", qk_norm=True, attention_layout=case.layout, pos_embed=case.pos_embed,
    )  # fmt: skip


def _run(case: Cut, cp_group: dist.ProcessGroup | None) -> dict:
    """Output and (cp-summed) parameter gradients of one forward/backward of ``case``."""
    cfg = _arch(case)
    model = random_model(cfg, seed=3)
    if cp_group is not None:
        ring = case.core == "ring"
        apply_sequence_cut(
            model, cp_group, ulysses_group=None if ring else cp_group, ring_group=cp_group if ring else None
        )
    x, t, kw = inputs(cfg, t=case.frames, h=4, w=4, seed=5)  # grid frames × 2 × 2
    if case.per_frame:
        t = t[:, None].repeat(1, case.frames)  # B, F
        t[:, : case.patch_t] = 0  # a clean first (temporal patch of) frame(s)
    out = model(x, t, **kw)
    weight = torch.linspace(-1, 1, out.numel()).view_as(out)  # every output element matters
    (out * weight).sum().backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.clone()
        if cp_group is not None:
            dist.all_reduce(g, group=cp_group)  # each rank's part: its own tokens
        grads[name] = g
    return {"out": out.detach(), "grads": grads}


def _worker(rank: int, world: int, port: int, cases: list[Cut], out_dir: str) -> None:
    serve(rank, world, port, cases, out_dir, lambda c: _run(c, dist.group.WORLD))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_group(2, _worker, CASES, tmp_path_factory.mktemp("cut"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c.name not in RAISES], ids=lambda c: c.name)
def test_cut_matches_one_process(case, results):
    got = results[case.name]
    assert "error" not in got, got.get("error")
    want = _run(case, None)
    assert want["out"].abs().max() > 0  # the comparison has signal
    assert _rel(got["out"], want["out"]) < 1e-5, case.name
    assert got["grads"].keys() == want["grads"].keys()
    worst = max(_rel(got["grads"][k], want["grads"][k]) for k in want["grads"])
    assert worst < 1e-5, f"{case.name}: gradient relative error {worst:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c.name in RAISES], ids=lambda c: c.name)
def test_uneven_cut_that_cannot_be_exact_names_parallel_cp(case, results):
    got = results[case.name]
    assert "error" in got, f"{case.name} ran: an inexact cut must raise"
    assert re.search(r"ValueError: .*" + RAISES[case.name], got["error"]), got["error"]
