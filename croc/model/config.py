"""``CrocLlavaConfig``: a transformers ``LlavaConfig`` plus the Croc training fields."""

from __future__ import annotations

from transformers import AutoConfig, LlavaConfig

from croc.constants import ASSIGNMENTS, MASK_KINDS, POOL_INITS, STAGES
from croc.constants import ATTENTION_BACKENDS as _BACKENDS

__all__ = ["ASSIGNMENTS", "MASK_KINDS", "POOL_INITS", "STAGES", "CrocLlavaConfig", "visual_tokens_per_image"]


class CrocLlavaConfig(LlavaConfig):
    """LLaVA configuration with the Croc fields (all keyword arguments, saved in ``config.json``).

    Fields (besides everything ``LlavaConfig`` takes; ``image_seq_length`` must be the number of
    visual tokens per image, it sizes the reconstruction head's positions):
        stage: ``"projector"`` (stage 1: only the projector trains, causal LM loss),
            ``"croc"`` (stage 1.5: token replacement through the prompt pool, mixed attention,
            LM + reconstruction loss; projector, LLM, pool and head train) or ``"finetune"``
            (stage 2: projector + LLM train, causal LM loss). Default ``"croc"``.
        prompt_pool_size: pool tokens M (2048).
        replace_ratio: fraction of each image's visual tokens replaced by pool tokens (0.75).
        mask_kind: ``"image"`` (each image is one bidirectional span, text causal; the paper) or
            ``"prefix"`` (everything before the first supervised token, label != -100, is one
            bidirectional span; the released code).
        assignment: ``"hungarian"`` (one-to-one) or ``"nearest"`` pool assignment.
        pool_init: ``"normal"`` (randn, the paper) or ``"normalized"`` (unit-norm rows).
        recon_loss_weight: weight of the reconstruction loss (10.0).
        recon_beta: SmoothL1 beta of the reconstruction loss (0.01).
        attention_backend: backend of ``croc.mixed_attention`` in the LLM: ``"auto"``,
            ``"triton"`` or ``"reference"``.
        validate_masks: check mask layouts and image-token counts in forward (costs a few
            device-to-host syncs per step; turn off for speed once the data pipeline is trusted).
    """

    model_type = "croc_llava"

    stage: str = "croc"
    prompt_pool_size: int = 2048
    replace_ratio: float = 0.75
    mask_kind: str = "image"
    assignment: str = "hungarian"
    pool_init: str = "normal"
    recon_loss_weight: float = 10.0
    recon_beta: float = 0.01
    attention_backend: str = "auto"
    validate_masks: bool = True

    def __post_init__(self, **kwargs) -> None:
        super().__post_init__(**kwargs)
        for name, allowed in (
            ("stage", STAGES),
            ("mask_kind", MASK_KINDS),
            ("assignment", ASSIGNMENTS),
            ("pool_init", POOL_INITS),
            ("attention_backend", _BACKENDS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0.0 <= float(self.replace_ratio) <= 1.0:
            raise ValueError(f"replace_ratio must be in [0, 1], got {self.replace_ratio!r}")
        if int(self.prompt_pool_size) <= 0:
            raise ValueError(f"prompt_pool_size must be positive, got {self.prompt_pool_size!r}")
        if float(self.recon_beta) <= 0.0:
            raise ValueError(f"recon_beta must be positive, got {self.recon_beta!r}")


def visual_tokens_per_image(vision_config, feature_select_strategy: str = "default") -> int:
    """Visual tokens per image that a CLIP-like vision config feeds the LLM: its patches, plus CLS for "full"."""
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    return patches + (1 if feature_select_strategy == "full" else 0)


AutoConfig.register(CrocLlavaConfig.model_type, CrocLlavaConfig, exist_ok=True)
