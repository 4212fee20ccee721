"""``croc demo``: the three Croc stages on the embedded synthetic default, on whatever device is there.

Writes into ``out_dir`` (default ``runs/demo``):
    metrics.json  ``{"stages": {name: {"steps", "seconds", "loss_first", "loss_last"}},
                  "eval": {"caption_token_accuracy", "blind_caption_token_accuracy", "qa_accuracy"}}``
    loss.png      lm and recon loss curves of every stage
    samples.md    generated descriptions and answers next to the truth for held-out images
Nothing is downloaded: data, tokenizer and the tiny model are built here, deterministically.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainingArguments, set_seed
from transformers.trainer_callback import ProgressCallback

from croc.constants import IMAGE_TOKEN
from croc.data import LlavaCollator, LlavaJsonDataset, build_image_processor, build_synthetic_tokenizer
from croc.data.synthetic import CAPTION_PROMPTS, write_synthetic_dataset
from croc.train.evaluate import answer_all, caption_token_accuracy, exact_match
from croc.train.run import num_image_tokens, train_stage

__all__ = ["DemoRecipe", "run_demo"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageRecipe:
    name: str
    data: str  # "caption" or "instruct"
    template: str
    steps: int
    learning_rate: float
    packing: bool


@dataclass(frozen=True)
class DemoRecipe:
    """Sizes of the demo; ``quick()`` is the CI smoke-test version."""

    train_images: int = 3000
    eval_images: int = 200
    sample_images: int = 6
    image_size: int = 48
    patch_size: int = 8
    batch_size: int = 16
    max_length: int = 512
    stages: tuple[StageRecipe, ...] = (
        StageRecipe("projector", "caption", "plain", 60, 1e-3, False),
        StageRecipe("croc", "caption", "plain", 400, 1e-3, True),
        StageRecipe("finetune", "instruct", "vicuna", 600, 5e-4, False),
    )

    @classmethod
    def quick(cls) -> DemoRecipe:
        return cls(
            train_images=32,
            eval_images=6,
            sample_images=2,
            batch_size=4,
            stages=tuple(
                StageRecipe(s.name, s.data, s.template, 2, s.learning_rate, s.packing) for s in cls.stages
            ),
        )


class _BarOnlyProgress(ProgressCallback):
    """tqdm progress bar showing the latest losses in its postfix instead of printing every log."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            shown = {k: f"{logs[k]:.3f}" for k in ("loss", "lm_loss", "recon_loss") if k in logs}
            self.training_bar.set_postfix(shown, refresh=False)


def _build_model(recipe: DemoRecipe, tokenizer):
    """The tiny random Croc LLaVA of the demo: a 2-layer CLIP tower, a 2-layer Llama (width 128)."""
    from croc.model import CrocLlavaForConditionalGeneration, tiny_config

    config = tiny_config(
        text_overrides=dict(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            hidden_size=128,
            intermediate_size=512,
            max_position_embeddings=recipe.max_length,
        ),
        vision_overrides=dict(
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            image_size=recipe.image_size,
            patch_size=recipe.patch_size,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        stage="projector",
    )
    return CrocLlavaForConditionalGeneration(config)


def _training_args(out_dir: Path, stage: StageRecipe, recipe: DemoRecipe) -> TrainingArguments:
    on_gpu = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(out_dir / stage.name),
        per_device_train_batch_size=recipe.batch_size,
        max_steps=stage.steps,
        learning_rate=stage.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, stage.steps // 30),
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not on_gpu,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        dataloader_num_workers=0,
        seed=0,
    )


def _stage_metrics(history: list[dict], seconds: float, steps: int) -> dict:
    losses = [entry["loss"] for entry in history if "loss" in entry]
    return {"steps": steps, "seconds": round(seconds, 2), "loss_first": losses[0], "loss_last": losses[-1]}


def _plot_losses(histories: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(histories), figsize=(4.5 * len(histories), 3.5), squeeze=False)
    for ax, (name, history) in zip(axes[0], histories.items()):
        for part, colour in (("lm_loss", "tab:blue"), ("recon_loss", "tab:red")):
            points = [(e["step"], e[part]) for e in history if part in e]
            if points:
                ax.plot(*zip(*points), color=colour, label=part)
        ax.set_title(f"stage {name}")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _write_samples(path: Path, generated, metrics: dict, images: dict[str, str]) -> None:
    """samples.md: per held-out record its image (``images``: record id -> path relative to ``path``)
    and a table of every question with the truth and the generated answer."""
    lines = ["# croc demo: held-out samples", "", f"eval: `{json.dumps(metrics['eval'])}`", ""]
    for record_id in dict.fromkeys(g.record_id for g in generated):
        lines += [f"## {record_id}", "", f"![{record_id}]({images[record_id]})", ""]
        lines += ["| question | truth | generated |", "| --- | --- | --- |"]
        for g in (g for g in generated if g.record_id == record_id):
            mark = "" if g.answer == g.truth else " ✗"
            lines.append(f"| {g.question} | {g.truth} | {g.answer}{mark} |")
        lines.append("")
    path.write_text("\n".join(lines))


