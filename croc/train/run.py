"""``croc train``: one stage of the Croc recipe on LLaVA JSON data with the transformers Trainer.

Every ``TrainingArguments`` flag works as usual (``--output_dir``, ``--bf16``,
``--gradient_checkpointing``, ``--resume_from_checkpoint``, ``--deepspeed``, ...); ``--deepspeed
zero2`` / ``zero3`` name the configs shipped in ``croc/train/configs``. Launch on many GPUs with
``torchrun`` or ``deepspeed`` as any transformers script.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoTokenizer, HfArgumentParser, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from croc.data import LlavaCollator, LlavaJsonDataset, build_image_processor
from croc.model.config import visual_tokens_per_image
from croc.recipes import RECIPE_NAMES, RECIPES, recipe_config
from croc.train.stages import STAGES, apply_stage, trainable_summary
from croc.train.trainer import CrocTrainer

__all__ = [
    "CrocArguments",
    "build_dataset",
    "deepspeed_config_path",
    "main",
    "num_image_tokens",
    "train_stage",
    "with_recipe_defaults",
]

logger = logging.getLogger(__name__)
SHIPPED_DEEPSPEED = ("zero2", "zero3")


@dataclass
class CrocArguments:
    """The croc options of ``croc train`` (the rest are ``TrainingArguments``)."""

    stage: str = field(metadata={"help": f"which stage to train: one of {STAGES}"})
    model_name_or_path: str = field(
        metadata={"help": "local CrocLlava/LLaVA checkpoint folder to start from"}
    )
    data_path: str = field(metadata={"help": "LLaVA JSON file (list of {id, image, conversations})"})
    image_folder: str = field(metadata={"help": "folder the records' image paths are relative to"})
    template: str | None = field(
        default=None,
        metadata={"help": "plain | vicuna (default: plain for projector/croc, vicuna for finetune)"},
    )
    max_length: int = field(default=2048, metadata={"help": "longest sample (and packed row) in tokens"})
    packing: bool | None = field(
        default=None, metadata={"help": "pack samples into rows (default: on for croc)"}
    )
    on_error: str = field(
        default="raise", metadata={"help": "bad records: raise (stop) or skip (log and count)"}
    )
    verify_images: bool = field(default=False, metadata={"help": "decode every image before training"})
    replace_ratio: float | None = field(
        default=None, metadata={"help": "croc: fraction of visual tokens replaced by pool tokens (0.75)"}
    )
    mask_kind: str | None = field(
        default=None,
        metadata={"help": "croc: bidirectional 'image' spans (paper), the whole 'prefix', or 'causal'"},
    )
    assignment: str | None = field(
        default=None, metadata={"help": "croc: pool assignment 'hungarian' (one-to-one) or 'nearest'"}
    )
    prompt_pool_size: int | None = field(
        default=None, metadata={"help": "croc: pool tokens (2048); only when the pool is created fresh"}
    )
    recon_loss_weight: float | None = field(
        default=None, metadata={"help": "croc: weight of recon_loss (10)"}
    )
    attention_backend: str | None = field(
        default=None, metadata={"help": "mixed attention backend: auto (Triton on CUDA) | triton | reference"}
    )
    sequence_parallel_size: int = field(
        default=1,
        metadata={
            "help": "split every row over this many ranks (DeepSpeed Ulysses); must divide the number of "
            "processes and the attention heads, and divide the kv heads or be a multiple of them"
        },
    )
    recipe: str | None = field(
        default=None,
        metadata={
            "help": f"one of {RECIPE_NAMES}: its config fields and training defaults (flags given on the "
            "command line win; default: the checkpoint's fields, which are 'paper' for a fresh one)"
        },
    )

    def config_overrides(self) -> dict:
        """The Croc config fields: the recipe's (if any), then those given on the command line
        (others keep the checkpoint's values). A flag that contradicts the recipe makes it "custom"."""
        names = ("replace_ratio", "mask_kind", "assignment", "prompt_pool_size", "recon_loss_weight")
        values = {name: getattr(self, name) for name in (*names, "attention_backend")}
        given = {name: value for name, value in values.items() if value is not None}
        if self.recipe is None:
            return given
        fields = recipe_config(self.recipe)
        changed = any(name in fields and fields[name] != value for name, value in given.items())
        return {**fields, **given, **({"recipe": "custom"} if changed else {})}


def with_recipe_defaults(argv: list[str], recipe: str | None) -> list[str]:
    """``argv`` plus ``--flag value`` for every training default of ``recipe`` that argv does not set."""
    if recipe is None:
        return argv
    if recipe not in RECIPES:
        raise ValueError(f"--recipe must be one of {RECIPE_NAMES}, got {recipe!r}")
    given = {token[2:].split("=", 1)[0] for token in argv if token.startswith("--")}
    extra = [
        part
        for key, value in RECIPES[recipe].training.items()
        if key not in given
        for part in (f"--{key}", str(value))
    ]
    return [*argv, *extra]


def deepspeed_config_path(name_or_path: str) -> str:
    """Path of a DeepSpeed JSON config: "zero2"/"zero3" are the ones shipped with croc."""
    if name_or_path in SHIPPED_DEEPSPEED:
        return str(resources.files("croc.train") / "configs" / f"{name_or_path}.json")
    if not Path(name_or_path).is_file():
        raise ValueError(f"deepspeed must be one of {SHIPPED_DEEPSPEED} or a JSON file, got {name_or_path!r}")
    return name_or_path


def num_image_tokens(config) -> int:
    """Visual tokens per image that the LLaVA ``config`` feeds the LLM (CLS dropped unless "full")."""
    return visual_tokens_per_image(config.vision_config, config.vision_feature_select_strategy)


def build_dataset(args: CrocArguments, tokenizer, image_processor, config) -> LlavaJsonDataset:
    template = args.template or ("vicuna" if args.stage == "finetune" else "plain")
    return LlavaJsonDataset(
        args.data_path,
        args.image_folder,
        tokenizer,
        image_processor,
        template,
        image_token_id=config.image_token_id,
        num_image_tokens=num_image_tokens(config),
        max_length=args.max_length,
        on_error=args.on_error,
        verify_images=args.verify_images,
    )


def train_stage(
    model,
    stage: str,
    train_dataset,
    collator: LlavaCollator,
    training_args: TrainingArguments,
    tokenizer=None,
    callbacks: list | None = None,
    resume_from_checkpoint: str | bool | None = None,
    progress: ProgressCallback | None = None,
    sequence_parallel=None,
) -> CrocTrainer:
    """Switch ``model`` to ``stage`` and train it; returns the Trainer (its ``state.log_history``).

    ``progress`` replaces the Trainer's default progress-bar callback; ``sequence_parallel`` (from
    ``croc.train.sequence_parallel.setup_sequence_parallel``) splits every row over its group.
    """
    apply_stage(model, stage)
    logger.info("stage %s: %s", stage, trainable_summary(model))
    training_args.remove_unused_columns = (
        False  # pixel_values, segment_ids, position_ids must reach the model
    )
    trainer = CrocTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
        sequence_parallel=sequence_parallel,
    )
    if progress is not None:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(progress)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer


