"""The probe (``data.probe``) verified on ground truth: held-out ``data.synthetic`` clips written as real
H.264 / PNG / JPEG files, read back through PyAV, at their own size and squashed to the demo's 32×32."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from data import probe
from data.synthetic import COLOURS, DIRECTIONS, SHAPES, SPEEDS, write_raw
from launch.sample import write_mp4

ROOT = Path(__file__).resolve().parents[2]
NUM = 160  # clips (≈ 15% stills): each attribute's accuracy is measured to ± a few per cent


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    """(folder, [(frames, caption)]) of held-out clips: an index range the demo's 512-clip train set
    (and its 32 val clips) never draws, seed 0 like the demo."""
    folder = tmp_path_factory.mktemp("heldout")
    write_raw(folder, NUM, seed=0, image_fraction=0.15, start=900_000, frames=(8, 24))
    files = sorted(f for f in folder.iterdir() if f.suffix != ".txt")
    clips = [(probe.read_media(f), f.with_suffix(".txt").read_text()) for f in files]
    return folder, clips


def squash(frames: np.ndarray, size: int = 32) -> np.ndarray:
    """Every frame resized (antialiased) to size×size: the demo's resolution, aspect ratio not kept."""
    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BILINEAR)) for f in frames])


def test_parse_caption_reads_the_grammar_and_refuses_the_rest():
    moving = probe.parse_caption("a red circle moves slowly from left to right on a white background")
    assert moving == {
        "colour": "red",
        "shape": "circle",
        "speed": "slowly",
        "direction": "from left to right",
        "background": "white",
    }
    still = probe.parse_caption("a orange triangle on a gray background")
    assert still == {
        "colour": "orange",
        "shape": "triangle",
        "speed": None,
        "direction": None,
        "background": "gray",
    }
    for bad in (
        "a pink circle on a white background",  # not a palette colour
        "a red hexagon on a white background",
        "a red circle moves sideways from left to right on a white background",
        "a red circle moves slowly from left to top on a white background",
        "a cat playing the piano",
        "",
    ):
        assert probe.parse_caption(bad) is None, bad


@pytest.mark.parametrize("size", [None, 32], ids=["native", "32px"])
def test_ground_truth_clips_score_at_least_95_percent(truth, size):
    _, clips = truth
    if size:
        clips = [(squash(f, size), c) for f, c in clips]
    r = probe.score(clips)
    assert r["n"] == NUM and r["skipped"] == 0 and r["found"] == 1.0
    assert 0 < r["n_moving"] < NUM  # both stills and moving clips are in the set
    for attr in probe.ATTRIBUTES:
        assert r["accuracy"][attr] >= 0.95, (attr, r["accuracy"])
    assert r["overall"] == pytest.approx(np.mean(list(r["accuracy"].values())))
    # a shape moving at constant speed on a plain background: smooth, stable, no flicker
    assert r["temporal"]["jerk"] < 0.05 and r["temporal"]["area_cv"] < 0.1 and r["temporal"]["flicker"] < 0.01


def test_blurred_faint_off_colour_clips_still_read(truth):
    """The demo's samples are blurry, off in colour by tens of levels, their object fainter: the 32×32
    clips blended 20% towards the background, blurred (σ 0.7 px), cast by up to ±15 levels per channel
    and noised (σ 4). Shape suffers most from the blur (the corners of a 9-px square round off)."""
    _, clips = truth
    rng = np.random.default_rng(3)
    degraded = []
    for frames, caption in clips:
        x = squash(frames).astype(np.float32)
        bg = np.median(np.concatenate([x[:, 0], x[:, -1]]).reshape(-1, 3), axis=0)
        x = ndimage.gaussian_filter(0.8 * x + 0.2 * bg, (0, 0.7, 0.7, 0))
        x += rng.uniform(-15, 15, 3) + rng.normal(0, 4, x.shape)
        degraded.append((np.clip(x, 0, 255).astype(np.uint8), caption))
    acc = probe.score(degraded)["accuracy"]
    assert acc["color"] >= 0.9 and acc["background"] >= 0.95 and acc["shape"] >= 0.8, acc
    assert acc["direction"] >= 0.95 and acc["speed"] >= 0.95, acc


def test_shuffled_captions_fall_to_chance(truth):
    _, clips = truth
    rng = np.random.default_rng(1)
    captions = [c for _, c in clips]
    shuffled = [(f, captions[i]) for (f, _), i in zip(clips, rng.permutation(len(clips)), strict=True)]
    acc = probe.score(shuffled)["accuracy"]
    # chance is 1/classes for a uniform draw; the bounds leave room for sampling noise on 160 clips
    assert acc["color"] <= 2.5 / len(COLOURS) and acc["background"] <= 2.5 / len(COLOURS)
    assert acc["shape"] <= 1.5 / len(SHAPES)
    assert acc["direction"] <= 1.8 / len(DIRECTIONS)
    assert acc["speed"] <= 1.4 / len(SPEEDS)


def test_noise_finds_no_object_and_scores_near_chance(truth):
    _, clips = truth
    rng = np.random.default_rng(2)
    noise = [(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), c) for _, c in clips[:60]]
    r = probe.score(noise)
    assert r["found"] <= 0.05
    acc = r["accuracy"]
    assert acc["color"] <= 0.05 and acc["shape"] <= 0.05 and acc["direction"] <= 0.05 and acc["speed"] <= 0.05
    assert acc["background"] <= 2.5 / len(COLOURS)  # the border's median of noise: some gray
    assert r["temporal"]["flicker"] > 0.2  # independent frames change everywhere
    assert r["temporal"]["jerk"] is None  # nothing tracked


