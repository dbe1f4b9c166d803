"""Size limits: decompression bombs, compressed tars and huge members cost their sample (or shard),
counted, and are refused before they reach memory."""

import collections
import gzip
import io
import math
import signal
import struct
import tarfile
import tracemalloc
import warnings

import av
import pytest
from PIL import Image

from data.buckets import Bucket, BucketConfig
from data.meta import parse_meta
from data.pipeline import DataConfig, build_loader
from data.pipeline import limits as config_limits
from data.reader import Limits, read_shard
from data.shards import list_sources, write_shards
from data.stream import Errors, validate
from data.video import DEFAULT_MAX_PIXELS, MAX_VIDEO_PIXELS, MediaError, open_image, probe
from tests.data.conftest import (
    bomb_png,
    gradient_clip,
    image_sample,
    png,
    stream_epoch,
    video_sample,
    write_tar,
)

BUCKETS = BucketConfig([Bucket(4, 32, 32, 1), Bucket(1, 32, 32, 1)], fps=8)


def _epoch0(cfg: DataConfig):
    """Keys of epoch 0 and its skip counts (read once the loader has moved on to epoch 1)."""
    loader = build_loader(cfg)
    it = iter(loader)
    keys = []
    while True:
        batch = next(it)
        if loader.epoch > 0:
            break
        keys += batch.key
    skipped = collections.Counter()
    for summary in loader.errors_before:
        skipped.update(summary["skipped"])
    return sorted(keys), dict(skipped), loader.error_summary()["examples"]


def test_a_png_decompression_bomb_costs_only_its_sample(tmp_path):
    bomb = bomb_png(20000, 20000)  # 48 KB on disk, 400 Mpx decoded
    assert len(bomb) < 64 * 1024
    samples = [
        video_sample("good0"),
        image_sample("honest", bomb, width=20000, height=20000),  # refused from its json
        image_sample("liar", bomb, width=32, height=32),  # json lies: refused from the PNG header
        image_sample("still", png()),
        video_sample("good1"),
    ]
    write_tar(tmp_path / "train-000000.tar", samples)
    keys, skipped, examples = _epoch0(
        DataConfig(shards=str(tmp_path), buckets=BUCKETS, num_workers=0, error_threshold=1.0)
    )
    assert keys == ["good0", "good1", "still"]
    assert skipped == {"too_many_pixels": 2}
    assert examples["too_many_pixels"].startswith("train-000000.tar:")


def test_video_frames_over_max_pixels_are_refused_before_decoding(tmp_path):
    write_tar(
        tmp_path / "train-000000.tar",
        [
            video_sample("small"),
            video_sample("honest", size=64),  # its json says 64×64
            {**video_sample("liar", size=64), "json": video_sample("x")["json"]},  # json says 32×32
        ],
    )
    keys, errors = stream_epoch([tmp_path / "train-000000.tar"], BUCKETS, limits=Limits(max_pixels=40 * 40))
    assert keys == ["small"]
    assert dict(errors.counts) == {"too_many_pixels": 2}  # one from the json, one from the stream


