"""``python -m data.buckets suggest SHARDS``: a bucket file made from the shards' own clips, that the
trainer's checks accept for the codec and patch, that takes every clip long enough for any bucket and
keeps ``batch × tokens`` within the budget. Real H.264 clips of three shapes (landscape, portrait and
square, 8 and 24 fps, 3 to 30 frames) and a still, through the real shard writer."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from data.buckets import Bucket, BucketConfig, assign, check_bucket, latent_tokens, load_bucket_file
from data.buckets import main as buckets_main
from data.encoders import codec_geometry
from data.meta import parse_meta
from data.reader import read_shard
from data.shards import list_sources, write_shards
from data.stream import Errors
from data.video import encode_h264
from tests.data.conftest import gradient_clip, write_tar

# (frames, height, width, fps): 4:3, 3:4 and 1:1 clips of several lengths; "short" is under 2 frames at
# 8 fps for a causal 4x codec (it needs 5) but long enough for the pixel codec with a 2-frame patch
CLIPS = {
    "land12": (12, 48, 64, 8),
    "land16": (16, 48, 64, 8),
    "land24": (24, 48, 64, 8),
    "land30": (30, 48, 64, 24),  # 24 fps: 10 frames at 8 fps
    "port20": (20, 64, 48, 8),
    "port9": (9, 64, 48, 8),
    "square17": (17, 64, 64, 8),
    "short": (3, 48, 64, 8),
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    src = tmp_path_factory.mktemp("clips")
    for i, (key, (t, h, w, fps)) in enumerate(CLIPS.items()):
        (src / f"{key}.mp4").write_bytes(encode_h264(gradient_clip(t, h, w, seed=i), fps))
        (src / f"{key}.txt").write_text(f"clip {key}")
    Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(src / "still.png")
    (src / "still.txt").write_text("a still")
    out = tmp_path_factory.mktemp("shards")
    write_shards(list_sources(src), out, min_shards=3)
    return out


def metas(shards) -> dict[str, dict]:
    out = {}
    for tar in sorted(shards.glob("train-*.tar")):
        for s in read_shard(tar, Errors()):
            out[s["__key__"]] = parse_meta(s["json"], 1 << 30)
    return out


def suggest(capsys, *argv) -> tuple[int, str, str]:
    code = buckets_main(["suggest", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def dry_run_errors(shards, bucket_file, codec: str, patch: str, channels: int) -> list[str]:
    """The trainer's and the dry run's checks of a config with this bucket file, codec and patch."""
    from launch.config import load_config
    from launch.dryrun import check

    cfg = load_config(
        None,
        [
            f"data.shards={shards}",
            f"data.bucket_file={bucket_file}",
            f"data.codec={codec}",
            f"model.arch.patch_size=[{patch}]",
            f"model.arch.in_channels={channels}",
            "eval.every=0",
            "logging.sample_every=0",
        ],
    )
    return check(cfg)["errors"]


@pytest.mark.parametrize(
    "codec,patch,fps,channels",
    [("pixel", "2,1,1", 8, 48), ("latents:16,4,8,causal", "1,2,2", 16, 16)],
    ids=["pixel-pt2", "causal-vae"],
)
def test_suggested_buckets_suit_the_codec_and_take_every_long_enough_clip(
    shards, tmp_path, capsys, codec, patch, fps, channels
):
    code, out, err = suggest(
        capsys, shards, "--codec", codec, "--patch", patch, "--fps", fps, "--budget", 8192
    )
    assert code == 0, err
    path = tmp_path / "buckets.json"
    path.write_text(out)
    cfg = load_bucket_file(str(path))  # what data.bucket_file=buckets.json loads
    assert cfg.fps == fps and cfg.buckets
    comp, _ = codec_geometry(codec)
    pt_patch = tuple(int(v) for v in patch.split(","))
    assert [p for b in cfg.buckets for p in check_bucket(b, comp, pt_patch)] == []
    assert dry_run_errors(shards, path, codec, patch, channels) == []
    for b in cfg.buckets:
        assert b.batch_size * latent_tokens(b.frames, b.height, b.width, comp, pt_patch) <= 8192

    # the loader's own rule places every clip but the ones stderr names as fitting none
    placed = {k: assign(m, cfg) for k, m in metas(shards).items()}
    unfit = sorted(k for k, a in placed.items() if a is None)
    if codec == "pixel":  # a still has 1 latent frame: not a multiple of the temporal patch 2
        assert unfit == ["still"]
        assert "fit no bucket: 1" in err and "1 a still, and no 1-frame bucket suits" in err
    else:  # 3 frames are under the shortest length a 1 + 4k codec takes; the still has its bucket
        assert unfit == ["short"]
        assert "fit no bucket: 1" in err and "shorter than" in err and "(e.g. short)" in err
        assert any(b.frames == 1 for b in cfg.buckets)
    aspects = {round(a.bucket.aspect, 2) for a in placed.values() if a is not None and a.bucket.frames > 1}
    assert aspects == {1.33, 0.75, 1.0}  # the three shapes in the data, each in its own bucket
    # stderr's per-bucket counts are the loader's placement
    for b in cfg.buckets:
        n = sum(a is not None and a.bucket == b for a in placed.values())
        assert f"{b.name:>14}  batch {b.batch_size:>3}" in err and f"a batch)  {n} clip" in err


def test_a_small_budget_shortens_the_buckets_instead_of_overflowing(shards, capsys):
    # 12 frames of 48x64 are 12 * 12 * 16 = 2304 tokens at patch 1x1x1: over a budget of 1000
    code, out, err = suggest(
        capsys, shards, "--patch", "1,1,1", "--fps", 8, "--budget", 1000, "--durations", 1
    )
    assert code == 0, err
    spec = json.loads(out)
    comp, _ = codec_geometry("pixel")
    tokens = [b * latent_tokens(f, h, w, comp, (1, 1, 1)) for f, h, w, b in spec["buckets"]]
    assert tokens and max(tokens) <= 1000
    cfg = BucketConfig([Bucket(*b) for b in spec["buckets"]], fps=8)
    assert all(assign(m, cfg) is not None for k, m in metas(shards).items() if k != "still")


@pytest.mark.parametrize("what", ["missing", "clips", "empty"])
def test_a_wrong_shards_path_is_a_one_line_error(shards, tmp_path, capsys, what):
    if what == "clips":  # a folder of clips, not shards: says how to write them
        target = tmp_path / "my clips"
        target.mkdir()
        (target / "a.mp4").write_bytes(encode_h264(gradient_clip(4, 16, 16), 8))
    else:
        target = tmp_path / ("nowhere" if what == "missing" else "")
    code, out, err = suggest(capsys, target)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and str(target) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2
    if what == "clips":
        assert f"python -m data.shards write '{target}' OUT" in err


def test_latent_shards_keep_their_own_buckets(tmp_path, capsys):
    """Encoded samples (data.encode) carry their bucket: the file lists those shapes, budget-sized."""
    buf = io.BytesIO()
    np.save(buf, np.zeros((4, 2, 4, 4), np.float32))
    meta = {"kind": "video", "frames": 8, "fps": 8.0, "width": 32, "height": 32, "bucket": "8x32x32"}
    meta["latent_shape"] = [4, 2, 4, 4]
    samples = [{"__key__": f"k{i}", "latent.npy": buf.getvalue(), "txt": "a clip", "json": json.dumps(meta)}
               for i in range(2)]  # fmt: skip
    write_tar(tmp_path / "train-000000.tar", samples)
    code, out, err = suggest(
        capsys, tmp_path, "--codec", "latents:4,4,8", "--patch", "1,1,1", "--budget", 4096
    )
    assert code == 0, err
    assert json.loads(out)["buckets"] == [[8, 32, 32, 4096 // (2 * 4 * 4)]] and "fit no bucket: 0" in err
