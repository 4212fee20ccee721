"""Triton mixed attention (interpreter on CPU, compiled on a GPU) against an fp64 reference.

Without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 before croc is imported, so the kernels run
in the Triton interpreter with 16 x 16 tiles: short sequences already span several tiles, and the
random layouts put span, document and padding edges inside and across tiles. fp32 and fp16 only
(bf16 arithmetic is wrong in the interpreter). Every mask runs through both schedules: the range
schedule (monotone masks, what the builders make) and the index-list schedule (the fallback for any
other mask), the latter by handing the kernels a copy of the mask with ``monotone=False``.
"""

from __future__ import annotations

import pytest
import torch
from mask_cases import croc_layout, random_layout

import croc

pytest.importorskip("triton")
triton_attention = pytest.importorskip("croc.ops.triton_attention")
kernels = pytest.importorskip("croc.kernels")
schedule_mod = pytest.importorskip("croc.ops.schedule")

pytestmark = pytest.mark.matrix_kernels
SCHEDULES = ("range", "index")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 runs TF32 dots on a GPU (exact fp32 in the interpreter); relative to max(1, max |reference|)
TOLERANCE = {torch.float32: 5e-3 if DEVICE == "cuda" else 2e-4, torch.float16: 2e-2}


def _layout_mask(builder: str, batch: int, seq_len: int, seed: int) -> croc.MixedMask:
    if builder == "causal":
        return croc.MixedMask.causal(batch, seq_len, device=DEVICE)
    if builder == "croc":
        layout = croc_layout(batch, seq_len, image_tokens=11, text_tokens=3, pad=2)
    else:
        layout = random_layout(batch, seq_len, seed)
    tensors = (layout.span_ids, layout.attention_mask, layout.segment_ids)
    if builder == "image":
        tensors = (layout.image_mask, layout.attention_mask, layout.segment_ids)
    span_or_image, attention_mask, segment_ids = (t.to(DEVICE) for t in tensors)
    build = croc.MixedMask.from_image_mask if builder == "image" else croc.MixedMask.from_spans
    return build(span_or_image, attention_mask, segment_ids)


def _prefill_mask(batch: int, seq_q: int, seq_k: int) -> croc.MixedMask:
    """The last ``seq_q`` of ``seq_k`` positions, causal, with a bidirectional block and one empty row."""
    offset = seq_k - seq_q
    end = torch.arange(offset + 1, seq_k + 1).expand(batch, seq_q).clone()
    end[:, 3:9] = min(offset + 9, seq_k)  # queries 3..8 see each other (a span across a tile edge at 16)
    start = torch.zeros_like(end)
    start[:, seq_q // 2 :] = 5
    start[:, 1], end[:, 1] = 0, 0  # an empty row
    return croc.MixedMask.from_intervals(start.to(DEVICE), end.to(DEVICE), seq_k)


def _sliding_window_mask(batch: int, seq_len: int, window: int, seed: int) -> croc.MixedMask:
    """Causal sliding window with random empty rows anywhere (holes, left and right): monotone."""
    gen = torch.Generator().manual_seed(seed)
    pos = torch.arange(seq_len).expand(batch, seq_len)
    start, end = (pos - window + 1).clamp_min(0), pos + 1
    empty = torch.rand(batch, seq_len, generator=gen) < 0.2
    empty[:, :2] = True
    start, end = torch.where(empty, 0, start), torch.where(empty, 0, end)
    mask = croc.MixedMask.from_intervals(start.to(DEVICE), end.to(DEVICE), seq_len)
    assert mask.monotone
    return mask


def _random_intervals_mask(batch: int, seq_q: int, seq_k: int, seed: int) -> croc.MixedMask:
    """Arbitrary intervals (not monotone): the index-list schedule's case."""
    gen = torch.Generator().manual_seed(seed)
    a, b = (torch.randint(0, seq_k + 1, (batch, seq_q), generator=gen) for _ in range(2))
    mask = croc.MixedMask.from_intervals(a.minimum(b).to(DEVICE), a.maximum(b).to(DEVICE), seq_k)
    assert not mask.monotone
    return mask


def _with_schedule(mask: croc.MixedMask, schedule: str) -> croc.MixedMask:
    """The same intervals; ``"index"`` drops the monotone flag, so the kernels get index lists."""
    if schedule == "range":
        assert mask.monotone
        return mask
    return croc.MixedMask(mask.kv_start, mask.kv_end, mask.num_keys, monotone=False)


def _inputs(batch, heads_q, heads_kv, seq_q, seq_k, head_dim, dtype, seed, strided=False):
    gen = torch.Generator().manual_seed(seed)

    def make(heads, length):
        if strided:  # SDPA view of a [B, L, H, D] tensor
            return torch.randn(batch, length, heads, head_dim, generator=gen).transpose(1, 2)
        return torch.randn(batch, heads, length, head_dim, generator=gen)

    tensors = (make(heads_q, seq_q), make(heads_kv, seq_k), make(heads_kv, seq_k), make(heads_q, seq_q))
    return tuple(t.to(device=DEVICE, dtype=dtype) for t in tensors)


def _grads(q, k, v, dout, mask, backend):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = croc.mixed_attention(*leaves, mask, backend=backend)
    return (out, *torch.autograd.grad(out, leaves, dout))


def _assert_matches_fp64(q, k, v, dout, mask, tol, schedule="range"):
    """Forward and dq/dk/dv of the Triton backend vs fp64 math on the same (rounded) inputs."""
    got = _grads(q, k, v, dout, _with_schedule(mask, schedule), "triton")
    want = _grads(*(t.double() for t in (q, k, v, dout)), mask, "reference")
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == q.dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), f"{name} has NaN/inf"
        err = (a.double() - b).abs().max().item()
        assert err <= tol * max(1.0, b.abs().max().item()), f"{name}: max error {err:.3g}"
    empty = mask.row_is_empty()[:, None, :, None].expand_as(got[0])
    assert (got[0][empty] == 0).all() and (got[1][empty] == 0).all(), "empty rows must give exact zeros"