def _webm_declaring(side: int) -> bytes:
    """A real VP8 WebM of 8 frames of 256², whose track header (PixelWidth/PixelHeight) and first
    keyframe header both declare side × side: FFmpeg reports that size without decoding a frame."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="webm") as c:
        stream = c.add_stream("libvpx", rate=8)
        stream.width, stream.height, stream.pix_fmt = 256, 256, "yuv420p"
        stream.codec_context.thread_count = 1
        for arr in gradient_clip(8, 256, 256):
            c.mux(stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")))
        c.mux(stream.encode())
    data = bytearray(buf.getvalue())
    for element in (b"\xb0\x82", b"\xba\x82"):  # 2-byte PixelWidth, PixelHeight = 256
        at = data.index(element + b"\x01\x00") + 2
        data[at : at + 2] = struct.pack(">H", side)
    at = data.index(b"\x9d\x01\x2a") + 3  # the keyframe start code, then 14-bit width and height
    assert struct.unpack("<HH", data[at : at + 4]) == (256, 256)
    data[at : at + 4] = struct.pack("<HH", side, side)
    return bytes(data)


def test_video_frames_have_their_own_bound_under_the_default_max_pixels(tmp_path):
    """The default max_pixels is Pillow's limit for stills (178,956,970); a video frame is held to
    MAX_VIDEO_PIXELS (16384 × 8704 = 142,606,336) as well, on its json and on its stream."""
    side = 12_000  # 144,000,000 pixels: a still Pillow decodes, no codec level's frame
    assert MAX_VIDEO_PIXELS < side * side < DEFAULT_MAX_PIXELS
    huge = _webm_declaring(side)
    with av.open(io.BytesIO(huge), format="matroska") as c:
        assert (c.streams.video[0].codec_context.width, c.streams.video[0].codec_context.height) == (
            side,
            side,
        )
    with pytest.raises(MediaError, match="too_many_pixels.*video frames at most 142606336"):
        probe(huge, "webm")  # the shard writer's check
    small = video_sample("small")
    write_tar(
        tmp_path / "train-000000.tar",
        [
            video_sample("good"),
            {"__key__": "liar", "webm": huge, "json": small["json"], "txt": "x"},  # json: 32×32
            video_sample("declared", width=side, height=side),  # its json says 12000×12000
        ],
    )
    keys, errors = stream_epoch([tmp_path / "train-000000.tar"], BUCKETS)
    assert keys == ["good"] and dict(errors.counts) == {"too_many_pixels": 2}
    still = image_sample("still", png(), width=side, height=side)["json"].encode()
    assert parse_meta(still, DEFAULT_MAX_PIXELS)["width"] == side  # stills keep Pillow's limit
    lower = Limits(max_pixels=16 * 16)  # a lower data.max_pixels is the bound for videos too
    keys, errors = stream_epoch([tmp_path / "train-000000.tar"], BUCKETS, limits=lower)
    assert keys == [] and dict(errors.counts) == {"too_many_pixels": 3}


def _gzipped_tar(path, samples):
    raw = io.BytesIO()
    write_tar(raw, samples)
    path.write_bytes(gzip.compress(raw.getvalue()))


def test_a_compressed_tar_is_refused_unless_allowed(tmp_path):
    write_tar(tmp_path / "train-000000.tar", [video_sample("plain0"), video_sample("plain1")])
    _gzipped_tar(tmp_path / "train-000001.tar", [video_sample("zipped0"), video_sample("zipped1")])
    assert (tmp_path / "train-000001.tar").read_bytes()[:2] == b"\x1f\x8b"
    cfg = DataConfig(shards=str(tmp_path), buckets=BUCKETS, num_workers=0, error_threshold=1.0)
    keys, skipped, examples = _epoch0(cfg)
    assert keys == ["plain0", "plain1"]
    assert skipped == {"compressed_tar": 1}
    assert examples["compressed_tar"] == "train-000001.tar:gzip"
    cfg.allow_compressed = True
    keys, skipped, _ = _epoch0(cfg)
    assert keys == ["plain0", "plain1", "zipped0", "zipped1"] and skipped == {}


def test_a_member_over_max_member_mb_costs_its_sample_without_being_read(tmp_path):
    big = video_sample("big")
    big["txt"] = "x" * (24 << 20)  # a 24 MiB caption
    path = tmp_path / "train-000000.tar"
    write_tar(path, [video_sample("a"), big, video_sample("b")])
    errors = Errors()
    tracemalloc.start()
    try:
        raw = list(read_shard(str(path), errors, Limits(max_member_mb=1)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # the 24 MiB member never entered memory
    assert [r["__key__"] for r in raw] == ["a", "big", "b"] and "txt" not in raw[1]
    kept = [validate(r, errors, set(), Limits(max_member_mb=1)) for r in raw]
    assert [s["__key__"] for s in kept if s is not None] == ["a", "b"]
    assert dict(errors.counts) == {"member_too_large": 1} and errors.examples["member_too_large"] == (
        "train-000000.tar:big"
    )
    keys, _ = stream_epoch([path], BUCKETS, limits=Limits(max_member_mb=1))
    assert keys == ["a", "b"]


def test_the_shard_writer_skips_decompression_bombs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.png").write_bytes(png())
    (src / "huge.png").write_bytes(bomb_png(20000, 20000))  # past Pillow's own bomb limit
    (src / "big.png").write_bytes(bomb_png(9000, 9000))  # under Pillow's limit, over max_pixels
    for name in ("ok", "huge", "big"):
        (src / f"{name}.txt").write_text(f"{name} image")
    index = write_shards(list_sources(src), tmp_path / "out", max_pixels=8192 * 8192)
    assert index["samples"] == 1
    assert sorted(s["source"] for s in index["skipped"]["too_many_pixels"]) == [
        str(src / "big.png"),
        str(src / "huge.png"),
    ]
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        assert sorted(tar.getnames()) == ["ok.json", "ok.png", "ok.txt"]


def test_the_default_max_pixels_refuses_nothing_pillow_would_decode():
    """The default is Pillow's own hard limit: a 108 MP still (a 100 MP camera's) passes the header
    check it failed under the old 8192² default; a square just past Pillow's limit does not."""
    assert DEFAULT_MAX_PIXELS == 2 * Image.MAX_IMAGE_PIXELS == 178_956_970
    camera = bomb_png(12000, 9000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # Pillow warns above half its limit
        with open_image(camera, DEFAULT_MAX_PIXELS) as im:
            assert im.size == (12000, 9000)
        meta = image_sample("camera", camera, width=12000, height=9000)["json"].encode()
        assert parse_meta(meta, DEFAULT_MAX_PIXELS)["width"] == 12000
        past = bomb_png(13378, 13378)  # 178,970,884 pixels
        with pytest.raises(MediaError, match="too_many_pixels"), open_image(past, DEFAULT_MAX_PIXELS):
            pass


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_pixels", 0),
        ("max_pixels", math.inf),
        ("max_member_mb", 0.0),
        ("max_member_mb", math.inf),
        ("max_sample_mb", 0.0),
        ("max_sample_mb", math.inf),  # int(inf * 2**20) raised in every shard: each one was bad_tar
        ("max_sample_mb", math.nan),
    ],
)
def test_limits_are_checked_at_start_up(tmp_path, field, value):
    write_tar(tmp_path / "train-000000.tar", [video_sample("a")])
    cfg = DataConfig(shards=str(tmp_path), buckets=BUCKETS, num_workers=0, **{field: value})
    with pytest.raises(ValueError, match=f"data.{field}=.*must be a finite number"):
        build_loader(cfg)
    with pytest.raises(ValueError, match=f"data.{field}="):
        Limits(**{field: value})  # used directly (data.encode, benchmarks) it is checked too


