"""Fixtures: real H.264 clips and stills, written through the real shard writer."""

import io
import json
import struct
import zlib

import av
import numpy as np
import pytest
import webdataset as wds
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


# ---- builders for bad-input tests: real tars, real H.264, real PNGs ----


def write_tar(path, samples) -> None:
    """A webdataset tar of ``samples`` (dicts with ``__key__`` and ext → bytes/str)."""
    with wds.TarWriter(path if hasattr(path, "write") else str(path)) as w:
        for s in samples:
            w.write(s)


def video_sample(key: str, frames: int = 8, size: int = 32, caption="a clip", **meta) -> dict:
    """A real 8 fps H.264 clip with its caption and sidecar json (fields in ``meta`` override)."""
    info = {"kind": "video", "frames": frames, "fps": 8.0, "width": size, "height": size}
    info.update(duration=frames / 8, **meta)
    s = {
        "__key__": key,
        "mp4": encode_h264(gradient_clip(frames, size, size), fps=8),
        "json": json.dumps(info),
    }
    if caption is not None:
        s["txt"] = caption
    return s


def image_sample(key: str, png: bytes, width: int = 32, height: int = 32, caption="a still") -> dict:
    meta = {"kind": "image", "frames": 1, "fps": 0.0, "width": width, "height": height}
    return {"__key__": key, "png": png, "txt": caption, "json": json.dumps(meta)}


def png(width: int = 32, height: int = 32, value: int = 120) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width × height zero pixels: tens of KB on disk, width × height in memory."""
    row = b"\x00" + bytes((width + 7) // 8)  # filter 0 + one row of zero bits
    comp, block = zlib.compressobj(9), 500
    chunks = [comp.compress(row * min(block, height - i)) for i in range(0, height, block)]
    idat = b"".join(chunks) + comp.flush()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def audio_only_mp4() -> bytes:
    """An mp4 with one AAC stream and no video."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        stream = c.add_stream("aac", rate=16000)
        for _ in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 16000
            for packet in stream.encode(frame):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    return buf.getvalue()


def stream_epoch(shards, buckets, **spec) -> tuple[list[str], object]:
    """Keys delivered (sorted) by one epoch of one worker's stream over ``shards``, and its Errors."""
    from data.stream import Errors, StreamSpec, batches

    errors = Errors()
    spec = StreamSpec(
        shards=[str(s) for s in shards], buckets=buckets, seed=0, epoch=0, stream_id=(0,), **spec
    )
    spec.error_threshold = 1.0  # these tests count skips; the abort has its own test
    keys = [k for _, batch in batches(spec, errors) if batch is not None for k in batch.key]
    return sorted(keys), errors
