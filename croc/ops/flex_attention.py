"""FlexAttention as a croc backend: the interval mask as a ``BlockMask``, built without ``create_block_mask``.

``create_block_mask`` evaluates the mask_mod on every (query, key) pair: O(L²) work and memory. Here
the tile tables come straight from the intervals ``[kv_start, kv_end)``:

- a tile (query block × key block) is *reached* when some non-empty row of the query block has an
  interval that overlaps the key block. Row ``i`` overlaps key blocks ``start // bk .. (end - 1) // bk``,
  one contiguous range, so the reached tiles of a query block are the union of its rows' ranges:
  a difference array (+1 at the first block, -1 after the last) summed per query block and then
  cumulated along the key blocks. This is exact for any interval mask, monotone or not.
- a tile is *full* when every row of the query block is non-empty, the block's largest start is
  ``<=`` the tile's first key and its smallest end ``>=`` one past its last key, and the tile does
  not overhang the end of the queries or keys (``create_block_mask`` pads with masked pairs, so an
  overhanging tile is never full). Also exact.
- *partial* tiles are the reached ones that are not full; the mask_mod (the interval test) only
  runs on those.

Work: O(B · Lq) for the bounds and the difference array, plus O(B · nQ · nK) to write the tables,
which is the size of the ``BlockMask`` format itself. No host sync, no dense mask. The tables are
in ``create_block_mask``'s order (the listed blocks ascending, then the unlisted ones ascending), so
they compare equal to it.

The attention call compiles ``flex_attention`` once per shape: the BlockMask and its mask_mod are
rebuilt inside the compiled function from plain tensor arguments, so a new layout with the same
shapes reuses the compiled code. Uses only BlockMask fields that exist since torch 2.6
(``seq_lengths``, the eight block tables, ``BLOCK_SIZE``, ``mask_mod``), so it runs on the torch
2.11 of the GPU machines and on 2.13.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

__all__ = ["block_mask_from_intervals", "flex_mixed_attention", "interval_tile_flags"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_block_size(block_size: int | tuple[int, int]) -> tuple[int, int]:
    sizes = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    if len(sizes) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in sizes):
        raise ValueError(
            f"block_size must be a positive int or a (q, kv) pair of positive ints, got {block_size!r}"
        )
    return sizes


def _reached_tiles(
    start: torch.Tensor, end: torch.Tensor, block_q: int, block_k: int, num_k: int
) -> torch.Tensor:
    """bool [B, nQ, nK]: tiles holding at least one visible pair (exact, any interval mask).

    ``start``/``end`` are int64 [B, Lq]. Each non-empty row adds +1 at its first key block and -1
    after its last one; the cumulative sum along the key blocks counts the rows reaching a tile.
    """
    batch, seq_q = start.shape
    num_q = _cdiv(seq_q, block_q)
    nonempty = end > start
    first = torch.where(nonempty, start // block_k, 0)
    after_last = torch.where(nonempty, (end - 1) // block_k + 1, 0)
    row_block = (torch.arange(seq_q, device=start.device) // block_q) * (num_k + 1)
    weight = nonempty.to(torch.int32)
    diff = torch.zeros(batch, num_q * (num_k + 1), dtype=torch.int32, device=start.device)
    diff.scatter_add_(1, row_block + first, weight)
    diff.scatter_add_(1, row_block + after_last, -weight)
    return diff.view(batch, num_q, num_k + 1).cumsum(dim=2)[..., :num_k] > 0


def _full_tiles(
    start: torch.Tensor, end: torch.Tensor, block_q: int, block_k: int, num_k: int, num_keys: int
) -> torch.Tensor:
    """bool [B, nQ, nK]: tiles in which every (query, key) pair is visible and none is out of range."""
    batch, seq_q = start.shape
    num_q = _cdiv(seq_q, block_q)
    tail = num_q * block_q - seq_q
    blocks = lambda t, value: torch.nn.functional.pad(t, (0, tail), value=value).view(batch, num_q, block_q)  # noqa: E731
    start_hi = blocks(start, num_keys).amax(dim=2)  # padded rows (overhang) never make a full tile
    end_lo = blocks(end, 0).amin(dim=2)
    all_rows_nonempty = blocks(end > start, False).all(dim=2)
    key_lo = torch.arange(num_k, device=start.device) * block_k
    key_hi = key_lo + block_k
    return (
        all_rows_nonempty[..., None]
        & (start_hi[..., None] <= key_lo)
        & (end_lo[..., None] >= key_hi)
        & (key_hi <= num_keys)
    )


def interval_tile_flags(
    kv_start: torch.Tensor, kv_end: torch.Tensor, num_keys: int, block_size: int | tuple[int, int] = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) tile flags of an interval mask, each bool [B, nQ, nK], disjoint.

    Args:
        kv_start, kv_end: int32 [B, Lq] key intervals (``kv_start == kv_end``: an empty row).
        num_keys: Lk.
        block_size: the tile size, an int or a (q, kv) pair.
    """
    block_q, block_k = _check_block_size(block_size)
    start, end = kv_start.to(torch.int64), kv_end.to(torch.int64)
    num_k = _cdiv(num_keys, block_k)
    reached = _reached_tiles(start, end, block_q, block_k, num_k)
    full = _full_tiles(start, end, block_q, block_k, num_k, num_keys)
    return reached & ~full, full