def _write_data(out: Path, recipe: DemoRecipe) -> dict[str, Path]:
    """The demo's LLaVA JSON files (train captions, train chat, held-out eval, held-out captions)."""
    data = {
        kind: write_synthetic_dataset(out / "data" / kind, count, seed, kind, recipe.image_size)
        for kind, count, seed in (
            ("caption", recipe.train_images, 1),
            ("instruct", recipe.train_images, 2),
            ("eval", recipe.eval_images, 3),
        )
    }
    data["eval_caption"] = _first_turn_only(data["eval"])
    return data


def _first_turn_only(json_path: Path) -> Path:
    """Write ``captions.json`` beside ``json_path``: every record cut to its first question and answer."""
    records = json.loads(json_path.read_text())
    for record in records:
        record["conversations"] = record["conversations"][:2]
    path = json_path.parent / "captions.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def _train_stages(model, recipe: DemoRecipe, datasets, pad_token_id: int, out: Path):
    """Train every stage in turn; returns (metrics per stage, log history per stage)."""
    metrics, histories = {}, {}
    for stage in recipe.stages:
        collator = LlavaCollator(pad_token_id, packing=stage.packing, max_length=recipe.max_length)
        print(f"croc demo: stage {stage.name} ({stage.steps} steps, {stage.template} template)", flush=True)
        start = time.perf_counter()
        trainer = train_stage(
            model,
            stage.name,
            datasets(stage.data, stage.template),
            collator,
            _training_args(out / "trainer", stage, recipe),
            progress=_BarOnlyProgress(),
        )
        histories[stage.name] = trainer.state.log_history
        metrics[stage.name] = _stage_metrics(histories[stage.name], time.perf_counter() - start, stage.steps)
    return metrics, histories


def _evaluate(model, tokenizer, eval_set, eval_records, caption_set, n_image: int) -> dict:
    """The ``eval`` block of metrics.json (see the module docstring)."""
    print("croc demo: evaluating on held-out images", flush=True)
    qa = answer_all(
        model, tokenizer, eval_set, eval_records, n_image, max_new_tokens=4, skip_questions=CAPTION_PROMPTS
    )
    collator = LlavaCollator(tokenizer.pad_token_id)
    seeing = caption_token_accuracy(model, caption_set, collator)
    blind = caption_token_accuracy(model, caption_set, collator, blind=True)
    return {
        "caption_token_accuracy": round(seeing, 4),
        "blind_caption_token_accuracy": round(blind, 4),
        "qa_accuracy": round(exact_match(qa), 4),
    }


def run_demo(
    out_dir: str | Path = "runs/demo", quick: bool = False, recipe: DemoRecipe | None = None
) -> dict:
    """Train the three stages on the synthetic default, evaluate, write the three files; return metrics.

    ``recipe`` overrides the sizes (default ``DemoRecipe()``, or ``DemoRecipe.quick()`` with ``quick``).
    """
    recipe = recipe or (DemoRecipe.quick() if quick else DemoRecipe())
    out = Path(out_dir)
    set_seed(0)
    tokenizer = build_synthetic_tokenizer()
    image_processor = build_image_processor(recipe.image_size)
    model = _build_model(recipe, tokenizer)
    n_image = num_image_tokens(model.config)
    data = _write_data(out, recipe)

    def datasets(kind: str, template: str) -> LlavaJsonDataset:
        return LlavaJsonDataset(
            data[kind], data[kind].parent / "images", tokenizer, image_processor, template,
            model.config.image_token_id, n_image, recipe.max_length, cache_images=True,
        )  # fmt: skip

    stage_metrics, histories = _train_stages(model, recipe, datasets, tokenizer.pad_token_id, out)
    eval_set, eval_records = datasets("eval", "vicuna"), json.loads(data["eval"].read_text())
    metrics = {
        "stages": stage_metrics,
        "eval": _evaluate(
            model, tokenizer, eval_set, eval_records, datasets("eval_caption", "vicuna"), n_image
        ),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _plot_losses(histories, out / "loss.png")
    shown = eval_records[: recipe.sample_images]
    images = {
        r["id"]: (data["eval"].parent / "images" / r["image"]).relative_to(out).as_posix() for r in shown
    }
    generated = answer_all(model, tokenizer, eval_set, shown, n_image, max_new_tokens=48)
    _write_samples(out / "samples.md", generated, metrics, images)
    return metrics