@pytest.mark.parametrize("option", ["--max-sample-mb", "--max-member-mb", "--max-pixels"])
def test_encode_refuses_an_infinite_limit_naming_the_option(tmp_path, capsys, option):
    from data.encode import main

    write_tar(tmp_path / "train-000000.tar", [video_sample("a")])
    (tmp_path / "b.json").write_text('{"fps": 8, "buckets": [[1, 32, 32, 1]]}')
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path), str(tmp_path / "out"), "--buckets", str(tmp_path / "b.json"), option, "inf"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: " in err and "'inf'" in err  # (an int option: "invalid int value")


def test_a_member_declaring_exabytes_ends_the_shard_at_once(tmp_path):
    """tarfile's stream reader steps over a member 10 KiB at a time even past the end of the data: a
    header declaring 2**70 bytes would spin for centuries. The reader steps in 1 MiB reads and stops
    at the end of the file."""
    good = video_sample("good")
    raw = io.BytesIO()
    write_tar(raw, [good])
    header = tarfile.TarInfo("huge.mp4")
    header.size = 2**70  # GNU base-256 size field
    data = raw.getvalue().rstrip(b"\0") + bytes(-len(raw.getvalue().rstrip(b"\0")) % 512)
    path = tmp_path / "train-000000.tar"
    path.write_bytes(data + header.tobuf(tarfile.GNU_FORMAT) + b"\0" * 4096)

    def too_slow(*_):
        raise TimeoutError("read_shard is still stepping over the huge member")

    old = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(30)
    try:
        errors = Errors()
        keys = [s["__key__"] for s in read_shard(str(path), errors)]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert keys == ["good"] and dict(errors.counts) == {"truncated_tar": 1}