def _parameter_dtype(training_args: TrainingArguments) -> torch.dtype:
    """The dtype the model's parameters train in, from the training arguments alone (never the
    checkpoint's saved dtype): bf16/fp16 only under DeepSpeed with ``--bf16``/``--fp16``, whose
    optimizer keeps fp32 master weights itself; otherwise float32, and ``--bf16``/``--fp16`` without
    DeepSpeed mean autocast over these fp32 weights."""
    if training_args.deepspeed and training_args.bf16:
        return torch.bfloat16
    if training_args.deepspeed and training_args.fp16:
        return torch.float16
    return torch.float32


def _load(args: CrocArguments, training_args: TrainingArguments):
    from croc.model import CrocLlavaForConditionalGeneration

    model = CrocLlavaForConditionalGeneration.from_pretrained(
        args.model_name_or_path,
        dtype=_parameter_dtype(training_args),
        stage=args.stage,
        **args.config_overrides(),
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    try:
        image_processor = AutoImageProcessor.from_pretrained(args.model_name_or_path)
    except OSError:
        image_processor = build_image_processor(model.config.vision_config.image_size)
    return model, tokenizer, image_processor


def _resolve_deepspeed_flag(argv: list[str] | None) -> list[str]:
    """``argv`` with the value of ``--deepspeed`` turned into a config path (TrainingArguments reads
    the file while it is parsed, so the shipped names must be resolved before)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, token in enumerate(argv):
        if token == "--deepspeed" and i + 1 < len(argv):
            argv[i + 1] = deepspeed_config_path(argv[i + 1])
        elif token.startswith("--deepspeed="):
            argv[i] = "--deepspeed=" + deepspeed_config_path(token.split("=", 1)[1])
    return argv


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``croc train``: parse, load, build the data, train, save model + processors."""
    parser = HfArgumentParser((CrocArguments, TrainingArguments), prog="croc train")
    argv = _resolve_deepspeed_flag(argv)
    args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if args.recipe is not None:
        if args.recipe not in RECIPES:
            parser.error(f"--recipe must be one of {RECIPE_NAMES}, got {args.recipe!r}")
        args, training_args = parser.parse_args_into_dataclasses(args=with_recipe_defaults(argv, args.recipe))
    if args.stage not in STAGES:
        parser.error(f"--stage must be one of {STAGES}, got {args.stage!r}")
    if training_args.deepspeed or args.sequence_parallel_size > 1:
        from datetime import timedelta

        import deepspeed

        # ZeRO-3 partitions the weights while they load, so DeepSpeed must know the world size first
        deepspeed.init_distributed(
            dist_backend=training_args.ddp_backend, timeout=timedelta(seconds=training_args.ddp_timeout)
        )
    model, tokenizer, image_processor = _load(args, training_args)
    sequence_parallel = None
    if args.sequence_parallel_size > 1:
        from croc.train.sequence_parallel import setup_sequence_parallel

        sequence_parallel = setup_sequence_parallel(model, args.sequence_parallel_size)
    dataset = build_dataset(args, tokenizer, image_processor, model.config)
    packing = args.stage == "croc" if args.packing is None else args.packing
    collator = LlavaCollator(tokenizer.pad_token_id, packing=packing, max_length=args.max_length)
    trainer = train_stage(
        model,
        args.stage,
        dataset,
        collator,
        training_args,
        tokenizer=tokenizer,
        resume_from_checkpoint=training_args.resume_from_checkpoint,
        sequence_parallel=sequence_parallel,
    )
    trainer.save_model()
    if trainer.is_world_process_zero():
        image_processor.save_pretrained(training_args.output_dir)
        if dataset.skipped:
            logger.warning(
                "%d records were skipped (on_error='skip'): %s", len(dataset.skipped), dataset.skipped
            )
