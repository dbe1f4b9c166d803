import pytest
import torch

from dit.attention import attention, flash_attn_fallback
from dit.config import get_preset
from tests.dit.emulate import fake_cuda
from tests.dit.helpers import inputs, random_model


def _qkv(b=2, nq=12, nk=9, h=3, d=16):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, n, h, d, generator=g) for n in (nq, nk, nk))


def test_sdpa_equals_math():
    q, k, v = _qkv()
    assert torch.allclose(attention(q, k, v, backend="sdpa"), attention(q, k, v, backend="math"), atol=1e-6)


def test_key_mask_equals_dropping_the_keys():
    q, k, v = _qkv()
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    for backend in ("sdpa", "math"):
        out = attention(q, k, v, key_mask=mask, backend=backend)
        ref = attention(q[1:], k[1:, :5], v[1:, :5], backend="math")
        assert torch.allclose(out[1:], ref, atol=1e-6)


def test_fully_masked_row_gives_zeros_not_nan():
    q, k, v = _qkv()
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0] = False
    for backend in ("sdpa", "math"):
        out = attention(q, k, v, key_mask=mask, backend=backend)
        assert torch.isfinite(out).all()
        assert torch.count_nonzero(out[0]) == 0
        assert torch.allclose(out[1], attention(q, k, v, backend="math")[1], atol=1e-6)


def test_flash_attn_backend_falls_back_to_sdpa_on_cpu():
    q, k, v = _qkv()
    assert torch.allclose(
        attention(q, k, v, backend="flash_attn"), attention(q, k, v, backend="math"), atol=1e-6
    )
    with pytest.raises(ValueError, match="backend"):
        attention(q, k, v, backend="xformers")


@pytest.mark.parametrize("layout", ["full", "factorized"])
def test_model_with_sdpa_equals_model_with_math(layout):
    cfg = get_preset("tiny", attention_layout=layout)
    model = random_model(cfg)
    x, t, kw = inputs(cfg)
    out_sdpa = model(x, t, **kw)
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = "math"
    assert torch.allclose(out_sdpa, model(x, t, **kw), atol=1e-5)


def test_every_attention_goes_through_a_core_submodule():
    # Context parallelism swaps these modules, so their names are API.
    model = random_model(get_preset("tiny"))
    cores = sorted(n for n, m in model.named_modules() if type(m).__name__ == "AttentionCore")
    assert cores == [
        "blocks.0.attn.core",
        "blocks.0.cross_attn.core",
        "blocks.1.attn.core",
        "blocks.1.cross_attn.core",
    ]


class _Flash:
    """Stands in for flash_attn_func, which needs a GPU: records what reaches it."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v):
        self.calls.append((q.dtype, k.dtype, v.dtype))
        return torch.empty_like(q)


@pytest.fixture
def flash(monkeypatch):
    import dit.attention as attn

    stand_in = _Flash()
    monkeypatch.setattr(attn, "_FLASH_ATTN", stand_in)
    monkeypatch.setattr(attn, "_FALLBACKS_LOGGED", set())
    return stand_in


def _fallbacks(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "'flash_attn' not used" in r.getMessage()]


def test_flash_attn_fallback_is_logged_once_per_reason(flash, caplog):
    """On fake CUDA tensors: bf16 reaches flash-attn; fp32, a key mask and CPU tensors go to SDPA,
    each reason logged once, naming it; mixed dtypes are named too."""
    b, n, h, d = 2, 16, 2, 32
    cases = [
        (torch.bfloat16, torch.bfloat16, None, "cuda", None),
        (torch.float32, torch.float32, None, "cuda", "float32/float32/float32"),
        (torch.bfloat16, torch.bfloat16, "mask", "cuda", "a key mask is given"),
        (torch.bfloat16, torch.bfloat16, None, "cpu", "on cpu, FlashAttention needs CUDA"),
    ]
    with caplog.at_level("WARNING", logger="dit.attention"), fake_cuda(None):
        for qk, vd, mask, dev, reason in cases:
            for _ in range(2):  # the second time logs nothing new
                q, k = (torch.empty(b, n, h, d, dtype=qk, device=dev) for _ in range(2))
                v = torch.empty(b, n, h, d, dtype=vd, device=dev)
                key_mask = torch.ones(b, n, dtype=torch.bool, device=dev) if mask else None
                before = len(flash.calls)
                out = attention(q, k, v, key_mask=key_mask, backend="flash_attn")
                assert out.shape == q.shape
                assert (len(flash.calls) > before) == (reason is None)
            if reason is not None:
                assert reason in _fallbacks(caplog)[-1]
        q = torch.empty(b, n, h, d, device="cuda")
        mixed = flash_attn_fallback(q, q, q.to(torch.bfloat16), None)  # SDPA itself refuses these
    assert "float32/float32/bfloat16" in mixed
    assert len(_fallbacks(caplog)) == 3
    assert flash.calls == [(torch.bfloat16,) * 3] * 2


def test_flash_attn_not_installed_is_logged_once(monkeypatch, caplog):
    import dit.attention as attn

    monkeypatch.setattr(attn, "_FLASH_ATTN", None)
    monkeypatch.setattr(attn, "_FALLBACKS_LOGGED", set())
    q, k, v = _qkv()
    with caplog.at_level("WARNING", logger="dit.attention"):
        attn.AttentionCore("flash_attn")
        attention(q, k, v, backend="flash_attn")
        attention(q, k, v, backend="flash_attn")
    want = "attention backend 'flash_attn' not used (flash-attn is not installed): using SDPA"
    assert _fallbacks(caplog) == [want]


def test_model_under_cuda_autocast_takes_flash_attn_for_self_attention(flash, caplog):
    """Under CUDA autocast rules the qk RMSNorm returns fp32; after the cast q, k, v reach flash-attn
    in bf16 (self-attention); masked cross-attention goes to SDPA with the reason logged once."""
    from dit.model import SpacetimeDiT

    cfg = get_preset("tiny", attention_backend="flash_attn")
    with torch.device("meta"):
        model = SpacetimeDiT(cfg)
    x, t, kw = inputs(cfg)
    with caplog.at_level("WARNING", logger="dit.attention"), fake_cuda():
        model.to_empty(device="cuda").requires_grad_(False)
        x, t, ctx, mask = (torch.empty(z.shape, dtype=z.dtype, device="cuda") for z in (x, t, *kw.values()))
        model(x, t, context=ctx, context_mask=mask)
    assert flash.calls == [(torch.bfloat16,) * 3] * cfg.depth
    assert len(_fallbacks(caplog)) == 1 and "key mask" in _fallbacks(caplog)[0]
