"""``croc demo --ablation``: does the Croc stage help? The embedded demo default trained twice at
equal steps, with and without the Croc stage.

    with Croc:     projector -> croc (pool replacement, mixed mask, reconstruction) -> finetune
    without Croc:  projector -> the same number of steps of plain captioning (causal LM loss on the
                   same caption data, same packing and learning rate) -> finetune

Both start from the same initial weights and see the same data; the held-out accuracies of both
are written side by side to ``out_dir/ablation.md`` (and ``ablation.json``), whatever they show.
Not part of ``make demo``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import set_seed

from croc.data import LlavaCollator, LlavaJsonDataset, build_image_processor, build_synthetic_tokenizer
from croc.train.demo import (
    DemoRecipe,
    StageRecipe,
    _BarOnlyProgress,
    _build_model,
    _evaluate,
    _training_args,
    _write_data,
)
from croc.train.run import num_image_tokens, train_stage

__all__ = ["ARMS", "run_ablation"]

# arm -> what replaces the demo's "croc" stage: the model stage it trains in
ARMS = {"with_croc": "croc", "without_croc": "finetune"}


def _arm_stages(recipe: DemoRecipe, arm: str) -> list[tuple[str, StageRecipe]]:
    """(model stage, the demo stage's data and sizes) for every stage of one arm."""
    return [(ARMS[arm] if stage.name == "croc" else stage.name, stage) for stage in recipe.stages]


def _train_arm(arm: str, recipe: DemoRecipe, tokenizer, datasets, out: Path):
    set_seed(0)
    model = _build_model(recipe, tokenizer)
    seconds = {}
    for model_stage, stage in _arm_stages(recipe, arm):
        print(
            f"croc demo --ablation [{arm}]: {stage.name} stage as {model_stage!r}, {stage.steps} steps",
            flush=True,
        )
        collator = LlavaCollator(tokenizer.pad_token_id, packing=stage.packing, max_length=recipe.max_length)
        start = time.perf_counter()
        train_stage(
            model,
            model_stage,
            datasets(stage.data, stage.template),
            collator,
            _training_args(out / "trainer" / arm, stage, recipe),
            progress=_BarOnlyProgress(),
        )
        seconds[stage.name] = round(time.perf_counter() - start, 1)
    return model, seconds


def _write_report(path: Path, results: dict, recipe: DemoRecipe) -> None:
    steps = " -> ".join(f"{s.name} {s.steps}" for s in recipe.stages)
    lines = [
        "# croc demo --ablation: the Croc stage against plain captioning at equal steps",
        "",
        f"Stages ({steps} steps); the second arm spends the croc stage's steps on plain captioning "
        "(causal LM loss, same data). Held-out images, same initial weights.",
        "",
        "| arm | caption token accuracy | blind (noise images) | QA accuracy | train seconds |",
        "| --- | --- | --- | --- | --- |",
    ]
    for arm, result in results.items():
        ev = result["eval"]
        lines.append(
            f"| {arm} | {ev['caption_token_accuracy']:.4f} | {ev['blind_caption_token_accuracy']:.4f} | "
            f"{ev['qa_accuracy']:.4f} | {sum(result['seconds'].values()):.0f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def run_ablation(
    out_dir: str | Path = "runs/demo", quick: bool = False, recipe: DemoRecipe | None = None
) -> dict:
    """Train both arms, evaluate both on the held-out set, write ``ablation.md`` and
    ``ablation.json`` into ``out_dir``; returns ``{arm: {"eval": ..., "seconds": ...}}``."""
    recipe = recipe or (DemoRecipe.quick() if quick else DemoRecipe())
    out = Path(out_dir)
    tokenizer = build_synthetic_tokenizer()
    image_processor = build_image_processor(recipe.image_size)
    data = _write_data(out, recipe)
    probe = _build_model(recipe, tokenizer)
    n_image = num_image_tokens(probe.config)

    def datasets(kind: str, template: str) -> LlavaJsonDataset:
        return LlavaJsonDataset(
            data[kind], data[kind].parent / "images", tokenizer, image_processor, template,
            probe.config.image_token_id, n_image, recipe.max_length, cache_images=True,
        )  # fmt: skip

    eval_records = json.loads(data["eval"].read_text())
    results = {}
    for arm in ARMS:
        model, seconds = _train_arm(arm, recipe, tokenizer, datasets, out)
        ev = _evaluate(
            model,
            tokenizer,
            datasets("eval", "vicuna"),
            eval_records,
            datasets("eval_caption", "vicuna"),
            n_image,
        )
        results[arm] = {"eval": ev, "seconds": seconds}
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(results, indent=2))
    _write_report(out / "ablation.md", results, recipe)
    return results
