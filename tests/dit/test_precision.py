"""Mixed precision inside the model: what stays fp32 and what computes in bf16 (Wan 2.1's split).

Under autocast: the diffusion time, fps, RoPE tables, the conditioning vector and every modulation
vector are fp32, the residual stream is fp32, q, k and v reach the attention core in one dtype
(bf16), and the output head is fp32. A model cast to bf16 without autocast stays bf16 throughout.

The CUDA dtype rules are checked on fake ``cuda`` tensors under CUDA's autocast kernels
(:func:`tests.dit.emulate.fake_cuda`): under them the qk RMSNorm returns fp32, which CPU autocast
does not do. Values are checked on CPU under CPU bf16 autocast. Only a GPU confirms the CUDA kernels'
numerics.
"""

from __future__ import annotations

import pytest
import torch

from dit.config import get_preset
from dit.embeddings import Fp32Linear
from dit.model import SpacetimeDiT
from tests.dit.emulate import fake_cuda
from tests.dit.helpers import inputs, random_model

F32, BF16 = torch.float32, torch.bfloat16


def _cfg(**kw):
    return get_preset("tiny", fps_conditioning=True, **kw)


class Recorder:
    """Forward hooks that keep the dtypes of what named modules take and return."""

    def __init__(self, model: SpacetimeDiT):
        self.seen: dict[str, list] = {}
        self.handles = []
        for name, m in model.named_modules():
            if name:
                self.handles.append(m.register_forward_hook(self._hook(name), with_kwargs=True))

    def _hook(self, name):
        def hook(module, args, kwargs, out):
            flat = [*args, *kwargs.values(), *(out if isinstance(out, tuple) else (out,))]
            self.seen.setdefault(name, []).append(flat)

        return hook

    def dtypes(self, name: str, call: int = 0) -> list:
        out = []
        for v in self.seen[name][call]:
            if isinstance(v, torch.Tensor):
                out.append(v.dtype)
            elif isinstance(v, tuple):
                out.append(tuple(z.dtype for z in v if isinstance(z, torch.Tensor)))
        return out

    def values(self, name: str, call: int = 0) -> list:
        return self.seen[name][call]


def _tensors(values) -> list[torch.Tensor]:
    out = []
    for v in values:
        out += [v] if torch.is_tensor(v) else _tensors(v) if isinstance(v, tuple) else []
    return out


def _fake_forward(cfg, dtype=BF16) -> Recorder:
    with torch.device("meta"):
        model = SpacetimeDiT(cfg)
    x, t, kw = inputs(cfg, t=4)
    with fake_cuda(dtype):
        model.to_empty(device="cuda").requires_grad_(False)  # fake parameters: no autograd on them
        rec = Recorder(model)
        x, t, *kw_values = (torch.empty(v.shape, dtype=v.dtype, device="cuda") for v in (x, t, *kw.values()))
        out = model(x, t, **dict(zip(kw, kw_values, strict=True)))
    rec.out = out
    return rec


@pytest.mark.slow
@pytest.mark.parametrize("modulation", ["shared", "per_block"])
@pytest.mark.parametrize("layout", ["full", "factorized"])
def test_cuda_autocast_keeps_times_rope_and_modulation_fp32_and_feeds_attention_one_dtype(modulation, layout):
    rec = _fake_forward(_cfg(modulation=modulation, attention_layout=layout))
    assert rec.dtypes("patch_embed")[-1] == BF16  # CUDA autocast is acting on the linears
    # the qk RMSNorm returns fp32 under CUDA autocast: this is why q and k need the cast
    assert rec.dtypes("blocks.0.attn.norm_q")[-1] == F32
    assert rec.dtypes("t_embedder") == [F32, F32] and rec.dtypes("fps_embedder") == [F32, F32]
    assert rec.dtypes("rope")[-2:] == [F32, F32]
    assert rec.dtypes("t_proj")[-1] == F32
    for i in range(2):
        x, mod, _, rope, context, mask, out = rec.values(f"blocks.{i}")
        assert (x.dtype, mod.dtype, out.dtype) == (F32, F32, F32)  # fp32 residual stream, fp32 modulation
        assert {r.dtype for r in rope} == {F32}
        assert set(rec.dtypes(f"blocks.{i}.modulation")[1:]) == {F32}
        for core in ("attn.core", "cross_attn.core"):
            q, k, v, *_ = rec.values(f"blocks.{i}.{core}")
            assert (q.dtype, k.dtype, v.dtype) == (BF16, BF16, BF16), core
    assert rec.dtypes("final")[-1] == F32 and rec.out.dtype == F32  # Wan's fp32 head


