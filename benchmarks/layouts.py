"""Benchmark mask layouts: Croc stage-1.5 samples packed into rows.

Each sample is ``[prompt text | 576 image tokens | caption]`` with seeded random text lengths;
samples are packed left to right until the row is full (the last one is cut). Kinds:

- ``"croc"``: the image span is bidirectional, text is causal (the paper's mixed attention);
- ``"prefix"``: everything before the caption is one bidirectional span (the released code's
  prefix-LM mask);
- ``"causal"``: plain causal attention over the whole row (no documents).
"""

from __future__ import annotations

import torch

import croc

IMAGE_TOKENS = 576
MASK_KINDS = ("croc", "prefix", "causal")


def packed_span_ids(
    batch: int, length: int, kind: str, seed: int = 0, image_tokens: int = IMAGE_TOKENS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(span_ids, segment_ids), int64 [batch, length], for the ``croc`` or ``prefix`` layouts."""
    if kind not in ("croc", "prefix"):
        raise ValueError(f"kind must be 'croc' or 'prefix', got {kind!r}")
    gen = torch.Generator().manual_seed(seed)
    span = torch.full((batch, length), -1, dtype=torch.long)
    seg = torch.zeros((batch, length), dtype=torch.long)
    for b in range(batch):
        pos, doc = 0, 0
        while pos < length:
            prompt = int(torch.randint(16, 64, (1,), generator=gen))
            caption = int(torch.randint(64, 640, (1,), generator=gen))
            end = min(length, pos + prompt + image_tokens + caption)
            seg[b, pos:end] = doc
            span_lo = pos if kind == "prefix" else min(end, pos + prompt)
            span_hi = min(end, pos + prompt + image_tokens)
            span[b, span_lo:span_hi] = doc
            pos, doc = end, doc + 1
    return span, seg


def build_mask(batch: int, length: int, kind: str, device: str, seed: int = 0) -> croc.MixedMask:
    """The MixedMask of a benchmark layout, on ``device``."""
    if kind == "causal":
        return croc.MixedMask.causal(batch, length, device=device)
    span, seg = packed_span_ids(batch, length, kind, seed)
    return croc.MixedMask.from_spans(span.to(device), segment_ids=seg.to(device))


def visible_pairs(mask: croc.MixedMask) -> int:
    """Number of visible (query, key) pairs summed over the batch (one host sync)."""
    return int((mask.kv_end - mask.kv_start).clamp_min(0).sum())
