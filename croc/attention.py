"""Public mixed attention: ``croc.mixed_attention``."""

from __future__ import annotations

import math

import torch

from croc.mask import MixedMask
from croc.ops.reference_attention import reference_mixed_attention

try:
    from croc.ops.triton_attention import triton_mixed_attention
except ImportError:  # triton is an optional dependency
    triton_mixed_attention = None

__all__ = ["mixed_attention"]

_BACKENDS = ("auto", "triton", "reference", "flex")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # float64: reference only


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MixedMask) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have shape [batch, heads, seq_len, head_dim], got {tuple(t.shape)}"
            )
        if t.dtype not in _DTYPES:
            raise ValueError(
                f"{name} must be float32, float16 or bfloat16 (float64: reference), got {t.dtype}"
            )
    if not isinstance(mask, MixedMask):
        raise TypeError(f"mask must be a croc.MixedMask, got {type(mask).__name__}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    batch, heads_q, seq_q, head_dim = q.shape
    if k.shape[0] != batch:
        raise ValueError(f"k/v batch {k.shape[0]} differs from q batch {batch}")
    if k.shape[3] != head_dim:
        raise ValueError(f"k/v head_dim {k.shape[3]} differs from q head_dim {head_dim}")
    heads_kv = k.shape[1]
    if heads_kv == 0 or heads_q % heads_kv:
        raise ValueError(f"q heads ({heads_q}) must be a multiple of k/v heads ({heads_kv})")
    if tuple(mask.kv_start.shape) != (batch, seq_q):
        raise ValueError(
            f"mask has intervals of shape {tuple(mask.kv_start.shape)}, expected ({batch}, {seq_q})"
        )
    if mask.num_keys != k.shape[2]:
        raise ValueError(f"mask.num_keys = {mask.num_keys} but k/v have {k.shape[2]} keys")
    if mask.device != q.device:
        raise ValueError(f"mask is on {mask.device} but q is on {q.device}; use mask.to(device)")


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_mixed_attention is not None else "reference"
    if backend == "triton" and triton_mixed_attention is None:
        raise ValueError("backend='triton' needs the triton package (pip install croc[triton])")
    return backend


def mixed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: MixedMask,
    scale: float | None = None,
    backend: str = "auto",
    kernel_options: dict | None = None,
) -> torch.Tensor:
    """Attention under a :class:`croc.MixedMask` (bidirectional spans, causal text, packing, padding).

    Args:
        q: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D] with ``Hq % Hkv == 0`` (SDPA layout; GQA/MQA).
            float32, float16 or bfloat16 (float64 with the reference backend), one dtype and device.
        mask: MixedMask with ``kv_start``/``kv_end`` of shape [B, Lq] and ``num_keys == Lk``.
        scale: softmax scale, default ``1 / sqrt(D)``.
        backend: ``"auto"`` (Triton for CUDA tensors, the reference elsewhere), ``"triton"`` or
            ``"reference"`` (SDPA with the dense mask, O(L²) memory). ``"triton"``: block-sparse
            flash attention, O(L) memory, deterministic backward; head dims 64, 80, 96, 128 (80 and
            96 padded to 128 in registers); fp32 inputs use TF32 dots; CPU tensors only under
            TRITON_INTERPRET=1 (the Triton interpreter, for tests).

        kernel_options: backend="flex" only: passed to ``flex_attention`` (e.g. its FLASH backend).
            ``"flex"``: compiled FlexAttention with ``mask.to_block_mask()`` (torch >= 2.6; CPU: forward only).

    Returns:
        [B, Hq, Lq, D] in q's dtype. Queries with an empty interval get zeros, and zero gradients.
    """
    _validate(q, k, v, mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    chosen = _resolve_backend(backend, q.device)
    if chosen != "reference" and q.dtype == torch.float64:
        raise ValueError("q/k/v: float64 is supported by backend='reference' only")
    if kernel_options is not None and chosen != "flex":
        raise ValueError(f"kernel_options is for backend='flex' only, got backend={backend!r}")
    if chosen == "flex":
        from croc.ops.flex_attention import flex_mixed_attention

        bm = mask.to_block_mask()
        return flex_mixed_attention(q, k, v, mask.kv_start, mask.kv_end, bm, scale, kernel_options)
    if chosen == "triton":
        return triton_mixed_attention(q, k, v, mask, scale)
    return reference_mixed_attention(q, k, v, mask.kv_start, mask.kv_end, scale)
