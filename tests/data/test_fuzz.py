"""Seeded fuzzing of the shard reader, the sample checks, decoding and the loader.

Valid shards of real tiny media (H.264 clips, PNGs, captions, sidecar json) are corrupted at random:
truncated, bit-flipped, gzip-wrapped, json fields given wrong types or ranges, members renamed to odd
names (``../x``, dots, unicode, bytes that are not UTF-8, ``__key__``), reordered, joined by
directories, links and members with huge declared sizes. Reading them must never raise, and every
sample read ends delivered, skipped (counted) or filtered: ``seen = delivered + skipped + filtered``.
"""

import gzip
import io
import json
import tarfile

import numpy as np
import pytest

from data.buckets import Bucket, BucketConfig
from data.pipeline import DataConfig, build_loader
from data.reader import Limits
from data.stream import Errors, StreamSpec, batches
from data.video import encode_h264
from tests.data.conftest import gradient_clip, png

BUCKETS = BucketConfig([Bucket(4, 32, 32, 1), Bucket(1, 32, 32, 1)], fps=8)
LIMITS = Limits(max_pixels=256 * 256, max_member_mb=0.5)
CASES = 300
ODD_NAMES = [
    "../x",
    "../../etc/passwd",
    "/abs/k",
    "a/b/k",
    "./k",
    ".hidden",
    "k..x",
    "k.",
    "ключ",
    "k\udcff",  # a byte that is not UTF-8
    "k k",
    "x" * 300,
    "__key__",
    "k.__key__",
    "k.__shard__",
    "",
]
ODD_VALUES = ["abc", -1, 0, 2.5, True, None, [], {}, "RAW:NaN", "RAW:1e400", "RAW:-Infinity", 10**30, ""]


@pytest.fixture(scope="module")
def members() -> list[tuple[str, bytes]]:
    """The members of a valid shard: 3 clips and 2 stills with captions and json."""
    out = []
    for i, frames in enumerate((8, 12, 16)):
        meta = {"kind": "video", "frames": frames, "fps": 8.0, "width": 32, "height": 32}
        meta["duration"] = frames / 8
        out += [
            (f"clip{i}.mp4", encode_h264(gradient_clip(frames, 32, 32, seed=i), fps=8)),
            (f"clip{i}.json", json.dumps(meta).encode()),
            (f"clip{i}.txt", f"clip {i}".encode()),
        ]
    for i in range(2):
        meta = {"kind": "image", "frames": 1, "fps": 0.0, "width": 32, "height": 32}
        out += [
            (f"still{i}.png", png(32, 32, 50 + 100 * i)),
            (f"still{i}.json", json.dumps(meta).encode()),
            (f"still{i}.txt", f"still {i}".encode()),
        ]
    return out


