"""Conversation templates and label masking.

A record's conversation becomes a list of :class:`Chunk` s (text plus whether it is supervised);
:func:`tokenize_conversation` tokenizes every chunk on its own, expands the ``<image>``
placeholder into the model's image-token run and masks every unsupervised token with -100, so
only the answers are learned. Chunk-wise tokenization works with any tokenizer (a real LLM's or
the synthetic word-level one) and can never shift the answer boundary.

Templates:
    "plain"  (LLaVA stage-1 pretraining): ``<image>`` then the caption and EOS; the human text
             other than the image is dropped, as in LLaVA.
    "vicuna" (LLaVA v1 chat): ``SYSTEM USER: <question> ASSISTANT: <answer></s>USER: ...``.
"""

from __future__ import annotations

from dataclasses import dataclass

from croc.constants import IGNORE_INDEX
from croc.constants import IMAGE_TOKEN as IMAGE_PLACEHOLDER

__all__ = [
    "IGNORE_INDEX",
    "TEMPLATES",
    "VICUNA_SYSTEM",
    "Chunk",
    "conversation_chunks",
    "template_texts",
    "tokenize_conversation",
]

TEMPLATES = ("plain", "vicuna")
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class Chunk:
    text: str
    supervised: bool
    eos: bool = False  # append the tokenizer's EOS after the text (supervised like the text)


def template_texts() -> list[str]:
    """The fixed words every template uses (for building a closed-vocabulary tokenizer)."""
    return ["USER:", "ASSISTANT:", "\n"]


def _check_roles(conversations: list[dict], record_id: str) -> None:
    if not conversations or len(conversations) % 2:
        raise ValueError(f"record {record_id}: conversations must be non-empty human/gpt pairs")
    for i, turn in enumerate(conversations):
        expected = "human" if i % 2 == 0 else "gpt"
        if turn.get("from") != expected or not isinstance(turn.get("value"), str):
            raise ValueError(f"record {record_id}: turn {i} must be a {expected!r} turn with a string value")


def conversation_chunks(conversations: list[dict], template: str, record_id: str = "?") -> list[Chunk]:
    """Lay out a LLaVA conversation as chunks; ``<image>`` stays a literal placeholder.

    Args:
        conversations: ``[{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]``.
        template: "plain" or "vicuna".
    """
    _check_roles(conversations, record_id)
    if template == "plain":
        has_image = IMAGE_PLACEHOLDER in conversations[0]["value"]
        prefix = [Chunk(IMAGE_PLACEHOLDER, False)] if has_image else []
        return [*prefix, Chunk(conversations[1]["value"].strip(), True, eos=True)]
    if template == "vicuna":
        chunks = [Chunk(VICUNA_SYSTEM + " ", False)]
        for question, answer in zip(conversations[::2], conversations[1::2]):
            chunks.append(Chunk(f"USER: {question['value']} ASSISTANT:", False))
            chunks.append(Chunk(" " + answer["value"].strip(), True, eos=True))
        return chunks
    raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")


def _encode(tokenizer, text: str, image_token_id: int, num_image_tokens: int) -> list[int]:
    """Token ids of ``text`` with every ``<image>`` replaced by ``num_image_tokens`` image ids."""
    ids: list[int] = []
    for i, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            ids += [image_token_id] * num_image_tokens
        if piece.strip():
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


def tokenize_conversation(
    tokenizer, chunks: list[Chunk], image_token_id: int, num_image_tokens: int
) -> tuple[list[int], list[int]]:
    """Return ``(input_ids, labels)`` (equal-length int lists); labels are -100 off the answers.

    A BOS token (if the tokenizer has one) starts the sequence, unsupervised.
    """
    input_ids: list[int] = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    labels: list[int] = [IGNORE_INDEX] * len(input_ids)
    for chunk in chunks:
        ids = _encode(tokenizer, chunk.text, image_token_id, num_image_tokens)
        if chunk.eos:
            ids.append(tokenizer.eos_token_id)
        input_ids += ids
        labels += ids if chunk.supervised else [IGNORE_INDEX] * len(ids)
    return input_ids, labels
