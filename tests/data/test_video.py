import io
import struct

import av
import numpy as np
import pytest

from data.video import (
    MOV_FIRST_BOXES,
    MediaError,
    decode_all_frames,
    decode_clip,
    decode_image,
    demuxer,
    encode_h264,
    probe,
)
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
    all_frames, _, _ = decode_all_frames(data)
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


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def _mp4_starting_with(kind: bytes) -> bytes:
    """A real H.264 mp4 whose first top-level box is ``kind``, every later byte (and so every sample
    offset in its moov) where the writer put it: the 32-byte ftyp becomes a 32-byte box of that kind,
    or (mdat) the first mdat grows to start at byte 0 and holds the ftyp and free as opaque bytes; for
    moov, a fragmented mp4 (offsets relative to each fragment) without its ftyp."""
    if kind == b"moov":
        buf = io.BytesIO()
        flags = "frag_keyframe+empty_moov+default_base_moof+skip_trailer"
        with av.open(buf, mode="w", format="mp4", options={"movflags": flags}) as c:
            stream = c.add_stream("libx264", rate=8)
            stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
            for arr in gradient_clip(8, 32, 32):
                c.mux(stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")))
            c.mux(stream.encode())
        data = buf.getvalue()
        return data[struct.unpack(">I", data[:4])[0] :]
    data = encode_h264(gradient_clip(8, 32, 32), fps=8)
    assert (data[:8], data[36:40]) == (b"\0\0\0\x20ftyp", b"free")  # ftyp (32), free (8), mdat
    if kind == b"mdat":
        return struct.pack(">I4s", 40 + struct.unpack(">I", data[40:44])[0], b"mdat") + data[8:]
    payload = {
        b"styp": data[8:32],  # a segment type box is laid out as ftyp
        b"sidx": struct.pack(">IIIIIHH", 0, 1, 8, 0, 0, 0, 0),  # version 0, no references
        b"uuid": bytes(range(16)) + bytes(8),  # a 16-byte user type
    }.get(kind, bytes(24))
    return _box(kind, payload) + data[32:]


@pytest.mark.parametrize("kind", [b.decode() for b in MOV_FIRST_BOXES])
def test_an_mp4_opens_by_its_bytes_whatever_box_it_starts_with(kind):
    """Without an extension (a file the user names) the demuxer comes from the first bytes: any box
    an mp4/mov may start with means the mov demuxer, and the clip decodes as it does by extension."""
    data = _mp4_starting_with(kind.encode())
    assert data[4:8] == kind.encode() and demuxer(None, data) == "mov"
    by_bytes = decode_clip(data, 0.0, 4, 8, (32, 32))
    assert np.array_equal(by_bytes, decode_clip(data, 0.0, 4, 8, (32, 32), ext="mp4"))


def test_launch_sample_decodes_a_video_with_the_demuxer_it_probed(tmp_path):
    """launch.sample probes its --video by extension: it must decode it the same way, not by the
    first bytes (a valid mp4 may start with a box no sniff list knows, here a file-level meta box)."""
    from launch.sample import _pixels

    data = encode_h264(gradient_clip(8, 32, 32), fps=8)
    path = tmp_path / "clip.mp4"
    path.write_bytes(_box(b"meta", bytes(24)) + data[32:])  # the ftyp's 32 bytes, offsets kept
    assert probe(path.read_bytes(), "mp4").frames == 8
    video = _pixels(str(path), 4, 8.0, (32, 32))
    assert video.shape == (1, 3, 4, 32, 32) and video.min() >= -1 and video.max() <= 1
