"""A word-level tokenizer for the synthetic default's closed vocabulary, built offline.

Built with the ``tokenizers`` library from the generator's own texts and the chat template, then
wrapped as a transformers ``PreTrainedTokenizerFast`` carrying the special tokens LLaVA needs.
Nothing is downloaded; the same inputs always give the same vocabulary (ids sorted by first use).
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from croc.constants import IMAGE_TOKEN
from croc.data.synthetic import corpus_texts
from croc.data.templates import VICUNA_SYSTEM, template_texts

__all__ = ["IMAGE_TOKEN", "SPECIAL_TOKENS", "build_synthetic_tokenizer"]

SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def _word_vocabulary(texts: list[str]) -> dict[str, int]:
    """Special tokens first, then every pre-tokenized word in order of first appearance."""
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS.values(), IMAGE_TOKEN])}
    splitter = pre_tokenizers.Whitespace()
    for text in texts:
        for word, _ in splitter.pre_tokenize_str(text):
            vocab.setdefault(word, len(vocab))
    return vocab


def build_synthetic_tokenizer() -> PreTrainedTokenizerFast:
    """Return the tokenizer of the synthetic default (about 80 words; ``<image>`` is a special token)."""
    vocab = _word_vocabulary([VICUNA_SYSTEM, *template_texts(), *corpus_texts()])
    core = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer
