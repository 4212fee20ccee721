"""Croc LLaVA on transformers (needs the ``train`` extra: transformers).

Public API::

    from croc.model import CrocLlavaConfig, CrocLlavaForConditionalGeneration, tiny_config

    config = tiny_config(stage="croc")                       # or CrocLlavaConfig(vision_config=..., text_config=..., ...)
    model = CrocLlavaForConditionalGeneration(config)        # or .from_pretrained(llava_dir, stage="croc")
                                                             # or .from_llava(llava_model, stage="croc")
    model = CrocLlavaForConditionalGeneration(tiny_config(**croc.recipes.recipe_config("victor")))
    model.set_stage("projector" | "croc" | "finetune")       # sets requires_grad
    optimizer = torch.optim.AdamW(model.trainable_parameters())
    out = model(input_ids, attention_mask, pixel_values, labels, segment_ids=None, position_ids=None)
    out.loss, out.lm_loss, out.recon_loss, out.logits, out.pool_cols
    model.generate(input_ids=..., attention_mask=..., pixel_values=..., max_new_tokens=...)

Importing it registers the ``"croc_mixed"`` attention (:mod:`croc.integrations.transformers`).
"""

from croc.model.config import (
    ASSIGNMENT_SCOPES,
    ASSIGNMENTS,
    MASK_KINDS,
    POOL_INITS,
    RECON_HEADS,
    RECON_TOKENS,
    STAGES,
    CrocLlavaConfig,
)
from croc.model.losses import IGNORE_INDEX, ReconstructionHead, causal_lm_loss, reconstruction_loss
from croc.model.modeling import CrocLlavaForConditionalGeneration, CrocLlavaOutput, prefix_span_ids
from croc.model.tiny import TINY_IMAGE_TOKEN_ID, tiny_config

__all__ = [
    "ASSIGNMENTS",
    "ASSIGNMENT_SCOPES",
    "IGNORE_INDEX",
    "MASK_KINDS",
    "POOL_INITS",
    "RECON_HEADS",
    "RECON_TOKENS",
    "STAGES",
    "TINY_IMAGE_TOKEN_ID",
    "CrocLlavaConfig",
    "CrocLlavaForConditionalGeneration",
    "CrocLlavaOutput",
    "ReconstructionHead",
    "causal_lm_loss",
    "prefix_span_ids",
    "reconstruction_loss",
    "tiny_config",
]
