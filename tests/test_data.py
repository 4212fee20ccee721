"""Data pipeline: synthetic generator, offline tokenizer, templates and label masking, image
preprocessing, and the LLaVA JSON dataset's error policy."""

import hashlib
import json
import random

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from PIL import Image

from croc.data import (
    IGNORE_INDEX,
    DataError,
    LlavaJsonDataset,
    build_image_processor,
    build_synthetic_tokenizer,
    conversation_chunks,
    expand_to_square,
    preprocess,
    tokenize_conversation,
    write_synthetic_dataset,
)
from croc.data.synthetic import COLOURS, caption_for, draw_scene, random_scene

IMAGE_SIZE = 24
NUM_IMAGE_TOKENS = 9


@pytest.fixture(scope="module")
def tokenizer():
    return build_synthetic_tokenizer()


@pytest.fixture(scope="module")
def image_processor():
    return build_image_processor(IMAGE_SIZE)


def _digest(folder):
    return hashlib.sha256(
        b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())
    ).hexdigest()


@pytest.mark.parametrize("kind", ["caption", "instruct", "eval"])
def test_synthetic_dataset_is_deterministic(tmp_path, kind):
    a = write_synthetic_dataset(tmp_path / "a", 12, seed=5, kind=kind)
    b = write_synthetic_dataset(tmp_path / "b", 12, seed=5, kind=kind)
    c = write_synthetic_dataset(tmp_path / "c", 12, seed=6, kind=kind)
    assert _digest(a.parent) == _digest(b.parent)
    assert _digest(a.parent) != _digest(c.parent)
    records = json.loads(a.read_text())
    assert len(records) == 12 and all("<image>" in r["conversations"][0]["value"] for r in records)


def test_caption_describes_the_drawn_pixels():
    rng = random.Random(0)
    for _ in range(30):
        scene = random_scene(rng)
        image = draw_scene(scene, image_size=48)
        caption = caption_for(scene)
        for obj in scene.objects:
            row, col = divmod(obj.cell, 3)
            centre = (int((col + 0.5) * 16), int((row + 0.5) * 16) + 2)  # inside circle, square and triangle
            assert image.getpixel(centre) == COLOURS[obj.colour]
            assert f"{obj.size} {obj.colour} {obj.shape}" in caption
        empty_cells = set(range(9)) - {o.cell for o in scene.objects}
        for cell in empty_cells:
            row, col = divmod(cell, 3)
            assert image.getpixel((int((col + 0.5) * 16), int((row + 0.5) * 16))) == (235, 235, 235)


def test_tokenizer_covers_fresh_samples_and_round_trips(tmp_path, tokenizer):
    path = write_synthetic_dataset(tmp_path, 40, seed=123, kind="instruct")
    for record in json.loads(path.read_text()):
        for turn in record["conversations"]:
            text = turn["value"].replace("<image>", "").strip()
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids
            assert tokenizer.decode(ids) == " ".join(text.split())
    assert tokenizer.convert_tokens_to_ids("<image>") not in (tokenizer.unk_token_id, None)
    tokenizer.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded("a red circle .")["input_ids"] == tokenizer("a red circle .")["input_ids"]


def _conv(*turns):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(turns)]


