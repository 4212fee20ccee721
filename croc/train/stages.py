"""Which parameters train in each stage of the Croc recipe.

    "projector" (stage 1):   the multimodal projector only;
    "croc"      (stage 1.5): projector + LLM + prompt token pool + reconstruction head;
    "finetune"  (stage 2):   projector + LLM.

The vision tower is frozen in every stage. The model's own stage switch decides (its
``set_stage``); this module applies it and reports what trains.
"""

from __future__ import annotations

from torch import nn

from croc.constants import STAGES

__all__ = ["STAGES", "apply_stage", "trainable_summary"]


def apply_stage(model: nn.Module, stage: str) -> None:
    """Switch ``model`` (a ``CrocLlavaForConditionalGeneration``) to ``stage`` and set requires_grad."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    model.set_stage(stage)


def trainable_summary(model: nn.Module) -> str:
    """One line: trainable / total parameter counts and the trainable top-level modules."""
    total = sum(p.numel() for p in model.parameters())
    names = sorted({".".join(n.split(".")[:2]) for n, p in model.named_parameters() if p.requires_grad})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable {trainable:,} of {total:,} parameters: {', '.join(names)}"
