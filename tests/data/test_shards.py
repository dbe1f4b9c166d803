import io
import json
import subprocess
import sys
import tarfile

import av
import numpy as np
import pytest

from data.shards import list_sources, sanitize_key, write_shards
from data.video import probe


def _decoded(mp4: bytes):
    with av.open(io.BytesIO(mp4)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _members(tar_path):
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.mark.slow
def test_round_trip_keeps_original_bytes_and_reports_bad_files(media_dir, tmp_path):
    out = tmp_path / "shards"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "data.shards",
            "write",
            str(media_dir),
            str(out),
            "--max-samples",
            "3",
            "--min-shards",
            "1",  # --max-samples alone decides here
            "--processes",
            "2",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    index = json.loads((out / "index.json").read_text())
    assert index["samples"] == 7 and len(index["shards"]) == 3  # 5 clips + 2 stills, 3 per shard
    assert sorted(index["skipped"]) == ["empty", "missing_caption", "undecodable"]
    assert sum(len(v) for v in index["skipped"].values()) == index["skipped_total"] == 4
    assert index["kinds"] == {"video": 5, "image": 2}
    members = {}
    for shard in index["shards"]:
        members.update(_members(out / shard["name"]))
    assert members["clip3.mp4"] == (media_dir / "clip3.mp4").read_bytes()  # never re-encoded
    meta = json.loads(members["clip3.json"])
    assert (meta["frames"], meta["fps"], meta["width"], meta["height"]) == (48, 12.0, 128, 72)
    assert meta == {**probe(members["clip3.mp4"], "mp4").to_dict(), "source": "clip3"}
    assert members["clip3.txt"].decode() == "clip number 3"
    assert "stills_a.png" in members and "stills_b.jpg" in members  # path separators sanitised


def test_manifest_with_clip_windows(media_dir, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        f"path,caption,start,end\n{media_dir}/clip3.mp4,first part,0,1.5\n"
        f"{media_dir}/clip3.mp4,second part,1.5,\n{media_dir}/missing.mp4,gone,,\n"
    )
    index = write_shards(list_sources(manifest), tmp_path / "out")
    assert index["samples"] == 2 and list(index["skipped"]) == ["unreadable"]
    members = _members(tmp_path / "out" / index["shards"][0]["name"])
    metas = [json.loads(v) for k, v in members.items() if k.endswith(".json")]
    assert sorted((m["start"], m["end"]) for m in metas) == [(0.0, 1.5), (1.5, pytest.approx(4.0, abs=0.1))]
    assert all("." not in k.split(".", 1)[0] for k in members)  # keys carry no extra dots


def test_shard_size_limit_by_megabytes(media_dir, tmp_path):
    index = write_shards(list_sources(media_dir), tmp_path / "out", max_samples=1000, max_mb=0.01)
    assert len(index["shards"]) > 1 and index["samples"] == 7


@pytest.mark.parametrize(
    "name,key",
    [("a/b/../c.d", "a_b_c_d"), ("../../etc/passwd", "etc_passwd"), ("x y.z", "x_y_z"), ("..", "sample")],
)
def test_keys_are_sanitised(name, key):
    assert sanitize_key(name) == key


def test_synthetic_dataset_is_deterministic_and_described(tmp_path):
    from data.synthetic import generate

    a = generate(tmp_path / "a", num=12, seed=3, val_num=2, samples_per_shard=5)
    b = generate(tmp_path / "b", num=12, seed=3, samples_per_shard=5)
    generate(tmp_path / "c", num=12, seed=4, samples_per_shard=5)
    assert a["samples"] == 12 and (tmp_path / "a" / "val-000000.tar").exists()
    for sa, sb in zip(a["shards"], b["shards"], strict=True):
        ma, mb = _members(tmp_path / "a" / sa["name"]), _members(tmp_path / "b" / sb["name"])
        assert ma.keys() == mb.keys()
        for name in ma:  # x264 bitstreams may differ in a few bytes; the pictures may not
            if name.endswith(".mp4"):
                assert np.array_equal(_decoded(ma[name]), _decoded(mb[name])), name
            else:
                assert ma[name] == mb[name], name
    assert (tmp_path / "a" / "train-000000.tar").read_bytes() != (
        tmp_path / "c" / "train-000000.tar"
    ).read_bytes()
    members = {}
    for s in a["shards"]:
        members.update(_members(tmp_path / "a" / s["name"]))
    captions = [v.decode() for k, v in members.items() if k.endswith(".txt")]
    metas = [json.loads(v) for k, v in members.items() if k.endswith(".json")]
    assert all(" on a " in c and c.startswith("a ") for c in captions)
    assert any(" moves " in c for c in captions)
    videos = [m for m in metas if m["kind"] == "video"]
    assert videos and all(
        m["codec"] == "h264" and 8 <= m["frames"] <= 48 and 8 <= m["fps"] <= 30 for m in videos
    )


def test_synthetic_motion_matches_its_caption(tmp_path):
    from data.synthetic import COLOURS, describe, render

    for i in range(20):
        rng = np.random.default_rng([0, i])
        spec = describe(rng, still=False)
        frames = render(spec, rng).astype(int)
        fg = np.array(COLOURS[spec["colour"]])
        ys, xs = [], []
        for f in (0, len(frames) - 1):
            mask = np.abs(frames[f] - fg).sum(-1) < 10
            yy, xx = np.nonzero(mask)
            ys.append(yy.mean())
            xs.append(xx.mean())
        moved = {
            "from left to right": xs[1] > xs[0],
            "from right to left": xs[1] < xs[0],
            "from top to bottom": ys[1] > ys[0],
            "from bottom to top": ys[1] < ys[0],
        }
        assert moved[spec["direction"]], spec
