"""``CrocLlavaConfig``: a transformers ``LlavaConfig`` plus the Croc training fields."""

from __future__ import annotations

from transformers import AutoConfig, LlavaConfig

from croc.recipes import RECIPE_NAMES

__all__ = [
    "ASSIGNMENTS",
    "ASSIGNMENT_SCOPES",
    "MASK_KINDS",
    "POOL_INITS",
    "RECON_HEADS",
    "RECON_TOKENS",
    "STAGES",
    "CrocLlavaConfig",
    "visual_tokens_per_image",
]

STAGES = ("projector", "croc", "finetune")
MASK_KINDS = ("image", "prefix", "causal")
ASSIGNMENTS = ("hungarian", "nearest")
ASSIGNMENT_SCOPES = ("image", "sample")
POOL_INITS = ("normal", "normalized")
RECON_HEADS = ("transformer", "linear")
RECON_TOKENS = ("all", "replaced")
_LEARNING_RATES = ("pool_lr", "projector_lr", "vision_tower_lr", "llm_lr")
_BACKENDS = ("auto", "triton", "reference")


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
        mask_kind: attention of stage "croc": ``"image"`` (each image is one bidirectional span,
            text causal; the paper), ``"prefix"`` (everything before the first supervised token,
            label != -100, is one bidirectional span; the released Croc code) or ``"causal"``
            (plain causal attention; the released ViCToR code).
        assignment: ``"hungarian"`` (one-to-one) or ``"nearest"`` pool assignment (the released
            Croc code).
        assignment_scope: ``"image"`` (one Hungarian problem per image: the paper) or
            ``"sample"`` (one problem per sample over the replaced tokens of all its images: the
            released ViCToR code; a sample replacing more tokens than the pool holds is a
            ValueError naming it, unless ``assignment="nearest"``).
        normalize_visual: L2-normalise every visual token (projector output) before it enters the
            LLM, in every stage (both released codes). Default False (the paper).
        recon_head: ``"transformer"`` (one encoder layer with learned positions, then a linear
            layer: the paper) or ``"linear"`` (one linear layer: the released ViCToR code).
        recon_tokens: which image positions the reconstruction loss covers: ``"all"`` (every
            visual token, replaced or kept; today's default and the released Croc code) or
            ``"replaced"`` (only the tokens the pool replaced).
        max_image_tokens: most visual tokens one image may have (sizes the reconstruction
            head's learned positions); default ``image_seq_length``. Images with fewer tokens
            (dynamic resolution) use the first positions.
        train_vision_tower: the vision tower trains too in stages "croc" and "finetune" (the
            released ViCToR code). Default False.
        pool_lr, projector_lr, vision_tower_lr, llm_lr: learning rates of the parameter groups
            ``croc train`` builds (prompt pool; projector; vision tower; LLM with lm_head and the
            reconstruction head); None: the Trainer's ``learning_rate``.
        recipe: name of the recipe the fields came from (:mod:`croc.recipes`), or ``"custom"``;
            informational, recorded in the saved config.
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
    assignment_scope: str = "image"
    normalize_visual: bool = False
    recon_head: str = "transformer"
    recon_tokens: str = "all"
    max_image_tokens: int | None = None
    train_vision_tower: bool = False
    pool_lr: float | None = None
    projector_lr: float | None = None
    vision_tower_lr: float | None = None
    llm_lr: float | None = None
    recipe: str = "paper"
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
            ("assignment_scope", ASSIGNMENT_SCOPES),
            ("recon_head", RECON_HEADS),
            ("recon_tokens", RECON_TOKENS),
            ("pool_init", POOL_INITS),
            ("attention_backend", _BACKENDS),
            ("recipe", (*RECIPE_NAMES, "custom")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0.0 <= float(self.replace_ratio) <= 1.0:
            raise ValueError(f"replace_ratio must be in [0, 1], got {self.replace_ratio!r}")
        if int(self.prompt_pool_size) <= 0:
            raise ValueError(f"prompt_pool_size must be positive, got {self.prompt_pool_size!r}")
        if float(self.recon_beta) <= 0.0:
            raise ValueError(f"recon_beta must be positive, got {self.recon_beta!r}")
        if self.max_image_tokens is not None and int(self.max_image_tokens) <= 0:
            raise ValueError(f"max_image_tokens must be positive or None, got {self.max_image_tokens!r}")
        for name in _LEARNING_RATES:
            value = getattr(self, name)
            if value is not None and float(value) <= 0.0:
                raise ValueError(f"{name} must be positive or None, got {value!r}")

    @property
    def image_token_capacity(self) -> int:
        """Most visual tokens per image: ``max_image_tokens``, default ``image_seq_length``."""
        return int(self.max_image_tokens or self.image_seq_length)


def visual_tokens_per_image(vision_config, feature_select_strategy: str = "default") -> int:
    """Visual tokens per image that a CLIP-like vision config feeds the LLM: its patches, plus CLS for "full"."""
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    return patches + (1 if feature_select_strategy == "full" else 0)


AutoConfig.register(CrocLlavaConfig.model_type, CrocLlavaConfig, exist_ok=True)