BUILDER_CASES = [
    (builder, seq_len, torch.float32)
    for builder in ("spans", "image", "causal", "croc")
    for seq_len in (1, 37)
] + [(builder, 37, torch.float16) for builder in ("spans", "image", "causal", "croc")]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("builder,seq_len,dtype", BUILDER_CASES)
def test_every_builder_matches_fp64(builder, seq_len, dtype, schedule):
    mask = _layout_mask(builder, batch=2, seq_len=seq_len, seed=seq_len)
    q, k, v, dout = _inputs(2, 2, 1, seq_len, seq_len, 64, dtype, seed=seq_len + 7)
    _assert_matches_fp64(q, k, v, dout, mask, TOLERANCE[dtype], schedule)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("seed", range(2))
def test_random_layouts_with_many_documents_and_spans(seed, schedule):
    layout = random_layout(3, 45, seed + 100, max_docs=4, max_spans=4)
    mask = croc.MixedMask.from_spans(
        *(t.to(DEVICE) for t in (layout.span_ids, layout.attention_mask, layout.segment_ids))
    )
    q, k, v, dout = _inputs(3, 2, 2, 45, 45, 64, torch.float32, seed=seed)
    _assert_matches_fp64(q, k, v, dout, mask, TOLERANCE[torch.float32], schedule)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("seq_q,seq_k", [(21, 50), (16, 32), (2, 9)])
def test_prefill_with_fewer_queries_than_keys(seq_q, seq_k, schedule):
    mask = _prefill_mask(2, seq_q, seq_k)
    assert mask.monotone  # detected by the validation
    q, k, v, dout = _inputs(2, 2, 2, seq_q, seq_k, 64, torch.float32, seed=seq_k)
    _assert_matches_fp64(q, k, v, dout, mask, TOLERANCE[torch.float32], schedule)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("seq_len,window", [(53, 7), (40, 20)])
def test_sliding_window_with_empty_rows_anywhere(seq_len, window, schedule):
    mask = _sliding_window_mask(2, seq_len, window, seed=seq_len)
    q, k, v, dout = _inputs(2, 2, 1, seq_len, seq_len, 64, torch.float32, seed=window)
    _assert_matches_fp64(q, k, v, dout, mask, TOLERANCE[torch.float32], schedule)


