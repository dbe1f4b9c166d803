"""The single attention entry point of the model, and the hook point for context parallelism.

Every attention in :mod:`dit.model` calls :func:`attention` through an :class:`AttentionCore`
submodule (``blocks.{i}.attn.core``, ``blocks.{i}.cross_attn.core``). Tensors are laid out
B×N×H×Dh (batch, tokens, heads, head dim): the layout FlashAttention takes natively, and the one in
which a Ulysses all-to-all swaps the token and head axes without a copy of the other two.

Context parallelism hooks in here, from outside the model: ``parallel/`` replaces (or wraps) the
``core`` submodule with one that exchanges q/k/v between ranks, calls the wrapped core, and exchanges
the output back (e.g. ``deepspeed.sequence.layer.DistributedAttention(core, group, scatter_idx=2,
gather_idx=1)``). The contract a replacement must keep is ``core(q, k, v, key_mask=None)`` with
B×N×H×Dh tensors in and out. The token sequence itself is cut and gathered at the model's other
named points (``seq_start``, ``blocks_end``, ``seq_end``: see :mod:`dit.model`).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)


def _find_flash_attn():
    """FlashAttention-3's ``flash_attn_func`` (Hopper build) if installed, else FlashAttention-2's."""
    try:
        from flash_attn_interface import flash_attn_func  # FlashAttention-3

        return flash_attn_func
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_func  # FlashAttention-2

        return flash_attn_func
    except ImportError:
        return None


# Resolved once, when the first flash_attn AttentionCore is built: imports inside the traced
# forward would break torch.compile's graph at every attention call.
_FLASH_ATTN = None
_FLASH_ATTN_RESOLVED = False
NOT_INSTALLED = "flash-attn is not installed"
_FALLBACKS_LOGGED: set[str] = set()


def _flash_attn_func():
    global _FLASH_ATTN, _FLASH_ATTN_RESOLVED
    if not _FLASH_ATTN_RESOLVED:
        _FLASH_ATTN, _FLASH_ATTN_RESOLVED = _find_flash_attn(), True
    if _FLASH_ATTN is None:
        _log_fallback(NOT_INSTALLED)
    return _FLASH_ATTN


def flash_attn_fallback(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> str | None:
    """Why ``backend='flash_attn'`` cannot take these inputs (None: it can)."""
    if _FLASH_ATTN is None:
        return NOT_INSTALLED
    if not q.is_cuda:
        return f"the tensors are on {q.device.type}, FlashAttention needs CUDA"
    dtypes = {q.dtype, k.dtype, v.dtype}
    if len(dtypes) > 1 or q.dtype not in (torch.float16, torch.bfloat16):
        names = "/".join(str(z.dtype).removeprefix("torch.") for z in (q, k, v))
        return f"q/k/v are {names}, FlashAttention takes one of float16/bfloat16"
    if key_mask is not None:
        return "a key mask is given (padded text keys), which flash_attn_func does not take"
    return None


@torch.compiler.disable
def _log_fallback(reason: str) -> None:
    # once per reason; kept out of compiled graphs (a logging call breaks them), and the caller's
    # membership test makes dynamo guard on the set, so a block recompiles once after the warning
    if reason not in _FALLBACKS_LOGGED:
        _FALLBACKS_LOGGED.add(reason)
        log.warning("attention backend 'flash_attn' not used (%s): using SDPA", reason)


def _math(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    # The reference: explicit softmax in fp32, whatever the input dtype.
    scale = q.shape[-1] ** -0.5
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale  # B, H, Nq, Nk
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.float()).to(q.dtype)  # B, Nq, H, Dh


def attention(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, backend: str = "sdpa"
) -> Tensor:
    """Scaled dot-product attention (softmax scale 1/sqrt(Dh), no causal mask).

    Args:
        q: queries, B×Nq×H×Dh.
        k: keys, B×Nk×H×Dh.
        v: values, B×Nk×H×Dh.
        key_mask: optional B×Nk bool, True where a key may be attended (padded text tokens are
            False). A row with no valid key returns zeros rather than NaN.
        backend: ``sdpa`` (torch SDPA; on CUDA it picks flash / cuDNN / memory-efficient kernels),
            ``flash_attn`` (FlashAttention-3 or -2 for unmasked bf16/fp16 CUDA tensors; anything
            else, masked cross-attention included, goes to SDPA, with a warning logged once per
            reason: :func:`flash_attn_fallback`) or ``math`` (fp32 reference).

    Returns:
        B×Nq×H×Dh, in q's dtype.
    """
    if backend == "flash_attn":
        reason = flash_attn_fallback(q, k, v, key_mask)
        if reason is None:
            out = _FLASH_ATTN(q, k, v)
            return out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the LSE
        if reason not in _FALLBACKS_LOGGED:
            _log_fallback(reason)
    elif backend not in ("sdpa", "math"):
        raise ValueError(f"attention backend {backend!r}: expected 'sdpa', 'flash_attn' or 'math'")

    mask = has_key = None
    if key_mask is not None:
        # A sample whose keys are all masked (an empty caption) would softmax over nothing and give
        # NaN; let it attend everywhere and zero its output, which is what "no context" means.
        has_key = key_mask.any(dim=-1)  # B
        mask = (key_mask | ~has_key[:, None])[:, None, None, :]  # B, 1, 1, Nk
    if backend == "math":
        out = _math(q, k, v, mask)
    else:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        ).transpose(1, 2)  # B, Nq, H, Dh
    if has_key is not None:
        out = out * has_key[:, None, None, None].to(out.dtype)
    return out


class AttentionCore(nn.Module):
    """Parameter-free module around :func:`attention`; the context-parallel hook point (see above)."""

    def __init__(self, backend: str = "sdpa"):
        super().__init__()
        self.backend = backend
        if backend == "flash_attn":
            _flash_attn_func()

    def forward(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
        return attention(q, k, v, key_mask=key_mask, backend=self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend}"