@pytest.mark.parametrize(
    ("template", "conversation", "supervised_text"),
    [
        ("plain", _conv("<image>\nwhat is in the image ?", "a red circle ."), ["a red circle . </s>"]),
        (
            "vicuna",
            _conv("<image>\nhow many shapes are there ?", "two", "what shape is at the top ?", "square"),
            ["two </s>", "square </s>"],
        ),
    ],
)
def test_labels_supervise_only_the_answers(tokenizer, template, conversation, supervised_text):
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    chunks = conversation_chunks(conversation, template)
    input_ids, labels = tokenize_conversation(tokenizer, chunks, image_id, NUM_IMAGE_TOKENS)
    assert len(input_ids) == len(labels)
    assert input_ids[0] == tokenizer.bos_token_id
    assert input_ids.count(image_id) == NUM_IMAGE_TOKENS
    runs, current = [], []
    for token, label in zip(input_ids, labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    runs += [current] if current else []
    assert [tokenizer.decode(r) for r in runs] == supervised_text
    if template == "plain":
        assert "what" not in tokenizer.decode(input_ids)  # plain drops the human text


def test_unknown_template_is_rejected():
    with pytest.raises(ValueError, match="template"):
        conversation_chunks(_conv("<image>", "x"), "chatml")


def test_pad_to_square_uses_the_mean_colour(image_processor):
    image = Image.new("RGB", (30, 10), (255, 0, 0))
    square = expand_to_square(image, (1, 2, 3))
    assert square.size == (30, 30)
    assert square.getpixel((0, 0)) == (1, 2, 3) and square.getpixel((15, 15)) == (255, 0, 0)
    pixels = preprocess(image, image_processor)
    assert tuple(pixels.shape) == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert pixels.abs()[:, 0, :].max() < 0.05  # the padded border normalises to about 0
    assert pixels[0, IMAGE_SIZE // 2, IMAGE_SIZE // 2] > 1.5  # red centre


def _dataset(tmp_path, tokenizer, image_processor, **kwargs):
    return LlavaJsonDataset(
        tmp_path / "data.json",
        tmp_path / "images",
        tokenizer,
        image_processor,
        "plain",
        tokenizer.convert_tokens_to_ids("<image>"),
        NUM_IMAGE_TOKENS,
        **kwargs,
    )


def _break_record(tmp_path, problem):
    """Damage record 2 of a 6-record dataset in the way ``problem`` names; returns its id."""
    path = write_synthetic_dataset(tmp_path, 6, seed=0, kind="caption", image_size=IMAGE_SIZE)
    records = json.loads(path.read_text())
    bad = records[2]
    if problem == "missing image":
        (tmp_path / "images" / bad["image"]).unlink()
    elif problem == "corrupt image":
        (tmp_path / "images" / bad["image"]).write_bytes(b"not a png")
    elif problem == "no <image>":
        bad["conversations"][0]["value"] = "describe it"
    elif problem == "too long":
        bad["conversations"][1]["value"] = " ".join(["red"] * 200)
    elif problem == "two <image>":
        bad["conversations"][0]["value"] = "<image>\n<image>"
    elif problem == "<image> without image":
        del bad["image"]
    elif problem == "malformed turns":
        bad["conversations"] = bad["conversations"][:1]
    path.write_text(json.dumps(records))
    return bad["id"]


PROBLEMS = [
    "missing image",
    "corrupt image",
    "no <image>",
    "two <image>",
    "<image> without image",
    "too long",
    "malformed turns",
]


@pytest.mark.parametrize("problem", PROBLEMS)
def test_bad_record_fails_the_run_with_its_id(tmp_path, tokenizer, image_processor, problem):
    bad_id = _break_record(tmp_path, problem)
    with pytest.raises(DataError, match=bad_id):
        _dataset(tmp_path, tokenizer, image_processor, max_length=64, verify_images=True)


@pytest.mark.parametrize("problem", PROBLEMS)
def test_bad_record_is_skipped_and_counted(tmp_path, tokenizer, image_processor, problem, caplog):
    bad_id = _break_record(tmp_path, problem)
    dataset = _dataset(
        tmp_path, tokenizer, image_processor, max_length=64, verify_images=True, on_error="skip"
    )
    assert len(dataset) == 5
    assert [record_id for record_id, _ in dataset.skipped] == [bad_id]
    assert bad_id in caplog.text


def test_corrupt_image_found_while_training(tmp_path, tokenizer, image_processor, caplog):
    bad_id = _break_record(tmp_path, "corrupt image")
    strict = _dataset(tmp_path, tokenizer, image_processor)
    with pytest.raises(DataError, match=bad_id):
        strict[2]
    lenient = _dataset(tmp_path, tokenizer, image_processor, on_error="skip")
    item = lenient[2]
    assert item["input_ids"].tolist() == lenient.samples[3].input_ids  # the next good sample
    assert [record_id for record_id, _ in lenient.skipped] == [bad_id]
    assert bad_id in caplog.text


def test_invalid_on_error(tmp_path, tokenizer, image_processor):
    write_synthetic_dataset(tmp_path, 2, seed=0)
    with pytest.raises(ValueError, match="on_error"):
        _dataset(tmp_path, tokenizer, image_processor, on_error="ignore")