def _ordered(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For bool [B, R, C]: (count int32 [B, 1, R], indices int32 [B, 1, R, C]) with the flagged
    columns first (ascending), then the others (ascending), as ``create_block_mask`` orders them.
    A permutation written by scatter: no sort."""
    flagged = flags.to(torch.int32)
    count = flagged.sum(dim=-1, dtype=torch.int32)
    rank_flagged = flagged.cumsum(dim=-1, dtype=torch.int32) - 1
    rank_other = (1 - flagged).cumsum(dim=-1, dtype=torch.int32) - 1 + count[..., None]
    dest = torch.where(flags, rank_flagged, rank_other).to(torch.int64)
    columns = torch.arange(flags.shape[-1], device=flags.device, dtype=torch.int32).expand_as(dest)
    indices = torch.empty_like(columns).scatter_(-1, dest, columns)
    return count[:, None].contiguous(), indices[:, None].contiguous()


def _padded_intervals(
    kv_start: torch.Tensor, kv_end: torch.Tensor, block_q: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_start/kv_end padded with empty rows to a whole number of query blocks, so the mask_mod
    never reads past the end for the queries of an overhanging last block."""
    tail = _cdiv(kv_start.shape[1], block_q) * block_q - kv_start.shape[1]
    pad = lambda t: torch.nn.functional.pad(t, (0, tail), value=0)  # noqa: E731
    return pad(kv_start), pad(kv_end)


def _interval_mask_mod(kv_start: torch.Tensor, kv_end: torch.Tensor):
    """The mask_mod of an interval mask: key ``kv_idx`` is visible to query ``q_idx`` of row ``b``."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= kv_start[b, q_idx]) & (kv_idx < kv_end[b, q_idx])

    return mask_mod


def _assemble(
    tables: tuple[torch.Tensor, ...], seq_lengths: tuple[int, int], block_size: tuple[int, int], mask_mod
) -> BlockMask:
    kv_num, kv_idx, full_kv_num, full_kv_idx, q_num, q_idx, full_q_num, full_q_idx = tables
    return BlockMask(
        seq_lengths=seq_lengths,
        kv_num_blocks=kv_num,
        kv_indices=kv_idx,
        full_kv_num_blocks=full_kv_num,
        full_kv_indices=full_kv_idx,
        q_num_blocks=q_num,
        q_indices=q_idx,
        full_q_num_blocks=full_q_num,
        full_q_indices=full_q_idx,
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
    )


def block_mask_from_intervals(
    kv_start: torch.Tensor, kv_end: torch.Tensor, num_keys: int, block_size: int | tuple[int, int] = 128
) -> BlockMask:
    """FlexAttention's ``BlockMask`` for an interval mask, from the intervals' block bounds.

    Args:
        kv_start, kv_end: int32 [B, Lq] key intervals, ``0 <= start <= end <= num_keys``.
        num_keys: Lk (> 0).
        block_size: tile size, an int or a (q, kv) pair (FlexAttention's default is 128).

    Returns:
        BlockMask with batch B and one head (broadcast over heads); ``kv_num_blocks`` /
        ``kv_indices`` list the partial tiles (int32 [B, 1, nQ] / [B, 1, nQ, nK]), ``full_kv_*`` the
        full ones, ``q_num_blocks`` / ``q_indices`` / ``full_q_*`` the same per key block
        ([B, 1, nK] / [B, 1, nK, nQ]) for the backward. Its mask_mod tests the interval.
    """
    if kv_start.shape[1] == 0 or num_keys <= 0:
        raise ValueError(
            f"a BlockMask needs at least one query and one key, got Lq={kv_start.shape[1]}, num_keys={num_keys}"
        )
    sizes = _check_block_size(block_size)
    partial, full = interval_tile_flags(kv_start, kv_end, num_keys, sizes)
    tables = (*_ordered(partial), *_ordered(full))
    tables += (*_ordered(partial.transpose(1, 2)), *_ordered(full.transpose(1, 2)))
    mask_mod = _interval_mask_mod(*_padded_intervals(kv_start, kv_end, sizes[0]))
    return _assemble(tables, (kv_start.shape[1], num_keys), sizes, mask_mod)


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    tables: tuple[torch.Tensor, ...],
    seq_lengths: tuple[int, int],
    block_size: tuple[int, int],
    scale: float,
    kernel_options: dict | None,
) -> torch.Tensor:
    """flex_attention with a BlockMask rebuilt from tensors, so that compiling this function
    guards on shapes only, not on the identity of a mask_mod closure."""
    block_mask = _assemble(tables, seq_lengths, block_size, _interval_mask_mod(kv_start, kv_end))
    return flex_attention(
        q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
        kernel_options=kernel_options,
    )  # fmt: skip


@functools.cache
def _compiled_attend():
    return torch.compile(_attend, dynamic=False, fullgraph=True)


def flex_mixed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    block_mask: BlockMask,
    scale: float,
    kernel_options: dict | None = None,
) -> torch.Tensor:
    """Compiled ``flex_attention`` under an interval mask.

    Args:
        q: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D], ``Hq % Hkv == 0`` (GQA through ``enable_gqa``).
        kv_start, kv_end: int32 [B, Lq], the intervals ``block_mask`` was built from.
            CPU: forward only (torch's FlexAttention has no CPU backward).
        block_mask: from :func:`block_mask_from_intervals` (its tables and block size are used).
        scale: softmax scale.
        kernel_options: passed to ``flex_attention`` unchanged (e.g. ``{"BACKEND": "FLASH"}``
            where the installed torch has it).

    Returns:
        [B, Hq, Lq, D] in q's dtype; rows with an empty interval are zero and get zero gradients.
    """
    tables = (
        block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
        block_mask.full_kv_indices, block_mask.q_num_blocks, block_mask.q_indices,
        block_mask.full_q_num_blocks, block_mask.full_q_indices,
    )  # fmt: skip
    padded = _padded_intervals(kv_start, kv_end, block_mask.BLOCK_SIZE[0])  # outside: inductor's CPU
    return _compiled_attend()(  # flex lowering rejected an in-graph non-trivial pad of the mask buffers
        q, k, v, *padded, tables, tuple(block_mask.seq_lengths), tuple(block_mask.BLOCK_SIZE),
        scale, kernel_options,
    )  # fmt: skip
