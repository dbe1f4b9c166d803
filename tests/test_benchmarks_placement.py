"""``benchmarks.placement``: the travel it reports is the object's real displacement along the caption's
direction (checked against the renderer's geometry), and a short run reports it for the prompts it says.
(Whether the model learns placement is the benchmark's finding, run by hand: see its docstring.)"""

import numpy as np
import pytest
import torch

from benchmarks import placement
from data.synthetic import SPEEDS
from tests.dit.helpers import randomize

CENTRE_RANGE = 32 - 2 * 0.14 * 32  # data.synthetic.render: the centre stays r = 0.14·size from the edges


@pytest.mark.parametrize(
    "direction", ["from left to right", "from right to left", "from top to bottom", "from bottom to top"]
)
@pytest.mark.parametrize("speed", ["slowly", "quickly"])
def test_truth_travel_is_the_centre_travel_along_the_captions_direction(direction, speed):
    caption = f"a red circle moves {speed} {direction} on a blue background"
    want = SPEEDS[speed] * CENTRE_RANGE  # 9.2 px slowly, 20.7 px quickly, positive in every direction
    assert placement.truth_travel(caption) == pytest.approx(want, abs=0.5)


def test_a_static_or_reversed_clip_has_no_or_negative_travel():
    caption = "a green square moves quickly from left to right on a white background"
    clip = placement.render(placement._spec(caption), np.random.default_rng(0))
    assert placement.travel(np.repeat(clip[:1], 8, axis=0), caption) == pytest.approx(0.0, abs=1e-6)
    assert placement.travel(clip[::-1], caption) == pytest.approx(-0.9 * CENTRE_RANGE, abs=0.5)


def test_a_short_run_reports_each_evaluation_for_its_prompts(capsys):
    rows = placement.main(
        [
            "--steps",
            "2",
            "--clips",
            "8",
            "--eval-every",
            "1",
            "--prompts",
            "3",
            "--draws",
            "1",
            "--one-direction",
        ]
    )
    assert [r["step"] for r in rows] == [1, 2]
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(printed) == 2
    for row in rows:
        assert row["prompts"] == 3 and row["truth_right"] == 3  # every prompt rewritten to left → right
        assert abs(row["travel_px"]) < 32 and np.isfinite(row["loss"])
    prompts = placement.held_out_prompts(3, 0)
    want = np.mean([SPEEDS[placement.parse_caption(p)["speed"]] * CENTRE_RANGE for p in prompts])
    assert rows[0]["truth_travel_px"] == pytest.approx(want, abs=0.5)


def test_two_directions_keep_one_axis_and_both_signs():
    """``--two-directions``: every caption moves horizontally; a vertical one keeps its sign (top to bottom
    → left to right) and nothing else in it changes."""
    assert placement.horizontal("a red circle moves slowly from top to bottom on a blue background") == (
        "a red circle moves slowly from left to right on a blue background"
    )
    assert placement.horizontal("a red circle moves slowly from bottom to top on a blue background") == (
        "a red circle moves slowly from right to left on a blue background"
    )
    _, captions = placement.training_clips(40, 0, False, False, two_directions=True)
    seen = {placement.parse_caption(c)["direction"] for c in captions}
    assert seen == {"from left to right", "from right to left"}


def test_bad_counts_are_refused_by_name(capsys):
    with pytest.raises(SystemExit) as e:
        placement.main(["--steps", "0"])
    assert e.value.code == 2 and "--steps" in capsys.readouterr().err
    for bad in ("0", "-0.5", "nan"):
        with pytest.raises(SystemExit) as e:
            placement.main(["--pos-std", bad])
        assert e.value.code == 2 and f"--pos-std={float(bad)}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        placement.main(["--oracle-direction", "0"])
    assert e.value.code == 2 and "--oracle-direction=0.0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        placement.main(["--one-direction", "--two-directions"])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_one_look_keeps_only_the_direction():
    _, captions = placement.training_clips(40, 0, False, False, look=True)
    parsed = [placement.parse_caption(c) for c in captions]
    assert {p["direction"] for p in parsed} == set(placement.DIRECTIONS)  # all four still there
    for p in parsed:
        assert (p["colour"], p["shape"], p["speed"], p["background"]) == ("red", "circle", "slowly", "white")
    # it composes with the axis switch: horizontal first, then the one look
    assert (
        placement._directions(
            "a blue square moves quickly from bottom to top on a black background", False, True, True
        )
        == "a red circle moves slowly from right to left on a white background"
    )


