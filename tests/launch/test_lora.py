"""launch.lora: peft LoRA injection on a plain SpacetimeDiT, adapter export forms, low-precision bases."""

import pytest
import torch
from torch import nn

from dit.config import get_preset
from dit.model import SpacetimeDiT
from launch.config import LORA_TARGETS, LoraConfig
from launch.lora import (
    Fp8Linear,
    adapter_state,
    adapter_state_from,
    adapters_disabled,
    apply_lora,
    base_fingerprint,
    initial_adapters,
    is_adapter,
    merged_state,
    store_base,
)
from tests.dit.helpers import inputs, random_model

CFG = get_preset("tiny")


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: these models are tiny, and LAPACK's QR/SVD (olora, pissa) on a 64×64 weight ran 100×
    slower with two threads on a busy 2-core machine (OpenMP waits) than with one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _base(seed: int = 0) -> SpacetimeDiT:
    # random weights everywhere (adaLN-Zero would make every block the identity and hide the adapters)
    return random_model(CFG, seed=seed)


def _out(model: nn.Module, seed: int = 0) -> torch.Tensor:
    x, t, kw = inputs(CFG, b=2, t=2, h=4, w=4, text_len=5, seed=seed)
    with torch.no_grad():
        return model(x, t, **kw)


def _lora(init: str = "default", rank: int = 4, alpha: float | None = 8.0, **kw) -> LoraConfig:
    return LoraConfig(rank=rank, alpha=alpha, init=init, **kw)


@pytest.mark.parametrize("init", ["default", "gaussian", "pissa", "pissa_niter_2", "olora"])
def test_fresh_lora_model_equals_base(init):
    """Every init starts at the base's function: B = 0 (default, gaussian), or the base weight is
    factored so W_res + scale·B0·A0 = W (pissa, its randomized-SVD pissa_niter_N, olora)."""
    model = _base()
    ref = _out(model)
    apply_lora(model, _lora(init))
    q = model.blocks[0].attn.q
    b = q.lora_B["default"].weight
    if init in ("default", "gaussian"):
        assert torch.equal(b, torch.zeros_like(b))
        assert q.lora_A["default"].weight.abs().sum() > 0
        torch.testing.assert_close(_out(model), ref, rtol=0, atol=0)
    else:
        assert b.abs().sum() > 0  # the principal directions moved into the adapters ...
        w0 = _base().blocks[0].attn.q.weight
        assert (q.base_layer.weight - w0).abs().max() > 1e-3  # ... and out of the base
        torch.testing.assert_close(_out(model), ref, rtol=1e-5, atol=1e-5)


def test_targets_resolve_to_exactly_the_intended_modules():
    model = _base()
    report = apply_lora(model, _lora(targets=list(LORA_TARGETS)))
    parts = [f"{a}.{p}" for a in ("attn", "cross_attn") for p in "qkvo"] + ["mlp.fc1", "mlp.fc2"]
    want = [f"blocks.{i}.{p}" for i in range(CFG.depth) for p in parts]
    assert sorted(report.modules) == sorted(want)
    assert len(report.modules) == 20
    # the state-dict names are peft's; nothing outside the blocks (t_proj, final.linear) is adapted
    sd = model.state_dict()
    assert {"blocks.0.attn.q.base_layer.weight", "blocks.0.attn.q.base_layer.bias"} <= sd.keys()
    assert sd["blocks.0.attn.q.lora_A.default.weight"].shape == (4, CFG.hidden_size)
    assert sd["blocks.1.mlp.fc2.lora_B.default.weight"].shape == (CFG.hidden_size, 4)
    assert "final.linear.weight" in sd and "t_proj.1.weight" in sd
    # only the adapters train, and their count is r·(in + out) per module
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {k for k in sd if is_adapter(k)} and len(trainable) == 40
    want_count = sum(4 * (m.in_features + m.out_features) for m in (model.get_submodule(n) for n in want))
    assert report.trainable == want_count
    assert report.total == sum(p.numel() for p in model.parameters())
    assert "20 modules" in report.summary() and f"{want_count:,}" in report.summary()


def test_a_narrow_pattern_adapts_only_its_modules():
    model = _base()
    report = apply_lora(model, _lora(targets=["blocks.1.attn.[qv]"]))
    assert report.modules == ["blocks.1.attn.q", "blocks.1.attn.v"]
    assert isinstance(model.blocks[0].attn.q, nn.Linear) and not hasattr(model.blocks[0].attn.q, "lora_A")


