"""Random mask layouts and the brute-force dense rule of DESIGN.md section 2, shared by the tests."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


@dataclass
class Layout:
    """One batch of token layouts: span ids, padding and packed documents, all int64 [B, L]."""

    span_ids: torch.Tensor
    attention_mask: torch.Tensor
    segment_ids: torch.Tensor

    @property
    def image_mask(self) -> torch.Tensor:
        return self.span_ids >= 0


def dense_rule(span_ids, attention_mask=None, segment_ids=None) -> torch.Tensor:
    """bool [B, L, L] straight from the rule, with explicit loops-free broadcasting."""
    span = span_ids.long()
    valid = torch.ones_like(span, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    seg = torch.zeros_like(span) if segment_ids is None else segment_ids.long()
    length = span.shape[1]
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    same_span = (span[:, :, None] >= 0) & (span[:, :, None] == span[:, None, :])
    return (
        valid[:, :, None]
        & valid[:, None, :]
        & (seg[:, :, None] == seg[:, None, :])
        & ((j <= i)[None] | same_span)
    )


def random_row(
    length: int, gen: torch.Generator, max_docs: int = 3, max_spans: int = 3, pad_side: str = "random"
) -> tuple[list[int], list[int], list[int]]:
    """One row: documents packed left to right, padding on one side, spans inside documents."""

    def randint(lo: int, hi: int) -> int:  # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    num_pad = randint(0, length // 3) if length > 1 else 0
    if pad_side == "random":
        pad_side = "left" if randint(0, 1) else "right"
    used = length - num_pad
    span, seg = [-1] * length, [0] * length
    valid = [0] * length
    offset = num_pad if pad_side == "left" else 0
    for pos in range(offset, offset + used):
        valid[pos] = 1
    # split the valid range into documents
    num_docs = randint(1, max(1, min(max_docs, used)))
    cuts = sorted({randint(1, used - 1) for _ in range(num_docs - 1)}) if used > 1 else []
    bounds = [0, *cuts, used]
    next_span = 0
    for d, (a, b) in enumerate(itertools.pairwise(bounds)):
        for pos in range(a, b):
            seg[offset + pos] = d
        for _ in range(randint(0, max_spans)):
            if b - a < 1:
                break
            s = randint(a, b - 1)
            e = randint(s + 1, min(b, s + 1 + randint(0, b - a)))
            if all(span[offset + p] < 0 for p in range(s, e)):
                for p in range(s, e):
                    span[offset + p] = next_span
                next_span += 1
    if pad_side == "left":
        for pos in range(num_pad):
            seg[pos] = 0
    return span, valid, seg


def random_layout(batch: int, length: int, seed: int, **kwargs) -> Layout:
    """A batch of random rows (see :func:`random_row`)."""
    gen = torch.Generator().manual_seed(seed)
    rows = [random_row(length, gen, **kwargs) for _ in range(batch)]
    as_tensor = lambda k: torch.tensor([r[k] for r in rows], dtype=torch.long).reshape(batch, length)  # noqa: E731
    return Layout(as_tensor(0), as_tensor(1), as_tensor(2))


def croc_layout(batch: int, length: int, image_tokens: int, text_tokens: int, pad: int = 0) -> Layout:
    """Samples of [text, image span, text] packed into rows of ``length``, ``pad`` tokens of right padding."""
    span = torch.full((batch, length), -1, dtype=torch.long)
    seg = torch.zeros((batch, length), dtype=torch.long)
    valid = torch.ones((batch, length), dtype=torch.long)
    used = length - pad
    valid[:, used:] = 0
    sample_len = image_tokens + 2 * text_tokens
    for b in range(batch):
        pos, doc, sid = 0, 0, 0
        while pos < used:
            end = min(used, pos + sample_len)
            seg[b, pos:end] = doc
            img_a = min(end, pos + text_tokens)
            img_b = min(end, img_a + image_tokens)
            if img_b > img_a:
                span[b, img_a:img_b] = sid
                sid += 1
            pos, doc = end, doc + 1
    return Layout(span, valid, seg)
