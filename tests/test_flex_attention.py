"""The interval BlockMask against create_block_mask and the dense rule; backend="flex" against the reference."""

from __future__ import annotations

import pytest
import torch
from mask_cases import random_layout
from torch.nn.attention.flex_attention import create_block_mask

import croc
from croc.ops.flex_attention import interval_tile_flags

pytestmark = pytest.mark.matrix_integration  # also under torch 2.11, the GPU machines' torch

FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
          "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")  # fmt: skip


def _masks():
    lay = random_layout(3, 45, seed=1)
    yield "spans", croc.MixedMask.from_spans(lay.span_ids, lay.attention_mask, lay.segment_ids)
    yield "causal", croc.MixedMask.causal(2, 37)
    gen = torch.Generator().manual_seed(5)
    a = torch.randint(0, 61, (2, 29), generator=gen)
    b = torch.randint(0, 61, (2, 29), generator=gen)
    yield "arbitrary", croc.MixedMask.from_intervals(torch.minimum(a, b), torch.maximum(a, b), 60)


@pytest.mark.parametrize("block_size", [8, 16, (8, 16)])
@pytest.mark.parametrize("name_mask", list(_masks()), ids=lambda nm: nm[0])
def test_tables_equal_create_block_mask(name_mask, block_size):
    mask = name_mask[1]

    def mask_mod(b, h, q, k):
        return (k >= mask.kv_start[b, q]) & (k < mask.kv_end[b, q])

    want = create_block_mask(
        mask_mod, mask.batch_size, None, mask.num_queries, mask.num_keys, device="cpu", BLOCK_SIZE=block_size
    )
    got = mask.to_block_mask(block_size)
    for field in FIELDS:
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    assert tuple(got.seq_lengths) == tuple(want.seq_lengths)


@pytest.mark.parametrize("name_mask", list(_masks()), ids=lambda nm: nm[0])
def test_tile_flags_match_the_dense_rule(name_mask):
    mask = name_mask[1]
    partial, full = interval_tile_flags(mask.kv_start, mask.kv_end, mask.num_keys, 8)
    dense = mask.to_dense()
    nq, nk = partial.shape[1:]
    dense = torch.nn.functional.pad(dense, (0, nk * 8 - mask.num_keys, 0, nq * 8 - mask.num_queries))
    tiles = dense.view(mask.batch_size, nq, 8, nk, 8)
    assert torch.equal(full, tiles.all(dim=(2, 4)))
    assert torch.equal(partial | full, tiles.any(dim=(2, 4)))


@pytest.mark.slow
def test_flex_forward_equals_reference_and_zeroes_empty_rows():
    """Compiled flex on the CPU (forward only: torch's FlexAttention has no CPU backward). ~45 s."""
    mask = dict(_masks())["spans"]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, h, 45, 16, generator=gen) for h in (4, 2, 2))
    got = croc.mixed_attention(q, k, v, mask, backend="flex")
    want = croc.mixed_attention(q, k, v, mask, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert mask.row_is_empty().any()
    lay = random_layout(3, 45, seed=2)  # a new layout, same shapes: no recompile
    other = croc.MixedMask.from_spans(lay.span_ids, lay.attention_mask, lay.segment_ids)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = croc.mixed_attention(q, k, v, other, backend="flex")
    torch.testing.assert_close(
        got, croc.mixed_attention(q, k, v, other, backend="reference"), rtol=1e-5, atol=1e-5
    )


def test_kernel_options_only_for_flex():
    mask = croc.MixedMask.causal(1, 8)
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="kernel_options"):
        croc.mixed_attention(q, q, q, mask, backend="reference", kernel_options={})


def test_flex_refuses_a_cpu_backward_up_front():
    """torch's FlexAttention has no CPU backward: a clear ValueError before any compile."""
    mask = croc.MixedMask.causal(1, 8)
    q = torch.randn(1, 1, 8, 16, requires_grad=True)
    with pytest.raises(ValueError, match="forward-only"):
        croc.mixed_attention(q, q, q, mask, backend="flex")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on purpose
@pytest.mark.parametrize("block_size", [16, (8, 16)])
@pytest.mark.parametrize("name_mask", list(_masks()), ids=lambda nm: nm[0])
def test_block_mask_gradients_equal_reference_through_torch_math(name_mask, block_size, monkeypatch):
    """The backward a BlockMask of ours drives, in float64, against the reference backend.

    torch refuses FlexAttention gradients on the CPU at its API entry, before any kernel; with that
    check lifted, its eager path runs its own math backward with our mask_mod (on the padded
    intervals), including rows that overhang the last query block and empty rows. The tables the
    fused GPU backward reads are the ones tested equal to ``create_block_mask``'s above.
    """
    import torch.nn.attention.flex_attention as flex_module

    _, mask = name_mask
    monkeypatch.setattr(flex_module, "_validate_device", lambda *tensors: None)
    gen = torch.Generator().manual_seed(3)
    shape = lambda heads, length: (mask.batch_size, heads, length, 8)  # noqa: E731
    q = torch.randn(shape(4, mask.num_queries), generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (
        torch.randn(shape(2, mask.num_keys), generator=gen, dtype=torch.float64, requires_grad=True)
        for _ in range(2)
    )
    got = flex_module.flex_attention(q, k, v, block_mask=mask.to_block_mask(block_size), enable_gqa=True)
    want = croc.mixed_attention(q, k, v, mask, backend="reference")
    grad_out = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for ours, ref in zip(
        torch.autograd.grad(got, (q, k, v), grad_out), torch.autograd.grad(want, (q, k, v), grad_out)
    ):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_block_mask_is_cached_per_block_size():
    """Every layer of a batch shares one BlockMask, as the kernels share one schedule."""
    mask = croc.MixedMask.causal(1, 40)
    assert mask.to_block_mask(8) is mask.to_block_mask(8)
    assert mask.to_block_mask(16) is not mask.to_block_mask(8)
