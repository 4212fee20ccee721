"""``croc init``: build the stage-1 starting checkpoint from a language model and a CLIP vision tower.

LLaVA starts from two separate pretrained models (e.g. Vicuna-7B and CLIP ViT-L/14-336). This
writes one ``CrocLlavaForConditionalGeneration`` checkpoint folder holding both (the projector,
prompt pool and reconstruction head freshly initialised), the tokenizer with ``<image>`` added,
and the CLIP image processor, ready for ``croc train --stage projector --model_name_or_path DIR``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AddedToken,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
)

from croc.data import IMAGE_TOKEN, build_image_processor

__all__ = ["compose_checkpoint"]


def _tokenizer_with_image_token(path: str):
    tokenizer = AutoTokenizer.from_pretrained(path)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token  # LLaVA pads Vicuna with <unk>
    return tokenizer


def _cast_and_declare(model, dtype: torch.dtype) -> None:
    """Cast every tensor of ``model`` to ``dtype`` and declare it in its config and sub-configs (the
    sub-models are built in their own configs' dtype, whatever the default dtype)."""
    model.to(dtype)
    for config in (model.config, model.config.text_config, model.config.vision_config):
        config.dtype = dtype


def compose_checkpoint(
    language_model: str,
    vision_tower: str,
    output_dir: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    vision_feature_layer: int = -2,
    **croc_fields,
) -> Path:
    """Write a CrocLlava checkpoint (stage "projector") combining two local pretrained models.

    Args:
        language_model: folder of a causal LM (Llama/Vicuna or Qwen2) with its tokenizer.
        vision_tower: folder of a CLIP (or CLIP vision) model; its image processor is copied if present.
        output_dir: where the checkpoint, tokenizer and image processor are written.
        dtype: dtype of every written tensor, declared as ``dtype`` in the written config (and its
            text and vision sub-configs). ``croc train`` trains in the dtype its own arguments say.
        vision_feature_layer: CLIP layer fed to the projector (LLaVA: -2, the penultimate).
        **croc_fields: CrocLlavaConfig fields (``prompt_pool_size``, ``replace_ratio``, ...).
    Returns:
        ``output_dir`` as a Path.
    """
    from croc.model import CrocLlavaConfig, CrocLlavaForConditionalGeneration
    from croc.model.config import visual_tokens_per_image

    tokenizer = _tokenizer_with_image_token(language_model)
    vision_config = CLIPVisionConfig.from_pretrained(vision_tower)
    config = CrocLlavaConfig(
        vision_config=vision_config,
        text_config=AutoConfig.from_pretrained(language_model),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=visual_tokens_per_image(vision_config),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
        **{"stage": "projector", **croc_fields},
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = CrocLlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    llm = AutoModelForCausalLM.from_pretrained(language_model, dtype=dtype)
    model.model.language_model.load_state_dict(llm.get_decoder().state_dict())
    model.lm_head.load_state_dict(llm.get_output_embeddings().state_dict())
    del llm
    tower = CLIPVisionModel.from_pretrained(vision_tower, dtype=dtype)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    del tower
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    _cast_and_declare(model, dtype)
    out = Path(output_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    try:
        from transformers import AutoImageProcessor

        image_processor = AutoImageProcessor.from_pretrained(vision_tower)
    except OSError:
        image_processor = build_image_processor(vision_config.image_size)
    image_processor.save_pretrained(out)
    return out
