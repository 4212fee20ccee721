"""Block-sparse flash attention under per-query key intervals (Triton): forward and backward.

Query ``i`` of batch row ``b`` sees keys ``[kv_start[b, i], kv_end[b, i])``. The host gives each
pass a *schedule* (from :meth:`croc.MixedMask.block_metadata`) for its tiling: for every row block
(forward, dQ) or column block (dK/dV) the list of non-empty blocks of the other side with the
PARTIAL tiles first, their number, and the total number. Each program runs two loops over that
list: the partial tiles with per-element interval masking, then the full tiles with none. Empty
tiles are never loaded.

Numerics: every dot accumulates in fp32; fp16/bf16 inputs use tensor cores, fp32 inputs use
Triton's default TF32 tensor-core dots (``TRITON_F32_DEFAULT=ieee`` gives exact fp32). Scores are
kept in log2 units (``qk_scale = scale * log2(e)``, ``exp2``); the forward saves
``lse2 = m + log2(l)`` per row (fp32, [B, Hq, Lq]); a row that sees no key gets output 0 and
``lse2 = +inf``, which makes every probability the backward recomputes for it exactly 0.

Backward: the dQ pass runs first (one program per query block, looping over its key blocks) and
also writes ``delta = rowsum(dO * O)``; then the dK/dV pass (one program per key block of one kv
head, looping over the query heads of its GQA group and their query blocks) reads it. No atomics:
the gradients are deterministic.

Layout: q/out/dq [B, Hq, Lq, D], k/v/dk/dv [B, Hkv, Lk, D], any strides with the last one 1 (so an
SDPA view of a [B, L, H, D] tensor runs without a copy). Head dims that are not a power of two (80,
96) run in the next power-of-two tile width with masked loads and stores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import AttentionConfig, PassConfig, padded_head_dim

__all__ = ["attention_backward", "attention_forward", "kernel_launches"]


@triton.jit
def _load(ptrs, rows_ok, cols_ok, CHECK: tl.constexpr, other):
    """Load a 2-D tile; bounds-checked (``rows_ok & cols_ok`` broadcast) only when CHECK."""
    tile = tl.load(ptrs, mask=rows_ok & cols_ok, other=other) if CHECK else tl.load(ptrs)
    return tile


@triton.jit
def _load_rows(ptrs, ok, CHECK: tl.constexpr, other):
    """Load a 1-D vector; bounds-checked only when CHECK."""
    vec = tl.load(ptrs, mask=ok, other=other) if CHECK else tl.load(ptrs)
    return vec


@triton.jit
def _fwd_tiles(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    block_list,
    lo,
    hi,
    row_start,
    row_end,
    offs_n,
    offs_d,
    d_ok,
    qk_scale,
    seq_k,
    BLOCK_N: tl.constexpr,
    PARTIAL: tl.constexpr,
    PAD_D: tl.constexpr,
):
    """Online softmax over the key blocks ``block_list[lo:hi]`` of one query block."""
    CHECK: tl.constexpr = PARTIAL or PAD_D
    for j in range(lo, hi):
        kb = tl.load(block_list + j)
        cols = kb * BLOCK_N + offs_n
        col_ok = cols < seq_k
        k_t = _load(
            k_base + cols[None, :] * stride_kn + offs_d[:, None], d_ok[:, None], col_ok[None, :], CHECK, 0.0
        )
        s = tl.dot(q, k_t) * qk_scale
        if PARTIAL:
            visible = (cols[None, :] >= row_start[:, None]) & (cols[None, :] < row_end[:, None])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load(
            v_base + cols[:, None] * stride_vn + offs_d[None, :], col_ok[:, None], d_ok[None, :], CHECK, 0.0
        )
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    KvStart,
    KvEnd,
    BlockList,
    PartialCount,
    TotalCount,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    num_heads,
    group,
    seq_q,
    seq_k,
    num_q_blocks,
    num_k_blocks,
    qk_scale,
    head_dim,
    BLOCK_D: tl.constexpr,
    PAD_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program: one query block of one (batch, query head); writes out and lse2."""
    qb = tl.num_programs(0) - 1 - tl.program_id(0)  # late query blocks see more keys: start them first
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    hk = h // group
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq_q
    d_ok = offs_d < head_dim
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    row_start = tl.load(KvStart + b * seq_q + offs_m, mask=row_ok, other=0)
    row_end = tl.load(KvEnd + b * seq_q + offs_m, mask=row_ok, other=0)
    meta = b * num_q_blocks + qb
    block_list = BlockList + meta * num_k_blocks
    n_partial = tl.load(PartialCount + meta)
    n_total = tl.load(TotalCount + meta)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    # m starts finite so that a row with nothing visible yet gives exp2(-inf - m) = 0, never NaN
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, block_list, 0, n_partial,
        row_start, row_end, offs_n, offs_d, d_ok, qk_scale, seq_k,
        BLOCK_N, True, PAD_D,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, block_list, n_partial, n_total,
        row_start, row_end, offs_n, offs_d, d_ok, qk_scale, seq_k,
        BLOCK_N, False, PAD_D,
    )  # fmt: skip
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse2 = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + (b * num_heads + h) * seq_q + offs_m, lse2, mask=row_ok)


