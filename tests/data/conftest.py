"""Fixtures: real H.264 clips and stills, written through the real shard writer."""

import numpy as np
import pytest
from PIL import Image

from data.video import encode_h264


def gradient_clip(frames: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """T×H×W×3 frames whose red channel encodes the frame index (5 per frame), so tests can tell
    which source frames a decoder picked."""
    rng = np.random.default_rng(seed)
    out = np.zeros((frames, h, w, 3), np.uint8)
    out[..., 1] = rng.integers(0, 255)
    for i in range(frames):
        out[i, ..., 0] = min(255, i * 5)
    return out


def frame_index(video_frame_red: float) -> int:
    return round(video_frame_red / 5)


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory):
    """A folder of mp4s (different fps, sizes, durations), stills, and broken files with captions."""
    d = tmp_path_factory.mktemp("media")
    specs = [(16, 64, 96, 24), (9, 48, 48, 8), (30, 64, 112, 30), (48, 72, 128, 12), (24, 96, 64, 15)]
    for i, (t, h, w, fps) in enumerate(specs):
        (d / f"clip{i}.mp4").write_bytes(encode_h264(gradient_clip(t, h, w, seed=i), fps))
        (d / f"clip{i}.txt").write_text(f"clip number {i}")
    (d / "stills").mkdir()
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(d / "stills" / "a.png")
    (d / "stills" / "a.txt").write_text("a still png")
    Image.fromarray(np.full((64, 64, 3), 100, np.uint8)).save(d / "stills" / "b.jpg")
    (d / "stills" / "b.txt").write_text("a still jpg")
    (d / "broken.mp4").write_bytes(b"not a video" * 20)
    (d / "broken.txt").write_text("broken")
    good = (d / "clip0.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(good[: len(good) // 4])
    (d / "truncated.txt").write_text("truncated")
    (d / "nocaption.mp4").write_bytes(good)
    (d / "empty.mp4").write_bytes(b"")
    (d / "empty.txt").write_text("empty")
    return d
