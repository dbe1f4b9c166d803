"""Model inputs from loader batches: caption dropout, the task mix, I2V conditioning channels."""

import pytest
import torch

from data.batch import Batch
from launch.batches import Conditioner
from launch.config import load_config


def _batch(b=6, t=4):
    return Batch(
        bucket=f"{t}x16x16",
        key=[f"k{i}" for i in range(b)],
        text=[""] * b,
        fps=torch.full((b,), 8.0),
        video=torch.rand(b, 3, t, 16, 16) * 2 - 1,
        text_emb=torch.randn(b, 5, 384),
        text_mask=torch.ones(b, 5, dtype=torch.bool),
    )


def _conditioner(*overrides):
    return Conditioner(
        load_config(None, ["model.arch.fps_conditioning=true", *overrides]), torch.device("cpu")
    )


def test_caption_dropout_nulls_whole_captions_at_the_configured_rate():
    cond = _conditioner("train.cfg_dropout=0.3")
    dropped = 0
    for seed in range(20):
        prep = cond(_batch(), torch.Generator().manual_seed(seed))
        ctx, mask = prep.kwargs["context"], prep.kwargs["context_mask"]
        nulled = ~mask.any(1)
        assert torch.all(ctx[nulled] == 0) and torch.all(mask[~nulled])
        dropped += int(nulled.sum())
    assert 0.15 < dropped / 120 < 0.45
    assert prep.kwargs["fps"].tolist() == [8.0] * 6 and prep.x0.shape == (6, 48, 4, 4, 4)
    again = cond(_batch(), torch.Generator().manual_seed(19))
    assert torch.equal(again.kwargs["context_mask"], mask)  # the draw depends on the generator only


def test_task_mix_marks_clean_frames_and_builds_cond_channels():
    cond = _conditioner(
        "train.cfg_dropout=0",
        "train.task_t2v=1",
        "train.task_i2v=1",
        "train.task_continuation=1",
        "train.continuation_frames=2",
        "model.arch.cond_channels=49",
    )
    kinds = set()
    for seed in range(10):
        prep = cond(_batch(), torch.Generator().manual_seed(seed))
        clean = prep.cond_frames if prep.cond_frames is not None else torch.zeros(6, 4, dtype=torch.bool)
        for row, frames, ch in zip(clean, prep.loss_frames, prep.kwargs["cond"], strict=True):
            n = int(row.sum())
            assert row[:n].all() and n in (0, 1, 2) and frames == 4 - n  # a clean prefix, out of the loss
            assert torch.equal(ch[-1, :, 0, 0], row.float())  # mask channel marks the clean frames
            kinds.add(n)
        keep = clean[:, None, :, None, None]
        assert torch.equal(prep.kwargs["cond"][:, :48], torch.where(keep, prep.x0, torch.zeros_like(prep.x0)))
    assert kinds == {0, 1, 2}
    image = cond(_batch(t=1), torch.Generator().manual_seed(0))  # stills are always text-to-image
    assert image.cond_frames is None and torch.all(image.kwargs["cond"] == 0)


