import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from data.buckets import (
    Bucket,
    BucketConfig,
    Compression,
    assign,
    available_frames,
    buckets_from_budget,
    check_bucket,
    latent_size,
    latent_tokens,
    load_bucket_file,
)

BUCKETS = buckets_from_budget(
    4096, resolutions=(128, 256), frame_counts=(1, 9, 17, 33, 49), compression=Compression(4, 8, True)
)
CFG = BucketConfig(BUCKETS, fps=16)

video_meta = st.builds(
    lambda frames, fps, w, h: {
        "kind": "video",
        "frames": frames,
        "fps": float(fps),
        "width": w,
        "height": h,
        "duration": frames / fps,
    },
    st.integers(1, 400),
    st.sampled_from([8, 12, 15, 24, 25, 30, 60]),
    st.integers(16, 2000),
    st.integers(16, 2000),
)


@pytest.mark.slow
@given(st.integers(256, 200_000), st.integers(1, 64))
def test_budget_batches_fill_but_never_exceed_the_budget(budget, max_batch):
    for b in buckets_from_budget(budget, max_batch=max_batch):
        tokens = latent_tokens(b.frames, b.height, b.width, Compression(), (1, 2, 2))
        assert 1 <= b.batch_size <= max_batch and b.batch_size * tokens <= budget
        assert b.batch_size == max_batch or (b.batch_size + 1) * tokens > budget
        assert b.height % 16 == 0 and b.width % 16 == 0


@pytest.mark.slow
@settings(max_examples=300)
@given(video_meta)
def test_videos_are_never_stretched_and_get_the_longest_fitting_bucket(meta):
    a = assign(meta, CFG)
    fps = min(CFG.fps, meta["fps"])
    n = available_frames(meta, fps)
    if meta["frames"] == 1:
        assert a.bucket.frames == 1
        return
    fitting = [b for b in BUCKETS if 1 < b.frames <= n]
    if not fitting:
        assert a is None
        return
    assert a.bucket.frames <= n and a.fps == fps  # the clip's duration at its rate covers the bucket
    aspect = meta["width"] / meta["height"]
    nearest = min(abs(math.log(b.aspect / aspect)) for b in fitting)
    assert abs(math.log(a.bucket.aspect / aspect)) == nearest
    assert a.bucket.frames == max(b.frames for b in fitting if abs(math.log(b.aspect / aspect)) == nearest)


@given(st.integers(16, 2000), st.integers(16, 2000))
def test_images_go_to_one_frame_buckets(w, h):
    a = assign({"kind": "image", "frames": 1, "fps": 0.0, "width": w, "height": h, "duration": 0.0}, CFG)
    assert a.bucket.frames == 1


def test_clip_window_is_respected():
    meta = {
        "kind": "video",
        "frames": 240,
        "fps": 24.0,
        "width": 256,
        "height": 256,
        "duration": 10.0,
        "start": 2.0,
        "end": 3.0,
    }
    assert available_frames(meta, 16) == 17  # 1 s at 16 fps, both ends included
    assert assign(meta, CFG).bucket.frames == 17


def test_bad_bucket_config_is_an_error():
    with pytest.raises(ValueError, match="batch_size=0"):
        BucketConfig([Bucket(1, 64, 64, 0)])
    with pytest.raises(ValueError, match="frame count 8"):
        buckets_from_budget(1000, frame_counts=(8,))


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 12),
    st.integers(1, 40),
    st.integers(1, 40),
    st.sampled_from([1, 2, 3]),
    st.sampled_from([1, 2, 4]),
    st.tuples(st.sampled_from([1, 2]), st.sampled_from([1, 2]), st.sampled_from([1, 2, 3])),
)
def test_check_bucket_accepts_exactly_what_the_pixel_codec_and_the_patch_take(f, h, w, t, s, patch):
    """Against the real space-to-depth codec: a bucket passes iff the codec encodes the clip whole
    and the latent's t, h, w are divisible by the patch (what the model's patchifier requires)."""
    from data.encoders import PixelCodec

    codec = PixelCodec(t, s)
    problems = check_bucket(Bucket(f, h, w, 1), codec.compression, patch)
    try:
        z = codec.encode(torch.zeros(1, 3, f, h, w))
    except Exception:  # einops: the clip does not split into whole t×s×s blocks
        z = None
    takes = z is not None and all(d % p == 0 for d, p in zip(z.shape[2:], patch, strict=True))
    assert (problems == []) == takes, problems
    if z is not None:
        assert latent_size(Bucket(f, h, w, 1), codec.compression) == tuple(z.shape[2:])
    assert all(p.startswith(f"bucket {f}x{h}x{w}: ") for p in problems)


@pytest.mark.slow
def test_check_bucket_refuses_exactly_the_frame_counts_a_causal_wan_vae_truncates():
    """A real (tiny, random-weight) diffusers AutoencoderKLWan with 4× temporal compression: a frame
    count passes iff encoding then decoding gives the clip back whole, and the latent frames are
    what :func:`latent_size` says."""
    diffusers = pytest.importorskip("diffusers")
    from data.encoders import _vae_geometry

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True]
    )
    comp, _ = _vae_geometry("AutoencoderKLWan", vae.config)
    assert (comp.temporal, comp.spatial, comp.causal) == (4, 4, True)
    kept = {}
    with torch.no_grad():
        for f in (1, 2, 4, 5, 8, 9):
            z = vae.encode(torch.rand(1, 3, f, 8, 8) * 2 - 1).latent_dist.mode()
            kept[f] = vae.decode(z).sample.shape[2]
            assert latent_size(Bucket(f, 8, 8, 1), comp)[0] == z.shape[2]
            problems = check_bucket(Bucket(f, 8, 8, 1), comp, (1, 1, 1))
            assert (problems == []) == (kept[f] == f), (f, kept[f], problems)
            if problems:
                assert f"would silently keep {kept[f]}" in problems[0]
    assert kept == {1: 1, 2: 1, 4: 1, 5: 5, 8: 5, 9: 9}


BUCKET_FILES = sorted(Path(__file__).parents[2].glob("launch/configs/buckets/*.json")) + [
    Path(__file__).parents[2] / "benchmarks" / "buckets-256px.json"
]
WAN = Compression(4, 8, causal=True)
PIXEL = Compression(1, 4, causal=False)


@pytest.mark.parametrize("path", BUCKET_FILES, ids=[p.name for p in BUCKET_FILES])
def test_shipped_bucket_files_suit_their_codec_and_fill_their_token_budget(path):
    """wan-* files (and the benchmark file, used with ``data.encode --vae Wan``) suit the Wan VAE at
    patch 1×2×2; pixel-* files the pixel codec. Every batch size is the largest that keeps the batch
    within the file's largest tokens per batch, so tokens per batch are about constant."""
    cfg = load_bucket_file(str(path))
    codecs = [PIXEL] if path.name.startswith("pixel-") else [WAN]
    if path.parent.name == "benchmarks":
        codecs = [WAN, PIXEL]
    for comp in codecs:
        for b in cfg.buckets:
            assert check_bucket(b, comp, (1, 2, 2)) == [], path
    tokens = {b: latent_tokens(b.frames, b.height, b.width, codecs[0], (1, 2, 2)) for b in cfg.buckets}
    budget = max(tokens[b] * b.batch_size for b in cfg.buckets)
    for b in cfg.buckets:
        assert tokens[b] * b.batch_size <= budget < tokens[b] * (b.batch_size + 1), b
    assert {b.frames for b in cfg.buckets} >= {1} and len({b.aspect for b in cfg.buckets}) >= 3