def test_unmatched_pattern_is_an_error_naming_key_and_pattern():
    model = _base()
    want = r"finetune\.lora\.targets.*'blocks\.\*\.attn\.to_q'.*blocks\.0\.attn\.q"
    with pytest.raises(ValueError, match=want):
        apply_lora(model, _lora(targets=["blocks.*.attn.q", "blocks.*.attn.to_q"]))
    # a pattern that names a module which is not a linear is no target either
    with pytest.raises(ValueError, match="'blocks.*.attn'"):
        apply_lora(_base(), _lora(targets=["blocks.*.attn"]))


def test_seeded_same_bits_and_caller_rng_untouched():
    a, b, c = _base(), _base(), _base()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    apply_lora(a, _lora(), seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)
    apply_lora(b, _lora(), seed=5)
    apply_lora(c, _lora(), seed=6)
    ka = {k: v for k, v in a.state_dict().items() if "lora_A" in k}
    for k, v in ka.items():
        assert torch.equal(v, b.state_dict()[k])
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in ka.items())


def test_dropout_zero_is_identity_and_positive_is_dropout():
    a, b = _base(), _base()
    apply_lora(a, _lora())
    apply_lora(b, _lora(dropout=0.1))
    assert isinstance(a.blocks[0].mlp.fc1.lora_dropout["default"], nn.Identity)
    assert isinstance(b.blocks[0].mlp.fc1.lora_dropout["default"], nn.Dropout)


def test_meta_build_has_the_same_names_shapes_and_trainability():
    cpu = _base()
    apply_lora(cpu, _lora("pissa"))
    with torch.device("meta"):
        meta = SpacetimeDiT(CFG)
    apply_lora(meta, _lora("pissa"))
    ps = dict(meta.named_parameters())
    assert all(p.is_meta for p in ps.values())
    assert {k: (v.shape, v.requires_grad) for k, v in ps.items()} == {
        k: (v.shape, v.requires_grad) for k, v in cpu.named_parameters()
    }
    assert meta.state_dict().keys() == cpu.state_dict().keys()
    # the FSDP engine's way: materialise and load the CPU model's full state
    meta.to_empty(device="cpu")
    meta.load_state_dict(cpu.state_dict())
    torch.testing.assert_close(_out(meta), _out(cpu), rtol=0, atol=0)


def test_only_adapters_get_gradients_and_training_changes_the_output():
    model = _base()
    ref = _out(model)
    apply_lora(model, _lora())
    x, t, kw = inputs(CFG, b=2, t=2, h=4, w=4, text_len=5)
    model(x, t, **kw).square().mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(is_adapter(n) for n in grads)
    assert model.blocks[0].attn.q.lora_B["default"].weight.grad.abs().sum() > 0
    # B moves → the function moves
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p -= 0.1 * p.grad
    assert (_out(model) - ref).abs().max() > 1e-4


def test_apply_twice_and_rank_zero_are_errors():
    model = _base()
    with pytest.raises(ValueError, match=r"finetune\.lora\.rank=0"):
        apply_lora(model, LoraConfig())
    apply_lora(model, _lora())
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, _lora())


def test_is_adapter_by_path_segment():
    from peft.tuners.lora import LoraLayer

    from launch.lora import _ADAPTER_PARTS

    assert set(LoraLayer.adapter_layer_names) == _ADAPTER_PARTS  # spelled out to import peft lazily
    assert is_adapter("blocks.0.attn.q.lora_A.default.weight")
    assert is_adapter("_orig_mod.blocks.0.attn.q.lora_B.weight")
    assert not is_adapter("blocks.0.attn.q.base_layer.weight")
    assert not is_adapter("blocks.0.lora_Ax.weight")
    assert not is_adapter("final.linear.weight")


