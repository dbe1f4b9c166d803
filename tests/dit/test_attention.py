import pytest
import torch

from dit.attention import attention
from dit.config import get_preset
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
