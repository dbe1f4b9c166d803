"""One bad sample costs one sample: every failure to check or decode it is a counted skip (with shard,
key and reason), never an exception out of the stream; the sidecar json has one schema."""

import io
import json
import subprocess
import tarfile

import numpy as np
import pytest

from data.buckets import Bucket, BucketConfig, assign, clip_start
from data.meta import MetaError, parse_meta
from data.stream import Errors, validate
from tests.data.conftest import (
    audio_only_mp4,
    image_sample,
    png,
    stream_epoch,
    video_sample,
    write_tar,
)

BUCKETS = BucketConfig([Bucket(4, 32, 32, 1), Bucket(1, 32, 32, 1)], fps=8)
BASE = {"kind": "video", "frames": 8, "fps": 8.0, "width": 32, "height": 32, "duration": 1.0}
DROP = object()  # a field left out


def _json(**fields) -> bytes:
    """BASE with ``fields`` replaced (a value ``RAW:text`` is written as the literal JSON ``text``)."""
    meta = {**BASE, **fields}
    text = json.dumps({k: v for k, v in meta.items() if v is not DROP})
    for v in meta.values():
        if isinstance(v, str) and v.startswith("RAW:"):
            text = text.replace(json.dumps(v), v[4:])
    return text.encode()


DEEP = b"[" * 100_000 + b"]" * 100_000
BAD_JSON = {
    "frames_abc": _json(frames="abc"),
    "frames_nan": _json(frames="RAW:NaN"),
    "frames_1e400": _json(frames="RAW:1e400"),
    "frames_negative": _json(frames=-3),
    "frames_fraction": _json(frames=2.5),
    "frames_bool": _json(frames=True),
    "fps_fast": _json(fps="fast"),
    "fps_negative": _json(fps=-8),
    "fps_inf": _json(fps="RAW:Infinity"),
    "width_zero": _json(width=0),
    "height_zero": _json(height=0),
    "width_negative": _json(width=-32),
    "height_huge": _json(height=10**12),
    "width_string": _json(width="32"),
    "duration_string": _json(duration="long"),
    "start_string": _json(start="0.5"),
    "end_list": _json(end=[1]),
    "bucket_number": _json(bucket=5),
    "bucket_garbage": _json(bucket="axbxc"),
    "label_string": _json(label="cat"),
    "label_negative": _json(label=-1),
    "label_fraction": _json(label=1.5),
    "kind_audio": _json(kind="audio"),
    "kind_missing": _json(kind=DROP),
    "width_missing": _json(width=DROP),
    "nested_100k_deep": DEEP,
    "nested_field": _json(source="RAW:" + DEEP.decode()),
    "not_utf8": _json(source="cafe").replace(b"cafe", b"caf\xe9"),  # latin-1 bytes
    "not_an_object": b"[1, 2, 3]",
    "a_number": b"5",
    "null": b"null",
    "empty": b"",
    "truncated": _json()[:20],
}


def test_the_not_utf8_case_really_is_not_utf8():
    with pytest.raises(UnicodeDecodeError):
        BAD_JSON["not_utf8"].decode("utf-8")


@pytest.mark.parametrize("name", sorted(BAD_JSON))
def test_each_bad_sidecar_json_is_one_counted_skip(name):
    sample = {**video_sample("k"), "__key__": name, "__shard__": "s.tar", "json": BAD_JSON[name]}
    sample["txt"] = sample["txt"].encode()
    errors = Errors()
    assert validate(sample, errors, set()) is None
    assert dict(errors.counts) == {"bad_metadata": 1} and errors.skipped_samples == 1
    assert errors.examples["bad_metadata"] == f"s.tar:{name}"


def test_schema_gives_downstream_clean_typed_values():
    meta = parse_meta(_json(frames=24.0, fps=30, start=0, end=2, label=3, extra={"a": 1}), 10**6)
    assert meta == {**BASE, "frames": 24, "fps": 30.0, "start": 0.0, "end": 2.0, "label": 3}
    assert type(meta["frames"]) is int and type(meta["fps"]) is float and "extra" not in meta
    a = assign(meta, BucketConfig([Bucket(4, 32, 32, 1)], fps=8))
    assert a is not None and 0.0 <= clip_start(a, 0.99) <= 2.0
    with pytest.raises(MetaError, match="too_many_pixels"):
        parse_meta(_json(width=100_000, height=100_000), 8192 * 8192)


