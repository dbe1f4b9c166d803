import numpy as np
import pytest
import torch

from dit.config import get_preset
from dit.layers import Grid, SelfAttention
from dit.model import SpacetimeDiT, build_model
from tests.dit.helpers import inputs, random_model


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["full", "factorized"])
@pytest.mark.parametrize("size", [(3, 6, 10), (1, 4, 4), (5, 2, 14)])
def test_output_shape_for_odd_sizes_and_images(layout, size):
    cfg = get_preset("tiny", attention_layout=layout)
    model = random_model(cfg)
    x, t, kw = inputs(cfg, t=size[0], h=size[1], w=size[2])
    out = model(x, t, **kw)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


@pytest.mark.slow
@pytest.mark.parametrize("pos", ["rope3d", "sincos3d", "learned"])
@pytest.mark.parametrize("mod", ["per_block", "shared"])
def test_fresh_model_predicts_zero(pos, mod):
    cfg = get_preset("tiny", pos_embed=pos, modulation=mod, hidden_size=96, num_heads=4)
    model = build_model(cfg, seed=1)
    x, t, kw = inputs(cfg)
    assert torch.count_nonzero(model(x, t, **kw)) == 0
    # ... and yet it is trainable: the zeros are where gradients land first
    loss = (model(x, t, **kw) - torch.randn_like(x)).pow(2).mean()
    loss.backward()
    assert model.final.linear.weight.grad.abs().sum() > 0


def test_init_weights_sets_every_parameter_after_to_empty():
    cfg = get_preset("tiny", pos_embed="learned", fps_conditioning=True, cond_channels=2)
    with torch.device("meta"):
        model = SpacetimeDiT(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.init_weights()
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    assert bad == []


def test_build_is_reproducible_for_a_seed():
    a = build_model(get_preset("tiny"), seed=3).state_dict()
    b = build_model(get_preset("tiny"), seed=3).state_dict()
    c = build_model(get_preset("tiny"), seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_per_frame_timesteps_condition_each_frame():
    cfg = get_preset("tiny")
    model = random_model(cfg)
    x, t, kw = inputs(cfg, t=4)
    same = model(x, t[:, None].expand(-1, 4), **kw)
    assert torch.allclose(same, model(x, t, **kw), atol=1e-5)
    t_frames = t[:, None].repeat(1, 4)
    t_frames[:, 0] = 0  # a clean first frame
    assert not torch.allclose(model(x, t_frames, **kw), same, atol=1e-4)
    with pytest.raises(ValueError, match="per-frame t"):
        model(x, torch.zeros(2, 3), **kw)


def test_class_conditioning_with_null_class():
    cfg = get_preset("dit-s/2", depth=2, hidden_size=96, num_heads=4, num_classes=10)
    model = random_model(cfg)
    x, t, _ = inputs(cfg, t=1, h=8, w=8)
    a = model(x, t, labels=torch.tensor([1, 2]))
    null = model(x, t, labels=torch.full((2,), cfg.num_classes))
    assert a.shape == (2, 8, 1, 8, 8)  # learned sigma: 2 × 4 channels
    assert not torch.allclose(a, null)
    with pytest.raises(ValueError, match="labels"):
        model(x, t)


def test_text_padding_is_ignored():
    cfg = get_preset("tiny")
    model = random_model(cfg)
    x, t, kw = inputs(cfg)
    out = model(x, t, **kw)
    ctx = kw["context"].clone()
    ctx[~kw["context_mask"]] = 1e3  # garbage in the padded positions
    assert torch.allclose(model(x, t, context=ctx, context_mask=kw["context_mask"]), out, atol=1e-5)


def test_cond_channels_and_fps_change_the_output():
    cfg = get_preset("tiny", cond_channels=5, fps_conditioning=True)
    model = random_model(cfg)
    x, t, kw = inputs(cfg)
    out = model(x, t, **kw)
    assert not torch.allclose(model(x, t, **{**kw, "cond": torch.zeros_like(kw["cond"])}), out)
    assert not torch.allclose(model(x, t, **{**kw, "fps": kw["fps"] * 2}), out)
    with pytest.raises(ValueError, match="cond_channels=5"):
        model(x, t, **{**kw, "cond": None})


def test_bad_shapes_name_the_problem():
    cfg = get_preset("tiny")
    model = random_model(cfg)
    x, t, kw = inputs(cfg, h=6, w=10)
    with pytest.raises(ValueError, match="patch_size"):
        model(x[..., :5], t, **kw)
    with pytest.raises(ValueError, match="in_channels"):
        model(x[:, :3], t, **kw)
    with pytest.raises(ValueError, match="needs context"):
        model(x, t)


def test_factorized_attention_does_not_mix_frames_in_space_blocks():
    # A single spatial block (depth 1) must not let frame 0 see frame 1.
    cfg = get_preset("tiny", attention_layout="factorized", depth=1, conditioning="none")
    model = random_model(cfg)
    x, t, _ = inputs(cfg, t=2)
    out = model(x, t)
    x2 = x.clone()
    x2[:, :, 1] += 1.0
    out2 = model(x2, t)
    assert torch.allclose(out[:, :, 0], out2[:, :, 0], atol=1e-5)
    assert not torch.allclose(out[:, :, 1], out2[:, :, 1], atol=1e-5)


def _dit_2d_table(dim: int, size: int) -> np.ndarray:
    # DiT's get_2d_sincos_pos_embed, restated: meshgrid(w, h) puts the column index in the first half.
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32)), axis=0)
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def test_sincos_positions_reproduce_dit_for_images():
    from dit.embeddings import SinCos3D

    ours = SinCos3D(1152)((1, 16, 16)).numpy()
    assert np.allclose(ours, _dit_2d_table(1152, 16), atol=1e-6)
    video = SinCos3D(1152)((3, 16, 16))
    assert torch.allclose(video[:256], torch.from_numpy(ours)) and not torch.allclose(
        video[256:512], video[:256]
    )