def _tar(entries) -> bytes:
    """A tar of ``(name, data, kind)``; kind: file, dir, symlink, hardlink or huge (a header
    declaring 100 GB followed by a few bytes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data, kind in entries:
            info = tarfile.TarInfo(name)
            if kind == "huge":
                info.size = 100 * 2**30
                buf.write(info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape") + data)
                return buf.getvalue()  # nothing can follow a member that never ends
            if kind == "file":
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}[
                    kind
                ]
                info.linkname = "/etc/passwd"
                tar.addfile(info)
    return buf.getvalue()


def _odd_json(rng: np.random.Generator, data: bytes) -> bytes:
    try:
        meta = json.loads(data)
    except ValueError:  # already garbled by an earlier edit
        return data
    field = str(rng.choice(["kind", "frames", "fps", "width", "height", "duration", "start", "end", "label"]))
    value = ODD_VALUES[int(rng.integers(len(ODD_VALUES)))]
    meta[field] = value
    text = json.dumps(meta)
    if isinstance(value, str) and value.startswith("RAW:"):
        text = text.replace(json.dumps(value), value[4:])
    return text.encode()


def _corrupt(rng: np.random.Generator, members: list[tuple[str, bytes]]) -> bytes:
    """One corrupted shard: a few random edits of the members, then maybe of the tar bytes."""
    entries = [(name, data, "file") for name, data in members]
    for _ in range(int(rng.integers(1, 4))):
        i = int(rng.integers(len(entries)))
        name, data, kind = entries[i]
        edit = int(rng.integers(8))
        if edit == 0 and name.endswith(".json"):
            entries[i] = (name, _odd_json(rng, data), kind)
        elif edit == 1:  # rename: the key, or the extension
            odd = ODD_NAMES[int(rng.integers(len(ODD_NAMES)))]
            entries[i] = (odd + name[name.find(".") :] if rng.random() < 0.7 else odd, data, kind)
        elif edit == 2:  # garble the media or text bytes
            noise = rng.integers(0, 256, size=int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
            at = int(rng.integers(len(data) + 1))
            entries[i] = (name, data[:at] + noise + data[at + len(noise) :], kind)
        elif edit == 3:
            entries.insert(i, (f"dir{i}", b"", str(rng.choice(["dir", "symlink", "hardlink"]))))
        elif edit == 4:
            entries.insert(i, (name, b"\x00" * 1024, "huge"))
        elif edit == 5:  # over max_member_mb
            entries[i] = (name, data + b"\x00" * (LIMITS.max_member_bytes + 1), kind)
        elif edit == 6 and i + 1 < len(entries):  # out of order: splits a sample in two
            entries[i], entries[i + 1] = entries[i + 1], entries[i]
        else:
            entries[i] = (name, data[: int(rng.integers(len(data) + 1))], kind)
    raw = bytearray(_tar(entries))
    tail = int(rng.integers(4))
    if tail == 0:
        return bytes(raw[: int(rng.integers(len(raw) + 1))])
    if tail == 1:
        for at in rng.integers(0, len(raw), size=int(rng.integers(1, 16))):
            raw[at] ^= 1 << int(rng.integers(8))
    if tail == 2 and rng.random() < 0.3:
        return gzip.compress(bytes(raw))
    return bytes(raw)


def _epoch(paths, limits=LIMITS) -> tuple[int, Errors]:
    spec = StreamSpec(
        shards=[str(p) for p in paths],
        buckets=BUCKETS,
        seed=0,
        epoch=0,
        stream_id=(0,),
        shuffle_buffer=4,
        error_threshold=float("inf"),
        limits=limits,
    )
    errors, delivered = Errors(), 0
    for _, batch in batches(spec, errors):
        if batch is not None:
            b = BUCKETS.buckets[0] if batch.bucket == "4x32x32" else BUCKETS.buckets[1]
            assert batch.video.shape[1:] == (3, b.frames, 32, 32)
            assert bool(batch.video.isfinite().all()) and batch.video.abs().max() <= 1.0
            delivered += len(batch.key)
    return delivered, errors


def test_valid_shard_delivers_everything(tmp_path, members):
    (tmp_path / "ok.tar").write_bytes(_tar([(n, d, "file") for n, d in members]))
    delivered, errors = _epoch([tmp_path / "ok.tar"])
    assert (delivered, errors.seen, errors.total(), sum(errors.filtered.values())) == (5, 5, 0, 0)


@pytest.mark.slow
def test_corrupted_shards_never_raise_and_every_sample_is_accounted_for(tmp_path, members):
    rng = np.random.default_rng(1234)
    reasons: set[str] = set()
    for case in range(CASES):
        path = tmp_path / f"case{case}.tar"
        path.write_bytes(_corrupt(rng, members))
        delivered, errors = _epoch([path])
        filtered = sum(errors.filtered.values())
        assert errors.seen == delivered + errors.skipped_samples + filtered, (case, errors.summary())
        assert delivered <= 5
        reasons |= set(errors.counts)
    # the fuzzer reached the failure modes it is meant to (a guard against a fuzzer that tests nothing)
    assert {"truncated_tar", "unsafe_key", "bad_metadata", "bad_member_name", "member_too_large"} <= reasons
    assert {"compressed_tar", "undecodable", "duplicate_key"} & reasons


def test_the_loader_survives_a_directory_of_corrupted_shards(tmp_path, members):
    rng = np.random.default_rng(99)
    (tmp_path / "train-000000.tar").write_bytes(_tar([(n, d, "file") for n, d in members]))
    for i in range(1, 13):
        (tmp_path / f"train-{i:06d}.tar").write_bytes(_corrupt(rng, members))
    cfg = DataConfig(
        shards=str(tmp_path),
        buckets=BUCKETS,
        num_workers=2,
        shuffle_buffer=4,
        error_threshold=1.0,
        max_pixels=LIMITS.max_pixels,
        max_member_mb=LIMITS.max_member_mb,
    )
    loader = build_loader(cfg)
    delivered = 0
    for batch in loader:
        if loader.epoch > 0:
            break
        delivered += len(batch.key)
    done = {"seen": 0, "skipped_samples": 0, "filtered": 0}
    for summary in loader.errors_before:  # epoch 0 exactly
        done["seen"] += summary["seen"]
        done["skipped_samples"] += summary["skipped_samples"]
        done["filtered"] += sum(summary["filtered"].values())
    assert delivered >= 5  # the intact shard, at least
    assert done["seen"] == delivered + done["skipped_samples"] + done["filtered"]
