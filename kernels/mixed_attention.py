"""Block-sparse flash attention under per-query key intervals (Triton): forward and backward.

Query ``i`` of batch row ``b`` sees keys ``[kv_start[b, i], kv_end[b, i])``. The host gives each
pass a *schedule* (built by :mod:`croc.ops.schedule` for the pass's tiling): an int32 tensor
``[B, n_blocks, W]``, one row per block of the pass's own side (query blocks for the forward and
dQ, key blocks for dK/dV). Its first four columns ``(a, b, c, d)`` split the block's positions
``j`` into three loops: ``[a, b)`` and ``[c, d)`` need per-element interval masking (partial
tiles, and tiles overhanging the end of the tensors), ``[b, c)`` are full tiles and run without
any mask. With a *range* schedule (``W == 4``, ``RANGE=True``) the position ``j`` is the other
side's block index itself: the tiles form one contiguous range with its partial tiles at the two
ends, and the kernels load no index. With an *index* schedule (``W > 4``) column ``4 + j`` holds the
block index (partial tiles first, ``c == d``), for masks whose tiles are not a range.
The forward splits a range schedule's partial tiles further, in the kernel, into tiles cut only
by interval starts, only by ends (one compare per score) or by both (see :func:`_fwd_kernel`).

Loads: on Hopper the forward reads K/V tiles through TMA tensor descriptors (host
``TensorDescriptor`` over the whole tensor, zero fill past its edges) whenever their strides
allow (:func:`tma_ready`, decided on the host from the strides); otherwise, and on sm_80, through
pointers, with the tile of ``AttentionConfig.forward_pointer`` where that differs.

A full tile of the range schedule may contain empty rows (``kv_start == kv_end``, padding): they
are never masked, which is harmless because the forward overwrites their output with 0 and their
``lse2`` with ``+inf``, so every probability the backward recomputes for them is exactly 0.

Numerics: every dot accumulates in fp32; fp16/bf16 inputs use tensor cores, fp32 inputs use
Triton's default TF32 tensor-core dots (``TRITON_F32_DEFAULT=ieee`` gives exact fp32). Scores are
kept in log2 units (``qk_scale = scale * log2(e) > 0``, ``exp2``); the forward takes the row max of
the unscaled scores and folds the scale into the exponent (one FMA per score); it saves
``lse2 = m + log2(l)`` per row (fp32, [B, Hq, Lq]).

Backward: the dQ pass runs first (one program per query block, looping over its key blocks) and
also writes ``delta = rowsum(dO * O)``; then the dK/dV pass (one program per key block of one kv
head, looping over the query heads of its GQA group and their query blocks) reads it. No atomics:
the gradients are deterministic. Where :func:`tma_ready` allows (sm_90, 16-byte aligned strides)
the forward and the dQ pass read K/V through TMA tensor descriptors, else through pointers; dK/dV
streams Q/dO through pointers (its descriptor variant needed more registers and spilled). Index
schedules load each list entry one tile ahead of its use.

Layout: q/out/dq [B, Hq, Lq, D], k/v/dk/dv [B, Hkv, Lk, D], any strides with the last one 1 (so an
SDPA view of a [B, L, H, D] tensor runs without a copy). Offsets: the base of every tile (batch,
head, block start times their strides) is computed in int64; only the offsets inside one tile
(``< block * row stride``, checked on the host by :func:`launch_ready`) are int32. The grid is
one-dimensional (``n_blocks * B * H`` programs, at most ``2**31 - 1``). Head dims that are not a
power of two (80, 96) run in the next power-of-two tile width with masked loads and stores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .config import INTERPRET, AttentionConfig, PassConfig, arch_of, padded_head_dim

__all__ = [
    "MAX_PROGRAMS",
    "attention_backward",
    "attention_forward",
    "descriptor_blocks",
    "kernel_launches",
    "launch_ready",
    "tma_ready",
]

MAX_PROGRAMS = 2**31 - 1  # CUDA's limit on grid.x
_INT32_LIMIT = 2**31
_MAX_BLOCK = 128  # the largest tile side in kernels/config.py (what the op layer's launch_ready uses)


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
def _program_block(num_blocks, num_bh, REVERSED: tl.constexpr):
    """(block, batch*head index) of this program in the flattened 1-D grid; blocks outermost, so
    all heads of one block run together (REVERSED: the last block first)."""
    pid = tl.program_id(0)
    block = pid // num_bh
    if REVERSED:
        block = num_blocks - 1 - block
    return block, pid % num_bh


# Per-element interval tests of the forward's tile loops (MASK): full tiles need none; a tile cut
# only by some rows' interval starts needs one compare per score, likewise one cut only by ends
NO_MASK = tl.constexpr(0)
START_ONLY = tl.constexpr(1)
END_ONLY = tl.constexpr(2)
START_AND_END = tl.constexpr(3)
# How a tile cut by both ends tests ``start <= col < end`` (BOTH_TEST), chosen by compiling:
# COLUMNS compares absolute key indices (the pointer loops: the other forms spill 24 B at sm_80
# 128x32 under Triton 3.9), OFFSETS compares offsets inside the tile (no per-score add; TMA loops
# on Triton 3.6: 755 SASS instructions per tile at sm_90 bf16 D=128 128x128, 783 with COLUMNS),
# UNSIGNED makes it one unsigned compare per score (TMA loops on Triton >= 3.9: 721, 787 with
# OFFSETS; on 3.6 it rematerialises the column offsets in the loop and spills).
COLUMNS = tl.constexpr(0)
OFFSETS = tl.constexpr(1)
UNSIGNED = tl.constexpr(2)
_TRITON_39 = tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 9)
TMA_BOTH_TEST = tl.constexpr(2 if _TRITON_39 else 1)


@triton.jit
def _interval_mask(s, offs_n, start_n, row_start, row_end, MASK: tl.constexpr, BOTH_TEST: tl.constexpr):
    """``s`` (the scores of keys ``start_n + offs_n``) with the scores outside each row's interval
    ``[row_start, row_end)`` set to -inf."""
    if MASK == START_ONLY:
        s = tl.where(offs_n[None, :] >= (row_start - start_n)[:, None], s, float("-inf"))
    elif MASK == END_ONLY:
        s = tl.where(offs_n[None, :] < (row_end - start_n)[:, None], s, float("-inf"))
    elif MASK == START_AND_END and BOTH_TEST == UNSIGNED:  # col - start <u end - start
        past_start = (offs_n[None, :] - (row_start - start_n)[:, None]).to(tl.uint32, bitcast=True)
        width = tl.maximum(row_end - row_start, 0).to(tl.uint32, bitcast=True)
        s = tl.where(past_start < width[:, None], s, float("-inf"))
    elif MASK == START_AND_END and BOTH_TEST == OFFSETS:
        first, last = row_start - start_n, row_end - start_n
        s = tl.where(
            (offs_n[None, :] >= first[:, None]) & (offs_n[None, :] < last[:, None]), s, float("-inf")
        )
    elif MASK == START_AND_END:
        cols = start_n + offs_n
        s = tl.where(
            (cols[None, :] >= row_start[:, None]) & (cols[None, :] < row_end[:, None]), s, float("-inf")
        )
    return s


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q, k_src, v_src, b32, hk32, offs_d, stride_kn, stride_vn, block_list, lo, hi, gap_at, gap,
    row_start, row_end, offs_n, d_ok, qk_scale, seq_k,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASK: tl.constexpr, BOUNDS: tl.constexpr,
    PAD_D: tl.constexpr, RANGE: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """Online softmax over the key blocks at positions ``[lo, hi)`` of one query block's schedule
    (positions from ``gap_at`` on shifted by ``gap``, so one loop can run two separate ranges).

    TMA: ``k_src``/``v_src`` are tensor descriptors over the whole [B, Hkv, Lk, D] keys/values
    (block [1, 1, BLOCK_N, BLOCK_D], zero fill past every edge) and ``b32, hk32`` the (batch, kv
    head) as int32; else they are this (batch, kv head)'s base pointers, and tiles are
    bounds-checked only when BOUNDS or PAD_D."""
    CHECK: tl.constexpr = BOUNDS or PAD_D
    following = 0 if RANGE else tl.load(block_list + lo, mask=lo < hi, other=0)
    for j in range(lo, hi):
        if RANGE:
            start_n = (tl.where(j < gap_at, j, j + gap) if MASK == START_AND_END else j) * BLOCK_N
        else:  # the index list's next entry is loaded one tile ahead, off the copies' critical path
            start_n = following * BLOCK_N
            following = tl.load(block_list + tl.minimum(j + 1, hi - 1))
        if TMA:
            k_t = tl.trans(tl.reshape(k_src.load([b32, hk32, start_n, 0]), (BLOCK_N, BLOCK_D)))
        else:
            col_ok = start_n + offs_n < seq_k
            first = start_n.to(tl.int64)
            k_t = _load(
                k_src + first * stride_kn + (offs_n[None, :] * stride_kn + offs_d[:, None]),
                d_ok[:, None],
                col_ok[None, :],
                CHECK,
                0.0,
            )
        s = _interval_mask(
            tl.dot(q, k_t), offs_n, start_n, row_start, row_end, MASK, TMA_BOTH_TEST if TMA else COLUMNS
        )
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if TMA:
            v = tl.reshape(v_src.load([b32, hk32, start_n, 0]), (BLOCK_N, BLOCK_D))
        else:
            v = _load(
                v_src + first * stride_vn + (offs_n[:, None] * stride_vn + offs_d[None, :]),
                col_ok[:, None],
                d_ok[None, :],
                CHECK,
                0.0,
            )
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, KvStart, KvEnd, Schedule,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    num_heads, group, seq_q, seq_k, num_q_blocks, schedule_width, qk_scale, head_dim,
    BLOCK_D: tl.constexpr, PAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    RANGE: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """One program: one query block of one (batch, query head); writes out and lse2.

    Range schedule: the head ``[a, b)`` and tail ``[c, d)`` of the block's key range are split on
    the rows' smallest end and largest start into tiles cut only by starts (one compare per
    score), cut by both (the rare block whose rows straddle a document edge; one loop for both
    ends) and cut only by ends; ``[b, c)`` are full. Index schedule: partial tiles, then full ones.
    TMA: K and V are tensor descriptors (block [1, 1, BLOCK_N, BLOCK_D]), their strides unused."""
    qb, bh = _program_block(num_q_blocks, tl.num_programs(0) // num_q_blocks, True)
    b32 = bh // num_heads
    b = b32.to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    hk = h // group
    first_m = (qb * BLOCK_M).to(tl.int64)
    offs_i = tl.arange(0, BLOCK_M)
    offs_m = qb * BLOCK_M + offs_i
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq_q
    d_ok = offs_d < head_dim
    tile_ok = row_ok[:, None] & d_ok[None, :]
    q_ptrs = (
        Q
        + b * stride_qb
        + h * stride_qh
        + first_m * stride_qm
        + (offs_i[:, None] * stride_qm + offs_d[None, :])
    )
    q = tl.load(q_ptrs, mask=tile_ok, other=0.0)
    row_start = tl.load(KvStart + b * seq_q + offs_m, mask=row_ok, other=0)
    row_end = tl.load(KvEnd + b * seq_q + offs_m, mask=row_ok, other=0)
    nonempty = row_end > row_start
    meta = Schedule + (b * num_q_blocks + qb) * schedule_width
    a, b_end, c = tl.load(meta), tl.load(meta + 1), tl.load(meta + 2)
    if TMA:
        k_src = K
        v_src = V
    else:
        k_src = K + b * stride_kb + hk * stride_kh
        v_src = V + b * stride_vb + hk * stride_vh
    hk32 = hk.to(tl.int32)
    # m starts finite so that a row with nothing visible yet gives exp2(-inf - m) = 0, never NaN
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if RANGE:
        d = tl.load(meta + 3)
        # head tiles below the smallest end are cut only by starts; tail tiles from the largest
        # start on only by ends (a range schedule's head never overhangs the keys, its tail may)
        head_split = tl.minimum(
            tl.maximum(tl.min(tl.where(nonempty, row_end, seq_k), 0) // BLOCK_N, a), b_end
        )
        tail_split = tl.minimum(
            tl.maximum(tl.cdiv(tl.max(tl.where(nonempty, row_start, 0), 0), BLOCK_N), c), d
        )
        acc, l_i, m_i = _fwd_tiles(
            acc, l_i, m_i, q, k_src, v_src, b32, hk32, offs_d, stride_kn, stride_vn, meta, a, head_split, 0, 0,
            row_start, row_end, offs_n, d_ok, qk_scale, seq_k,
            BLOCK_N, BLOCK_D, START_ONLY, False, PAD_D, RANGE, TMA,
        )  # fmt: skip
        acc, l_i, m_i = _fwd_tiles(
            acc, l_i, m_i, q, k_src, v_src, b32, hk32, offs_d, stride_kn, stride_vn, meta, head_split,
            b_end + tail_split - c, b_end, c - b_end, row_start, row_end, offs_n, d_ok, qk_scale, seq_k,
            BLOCK_N, BLOCK_D, START_AND_END, True, PAD_D, RANGE, TMA,
        )  # fmt: skip
        acc, l_i, m_i = _fwd_tiles(
            acc, l_i, m_i, q, k_src, v_src, b32, hk32, offs_d, stride_kn, stride_vn, meta, b_end, c, 0, 0,
            row_start, row_end, offs_n, d_ok, qk_scale, seq_k,
            BLOCK_N, BLOCK_D, NO_MASK, False, PAD_D, RANGE, TMA,
        )  # fmt: skip
        acc, l_i, m_i = _fwd_tiles(
            acc, l_i, m_i, q, k_src, v_src, b32, hk32, offs_d, stride_kn, stride_vn, meta, tail_split, d, 0, 0,
            row_start, row_end, offs_n, d_ok, qk_scale, seq_k,
            BLOCK_N, BLOCK_D, END_ONLY, True, PAD_D, RANGE, TMA,
        )  # fmt: skip
    else:  # index schedules list every partial tile first (c == d); they may overhang the keys
        acc, l_i, m_i = _fwd_tiles(
            acc, l_i, m_i, q, k_src, v_src, b32, hk32, offs_d, stride_kn, stride_vn, meta + 4, a, b_end, b_end, 0,
            row_start, row_end, offs_n, d_ok, qk_scale, seq_k,
            BLOCK_N, BLOCK_D, START_AND_END, True, PAD_D, RANGE, TMA,
        )  # fmt: skip
        acc, l_i, m_i = _fwd_tiles(
            acc, l_i, m_i, q, k_src, v_src, b32, hk32, offs_d, stride_kn, stride_vn, meta + 4, b_end, c, 0, 0,
            row_start, row_end, offs_n, d_ok, qk_scale, seq_k,
            BLOCK_N, BLOCK_D, NO_MASK, False, PAD_D, RANGE, TMA,
        )  # fmt: skip
    empty = ~nonempty
    l_safe = tl.where(empty, 1.0, l_i)
    out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    lse2 = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    o_ptrs = (
        Out
        + b * stride_ob
        + h * stride_oh
        + first_m * stride_om
        + (offs_i[:, None] * stride_om + offs_d[None, :])
    )
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=tile_ok)
    tl.store(Lse + (b * num_heads + h) * seq_q + offs_m, lse2, mask=row_ok)


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_base, end_base, offs_d,
    stride_qm, stride_dom, block_list, lo, hi, gap_at, gap, cols, offs_i, d_ok, qk_scale, seq_q,
    BLOCK_M: tl.constexpr, PARTIAL: tl.constexpr, BOUNDS: tl.constexpr, PAD_D: tl.constexpr, RANGE: tl.constexpr,
):  # fmt: skip
    """Accumulate dK (unscaled) and dV of one key block over the query blocks at positions
    ``[lo, hi)``, where the positions from ``gap_at`` on are shifted by ``gap`` (so one loop runs
    both partial ranges of a range schedule: one pipelined loop fewer, which keeps dK/dV's
    registers from spilling)."""
    CHECK: tl.constexpr = BOUNDS or PAD_D
    following = 0 if RANGE else tl.load(block_list + lo, mask=lo < hi, other=0)
    for j in range(lo, hi):
        if RANGE:
            start_m = tl.where(j < gap_at, j, j + gap) * BLOCK_M
        else:  # an index list has no gap; its next entry is loaded one tile ahead, off the copies' path
            start_m = following * BLOCK_M
            following = tl.load(block_list + tl.minimum(j + 1, hi - 1))
        rows = start_m + offs_i
        row_ok = rows < seq_q
        first = start_m.to(tl.int64)
        q_t = _load(
            q_base + first * stride_qm + (offs_i[None, :] * stride_qm + offs_d[:, None]),
            d_ok[:, None],
            row_ok[None, :],
            CHECK,
            0.0,
        )
        lse2 = _load_rows(lse_base + rows, row_ok, BOUNDS, float("inf"))
        p_t = tl.math.exp2(tl.dot(k, q_t) * qk_scale - lse2[None, :])
        if PARTIAL:
            row_start = _load_rows(start_base + rows, row_ok, BOUNDS, 0)
            row_end = _load_rows(end_base + rows, row_ok, BOUNDS, 0)
            p_t = tl.where(
                (cols[:, None] >= row_start[None, :]) & (cols[:, None] < row_end[None, :]), p_t, 0.0
            )
        do = _load(
            do_base + first * stride_dom + (offs_i[:, None] * stride_dom + offs_d[None, :]),
            row_ok[:, None],
            d_ok[None, :],
            CHECK,
            0.0,
        )
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        delta = _load_rows(delta_base + rows, row_ok, BOUNDS, 0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, KvStart, KvEnd, Schedule,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    num_heads_kv, group, seq_q, seq_k, num_k_blocks, schedule_width, sm_scale, qk_scale, head_dim,
    BLOCK_D: tl.constexpr, PAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    RANGE: tl.constexpr,
):  # fmt: skip
    """One program: one key block of one (batch, kv head); loops over the q heads of its group."""
    kb, bh = _program_block(num_k_blocks, tl.num_programs(0) // num_k_blocks, False)
    b = (bh // num_heads_kv).to(tl.int64)
    hk = (bh % num_heads_kv).to(tl.int64)
    first_n = (kb * BLOCK_N).to(tl.int64)
    offs_j = tl.arange(0, BLOCK_N)
    cols = kb * BLOCK_N + offs_j
    offs_i = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < seq_k
    d_ok = offs_d < head_dim
    tile_ok = col_ok[:, None] & d_ok[None, :]
    k_ptrs = (
        K
        + b * stride_kb
        + hk * stride_kh
        + first_n * stride_kn
        + (offs_j[:, None] * stride_kn + offs_d[None, :])
    )
    v_ptrs = (
        V
        + b * stride_vb
        + hk * stride_vh
        + first_n * stride_vn
        + (offs_j[:, None] * stride_vn + offs_d[None, :])
    )
    k = tl.load(k_ptrs, mask=tile_ok, other=0.0)
    v = tl.load(v_ptrs, mask=tile_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    meta = Schedule + (b * num_k_blocks + kb) * schedule_width
    a, b_end, c = tl.load(meta), tl.load(meta + 1), tl.load(meta + 2)
    d = tl.load(meta + 3)
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
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_base, end_base, offs_d,
            stride_qm, stride_dom, meta + 4, a, b_end + d - c, b_end, c - b_end, cols, offs_i, d_ok,
            qk_scale, seq_q, BLOCK_M, True, True, PAD_D, RANGE,
        )  # fmt: skip
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_base, end_base, offs_d,
            stride_qm, stride_dom, meta + 4, b_end, c, c, 0, cols, offs_i, d_ok, qk_scale, seq_q,
            BLOCK_M, False, False, PAD_D, RANGE,
        )  # fmt: skip
    dk_ptrs = (
        DK
        + b * stride_dkb
        + hk * stride_dkh
        + first_n * stride_dkn
        + (offs_j[:, None] * stride_dkn + offs_d[None, :])
    )
    dv_ptrs = (
        DV
        + b * stride_dvb
        + hk * stride_dvh
        + first_n * stride_dvn
        + (offs_j[:, None] * stride_dvn + offs_d[None, :])
    )
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=tile_ok)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=tile_ok)


@triton.jit
def _dq_tiles(
    dq, q, do, lse2, delta, k_src, v_src, b32, hk32, offs_d, stride_kn, stride_vn, block_list, lo, hi,
    row_start, row_end, offs_n, d_ok, qk_scale, seq_k,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PARTIAL: tl.constexpr, BOUNDS: tl.constexpr,
    PAD_D: tl.constexpr, RANGE: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """Accumulate dQ (unscaled) of one query block over the key blocks at positions ``[lo, hi)``.

    TMA: ``k_src``/``v_src`` are tensor descriptors over the whole [B, Hkv, Lk, D] keys/values
    (block [1, 1, BLOCK_N, BLOCK_D], zero fill past every edge) and ``b32, hk32`` the (batch, kv
    head) as int32; else they are this (batch, kv head)'s base pointers, and tiles are
    bounds-checked only when BOUNDS or PAD_D."""
    CHECK: tl.constexpr = BOUNDS or PAD_D
    following = 0 if RANGE else tl.load(block_list + lo, mask=lo < hi, other=0)
    for j in range(lo, hi):
        if RANGE:
            start_n = j * BLOCK_N
        else:  # the index list's next entry is loaded one tile ahead, off the copies' critical path
            start_n = following * BLOCK_N
            following = tl.load(block_list + tl.minimum(j + 1, hi - 1))
        cols = start_n + offs_n
        if TMA:
            k_t = tl.trans(tl.reshape(k_src.load([b32, hk32, start_n, 0]), (BLOCK_N, BLOCK_D)))
            v_t = tl.trans(tl.reshape(v_src.load([b32, hk32, start_n, 0]), (BLOCK_N, BLOCK_D)))
        else:
            col_ok = cols < seq_k
            first = start_n.to(tl.int64)
            k_t = _load(
                k_src + first * stride_kn + (offs_n[None, :] * stride_kn + offs_d[:, None]),
                d_ok[:, None],
                col_ok[None, :],
                CHECK,
                0.0,
            )
            v_t = _load(
                v_src + first * stride_vn + (offs_n[None, :] * stride_vn + offs_d[:, None]),
                d_ok[:, None],
                col_ok[None, :],
                CHECK,
                0.0,
            )
        p = tl.math.exp2(tl.dot(q, k_t) * qk_scale - lse2[:, None])
        if PARTIAL:
            p = tl.where((cols[None, :] >= row_start[:, None]) & (cols[None, :] < row_end[:, None]), p, 0.0)
        dp = tl.dot(do, v_t)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq)
    return dq


@triton.jit
def _dq_kernel(
    Q, K, V, Out, DOut, Lse, Delta, DQ, KvStart, KvEnd, Schedule,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
    num_heads, group, seq_q, seq_k, num_q_blocks, schedule_width, sm_scale, qk_scale, head_dim,
    BLOCK_D: tl.constexpr, PAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    RANGE: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """One program: dQ of one query block of one (batch, query head); also writes its rows of
    delta = rowsum(dO * O), which the dK/dV pass (launched after this one) reads. TMA: K and V are
    tensor descriptors (block [1, 1, BLOCK_N, BLOCK_D]), their strides unused."""
    INDEX: tl.constexpr = not RANGE
    qb, bh = _program_block(num_q_blocks, tl.num_programs(0) // num_q_blocks, True)
    b32 = bh // num_heads
    b = b32.to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    hk = h // group
    first_m = (qb * BLOCK_M).to(tl.int64)
    offs_i = tl.arange(0, BLOCK_M)
    offs_m = qb * BLOCK_M + offs_i
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq_q
    d_ok = offs_d < head_dim
    tile_ok = row_ok[:, None] & d_ok[None, :]
    q_ptrs = (
        Q
        + b * stride_qb
        + h * stride_qh
        + first_m * stride_qm
        + (offs_i[:, None] * stride_qm + offs_d[None, :])
    )
    q = tl.load(q_ptrs, mask=tile_ok, other=0.0)
    do_ptrs = (
        DOut
        + b * stride_dob
        + h * stride_doh
        + first_m * stride_dom
        + (offs_i[:, None] * stride_dom + offs_d[None, :])
    )
    do = tl.load(do_ptrs, mask=tile_ok, other=0.0)
    row_base = (b * num_heads + h) * seq_q
    lse2 = tl.load(Lse + row_base + offs_m, mask=row_ok, other=float("inf"))
    o_ptrs = (
        Out
        + b * stride_ob
        + h * stride_oh
        + first_m * stride_om
        + (offs_i[:, None] * stride_om + offs_d[None, :])
    )
    o = tl.load(o_ptrs, mask=tile_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + row_base + offs_m, delta, mask=row_ok)
    row_start = tl.load(KvStart + b * seq_q + offs_m, mask=row_ok, other=0)
    row_end = tl.load(KvEnd + b * seq_q + offs_m, mask=row_ok, other=0)
    meta = Schedule + (b * num_q_blocks + qb) * schedule_width
    a, b_end, c = tl.load(meta), tl.load(meta + 1), tl.load(meta + 2)
    if TMA:
        k_src = K
        v_src = V
    else:
        k_src = K + b * stride_kb + hk * stride_kh
        v_src = V + b * stride_vb + hk * stride_vh
    hk32 = hk.to(tl.int32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _dq_tiles(
        dq, q, do, lse2, delta, k_src, v_src, b32, hk32, offs_d, stride_kn, stride_vn, meta + 4, a, b_end,
        row_start, row_end, offs_n, d_ok, qk_scale, seq_k, BLOCK_N, BLOCK_D, True, INDEX, PAD_D, RANGE, TMA,
    )  # fmt: skip
    dq = _dq_tiles(
        dq, q, do, lse2, delta, k_src, v_src, b32, hk32, offs_d, stride_kn, stride_vn, meta + 4, b_end, c,
        row_start, row_end, offs_n, d_ok, qk_scale, seq_k, BLOCK_N, BLOCK_D, False, False, PAD_D, RANGE, TMA,
    )  # fmt: skip
    if RANGE:
        dq = _dq_tiles(
            dq, q, do, lse2, delta, k_src, v_src, b32, hk32, offs_d, stride_kn, stride_vn, meta + 4, c,
            tl.load(meta + 3), row_start, row_end, offs_n, d_ok, qk_scale, seq_k, BLOCK_N, BLOCK_D, True, True,
            PAD_D, RANGE, TMA,
        )  # fmt: skip
    dq_ptrs = (
        DQ
        + b * stride_dqb
        + h * stride_dqh
        + first_m * stride_dqm
        + (offs_i[:, None] * stride_dqm + offs_d[None, :])
    )
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=tile_ok)


LOG2E = 1.4426950408889634
_LOOP_NAMES = {"range": ("partial_head", "full", "partial_tail"), "index": ("partial", "full")}
_FWD_LOOP_NAMES = {
    "range": ("partial_start", "partial_both", "full", "partial_end"),
    "index": ("partial", "full"),
}
_DKDV_LOOP_NAMES = ("partial", "full")  # dK/dV runs both partial ranges in one loop


def _constexprs(head_dim: int, config: PassConfig, schedule: str) -> dict:
    """Compile-time arguments of the forward, dK/dV and dQ kernels."""
    block_d = padded_head_dim(head_dim)
    return {
        "BLOCK_D": block_d,
        "PAD_D": block_d != head_dim,
        "BLOCK_M": config.block_m,
        "BLOCK_N": config.block_n,
        "RANGE": schedule == "range",
    }


def kernel_launches(
    head_dim: int, config: AttentionConfig, schedule: str = "range", tma: bool = False
) -> list[tuple]:
    """Every kernel a forward + backward with this head dim, config, schedule kind ("range" or
    "index") and load path (``tma``: the forward's and the dQ pass's key/value tiles through tensor
    descriptors; dK/dV streams Q/dO through pointers either way)
    launches, as (name, jit function, constexpr arguments, PassConfig, names of its tile loops in
    source order); used by the ahead-of-time compile check."""
    loops = _LOOP_NAMES[schedule]
    fwd = config.for_loads(tma).forward
    forward = _constexprs(head_dim, fwd, schedule) | {"TMA": tma}
    return [
        ("forward", _fwd_kernel, forward, fwd, _FWD_LOOP_NAMES[schedule]),
        ("dkdv", _dkdv_kernel, _constexprs(head_dim, config.dkdv, schedule), config.dkdv, _DKDV_LOOP_NAMES),
        ("dq", _dq_kernel, _constexprs(head_dim, config.dq, schedule) | {"TMA": tma}, config.dq, loops),
    ]


# The arguments each kernel takes as tensor descriptors when TMA, and the constexpr giving their block rows
# (dK/dV reads Q/dO through pointers: through descriptors its 16x128 tile spilled 40 B on Triton 3.6)
_DESCRIPTOR_ARGS = {"forward": (("K", "V"), "BLOCK_N"), "dq": (("K", "V"), "BLOCK_N")}


def descriptor_blocks(name: str, constexprs: dict) -> dict[str, list[int]]:
    """The block shape ``[1, 1, rows, BLOCK_D]`` of each tensor-descriptor argument of kernel
    ``name`` ("forward", "dkdv", "dq") compiled with these constexprs (empty unless TMA)."""
    if not constexprs.get("TMA") or name not in _DESCRIPTOR_ARGS:
        return {}
    args, rows = _DESCRIPTOR_ARGS[name]
    return {arg: [1, 1, constexprs[rows], constexprs["BLOCK_D"]] for arg in args}


def tma_ready(*tensors: torch.Tensor) -> bool:
    """Whether the forward and the dQ pass read these [B, H, L, D] tensors (as :func:`launch_ready`
    will hand them over) through TMA tensor descriptors: on Hopper or later (and under the interpreter,
    which emulates descriptors), when every tensor is non-empty and its leading strides are
    multiples of 16 bytes (the copy engine's rule; a contiguous copy's always are, every supported
    head dim being a multiple of 8 elements). Shapes and strides only, so that ``torch.compile``
    traces it; a base address off the 16-byte grid is copied at launch (:func:`_aligned`)."""
    device = tensors[0].device
    if (device.type == "cuda" and arch_of(device) < 90) or (device.type != "cuda" and not INTERPRET):
        return False
    return all(
        t.numel() > 0
        and (not _addressable(t, _MAX_BLOCK) or all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1]))
        for t in tensors
    )


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy in fresh (aligned) memory if its base address is not a multiple of 16 bytes."""
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _descriptor(t: torch.Tensor, rows: int, block_d: int) -> TensorDescriptor:
    """Tensor descriptor over all of ``t`` ([B, H, L, D]), block ``[1, 1, rows, block_d]``."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, block_d])


def _launch_options(config: PassConfig) -> dict:
    return {"num_warps": config.num_warps, "num_stages": config.num_stages}


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def launch_ready(t: torch.Tensor, block: int) -> torch.Tensor:
    """``t`` ([B, H, L, D]) if the kernels can address it as is, else a contiguous copy.

    The kernels need the last stride to be 1, and the offsets inside one tile, at most
    ``block * stride(2) + D``, to fit int32 (every other offset is int64). A contiguous tensor's
    row stride is D, so the copy always qualifies."""
    return t if _addressable(t, block) else t.contiguous()


def _addressable(t: torch.Tensor, block: int) -> bool:
    return t.stride(-1) == 1 and block * t.stride(2) + t.shape[-1] < _INT32_LIMIT


def grid_1d(num_blocks: int, batch_heads: int) -> tuple[int]:
    """The flattened grid ``(num_blocks * batch_heads,)``; ValueError past CUDA's grid.x limit."""
    programs = num_blocks * batch_heads
    if programs > MAX_PROGRAMS:
        raise ValueError(
            f"the attention needs {programs} programs ({num_blocks} blocks x {batch_heads} batch*heads), "
            f"more than the {MAX_PROGRAMS} a CUDA grid allows: split the batch"
        )
    return (max(programs, 1),)