def test_a_real_start_refuses_buckets_the_codec_would_truncate_or_the_patch_not_divide(tmp_path):
    """The trainers and the held-out loader build their expectations with ``expect_for``: a bucket that
    --dry-run calls an error stops a real start too, naming the bucket (the tiny config's pixel codec:
    4× spatial, patch 1, so H and W must be multiples of 4; a causal 4× VAE needs 1 + 4k frames)."""
    import json

    import pytest

    from launch.batches import expect_for

    good = "data.buckets.buckets=[{frames: 4, height: 32, width: 32, batch_size: 2}]"
    cfg = load_config(None, [good])
    assert expect_for(cfg).channels == cfg.model.arch.in_channels
    bad = "data.buckets.buckets=[{frames: 4, height: 32, width: 34, batch_size: 2}]"
    with pytest.raises(ValueError, match=r"data\.buckets .*bucket 4x32x34: width 34 is not a multiple of 4"):
        expect_for(load_config(None, [bad]))
    wan = tmp_path / "vae"
    wan.mkdir()
    (wan / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", "z_dim": 4}))
    eight = "data.buckets.buckets=[{frames: 8, height: 64, width: 64, batch_size: 1}]"
    with pytest.raises(ValueError, match=r"bucket 8x64x64: 8 frames: the causal codec .* silently keep 5"):
        expect_for(load_config(None, [eight, f"data.codec={wan}"]))


def test_text_cache_gives_each_caption_its_own_states_whatever_the_batch_and_drops_the_oldest():
    """``data.text_cache``: a cached caption's states are those of encoding it alone (the real MiniLM),
    so they do not depend on which batch or cache state the caption met, and at most N are kept."""
    cached = _conditioner("data.text_cache=2", "data.max_text_len=12")
    plain = _conditioner("data.max_text_len=12")
    calls = []
    a, b, c = "a red circle", "a blue square moves quickly", "a green triangle on a black background"
    cached.encode_text([c])  # loads the encoder
    encoder = cached.text
    cached.text = lambda texts: calls.append(list(texts)) or encoder(texts)  # a spy on the real encoder
    emb, mask = cached.encode_text([a, b, a])
    # every miss alone, a caption twice in one batch encoded once: on a GPU a caption's states could
    # otherwise depend on its batch (on this CPU MiniLM gives equal bits either way)
    assert calls == [[a], [b]]
    calls.clear()
    alone = {t: plain.encode_text([t]) for t in (a, b, c)}
    for i, t in enumerate([a, b, a]):
        assert torch.equal(emb[i], alone[t][0][0]) and torch.equal(mask[i], alone[t][1][0])
    assert mask[0].sum() < mask.shape[1]  # padded: the mask is per caption, not all-true
    again, _ = cached.encode_text([b, a])
    assert calls == [] and torch.equal(again[0], emb[1])  # both from the cache
    cached.encode_text([c])  # a third caption: the least recently used (b) is dropped
    cached.encode_text([a])
    cached.encode_text([b])
    assert calls == [[c], [b]]
    late = _conditioner("data.text_cache=2", "data.max_text_len=12")
    assert torch.equal(late.encode_text([c, b])[0][1], emb[1])  # b met in another batch: the same states


def test_text_cache_runs_inside_the_conditioner_on_raw_batches_and_refuses_a_negative_size():
    cond = _conditioner("data.text_cache=8", "data.max_text_len=12", "train.cfg_dropout=0")
    batch = _batch(b=3)
    batch = Batch(
        bucket=batch.bucket,
        key=batch.key,
        text=["a red circle", "a blue square", "a red circle"],
        fps=batch.fps,
        video=batch.video,
    )
    prep = cond(batch, torch.Generator().manual_seed(0))
    assert torch.equal(prep.kwargs["context"][0], prep.kwargs["context"][2])
    assert not torch.equal(prep.kwargs["context"][0], prep.kwargs["context"][1])
    with pytest.raises(ValueError, match="data.text_cache"):
        load_config(None, ["data.text_cache=-1"])


def test_an_ltx_rope_model_gets_the_clips_fps_in_training_and_sampling():
    """LTX's RoPE scales time by the clip's frame rate (``DiTConfig.needs_fps``) without fps
    conditioning: the trainer's batches and the sampler's inputs both carry ``fps``, and the model runs
    on them (before, both passed fps only to fps-conditioned models and the forward refused)."""
    from launch.sample import conditions

    ltx = [
        "model.arch.fps_conditioning=false", "model.arch.pos_embed=rope_ltx", "model.arch.patch_size=[1,2,2]",
        "model.arch.qk_norm=across_heads", "model.arch.block_norm=rmsnorm", "train.cfg_dropout=0",
    ]  # fmt: skip
    cond = _conditioner(*ltx)
    assert not cond.arch.fps_conditioning and cond.arch.needs_fps
    batch = _batch()
    batch.fps = torch.tensor([8.0, 8.0, 24.0, 24.0, 12.5, 12.5])
    prep = cond(batch, torch.Generator().manual_seed(0))
    assert prep.kwargs["fps"].tolist() == batch.fps.tolist()
    from dit.model import build_model

    model = build_model(cond.arch, seed=0)
    t = torch.full((6,), 500.0)
    with torch.no_grad():
        out = model(prep.x0, t, **prep.kwargs)
    assert out.shape == prep.x0.shape
    kw, _ = conditions(cond.arch, lambda texts: (torch.randn(len(texts), 5, 384), torch.ones(len(texts), 5,
                       dtype=torch.bool)), ["a"], fps=12.5, cfg_scale=1, device="cpu")  # fmt: skip
    assert kw["fps"].tolist() == [12.5]
