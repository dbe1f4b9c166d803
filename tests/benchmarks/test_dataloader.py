"""benchmarks.dataloader: its decode-everything baseline skips and counts a broken mp4 as the real
loader does, and returns the frames the real decoder picks. Real H.264 clips in a real tar."""

import json

import numpy as np
import pytest

from benchmarks.dataloader import decode_everything, main
from data.video import MediaError, decode_clip, encode_h264
from tests.data.conftest import frame_index, gradient_clip, video_sample, write_tar


def _broken_mp4() -> bytes:
    """A real mp4 cut before its sample-to-chunk table: the container opens, no frame decodes."""
    clip = encode_h264(gradient_clip(16, 32, 32), fps=8)
    return clip[: clip.index(b"stsc") - 4]


def test_the_baseline_fails_as_the_real_decoder_does():
    broken = _broken_mp4()
    for decode in (decode_clip, decode_everything):
        with pytest.raises(MediaError) as e:
            decode(broken, 0.0, 8, 8.0, (32, 32), ext="mp4")
        assert e.value.reason == "too_short", decode.__name__


@pytest.mark.parametrize("start,fps", [(0.0, 8.0), (0.5, 4.0)])
def test_the_baseline_picks_the_frames_the_real_decoder_picks(start, fps):
    clip = encode_h264(gradient_clip(24, 32, 32), fps=8)
    ours = decode_clip(clip, start, 4, fps, (32, 32), ext="mp4")
    base = decode_everything(clip, start, 4, fps, (32, 32), ext="mp4")
    assert base.shape == ours.shape == (4, 32, 32, 3)
    picked = [frame_index(float(f[..., 0].mean())) for f in base]
    assert picked == [frame_index(float(f[..., 0].mean())) for f in ours]
    assert picked == [round((start + i / fps) * 8) for i in range(4)]


def test_the_benchmark_counts_a_broken_mp4_in_both_runs(tmp_path):
    # 8-frame clips in an 8-frame bucket start at 0 s: no seek, so both decoders fail alike (a seek into
    # the broken file would fail as 'undecodable' in ours, which the baseline never seeks)
    good = [video_sample(f"g{i}", frames=8) for i in range(4)]
    broken = video_sample("broken", frames=8)
    broken["mp4"] = _broken_mp4()
    write_tar(tmp_path / "train-000000.tar", good[:2] + [broken])
    write_tar(tmp_path / "train-000001.tar", good[2:])
    (tmp_path / "buckets.json").write_text(json.dumps({"fps": 8, "buckets": [[8, 32, 32, 2]]}))
    args = ["--shards", str(tmp_path), "--buckets", str(tmp_path / "buckets.json"), "--workers", "0"]
    result = main([*args, "--batches", "6", "--no-report"])  # two epochs of 3 batches (2, 2, 1 samples)
    assert result["errors"] == result["naive"]["errors"] == {"too_short": 2}
    assert result["batches"] == 6 and result["buckets"] == {"8x32x32": 6}
    assert np.isfinite(result["naive"]["samples_per_s"]) and result["naive"]["samples_per_s"] > 0