def _schedule_args(schedule: torch.Tensor) -> tuple[int, int, bool]:
    """(n_blocks, row width, is a range schedule) of a packed schedule ``[B, n_blocks, W]``."""
    return schedule.shape[1], schedule.shape[2], schedule.shape[2] == 4


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    schedule: torch.Tensor,
    scale: float,
    config: PassConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward.

    Args:
        q: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D]; one float dtype, passed through :func:`launch_ready`.
        kv_start, kv_end: int32 [B, Lq], contiguous.
        schedule: int32 [B, nQ, W], the forward tiling's packed schedule (module docstring) for
            ``(config.block_m, config.block_n)``; W == 4 is a range schedule.
        scale: softmax scale, > 0.
        config: the forward's tile config.

    Returns:
        out: [B, Hq, Lq, D] in q's dtype, laid out like q (``empty_like``); lse2: fp32 [B, Hq, Lq]
        (log2-domain log-sum-exp, ``+inf`` for rows without keys).
    """
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    out = torch.empty_like(q)
    lse2 = torch.empty(batch, heads, seq_q, dtype=torch.float32, device=q.device)
    n_blocks, width, is_range = _schedule_args(schedule)
    constexprs = _constexprs(head_dim, config, "range" if is_range else "index")
    tma = tma_ready(k, v)
    if tma:
        k_in, v_in = (_descriptor(_aligned(t), config.block_n, constexprs["BLOCK_D"]) for t in (k, v))
    else:
        k_in, v_in = k, v
    _fwd_kernel[grid_1d(n_blocks, batch * heads)](
        q, k_in, v_in, out, lse2, kv_start, kv_end, schedule,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out),
        heads, heads // k.shape[1], seq_q, seq_k, n_blocks, width, scale * LOG2E, head_dim,
        **constexprs, TMA=tma, **_launch_options(config),
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
    dq_schedule: torch.Tensor,
    dkdv_schedule: torch.Tensor,
    scale: float,
    dq_config: PassConfig,
    dkdv_config: PassConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward: the dQ pass (which also writes delta), then the dK/dV pass.

    Args:
        dout, q, out: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D]; one float dtype, through :func:`launch_ready`.
        lse2: fp32 [B, Hq, Lq] from :func:`attention_forward`.
        kv_start, kv_end: int32 [B, Lq], contiguous.
        dq_schedule: int32 [B, nQ, W], like the forward's, for the tiling of ``dq_config``.
        dkdv_schedule: int32 [B, nK, W'], per key block, for the tiling of ``dkdv_config``.
        scale: softmax scale, > 0.

    Returns:
        dq [B, Hq, Lq, D], dk, dv [B, Hkv, Lk, D], in the input dtype, laid out like q, k, v.
    """
    batch, heads, seq_q, head_dim = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    group = heads // heads_kv
    delta = torch.empty(batch, heads, seq_q, dtype=torch.float32, device=q.device)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    n_q, width, is_range = _schedule_args(dq_schedule)
    constexprs = _constexprs(head_dim, dq_config, "range" if is_range else "index")
    tma = tma_ready(k, v)
    if tma:
        k_in, v_in = (_descriptor(_aligned(t), dq_config.block_n, constexprs["BLOCK_D"]) for t in (k, v))
    else:
        k_in, v_in = k, v
    _dq_kernel[grid_1d(n_q, batch * heads)](
        q, k_in, v_in, out, dout, lse2, delta, dq, kv_start, kv_end, dq_schedule,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out), *_strides3(dout), *_strides3(dq),
        heads, group, seq_q, seq_k, n_q, width, scale, scale * LOG2E, head_dim,
        **constexprs, TMA=tma, **_launch_options(dq_config),
    )  # fmt: skip
    n_k, width, is_range = _schedule_args(dkdv_schedule)
    _dkdv_kernel[grid_1d(n_k, batch * heads_kv)](
        q, k, v, dout, lse2, delta, dk, dv, kv_start, kv_end, dkdv_schedule,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(dout), *_strides3(dk), *_strides3(dv),
        heads_kv, group, seq_q, seq_k, n_k, width, scale, scale * LOG2E, head_dim,
        **_constexprs(head_dim, dkdv_config, "range" if is_range else "index"), **_launch_options(dkdv_config),
    )  # fmt: skip
    return dq, dk, dv
