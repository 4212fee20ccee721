"""Custom ops around the Triton mixed-attention kernels (``torch.ops.croc.mixed_attention_*``).

``mixed_attention_fwd`` and ``mixed_attention_bwd`` take plain tensors only (q, k, v, the
intervals and the tile schedules from :meth:`croc.MixedMask.block_metadata`), carry fake
functions for tracing and are wired together with ``register_autograd``, so ``torch.compile``
(fullgraph) traces a model that calls :func:`croc.mixed_attention` without graph breaks.

:func:`triton_mixed_attention` is the entry the public function dispatches to; it picks the tile
configs, fetches the schedules (cached on the mask, per tiling) and calls the forward op.
"""

from __future__ import annotations

import torch

from croc.kernels import INTERPRET, attention_backward, attention_config, attention_forward
from croc.mask import BlockMetadata, MixedMask

__all__ = ["mixed_attention_bwd", "mixed_attention_fwd", "triton_mixed_attention"]


def _last_dim_dense(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any strides but need the head dim contiguous; copy only if it is not."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _empty_lse(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("croc::mixed_attention_fwd", mutates_args=())
def mixed_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    fwd_blocks: torch.Tensor,
    fwd_partial: torch.Tensor,
    fwd_total: torch.Tensor,
    dq_blocks: torch.Tensor,
    dq_partial: torch.Tensor,
    dq_total: torch.Tensor,
    dkdv_blocks: torch.Tensor,
    dkdv_partial: torch.Tensor,
    dkdv_total: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of mixed attention.

    Args:
        q: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D] (fp16/bf16/fp32, one dtype).
        kv_start, kv_end: int32 [B, Lq], contiguous.
        fwd_blocks, fwd_partial, fwd_total: the forward tiling's ``kv_blocks_partial_first``
            int32 [B, nQ, nK], ``kv_partial_count`` and ``kv_block_count`` int32 [B, nQ].
        dq_*, dkdv_*: the backward schedules (unused here, saved for the backward): the dQ
            tiling's key-block lists and the dK/dV tiling's query-block lists
            (``q_blocks_partial_first`` int32 [B, nK, nQ], ``q_partial_count``, ``q_block_count``).
        scale: softmax scale.

    Returns:
        out [B, Hq, Lq, D] in q's dtype (laid out like q) and lse2, fp32 [B, Hq, Lq].
    """
    q, k, v = (_last_dim_dense(t) for t in (q, k, v))
    if q.numel() == 0:
        return torch.zeros_like(q), _empty_lse(q).fill_(float("inf"))
    config = attention_config(q.shape[-1], q.dtype, q.device)
    return attention_forward(
        q, k, v, kv_start, kv_end, (fwd_blocks, fwd_partial, fwd_total), scale, config.forward
    )


@mixed_attention_fwd.register_fake
def _(q, k, v, kv_start, kv_end, *schedules_and_scale):
    q = _last_dim_dense(q)
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
    dq_blocks: torch.Tensor,
    dq_partial: torch.Tensor,
    dq_total: torch.Tensor,
    dkdv_blocks: torch.Tensor,
    dkdv_partial: torch.Tensor,
    dkdv_total: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of mixed attention (deterministic: no atomics).

    Args:
        dout, out: [B, Hq, Lq, D]; lse2: fp32 [B, Hq, Lq]; the rest as in :func:`mixed_attention_fwd`.

    Returns:
        dq [B, Hq, Lq, D], dk, dv [B, Hkv, Lk, D] in the input dtype, laid out like q, k, v.
    """
    dout, q, k, v, out = (_last_dim_dense(t) for t in (dout, q, k, v, out))
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    config = attention_config(q.shape[-1], q.dtype, q.device)
    return attention_backward(
        dout, q, k, v, out, lse2, kv_start, kv_end,
        (dq_blocks, dq_partial, dq_total), (dkdv_blocks, dkdv_partial, dkdv_total),
        scale, config.dq, config.dkdv,
    )  # fmt: skip


@mixed_attention_bwd.register_fake
def _(dout, q, k, v, *rest):
    q, k, v = (_last_dim_dense(t) for t in (q, k, v))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_NUM_FWD_INPUTS = 15


def _setup_context(ctx, inputs, output):
    q, k, v, kv_start, kv_end = inputs[:5]
    backward_schedules = inputs[8:14]
    ctx.scale = inputs[14]
    out, lse2 = output
    ctx.save_for_backward(q, k, v, out, lse2, kv_start, kv_end, *backward_schedules)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse2, kv_start, kv_end, *schedules = ctx.saved_tensors
    dq, dk, dv = mixed_attention_bwd(grad_out, q, k, v, out, lse2, kv_start, kv_end, *schedules, ctx.scale)
    return (dq, dk, dv) + (None,) * (_NUM_FWD_INPUTS - 3)


mixed_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _schedule_rows(meta: BlockMetadata) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query block: its key blocks partial-first, the partial count, the total count."""
    return meta.kv_blocks_partial_first, meta.kv_partial_count, meta.kv_block_count


def _schedule_columns(meta: BlockMetadata) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per key block: its query blocks partial-first, the partial count, the total count."""
    return meta.q_blocks_partial_first, meta.q_partial_count, meta.q_block_count


def triton_mixed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MixedMask, scale: float
) -> torch.Tensor:
    """Mixed attention through the Triton kernels (inputs already validated by the public API).

    Args:
        q: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D]; fp16/bf16/fp32; D in 64, 80, 96, 128.
        mask: the MixedMask; its block metadata is computed once per tiling and cached on it.
        scale: softmax scale.

    Returns:
        [B, Hq, Lq, D] in q's dtype.

    Raises:
        ValueError: unsupported head dim, or CPU tensors without the Triton interpreter.
    """
    if q.device.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"backend='triton' got tensors on {q.device}: the Triton kernels need CUDA tensors, or "
            "TRITON_INTERPRET=1 set before croc is imported (interpreter, for tests)"
        )
    config = attention_config(q.shape[-1], q.dtype, q.device)
    fwd = mask.block_metadata(config.forward.block_m, config.forward.block_n)
    dq = mask.block_metadata(config.dq.block_m, config.dq.block_n)
    dkdv = mask.block_metadata(config.dkdv.block_m, config.dkdv.block_n)
    out, _ = mixed_attention_fwd(
        q, k, v, mask.kv_start, mask.kv_end,
        *_schedule_rows(fwd), *_schedule_rows(dq), *_schedule_columns(dkdv), scale,
    )  # fmt: skip
    return out
