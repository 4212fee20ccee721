"""Optimizer parameter groups with their own learning rates (the recipes' pool, projector,
vision tower and LLM rates: ``CrocLlavaConfig.pool_lr`` / ``projector_lr`` / ``vision_tower_lr`` /
``llm_lr``)."""

from __future__ import annotations

from torch import nn

__all__ = ["GROUPS", "group_of", "parameter_groups"]

# group name -> (config field of its learning rate, parameter-name prefixes); the LLM group takes
# every other trainable parameter (language model, lm_head, reconstruction head)
GROUPS = {
    "pool": ("pool_lr", ("prompt_pool.",)),
    "projector": ("projector_lr", ("model.multi_modal_projector.",)),
    "vision_tower": ("vision_tower_lr", ("model.vision_tower.",)),
    "llm": ("llm_lr", ()),
}


def group_of(name: str) -> str:
    """The group of parameter ``name``."""
    for group, (_, prefixes) in GROUPS.items():
        if name.startswith(prefixes) and prefixes:
            return group
    return "llm"


def parameter_groups(
    model: nn.Module, learning_rate: float, weight_decay: float, no_decay: set[str]
) -> list[dict]:
    """Optimizer groups of the trainable parameters of a CrocLlava ``model``: one per (group,
    decay) pair that has parameters, with ``lr`` from the config field (``learning_rate`` where it
    is None) and ``weight_decay`` (0 for the names in ``no_decay``). Each group has a ``name``."""
    buckets: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            buckets.setdefault((group_of(name), name not in no_decay), []).append(param)
    groups = []
    for (group, decay), params in buckets.items():
        lr = getattr(model.config, GROUPS[group][0], None)
        groups.append(
            {
                "name": f"{group}{'' if decay else '_no_decay'}",
                "params": params,
                "lr": learning_rate if lr is None else float(lr),
                "weight_decay": weight_decay if decay else 0.0,
            }
        )
    return groups