def test_oracle_direction_adds_its_row_to_the_conditioning_vector():
    """The hook adds each clip's direction row where the timestep embedding enters c (the same seed builds
    the same model without it), and the model's output follows the ids."""
    assert placement.build(None, False, 0).text_pool is None
    assert placement.build(None, False, 0, text_pool=True).text_pool is not None  # --text-pool
    model, plain = placement.build(None, False, 0), placement.build(None, False, 0)
    oracle = placement.OracleDirection(model, 1.0)
    captions = [
        "a red circle moves slowly from left to right on a white background",
        "a red circle moves slowly from bottom to top on a white background",
    ]
    ids = placement.direction_ids(captions)
    assert [list(placement.DIRECTIONS)[i] for i in ids] == ["from left to right", "from bottom to top"]
    t = torch.full((2, 1), 1000.0)
    oracle.ids = ids
    with torch.no_grad():
        torch.testing.assert_close(
            model.t_embedder(t) - plain.t_embedder(t), oracle.table.weight[ids][:, None]
        )
        x = torch.randn(2, 48, 8, 8, 8)
        kw = {"context": torch.randn(2, 24, 384), "fps": torch.full((2,), 8.0)}
        randomize(model)  # adaLN-Zero: a fresh model's output is 0 whatever c is
        same = model(x, t[:, 0], **kw)
        oracle.ids = ids.flip(0)
        assert (model(x, t[:, 0], **kw) - same).abs().max() > 1e-3


def test_oracle_frames_gives_each_latent_frame_its_own_row():
    """``--oracle-frames``: c becomes B×F'×D with frame f of a clip getting the row of (its direction, its
    speed, f); two clips that differ only in speed get different rows, and the model runs per frame."""
    model, plain = placement.build(None, False, 0), placement.build(None, False, 0)
    oracle = placement.OracleDirection(model, 1.0, frames=4)
    captions = [
        "a red circle moves slowly from top to bottom on a white background",
        "a red circle moves quickly from top to bottom on a white background",
    ]
    ids = placement.direction_ids(captions, speeds=True)
    names, rates = list(placement.DIRECTIONS), list(SPEEDS)
    assert ids.tolist() == [
        names.index("from top to bottom") * 2 + rates.index(s) for s in ("slowly", "quickly")
    ]
    oracle.ids = ids
    t = torch.full((2, 1), 1000.0)
    with torch.no_grad():
        added = model.t_embedder(t) - plain.t_embedder(t)  # 2, 4, D
        assert added.shape == (2, 4, model.cfg.hidden_size)
        for b in range(2):
            for f in range(4):
                torch.testing.assert_close(added[b, f], oracle.table.weight[ids[b] * 4 + f])
        x = torch.randn(2, 48, 8, 8, 8)
        kw = {"context": torch.randn(2, 24, 384), "fps": torch.full((2,), 8.0)}
        randomize(model)
        same = model(x, t[:, 0], **kw)
        oracle.table.weight[ids[0] * 4 + 3] += 1.0  # the last latent frame of clip 0 only
        moved = (model(x, t[:, 0], **kw) - same).abs()
        assert moved[1].max() == 0  # the other clip's rows are untouched
        assert moved[0, :, 6:].max() > 1e-3  # frames 6-7 = latent frame 3 (pt = 2)
    with pytest.raises(SystemExit) as e:
        placement.main(["--oracle-frames"])
    assert e.value.code == 2
    argv = ["--steps", "1", "--clips", "4", "--prompts", "2", "--draws", "1", "--oracle-direction", "1"]
    (row,) = placement.main([*argv, "--oracle-frames"])  # the run path: prompts' ids per frame too
    assert row["prompts"] == 2 and np.isfinite(row["travel_px"])


def test_patch_t_sets_the_temporal_patch():
    assert placement.build(None, False, 0).cfg.patch_size == (2, 1, 1)  # the demo's
    assert placement.build(None, False, 0, patch_t=8).cfg.patch_size == (8, 1, 1)


def test_oracle_tokens_adds_each_frames_row_to_that_frames_tokens_not_to_c():
    """``--oracle-tokens``: the patch embedding of latent frame f (64 tokens of 8×8, pt = 2) gets row
    (direction, speed, f); the conditioning vector c is left alone."""
    model, plain = placement.build(None, False, 0), placement.build(None, False, 0)
    oracle = placement.OracleDirection(model, 1.0, frames=4, tokens=True)
    oracle.ids = placement.direction_ids(
        ["a red circle moves quickly from right to left on a white background"], speeds=True
    )
    x = torch.randn(1, 48, 8, 8, 8)
    t = torch.full((1, 1), 1000.0)
    with torch.no_grad():
        torch.testing.assert_close(model.t_embedder(t), plain.t_embedder(t))
        added = model.patch_embed(x) - plain.patch_embed(x)  # 1, 256, D in (f h w) order
        for f in range(4):
            want = oracle.table.weight[oracle.ids[0] * 4 + f].expand(64, -1)
            torch.testing.assert_close(added[0, f * 64 : (f + 1) * 64], want)
    with pytest.raises(ValueError, match="give frames"):
        placement.OracleDirection(plain, 1.0, tokens=True)
    with pytest.raises(SystemExit) as e:
        placement.main(["--oracle-direction", "1", "--oracle-tokens"])
    assert e.value.code == 2


def test_text_frames_builds_a_per_frame_text_pool():
    model = placement.build(None, False, 0, text_frames=True)
    assert model.cfg.text_pool and model.cfg.text_pool_frames == 4  # 8 frames / pt 2
    assert placement.build(None, False, 0, patch_t=4, text_frames=True).cfg.text_pool_frames == 2
    argv = ["--steps", "1", "--clips", "4", "--prompts", "2", "--draws", "1", "--text-frames"]
    (row,) = placement.main(argv)
    assert row["prompts"] == 2 and np.isfinite(row["travel_px"])
