import numpy as np
import pytest

from data.video import MediaError, decode_all_frames, decode_clip, decode_image, encode_h264, probe
from tests.data.conftest import frame_index, gradient_clip


def test_probe_reports_real_metadata():
    data = encode_h264(gradient_clip(30, 48, 80), fps=15)
    info = probe(data, "mp4")
    assert (info.kind, info.frames, info.fps, info.width, info.height, info.codec) == (
        "video",
        30,
        15.0,
        80,
        48,
        "h264",
    )
    assert info.duration == pytest.approx(2.0, abs=0.1)


@pytest.mark.parametrize(
    "src_fps,start,fps,expect",
    [(24, 0.5, 8, [12, 15, 18, 21]), (30, 0.0, 10, [0, 3, 6, 9]), (12, 1.0, 12, [12, 13, 14, 15])],
)
def test_decode_clip_picks_frames_by_time(src_fps, start, fps, expect):
    data = encode_h264(gradient_clip(48, 32, 32), fps=src_fps, gop=6)
    clip = decode_clip(data, start, 4, fps, (32, 32))
    assert clip.shape == (4, 32, 32, 3)
    assert [frame_index(v) for v in clip[:, 16, 16, 0].astype(float)] == expect


def test_decode_matches_the_naive_decoder():
    data = encode_h264(gradient_clip(40, 48, 64), fps=20, gop=8)
    all_frames, _ = decode_all_frames(data)
    clip = decode_clip(data, 1.0, 5, 5, (64, 48))
    assert np.array_equal(clip, all_frames[20:40:4])  # 1 s in at 20 fps, every 4th frame


def test_resize_and_crop_cover_the_bucket():
    data = encode_h264(gradient_clip(8, 64, 128), fps=8)
    clip = decode_clip(data, 0.0, 2, 8, (48, 48))
    assert clip.shape == (2, 48, 48, 3)
    with pytest.raises(MediaError, match="too_short"):
        decode_clip(data, 0.5, 8, 8, (48, 48))


def test_bad_media_raise_with_a_reason():
    good = encode_h264(gradient_clip(8, 32, 32), fps=8)
    for data, reason in (
        (good[: len(good) // 4], "undecodable"),
        (b"garbage" * 30, "undecodable"),
        (b"", "empty"),
    ):
        with pytest.raises(MediaError) as e:
            probe(data, "mp4")
        assert e.value.reason == reason
    with pytest.raises(MediaError) as e:
        probe(good, "gif")
    assert e.value.reason == "unknown_extension"


def test_decode_image(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((30, 90, 3), 128, np.uint8)).save(tmp_path / "x.webp")
    data = (tmp_path / "x.webp").read_bytes()
    assert probe(data, "webp").kind == "image"
    assert decode_image(data, (32, 16)).shape == (1, 16, 32, 3)