def test_the_stream_survives_every_bad_json_and_counts_each(tmp_path):
    bad = [{**video_sample(name), "json": raw} for name, raw in BAD_JSON.items()]
    good = [video_sample("good0"), video_sample("good1")]
    write_tar(tmp_path / "train-000000.tar", good[:1] + bad + good[1:])
    keys, errors = stream_epoch([tmp_path / "train-000000.tar"], BUCKETS)
    assert keys == ["good0", "good1"]
    assert dict(errors.counts) == {"bad_metadata": len(BAD_JSON)}


def _truncated_png() -> bytes:
    data = png(64, 64, 7)
    return data[: len(data) // 2]


def test_bad_media_and_captions_each_cost_one_sample(tmp_path):
    audio = video_sample("audio_only")
    audio["mp4"] = audio_only_mp4()
    latin1 = video_sample("latin1_caption")
    latin1["txt"] = "café".encode("latin-1")
    samples = [
        video_sample("good0"),
        audio,  # IndexError in PyAV's streams.video[0]
        image_sample("garbage_png", b"\x89PNG not really" * 20),  # UnidentifiedImageError
        image_sample("truncated_png", _truncated_png()),  # OSError at load
        latin1,  # UnicodeDecodeError
        image_sample("still", png()),
        video_sample("good1"),
    ]
    write_tar(tmp_path / "train-000000.tar", samples)
    keys, errors = stream_epoch([tmp_path / "train-000000.tar"], BUCKETS)
    assert keys == ["good0", "good1", "still"]
    assert dict(errors.counts) == {"no_video_stream": 1, "undecodable": 2, "bad_caption": 1}
    assert errors.examples["bad_caption"] == "train-000000.tar:latin1_caption"
    assert errors.seen == 7 and errors.skipped_samples == 4


def _tar_with_members(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_same_basename_in_two_directories_is_two_samples_not_one(tmp_path):
    k, good, other = video_sample("k"), video_sample("good"), video_sample("a__k")
    _tar_with_members(
        tmp_path / "train-000000.tar",
        {
            "a/k.mp4": k["mp4"],
            "a/k.json": k["json"].encode(),
            "c/k.txt": b"a caption from another directory",
            "c/k.json": k["json"].encode(),
            "./good.mp4": good["mp4"],  # what `tar -C dir -cf x.tar .` writes: the same key as good
            "good.json": good["json"].encode(),
            "good.txt": b"a clip",
            "a__k.mp4": other["mp4"],  # another path, the same key as a/k
            "a__k.json": other["json"].encode(),
            "a__k.txt": b"a clip",
        },
    )
    keys, errors = stream_epoch([tmp_path / "train-000000.tar"], BUCKETS)
    assert keys == ["good"]  # a/k's video was never paired with c/k's caption
    assert dict(errors.counts) == {"missing_caption": 1, "missing_media": 1, "duplicate_key": 1}
    assert errors.examples["missing_caption"] == "train-000000.tar:a__k"
    assert errors.examples["missing_media"] == "train-000000.tar:c__k"


def test_samples_under_a_directory_load_with_the_path_in_their_keys(tmp_path):
    """``tar --sort=name -cf x.tar imgs/`` and ``… -C dir -cf x.tar .`` (the real GNU tar; sorted, as
    webdataset needs a sample's members together) make valid shards: the directories are part of each
    key, joined by ``__``."""
    src = tmp_path / "src"
    (src / "imgs").mkdir(parents=True)
    (src / "clips" / "b").mkdir(parents=True)
    for i in (1, 2):
        sample = image_sample(f"k{i}", png(value=40 * i))
        for ext in ("png", "json", "txt"):
            data = sample[ext]
            (src / "imgs" / f"k{i}.{ext}").write_bytes(data if isinstance(data, bytes) else data.encode())
    clip = video_sample("c")
    for ext in ("mp4", "json", "txt"):
        data = clip[ext]
        (src / "clips" / "b" / f"c.{ext}").write_bytes(data if isinstance(data, bytes) else data.encode())
    tar = ["tar", "--sort=name", "-cf"]
    subprocess.run([*tar, str(tmp_path / "train-000000.tar"), "imgs/"], cwd=src, check=True)
    subprocess.run([*tar, str(tmp_path / "train-000001.tar"), "-C", str(src), "."], check=True)
    keys, errors = stream_epoch([tmp_path / "train-000000.tar"], BUCKETS)
    assert keys == ["imgs__k1", "imgs__k2"] and dict(errors.counts) == {}
    keys, errors = stream_epoch([tmp_path / "train-000001.tar"], BUCKETS)
    assert keys == ["clips__b__c", "imgs__k1", "imgs__k2"] and dict(errors.counts) == {}


@pytest.mark.parametrize("path", ["../x", "/abs/x", "a//x", "a/../x", "a/.hidden/x", "./../x", "x y/k"])
def test_paths_with_no_safe_key_are_unsafe_key(tmp_path, path):
    k, good = video_sample("k"), video_sample("good")
    members = {f"{path}.mp4": k["mp4"], f"{path}.json": k["json"].encode(), f"{path}.txt": b"a clip"}
    members.update({"good.mp4": good["mp4"], "good.json": good["json"].encode(), "good.txt": b"a clip"})
    _tar_with_members(tmp_path / "train-000000.tar", members)
    keys, errors = stream_epoch([tmp_path / "train-000000.tar"], BUCKETS)
    assert keys == ["good"] and dict(errors.counts) == {"unsafe_key": 1}
    assert errors.seen == 2 and errors.skipped_samples == 1


def test_member_names_that_could_overwrite_sample_fields_are_refused(tmp_path):
    good = video_sample("good")
    _tar_with_members(
        tmp_path / "train-000000.tar",
        {
            "good.mp4": good["mp4"],
            "good.__key__": b"../../etc/passwd",
            "good.json": good["json"].encode(),
            "good.txt": b"a clip",
            "noext": b"x",
            "dot.": b"x",
        },
    )
    keys, errors = stream_epoch([tmp_path / "train-000000.tar"], BUCKETS)
    assert keys == ["good"] and dict(errors.counts) == {"bad_member_name": 3}
    assert errors.seen == 1 and errors.skipped_samples == 0  # stray members are not samples


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def _npy_claiming(shape: tuple[int, ...]) -> bytes:
    """A .npy whose header declares ``shape`` float32 but that holds 16 bytes of data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue() + bytes(16)


def _latent(key: str, latent=None, text=None, mask=None, **meta) -> dict:
    """A latent-shard sample of bucket 8x32x32 (4×2×4×4 latent, 5×8 text states, as ``data.encode``
    writes it); arrays given as ndarrays are saved, bytes are used as they are, and ``meta`` fields
    override (None drops one)."""
    arrays = {
        "latent.npy": np.zeros((4, 2, 4, 4), np.float32) if latent is None else latent,
        "text.npy": np.ones((5, 8), np.float32) if text is None else text,
        "text_mask.npy": np.ones(5, bool) if mask is None else mask,
    }
    fields = {**BASE, "bucket": "8x32x32", "latent_shape": [4, 2, 4, 4], "text_shape": [5, 8], **meta}
    sample = {"__key__": key, "json": json.dumps({k: v for k, v in fields.items() if v is not None})}
    sample.update({ext: a if isinstance(a, bytes) else _npy(a) for ext, a in arrays.items()})
    return {**sample, "txt": "x"}


def test_latent_arrays_that_lie_or_disagree_cost_their_sample(tmp_path):
    write_tar(
        tmp_path / "train-000000.tar",
        [
            _latent("k0"),
            _latent("wide", np.zeros((4, 2, 4, 8), np.float32)),  # not the shape its json declares
            _latent(
                "liar", text=_npy_claiming((2**20, 2**20)), text_shape=None
            ),  # 4 TiB: numpy allocates first
            _latent("pickled", np.array([{"i": f"{i:040d}"} for i in range(128)]).reshape(4, 2, 4, 4)),
            _latent("k1", np.ones((4, 2, 4, 4), np.float32)),
        ],
    )
    keys, errors = stream_epoch(
        [tmp_path / "train-000000.tar"], BucketConfig([Bucket(8, 32, 32, 5)], fps=8), shuffle_buffer=0
    )
    assert keys == ["k0", "k1"]
    assert dict(errors.counts) == {"shape_mismatch": 1, "bad_array": 2}
    assert errors.examples["shape_mismatch"] == "train-000000.tar:wide"


def test_each_latent_is_held_to_its_bucket_even_alone_in_its_batch(tmp_path):
    """With batch size 1 there is nothing to compare with: the json's latent_shape must be a codec's
    latent of the bucket, the array must be that shape, and the text states their declared L×D."""
    f32 = np.float32
    samples = [
        _latent("good"),
        _latent("huge", np.zeros((16, 5, 64, 64), f32), latent_shape=[16, 5, 64, 64]),  # h, w > the bucket's
        _latent("stretched", np.zeros((4, 2, 4, 8), f32), latent_shape=[4, 2, 4, 8]),  # 8× tall, 4× wide
        _latent("long", np.zeros((4, 9, 4, 4), f32), latent_shape=[4, 9, 4, 4]),  # 9 latent frames of 8
        _latent("flat", np.zeros((4, 4, 4), f32), latent_shape=[4, 4, 4]),
        _latent("liar", np.zeros((4, 2, 8, 8), f32)),  # declares 4×2×4×4
        _latent("channels", np.zeros((6, 2, 4, 4), f32)),
        _latent("text_width", text=np.ones((5, 16), f32)),  # declares 5×8
        _latent("text_3d", text=np.ones((1, 5, 8), f32), text_shape=None),  # nothing declared: L×D
        _latent("mask_length", mask=np.ones(6, bool)),
        _latent("undeclared", latent_shape=None),
        _latent("good2", text=np.ones((7, 8), f32), mask=np.ones(7, bool), text_shape=None),
    ]
    write_tar(tmp_path / "train-000000.tar", samples)
    keys, errors = stream_epoch(
        [tmp_path / "train-000000.tar"], BucketConfig([Bucket(8, 32, 32, 1)], fps=8), shuffle_buffer=0
    )
    assert keys == ["good", "good2"]
    assert dict(errors.counts) == {"shape_mismatch": 9, "bad_metadata": 1}
    assert errors.seen == 12 and errors.skipped_samples == 10


def _rate_epoch(tmp_path, shards: list[list[dict] | bytes]) -> tuple[list[str], Errors]:
    """One epoch with the default 5% threshold from the 4th sample on; a shard is samples or raw bytes."""
    from data.stream import StreamSpec, batches

    paths = []
    tmp_path.mkdir(exist_ok=True)
    for i, shard in enumerate(shards):
        paths.append(str(tmp_path / f"train-{i:06d}.tar"))
        if isinstance(shard, bytes):
            (tmp_path / f"train-{i:06d}.tar").write_bytes(shard)
        else:
            write_tar(paths[-1], shard)
    spec = StreamSpec(paths, BUCKETS, 0, 0, (0,), shuffle_buffer=0, min_samples_for_threshold=4)
    errors = Errors()
    keys = [k for _, b in batches(spec, errors) if b is not None for k in b.key]
    return keys, errors


def test_broken_shards_do_not_count_toward_the_per_sample_error_rate(tmp_path):
    import gzip

    good = [[image_sample(f"s{i}_{j}", png()) for j in range(3)] for i in range(4)]
    raw = io.BytesIO()
    write_tar(raw, [image_sample("lost", png())])
    shards = [good[0], gzip.compress(raw.getvalue()), good[1], raw.getvalue()[:700], good[2], good[3]]
    keys, errors = _rate_epoch(tmp_path, shards)  # 2 of 6 shards broken, no sample skipped
    assert len(keys) == 12 and errors.seen == 12 and errors.skipped_samples == 0
    assert dict(errors.counts) == {"compressed_tar": 1, "truncated_tar": 1}
    bad = [*good[0][:2], image_sample("broken", b"\x89PNG not really"), *good[1]]
    # 1 skipped of 4 samples still trips it
    with pytest.raises(RuntimeError, match=r"error rate 25\.0% over 4 samples"):
        _rate_epoch(tmp_path / "bad", [bad])


def _loader_epoch(tmp_path, shards: list[list[dict] | bytes], workers: int = 2) -> tuple[list[str], dict]:
    """Keys of epoch 0 of a real loader (its workers, the default 5% threshold) and its error summary."""
    from data.pipeline import DataConfig, build_loader

    tmp_path.mkdir()
    for i, shard in enumerate(shards):
        path = tmp_path / f"train-{i:06d}.tar"
        path.write_bytes(shard) if isinstance(shard, bytes) else write_tar(path, shard)
    cfg = DataConfig(shards=str(tmp_path), buckets=BUCKETS, num_workers=workers, shuffle_buffer=0)
    loader, keys = build_loader(cfg), []
    for batch in loader:
        if loader.epoch > 0:
            break
        keys += batch.key
    loader.errors = {}  # epoch 0 only (its summaries are in errors_before once epoch 1 began)
    return sorted(keys), loader.error_summary()


def _gzipped(samples: list[dict]) -> bytes:
    import gzip

    raw = io.BytesIO()
    write_tar(raw, samples)
    return gzip.compress(raw.getvalue())


def test_a_loader_aborts_when_many_of_its_shards_are_lost_naming_them(tmp_path):
    """Refused and broken shards are not samples, so the per-sample rate cannot see them: half the
    shards compressed meant training on half the data, only warned. The shards have their own rate."""
    shards = [[image_sample(f"s{i}_{j}", png()) for j in range(2)] for i in range(8)]
    half = [_gzipped(s) if i % 2 else s for i, s in enumerate(shards)]
    with pytest.raises(RuntimeError, match=r"data shard error rate .* exceeds data.error_threshold=5%") as e:
        _loader_epoch(tmp_path / "half", half)
    named = {f"train-{i:06d}.tar (compressed_tar)" for i in (1, 3, 5, 7)}
    assert sum(name in str(e.value) for name in named) >= 2  # those seen when it stopped, by name
    assert "train-000000.tar" not in str(e.value)
    one = [_gzipped(s) if i == 5 else s for i, s in enumerate(shards)]  # one lost shard: reported
    keys, summary = _loader_epoch(tmp_path / "one", one)
    assert len(keys) == 14 and summary["skipped"] == {"compressed_tar": 1}
    assert (summary["shards"], summary["shards_lost"]) == (8, 1)


def test_latents_are_held_to_what_the_model_takes_even_alone_in_their_batch(tmp_path, caplog):
    """Each of these agrees with its own json and with its bucket, so without an expectation it is
    delivered, alone in its batch, and the model fails on it; with one it costs one sample, named."""
    from data.buckets import Compression
    from data.pipeline import DataConfig, build_loader
    from data.stream import Expect

    f32 = np.float32
    foreign = {  # key → the sample, and what its skip names
        "channels": (_latent("channels", np.zeros((16, 2, 4, 4), f32), latent_shape=[16, 2, 4, 4]), "C=16"),
        "frames": (_latent("frames", np.zeros((4, 8, 4, 4), f32), latent_shape=[4, 8, 4, 4]), "t=8"),
        "spatial": (_latent("spatial", np.zeros((4, 2, 2, 2), f32), latent_shape=[4, 2, 2, 2]), "h=2"),
        "text": (_latent("text", text=np.ones((5, 16), f32), text_shape=[5, 16]), "text width 16"),
        "text_undeclared": (
            _latent("text_undeclared", text=np.ones((5, 16), f32), text_shape=None),
            "(5, 16)",
        ),
    }
    good = [_latent("good"), _latent("good2", np.ones((4, 2, 4, 4), f32))]
    write_tar(tmp_path / "train-000000.tar", [good[0], *(s for s, _ in foreign.values()), good[1]])
    buckets = BucketConfig([Bucket(8, 32, 32, 1)], fps=8)
    cfg = DataConfig(shards=str(tmp_path), buckets=buckets, num_workers=0, shuffle_buffer=0)

    def epoch(expect):
        loader, keys = build_loader(cfg, expect=expect), []
        for batch in loader:
            if loader.epoch > 0:
                break
            keys += batch.key
        return sorted(keys), loader.errors_before[0]

    keys, _ = epoch(None)
    assert keys == sorted(["good", "good2", *foreign])  # each agrees with its json and its bucket
    expect = Expect(channels=4, compression=Compression(4, 8, causal=True), text_dim=8)  # 8x32x32 → 4×2×4×4
    caplog.clear()
    keys, summary = epoch(expect)
    assert keys == ["good", "good2"] and summary["skipped"] == {"shape_mismatch": 5}
    assert summary["seen"] == 7 and summary["skipped_samples"] == 5
    skips = {r.args[0]: r.args[-1] for r in caplog.records if r.msg.startswith("skipping")}
    for key, (_, named) in foreign.items():
        assert named in skips[key], (key, skips[key])  # the skip names what differs
