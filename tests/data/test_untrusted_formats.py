"""Shard bytes reach only the decoders of their extension: an EPS named ``k.jpg`` never reaches
Pillow's Ghostscript plugin, and a ``k.mp4`` that is an ffconcat list never makes FFmpeg open the
files it names. Each check runs in a subprocess whose PATH or working directory holds the bait."""

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from tests.data.conftest import video_sample

pytestmark = pytest.mark.slow


REPO = Path(__file__).resolve().parents[2]
EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n%%EndComments\n"
    b"newpath 0 0 moveto 32 32 lineto stroke\nshowpage\n%%EOF\n"
)
FFCONCAT = b"ffconcat version 1.0\nfile private.ts\n"

# Run in the subprocess: the stream over one tar (raw skip counts and whether anything was delivered)
# and the probe of the shard writer on the same bytes as a file.
SCRIPT = r"""
import json, sys
from pathlib import Path
from data.buckets import Bucket, BucketConfig
from data.shards import list_sources, write_shards
from data.stream import Errors, StreamSpec, batches
from data.video import MediaError, decode_clip, probe
from benchmarks.dataloader import decode_everything

tar, src, out, ext = sys.argv[1:5]
result = {}
for naive in (False, True):
    errors = Errors()
    spec = StreamSpec([tar], BucketConfig([Bucket(4, 32, 32, 1), Bucket(1, 32, 32, 1)], fps=8), 0, 0, (0,),
                      error_threshold=1.0, clip_decoder=decode_everything if naive else decode_clip)
    got = [b for _, b in batches(spec, errors) if b is not None]
    result["naive" if naive else "stream"] = {
        "delivered": [b.key for b in got],
        "max": [float(b.video.max()) for b in got],
        "skipped": dict(errors.counts),
    }
data = next(Path(src).glob("k.*")).read_bytes()
calls = {"probe": lambda: probe(data, ext), "sniffed": lambda: decode_clip(data, 0, 1, 8, (32, 32))}
for name, call in calls.items():
    try:
        call()
        result[name] = "read"
    except MediaError as e:
        result[name] = e.reason
index = write_shards(list_sources(Path(src)), Path(out))
skipped = {k: [r["detail"] for r in v] for k, v in index["skipped"].items()}
result["writer"] = {"samples": index["samples"], "skipped": skipped}
print(json.dumps(result))
"""


def _run(tmp_path: Path, ext: str, data: bytes, meta: dict, env: dict) -> dict:
    """SCRIPT on a tar with one sample ``k`` (``data`` as ``k.{ext}``) and a folder with that file."""
    import webdataset as wds

    src = tmp_path / "src"
    src.mkdir()
    (src / f"k.{ext}").write_bytes(data)
    (src / "k.txt").write_text("bait")
    with wds.TarWriter(str(tmp_path / "train-000000.tar")) as w:
        w.write({"__key__": "k", ext: data, "txt": "bait", "json": json.dumps(meta)})
    args = [str(tmp_path / "train-000000.tar"), str(src), str(tmp_path / "out"), ext]
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_an_eps_named_jpg_never_runs_ghostscript(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "gs-ran"
    (bin_dir / "gs").write_text(f'#!/bin/sh\necho "$@" >> {marker}\nexit 1\n')
    (bin_dir / "gs").chmod(0o755)
    meta = {"kind": "image", "frames": 1, "fps": 0.0, "width": 32, "height": 32}
    path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    result = _run(tmp_path, "jpg", EPS, meta, {"PATH": path})
    assert not marker.exists(), marker.read_text()
    # Pillow was never asked to try EPS: "cannot identify image file", not a Ghostscript failure
    for run in ("stream", "naive"):
        assert result[run] == {"delivered": [], "max": [], "skipped": {"undecodable": 1}}
    assert result["probe"] == "undecodable"
    (detail,) = result["writer"]["skipped"]["undecodable"]
    assert "UnidentifiedImageError" in detail and "gs" not in detail
    assert result["writer"]["samples"] == 0


def _mpegts(frames: int, value: int) -> bytes:
    """A real MPEG-TS clip of ``frames`` 32×32 frames, every pixel ``value`` (the bait's signature)."""
    import io

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mpegts") as c:
        stream = c.add_stream("mpeg2video", rate=8)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), value, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    return buf.getvalue()


def test_an_ffconcat_named_mp4_never_opens_the_files_it_lists(tmp_path):
    (tmp_path / "private.ts").write_bytes(_mpegts(16, 250))
    meta = json.loads(video_sample("k", frames=8)["json"])
    result = _run(tmp_path, "mp4", FFCONCAT, meta, {})
    for run in ("stream", "naive"):  # decode_clip and the benchmark's decode_everything
        assert result[run] == {"delivered": [], "max": [], "skipped": {"undecodable": 1}}
    assert result["probe"] == "undecodable"  # the mov demuxer finds no mp4 in the text
    assert result["sniffed"] == "undecodable"  # no extension: none of the containers' magic bytes
    assert result["writer"]["samples"] == 0 and list(result["writer"]["skipped"]) == ["undecodable"]