def _member(tar: tarfile.TarFile, name: str, data: bytes, **pax) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.pax_headers = len(data), pax
    tar.addfile(info, io.BytesIO(data))


def _sample_members(tar: tarfile.TarFile, key: str, **extra: bytes) -> None:
    for ext, data in {**video_sample(key), **extra}.items():
        if ext != "__key__":
            _member(tar, f"{key}.{ext}", data if isinstance(data, bytes) else data.encode())


@pytest.mark.slow
def test_extended_headers_whole_samples_and_unknown_members_are_bounded(tmp_path):
    """Before any member is seen, tarfile reads a PAX header's or a GNU long name's whole payload; a
    sample could hold any number of members each under max_member_mb; a member of an extension no
    decoder reads was read anyway. With max_member_mb=1 none of the 40 MiB here enters memory."""
    mib = 2**20
    path = tmp_path / "train-000000.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        _sample_members(tar, "a")
        _member(tar, "pax.txt", b"abc", comment="x" * (40 * mib))  # a 3-byte member, a 40 MiB header
        _sample_members(tar, "pax")
        big = {ext: bytes(9 * mib // 10) for ext in ("mov", "mkv", "webm", "avi", "jpg", "png")}
        _sample_members(tar, "many", **big)  # 5.4 MiB in members of 0.9 MiB
        odd = {f"bin{i}": bytes(9 * mib // 10) for i in range(8)}
        _sample_members(tar, "odd", **odd)  # a good clip and 7.2 MiB nobody decodes
        _sample_members(tar, "b")
    gnu = tmp_path / "train-000001.tar"
    with tarfile.open(gnu, "w", format=tarfile.GNU_FORMAT) as tar:
        _member(tar, "long." + "x" * (40 * mib), b"abc")  # a GNU long-name header of 40 MiB
        _sample_members(tar, "long")
        _sample_members(tar, "c")
    limits, errors, raw = Limits(max_member_mb=1), Errors(), []
    tracemalloc.start()
    try:
        for shard in (path, gnu):
            for sample in read_shard(str(shard), errors, limits):
                unread = sorted(k for k, v in sample.items() if v is None)
                raw.append((sample["__key__"], sample.get("__error__", ("", "")), unread))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * mib, f"peak {peak / mib:.1f} MiB"
    assert [(key, why[0], unread) for key, why, unread in raw] == [
        ("a", "", []),
        ("pax", "member_too_large", []),
        ("many", "sample_too_large", []),
        ("odd", "", sorted(odd)),
        ("b", "", []),
        ("long", "member_too_large", []),
        ("c", "", []),
    ]
    assert raw[1][1][1].startswith("pax.txt: a PAX header of 4194") and "GNU long-name" in raw[5][1][1]
    keys, errors = stream_epoch([path, gnu], BUCKETS, limits=limits)
    assert keys == ["a", "b", "c", "odd"]
    assert dict(errors.counts) == {"member_too_large": 2, "sample_too_large": 1}
    roomier = config_limits(DataConfig(max_member_mb=1, max_sample_mb=8))  # data.max_sample_mb
    keys, errors = stream_epoch([path], BUCKETS, limits=roomier)
    assert keys == ["a", "b", "many", "odd"] and dict(errors.counts) == {"member_too_large": 1}


def _sparse_tar(tmp_path, fmt: str, version: str | None):
    """A shard made by GNU tar --sparse: ``good`` and ``then`` (real clips) around ``sparse`` (an mp4
    with 40 data runs between holes: a map past one block)."""
    import subprocess

    src = tmp_path / "src"
    src.mkdir()
    for key in ("good", "sparse", "then"):
        for ext, data in video_sample(key).items():
            if ext != "__key__":
                (src / f"{key}.{ext}").write_bytes(data if isinstance(data, bytes) else data.encode())
    with open(src / "sparse.mp4", "r+b") as f:
        for i in range(40):
            f.seek(i * 65536)
            f.write(b"run %02d" % i)
    tar = tmp_path / "train-000000.tar"
    versions = [f"--sparse-version={version}"] if version else []
    cmd = [
        "tar",
        "--sparse",
        *versions,
        f"--format={fmt}",
        "--sort=name",
        "-cf",
        str(tar),
        "-C",
        str(src),
        ".",
    ]
    subprocess.run(cmd, check=True)
    with tarfile.open(tar) as t:
        member = t.getmember("./sparse.mp4")
        assert len(member.sparse) >= 40  # really sparse, as tarfile reads it
        pax = "GNU.sparse.map" if version == "0.1" else "GNU.sparse.offset" if version == "0.0" else ""
        assert not pax or pax in member.pax_headers  # the PAX sparse format asked for
    return tar


@pytest.mark.parametrize("fmt,version", [("gnu", None), ("posix", "0.0"), ("posix", "0.1"), ("posix", "1.0")])
def test_sparse_members_are_refused_without_reading_their_maps(tmp_path, fmt, version):
    """GNU tar's --sparse (an 'S' header with extension blocks, or PAX GNU.sparse 0.0, 0.1, 1.0):
    tarfile keeps every block of the map in memory; no webdataset writer makes them, so they cost
    their sample."""
    tar = _sparse_tar(tmp_path, fmt, version)
    keys, errors = stream_epoch([tar], BUCKETS)
    assert keys == ["good", "then"] and dict(errors.counts) == {"unsupported_member": 1}
    assert errors.examples["unsupported_member"] == "train-000000.tar:sparse"


# Run by another CPython, which may lack PyAV, numpy and Pillow: the reader takes only these three
# constants from data.video, so they stand in for it; everything else is the real reader and tarfile.
_READ_SHARD = """
import json, sys, types
sys.path.insert(0, sys.argv[1])
video = types.ModuleType("data.video")
video.DEFAULT_MAX_PIXELS, video.IMAGE_EXTS, video.VIDEO_EXTS = json.loads(sys.argv[3])
sys.modules["data.video"] = video
from data.reader import read_shard

class Errors:
    reasons = []
    def add(self, reason, shard, key, detail="", sample=True):
        self.reasons.append(reason)

errors = Errors()
samples = [(s["__key__"], s.get("__error__", [""])[0]) for s in read_shard(sys.argv[2], errors)]
print(json.dumps({"samples": samples, "shard_errors": errors.reasons}))
"""


def _python_with_new_sparse_call() -> str | None:
    """An installed CPython whose tarfile calls ``_proc_gnusparse_00(next, raw_headers)`` (two
    arguments: the CVE-2024-6232 fix, in 3.13 and the 3.12.6 / 3.11.10 releases), if any."""
    import glob
    import os
    import shutil
    import subprocess
    import sys

    found = [shutil.which(f"python3.{minor}") for minor in range(11, 16)]
    found += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3")))
    probe = (
        "import inspect, tarfile as t; print(len(inspect.signature(t.TarInfo._proc_gnusparse_00).parameters))"
    )
    for exe in [sys.executable, *filter(None, found)]:
        proc = subprocess.run([exe, "-c", probe], capture_output=True, text=True, timeout=60)
        if proc.returncode == 0 and proc.stdout.strip() == "3":  # self, next, raw_headers
            return exe
    return None


@pytest.mark.slow
def test_a_pax_0_0_sparse_member_costs_one_sample_on_pythons_with_the_new_tarfile_call(tmp_path):
    """CPython releases with the CVE-2024-6232 fix pass ``_proc_gnusparse_00`` two arguments: an
    override taking three raised TypeError there, and the whole rest of the shard was lost (bad_tar)."""
    import json
    import os
    import subprocess

    from data.video import IMAGE_EXTS, VIDEO_EXTS

    exe = _python_with_new_sparse_call()
    if exe is None:
        pytest.skip("no installed CPython with the two-argument _proc_gnusparse_00")
    tar = _sparse_tar(tmp_path, "posix", "0.0")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    constants = json.dumps([DEFAULT_MAX_PIXELS, IMAGE_EXTS, VIDEO_EXTS])
    proc = subprocess.run([exe, "-c", _READ_SHARD, root, str(tar), constants], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == {
        "samples": [["good", ""], ["sparse", "unsupported_member"], ["then", ""]],
        "shard_errors": [],
    }
