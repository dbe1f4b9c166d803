"""The text convention (``model.arch.text_mask`` / ``text_null`` / ``text_len``) with the real MiniLM
encoder: what the model is given in training (the Conditioner, caption dropout's null) and in sampling
(``launch.sample.conditions``: the CFG null), for each combination."""

import gc

import pytest
import torch
import torch.distributed as dist

from data.batch import Batch
from data.encoders import TextEncoder
from launch.batches import Conditioner
from launch.config import load_config
from launch.sample import conditions
from tests.dit.helpers import random_model
from tests.parallel.group import run_group, serve

CAPTIONS = ["a red circle moves slowly from left to right", "a blue square", "green"]


def _batch(b=3):
    return Batch(
        bucket="4x16x16",
        key=[f"k{i}" for i in range(b)],
        text=CAPTIONS[:b],
        fps=torch.full((b,), 8.0),
        latent=torch.randn(b, 48, 1, 4, 4),
    )


def _conditioner(*overrides):
    cfg = load_config(None, ["data.max_text_len=16", *overrides])
    return Conditioner(cfg, torch.device("cpu"))


def _same(a, b) -> bool:
    """Both None (no mask) or equal tensors."""
    return a is None and b is None or (a is not None and b is not None and torch.equal(a, b))


@pytest.fixture(scope="module")
def encoded():
    """The encoder's own output (states zero past each caption, the padding mask): the reference."""
    cond = _conditioner()
    return cond.encode_text(CAPTIONS), cond.encode_text([""])


@pytest.mark.parametrize("text_mask", [True, False])
@pytest.mark.parametrize("text_null", ["masked", "empty_prompt"])
def test_each_convention_gives_its_states_mask_and_null(encoded, text_mask, text_null):
    (emb, pad), (empty_emb, empty_pad) = encoded
    assert not pad.all() and pad[:, 0].all()  # the short captions are padded: the masks matter here
    over = [f"model.arch.text_mask={text_mask}", f"model.arch.text_null={text_null}"]
    cond = _conditioner("train.cfg_dropout=0", *over)
    prep = cond(_batch(), torch.Generator().manual_seed(0))
    ctx, mask = prep.kwargs["context"], prep.kwargs["context_mask"]
    assert torch.equal(ctx, emb)  # zero-padded states either way (Wan: zeros past the caption)
    assert torch.all(ctx[~pad] == 0) and torch.all(ctx[pad].abs().sum(-1) > 0)
    assert torch.equal(mask, pad) if text_mask else mask is None  # Wan: no mask, every token attended

    dropped = _conditioner("train.cfg_dropout=0.999", *over)(_batch(), torch.Generator().manual_seed(0))
    null_ctx, null_mask = dropped.kwargs["context"], dropped.kwargs["context_mask"]
    if text_null == "masked":  # today's null: zero states attended nowhere
        assert torch.all(null_ctx == 0) and null_mask.shape == pad.shape and not null_mask.any()
    else:  # the encoded empty caption on every row, under the same mask convention
        assert torch.equal(null_ctx, empty_emb.expand(3, -1, -1)) and null_ctx.abs().sum() > 0
        assert torch.equal(null_mask, empty_pad.expand(3, -1)) if text_mask else null_mask is None

    # sampling: the conditional inputs are training's, and the CFG null is the dropout null
    arch = cond.arch
    cfg_on, uncond = conditions(arch, cond.encode_text, CAPTIONS, fps=8.0, cfg_scale=4.0, device="cpu")
    assert torch.equal(cfg_on["context"], ctx) and _same(cfg_on["context_mask"], mask)
    assert torch.equal(uncond["context"], null_ctx) and _same(uncond["context_mask"], null_mask)
    _, none = conditions(arch, cond.encode_text, CAPTIONS, fps=8.0, cfg_scale=1.0, device="cpu")
    assert none is None


def test_latent_shards_follow_the_convention_and_the_empty_null_must_fit_them(encoded):
    """Precomputed states (latent shards) get the same convention: Wan's zeroes states the shard masks
    and unmasks them; an empty-prompt null of another length than the shard's states is refused."""
    (emb, pad), (empty_emb, _) = encoded
    noisy = emb + (~pad)[..., None] * 5.0  # a shard whose padding rows are not zero
    batch = _batch()
    batch.text_emb, batch.text_mask = noisy, pad
    wan = ["model.arch.text_mask=false", "model.arch.text_null=empty_prompt"]
    prep = _conditioner("train.cfg_dropout=0", *wan)(batch, torch.Generator().manual_seed(0))
    assert torch.equal(prep.kwargs["context"], emb) and prep.kwargs["context_mask"] is None
    default = _conditioner("train.cfg_dropout=0")(batch, torch.Generator().manual_seed(0))
    assert torch.equal(default.kwargs["context"], noisy) and torch.equal(default.kwargs["context_mask"], pad)
    batch.text_emb, batch.text_mask = noisy[:, :8], pad[:, :8]  # encoded at another data.max_text_len
    with pytest.raises(ValueError, match="data.max_text_len"):
        _conditioner("train.cfg_dropout=0.999", *wan)(batch, torch.Generator().manual_seed(0))


