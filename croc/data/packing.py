"""Batch collation: padding, or sequence packing with ``segment_ids``.

Packing puts several samples into one row. Each sample keeps its own document id in
``segment_ids`` and its own positions (``position_ids`` restart at 0), and the model's
``MixedMask`` (built from ``segment_ids``) keeps samples from attending to each other, so a packed
batch computes exactly what the same samples would unpacked, with less padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from croc.data.templates import IGNORE_INDEX

__all__ = ["LlavaCollator", "pack_lengths"]


def pack_lengths(lengths: list[int], max_length: int) -> list[list[int]]:
    """First-fit packing in sample order: rows of sample indices whose lengths sum to <= max_length.

    Raises:
        ValueError: a single sample is longer than ``max_length``.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for index, length in enumerate(lengths):
        if length > max_length:
            raise ValueError(
                f"sample {index} has {length} tokens, more than the packing max_length={max_length}"
            )
        row = next((r for r, free in enumerate(room) if free >= length), None)
        if row is None:
            rows.append([])
            room.append(max_length)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= length
    return rows


@dataclass
class LlavaCollator:
    """Collate dataset items (``input_ids``, ``labels``, optional ``pixel_values``) into a batch.

    Output (R rows of length L; R = batch size unpacked, fewer when packing):
        input_ids int64 [R, L] (``pad_token_id`` after the data), labels int64 [R, L] (-100 on
        padding), attention_mask int64 [R, L] (1 on data, 0 on padding), pixel_values float32
        [N, 3, S, S] for the N images in the order their tokens appear (row by row), and when
        packing: segment_ids int64 [R, L] (sample index within the row, padding gets the next
        index) and position_ids int64 [R, L] (restarting at 0 for each sample, 0 on padding).

    Args:
        pad_token_id: id written on padding positions.
        packing: pack samples into rows of at most ``max_length`` tokens.
        max_length: row length limit when packing.
        pad_to_multiple_of: round L up to a multiple of this (1 = no rounding).
    """

    pad_token_id: int
    packing: bool = False
    max_length: int = 2048
    pad_to_multiple_of: int = 1

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("items must be a non-empty list of dataset items")
        lengths = [len(item["input_ids"]) for item in items]
        rows = pack_lengths(lengths, self.max_length) if self.packing else [[i] for i in range(len(items))]
        row_len = max(sum(lengths[i] for i in row) for row in rows)
        row_len = -(-row_len // self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(rows), row_len)
        batch = {
            "input_ids": torch.full(shape, self.pad_token_id, dtype=torch.long),
            "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.zeros(shape, dtype=torch.long),
        }
        segment_ids = torch.zeros(shape, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        images = []
        for r, row in enumerate(rows):
            start = 0
            for segment, index in enumerate(row):
                item, end = items[index], start + lengths[index]
                batch["input_ids"][r, start:end] = item["input_ids"]
                batch["labels"][r, start:end] = item["labels"]
                batch["labels"][r, start] = IGNORE_INDEX  # never predict across a sample boundary
                batch["attention_mask"][r, start:end] = 1
                segment_ids[r, start:end] = segment
                position_ids[r, start:end] = torch.arange(lengths[index])
                if "pixel_values" in item:
                    images.append(item["pixel_values"])
                start = end
            segment_ids[r, start:] = len(row)
        if images:
            batch["pixel_values"] = torch.stack(images)
        if self.packing:
            batch["segment_ids"] = segment_ids
            batch["position_ids"] = position_ids
        return batch