@triton.jit
def _dkdv_tiles(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    start_base,
    end_base,
    stride_qm,
    stride_dom,
    block_list,
    lo,
    hi,
    cols,
    offs_m,
    offs_d,
    d_ok,
    qk_scale,
    seq_q,
    BLOCK_M: tl.constexpr,
    PARTIAL: tl.constexpr,
    PAD_D: tl.constexpr,
):
    """Accumulate dK (unscaled) and dV of one key block over the query blocks ``block_list[lo:hi]``."""
    CHECK: tl.constexpr = PARTIAL or PAD_D
    for j in range(lo, hi):
        qb = tl.load(block_list + j)
        rows = qb * BLOCK_M + offs_m
        row_ok = rows < seq_q
        q_t = _load(
            q_base + rows[None, :] * stride_qm + offs_d[:, None], d_ok[:, None], row_ok[None, :], CHECK, 0.0
        )
        lse2 = _load_rows(lse_base + rows, row_ok, PARTIAL, float("inf"))
        p_t = tl.math.exp2(tl.dot(k, q_t) * qk_scale - lse2[None, :])
        if PARTIAL:
            row_start = tl.load(start_base + rows, mask=row_ok, other=0)
            row_end = tl.load(end_base + rows, mask=row_ok, other=0)
            visible = (cols[:, None] >= row_start[None, :]) & (cols[:, None] < row_end[None, :])
            p_t = tl.where(visible, p_t, 0.0)
        do = _load(
            do_base + rows[:, None] * stride_dom + offs_d[None, :], row_ok[:, None], d_ok[None, :], CHECK, 0.0
        )
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        delta = _load_rows(delta_base + rows, row_ok, PARTIAL, 0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    Q,
    K,
    V,
    DOut,
    Lse,
    Delta,
    DK,
    DV,
    KvStart,
    KvEnd,
    BlockList,
    PartialCount,
    TotalCount,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    num_heads_kv,
    group,
    seq_q,
    seq_k,
    num_q_blocks,
    num_k_blocks,
    sm_scale,
    qk_scale,
    head_dim,
    BLOCK_D: tl.constexpr,
    PAD_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program: one key block of one (batch, kv head); loops over the q heads of its group."""
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads_kv).to(tl.int64)
    hk = (bh % num_heads_kv).to(tl.int64)
    cols = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < seq_k
    d_ok = offs_d < head_dim
    tile_ok = col_ok[:, None] & d_ok[None, :]
    k = tl.load(
        K + b * stride_kb + hk * stride_kh + cols[:, None] * stride_kn + offs_d[None, :],
        mask=tile_ok,
        other=0.0,
    )
    v = tl.load(
        V + b * stride_vb + hk * stride_vh + cols[:, None] * stride_vn + offs_d[None, :],
        mask=tile_ok,
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    meta = b * num_k_blocks + kb
    block_list = BlockList + meta * num_q_blocks
    n_partial = tl.load(PartialCount + meta)
    n_total = tl.load(TotalCount + meta)
    start_base = KvStart + b * seq_q
    end_base = KvEnd + b * seq_q
    num_heads = num_heads_kv * group
    for g in range(group):
        h = hk * group + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DOut + b * stride_dob + h * stride_doh
        lse_base = Lse + (b * num_heads + h) * seq_q
        delta_base = Delta + (b * num_heads + h) * seq_q
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_base, end_base,
            stride_qm, stride_dom, block_list, 0, n_partial, cols, offs_m, offs_d, d_ok, qk_scale, seq_q,
            BLOCK_M, True, PAD_D,
        )  # fmt: skip
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_base, end_base,
            stride_qm, stride_dom, block_list, n_partial, n_total, cols, offs_m, offs_d, d_ok, qk_scale, seq_q,
            BLOCK_M, False, PAD_D,
        )  # fmt: skip
    dk_ptrs = DK + b * stride_dkb + hk * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :]
    dv_ptrs = DV + b * stride_dvb + hk * stride_dvh + cols[:, None] * stride_dvn + offs_d[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=tile_ok)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=tile_ok)


@triton.jit
def _dq_tiles(
    dq,
    q,
    do,
    lse2,
    delta,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    block_list,
    lo,
    hi,
    row_start,
    row_end,
    offs_n,
    offs_d,
    d_ok,
    qk_scale,
    seq_k,
    BLOCK_N: tl.constexpr,
    PARTIAL: tl.constexpr,
    PAD_D: tl.constexpr,
):
    """Accumulate dQ (unscaled) of one query block over the key blocks ``block_list[lo:hi]``."""
    CHECK: tl.constexpr = PARTIAL or PAD_D
    for j in range(lo, hi):
        kb = tl.load(block_list + j)
        cols = kb * BLOCK_N + offs_n
        col_ok = cols < seq_k
        k_t = _load(
            k_base + cols[None, :] * stride_kn + offs_d[:, None], d_ok[:, None], col_ok[None, :], CHECK, 0.0
        )
        v_t = _load(
            v_base + cols[None, :] * stride_vn + offs_d[:, None], d_ok[:, None], col_ok[None, :], CHECK, 0.0
        )
        p = tl.math.exp2(tl.dot(q, k_t) * qk_scale - lse2[:, None])
        if PARTIAL:
            visible = (cols[None, :] >= row_start[:, None]) & (cols[None, :] < row_end[:, None])
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, v_t)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq)
    return dq


@triton.jit
def _dq_kernel(
    Q,
    K,
    V,
    Out,
    DOut,
    Lse,
    Delta,
    DQ,
    KvStart,
    KvEnd,
    BlockList,
    PartialCount,
    TotalCount,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    num_heads,
    group,
    seq_q,
    seq_k,
    num_q_blocks,
    num_k_blocks,
    sm_scale,
    qk_scale,
    head_dim,
    BLOCK_D: tl.constexpr,
    PAD_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program: dQ of one query block of one (batch, query head); also writes its rows of
    delta = rowsum(dO * O), which the dK/dV pass (launched after this one) reads."""
    qb = tl.num_programs(0) - 1 - tl.program_id(0)  # late query blocks see more keys: start them first
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    hk = h // group
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq_q
    d_ok = offs_d < head_dim
    tile_ok = row_ok[:, None] & d_ok[None, :]
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
        mask=tile_ok,
        other=0.0,
    )
    do_ptrs = DOut + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :]
    do = tl.load(do_ptrs, mask=tile_ok, other=0.0)
    row_base = (b * num_heads + h) * seq_q
    lse2 = tl.load(Lse + row_base + offs_m, mask=row_ok, other=float("inf"))
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    o = tl.load(o_ptrs, mask=tile_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + row_base + offs_m, delta, mask=row_ok)
    row_start = tl.load(KvStart + b * seq_q + offs_m, mask=row_ok, other=0)
    row_end = tl.load(KvEnd + b * seq_q + offs_m, mask=row_ok, other=0)
    meta = b * num_q_blocks + qb
    block_list = BlockList + meta * num_k_blocks
    n_partial = tl.load(PartialCount + meta)
    n_total = tl.load(TotalCount + meta)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _dq_tiles(
        dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, block_list, 0, n_partial,
        row_start, row_end, offs_n, offs_d, d_ok, qk_scale, seq_k,
        BLOCK_N, True, PAD_D,
    )  # fmt: skip
    dq = _dq_tiles(
        dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, block_list, n_partial, n_total,
        row_start, row_end, offs_n, offs_d, d_ok, qk_scale, seq_k,
        BLOCK_N, False, PAD_D,
    )  # fmt: skip
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=tile_ok)


