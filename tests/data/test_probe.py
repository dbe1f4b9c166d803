"""The probe (``data.probe``) verified on ground truth: held-out ``data.synthetic`` clips written as real
H.264 / PNG / JPEG files, read back through PyAV, at their own size and squashed to the demo's 32×32."""

import io
import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from data import probe
from data.probe import MAX_FRAMES
from data.synthetic import COLOURS, DIRECTIONS, SHAPES, SPEEDS, describe, render, write_raw
from data.video import MediaError
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


def test_parse_caption_ignores_case_bom_whitespace_and_one_final_period():
    caption = "a red circle moves slowly from left to right on a white background"
    want = probe.parse_caption(caption)
    variants = {
        "case": "A Red CIRCLE moves slowly from left to right on a White background",
        "bom": "\ufeff" + caption,
        "double space": caption.replace(" ", "  "),
        "nbsp": caption.replace(" ", "\u00a0", 2),
        "tab and newlines": "  " + caption.replace(" moves", "\tmoves") + "\r\n\n",
        "final period": caption + ".",
        "period after space": caption + " .",
    }
    for what, text in variants.items():
        assert probe.parse_caption(text) == want, what
    assert probe.parse_caption(caption + "..") is None  # one period, not any punctuation
    assert probe.parse_caption("a red circle on a white. background") is None


