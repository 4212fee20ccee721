"""The embedded synthetic default: seeded images of shapes with detailed captions and QA pairs.

Every image is a 3 x 3 grid of cells on a plain background; one to three objects sit in distinct
cells, each with a shape, a colour and a size. Everything the captions and answers say is read
from the drawn scene, so a model can only get the image-dependent words right by looking.
Records come out in the LLaVA JSON format (``id``, ``image``, ``conversations``), so the same
dataset code serves the synthetic default and real data.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from croc.constants import IMAGE_TOKEN

__all__ = [
    "COLOURS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "SceneObject",
    "SyntheticScene",
    "caption_for",
    "corpus_texts",
    "draw_scene",
    "qa_pairs_for",
    "random_scene",
    "write_synthetic_dataset",
]

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 50, 190),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
COUNT_WORDS = ("zero", "one", "two", "three")
MAX_OBJECTS = 3
BACKGROUND = (235, 235, 235)
KINDS = ("caption", "instruct", "eval")
CAPTION_PROMPTS = ("describe the image in detail .", "what is in the image ?")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cell: int  # index into POSITIONS, row-major over the 3 x 3 grid


@dataclass(frozen=True)
class SyntheticScene:
    objects: tuple[SceneObject, ...]  # sorted by cell (reading order)


def random_scene(rng: random.Random) -> SyntheticScene:
    """Draw a scene: 1..MAX_OBJECTS objects in distinct cells, attributes uniform."""
    count = rng.randint(1, MAX_OBJECTS)
    cells = sorted(rng.sample(range(len(POSITIONS)), count))
    objects = tuple(
        SceneObject(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES), cell) for cell in cells
    )
    return SyntheticScene(objects)


def draw_scene(scene: SyntheticScene, image_size: int = 48) -> Image.Image:
    """Render a scene as an RGB image of ``image_size`` x ``image_size`` pixels."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = image_size / 3
    for obj in scene.objects:
        row, col = divmod(obj.cell, 3)
        cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
        r = cell * (0.45 if obj.size == "large" else 0.25)
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return image


def _position_phrase(cell: int) -> str:
    name = POSITIONS[cell]
    return "in the center" if name == "center" else f"at the {name}"


def caption_for(scene: SyntheticScene) -> str:
    """Detailed caption: the count, then every object (size, colour, shape, position) in reading order."""
    n = len(scene.objects)
    head = "there is one shape ." if n == 1 else f"there are {COUNT_WORDS[n]} shapes ."
    parts = [f"a {o.size} {o.colour} {o.shape} {_position_phrase(o.cell)} ." for o in scene.objects]
    return " ".join([head, *parts])


def qa_pairs_for(scene: SyntheticScene, rng: random.Random) -> list[tuple[str, str]]:
    """Four simple questions with one-word answers, all answerable only from the image.

    The count, then the colour, shape and size of one object chosen with ``rng``.
    """
    n = len(scene.objects)
    target = rng.choice(scene.objects)
    questions = [
        ("how many shapes are there ?", COUNT_WORDS[n]),
        (f"what colour is the shape {_position_phrase(target.cell)} ?", target.colour),
        (f"what shape is {_position_phrase(target.cell)} ?", target.shape),
        (f"what size is the shape {_position_phrase(target.cell)} ?", target.size),
    ]
    return questions


def _record(idx: int, scene: SyntheticScene, rng: random.Random, kind: str) -> dict:
    image = f"{idx:06d}.png"
    if kind == "caption":
        conversations = [
            {"from": "human", "value": IMAGE_TOKEN},
            {"from": "gpt", "value": caption_for(scene)},
        ]
    else:
        if kind == "eval":
            turns = [(CAPTION_PROMPTS[0], caption_for(scene)), *qa_pairs_for(scene, rng)]
        else:
            turns = [(rng.choice(CAPTION_PROMPTS), caption_for(scene))] if rng.random() < 0.5 else []
            turns += rng.sample(qa_pairs_for(scene, rng), 2)
            rng.shuffle(turns)
        conversations = []
        for i, (question, answer) in enumerate(turns):
            value = f"{IMAGE_TOKEN}\n{question}" if i == 0 else question
            conversations += [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]
    return {"id": f"synthetic-{kind}-{idx:06d}", "image": image, "conversations": conversations}


def write_synthetic_dataset(
    out_dir: str | Path, num_samples: int, seed: int, kind: str = "caption", image_size: int = 48
) -> Path:
    """Write ``num_samples`` images and a LLaVA JSON file ``data.json`` into ``out_dir``.

    Args:
        kind: "caption" (one plain-template caption per image, for stages 1 and 1.5), "instruct"
            (chat turns: a detailed description half of the time, and two questions) or "eval"
            (held-out truth: the description request first, then all four questions).
    Returns:
        The path of the JSON file. The same (num_samples, seed, kind) always gives the same files.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for idx in range(num_samples):
        scene = random_scene(rng)
        draw_scene(scene, image_size).save(out / "images" / f"{idx:06d}.png")
        records.append(_record(idx, scene, rng, kind))
    path = out / "data.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def corpus_texts() -> list[str]:
    """Every word the generator can emit, as short texts (the tokenizer's training corpus)."""
    texts = [*CAPTION_PROMPTS, "how many shapes are there ?", "there is one shape ."]
    texts += [f"there are {w} shapes ." for w in COUNT_WORDS]
    for cell in range(len(POSITIONS)):
        phrase = _position_phrase(cell)
        texts += [f"what colour is the shape {phrase} ?", f"what shape is {phrase} ?"]
        texts.append(f"what size is the shape {phrase} ?")
    texts += [f"a {s} {c} {shape} ." for s in SIZES for c in COLOURS for shape in SHAPES]
    return texts