def test_text_len_is_the_padding_length_of_captions_and_the_empty_prompt():
    """With ``model.arch.text_len`` (Wan: 512) every caption and the empty prompt are padded to it, and
    a different ``data.max_text_len`` is refused."""
    over = ["model.arch.text_len=20", "data.max_text_len=20", "model.arch.text_mask=false"]
    cond = Conditioner(load_config(None, [*over, "model.arch.text_null=empty_prompt"]), torch.device("cpu"))
    emb, mask = cond.encode_text(["a blue square"])
    empty, _ = cond.empty_prompt()
    assert emb.shape[1] == mask.shape[1] == empty.shape[1] == 20
    with pytest.raises(ValueError, match="data.max_text_len=16 but model.arch.text_len=20"):
        load_config(None, ["model.arch.text_len=20", "data.max_text_len=16"])


def _live_text_encoders() -> int:
    gc.collect()
    return sum(type(o) is TextEncoder for o in gc.get_objects())


def test_latent_shards_get_the_encoded_empty_null_without_keeping_the_encoder(encoded):
    """Latent shards carry their text states: the Conditioner encodes caption dropout's empty-prompt
    null at construction with an encoder it frees (UMT5-XXL would otherwise stay on every GPU), and
    that null is the encoded ""; a raw-caption Conditioner gets the same null."""
    (emb, pad), (empty_emb, empty_pad) = encoded
    wan = ["model.arch.text_null=empty_prompt", "train.cfg_dropout=0.999"]
    before = _live_text_encoders()
    cond = _conditioner(*wan)
    assert cond.text is None and _live_text_encoders() == before  # none kept, none left alive
    batch = _batch()
    batch.text_emb, batch.text_mask = emb, pad
    prep = cond(batch, torch.Generator().manual_seed(0))
    assert cond.text is None and _live_text_encoders() == before
    assert torch.equal(cond.empty_prompt()[0], empty_emb) and torch.equal(cond.empty_prompt()[1], empty_pad)
    assert torch.equal(prep.kwargs["context"], empty_emb.expand(3, -1, -1))  # every caption dropped
    raw = _conditioner(*wan)
    again = raw(_batch(), torch.Generator().manual_seed(0))  # raw captions: the encoder is loaded and kept
    assert raw.text is not None and torch.equal(again.kwargs["context"], prep.kwargs["context"])


def _null_case(case: str) -> dict:
    """One rank's side of :func:`test_the_empty_null_is_encoded_on_rank0_alone_and_broadcast`."""
    built = []
    real_init = TextEncoder.__init__

    def counting_init(self, *args, **kwargs):  # the real encoder, counted
        built.append(1)
        real_init(self, *args, **kwargs)

    TextEncoder.__init__ = counting_init
    try:
        over = ["model.arch.text_null=empty_prompt", "train.cfg_dropout=0.5"]
        if case == "missing_encoder":
            over.append("data.text_encoder=/nonexistent/umt5")
        try:
            cond = _conditioner(*over)
        except Exception as e:
            mine = {"error": f"{type(e).__name__}: {e}"}
        else:
            mine = {"empty": cond.empty_prompt(), "kept": cond.text is not None}
    finally:
        TextEncoder.__init__ = real_init
    mine["built"] = len(built)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return {"ranks": every}


def _null_worker(rank: int, world: int, port: int, cases: list, out_dir: str) -> None:
    serve(rank, world, port, cases, out_dir, _null_case, name=lambda case: case)


