"""The LLaVA JSON dataset: records ``{"id", "image", "conversations"}`` plus an image folder.

Bad records are never dropped silently. Every problem (missing or corrupt image, an image record
whose first human turn lacks ``<image>`` or with several ``<image>``, an ``<image>`` in a record
without image, a sample longer than ``max_length``, malformed turns)
is reported with the record id and, by ``on_error``:

    "raise" (default): raise :class:`DataError` naming the record and the problem;
    "skip": log a warning, leave the record out and count it in ``dataset.skipped``
            (a list of ``(record_id, reason)``), logged again as a summary.

Text problems and missing files are found when the dataset is built; ``verify_images=True``
also decodes every image then (default for small data). An image that fails to decode later,
while training, raises in "raise" mode; in "skip" mode it is logged with its id, counted in
``dataset.skipped`` of that process, and the next good sample is returned instead.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from croc.data.image import load_image, preprocess
from croc.data.templates import IMAGE_PLACEHOLDER, conversation_chunks, tokenize_conversation

__all__ = ["ON_ERROR", "DataError", "LlavaJsonDataset", "Sample"]

logger = logging.getLogger(__name__)
ON_ERROR = ("raise", "skip")


class DataError(ValueError):
    """A record of the dataset cannot be used; the message names its id."""


@dataclass(frozen=True)
class Sample:
    """One tokenized record (image decoded lazily)."""

    record_id: str
    input_ids: list[int]
    labels: list[int]
    image_path: Path | None


class LlavaJsonDataset(Dataset):
    """Map-style dataset over a LLaVA JSON file.

    Items are dicts: ``input_ids`` int64 [L], ``labels`` int64 [L] (-100 off the answers),
    ``pixel_values`` float32 [3, S, S] (absent for text-only records).

    Args:
        json_path: the LLaVA JSON file (a list of records).
        image_folder: folder the records' ``image`` paths are relative to.
        tokenizer: a transformers tokenizer with ``bos_token_id``/``eos_token_id``.
        image_processor: the vision tower's image processor (see ``build_image_processor``).
        template: "plain" or "vicuna".
        image_token_id: the model's image token id; ``num_image_tokens`` of them replace ``<image>``.
        num_image_tokens: visual tokens per image (e.g. 576 for CLIP ViT-L/14-336).
        max_length: longest allowed sample in tokens (image tokens included).
        on_error: "raise" or "skip" (see the module docstring).
        verify_images: decode every image at build time.
        cache_images: keep preprocessed pixel values in memory after first use.
        pad_to_square: LLaVA's pad-to-square before the image processor.
    """

    def __init__(
        self,
        json_path: str | Path,
        image_folder: str | Path,
        tokenizer,
        image_processor,
        template: str,
        image_token_id: int,
        num_image_tokens: int,
        max_length: int = 2048,
        on_error: str = "raise",
        verify_images: bool = False,
        cache_images: bool = False,
        pad_to_square: bool = True,
    ) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.image_folder = Path(image_folder)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = template
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.on_error = on_error
        self.pad_to_square = pad_to_square
        self.skipped: list[tuple[str, str]] = []
        self._cache: dict[int, torch.Tensor] | None = {} if cache_images else None
        records = json.loads(Path(json_path).read_text())
        if not isinstance(records, list):
            raise DataError(f"{json_path}: expected a JSON list of records, got {type(records).__name__}")
        self.samples = [
            s for s in (self._build_sample(i, r, verify_images) for i, r in enumerate(records)) if s
        ]
        if self.skipped:
            logger.warning("%s: skipped %d of %d records", json_path, len(self.skipped), len(records))

    def _problem(self, record_id: str, reason: str) -> None:
        if self.on_error == "raise":
            raise DataError(f"record {record_id}: {reason} (pass on_error='skip' to skip such records)")
        logger.warning("skipping record %s: %s", record_id, reason)
        self.skipped.append((record_id, reason))

    def _build_sample(self, index: int, record: dict, verify_images: bool) -> Sample | None:
        record_id = str(record.get("id", f"#{index}")) if isinstance(record, dict) else f"#{index}"
        try:
            return self._parse(record_id, record, verify_images)
        except DataError:
            raise
        except (ValueError, TypeError, KeyError, OSError) as err:
            self._problem(record_id, str(err))
            return None

    def _parse(self, record_id: str, record: dict, verify_images: bool) -> Sample | None:
        conversations = record.get("conversations")
        if not isinstance(conversations, list):
            raise ValueError("no 'conversations' list")
        image_path = None
        placeholders = sum(str(turn.get("value", "")).count(IMAGE_PLACEHOLDER) for turn in conversations)
        if not record.get("image") and placeholders:
            raise ValueError("a record without an image has an <image> placeholder")
        if record.get("image"):
            if IMAGE_PLACEHOLDER not in conversations[0].get("value", ""):
                raise ValueError("an image record whose first human turn has no <image> placeholder")
            if placeholders > 1:
                raise ValueError(
                    f"an image record with {placeholders} <image> placeholders (one image, one placeholder)"
                )
            image_path = self.image_folder / record["image"]
            if not image_path.is_file():
                raise ValueError(f"image file {image_path} is missing")
            if verify_images:
                load_image(image_path)
        chunks = conversation_chunks(conversations, self.template, record_id)
        input_ids, labels = tokenize_conversation(
            self.tokenizer, chunks, self.image_token_id, self.num_image_tokens if image_path else 0
        )
        if len(input_ids) > self.max_length:
            raise ValueError(f"{len(input_ids)} tokens, longer than max_length={self.max_length}")
        return Sample(record_id, input_ids, labels, image_path)

    def __len__(self) -> int:
        return len(self.samples)

    def pixel_values(self, index: int) -> torch.Tensor:
        """float32 [3, S, S] of sample ``index`` (which must have an image)."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        pixels = preprocess(
            load_image(self.samples[index].image_path), self.image_processor, self.pad_to_square
        )
        if self._cache is not None:
            self._cache[index] = pixels
        return pixels

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self)):
            position = (index + offset) % len(self)
            item = self._load(self.samples[position], position)
            if item is not None:
                return item
        raise DataError("no record of the dataset could be loaded")

    def _load(self, sample: Sample, index: int) -> dict | None:
        item = {
            "input_ids": torch.tensor(sample.input_ids, dtype=torch.long),
            "labels": torch.tensor(sample.labels, dtype=torch.long),
        }
        if sample.image_path is None:
            return item
        try:
            item["pixel_values"] = self.pixel_values(index)
        except (OSError, ValueError) as err:
            self._problem(sample.record_id, f"image {sample.image_path} cannot be decoded: {err}")
            return None
        return item
