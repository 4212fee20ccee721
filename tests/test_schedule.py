"""Tile schedules (croc.ops.schedule): the index lists' tile classification and the range
schedules against brute force, their memory at long lengths, and the launch helpers' limits."""

import pytest
import torch
from mask_cases import croc_layout, random_layout

import croc
from croc.ops import schedule
from croc.ops.schedule import TILE_EMPTY, TILE_FULL, TILE_PARTIAL


def _brute_force_tiles(dense, block_q, block_k):
    batch, seq_q, seq_k = dense.shape
    nq, nk = max(1, -(-seq_q // block_q)), max(1, -(-seq_k // block_k))
    kind = torch.zeros(batch, nq, nk, dtype=torch.int8)
    for qb in range(nq):
        for kb in range(nk):
            tile = dense[:, qb * block_q : (qb + 1) * block_q, kb * block_k : (kb + 1) * block_k]
            flat = tile.reshape(batch, -1)
            any_visible, all_visible = flat.any(dim=1), flat.all(dim=1)
            kind[:, qb, kb] = torch.where(
                all_visible & any_visible,
                TILE_FULL,
                torch.where(any_visible, TILE_PARTIAL, TILE_EMPTY),
            ).to(torch.int8)
    return kind


def _check_tiles(mask, block_q, block_k):
    """Full tiles exactly; empty tiles never hide a visible pair; lists match the tile kinds."""
    meta = mask.block_metadata(block_q, block_k)
    truth = _brute_force_tiles(mask.to_dense(), block_q, block_k)
    kind = meta.tile_kind
    assert kind.shape == truth.shape
    assert torch.equal(kind == TILE_FULL, truth == TILE_FULL)
    assert not ((kind == TILE_EMPTY) & (truth != TILE_EMPTY)).any()
    nonempty = kind != TILE_EMPTY
    for b in range(nonempty.shape[0]):
        for qb in range(nonempty.shape[1]):
            count = int(meta.kv_block_count[b, qb])
            assert meta.kv_blocks[b, qb, :count].tolist() == nonempty[b, qb].nonzero().flatten().tolist()
        for kb in range(nonempty.shape[2]):
            count = int(meta.q_block_count[b, kb])
            assert meta.q_blocks[b, kb, :count].tolist() == nonempty[b, :, kb].nonzero().flatten().tolist()
    return meta, truth


@pytest.mark.parametrize("block_q,block_k", [(4, 4), (16, 8), (3, 5), (64, 64)])
@pytest.mark.parametrize("seed", range(6))
def test_block_metadata_against_brute_force(block_q, block_k, seed):
    layout = random_layout(3, 7 + 9 * seed, seed)
    mask = croc.MixedMask.from_spans(layout.span_ids, layout.attention_mask, layout.segment_ids)
    meta, _ = _check_tiles(mask, block_q, block_k)
    assert mask.block_metadata(block_q, block_k) is meta  # cached: computed once per batch


def test_block_metadata_with_fewer_queries_than_keys():
    start = torch.tensor([[0, 0, 10, 12]])
    end = torch.tensor([[20, 5, 18, 12]])
    _check_tiles(croc.MixedMask.from_intervals(start, end, 20), 2, 8)


@pytest.mark.parametrize("block_q,block_k", [(128, 64), (128, 128), (64, 64)])
def test_block_metadata_croc_layout_is_exact_and_sparse(block_q, block_k):
    layout = croc_layout(2, 2048, image_tokens=576, text_tokens=100, pad=50)
    mask = croc.MixedMask.from_spans(layout.span_ids, layout.attention_mask, layout.segment_ids)
    meta, truth = _check_tiles(mask, block_q, block_k)
    # packed documents with one span each: block min/max classify every tile exactly
    assert torch.equal(meta.tile_kind, truth)
    # three packed documents: most tiles are skipped, and most visited ones need no masking
    assert (truth == TILE_EMPTY).float().mean() > 0.5
    assert (truth == TILE_FULL).sum() >= 0.45 * (truth != TILE_EMPTY).sum()


@pytest.mark.parametrize("block_q,block_k", [(0, 16), (16, -1)])
def test_block_metadata_rejects_bad_blocks(block_q, block_k):
    with pytest.raises(ValueError, match="block sizes"):
        croc.MixedMask.causal(1, 8).block_metadata(block_q, block_k)


# ----------------------------------------------------------------- range schedules
def _sliding_window(batch, seq_len, window, seed, offset=0):
    """Causal window over ``offset + seq_len`` keys (query i at key offset + i), random empty rows."""
    gen = torch.Generator().manual_seed(seed)
    pos = offset + torch.arange(seq_len).expand(batch, seq_len)
    start, end = (pos - window + 1).clamp_min(0), pos + 1
    empty = torch.rand(batch, seq_len, generator=gen) < 0.25
    return croc.MixedMask.from_intervals(
        torch.where(empty, 0, start), torch.where(empty, 0, end), offset + seq_len, monotone=True
    )


def _croc_rows(batch, length, **kwargs):
    rows = croc_layout(batch, length, **kwargs)
    return croc.MixedMask.from_spans(rows.span_ids, rows.attention_mask, rows.segment_ids)


def _random_rows(batch, length, seed):
    rows = random_layout(batch, length, seed, max_docs=4, max_spans=4)
    return croc.MixedMask.from_spans(rows.span_ids, rows.attention_mask, rows.segment_ids)


MONOTONE_MASKS = {
    "spans": lambda: _random_rows(3, 61, 5),
    "causal": lambda: croc.MixedMask.causal(2, 45),
    "window": lambda: _sliding_window(2, 50, 9, seed=1),
    "kv-cache": lambda: _sliding_window(2, 23, 30, seed=2, offset=40),  # 23 queries over 63 keys
    "all-empty": lambda: croc.MixedMask.from_intervals(*(torch.zeros(1, 20, dtype=torch.int32),) * 2, 20),
    "croc": lambda: _croc_rows(1, 300, image_tokens=40, text_tokens=17, pad=9),
}


def _check_range(bounds, tile_of, num_own, num_other, other_len, other_block):
    """Sound and exact: a tile with a visible pair lies in [a, d); it is in [b, c) iff every
    non-empty row sees all its keys and it does not overhang the other side's end."""
    assert bounds.dtype == torch.int32 and bounds.shape[1:] == (num_own, 4)
    a, b, c, d = bounds.unbind(-1)
    assert ((a <= b) & (b <= c) & (c <= d) & (d <= num_other)).all()
    for batch in range(bounds.shape[0]):
        for own in range(num_own):
            for other in range(num_other):
                tile = tile_of(batch, own, other)
                in_range = int(a[batch, own]) <= other < int(d[batch, own])
                in_full = int(b[batch, own]) <= other < int(c[batch, own])
                overhang = (other + 1) * other_block > other_len
                full = bool(tile.all()) and not overhang
                assert in_range or not tile.any(), (batch, own, other)
                assert full or not in_full, (batch, own, other)
                head = int(a[batch, own]) <= other < int(b[batch, own])
                assert not (head and overhang), "the head loop runs without bounds checks"
                if tile.any():
                    assert in_full == full, (batch, own, other)


@pytest.mark.parametrize("name", MONOTONE_MASKS)
@pytest.mark.parametrize("block_q,block_k", [(16, 16), (8, 16), (3, 5), (64, 32)])
def test_range_schedules_against_brute_force(name, block_q, block_k):
    mask = MONOTONE_MASKS[name]()
    assert mask.monotone
    dense, nonempty = mask.to_dense(), ~mask.row_is_empty()
    seq_q, seq_k = mask.num_queries, mask.num_keys
    nq, nk = max(1, -(-seq_q // block_q)), max(1, -(-seq_k // block_k))

    def tile(b, qb, kb):  # [query, key] of the non-empty rows only
        rows = slice(qb * block_q, (qb + 1) * block_q)
        return dense[b, rows, kb * block_k : (kb + 1) * block_k][nonempty[b, rows]]

    rows = schedule.row_schedule(mask, block_q, block_k)
    _check_range(rows, tile, nq, nk, seq_k, block_k)
    columns = schedule.column_schedule(mask, block_q, block_k)
    _check_range(columns, lambda b, kb, qb: tile(b, qb, kb).T, nk, nq, seq_q, block_q)
    assert schedule.row_schedule(mask, block_q, block_k) is rows  # cached on the mask


def test_column_range_schedule_needs_a_monotone_mask():
    mask = croc.MixedMask.from_intervals(torch.tensor([[2, 0]]), torch.tensor([[4, 1]]), 4)
    assert not mask.monotone
    with pytest.raises(ValueError, match="monotone"):
        schedule.column_schedule(mask, 16, 16)
    with pytest.raises(ValueError, match="schedule"):
        schedule.schedule_kind(mask, "fast")
    assert schedule.schedule_kind(mask) == "index"
    assert schedule.schedule_kind(croc.MixedMask.causal(1, 4)) == "range"


@pytest.mark.parametrize("builder", ["causal", "croc"])
def test_schedule_memory_at_128k_tokens(builder):
    """Target: the three passes' schedules of a builder's mask at B = 1, L = 131072 stay < 4 MiB for
    every configuration the package launches (the index lists of one pass alone would not)."""
    from croc.kernels.config import all_configs

    length = 131072
    if builder == "causal":
        mask = croc.MixedMask.causal(1, length)
    else:
        rows = croc_layout(1, length, image_tokens=576, text_tokens=448, pad=0)
        mask = croc.MixedMask.from_spans(rows.span_ids, rows.attention_mask, rows.segment_ids)
    for _, _, _, config in all_configs():
        tables = schedule.pass_schedules(mask, config)
        assert all(t.shape[2] == 4 for t in tables)
        assert sum(t.numel() * t.element_size() for t in tables) < 4 * 2**20, config
    index_bytes = (length // 128) * (4 + length // 128) * 4
    assert index_bytes > 4 * 2**20


# ----------------------------------------------------------------- launch limits (int64, grid)
def test_grid_is_one_dimensional_and_checked():
    kernels = pytest.importorskip("croc.kernels.mixed_attention")
    assert kernels.grid_1d(1024, 70000) == (1024 * 70000,)  # B * H past grid.y's 65535 is fine
    assert kernels.grid_1d(0, 4) == (1,)
    with pytest.raises(ValueError, match="programs"):
        kernels.grid_1d(2**16, 2**15)


def test_launch_ready_copies_only_tensors_whose_tile_offsets_could_wrap():
    """Huge strides, no memory (meta tensors): batch/head/block bases are int64 in the kernels, so
    only a row stride whose 128-row tile offset passes int32 (or a non-unit last stride) is copied."""
    kernels = pytest.importorskip("croc.kernels.mixed_attention")
    wide_batch = torch.empty_strided((3, 2, 64, 128), (2**40, 2**33, 128, 1), device="meta")
    assert kernels.launch_ready(wide_batch, 128) is wide_batch
    sdpa_view = torch.empty(1, 2**20, 32, 128, device="meta").transpose(1, 2)  # H*D = 4096, L = 1M
    assert kernels.launch_ready(sdpa_view, 128) is sdpa_view
    wide_rows = torch.empty_strided((1, 1, 64, 128), (2**40, 2**40, 2**24, 1), device="meta")
    copied = kernels.launch_ready(wide_rows, 128)
    assert copied is not wide_rows and copied.is_contiguous()
    transposed = torch.empty(1, 1, 128, 64, device="meta").transpose(2, 3)
    assert kernels.launch_ready(transposed, 128).stride(-1) == 1
