"""Data for croc training: the LLaVA JSON format, templates, packing and the synthetic default.

Needs the ``train`` extra (transformers, tokenizers, pillow).
"""

from croc.data.image import build_image_processor, expand_to_square, load_image, preprocess
from croc.data.llava_json import ON_ERROR, DataError, LlavaJsonDataset
from croc.data.packing import LlavaCollator, pack_lengths
from croc.data.synthetic import write_synthetic_dataset
from croc.data.templates import IGNORE_INDEX, TEMPLATES, conversation_chunks, tokenize_conversation
from croc.data.tokenizer import IMAGE_TOKEN, build_synthetic_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "ON_ERROR",
    "TEMPLATES",
    "DataError",
    "LlavaCollator",
    "LlavaJsonDataset",
    "build_image_processor",
    "build_synthetic_tokenizer",
    "conversation_chunks",
    "expand_to_square",
    "load_image",
    "pack_lengths",
    "preprocess",
    "tokenize_conversation",
    "write_synthetic_dataset",
]
