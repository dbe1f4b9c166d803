"""Ring attention's fused block kernels: which one runs where, and the CUDA branches' shapes and dtypes.

No GPU here: the CUDA branches run under ``FakeTensorMode`` with ``cuda`` tensors and a fake process
group (``torch.testing``'s, whose sends and receives do nothing), which runs each aten op's schema and
meta function. That checks the argument lists of the flash/efficient forward and backward ops, the
dtypes and shapes of their outputs (the efficient kernel's LSE padded to a multiple of 32), that the
merge and the gradient sums are fp32, and that no op returns a B×H×Nq×Nk tensor. What only a GPU can
confirm: the kernels' values (the ring's arithmetic is checked for values on CPU, in
``test_collectives.py``), and the CUDA autocast path (emulated here with CPU autocast).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

from dit.attention import attention
from parallel.ring import choose_kernel, ring_attention, ring_backward, ring_forward
from tests.parallel.op_recorder import OpRecorder

KERNEL_OPS = {
    "flash": (
        "aten._scaled_dot_product_flash_attention",
        "aten._scaled_dot_product_flash_attention_backward",
    ),
    "efficient": (
        "aten._scaled_dot_product_efficient_attention",
        "aten._scaled_dot_product_efficient_attention_backward",
    ),
}


@pytest.mark.parametrize(
    ("device", "dtype", "head_dim", "capability", "want"),
    [
        ("cpu", torch.bfloat16, 64, None, "cpu_flash"),
        ("cpu", torch.float32, 512, None, "cpu_flash"),
        ("cuda", torch.bfloat16, 128, (9, 0), "flash"),
        ("cuda", torch.float16, 256, (8, 0), "flash"),
        ("cuda", torch.bfloat16, 64, None, "flash"),
        ("cuda", torch.float32, 64, (9, 0), "efficient"),  # flash has no fp32 kernel
        ("cuda", torch.bfloat16, 320, (9, 0), "efficient"),  # flash stops at head dim 256
        ("cuda", torch.float16, 64, (7, 5), "efficient"),  # Turing: no FlashAttention-2
    ],
)
def test_kernel_choice(device, dtype, head_dim, capability, want):
    assert choose_kernel(device, dtype, head_dim, capability) == want


def test_kernel_choice_refuses_other_devices_and_unbuilt_head_dims():
    with pytest.raises(ValueError, match="'mps'"):
        choose_kernel("mps", torch.float16, 64)
    # neither CUDA kernel takes a head dim off a multiple of 8 (the efficient one fails to launch)
    for dtype in (torch.bfloat16, torch.float32):
        with pytest.raises(ValueError, match=r"multiple of 8, got 36 .*parallel\.cp_ring=1"):
            choose_kernel("cuda", dtype, 36, (9, 0))
    assert choose_kernel("cpu", torch.float32, 36) == "cpu_flash"


@pytest.fixture
def fake_group():
    """A two-rank fake process group in this process (no communication, no other process)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    assert not dist.is_initialized()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("dtype", "head_dim", "kernel"),
    [
        (torch.bfloat16, 64, "flash"),
        (torch.float16, 128, "flash"),
        (torch.float32, 64, "efficient"),
        (torch.bfloat16, 320, "efficient"),
    ],
)
def test_cuda_ring_runs_fused_kernels_with_fp32_merge(fake_group, dtype, head_dim, kernel):
    b, h, n = 2, 3, 1000  # n: this rank's tokens, not a multiple of 32 (the efficient LSE is padded)
    with FakeTensorMode():
        q, k, v = (torch.empty(b, h, n, head_dim, device="cuda", dtype=dtype) for _ in range(3))
        dout = torch.empty(b, n, h, head_dim, device="cuda", dtype=dtype).transpose(
            1, 2
        )  # as autograd gives it
        with OpRecorder() as rec:
            out, lse, state = ring_forward(q, k, v, fake_group)
            grads = ring_backward(dout, q, k, v, out, lse, fake_group, state)
    assert state["kernel"] == kernel
    fwd, bwd = KERNEL_OPS[kernel]
    assert len(rec.named(fwd)) == len(rec.named(bwd)) == 2  # one block per rank of the ring
    assert rec.named(fwd)[0][1] == ((b, h, -(-n // 32) * 32 if kernel == "efficient" else n), torch.float32)
    assert (out.shape, out.dtype, out.device.type) == ((b, h, n, head_dim), dtype, "cuda")
    assert (lse.shape, lse.dtype) == ((b, h, n), torch.float32)
    assert [(g.shape, g.dtype) for g in grads] == [((b, h, n, head_dim), dtype)] * 3
    assert rec.accumulator_dtypes() == {torch.float32}
    assert rec.largest() < b * h * n * n  # no score matrix, in forward or backward
    assert not rec.named("aten.bmm") and not rec.named("aten.mm")  # nothing unfused either


def test_one_rank_follows_autocast_and_promotes_without_it():
    """Under autocast the kernels run in its dtype even for fp32 q/k beside a bf16 v (RMS-normed q/k
    under CUDA autocast arrive in fp32); without it mixed inputs are promoted. CPU autocast stands in
    for CUDA's."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 40, 4, 16, generator=g, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 40, 4, 16, generator=g).to(torch.bfloat16).requires_grad_()
    ref = attention(q, k, v.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ring_attention(q, k, v, None)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 2e-2 * ref.abs().max()
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and v.grad.dtype == torch.bfloat16
    promoted = ring_attention(q, k, v, None)
    assert promoted.dtype == torch.float32
    assert (promoted - ref).abs().max() < 1e-5 * ref.abs().max()
