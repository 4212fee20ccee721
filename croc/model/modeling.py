"""``CrocLlavaForConditionalGeneration``: transformers' LLaVA with the three Croc training stages.

The text model always runs the ``"croc_mixed"`` attention (equal to ``"sdpa"`` without a
``croc_mask``); the vision tower keeps its own attention. What a forward does depends on
``config.stage`` (switch with :meth:`CrocLlavaForConditionalGeneration.set_stage`):

- ``"projector"`` / ``"finetune"``: plain causal LLaVA (packed rows kept apart by ``segment_ids``).
- ``"croc"``: with ``labels`` (training or evaluation of the Croc objective), a random
  ``replace_ratio`` of every image's visual tokens (the projector outputs) is replaced through
  the prompt pool; the LLM attends with the mixed mask (image spans, or the prompt prefix,
  bidirectional; text causal); the reconstruction head maps the last hidden states at the image
  positions to predictions of the L2-normalised original visual tokens (projector outputs,
  detached). ``loss = lm_loss + recon_loss_weight * recon_loss``. Without ``labels`` (generation)
  nothing is replaced: the prefill uses the mixed mask, decoding steps are causal over the cache.

Inputs follow LLaVA: ``input_ids`` hold ``config.image_token_id`` once per visual token, one run
per image, ``pixel_values`` [I, 3, H, W] (or a list of I images of different sizes) hold the I
images in the order their tokens appear (row-major over the batch); a row may hold several
images. Images may have different numbers of visual tokens (:mod:`croc.model.ragged`), up to
``config.max_image_tokens``. The recipe fields of the config (:mod:`croc.recipes`) choose the
mask (``mask_kind``), the pool assignment and its scope (per image or per sample), whether visual
tokens are L2-normalised before the LLM, the reconstruction head and the tokens it covers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from transformers import LlavaForConditionalGeneration
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

import croc.integrations.transformers as croc_transformers
from croc.mask import MixedMask
from croc.model.config import STAGES, CrocLlavaConfig
from croc.model.losses import IGNORE_INDEX, ReconstructionHead, causal_lm_loss, reconstruction_loss
from croc.model.ragged import (
    ImageLayout,
    image_layout,
    image_runs,
    image_runs_match,
    random_selection,
    sample_groups,
)
from croc.pool import PromptTokenPool, random_replace_mask

__all__ = ["CrocLlavaForConditionalGeneration", "CrocLlavaOutput", "prefix_span_ids"]

_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _install_output_hooks(module: torch.nn.Module) -> None:
    """Install transformers' output-capturing hooks (``output_hidden_states``) now. transformers
    installs them on a model's first such call, under a ``threading.Lock`` that torch.compile
    cannot trace: a graph break in the first compiled step, and a recompile after it."""
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # a transformers without it captures outputs some other way
        return
    maybe_install_capturing_hooks(module)


@dataclass
class CrocLlavaOutput(CausalLMOutputWithPast):
    """Causal LM output (``loss``, ``logits`` [B, L', V], the KV cache, ``hidden_states``,
    ``attentions`` as in transformers) plus:

    Attributes:
        lm_loss: float32 scalar, next-token cross entropy (None without labels).
        recon_loss: float32 scalar, unweighted SmoothL1 reconstruction loss (stage "croc" with
            labels and images; None otherwise). ``loss = lm_loss + recon_loss_weight * recon_loss``.
        pool_cols: int64 [I, T], the pool token that replaced each visual token, -1 where kept
            (stage "croc" with labels and images; None otherwise).
    """

    lm_loss: torch.Tensor | None = None
    recon_loss: torch.Tensor | None = None
    pool_cols: torch.Tensor | None = None


class _Embedded(NamedTuple):
    """Inputs of the text model: embeds [B, L, H]; with images also image_mask bool [B, L],
    image_index int64 [sum of tokens] (flat image positions), visual [I, W, H] (original
    projector outputs, padded), pool_cols int64 [I, W] (or None when nothing was replaced) and
    the layout of the I images' tokens in their W slots."""

    embeds: torch.Tensor
    image_mask: torch.Tensor | None = None
    image_index: torch.Tensor | None = None
    visual: torch.Tensor | None = None
    pool_cols: torch.Tensor | None = None
    layout: ImageLayout | None = None


def _segment_cumsum(values: torch.Tensor, segment_ids: torch.Tensor | None) -> torch.Tensor:
    """int64 [B, L]: inclusive running sum of ``values`` restarted where ``segment_ids`` changes."""
    total = values.to(torch.int64).cumsum(dim=1)
    if segment_ids is None:
        return total
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    before = total - values.to(torch.int64)
    offset = torch.where(starts, before, torch.zeros_like(before)).cummax(dim=1).values
    return total - offset


def prefix_span_ids(
    attention_mask: torch.Tensor,
    segment_ids: torch.Tensor | None,
    labels: torch.Tensor | None,
    image_mask: torch.Tensor,
) -> torch.Tensor:
    """int64 [B, L] span ids of the "prefix" mask: one bidirectional span per document.

    With labels the prefix of a document is its valid tokens before its first supervised token
    (label != -100); without labels (generation) it runs through the document's last image token.
    """
    valid = attention_mask != 0
    if labels is not None:
        inside = _segment_cumsum(labels != IGNORE_INDEX, segment_ids) == 0
    else:
        flip_seg = None if segment_ids is None else segment_ids.flip(1)
        inside = _segment_cumsum(image_mask.flip(1), flip_seg).flip(1) > 0
    seg = torch.zeros_like(valid, dtype=torch.int64) if segment_ids is None else segment_ids.to(torch.int64)
    return torch.where(valid & inside, seg, torch.full_like(seg, -1))


class CrocLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA with a prompt token pool, a reconstruction head and the Croc stages.

    Construct from a :class:`CrocLlavaConfig`, or load any local LLaVA checkpoint with
    ``CrocLlavaForConditionalGeneration.from_pretrained(path, stage="croc", ...)`` (Croc fields
    as keyword arguments; the pool and head are initialised fresh when the checkpoint lacks them).

    Attributes:
        prompt_pool: :class:`croc.PromptTokenPool` [prompt_pool_size, text hidden].
        reconstruction_head: :class:`ReconstructionHead` text hidden -> text hidden.
    """

    config_class = CrocLlavaConfig
    config: CrocLlavaConfig

    def __init__(self, config: CrocLlavaConfig) -> None:
        super().__init__(config)
        hidden = config.text_config.hidden_size
        self.prompt_pool = PromptTokenPool(
            config.prompt_pool_size, hidden, init=config.pool_init, assignment=config.assignment
        )
        self.reconstruction_head = ReconstructionHead(
            hidden, hidden, config.image_token_capacity, kind=config.recon_head
        )
        self.post_init()
        self.set_attn_implementation({"text_config": croc_transformers.ATTN_IMPLEMENTATION})
        self.set_stage(config.stage)
        _install_output_hooks(self.model.vision_tower)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> CrocLlavaForConditionalGeneration:
        """transformers' ``from_pretrained``, then :meth:`set_stage` again (loading replaces the
        parameters, which resets ``requires_grad``)."""
        model = super().from_pretrained(*args, **kwargs)
        model.set_stage(model.config.stage)
        return model

    @classmethod
    def from_llava(
        cls, llava: LlavaForConditionalGeneration, **croc_fields: Any
    ) -> CrocLlavaForConditionalGeneration:
        """A Croc model holding a copy of an in-memory LLaVA model's weights (fresh pool and head).

        Args:
            llava: a transformers ``LlavaForConditionalGeneration`` (any device and dtype; the result
                is moved to the device and dtype of its first parameter).
            **croc_fields: :class:`CrocLlavaConfig` fields (``stage``, ``mask_kind``, ...).
        """
        fields = {k: v for k, v in llava.config.to_dict().items() if k not in ("model_type", "architectures")}
        model = cls(CrocLlavaConfig(**{**fields, **croc_fields}))
        missing, unexpected = model.load_state_dict(llava.state_dict(), strict=False)
        fresh = ("prompt_pool.", "reconstruction_head.")
        if unexpected or any(not key.startswith(fresh) for key in missing):
            raise ValueError(
                f"llava does not match the Croc model: missing {missing}, unexpected {unexpected}"
            )
        first = next(llava.parameters())
        return model.to(device=first.device, dtype=first.dtype)

    def _init_weights(self, module: torch.nn.Module) -> None:
        if isinstance(module, PromptTokenPool):
            if not getattr(module.tokens, "_is_hf_initialized", False):
                module.reset_parameters()
            return
        super()._init_weights(module)

    # ------------------------------------------------------------------ stages
    def set_stage(self, stage: str) -> None:
        """Switch the training stage and set which parameters train (``requires_grad``).

        ``"projector"``: the projector only. ``"croc"``: projector, LLM (with ``lm_head``), prompt
        pool and reconstruction head. ``"finetune"``: projector and LLM. The vision tower trains in
        "croc" and "finetune" only with ``config.train_vision_tower``.
        """
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.config.stage = stage
        training = {
            "projector": (self.model.multi_modal_projector,),
            "croc": (
                self.model.multi_modal_projector,
                self.model.language_model,
                self.lm_head,
                self.prompt_pool,
                self.reconstruction_head,
            ),
            "finetune": (self.model.multi_modal_projector, self.model.language_model, self.lm_head),
        }[stage]
        if self.config.train_vision_tower and stage != "projector":
            training = (*training, self.model.vision_tower)
        self.requires_grad_(False)
        for module in training:
            module.requires_grad_(True)

    @staticmethod
    def create_masks_for_generate(
        attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor | None:
        """What ``generate()`` with a static cache hands the forward as ``attention_mask``: the 2D
        padding mask itself (int/bool [B, L so far]), not masks prepared ahead, because the forward
        builds the prefill's mixed mask from it; decoding steps then build theirs as with any cache."""
        return attention_mask

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the current stage trains (``requires_grad``), for the optimizer."""
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ pieces
    def visual_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projector outputs [I, T, text hidden] of images ``pixel_values`` [I, 3, H, W] (any size
        the tower's patches divide: positions are interpolated at other sizes), L2-normalised
        with ``config.normalize_visual``."""
        vision = self.model.vision_tower
        size = self.config.vision_config.image_size
        other_size = tuple(pixel_values.shape[-2:]) != (size, size)
        extra = {"interpolate_pos_encoding": True} if other_size else {}
        out = vision(pixel_values.to(vision.dtype), output_hidden_states=True, **extra)
        layer = self.config.vision_feature_layer
        layers = [layer] if isinstance(layer, int) else list(layer)
        features = [out.hidden_states[i] for i in layers]
        if self.config.vision_feature_select_strategy == "default":
            features = [f[:, 1:] for f in features]
        projected = self.model.multi_modal_projector(torch.cat(features, dim=-1))
        return F.normalize(projected, dim=-1) if self.config.normalize_visual else projected

    def encode_images(
        self, pixel_values: torch.Tensor | list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[int]]:
        """Visual tokens of I images, padded: ([I, W, text hidden], tokens per image).

        ``pixel_values`` is float [I, 3, H, W] (every image gives the same number of tokens) or a
        list of I float [3, H_i, W_i] images of any sizes (dynamic resolution; images of one size
        are encoded together).
        """
        if isinstance(pixel_values, torch.Tensor):
            visual = self.visual_tokens(pixel_values)
            return visual, [visual.shape[1]] * visual.shape[0]
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(pixel_values):
            by_size.setdefault(tuple(image.shape), []).append(i)
        encoded: dict[int, torch.Tensor] = {}
        for images in by_size.values():
            tokens = self.visual_tokens(torch.stack([pixel_values[i] for i in images]))
            encoded.update(zip(images, tokens, strict=True))
        counts = [encoded[i].shape[0] for i in range(len(pixel_values))]
        first = encoded[0]
        visual = first.new_zeros(len(counts), max(counts), first.shape[-1])
        for i, tokens in encoded.items():
            visual[i, : tokens.shape[0]] = tokens
        return visual, counts

    def _image_positions(self, image_mask: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """int64 [sum(counts)]: flat indices of the image tokens of ``image_mask`` [B, L], in order.
        With ``validate_masks`` the runs of image tokens must match the images' token counts."""
        flat = image_mask.reshape(-1)
        total = sum(counts)
        if self.config.validate_masks and torch.compiler.is_compiling():  # no host sync, no graph break
            torch._assert_async(
                image_runs_match(image_mask, counts),
                "input_ids: the runs of image tokens do not match the images' visual token counts "
                "(run the step eagerly for the image and the counts)",
            )
        elif self.config.validate_masks:
            if int(flat.sum()) != total:
                raise ValueError(
                    f"input_ids hold {int(flat.sum())} image tokens but pixel_values give {total} visual tokens"
                )
            runs = image_runs(image_mask)
            if runs.numel() != len(counts):
                raise ValueError(
                    f"input_ids hold {runs.numel()} runs of image tokens but pixel_values give {len(counts)} "
                    "images (one run per image; separate adjacent images by a text token)"
                )
            wrong = (runs.cpu() != torch.tensor(counts, dtype=torch.int64)).nonzero()
            if wrong.numel():
                i = int(wrong[0, 0])
                raise ValueError(
                    f"image {i}: input_ids hold {int(runs[i])} image tokens but the vision tower gives {counts[i]}"
                )
        return (~flat).to(torch.int8).argsort(stable=True)[:total]

    def _croc_mask(
        self,
        image_mask: torch.Tensor,
        attention_mask: torch.Tensor,
        segment_ids: torch.Tensor | None,
        labels: torch.Tensor | None,
        mixed: bool,
    ) -> MixedMask:
        validate = bool(self.config.validate_masks)
        if not mixed or self.config.mask_kind == "causal":
            causal = torch.full_like(image_mask, -1, dtype=torch.int64)
            return MixedMask.from_spans(causal, attention_mask, segment_ids, validate=validate)
        if self.config.mask_kind == "image":
            return MixedMask.from_image_mask(image_mask, attention_mask, segment_ids, validate=validate)
        spans = prefix_span_ids(attention_mask, segment_ids, labels, image_mask)
        return MixedMask.from_spans(spans, attention_mask, segment_ids, validate=validate)

    def _attention_masks(
        self,
        image_mask: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        segment_ids: torch.Tensor | None,
        labels: torch.Tensor | None,
        inputs_embeds: torch.Tensor,
    ) -> tuple[torch.Tensor | None, MixedMask | None]:
        """The (2D padding mask, croc_mask) the text model gets.

        A ``croc_mask`` is built for stage "croc" with images (mixed), for packed rows and for
        training steps (labels given; causal), so that only ``validate_masks`` decides the host
        syncs. Otherwise (generation, decoding steps) the ``"croc_mixed"`` mask builder makes the
        causal-with-padding mask from ``attention_mask`` and the KV cache.
        """
        mixed = self.config.stage == "croc" and image_mask is not None
        if not (mixed or segment_ids is not None or labels is not None):
            return attention_mask, None
        shape, device = inputs_embeds.shape[:2], inputs_embeds.device
        if attention_mask is None:
            attention_mask = torch.ones(shape, dtype=torch.long, device=device)
        if image_mask is None:
            image_mask = torch.zeros(shape, dtype=torch.bool, device=device)
        return attention_mask, self._croc_mask(image_mask, attention_mask, segment_ids, labels, mixed)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        replace_mask: torch.Tensor | None = None,
        croc_mask: MixedMask | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CrocLlavaOutput:
        """One step of the current stage.

        Args:
            input_ids: int64 [B, L] with ``image_token_id`` at the visual tokens.
            attention_mask: optional int/bool [B, L(+cache)], 0 at padding (left or right).
            pixel_values: optional float [I, 3, H, W], one image per run of image tokens, or a list
                of I float [3, H_i, W_i] images of different sizes (each run of image tokens then
                as long as that image's visual tokens; see :meth:`encode_images`).
            labels: optional int64 [B, L], -100 where nothing is predicted (shifted inside).
            segment_ids: optional int [B, L] packed-document ids (pass ``position_ids`` restarting
                at every document too); documents never see each other and no target crosses them.
            position_ids: optional int64 [B, L].
            inputs_embeds: optional float [B, L, H] instead of ``input_ids`` (then no images).
            replace_mask: optional bool [I, W] choosing the replaced tokens (stage "croc" with
                labels; W the most visual tokens of an image); default ``replace_ratio`` of every
                image's tokens, picked at random.
            croc_mask: optional MixedMask [B, L] overriding the mask the stage would build.
            logits_to_keep: compute logits of the last N positions only (0 = all; needs 0 with labels).
            **kwargs: passed to the text model (``past_key_values``/``cache``, ``use_cache`` (default
                False when labels are given), ``output_hidden_states``, ...); ``num_items_in_batch``
                goes to the LM loss; ``sequence_parallel`` (a ``croc.train.sequence_parallel.SequenceParallel``)
                makes this a sequence-parallel training step over the full (unsplit) batch.

        Returns:
            :class:`CrocLlavaOutput` with ``loss``, ``lm_loss``, ``recon_loss``, ``logits``, ...
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if pixel_values is not None and input_ids is None:
            raise ValueError("pixel_values need input_ids (image token positions)")
        if labels is not None and logits_to_keep:
            raise ValueError("logits_to_keep must be 0 when labels are given")
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        sequence_parallel = kwargs.pop("sequence_parallel", None)
        if sequence_parallel is not None:  # croc.train.sequence_parallel: this rank's chunk of the rows
            return sequence_parallel.forward(
                self, input_ids=input_ids, labels=labels, attention_mask=attention_mask,
                pixel_values=pixel_values, segment_ids=segment_ids, position_ids=position_ids,
                replace_mask=replace_mask,
            )  # fmt: skip
        if labels is not None:
            kwargs.setdefault("use_cache", False)  # no KV cache to build while training
        croc_objective = self.config.stage == "croc" and labels is not None and pixel_values is not None
        embedded = self._embed(
            input_ids, inputs_embeds, pixel_values, replace_mask, croc_objective, segment_ids
        )
        if croc_mask is None:
            attention_mask, croc_mask = self._attention_masks(
                embedded.image_mask, attention_mask, segment_ids, labels, embedded.embeds
            )
        if croc_mask is not None:
            kwargs["croc_mask"] = croc_mask
        lm_out = self.model.language_model(
            inputs_embeds=embedded.embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            croc_backend=self.config.attention_backend,
            **kwargs,
        )
        hidden_states = lm_out.last_hidden_state
        logits = self.lm_head(hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states)
        recon_loss = None
        lm_loss = None if labels is None else causal_lm_loss(logits, labels, segment_ids, num_items_in_batch)
        loss = lm_loss
        if croc_objective:
            recon_loss = self._reconstruction_loss(hidden_states, embedded)
            loss = lm_loss + self.config.recon_loss_weight * recon_loss
        fields = {
            "loss": loss,
            "logits": logits,
            _CACHE_FIELD: getattr(lm_out, _CACHE_FIELD, None),
            "hidden_states": lm_out.hidden_states,
            "attentions": lm_out.attentions,
        }
        return CrocLlavaOutput(**fields, lm_loss=lm_loss, recon_loss=recon_loss, pool_cols=embedded.pool_cols)

    def _embed(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        pixel_values: torch.Tensor | list[torch.Tensor] | None,
        replace_mask: torch.Tensor | None,
        replace: bool,
        segment_ids: torch.Tensor | None = None,
    ) -> _Embedded:
        """Token embeddings with the (possibly pool-replaced) visual tokens at the image positions."""
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is None:
            return _Embedded(inputs_embeds)
        visual, counts = self.encode_images(pixel_values)
        hidden = visual.shape[-1]
        layout = image_layout(counts, visual.device)
        image_mask = input_ids == self.config.image_token_id
        image_index = self._image_positions(image_mask, counts)
        original, pool_cols = visual, None
        if replace:
            visual, pool_cols = self._replace(
                visual, layout, replace_mask, image_index, input_ids.shape[1], segment_ids
            )
        tokens = visual.reshape(-1, hidden)
        if not layout.uniform:
            tokens = tokens.index_select(0, layout.flat_valid)
        flat = inputs_embeds.reshape(-1, hidden).index_copy(0, image_index, tokens.to(inputs_embeds.dtype))
        return _Embedded(flat.view_as(inputs_embeds), image_mask, image_index, original, pool_cols, layout)

    def _reconstruction_loss(self, hidden_states: torch.Tensor, embedded: _Embedded) -> torch.Tensor:
        """SmoothL1 of the head's predictions at the image positions against the original visual
        tokens: all of an image's tokens, or only the replaced ones (``recon_tokens``)."""
        layout = embedded.layout
        num_images, width, _ = embedded.visual.shape
        flat = hidden_states.reshape(-1, hidden_states.shape[-1]).index_select(0, embedded.image_index)
        valid = None
        if not layout.uniform:
            slots = flat.new_zeros(num_images * width, flat.shape[-1])
            flat, valid = slots.index_copy(0, layout.flat_valid, flat), layout.valid
        prediction = self.reconstruction_head(flat.view(num_images, width, -1), valid)
        counted = valid
        if self.config.recon_tokens == "replaced":
            counted = embedded.pool_cols >= 0
        return reconstruction_loss(prediction, embedded.visual, self.config.recon_beta, counted)

    def _replace(
        self,
        visual: torch.Tensor,
        layout: ImageLayout,
        replace_mask: torch.Tensor | None,
        image_index: torch.Tensor,
        seq_len: int,
        segment_ids: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Visual tokens [I, W, H] with the chosen ones replaced through the pool, and the pool
        columns [I, W]: one assignment per image or per sample (``assignment_scope``)."""
        num_images, width, _ = visual.shape
        count = None
        if replace_mask is None and layout.uniform:
            count = round(float(self.config.replace_ratio) * width)
            replace_mask = random_replace_mask(
                num_images, width, self.config.replace_ratio, device=visual.device
            )
        elif replace_mask is None:
            replace_mask = random_selection(layout, self.config.replace_ratio, visual.device)
        elif not layout.uniform:
            replace_mask = replace_mask & layout.valid
        if self.config.assignment_scope == "image":
            return self.prompt_pool(visual, replace_mask, num_replaced=count)
        return self._replace_per_sample(visual, layout, replace_mask, image_index, seq_len, segment_ids)

    def _replace_per_sample(
        self,
        visual: torch.Tensor,
        layout: ImageLayout,
        replace_mask: torch.Tensor,
        image_index: torch.Tensor,
        seq_len: int,
        segment_ids: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pool assignment per sample over the replaced tokens of all its images (one
        batched solve for the whole batch; rows = samples, ragged)."""
        num_images, width, hidden = visual.shape
        groups = sample_groups(image_index, layout, seq_len, segment_ids)
        slots = [[i * width + t for i in images for t in range(layout.counts[i])] for _, images in groups]
        row_width = max((len(row) for row in slots), default=0)
        gather = torch.tensor([row + [0] * (row_width - len(row)) for row in slots], dtype=torch.int64)
        used = torch.tensor([[k < len(row) for k in range(row_width)] for row in slots], dtype=torch.bool)
        gather, used = (
            gather.to(visual.device).view(len(slots), row_width),
            used.to(visual.device).view(len(slots), -1),
        )
        flat_visual = visual.reshape(-1, hidden)
        rows_mask = replace_mask.reshape(-1)[gather] & used
        if self.config.assignment == "hungarian":
            self._check_sample_counts(rows_mask, groups)
        new_rows, row_cols = self.prompt_pool(flat_visual[gather], rows_mask)
        targets, sources = gather[used], used.reshape(-1).nonzero().squeeze(1)
        new_visual = flat_visual.index_copy(0, targets, new_rows.reshape(-1, hidden)[sources])
        cols = torch.full((num_images * width,), -1, dtype=torch.int64, device=visual.device)
        cols = cols.index_copy(0, targets, row_cols.reshape(-1)[sources])
        return new_visual.view_as(visual), cols.view(num_images, width)

    def _check_sample_counts(self, rows_mask: torch.Tensor, groups: list[tuple[str, list[int]]]) -> None:
        pool_size = self.prompt_pool.num_tokens
        for (name, images), count in zip(groups, rows_mask.sum(dim=1).tolist(), strict=True):
            if count > pool_size:
                raise ValueError(
                    f"sample at {name} replaces {count} visual tokens over its {len(images)} image(s), more "
                    f"than the prompt pool's {pool_size} tokens: a per-sample Hungarian assignment "
                    "(assignment_scope='sample') needs at most one replaced token per pool token; use "
                    "assignment='nearest', assignment_scope='image', a larger pool or a smaller replace_ratio"
                )


# Checkpoints keep LLaVA's key layout: loading a LLaVA checkpoint (and saving ours) applies the
# same key renamings as LlavaForConditionalGeneration does.
register_checkpoint_conversion_mapping(
    CrocLlavaForConditionalGeneration.__name__, get_checkpoint_conversion_mapping("llava"), overwrite=True
)