def _mjpeg_avi(sizes: list[int]) -> bytes:
    """An MJPEG .avi whose frame i is sizes[i]² (a red square moving right on white): each JPEG frame
    carries its own size, so the stream can change size mid-way."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="avi") as c:
        s = c.add_stream("mjpeg", rate=8)
        s.width, s.height, s.pix_fmt = sizes[0], sizes[0], "yuvj420p"
        for i, size in enumerate(sizes):
            a = np.full((size, size, 3), 255, np.uint8)
            a[10:18, 4 + 2 * i : 12 + 2 * i] = (255, 0, 0)
            jpeg = io.BytesIO()
            Image.fromarray(a).save(jpeg, "JPEG", quality=95)
            packet = av.Packet(jpeg.getvalue())
            packet.stream, packet.pts, packet.dts, packet.time_base = s, i, i, Fraction(1, 8)
            c.mux(packet)
    return buf.getvalue()


def test_read_media_refuses_frames_that_change_size(tmp_path):
    same, varying = tmp_path / "same.avi", tmp_path / "varying.avi"
    same.write_bytes(_mjpeg_avi([32] * 8))
    varying.write_bytes(_mjpeg_avi([32] * 4 + [48] * 4))
    assert probe.read_media(same).shape == (8, 32, 32, 3)
    with pytest.raises(MediaError, match="frame 4 is 48×48, the first 32×32"):
        probe.read_media(varying)


def test_score_paths_skips_bad_captions_odd_entries_and_scores_each_file_once(truth, tmp_path, capsys):
    """A folder with one good clip, captions in UTF-16 / binary / with a BOM, a video whose frames change
    size, a folder named x.mp4 and a broken x.mp4 link; the good clip also named a second time."""
    _, clips = truth
    frames, caption = next((squash(f[:8]), c) for f, c in clips if probe.parse_caption(c)["direction"])
    write_mp4(tmp_path / "good.mp4", frames, 8, caption=caption)
    for name, text in {
        "utf16": caption.encode("utf-16"),
        "binary": b"\xff\xfe\x00\x81garbage",
        "bom": b"\xef\xbb\xbf" + caption.upper().encode(),
    }.items():
        (tmp_path / f"{name}.mp4").write_bytes((tmp_path / "good.mp4").read_bytes())
        (tmp_path / f"{name}.txt").write_bytes(text)
    (tmp_path / "varying.avi").write_bytes(_mjpeg_avi([32] * 4 + [48] * 4))
    (tmp_path / "varying.txt").write_text(caption)
    (tmp_path / "folder.mp4").mkdir()
    (tmp_path / "dangling.mp4").symlink_to(tmp_path / "nowhere.mp4")
    assert probe.main(["score", str(tmp_path), str(tmp_path / "good.mp4"), "--per-clip"]) == 0
    std = capsys.readouterr()
    out = json.loads(std.out)
    assert [Path(c["path"]).name for c in out["clips"]] == ["bom.mp4", "good.mp4"]  # good.mp4 once
    assert out["n"] == 2 and out["accuracy"]["color"] == 1.0
    why = {Path(p).name: w for p, w in out["skipped_files"].items()}
    assert out["skipped"] == len(why) == 5
    assert why["utf16.mp4"] == "caption is not UTF-8 text (utf16.txt)"
    assert why["binary.mp4"] == "caption is not UTF-8 text (binary.txt)"
    assert "frame_size_changes" in why["varying.avi"]
    assert "folder" in why["folder.mp4"] and "target does not exist" in why["dangling.mp4"]
    for name in why:
        assert f"{name}: {why[name]}" in std.err


@pytest.mark.parametrize("side", [32, 64, 128, 255])
def test_small_clips_are_read_as_they_are(side):
    frames = np.random.default_rng(side).integers(0, 256, (MAX_FRAMES, side, side + 7, 3), dtype=np.uint8)
    assert probe.reduce_frames(frames) is frames


def _rendered(seed: int, size: tuple[int, int], frames: int = 8) -> tuple[np.ndarray, str]:
    spec = describe(np.random.default_rng([seed, 0]), still=False, frames=(frames, frames), size=size)
    return render(spec, np.random.default_rng([seed, 1])), spec["caption"]


def test_large_and_long_clips_read_like_their_small_versions(tmp_path):
    """The same clips drawn at 96×54 and at 720p (area-averaged by 5 to 144×256), and 8-frame clips
    repeated in time to 200 frames (read at 64): every attribute reads the same."""
    keys = ("found", *probe.ATTRIBUTES)
    for seed in range(6):
        small, caption = _rendered(seed, (96, 54))
        large, _ = _rendered(seed, (1280, 720))
        assert probe.reduce_frames(large).shape == (8, 144, 256, 3)
        want = probe.measure(small)
        assert probe.score([(small, caption)])["overall"] == 1.0
        got = probe.measure(large)
        assert {k: got[k] for k in keys} == {k: want[k] for k in keys}, seed
        long = np.repeat(small, 25, axis=0)  # 200 frames: each shown 25 times, the motion unchanged
        reduced = probe.reduce_frames(long)
        assert len(reduced) == MAX_FRAMES and (reduced[[0, -1]] == long[[0, -1]]).all()
        got = probe.measure(long)
        assert {k: got[k] for k in keys} == {k: want[k] for k in keys}, seed
    # read from a 720p mp4, the video is reduced as it is decoded: the same frames as reducing after
    write_mp4(tmp_path / "big.mp4", large, 8, caption=caption)
    full = probe.read_media(tmp_path / "big.mp4", full=True)
    assert full.shape == (8, 720, 1280, 3)
    assert (probe.read_media(tmp_path / "big.mp4") == probe.reduce_frames(full)).all()


def test_clips_beyond_the_pixel_budget_are_refused_and_skipped_by_name(tmp_path, monkeypatch, capsys):
    frames, caption = _rendered(0, (96, 54))
    write_mp4(tmp_path / "wide.mp4", frames, 8, caption=caption)
    write_mp4(tmp_path / "ok.mp4", frames[:, :16, :16], 8, caption=caption)
    monkeypatch.setattr(probe, "MAX_PIXELS", 8 * 32 * 32)  # fits ok.mp4 (16²), not wide.mp4 (96×54)
    with pytest.raises(ValueError, match="too large for the probe.*MAX_PIXELS=8192"):
        probe.measure(frames)
    out = probe.score_paths([tmp_path])
    assert out["n"] == 1 and list(out["skipped_files"]) == [str(tmp_path / "wide.mp4")]
    assert "wide.mp4: 8×54×96 frames are too large" in capsys.readouterr().err