def test_per_frame_t_must_be_constant_within_a_temporal_patch():
    cfg = get_preset("tiny", patch_size=(2, 2, 2))
    model = random_model(cfg)
    x, t, kw = inputs(cfg, t=4)
    frames = t[:, None].repeat(1, 4)
    assert model(x, frames, **kw).shape == x.shape
    frames[:, 0] = 0  # only half of the first patch clean: ambiguous
    with pytest.raises(ValueError, match="temporal patch"):
        model(x, frames, **kw)


def test_sequence_points_see_the_whole_sample_and_hold_no_parameters():
    """seq_start / blocks_end / seq_end (where parallel/ cuts and gathers the sequence) are identities
    on the path of the forward, with the documented arguments, and add no state-dict keys."""
    cfg = get_preset("tiny", pos_embed="rope3d")
    model = random_model(cfg)
    x, t, kw = inputs(cfg, t=3, h=6, w=10)  # patch 1×2×2: grid 3×3×5, 45 tokens
    seen = {}
    model.seq_start.register_forward_hook(lambda m, args, out: seen.update(start=(args, out)))
    model.blocks_end.register_forward_hook(lambda m, args, out: seen.update(blocks_end=out))
    model.seq_end.register_forward_hook(lambda m, args, out: seen.update(end=out))
    out = model(x, t, **kw)
    (h, rope, grid, per_frame), (h_out, rope_out) = seen["start"]
    assert grid == Grid(3, 3, 5) == model.grid(x) and str(grid) == "3×3×5"
    assert h.shape == (2, 45, cfg.hidden_size) and h_out is h and rope_out is rope
    assert rope[0].shape[0] == 45 and per_frame is False
    assert seen["blocks_end"].shape == (2, 45, cfg.hidden_size)
    assert seen["end"].shape == (2, 45, 4 * cfg.out_ch)
    # the output is the seq_end tensor unpatchified: channel 0 of token 0 is pixel (0, 0, 0)
    assert out[0, 0, 0, 0, 0] == seen["end"][0, 0, 0]
    model(x, t[:, None].repeat(1, 3), **kw)
    assert seen["start"][0][3] is True  # per-frame timesteps: one modulation vector per frame
    points = ("seq_start", "blocks_end", "seq_end")
    assert all(not list(getattr(model, p).parameters()) for p in points)
    assert not [k for k in model.state_dict() if k.startswith(points)]


@pytest.mark.parametrize("axis", ["space", "time"])
def test_attention_on_whole_frames_takes_the_sample_grid(axis):
    """A context-parallel chunk of whole frames is attended with the whole sample's grid: spatial
    attention on frames 1…2 alone equals those frames of the whole; temporal attention sees the
    chunk's own frames (its frame count follows from the length, not from grid.frames)."""
    torch.manual_seed(0)
    attn = SelfAttention(16, 2, qk_norm=True, eps=1e-6, backend="math", axis=axis)
    grid = Grid(4, 2, 3)  # 6 tokens per frame
    x = torch.randn(2, 24, 16)
    chunk = x[:, 6:18]  # frames 1 and 2
    got = attn(chunk, grid, None)
    if axis == "space":
        assert torch.allclose(got, attn(x, grid, None)[:, 6:18], atol=1e-6)
    else:  # the same as a two-frame sample of the same frame size
        assert torch.equal(got, attn(chunk, Grid(2, 2, 3), None))
        assert not torch.allclose(got, attn(x, grid, None)[:, 6:18], atol=1e-3)
