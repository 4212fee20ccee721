"""Image loading and LLaVA preprocessing: pad to square with the processor's mean colour, then
the vision tower's image processor (resize, centre crop, normalise)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from PIL import Image

__all__ = ["CLIP_MEAN", "CLIP_STD", "build_image_processor", "expand_to_square", "load_image", "preprocess"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_image_processor(image_size: int):
    """A CLIP image processor for a vision tower with ``image_size`` x ``image_size`` inputs, built offline.

    Uses the PIL backend (no torchvision needed) where the installed transformers has it.
    """
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA's pad-to-square: centre the image on a square canvas of ``background`` colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image as RGB (raises OSError/ValueError on missing or corrupt files)."""
    with Image.open(path) as image:
        return image.convert("RGB")


def preprocess(image: Image.Image, image_processor, pad_to_square: bool = True) -> torch.Tensor:
    """float32 [3, S, S] pixel values for the vision tower."""
    if pad_to_square:
        mean = tuple(round(255 * m) for m in image_processor.image_mean)
        image = expand_to_square(image, mean)
    return image_processor(image, return_tensors="pt")["pixel_values"][0]
