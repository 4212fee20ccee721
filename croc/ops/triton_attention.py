"""Custom ops around the Triton mixed-attention kernels (``torch.ops.croc.mixed_attention_*``).

``mixed_attention_fwd`` and ``mixed_attention_bwd`` take plain tensors only (q, k, v, the
intervals and one packed int32 schedule per pass from :mod:`croc.ops.schedule`), carry fake
functions for tracing and are wired together with ``register_autograd``, so ``torch.compile``
(fullgraph) traces a model that calls :func:`croc.mixed_attention` without graph breaks.

:func:`triton_mixed_attention` is the entry the public function dispatches to; it picks the tile
config once, fetches the schedules (cached on the mask; range or index-list, chosen on the host
from ``mask.monotone``) and calls the forward op.
"""

from __future__ import annotations

import torch

from croc.kernels import INTERPRET, attention_backward, attention_config, attention_forward
from croc.kernels.mixed_attention import launch_ready, tma_ready
from croc.mask import MixedMask
from croc.ops.schedule import pass_schedules

__all__ = ["mixed_attention_bwd", "mixed_attention_fwd", "triton_mixed_attention"]


def _ready(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any strides but need the head dim contiguous and in-tile offsets in int32
    (blocks are at most 128 rows); copy only when a tensor does not qualify."""
    return launch_ready(t, 128)


def _empty_lse(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("croc::mixed_attention_fwd", mutates_args=())
def mixed_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    fwd_schedule: torch.Tensor,
    dq_schedule: torch.Tensor,
    dkdv_schedule: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of mixed attention.

    Args:
        q: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D] (fp16/bf16/fp32, one dtype).
        kv_start, kv_end: int32 [B, Lq], contiguous.
        fwd_schedule: int32 [B, nQ, W], the forward tiling's packed schedule
            (:func:`croc.ops.schedule.pass_schedules`; W == 4: range schedule).
        dq_schedule, dkdv_schedule: the backward's (int32 [B, nQ', W'], [B, nK, W'']), unused
            here and saved for the backward.
        scale: softmax scale, > 0.

    Returns:
        out [B, Hq, Lq, D] in q's dtype (laid out like q) and lse2, fp32 [B, Hq, Lq].
    """
    q, k, v = (_ready(t) for t in (q, k, v))
    if q.numel() == 0:
        return torch.zeros_like(q), _empty_lse(q).fill_(float("inf"))
    config = attention_config(q.shape[-1], q.dtype, q.device, tma_ready(k, v))
    return attention_forward(q, k, v, kv_start, kv_end, fwd_schedule, scale, config.forward)


@mixed_attention_fwd.register_fake
def _(q, k, v, kv_start, kv_end, *schedules_and_scale):
    q = _ready(q)
    return torch.empty_like(q), _empty_lse(q)


@torch.library.custom_op("croc::mixed_attention_bwd", mutates_args=())
def mixed_attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse2: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    dq_schedule: torch.Tensor,
    dkdv_schedule: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of mixed attention (deterministic: no atomics).

    Args:
        dout, out: [B, Hq, Lq, D]; lse2: fp32 [B, Hq, Lq]; the rest as in :func:`mixed_attention_fwd`.

    Returns:
        dq [B, Hq, Lq, D], dk, dv [B, Hkv, Lk, D] in the input dtype, laid out like q, k, v.
    """
    dout, q, k, v, out = (_ready(t) for t in (dout, q, k, v, out))
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    config = attention_config(q.shape[-1], q.dtype, q.device)
    return attention_backward(
        dout, q, k, v, out, lse2, kv_start, kv_end, dq_schedule, dkdv_schedule, scale, config.dq, config.dkdv
    )


@mixed_attention_bwd.register_fake
def _(dout, q, k, v, *rest):
    q, k, v = (_ready(t) for t in (q, k, v))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_NUM_FWD_INPUTS = 9


def _setup_context(ctx, inputs, output):
    q, k, v, kv_start, kv_end, _, dq_schedule, dkdv_schedule, scale = inputs
    ctx.scale = scale
    out, lse2 = output
    ctx.save_for_backward(q, k, v, out, lse2, kv_start, kv_end, dq_schedule, dkdv_schedule)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse2, kv_start, kv_end, *schedules = ctx.saved_tensors
    dq, dk, dv = mixed_attention_bwd(grad_out, q, k, v, out, lse2, kv_start, kv_end, *schedules, ctx.scale)
    return (dq, dk, dv) + (None,) * (_NUM_FWD_INPUTS - 3)


mixed_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def triton_mixed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MixedMask, scale: float, schedule: str = "auto"
) -> torch.Tensor:
    """Mixed attention through the Triton kernels (inputs already validated by the public API).

    Args:
        q: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D]; fp16/bf16/fp32; D in 64, 80, 96, 128.
        mask: the MixedMask; its schedules are computed once per tiling and cached on it.
        scale: softmax scale, > 0 (the kernels take the row max before scaling).
        schedule: ``"auto"`` (range schedules for a monotone mask, else index lists), ``"range"``
            or ``"index"`` (for A/B timing and tests).

    Returns:
        [B, Hq, Lq, D] in q's dtype.

    Raises:
        ValueError: unsupported head dim, scale <= 0, CPU tensors without the Triton
            interpreter, or ``schedule="range"`` for a mask that is not monotone.
    """
    if q.device.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"backend='triton' got tensors on {q.device}: the Triton kernels need CUDA tensors, or "
            "TRITON_INTERPRET=1 set before croc is imported (interpreter, for tests)"
        )
    if not scale > 0:
        raise ValueError(f"scale must be > 0 for backend='triton', got {scale}")
    config = attention_config(q.shape[-1], q.dtype, q.device, tma_ready(k, v))  # the forward's tile
    schedules = pass_schedules(mask, config, schedule)
    out, _ = mixed_attention_fwd(q, k, v, mask.kv_start, mask.kv_end, *schedules, scale)
    return out
