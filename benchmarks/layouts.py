"""Benchmark mask layouts: Croc stage-1.5 samples packed into rows.

Each sample is ``[prompt text | 576 image tokens | caption]`` with seeded random text lengths;
samples are packed left to right until the row is full (the last one is cut). Kinds:

- ``"croc"``: the image span is bidirectional, text is causal (the paper's mixed attention);
- ``"prefix"``: everything before the caption is one bidirectional span (the released code's
  prefix-LM mask);
- ``"causal"``: plain causal attention over the whole row (no documents);
- ``"gemma3"``: a Gemma-3 sliding-attention layer over one conversation per row,
  ``[text | 256 image tokens | text | 256 image tokens | ...]``: causal text, each image
  bidirectional, all inside a sliding window of ``min(1024, L // 2)`` keys (1024 is Gemma 3's; the
  cap keeps the window shorter than the row in the quick runs). The mask is what transformers
  builds for that layer (``and(or(causal, blockwise_overlay), sliding_window_overlay)``), read into
  key intervals by croc's ``"croc_mixed"`` mask builder; :func:`transformers_dense_mask` gives
  transformers' own dense mask for it.
"""

from __future__ import annotations

import torch

import croc

IMAGE_TOKENS = 576
MASK_KINDS = ("croc", "prefix", "causal", "gemma3")
GEMMA3_IMAGE_TOKENS = 256
GEMMA3_WINDOW = 1024


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


def gemma3_block_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Gemma 3's ``block_sequence_ids``, int64 [batch, length]: text -1, image ``n`` of a row ``n``
    (text runs of 16-640 tokens between images of 256, the last one cut at the row's end)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, length), -1, dtype=torch.long)
    for b in range(batch):
        pos, image = int(torch.randint(16, 64, (1,), generator=gen)), 0
        while pos < length:
            ids[b, pos : pos + GEMMA3_IMAGE_TOKENS] = image
            pos += GEMMA3_IMAGE_TOKENS + int(torch.randint(16, 640, (1,), generator=gen))
            image += 1
    return ids


def gemma3_mask_kwargs(batch: int, length: int, device: str, seed: int = 0) -> dict:
    """The ``sdpa_mask`` keyword arguments transformers passes for a Gemma-3 sliding layer."""
    from transformers.masking_utils import (
        and_masks,
        blockwise_overlay,
        causal_mask_function,
        or_masks,
        sliding_window_overlay,
    )

    block_ids = gemma3_block_ids(batch, length, seed).to(device)
    window = min(GEMMA3_WINDOW, length // 2)
    fn = and_masks(
        or_masks(causal_mask_function, blockwise_overlay(block_ids)), sliding_window_overlay(window)
    )
    return dict(
        batch_size=batch, q_length=length, kv_length=length, mask_function=fn, device=device,
        allow_is_causal_skip=False,
    )  # fmt: skip


def transformers_dense_mask(batch: int, length: int, device: str, seed: int = 0) -> torch.Tensor:
    """bool [B, 1, L, L]: transformers' own ``sdpa_mask`` for the ``"gemma3"`` layout."""
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(**gemma3_mask_kwargs(batch, length, device, seed))


def build_mask(batch: int, length: int, kind: str, device: str, seed: int = 0) -> croc.MixedMask:
    """The MixedMask of a benchmark layout, on ``device``."""
    if kind == "causal":
        return croc.MixedMask.causal(batch, length, device=device)
    if kind == "gemma3":
        from croc.integrations.transformers import croc_mixed_mask

        mask = croc_mixed_mask(**gemma3_mask_kwargs(batch, length, device, seed)).resolve()
        if not isinstance(mask, croc.MixedMask):
            raise RuntimeError("croc_mixed fell back to the dense mask for the gemma3 layout")
        return mask
    span, seg = packed_span_ids(batch, length, kind, seed)
    return croc.MixedMask.from_spans(span.to(device), segment_ids=seg.to(device))


def visible_pairs(mask: croc.MixedMask) -> int:
    """Number of visible (query, key) pairs summed over the batch (one host sync)."""
    return int((mask.kv_end - mask.kv_start).clamp_min(0).sum())
