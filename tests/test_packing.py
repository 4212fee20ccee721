"""Sequence packing: first-fit rows, the collator's layout, and the model computing exactly the same
per-token losses for a packed batch as for the same samples unpacked."""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch.nn.functional as F

from croc.data import IGNORE_INDEX, LlavaCollator, pack_lengths

PAD = 0
IMAGE = 3


@pytest.mark.parametrize(
    ("lengths", "max_length", "rows"),
    [
        ([5, 5, 5], 10, [[0, 1], [2]]),
        ([7, 5, 3, 2], 10, [[0, 2], [1, 3]]),
        ([10, 1], 10, [[0], [1]]),
        ([1], 1, [[0]]),
    ],
)
def test_pack_lengths_first_fit(lengths, max_length, rows):
    assert pack_lengths(lengths, max_length) == rows


def test_pack_lengths_rejects_a_sample_longer_than_a_row():
    with pytest.raises(ValueError, match="sample 1 has 12 tokens"):
        pack_lengths([3, 12], 10)


def _item(length, num_images, image_tokens, marker, supervised_from):
    """A sample: BOS 1, ``num_images`` runs of image tokens, then text; pixels filled with ``marker``."""
    ids = [1] + [IMAGE] * (image_tokens * num_images)
    ids += [10 + (marker * 7 + i) % 200 for i in range(length - len(ids))]
    labels = [IGNORE_INDEX if i < supervised_from else t for i, t in enumerate(ids)]
    item = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
    if num_images:
        item["pixel_values"] = torch.full((num_images, 3, 16, 16), float(marker))[0]
    return item


def test_collator_packed_layout():
    lengths = [9, 12, 7, 10, 6]
    items = [_item(n, 1, 4, marker, 6) for marker, n in enumerate(lengths)]
    batch = LlavaCollator(PAD, packing=True, max_length=20)(items)
    rows = pack_lengths(lengths, 20)
    assert batch["input_ids"].shape == (len(rows), max(sum(lengths[i] for i in row) for row in rows))
    for r, row in enumerate(rows):
        start = 0
        for segment, index in enumerate(row):
            n = len(items[index]["input_ids"])
            assert batch["input_ids"][r, start : start + n].tolist() == items[index]["input_ids"].tolist()
            assert batch["segment_ids"][r, start : start + n].eq(segment).all()
            assert batch["position_ids"][r, start : start + n].tolist() == list(range(n))
            assert batch["labels"][r, start] == IGNORE_INDEX
            start += n
        assert (
            batch["attention_mask"][r, :start].eq(1).all() and batch["attention_mask"][r, start:].eq(0).all()
        )
        assert batch["labels"][r, start:].eq(IGNORE_INDEX).all()
    # images follow the order of their tokens, row by row
    order = [index for row in rows for index in row]
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [float(i) for i in order]


def test_collator_unpacked_pads_right_without_packing_fields():
    items = [_item(n, 1, 4, marker, 6) for marker, n in enumerate([9, 12])]
    batch = LlavaCollator(PAD, pad_to_multiple_of=8)(items)
    assert batch["input_ids"].shape == (2, 16)
    assert "segment_ids" not in batch and "position_ids" not in batch
    assert batch["input_ids"][0, 9:].eq(PAD).all() and batch["attention_mask"][0, 9:].eq(0).all()


def _per_sample_token_losses(logits, batch, rows, lengths):
    """For every sample: its logits [n, V] and per-token CE [n - 1] (0 where unsupervised), in sample order."""
    out = {}
    for r, row in enumerate(rows):
        start = 0
        for index in row:
            n = lengths[index]
            sample_logits = logits[r, start : start + n]
            targets = batch["labels"][r, start + 1 : start + n]
            ce = F.cross_entropy(sample_logits[:-1].float(), targets.clamp_min(0), reduction="none")
            out[index] = (sample_logits, torch.where(targets == IGNORE_INDEX, 0.0, ce))
            start += n
    return out


@pytest.mark.parametrize(
    ("stage", "mask_kind", "text_model"),
    [("croc", "image", "llama"), ("croc", "prefix", "qwen2"), ("finetune", "image", "llama")],
)
def test_packed_losses_equal_unpacked(stage, mask_kind, text_model):
    from croc.model import CrocLlavaForConditionalGeneration, tiny_config

    torch.manual_seed(0)
    config = tiny_config(text_model=text_model, stage=stage, mask_kind=mask_kind)
    model = CrocLlavaForConditionalGeneration(config).eval()
    per_image = config.image_seq_length
    lengths = [per_image + 9, per_image + 20, per_image + 5, per_image + 14, per_image + 6]
    items = []
    for marker, n in enumerate(lengths):
        item = _item(n, 1, per_image, marker, per_image + 2)
        item["input_ids"][per_image + 1 :] = torch.randint(10, 256, (n - per_image - 1,))
        item["labels"] = torch.where(item["labels"] == IGNORE_INDEX, IGNORE_INDEX, item["input_ids"])
        item["pixel_values"] = torch.randn(3, 16, 16)
        items.append(item)
    # the same replaced positions for every image, so packing's image order cannot change them
    replace = torch.zeros(per_image, dtype=torch.bool)
    replace[torch.randperm(per_image)[: per_image * 3 // 4]] = True
    max_length = 2 * per_image + 30
    packed_rows = pack_lengths(lengths, max_length)
    assert any(len(row) > 1 for row in packed_rows)
    results = {}
    for packing, rows in ((False, [[i] for i in range(len(items))]), (True, packed_rows)):
        batch = LlavaCollator(PAD, packing=packing, max_length=max_length)(items)
        kwargs = {"replace_mask": replace.expand(len(items), -1)} if stage == "croc" else {}
        with torch.no_grad():
            out = model(**batch, **kwargs)
        results[packing] = _per_sample_token_losses(out.logits, batch, rows, lengths)
        if stage == "croc":
            assert out.recon_loss is not None
    for index in range(len(items)):
        (logits_u, ce_u), (logits_p, ce_p) = results[False][index], results[True][index]
        torch.testing.assert_close(logits_p, logits_u, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ce_p, ce_u, atol=1e-5, rtol=1e-4)
        assert ce_u.gt(0).sum() >= 3  # the comparison covers supervised tokens
