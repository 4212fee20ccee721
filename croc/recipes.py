"""Named recipes: the paper's method and the behaviour of the released Croc and ViCToR code.

``croc train --recipe NAME`` and ``croc.recipes.RECIPES[NAME]``. A recipe is a set of
:class:`croc.model.CrocLlavaConfig` fields (every difference is a field of its own, recorded in
the saved config) plus defaults for ``TrainingArguments`` flags the command line does not set.

=============  =====================================================================================
paper          the paper (arXiv 2410.14332): image spans bidirectional, Hungarian per image,
               transformer-layer reconstruction head over every visual token, visual tokens as
               the projector gives them, vision tower frozen. croc's default; training defaults
               are the TrainingArguments' own.
croc-release   the released Croc code (github.com/deepglint/Croc, scripts/pretrain_croc.sh):
               prefix-LM mask over the prompt, nearest pool token, reconstruction over all image
               tokens, every visual token L2-normalised before the LLM in every stage;
               lr 2e-5 cosine, warmup 3%, no weight decay.
victor         the released ViCToR code (github.com/deepglint/Victor,
               scripts/train/stage1.5_caption_clip_qwen_victor.sh): plain causal attention,
               linear reconstruction head, one Hungarian per sample over all its images,
               normalised visual tokens, vision tower trained (lr 2e-6), pool lr 1e-3, lr 1e-5.
=============  =====================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["DEFAULT_RECIPE", "RECIPES", "RECIPE_NAMES", "Recipe", "recipe_config"]

RECIPE_NAMES = ("paper", "croc-release", "victor")
DEFAULT_RECIPE = "paper"


@dataclass(frozen=True)
class Recipe:
    """One recipe.

    Attributes:
        name: one of :data:`RECIPE_NAMES`.
        summary: what it reproduces, in one line.
        config: CrocLlavaConfig fields (name -> value), including ``recipe=name``.
        training: TrainingArguments defaults (flag name -> value) that ``croc train`` uses unless the
            command line gives the flag.
    """

    name: str
    summary: str
    config: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    training: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))


_PAPER = {
    "mask_kind": "image",
    "assignment": "hungarian",
    "assignment_scope": "image",
    "normalize_visual": False,
    "recon_head": "transformer",
    "recon_tokens": "all",
    "train_vision_tower": False,
    "pool_lr": None,
    "projector_lr": None,
    "vision_tower_lr": None,
    "llm_lr": None,
}


def _recipe(name: str, summary: str, changes: dict[str, Any], training: dict[str, Any]) -> Recipe:
    config = {**_PAPER, **changes, "recipe": name}
    return Recipe(name, summary, MappingProxyType(config), MappingProxyType(training))


RECIPES: MappingProxyType = MappingProxyType(
    {
        "paper": _recipe(
            "paper",
            "the paper's method: image spans bidirectional, Hungarian per image, transformer head",
            {},
            {},
        ),
        "croc-release": _recipe(
            "croc-release",
            "released Croc code: prefix mask, nearest pool token, normalised visual tokens",
            {"mask_kind": "prefix", "assignment": "nearest", "normalize_visual": True},
            {"learning_rate": 2e-5, "lr_scheduler_type": "cosine", "warmup_steps": 0.03, "weight_decay": 0.0},
        ),
        "victor": _recipe(
            "victor",
            "released ViCToR code: causal attention, Hungarian per sample, linear head, trained tower",
            {
                "mask_kind": "causal",
                "assignment_scope": "sample",
                "normalize_visual": True,
                "recon_head": "linear",
                "train_vision_tower": True,
                "vision_tower_lr": 2e-6,
                "pool_lr": 1e-3,
            },
            {"learning_rate": 1e-5},
        ),
    }
)


def recipe_config(name: str) -> dict[str, Any]:
    """The CrocLlavaConfig fields of recipe ``name`` (a fresh dict)."""
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPE_NAMES}, got {name!r}")
    return dict(RECIPES[name].config)