def test_measure_reads_a_drawn_clip():
    """A hand-made clip: a 6×6 red square crossing a white 32×32 frame left to right in 8 frames."""
    frames = np.full((8, 32, 32, 3), COLOURS["white"], np.uint8)
    for f in range(8):
        x = 2 + 3 * f  # centre 5 → 26: 21 px of the 26 px the centre can travel
        frames[f, 13:19, x : x + 6] = COLOURS["red"]
    m = probe.measure(frames)
    assert m["found"] and m["color"] == "red" and m["background"] == "white" and m["shape"] == "square"
    assert m["direction"] == "from left to right" and m["speed"] == "quickly"
    assert m["travel"] == pytest.approx(21 / 26, abs=0.01)
    assert m["jerk"] == pytest.approx(0.0, abs=1e-9) and m["area_cv"] == pytest.approx(0.0)
    assert m["flicker"] == 0.0
    # reversed in time: the other direction; the first frame alone: a still without motion
    assert probe.measure(frames[::-1].copy())["direction"] == "from right to left"
    still = probe.measure(frames[:1])
    assert still["direction"] is None and still["speed"] is None and still["flicker"] is None
    # the object vanishing in half the frames shows in the area's variation and in the score
    gone = frames.copy()
    gone[::2] = COLOURS["white"]
    assert probe.measure(gone)["area_cv"] == pytest.approx(1.0)
    # one frame missed in a steady motion is a gap, not a jump (its third differences span no gap)
    gap = frames.copy()
    gap[3] = COLOURS["white"]
    assert probe.measure(gap)["jerk"] == pytest.approx(0.0, abs=1e-9)
    jolt = frames.copy()
    jolt[5] = COLOURS["white"]
    jolt[5, 13:19, 2 + 3 * 5 + 4 : 2 + 3 * 5 + 10] = COLOURS["red"]  # 4 px ahead of its place in one frame
    assert probe.measure(jolt)["jerk"] > 0.05
    with pytest.raises(ValueError, match="T×H×W×3 uint8"):
        probe.measure(frames.astype(np.float32))


def test_score_counts_unknown_captions_and_missing_objects():
    plain = np.full((8, 32, 32, 3), COLOURS["blue"], np.uint8)  # a background and nothing on it
    r = probe.score(
        [
            (plain, "a red circle moves quickly from top to bottom on a blue background"),
            (plain, "a cat playing the piano"),
        ],
        per_clip=True,
    )
    assert r["n"] == 1 and r["skipped"] == 1 and r["found"] == 0.0
    # no object: wrong for everything it would show, right about the background
    assert r["accuracy"] == {"color": 0.0, "background": 1.0, "shape": 0.0, "direction": 0.0, "speed": 0.0}
    assert r["overall"] == pytest.approx(0.2)
    assert r["clips"][0]["measured"]["found"] is False


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data.probe", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_cli_scores_a_dataset_folder(truth):
    folder, clips = truth
    r = run_cli("score", str(folder))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # one JSON object on stdout
    assert out["n"] == NUM and out["skipped"] == 0 and out["skipped_files"] == {}
    assert set(out["accuracy"]) == set(probe.ATTRIBUTES) and out["overall"] >= 0.95
    # the same numbers as scoring the decoded clips in process
    assert out["accuracy"] == probe.score(clips)["accuracy"]


def test_cli_scores_a_sample_folder_and_skips_bad_files(truth, tmp_path):
    """A ``launch.sample``-style folder (OUT-0.mp4 + OUT-0.txt …, written by ``write_mp4``) with a clip
    without caption, a broken mp4 and a caption outside the grammar: those three are skipped by name."""
    _, clips = truth
    moving = [(f, c) for f, c in clips if probe.parse_caption(c)["direction"]][:3]
    moving = [
        (squash(f[np.linspace(0, len(f) - 1, 8).round().astype(int)]), c) for f, c in moving
    ]  # 8 frames
    for n, (frames, caption) in enumerate(moving):
        write_mp4(tmp_path / f"out-{n}.mp4", frames, 8, caption=caption)
    write_mp4(tmp_path / "nocaption.mp4", moving[0][0], 8)
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 64)
    (tmp_path / "broken.txt").write_text(moving[0][1])
    write_mp4(tmp_path / "other.mp4", moving[0][0], 8, caption="a cat playing the piano")
    r = run_cli("score", str(tmp_path), "--per-clip")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["n"] == 3 and out["skipped"] == 3
    assert {Path(p).name for p in out["skipped_files"]} == {"nocaption.mp4", "broken.mp4", "other.mp4"}
    for name in ("nocaption.mp4", "broken.mp4", "other.mp4"):
        assert name in r.stderr
    assert [Path(c["path"]).name for c in out["clips"]] == ["out-0.mp4", "out-1.mp4", "out-2.mp4"]
    assert out["accuracy"]["direction"] == 1.0 and out["accuracy"]["color"] == 1.0


def test_cli_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    r = run_cli("score", str(missing))
    assert r.returncode == 2 and str(missing) in r.stderr and r.stdout == ""
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli("score", str(empty))
    assert r.returncode == 2 and "no video or image files" in r.stderr and str(empty) in r.stderr
    (empty / "a.mp4").write_bytes(b"not a video")
    (empty / "a.txt").write_text("a red circle on a white background")
    r = run_cli("score", str(empty))
    assert r.returncode == 2 and "nothing could be scored" in r.stderr and "a.mp4" in r.stderr
