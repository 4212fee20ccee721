"""Tile schedules of the mixed-attention kernels, built from a mask's intervals.

A pass tiles the (query × key) plane into ``block_q × block_k`` tiles and gives each program one
block of its own side: query blocks for the forward and dQ passes (:func:`row_schedule`), key
blocks for the dK/dV pass (:func:`column_schedule`). A schedule is packed into one int32 tensor
``[B, n_blocks, W]`` whose first four columns ``(a, b, c, d)`` mean: positions ``[a, b)`` and
``[c, d)`` are tiles that need per-element masking (partial, or overhanging the end of the
tensors; in a range schedule only ``[c, d)`` may hold the overhanging block), ``[b, c)`` are full tiles (every non-empty row sees every key of the tile).

- *Range* schedules (``W == 4``): the positions are the other side's block indices. For query
  blocks this is exact for any mask (the tiles a query block reaches, from its smallest start to
  its largest end, are one range and its full tiles one sub-range). For key blocks it needs a
  *monotone* mask (:attr:`croc.MixedMask.monotone`: the non-empty rows' starts and ends do not
  decrease along the row, every builder's mask), whose per-block start/end bounds are sorted, so
  both ranges come from ``searchsorted``: O(B · L / block) work and memory, no sort, no tile grid.
- *Index* schedules (``W = 4 + n_other``): column ``4 + j`` is the block index at position ``j``,
  the partial tiles first (``c == d``), from the tile classification of :func:`block_metadata`
  (O(B · nQ · nK)); the fallback for masks that are not monotone, and the A/B baseline.

Rows with an empty interval (padding) are left out of every bound: a full tile may contain them
(the kernels make their output and gradients exactly zero without masking them), and a block of
only empty rows reaches no tile.

Schedules are cached on the mask object (one computation per batch, reused by every layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "SCHEDULES",
    "TILE_EMPTY",
    "TILE_FULL",
    "TILE_PARTIAL",
    "BlockMetadata",
    "block_metadata",
    "column_schedule",
    "pass_schedules",
    "row_schedule",
    "schedule_kind",
]

SCHEDULES = ("auto", "range", "index")
TILE_EMPTY = 0
TILE_PARTIAL = 1
TILE_FULL = 2
_BIG = torch.iinfo(torch.int32).max


@dataclass(frozen=True)
class BlockMetadata:
    """Tile classification of a mask for one (block_q, block_k) tiling (the index schedules' source).

    Attributes:
        block_q, block_k: the tile sizes (ints).
        tile_kind: int8 [B, nQ, nK]; ``TILE_EMPTY`` (0, never loaded), ``TILE_PARTIAL`` (1, needs
            per-element masking) or ``TILE_FULL`` (2, every (query, key) pair visible).
        kv_blocks: int32 [B, nQ, nK]; for query block ``qb`` the indices of its non-empty key
            blocks in ascending order, in the first ``kv_block_count[b, qb]`` entries (the rest
            are padding, set to 0).
        kv_block_count: int32 [B, nQ].
        q_blocks: int32 [B, nK, nQ]; for key block ``kb`` its non-empty query blocks, ascending.
        q_block_count: int32 [B, nK].
        kv_blocks_partial_first: int32 [B, nQ, nK]; the same key blocks as ``kv_blocks`` but the
            ones that need per-element masking first (ascending), then the others (ascending). A
            tile needs masking if it is PARTIAL or overhangs the end of the queries or keys.
        kv_partial_count: int32 [B, nQ].
        q_blocks_partial_first: int32 [B, nK, nQ]; the column view of the same.
        q_partial_count: int32 [B, nK].
    """

    block_q: int
    block_k: int
    tile_kind: torch.Tensor
    kv_blocks: torch.Tensor
    kv_block_count: torch.Tensor
    q_blocks: torch.Tensor
    q_block_count: torch.Tensor
    kv_blocks_partial_first: torch.Tensor
    kv_partial_count: torch.Tensor
    q_blocks_partial_first: torch.Tensor
    q_partial_count: torch.Tensor


def _check_blocks(block_q: int, block_k: int) -> tuple[int, int]:
    if block_q <= 0 or block_k <= 0:
        raise ValueError(f"block sizes must be positive, got block_q={block_q}, block_k={block_k}")
    return int(block_q), int(block_k)


def _cached(mask, key: tuple, build):
    cache = mask._block_cache
    if key not in cache:
        cache[key] = build()
    return cache[key]


def _query_block_bounds(
    kv_start: torch.Tensor, kv_end: torch.Tensor, block_q: int
) -> tuple[torch.Tensor, ...]:
    """Per query block over its non-empty rows: (min start, min end, max start, max end), int64
    [B, nQ] each, and bool [B, nQ] (every row of the block non-empty). A block of only empty rows
    gets min = int32 max and max = -(int32 max)."""
    batch, seq_q = kv_start.shape
    num_blocks = max(1, -(-seq_q // block_q))
    tail = num_blocks * block_q - seq_q
    start, end = kv_start.to(torch.int64), kv_end.to(torch.int64)
    empty = end <= start
    pad = lambda t, value: torch.nn.functional.pad(t, (0, tail), value=value).view(batch, num_blocks, block_q)  # noqa: E731
    start_lo = pad(torch.where(empty, _BIG, start), _BIG).amin(dim=2)
    start_hi = pad(torch.where(empty, -_BIG, start), -_BIG).amax(dim=2)
    end_lo = pad(torch.where(empty, _BIG, end), _BIG).amin(dim=2)
    end_hi = pad(torch.where(empty, -_BIG, end), -_BIG).amax(dim=2)
    all_rows_nonempty = ~pad(empty, False).any(dim=2)
    return start_lo, end_lo, start_hi, end_hi, all_rows_nonempty


def _pack(
    lo: torch.Tensor, full_lo: torch.Tensor, full_hi: torch.Tensor, hi: torch.Tensor, whole: int
) -> torch.Tensor:
    """int32 [B, n, 4] ``(a, b, c, d)`` from the reached range ``[lo, hi)`` and the full range
    ``[full_lo, full_hi)`` (empty if ``full_hi <= full_lo``), all [B, n]. Only the ``whole``
    first blocks of the other side end inside its tensor; the full range and the head
    ``[a, b)`` stay below it, so only the tail ``[c, d)`` may hold the overhanging block and
    the kernels run the head without bounds checks."""
    cap = torch.full_like(lo, whole)
    b = full_lo.minimum(cap).maximum(lo).minimum(hi)
    c = full_hi.minimum(cap).maximum(b).minimum(hi)
    return torch.stack([lo, b, c, hi], dim=-1).to(torch.int32).contiguous()


def row_schedule(mask, block_q: int, block_k: int) -> torch.Tensor:
    """Range schedule per query block (forward, dQ): int32 [B, nQ, 4], valid for any mask.

    Reached key blocks ``[start_lo // bk, ceil(end_hi / bk))``; full ones
    ``[ceil(start_hi / bk), end_lo // bk)``, without the last key block if it overhangs."""
    block_q, block_k = _check_blocks(block_q, block_k)

    def build() -> torch.Tensor:
        start_lo, end_lo, start_hi, end_hi, _ = _query_block_bounds(mask.kv_start, mask.kv_end, block_q)
        has_rows = start_lo <= start_hi
        zero = torch.zeros_like(start_lo)
        lo = torch.where(has_rows, start_lo // block_k, zero)
        hi = torch.where(has_rows, -(-end_hi // block_k), zero)
        full_lo = -(-start_hi // block_k)
        full_hi = end_lo // block_k
        return _pack(lo, full_lo, full_hi, hi, mask.num_keys // block_k)

    return _cached(mask, ("rows", block_q, block_k), build)


def _sorted_bounds(values: torch.Tensor, has_rows: torch.Tensor, fill: int, rising: bool) -> torch.Tensor:
    """Make a per-block bound non-decreasing by giving blocks without rows their neighbour's value:
    the running max from the left (``rising``: a lower cut) or the running min from the right."""
    filled = torch.where(has_rows, values, torch.full_like(values, fill))
    if rising:
        return filled.cummax(dim=1).values.contiguous()
    return filled.flip(1).cummin(dim=1).values.flip(1).contiguous()


def column_schedule(mask, block_q: int, block_k: int) -> torch.Tensor:
    """Range schedule per key block (dK/dV): int32 [B, nK, 4]; needs ``mask.monotone``.

    Key block ``[k0, k1)`` is reached by the query blocks with ``end_hi > k0`` and
    ``start_lo < k1`` and covered by those with ``end_lo >= k1`` and ``start_hi <= k0``: in a
    monotone mask each condition holds on a prefix or a suffix of the (sorted) blocks."""
    block_q, block_k = _check_blocks(block_q, block_k)
    if not mask.monotone:
        raise ValueError("column_schedule needs a monotone mask (mask.monotone); use the index schedule")

    def build() -> torch.Tensor:
        start_lo, end_lo, start_hi, end_hi, _ = _query_block_bounds(mask.kv_start, mask.kv_end, block_q)
        has_rows = start_lo <= start_hi
        batch = start_lo.shape[0]
        num_k_blocks = max(1, -(-mask.num_keys // block_k))
        k0 = torch.arange(num_k_blocks, device=start_lo.device, dtype=torch.int64) * block_k
        k1 = (k0 + block_k).clamp_max(mask.num_keys)
        k0, k1 = k0.expand(batch, -1).contiguous(), k1.expand(batch, -1).contiguous()
        search = lambda bound, fill, rising, cut, right: torch.searchsorted(  # noqa: E731
            _sorted_bounds(bound, has_rows, fill, rising), cut, right=right
        )
        lo = search(end_hi, -1, True, k0, True)  # first block with end_hi > k0
        hi = search(start_lo, _BIG, False, k1, False)  # blocks with start_lo < k1
        full_lo = search(end_lo, -1, True, k1, False)  # first block with end_lo >= k1
        full_hi = search(start_hi, _BIG, False, k0, True)
        hi = torch.maximum(hi, lo)
        return _pack(lo, full_lo, full_hi, hi, mask.num_queries // block_q)

    return _cached(mask, ("columns", block_q, block_k), build)


def _partial_first_lists(nonempty: torch.Tensor, partial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For bool [..., n] (``partial`` implies ``nonempty``): indices of the partial entries
    (ascending), then of the other non-empty ones (ascending), then 0 padding, as int32; and the
    number of partial entries, int32 [...]."""
    n = nonempty.shape[-1]
    positions = torch.arange(n, device=nonempty.device, dtype=torch.int32)
    group = torch.where(partial, 0, torch.where(nonempty, 1, 2)).to(torch.int32)
    ordered = (group * n + positions).sort(dim=-1).values
    ids = torch.where(ordered < 2 * n, ordered % n, torch.zeros_like(ordered))
    return ids.contiguous(), partial.sum(dim=-1, dtype=torch.int32)


def _compact_block_lists(nonempty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For bool [..., n]: (indices of the True entries first, ascending, as int32; their count)."""
    ids, _ = _partial_first_lists(nonempty, torch.zeros_like(nonempty))
    return ids, nonempty.sum(dim=-1, dtype=torch.int32)


def block_metadata(mask, block_q: int, block_k: int) -> BlockMetadata:
    """Classify every (block_q × block_k) tile of ``mask`` as empty, partial or full; cached per tiling.

    A tile (query block qb, key block kb covering keys [k0, k1)) is
    - FULL when every row of qb is non-empty and max(start) <= k0 and min(end) >= k1: exact;
    - EMPTY when no non-empty row's interval can reach it: max(end) <= k0 or min(start) >= k1;
    - PARTIAL otherwise. This is conservative: a tile that lies in a gap between the rows'
      intervals is kept as partial (the kernel's per-element mask makes it correct).
    """
    block_q, block_k = _check_blocks(block_q, block_k)
    return _cached(mask, ("meta", block_q, block_k), lambda: _classify(mask, block_q, block_k))


def _classify(mask, block_q: int, block_k: int) -> BlockMetadata:
    device = mask.kv_start.device
    num_k_blocks = max(1, -(-mask.num_keys // block_k))
    start_lo, end_lo, start_hi, end_hi, all_rows_nonempty = _query_block_bounds(
        mask.kv_start, mask.kv_end, block_q
    )
    key_lo = torch.arange(num_k_blocks, device=device, dtype=torch.int64) * block_k
    key_hi = (key_lo + block_k).clamp_max(mask.num_keys)
    reaches = (end_hi[..., None] > key_lo) & (start_lo[..., None] < key_hi)
    covers = all_rows_nonempty[..., None] & (start_hi[..., None] <= key_lo) & (end_lo[..., None] >= key_hi)
    kind = torch.where(reaches, TILE_PARTIAL, TILE_EMPTY)
    kind = torch.where(reaches & covers, TILE_FULL, kind).to(torch.int8)
    kv_blocks, kv_count = _compact_block_lists(reaches)
    q_blocks, q_count = _compact_block_lists(reaches.transpose(1, 2))
    num_q_blocks = kind.shape[1]
    overhang_q = torch.arange(num_q_blocks, device=device) * block_q + block_q > mask.kv_start.shape[1]
    overhang_k = key_lo + block_k > mask.num_keys
    partial = (kind == TILE_PARTIAL) | (reaches & (overhang_q[:, None] | overhang_k[None, :]))
    kv_first, kv_partial = _partial_first_lists(reaches, partial)
    q_first, q_partial = _partial_first_lists(reaches.transpose(1, 2), partial.transpose(1, 2))
    return BlockMetadata(
        block_q, block_k, kind, kv_blocks, kv_count, q_blocks.contiguous(), q_count,
        kv_first, kv_partial, q_first, q_partial,
    )  # fmt: skip


def _index_schedule(blocks: torch.Tensor, partial: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """int32 [B, n, 4 + m]: bounds (0, partial, total, total) then the partial-first block list."""
    zero = torch.zeros_like(partial)
    bounds = torch.stack([zero, partial, total, total], dim=-1)
    return torch.cat([bounds, blocks], dim=-1).to(torch.int32).contiguous()


def schedule_kind(mask, schedule: str = "auto") -> str:
    """``"range"`` or ``"index"`` for this mask, decided on the host from ``mask.monotone``.

    Raises:
        ValueError: unknown ``schedule``, or ``"range"`` asked for a mask that is not monotone.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "auto":
        return "range" if mask.monotone else "index"
    if schedule == "range" and not mask.monotone:
        raise ValueError("schedule='range' needs a monotone mask (mask.monotone is False)")
    return schedule


def pass_schedules(mask, config, schedule: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The packed (forward, dQ, dK/dV) schedules for an :class:`AttentionConfig`; cached on ``mask``.

    Returns:
        int32 [B, nQ_fwd, W], [B, nQ_dq, W], [B, nK_dkdv, W'] (W == 4 for range schedules).
    """
    fwd, dq, dkdv = config.forward, config.dq, config.dkdv
    if schedule_kind(mask, schedule) == "range":
        return (
            row_schedule(mask, fwd.block_m, fwd.block_n),
            row_schedule(mask, dq.block_m, dq.block_n),
            column_schedule(mask, dkdv.block_m, dkdv.block_n),
        )

    def rows(c) -> torch.Tensor:
        meta = block_metadata(mask, c.block_m, c.block_n)
        return _cached(
            mask,
            ("index-rows", c.block_m, c.block_n),
            lambda: _index_schedule(meta.kv_blocks_partial_first, meta.kv_partial_count, meta.kv_block_count),
        )

    meta = block_metadata(mask, dkdv.block_m, dkdv.block_n)
    columns = _cached(
        mask,
        ("index-columns", dkdv.block_m, dkdv.block_n),
        lambda: _index_schedule(meta.q_blocks_partial_first, meta.q_partial_count, meta.q_block_count),
    )
    return rows(fwd), rows(dq), columns
