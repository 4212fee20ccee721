"""Ragged visual tokens: images with different numbers of visual tokens, several images per sample.

The visual tokens of the I images of a batch are kept padded, ``[I, W, H]`` with ``W`` the most
tokens any image has; :class:`ImageLayout` says which slots are real. The per-image counts come
from the vision tower (the shapes of the images, host integers) and are checked against the runs
of image tokens in ``input_ids`` (one run per image, in order) when ``validate_masks`` is on.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "ImageLayout",
    "image_layout",
    "image_runs",
    "random_selection",
    "sample_groups",
]


class ImageLayout(NamedTuple):
    """Where the real visual tokens of I images sit in their padded ``[I, W]`` slots.

    Attributes:
        counts: visual tokens of every image (host ints), len I.
        width: W = max(counts) (0 without images).
        valid: bool [I, W], True at the real tokens.
        flat_valid: int64 [sum(counts)], their indices in the flattened ``[I * W]`` slots, in order.
        uniform: all images have W tokens (then the flat slots are the tokens themselves).
    """

    counts: list[int]
    width: int
    valid: torch.Tensor
    flat_valid: torch.Tensor
    uniform: bool


def image_layout(counts: list[int], device: torch.device) -> ImageLayout:
    """The layout of images with ``counts`` visual tokens each (built on the host, no device sync)."""
    width = max(counts, default=0)
    slots = [i * width + t for i, count in enumerate(counts) for t in range(count)]
    flat_valid = torch.tensor(slots, dtype=torch.int64).to(device)
    valid = torch.zeros(len(counts) * width, dtype=torch.bool, device=device)
    valid[flat_valid] = True
    return ImageLayout(
        list(counts), width, valid.view(len(counts), width), flat_valid, min(counts, default=0) == width
    )


def image_runs(image_mask: torch.Tensor) -> torch.Tensor:
    """int64 [runs]: the length of every maximal run of image tokens of ``image_mask`` [B, L], in
    row-major order (a run never crosses rows). One device-to-host sync (the number of runs)."""
    starts = image_mask.clone()
    starts[:, 1:] &= ~image_mask[:, :-1]
    flat_mask, flat_starts = image_mask.reshape(-1), starts.reshape(-1)
    run_of_token = flat_starts.to(torch.int64).cumsum(0) - 1
    lengths = torch.zeros(int(flat_starts.sum()), dtype=torch.int64, device=image_mask.device)
    return lengths.index_add_(0, run_of_token[flat_mask], torch.ones_like(run_of_token[flat_mask]))


def image_runs_match(image_mask: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """bool 0-d tensor: the runs of image tokens of ``image_mask`` [B, L] (row-major, never
    crossing rows) are exactly ``len(counts)`` runs of lengths ``counts``. Static shapes, no host
    sync (the check :func:`image_runs` makes eagerly, for torch.compile)."""
    starts = image_mask.clone()
    starts[:, 1:] &= ~image_mask[:, :-1]
    flat_mask, flat_starts = image_mask.reshape(-1), starts.reshape(-1)
    n = len(counts)
    run_of_token = (flat_starts.to(torch.int64).cumsum(0) - 1).clamp(0, n)  # runs past the n-th: slot n
    index = torch.where(flat_mask, run_of_token, n)
    lengths = torch.zeros(n + 1, dtype=torch.int64, device=image_mask.device)
    lengths = lengths.scatter_add(0, index, flat_mask.to(torch.int64))
    expected = torch.tensor([*counts, 0], dtype=torch.int64, device=image_mask.device)
    return (flat_starts.sum() == n) & (lengths == expected).all()


def random_selection(layout: ImageLayout, ratio: float, device: torch.device) -> torch.Tensor:
    """bool [I, W]: ``round(ratio * counts[i])`` of image i's real tokens picked uniformly at random."""
    picks = torch.tensor([round(float(ratio) * count) for count in layout.counts], dtype=torch.int64)
    noise = torch.rand(len(layout.counts), layout.width, device=device).masked_fill(~layout.valid, 2.0)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return ranks < picks.to(device).unsqueeze(1)


def sample_groups(
    image_index: torch.Tensor, layout: ImageLayout, seq_len: int, segment_ids: torch.Tensor | None
) -> list[tuple[str, list[int]]]:
    """The images of every sample: [(name, image ids)], in order of first appearance.

    A sample is a batch row, or a packed document of a row when ``segment_ids`` [B, L] is given;
    its name (``"row r"`` or ``"row r, segment s"``) is for error messages. image_index: int64
    [sum(counts)] flat positions of the image tokens in ``[B * L]``. One device-to-host sync.
    """
    offsets = torch.tensor([0, *layout.counts[:-1]], dtype=torch.int64).cumsum(0)
    present = [i for i, count in enumerate(layout.counts) if count]
    firsts = image_index[offsets[present].to(image_index.device)]
    rows = (firsts // seq_len).tolist()
    segments = [None] * len(rows) if segment_ids is None else segment_ids.reshape(-1)[firsts].tolist()
    groups: dict[tuple[int, int | None], list[int]] = {}
    for image, row, segment in zip(present, rows, segments, strict=True):
        groups.setdefault((row, segment), []).append(image)
    return [
        (f"row {row}" if segment is None else f"row {row}, segment {segment}", images)
        for (row, segment), images in groups.items()
    ]