def test_without_autocast_on_cuda_nothing_is_cast():
    rec = _fake_forward(_cfg(), dtype=None)
    assert rec.out.dtype == F32
    assert rec.dtypes("blocks.1.attn.core")[:3] == [F32, F32, F32]


@pytest.mark.slow
def test_cpu_autocast_fp32_islands_are_bitwise_fp32_and_output_is_near():
    """The time embedding, modulation vectors and RoPE tables under bf16 autocast are the very bits of
    the fp32 run (they are computed in fp32, not merely returned as fp32); the output is within bf16
    error of the fp32 one."""
    cfg = _cfg(modulation="per_block")
    model = random_model(cfg)
    x, t, kw = inputs(cfg, t=4)
    t = torch.tensor([999.3, 218.7])  # bf16 would make these 1000 and 219
    runs = []
    for autocast in (False, True):
        rec = Recorder(model)
        with torch.autocast("cpu", dtype=BF16, enabled=autocast):
            out = model(x, t, **kw)
        runs.append((rec, out))
        for h in rec.handles:
            h.remove()
    (ref, ref_out), (got, got_out) = runs
    for name in ("t_embedder", "fps_embedder", "rope", "blocks.0.modulation", "final.modulation"):
        a, b = _tensors(ref.values(name)), _tensors(got.values(name))
        assert len(a) == len(b) > 0 and all(torch.equal(u, w) for u, w in zip(a, b, strict=True)), name
    assert torch.equal(got.values("t_embedder")[0], t[:, None])  # B, 1: the times arrive untouched
    assert got.dtypes("blocks.1")[-1] == F32 and got_out.dtype == F32
    assert got.dtypes("blocks.1.attn.q")[-1] == BF16  # the matmuls did run in bf16
    err = (got_out - ref_out).abs().max() / ref_out.abs().max()
    assert 1e-5 < err < 3e-2, err


def test_model_cast_to_bf16_stays_bf16_without_autocast():
    cfg = _cfg()
    model = random_model(cfg).to(BF16)
    x, t, kw = inputs(cfg, t=4)
    kw = {k: v.to(BF16) if v.is_floating_point() else v for k, v in kw.items()}
    rec = Recorder(model)
    out = model(x.to(BF16), t, **kw)
    assert rec.dtypes("blocks.1")[-1] == BF16  # the residual stream keeps the model's dtype
    assert rec.dtypes("blocks.1.attn.core")[:3] == [BF16] * 3
    assert rec.dtypes("t_embedder")[-1] == F32  # the fp32 islands upcast the bf16 weights
    assert torch.isfinite(out).all()


def test_fp32_linear_is_a_linear_in_fp32():
    lin = Fp32Linear(8, 4)
    ref = torch.nn.Linear(8, 4)
    ref.load_state_dict(lin.state_dict())  # the same keys as nn.Linear
    x = torch.randn(3, 8)
    want = ref(x)
    assert torch.equal(lin(x), want)
    with torch.autocast("cpu", dtype=BF16):
        assert torch.equal(lin(x), want) and ref(x).dtype == BF16
    lin16 = lin.to(BF16)
    assert lin16(x.to(BF16)).dtype == F32