def _train_adapters(model: nn.Module, seed: int = 1) -> None:
    """Stand-in for training: move every adapter by noise, so B·A ≠ B0·A0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p += 0.05 * torch.randn(p.shape, generator=g)


def _plain_model(state: dict) -> SpacetimeDiT:
    with torch.device("meta"):
        plain = SpacetimeDiT(CFG)
    plain.to_empty(device="cpu")
    plain.load_state_dict(state)  # strict: the names are exactly the plain model's
    return plain


@pytest.mark.parametrize("init", ["default", "pissa"])
def test_merged_state_loads_into_a_plain_model_that_computes_the_lora_model(init):
    model = _base()
    apply_lora(model, _lora(init))
    _train_adapters(model)
    merged = merged_state(model)
    assert all(v.dtype == torch.float32 for v in merged.values())
    assert not any(is_adapter(k) or "base_layer" in k for k in merged)
    want = _out(model)
    torch.testing.assert_close(_out(_plain_model(merged)), want, rtol=1e-5, atol=1e-5)
    with adapters_disabled(model):  # the guard's reference: the base alone, not the trained model
        base_out = _out(model)
    assert (base_out - want).abs().max() > 1e-3
    if init == "default":
        torch.testing.assert_close(base_out, _out(_base()), rtol=0, atol=0)
    assert model.blocks[0].attn.q.lora_B["default"].weight.requires_grad


@pytest.mark.parametrize("init", ["default", "pissa", "pissa_niter_2", "olora"])
def test_adapter_state_applies_to_the_original_base(init):
    """What a loader with alpha = rank does with our file (W + B·A) onto the base as published gives the
    trained LoRA model; for pissa/olora that needs peft's conversion to rank 2r."""
    original = _base()
    model = _base()
    apply_lora(model, _lora(init, rank=4, alpha=2.0))
    _train_adapters(model)
    ad = adapter_state(model)
    rank = 8 if init != "default" else 4
    assert ad["blocks.0.attn.q.lora_A.weight"].shape == (rank, CFG.hidden_size)
    assert ad["blocks.0.mlp.fc2.lora_B.weight"].shape == (CFG.hidden_size, rank)
    assert len(ad) == 40 and all(v.dtype == torch.float32 for v in ad.values())
    state = original.state_dict()
    for key in ad:
        if ".lora_A." in key:
            module = key.removesuffix(".lora_A.weight")
            state[f"{module}.weight"] = state[f"{module}.weight"] + ad[f"{module}.lora_B.weight"] @ ad[key]
    torch.testing.assert_close(_out(_plain_model(state)), _out(model), rtol=1e-5, atol=1e-5)
    # a checkpoint's peft-named state gives the same file
    from_ckpt = adapter_state_from(model.state_dict(), model.lora_config, initial_adapters(model))
    assert from_ckpt.keys() == ad.keys() and all(torch.equal(from_ckpt[k], ad[k]) for k in ad)


def test_pissa_niter_is_seeded_and_mutating():
    """pissa_niter_N draws its randomized SVD from the seed: the rebuild an export makes of the initial
    adapters (launch.interop.adapters.lora_weights) gets the same bits; it counts as mutating."""
    from launch.lora import is_mutating, peft_init

    one, two = _base(), _base()
    apply_lora(one, _lora("pissa_niter_2"), seed=4)
    apply_lora(two, _lora("pissa_niter_2"), seed=4)
    assert one.state_dict().keys() == two.state_dict().keys()
    assert all(torch.equal(v, two.state_dict()[k]) for k, v in one.state_dict().items())
    assert initial_adapters(one) is not None
    assert is_mutating("pissa_niter_16") and is_mutating("olora") and not is_mutating("gaussian")
    assert peft_init("pissa_niter_3") == "pissa_niter_3" and peft_init("default") is True
    with pytest.raises(ValueError, match=r"finetune\.lora\.init='pissa_niter_'"):
        peft_init("pissa_niter_")


def test_pissa_conversion_needs_the_initial_adapters():
    model = _base()
    apply_lora(model, _lora("pissa"))
    with pytest.raises(ValueError, match=r"finetune\.lora\.init=pissa"):
        adapter_state_from(model.state_dict(), model.lora_config, None)
    assert initial_adapters(_lora_model("default")) is None


def _lora_model(init: str = "default") -> SpacetimeDiT:
    model = _base()
    apply_lora(model, _lora(init))
    _train_adapters(model)
    return model


