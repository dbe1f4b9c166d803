import math

from hypothesis import given, settings
from hypothesis import strategies as st

from data.buckets import (
    Bucket,
    BucketConfig,
    Compression,
    assign,
    available_frames,
    buckets_from_budget,
    latent_tokens,
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


@given(st.integers(256, 200_000), st.integers(1, 64))
def test_budget_batches_fill_but_never_exceed_the_budget(budget, max_batch):
    for b in buckets_from_budget(budget, max_batch=max_batch):
        tokens = latent_tokens(b.frames, b.height, b.width, Compression(), (1, 2, 2))
        assert 1 <= b.batch_size <= max_batch and b.batch_size * tokens <= budget
        assert b.batch_size == max_batch or (b.batch_size + 1) * tokens > budget
        assert b.height % 16 == 0 and b.width % 16 == 0


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
    import pytest

    with pytest.raises(ValueError, match="batch_size=0"):
        BucketConfig([Bucket(1, 64, 64, 0)])
    with pytest.raises(ValueError, match="frame count 8"):
        buckets_from_budget(1000, frame_counts=(8,))