@pytest.mark.parametrize("seq_q,seq_k", [(37, 37), (19, 45)])
def test_arbitrary_intervals_take_the_index_schedule(seq_q, seq_k):
    mask = _random_intervals_mask(2, seq_q, seq_k, seed=seq_q)
    config = kernels.attention_config(64, torch.float32, mask.device)
    assert all(s.shape[2] > 4 for s in schedule_mod.pass_schedules(mask, config))
    q, k, v, dout = _inputs(2, 2, 2, seq_q, seq_k, 64, torch.float32, seed=seq_k)
    _assert_matches_fp64(q, k, v, dout, mask, TOLERANCE[torch.float32], "index")
    with pytest.raises(ValueError, match="monotone"):
        triton_attention.triton_mixed_attention(q, k, v, mask, 0.125, schedule="range")


@pytest.mark.matrix_kernels
@pytest.mark.parametrize("head_dim,heads_q,heads_kv", [(64, 4, 2), (80, 3, 1), (96, 4, 2), (128, 3, 1)])
def test_head_dims_and_gqa(head_dim, heads_q, heads_kv):
    mask = _layout_mask("spans", batch=1, seq_len=35, seed=head_dim)
    q, k, v, dout = _inputs(1, heads_q, heads_kv, 35, 35, head_dim, torch.float32, seed=head_dim)
    _assert_matches_fp64(q, k, v, dout, mask, TOLERANCE[torch.float32])


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_all_rows_empty_gives_zeros_and_zero_grads(schedule):
    mask = croc.MixedMask.from_intervals(
        torch.zeros(2, 20, dtype=torch.int32), torch.zeros(2, 20, dtype=torch.int32), 20
    )
    mask = _with_schedule(mask.to(DEVICE), schedule)
    q, k, v, dout = _inputs(2, 2, 2, 20, 20, 64, torch.float16, seed=0)
    for t in _grads(q, k, v, dout, mask, "triton"):
        assert torch.equal(t, torch.zeros_like(t))


def test_strided_sdpa_views_run_in_place_and_keep_their_layout():
    mask = _layout_mask("spans", batch=2, seq_len=33, seed=5)
    q, k, v, dout = _inputs(2, 4, 2, 33, 33, 64, torch.float32, seed=5, strided=True)
    assert not q.is_contiguous()
    _assert_matches_fp64(q, k, v, dout, mask, TOLERANCE[torch.float32])
    out, dq, dk, _ = _grads(q, k, v, dout, mask, "triton")
    assert out.stride() == q.stride() and dq.stride() == q.stride() and dk.stride() == k.stride()


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_keys_without_16_byte_strides_take_the_pointer_path(schedule):
    """Keys/values whose row stride is not a multiple of 16 bytes cannot be TMA descriptors: the
    forward and the dQ pass read them through pointers (chosen on the host from the strides) and
    still match (every other test here runs both through the interpreter's descriptors)."""
    mask = _layout_mask("croc", batch=2, seq_len=37, seed=3)
    q, k, v, dout = _inputs(2, 2, 1, 37, 37, 64, torch.float32, seed=3)
    k, v = (torch.cat([t, t[..., :1]], dim=-1)[..., :64] for t in (k, v))  # row stride 65 elements
    assert k.stride(2) == 65 and kernels.mixed_attention.tma_ready(q, dout) == (DEVICE == "cpu" or _hopper())
    assert not kernels.mixed_attention.tma_ready(k, v)
    _assert_matches_fp64(q, k, v, dout, mask, TOLERANCE[torch.float32], schedule)


def test_keys_off_the_16_byte_grid_are_copied_for_the_descriptors():
    """Aligned strides but a base address 4 bytes off the 16-byte grid (a view one element into
    its storage): TMA is still chosen (shapes and strides only), the launch copies K/V into aligned
    memory for the descriptors, and forward and gradients still match."""
    mask = _layout_mask("spans", batch=2, seq_len=37, seed=4)
    q, k, v, dout = _inputs(2, 2, 1, 37, 37, 64, torch.float32, seed=4)
    k, v = (torch.cat([t.new_zeros(1), t.flatten()])[1:].view_as(t) for t in (k, v))
    assert k.data_ptr() % 16 == 4 and k.is_contiguous()
    assert kernels.mixed_attention.tma_ready(k, v) == (DEVICE == "cpu" or _hopper())
    copied = kernels.mixed_attention._aligned(k)
    assert copied.data_ptr() % 16 == 0 and copied.stride() == k.stride() and torch.equal(copied, k)
    _assert_matches_fp64(q, k, v, dout, mask, TOLERANCE[torch.float32])


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def test_backward_is_deterministic():
    mask = _layout_mask("spans", batch=2, seq_len=45, seed=11)
    q, k, v, dout = _inputs(2, 4, 1, 45, 45, 64, torch.float32, seed=11)
    first = _grads(q, k, v, dout, mask, "triton")
    second = _grads(q, k, v, dout, mask, "triton")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("warm_cache", [False, True])
