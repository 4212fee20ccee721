"""MixedMask: every builder against the dense rule, the monotone flag, errors (schedules: test_schedule.py)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mask_cases import dense_rule, random_layout

import croc


@st.composite
def layouts(draw):
    """Rows of documents (packed), padding on either side, spans inside documents."""
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    max_docs = draw(st.integers(1, 4))
    max_spans = draw(st.integers(0, 4))
    return random_layout(batch, length, seed, max_docs=max_docs, max_spans=max_spans)


@settings(max_examples=150, deadline=None)
@given(layouts())
def test_from_spans_matches_dense_rule(layout):
    mask = croc.MixedMask.from_spans(layout.span_ids, layout.attention_mask, layout.segment_ids)
    expected = dense_rule(layout.span_ids, layout.attention_mask, layout.segment_ids)
    assert mask.kv_start.dtype == torch.int32 and mask.kv_end.dtype == torch.int32
    assert mask.num_keys == layout.span_ids.shape[1]
    assert torch.equal(mask.to_dense(), expected)


def _merge_adjacent_spans(image_mask, segment_ids):
    """Span ids of the maximal image runs inside a document (what from_image_mask must use)."""
    span = torch.full(image_mask.shape, -1, dtype=torch.long)
    for b in range(image_mask.shape[0]):
        next_id = -1
        for i in range(image_mask.shape[1]):
            if not image_mask[b, i]:
                continue
            new_run = i == 0 or not image_mask[b, i - 1] or segment_ids[b, i] != segment_ids[b, i - 1]
            next_id += int(new_run)
            span[b, i] = next_id
    return span


@settings(max_examples=100, deadline=None)
@given(layouts())
def test_from_image_mask_matches_dense_rule(layout):
    mask = croc.MixedMask.from_image_mask(layout.image_mask, layout.attention_mask, layout.segment_ids)
    merged = _merge_adjacent_spans(layout.image_mask, layout.segment_ids)
    expected = dense_rule(merged, layout.attention_mask, layout.segment_ids)
    assert torch.equal(mask.to_dense(), expected)


def test_image_runs_in_adjacent_documents_stay_apart():
    image = torch.tensor([[0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    seg = torch.tensor([[0, 0, 0, 1, 1, 1]])
    dense = croc.MixedMask.from_image_mask(image, segment_ids=seg).to_dense()[0]
    assert not dense[1, 3] and not dense[3, 2]
    assert dense[1, 2] and dense[3, 4] and not dense[4, 5]


@pytest.mark.parametrize("batch,length", [(1, 1), (2, 7), (3, 130), (0, 5), (2, 0)])
def test_causal(batch, length):
    mask = croc.MixedMask.causal(batch, length)
    expected = torch.ones(length, length, dtype=torch.bool).tril().expand(batch, length, length)
    assert torch.equal(mask.to_dense(), expected)


@pytest.mark.parametrize("num_queries,num_keys", [(1, 9), (5, 5), (3, 40), (0, 4)])
def test_from_intervals_round_trip(num_queries, num_keys):
    gen = torch.Generator().manual_seed(num_queries * 100 + num_keys)
    a = torch.randint(0, num_keys + 1, (2, num_queries), generator=gen)
    b = torch.randint(0, num_keys + 1, (2, num_queries), generator=gen)
    start, end = torch.minimum(a, b), torch.maximum(a, b)
    mask = croc.MixedMask.from_intervals(start, end, num_keys)
    dense = mask.to_dense()
    assert dense.shape == (2, num_queries, num_keys)
    keys = torch.arange(num_keys)
    for row in range(2):
        for i in range(num_queries):
            expected = (keys >= start[row, i]) & (keys < end[row, i])
            assert torch.equal(dense[row, i], expected)


def test_padding_rows_are_empty_and_unseen():
    span = torch.full((2, 6), -1)
    attention = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    mask = croc.MixedMask.from_spans(span, attention)
    dense = mask.to_dense()
    assert torch.equal(mask.row_is_empty(), attention == 0)
    assert not dense[0, :, :2].any()
    assert not dense[1, :, 4:].any()
    assert dense[0, 2, 2] and not dense[0, 2, 3]


def test_to_moves_device_and_keeps_intervals():
    mask = croc.MixedMask.causal(2, 5).to("cpu")
    assert mask.device.type == "cpu" and mask.num_keys == 5


# ----------------------------------------------------------------- malformed input
def _spans(rows):
    return torch.tensor(rows)


@pytest.mark.parametrize(
    "span_ids,attention_mask,segment_ids,match",
    [
        ([[0, 0, -1, 0]], None, None, "span_ids.*not contiguous"),
        ([[0, 0, 0, -1]], None, [[0, 0, 1, 1]], "span_ids.*crosses a document"),
        ([[-1, 0, 0, -1]], [[1, 1, 0, 0]], None, "span_ids.*padding"),
        ([[-1, -1, -1, -1]], None, [[0, 1, 0, 1]], "segment_ids"),
        ([[-1, -1, -1, -1]], [[1, 0, 1, 1]], None, "padding sits inside a document"),
    ],
)
def test_malformed_layouts_raise(span_ids, attention_mask, segment_ids, match):
    as_tensor = lambda x: None if x is None else torch.tensor(x)  # noqa: E731
    with pytest.raises(ValueError, match=match):
        croc.MixedMask.from_spans(_spans(span_ids), as_tensor(attention_mask), as_tensor(segment_ids))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"span_ids": torch.zeros(4, dtype=torch.long)}, ValueError, "span_ids must have shape"),
        ({"span_ids": torch.zeros(1, 4)}, ValueError, "span_ids must be an integer"),
        ({"span_ids": [[0, 1]]}, TypeError, "span_ids must be a torch.Tensor"),
        (
            {"span_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 5)},
            ValueError,
            "attention_mask must have shape",
        ),
        (
            {"span_ids": torch.zeros(1, 4, dtype=torch.long), "segment_ids": torch.ones(1, 4)},
            ValueError,
            "segment_ids must be an integer",
        ),
        (
            {
                "span_ids": torch.zeros(1, 4, dtype=torch.long),
                "segment_ids": torch.ones(1, 4, dtype=torch.bool),
            },
            ValueError,
            "segment_ids must be an integer",
        ),
    ],
)
def test_from_spans_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        croc.MixedMask.from_spans(**kwargs)


@pytest.mark.parametrize(
    "image_mask,error,match",
    [
        (torch.zeros(3, dtype=torch.bool), ValueError, "image_mask must have shape"),
        (torch.zeros(1, 3), ValueError, "image_mask must be a bool"),
        ("not a tensor", TypeError, "image_mask must be a torch.Tensor"),
    ],
)
def test_from_image_mask_bad_arguments(image_mask, error, match):
    with pytest.raises(error, match=match):
        croc.MixedMask.from_image_mask(image_mask)


def test_image_on_padding_raises():
    with pytest.raises(ValueError, match="padding"):
        croc.MixedMask.from_image_mask(torch.tensor([[0, 1, 1]]), attention_mask=torch.tensor([[1, 1, 0]]))


@pytest.mark.parametrize(
    "start,end,num_keys,match",
    [
        ([[0, 3]], [[1, 2]], 5, "kv_start/kv_end"),  # start > end
        ([[-1, 0]], [[1, 2]], 5, "kv_start/kv_end"),
        ([[0, 0]], [[1, 6]], 5, "kv_start/kv_end"),
        ([[0, 0]], [[1, 2, 3]], 5, "kv_end must have the shape"),
        ([[0, 0]], [[1, 2]], -1, "num_keys"),
        ([[0, 0]], [[1, 2]], 2.0, "num_keys"),
    ],
)
def test_from_intervals_bad_arguments(start, end, num_keys, match):
    with pytest.raises(ValueError, match=match):
        croc.MixedMask.from_intervals(torch.tensor(start), torch.tensor(end), num_keys)


def test_from_intervals_rejects_float():
    with pytest.raises(ValueError, match="kv_start must be an integer"):
        croc.MixedMask.from_intervals(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.long), 3)


# ----------------------------------------------------------------- monotone flag
def test_builders_are_monotone_without_a_sync():
    layout = random_layout(3, 30, 1, max_docs=3, max_spans=3)
    masks = [
        croc.MixedMask.causal(2, 9),
        croc.MixedMask.from_spans(layout.span_ids, layout.attention_mask, layout.segment_ids),
        croc.MixedMask.from_image_mask(layout.image_mask, layout.attention_mask, layout.segment_ids),
    ]
    for mask in masks:
        assert mask.monotone and mask.to("cpu").monotone
        truth = croc.MixedMask.from_intervals(mask.kv_start, mask.kv_end, mask.num_keys)
        assert truth.monotone  # the validation agrees with the builders' claim


@pytest.mark.parametrize(
    "start,end,expected",
    [
        ([[0, 0, 0, 2]], [[1, 3, 3, 4]], True),
        ([[0, 5, 0, 1]], [[2, 5, 2, 3]], True),  # an empty row (5, 5) between is ignored
        ([[0, 0, 0, 0]], [[0, 0, 0, 0]], True),
        ([[1, 0, 2, 2]], [[2, 2, 3, 4]], False),  # start decreases
        ([[0, 0, 0, 0]], [[3, 2, 3, 4]], False),  # end decreases
        ([[0, 0], [2, 1]], [[1, 2], [3, 3]], False),  # only the second row is not
    ],
)
def test_from_intervals_detects_monotone(start, end, expected):
    start, end = torch.tensor(start), torch.tensor(end)
    assert croc.MixedMask.from_intervals(start, end, 5).monotone is expected
    assert croc.MixedMask.from_intervals(start, end, 5, validate=False).monotone is False
    assert croc.MixedMask.from_intervals(start, end, 5, validate=False, monotone=True).monotone is True
    if expected:
        assert croc.MixedMask.from_intervals(start, end, 5, monotone=True).monotone
    else:
        with pytest.raises(ValueError, match="monotone=True"):
            croc.MixedMask.from_intervals(start, end, 5, monotone=True)
    assert croc.MixedMask.from_intervals(start, end, 5, monotone=False).monotone is False


def test_monotone_is_read_only_and_type_checked():
    mask = croc.MixedMask.causal(1, 4)
    with pytest.raises(AttributeError):
        mask.monotone = False
    with pytest.raises(TypeError, match="monotone"):
        croc.MixedMask.from_intervals(mask.kv_start, mask.kv_end, 4, monotone=1)
