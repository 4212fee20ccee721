"""``tiny_config``: a small random Croc LLaVA configuration for tests and demos, built offline."""

from __future__ import annotations

from typing import Any

from transformers import CLIPVisionConfig, LlamaConfig, Qwen2Config

from croc.model.config import CrocLlavaConfig, visual_tokens_per_image

__all__ = ["TINY_IMAGE_TOKEN_ID", "tiny_config"]

TINY_IMAGE_TOKEN_ID = 3
_TEXT_CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config}


def tiny_config(
    text_model: str = "llama",
    text_overrides: dict[str, Any] | None = None,
    vision_overrides: dict[str, Any] | None = None,
    **overrides: Any,
) -> CrocLlavaConfig:
    """A CrocLlavaConfig small enough for CPU tests: CLIP 16x16 images, 16 visual tokens, 2+2 layers.

    Args:
        text_model: ``"llama"`` (4 heads, 4 KV heads) or ``"qwen2"`` (4 heads, 2 KV heads: GQA);
            hidden size 64 and head_dim 64 (a head size the Triton kernels support).
        text_overrides, vision_overrides: fields of the text / CLIP vision configs to change.
        **overrides: CrocLlavaConfig fields (``stage``, ``mask_kind``, ``prompt_pool_size``, ...).

    Image tokens use id :data:`TINY_IMAGE_TOKEN_ID` (3); the vocabulary has 256 ids, pad id 0.
    With the default patch size 4 and image size 16, each image gives 16 visual tokens (CLS
    dropped), and ``image_seq_length`` is set accordingly.
    """
    if text_model not in _TEXT_CONFIGS:
        raise ValueError(f"text_model must be one of {tuple(_TEXT_CONFIGS)}, got {text_model!r}")
    vision_fields = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
        projection_dim=32,
    )
    vision_fields.update(vision_overrides or {})
    text_fields = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2 if text_model == "qwen2" else 4,
        head_dim=64,
        vocab_size=256,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    text_fields.update(text_overrides or {})
    vision = CLIPVisionConfig(**vision_fields)
    fields: dict[str, Any] = dict(
        image_token_id=TINY_IMAGE_TOKEN_ID,
        image_seq_length=visual_tokens_per_image(vision),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        prompt_pool_size=64,
    )
    fields.update(overrides)
    return CrocLlavaConfig(
        vision_config=vision, text_config=_TEXT_CONFIGS[text_model](**text_fields), **fields
    )