def _autocast_out(model: nn.Module) -> torch.Tensor:
    """The forward as the training engine runs it (bf16 autocast; CPU's stands in for CUDA's)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return _out(model).float()


def test_bf16_base_under_autocast_computes_what_the_fp32_base_does():
    """Autocast casts each fp32 weight to bf16 for the matmul anyway, so a bf16-stored base changes no
    result. Only a GPU confirms CUDA autocast's kernels and the memory saved there."""
    ref = _lora_model()
    model = _lora_model()
    store_base(model, "bf16")
    q = model.blocks[0].attn.q
    assert q.base_layer.weight.dtype == torch.bfloat16 and q.base_layer.bias.dtype == torch.bfloat16
    assert q.lora_A["default"].weight.dtype == torch.float32  # adapters stay fp32
    assert model.final.linear.weight.dtype == torch.float32  # fp32-compute layers stay fp32
    assert model.t_proj[1].weight.dtype == torch.float32
    torch.testing.assert_close(_autocast_out(model), _autocast_out(ref), rtol=1e-5, atol=1e-5)
    # without autocast (an fp32 CPU run) the bf16 weights are upcast for the call rather than failing
    out, want = _out(model), _out(ref)
    assert 0 < (out - want).abs().max() < 0.02 * want.abs().max()
    # merged: a plain fp32 model computing what this one does in fp32
    torch.testing.assert_close(_out(_plain_model(merged_state(model))), out, rtol=1e-5, atol=1e-5)


def test_fp8_base_under_autocast_and_merge():
    """fp8 storage: e4m3 weights with a power-of-two per-tensor scale, dequantised to the input dtype.
    Only a GPU confirms the CUDA autocast path and the memory; the arithmetic is the same."""
    ref = _lora_model()
    model = _lora_model()
    w0 = model.blocks[0].mlp.fc1.base_layer.weight.detach().clone()
    store_base(model, "fp8")
    fc1 = model.blocks[0].mlp.fc1.base_layer
    assert isinstance(fc1, Fp8Linear) and fc1.weight.dtype == torch.float8_e4m3fn
    assert isinstance(model.text_proj.fc1, Fp8Linear)  # frozen, not adapted: stored so too
    scale = fc1.weight_scale.item()
    assert scale == 2.0 ** round(torch.log2(torch.tensor(scale)).item())
    assert w0.abs().max() / scale <= 448 and w0.abs().max() / scale > 224
    deq = fc1.weight.float() * scale
    normal = w0.abs() > 2.0**-6 * scale  # e4m3's normal range: 3 mantissa bits, error ≤ 2^-4 relative
    assert ((deq - w0).abs()[normal] <= 2.0**-4 * w0.abs()[normal]).all()
    assert (deq != w0).any()
    assert model.blocks[0].mlp.fc1.lora_B["default"].weight.dtype == torch.float32
    out, want = _autocast_out(model), _autocast_out(ref)
    assert (out - want).abs().max() < 0.1 * want.abs().max()
    # the adapters still learn through the fp8 base
    x, t, kw = inputs(CFG, b=2, t=2, h=4, w=4, text_len=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, t, **kw).float().square().mean().backward()
    assert model.blocks[1].attn.q.lora_A["default"].weight.grad.abs().sum() > 0
    assert fc1.weight.grad is None
    # merged: the dequantised base plus the adapters, a plain fp32 model computing what this one does
    torch.testing.assert_close(_out(_plain_model(merged_state(model))), _out(model), rtol=1e-5, atol=1e-5)


def test_fp8_meta_build_loads_the_cpu_models_state():
    cpu = _lora_model()
    store_base(cpu, "fp8")
    with torch.device("meta"):
        meta = SpacetimeDiT(CFG)
    apply_lora(meta, _lora())
    store_base(meta, "fp8")
    assert {k: (v.dtype, v.shape) for k, v in meta.state_dict().items()} == {
        k: (v.dtype, v.shape) for k, v in cpu.state_dict().items()
    }
    meta.to_empty(device="cpu")
    meta.load_state_dict(cpu.state_dict())
    torch.testing.assert_close(_out(meta), _out(cpu), rtol=0, atol=0)


def test_store_base_without_frozen_linears_is_an_error():
    with pytest.raises(ValueError, match=r"finetune\.base_dtype=bf16"):
        store_base(_base(), "bf16")


def test_base_fingerprint_identifies_the_base_bits():
    a, b = _base(seed=0), _base(seed=0)
    fa = base_fingerprint(a)
    assert len(fa) == 64 and int(fa, 16) >= 0
    assert base_fingerprint(b) == fa  # same bits, same fingerprint
    with torch.no_grad():
        w = b.blocks[1].mlp.fc2.weight
        w.view(-1)[7] = torch.nextafter(w.view(-1)[7], torch.tensor(1.0))  # one ulp of one weight
    assert base_fingerprint(b) != fa
    assert base_fingerprint(_base(seed=0).to(torch.bfloat16)) != fa  # the dtype is part of it
    apply_lora(a, _lora())
    with pytest.raises(ValueError, match="before apply_lora"):
        base_fingerprint(a)