def test_torch_compile_fullgraph(warm_cache):
    mask = _layout_mask("spans", batch=2, seq_len=24, seed=3)
    q, k, v, dout = _inputs(2, 2, 1, 24, 24, 64, torch.float32, seed=3)
    proj = torch.nn.Linear(64, 64).to(DEVICE)

    def layer(q, k, v, mask):
        return proj(croc.mixed_attention(q, k, v, mask, backend="triton"))

    eager = [t.detach().requires_grad_() for t in (q, k, v)]
    expected = layer(*eager, mask)
    expected_grads = torch.autograd.grad(expected, eager, dout)
    if not warm_cache:
        mask = croc.MixedMask(mask.kv_start, mask.kv_end, mask.num_keys, monotone=True)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    got = compiled(*leaves, mask)
    grads = torch.autograd.grad(got, leaves, dout)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_torch_compile_takes_a_new_mask_each_step_without_recompiling():
    def layer(q, k, v, mask):
        return croc.mixed_attention(q, k, v, mask, backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    q, k, v, _ = _inputs(2, 2, 2, 24, 24, 64, torch.float32, seed=8)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(3):  # a fresh mask (empty metadata cache) per step, as in training
            mask = _layout_mask("spans", batch=2, seq_len=24, seed=seed)
            want = croc.mixed_attention(q, k, v, mask, backend="reference")
            torch.testing.assert_close(
                compiled(q, k, v, mask), want, rtol=1e-5, atol=TOLERANCE[torch.float32]
            )


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_custom_ops_pass_opcheck(schedule):
    """Schema, fake functions, autograd registration and AOT dispatch of both custom ops."""
    mask = _with_schedule(_layout_mask("spans", batch=1, seq_len=20, seed=4), schedule)
    q, k, v, dout = _inputs(1, 2, 1, 20, 20, 64, torch.float32, seed=4)
    config = kernels.attention_config(64, q.dtype, q.device)
    fwd, dq, dkdv = schedule_mod.pass_schedules(mask, config)
    assert (fwd.shape[2] == 4) == (schedule == "range")
    intervals = (mask.kv_start, mask.kv_end)
    fwd_args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), *intervals, fwd, dq, dkdv, 0.125)
    torch.library.opcheck(torch.ops.croc.mixed_attention_fwd.default, fwd_args)
    out, lse2 = torch.ops.croc.mixed_attention_fwd(*fwd_args)
    bwd_args = (
        dout,
        q.detach(),
        k.detach(),
        v.detach(),
        out.detach(),
        lse2.detach(),
        *intervals,
        dq,
        dkdv,
        0.125,
    )
    torch.library.opcheck(torch.ops.croc.mixed_attention_bwd.default, bwd_args)


def test_non_positive_scale_is_a_value_error():
    mask = croc.MixedMask.causal(1, 8, device=DEVICE)
    q = torch.randn(1, 1, 8, 64, device=DEVICE)
    with pytest.raises(ValueError, match="scale"):
        croc.mixed_attention(q, q, q, mask, scale=-0.1, backend="triton")


def test_unsupported_head_dim_is_a_value_error():
    mask = croc.MixedMask.causal(1, 8, device=DEVICE)
    q = torch.randn(1, 1, 8, 32, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim"):
        croc.mixed_attention(q, q, q, mask, backend="triton")


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU tensors only")
def test_cpu_tensors_without_interpreter_are_a_value_error(monkeypatch):
    monkeypatch.setattr(triton_attention, "INTERPRET", False)
    mask = croc.MixedMask.causal(1, 8)
    q = torch.randn(1, 1, 8, 64)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        croc.mixed_attention(q, q, q, mask, backend="triton")