@pytest.mark.slow
def test_the_empty_null_is_encoded_on_rank0_alone_and_broadcast(encoded, tmp_path):
    """Two gloo ranks: rank 0 alone builds the text encoder, neither keeps one, and both hold the
    encoded "" of one process; rank 0's failure is raised on both ranks (no rank left waiting)."""
    _, (empty_emb, empty_pad) = encoded
    got = run_group(2, _null_worker, ["ok", "missing_encoder"], tmp_path, names=["ok", "missing_encoder"])
    ranks = got["ok"]["ranks"]
    assert [r["built"] for r in ranks] == [1, 0] and not any(r["kept"] for r in ranks)
    for r in ranks:
        assert torch.equal(r["empty"][0], empty_emb) and torch.equal(r["empty"][1], empty_pad)
    failed = got["missing_encoder"]["ranks"]
    assert "FileNotFoundError" in failed[0]["error"] and "/nonexistent/umt5" in failed[0]["error"]
    assert "RuntimeError: rank 0 could not encode" in failed[1]["error"]


@pytest.mark.parametrize("text_null", ["masked", "empty_prompt"])
def test_an_unmasked_convention_gives_no_mask_and_the_same_function(encoded, text_null):
    """``text_mask=False`` hands the model ``context_mask=None``, so cross-attention reaches its
    unmasked kernels (FlashAttention, SDPA's flash: which kernel CUDA then picks only a GPU shows),
    and the model computes what it computes with an all-True mask, bit for bit here; caption dropout
    replaces states (the empty prompt) or masks only the dropped rows (the masked null)."""
    (emb, pad), (empty_emb, _) = encoded
    over = ["model.arch.text_mask=false", f"model.arch.text_null={text_null}"]
    batch = _batch()
    batch.text_emb, batch.text_mask = emb, pad
    cond = _conditioner("train.cfg_dropout=0", *over)
    kw = cond(batch, torch.Generator().manual_seed(0)).kwargs
    assert kw["context_mask"] is None
    model = random_model(cond.arch).eval()
    seen = []
    model.blocks[0].cross_attn.core.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["key_mask"]), with_kwargs=True
    )
    x, t = torch.randn(3, cond.arch.in_channels, 1, 4, 4), torch.tensor([100.0, 500.0, 900.0])
    with torch.no_grad():
        out = model(x, t, **kw)
        all_true = model(x, t, **{**kw, "context_mask": torch.ones_like(pad)})
    assert seen[0] is None and seen[1].all()  # the unmasked call, then the masked one
    assert torch.equal(out, all_true) and not torch.equal(out, model(x, t, **{**kw, "context_mask": pad}))

    drop = _conditioner("train.cfg_dropout=0.5", *over)(batch, torch.Generator().manual_seed(0)).kwargs
    dropped = (drop["context"] != emb).flatten(1).any(1)
    assert dropped.any() and not dropped.all()  # both kinds of row in the batch
    if text_null == "empty_prompt":  # states replaced, still no mask
        assert drop["context_mask"] is None and torch.equal(drop["context"][dropped][0], empty_emb[0])
    else:  # dropped rows attend nowhere, kept rows everywhere
        assert torch.equal(drop["context_mask"], ~dropped[:, None].expand_as(pad))


def test_ltx_runs_its_text_encoder_without_the_mask(encoded, tmp_path):
    """``model.arch.text_encoder_mask=False`` (LTX-Video: the ``ltx-video-2b`` preset and an imported
    LTX model) encodes captions and the empty-prompt null with the encoder's attention unmasked, as
    ``LTXPipeline`` does; the default keeps the mask."""
    from dit.config import PRESETS
    from launch.interop import read_diffusers, to_ours
    from tests.launch.diffusers_models import tiny_ltx

    assert PRESETS["ltx-video-2b"].text_encoder_mask is False
    assert all(PRESETS[p].text_encoder_mask for p in ("tiny", "wan2.1-t2v-1.3b", "wan2.2-ti2v-5b"))
    assert to_ours(read_diffusers(tiny_ltx(tmp_path)))[0].text_encoder_mask is False
    (emb, pad), (empty_emb, _) = encoded
    cond = _conditioner(
        "model.arch.text_null=empty_prompt", "model.arch.text_encoder_mask=false", "train.cfg_dropout=0.5"
    )
    reference = TextEncoder(None, 16, encoder_mask=False)
    ref_emb, ref_pad = reference(CAPTIONS)
    got_emb, got_pad = cond.encode_text(CAPTIONS)
    assert torch.equal(got_emb, ref_emb) and torch.equal(got_pad, pad)
    assert torch.equal(cond.empty_prompt()[0], reference([""])[0])
    assert not torch.allclose(got_emb[1][pad[1]], emb[1][pad[1]], atol=1e-3)  # the padding was attended
    assert not torch.allclose(cond.empty_prompt()[0], empty_emb, atol=1e-3)
