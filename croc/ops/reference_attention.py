"""Reference mixed attention: exact math through SDPA with a dense boolean mask.

This is the portable backend (any device, fp32/fp16/bf16) and the oracle the kernels are tested
against. It materialises the [B, 1, Lq, Lk] mask, so it costs O(L²) memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_mixed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Softmax attention where query ``i`` of row ``b`` sees keys ``[kv_start[b,i], kv_end[b,i])``.

    Args:
        q: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D] with ``Hq % Hkv == 0`` (GQA by head repetition).
        kv_start, kv_end: int32 [B, Lq].
        scale: softmax scale.

    Returns:
        [B, Hq, Lq, D] in q's dtype; rows with an empty interval are exactly zero, and so are
        the gradients they send (never NaN).
    """
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    keys = torch.arange(k.shape[2], device=q.device, dtype=kv_start.dtype)
    visible = (keys >= kv_start[..., None]) & (keys < kv_end[..., None])  # [B, Lq, Lk]
    empty_row = kv_end <= kv_start  # [B, Lq]
    # An all-False row makes softmax NaN; let empty rows see everything, then zero them.
    visible = visible | empty_row[..., None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None], scale=scale)
    return out * (~empty_row)[:, None, :, None].to(out.dtype)