LOG2E = 1.4426950408889634


def _constexprs(head_dim: int, config: PassConfig) -> dict:
    """Compile-time arguments of the forward, dK/dV and dQ kernels."""
    block_d = padded_head_dim(head_dim)
    return {
        "BLOCK_D": block_d,
        "PAD_D": block_d != head_dim,
        "BLOCK_M": config.block_m,
        "BLOCK_N": config.block_n,
    }


def kernel_launches(head_dim: int, config: AttentionConfig) -> list[tuple]:
    """Every kernel a forward + backward with this head dim and config launches, as
    (name, jit function, constexpr arguments, PassConfig); used by the ahead-of-time compile check."""
    return [
        ("forward", _fwd_kernel, _constexprs(head_dim, config.forward), config.forward),
        ("dkdv", _dkdv_kernel, _constexprs(head_dim, config.dkdv), config.dkdv),
        ("dq", _dq_kernel, _constexprs(head_dim, config.dq), config.dq),
    ]


def _launch_options(config: PassConfig) -> dict:
    return {"num_warps": config.num_warps, "num_stages": config.num_stages}


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    schedule: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    scale: float,
    config: PassConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward.

    Args:
        q: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D]; one float dtype, last stride 1.
        kv_start, kv_end: int32 [B, Lq], contiguous.
        schedule: (int32 [B, nQ, nK] key blocks partial-first, int32 [B, nQ] partial count,
            int32 [B, nQ] total count) for the tiling ``(config.block_m, config.block_n)``.
        scale: softmax scale.
        config: the forward's tile config.

    Returns:
        out: [B, Hq, Lq, D] in q's dtype, laid out like q (``empty_like``); lse2: fp32 [B, Hq, Lq]
        (log2-domain log-sum-exp, ``+inf`` for rows without keys).
    """
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    out = torch.empty_like(q)
    lse2 = torch.empty(batch, heads, seq_q, dtype=torch.float32, device=q.device)
    blocks, partial, total = schedule
    _fwd_kernel[(blocks.shape[1], batch * heads)](
        q, k, v, out, lse2, kv_start, kv_end, blocks, partial, total,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out),
        heads, heads // k.shape[1], seq_q, seq_k, blocks.shape[1], blocks.shape[2], scale * LOG2E, head_dim,
        **_constexprs(head_dim, config), **_launch_options(config),
    )  # fmt: skip
    return out, lse2


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse2: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    dq_schedule: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    dkdv_schedule: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    scale: float,
    dq_config: PassConfig,
    dkdv_config: PassConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward: the dQ pass (which also writes delta), then the dK/dV pass.

    Args:
        dout, q, out: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D]; one float dtype, last stride 1.
        lse2: fp32 [B, Hq, Lq] from :func:`attention_forward`.
        kv_start, kv_end: int32 [B, Lq], contiguous.
        dq_schedule: like the forward's schedule, for the tiling of ``dq_config``.
        dkdv_schedule: (int32 [B, nK, nQ] query blocks partial-first, int32 [B, nK] partial count,
            int32 [B, nK] total count) for the tiling of ``dkdv_config``.
        scale: softmax scale.

    Returns:
        dq [B, Hq, Lq, D], dk, dv [B, Hkv, Lk, D], in the input dtype, laid out like q, k, v.
    """
    batch, heads, seq_q, head_dim = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    group = heads // heads_kv
    delta = torch.empty(batch, heads, seq_q, dtype=torch.float32, device=q.device)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    kv_lists, kv_partial, kv_total = dq_schedule
    _dq_kernel[(kv_lists.shape[1], batch * heads)](
        q, k, v, out, dout, lse2, delta, dq, kv_start, kv_end, kv_lists, kv_partial, kv_total,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out), *_strides3(dout), *_strides3(dq),
        heads, group, seq_q, seq_k, kv_lists.shape[1], kv_lists.shape[2], scale, scale * LOG2E, head_dim,
        **_constexprs(head_dim, dq_config), **_launch_options(dq_config),
    )  # fmt: skip
    q_lists, q_partial, q_total = dkdv_schedule
    _dkdv_kernel[(q_lists.shape[1], batch * heads_kv)](
        q, k, v, dout, lse2, delta, dk, dv, kv_start, kv_end, q_lists, q_partial, q_total,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(dout), *_strides3(dk), *_strides3(dv),
        heads_kv, group, seq_q, seq_k, q_lists.shape[2], q_lists.shape[1], scale, scale * LOG2E, head_dim,
        **_constexprs(head_dim, dkdv_config), **_launch_options(dkdv_config),
    )  # fmt: skip
    return dq, dk, dv
