"""Held-out evaluation of a trained model on chat records: caption token accuracy (with the real
images and, as the blind baseline, with noise), QA exact-match accuracy, and generated samples."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from croc.constants import IMAGE_TOKEN
from croc.data import IGNORE_INDEX, LlavaCollator, LlavaJsonDataset
from croc.data.templates import conversation_chunks, tokenize_conversation

__all__ = ["Generated", "answer_all", "caption_token_accuracy", "exact_match", "generate_answer"]


@torch.no_grad()
def caption_token_accuracy(
    model, dataset: LlavaJsonDataset, collator: LlavaCollator, blind: bool = False, batch_size: int = 32
) -> float:
    """Teacher-forced next-token accuracy over the supervised tokens of ``dataset``.

    With ``blind=True`` every image is replaced by standard normal noise in the model's input
    space, which measures what the model gets right without looking.
    """
    model.eval()
    noise = torch.Generator().manual_seed(0)
    correct = total = 0
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        labels = batch.pop("labels")[:, 1:]
        if blind:
            batch["pixel_values"] = torch.randn(batch["pixel_values"].shape, generator=noise)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        predicted = model(**batch).logits[:, :-1].argmax(-1).cpu()
        supervised = labels != IGNORE_INDEX
        correct += int((predicted[supervised] == labels[supervised]).sum())
        total += int(supervised.sum())
    return correct / max(total, 1)


@dataclass(frozen=True)
class Generated:
    record_id: str
    question: str
    truth: str
    answer: str


@torch.no_grad()
def generate_answer(
    model, tokenizer, pixel_values: torch.Tensor, question: str, num_image_tokens: int, max_new_tokens: int
) -> str:
    """Greedy answer to ``question`` about one image (pixel_values float32 [3, S, S]), vicuna template."""
    conversation = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": ""}]
    chunks = conversation_chunks(conversation, "vicuna")[:-1]  # the prompt, up to "ASSISTANT:"
    input_ids, _ = tokenize_conversation(tokenizer, chunks, model.config.image_token_id, num_image_tokens)
    ids = torch.tensor([input_ids], device=model.device)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=pixel_values[None].to(model.device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def answer_all(
    model,
    tokenizer,
    dataset: LlavaJsonDataset,
    records: list[dict],
    num_image_tokens: int,
    max_new_tokens: int,
    skip_questions: tuple[str, ...] = (),
) -> list[Generated]:
    """Greedy answers to every question of ``records``, each asked on its own about its image.

    ``records[i]`` must be the record of ``dataset`` sample ``i`` (a dataset built from the same
    JSON with nothing skipped); questions in ``skip_questions`` are not asked.
    """
    model.eval()
    generated = []
    for index, record in enumerate(records):
        pixels = dataset.pixel_values(index)
        turns = record["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2]):
            question = human["value"].replace(IMAGE_TOKEN, "").strip()
            if question in skip_questions:
                continue
            answer = generate_answer(model, tokenizer, pixels, question, num_image_tokens, max_new_tokens)
            generated.append(Generated(record["id"], question, gpt["value"], answer))
    return generated


def exact_match(generated: list[Generated]) -> float:
    """Fraction of answers equal to the truth."""
    return sum(g.answer == g.truth for g in generated) / max(len(generated), 1)
