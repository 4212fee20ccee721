"""Reference backend of croc.mixed_attention against a hand-written fp64 softmax."""

import math

import pytest
import torch
from mask_cases import random_layout

import croc


def softmax_attention_fp64(q, k, v, dense_mask, scale):
    """Hand-written masked softmax attention in float64; rows without keys give zeros."""
    q, k, v = (t.double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    scores = scores.masked_fill(~dense_mask[:, None], float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).clamp_min(-1e300)
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    probs = torch.where(denom > 0, weights / denom.clamp_min(1e-300), torch.zeros_like(weights))
    return torch.einsum("bhqk,bhkd->bhqd", probs, v)


def _masks(batch, seq_q, seq_k, seed):
    if seq_q == seq_k:
        layout = random_layout(batch, seq_q, seed)
        yield croc.MixedMask.from_spans(layout.span_ids, layout.attention_mask, layout.segment_ids)
        yield croc.MixedMask.causal(batch, seq_q)
    offset = seq_k - seq_q  # decoding with a cache: the last seq_q positions, plus one empty row
    end = torch.arange(offset + 1, seq_k + 1).expand(batch, seq_q).clone()
    start = torch.zeros_like(end)
    end[:, 0] = 0
    yield croc.MixedMask.from_intervals(start, end, seq_k)


CASES = [
    # batch, heads_q, heads_kv, seq_q, seq_k, head_dim
    (1, 1, 1, 1, 1, 8),
    (2, 4, 4, 13, 13, 16),
    (2, 4, 2, 37, 37, 32),
    (1, 6, 1, 5, 21, 16),
    (3, 2, 2, 64, 64, 64),
]


@pytest.mark.parametrize("batch,heads_q,heads_kv,seq_q,seq_k,head_dim", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
def test_forward_and_backward_match_fp64(batch, heads_q, heads_kv, seq_q, seq_k, head_dim, dtype, tol):
    gen = torch.Generator().manual_seed(seq_q * 31 + head_dim)
    for mask in _masks(batch, seq_q, seq_k, seed=seq_k):
        q = torch.randn(batch, heads_q, seq_q, head_dim, generator=gen, dtype=dtype, requires_grad=True)
        k = torch.randn(batch, heads_kv, seq_k, head_dim, generator=gen, dtype=dtype, requires_grad=True)
        v = torch.randn(batch, heads_kv, seq_k, head_dim, generator=gen, dtype=dtype, requires_grad=True)
        grad_out = torch.randn(batch, heads_q, seq_q, head_dim, generator=gen, dtype=dtype)
        scale = 1 / math.sqrt(head_dim)
        out = croc.mixed_attention(q, k, v, mask, backend="reference")
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
        expected = softmax_attention_fp64(qd, kd, vd, mask.to_dense(), scale)
        expected_grads = torch.autograd.grad(expected, (qd, kd, vd), grad_out.double())
        torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
        for got, want in zip(grads, expected_grads):
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got.double(), want, atol=tol * 10, rtol=tol * 10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_close_and_empty_rows_are_zero(dtype):
    layout = random_layout(2, 29, seed=3)
    layout.attention_mask[0, -4:] = 0
    layout.span_ids[0, -4:] = -1
    mask = croc.MixedMask.from_spans(layout.span_ids, layout.attention_mask, layout.segment_ids)
    q, k, v = (torch.randn(2, 2, 29, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    out = croc.mixed_attention(q, k, v, mask)
    out.float().square().sum().backward()
    expected = softmax_attention_fp64(q, k, v, mask.to_dense(), 0.25)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=3e-2, rtol=3e-2)
    empty = mask.row_is_empty()
    assert empty[0, -4:].all()
    assert out[0, :, -4:].eq(0).all()
    assert q.grad[0, :, -4:].eq(0).all()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


def test_all_rows_empty_gives_zero_and_finite_grads():
    mask = croc.MixedMask.from_intervals(
        torch.zeros(1, 4, dtype=torch.int32), torch.zeros(1, 4, dtype=torch.int32), 4
    )
    q, k, v = (torch.randn(1, 2, 4, 8, requires_grad=True) for _ in range(3))
    out = croc.mixed_attention(q, k, v, mask)
    out.sum().backward()
    assert out.eq(0).all()
    for t in (q, k, v):
        assert t.grad.eq(0).all()


def test_default_scale_and_explicit_scale_agree():
    mask = croc.MixedMask.causal(1, 6)
    q, k, v = (torch.randn(1, 2, 6, 16) for _ in range(3))
    torch.testing.assert_close(
        croc.mixed_attention(q, k, v, mask), croc.mixed_attention(q, k, v, mask, scale=0.25)
    )


def _qkv(**overrides):
    shapes = {"q": (1, 4, 5, 8), "k": (1, 2, 5, 8), "v": (1, 2, 5, 8)}
    tensors = {name: torch.randn(shape) for name, shape in shapes.items()}
    tensors.update(overrides)
    return tensors


@pytest.mark.parametrize(
    "overrides,mask,error,match",
    [
        ({"q": torch.randn(4, 5, 8)}, None, ValueError, "q must have shape"),
        (
            {"k": torch.randn(1, 3, 5, 8), "v": torch.randn(1, 3, 5, 8)},
            None,
            ValueError,
            "multiple of k/v heads",
        ),
        ({"k": torch.randn(1, 2, 5, 4), "v": torch.randn(1, 2, 5, 4)}, None, ValueError, "head_dim"),
        ({"v": torch.randn(1, 2, 6, 8)}, None, ValueError, "same shape"),
        (
            {"q": torch.randn(1, 4, 5, 8, dtype=torch.complex64)},
            None,
            ValueError,
            "float32, float16 or bfloat16",
        ),
        (
            {"k": torch.randn(1, 2, 5, 8).half(), "v": torch.randn(1, 2, 5, 8).half()},
            None,
            ValueError,
            "one dtype",
        ),
        ({"q": torch.randint(0, 3, (1, 4, 5, 8))}, None, ValueError, "float32"),
        ({"k": torch.randn(2, 2, 5, 8), "v": torch.randn(2, 2, 5, 8)}, None, ValueError, "batch"),
        ({}, croc.MixedMask.causal(1, 4), ValueError, "intervals of shape"),
        ({}, "not a mask", TypeError, "croc.MixedMask"),
        (
            {},
            croc.MixedMask.from_intervals(
                torch.zeros(1, 5, dtype=torch.int32), torch.ones(1, 5, dtype=torch.int32), 6
            ),
            ValueError,
            "num_keys",
        ),
        ({"q": [[1.0]]}, None, TypeError, "q must be a torch.Tensor"),
    ],
)
def test_bad_arguments(overrides, mask, error, match):
    tensors = _qkv(**overrides)
    mask = croc.MixedMask.causal(1, 5) if mask is None else mask
    with pytest.raises(error, match=match):
        croc.mixed_attention(tensors["q"], tensors["k"], tensors["v"], mask)


def test_unknown_backend():
    t = _qkv()
    with pytest.raises(ValueError, match="backend"):
        croc.mixed_attention(t["q"], t["k"], t["v"], croc.MixedMask.causal(1, 5), backend="flash")


def test_float64_is_reference_only():
    t = {name: x.double() for name, x in _qkv().items()}
    with pytest.raises(ValueError, match="float64"):
        croc.mixed_attention(t["q"], t["k"], t["v"], croc.MixedMask.causal(1, 5), backend="triton")
