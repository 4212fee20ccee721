""" "croc_mixed" reads transformers' own masks (packing by position_ids, sliding windows, Gemma-3 image
blocks) and equals "sdpa", through the reference backend and through the Triton kernels (the
interpreter on a CPU); a dispatch mode counts the ``croc::mixed_attention_*`` ops against SDPA calls,
so a silent dense fallback fails the test."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    DataCollatorWithFlattening,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    masking_utils,
)
from transformers.masking_utils import (
    and_masks,
    blockwise_overlay,
    causal_mask_function,
    or_masks,
    packed_sequence_mask_function,
    sdpa_mask,
    sliding_window_overlay,
)

import croc
import croc.integrations.transformers as integration
from croc.integrations.transformers import ATTN_IMPLEMENTATION
from croc.model.tiny import TINY_IMAGE_TOKEN_ID, tiny_config
from croc.ops.schedule import schedule_kind

VOCAB = 96
IMAGE = VOCAB - 1  # Gemma 3 image token id in the tiny configs
BACKENDS = ("reference", "triton")  # "triton" on CPU tensors: the interpreter (tests/conftest.py)
TOLERANCE = {"reference": 1e-5, "triton": 2e-4}  # the interpreter's fp32 dots vs SDPA's
TEXT_FIELDS = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, head_dim=64, vocab_size=VOCAB, max_position_embeddings=128,
)  # fmt: skip  # head_dim 64: a head size of the Triton kernels; 2 query heads on 1 KV head (GQA)
pytestmark = pytest.mark.matrix_integration


def _skip_without_triton(backend: str) -> None:
    if backend != "triton":
        return
    q = torch.randn(1, 1, 3, 64)
    try:
        croc.mixed_attention(q, q, q, croc.MixedMask.causal(1, 3), backend="triton")
    except (NotImplementedError, ValueError) as exc:
        pytest.skip(f"Triton kernels unavailable here: {exc}")


def _model(model_cls, config_cls, **extra):
    torch.manual_seed(0)
    return model_cls(config_cls(**TEXT_FIELDS, **extra)).eval()


class _AttentionOps(TorchDispatchMode):
    """Counts the croc kernel ops and the SDPA ops (any ``aten::*scaled_dot_product*``) dispatched."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("croc::mixed_attention"):
            self.counts[name] += 1
        elif "scaled_dot_product" in name:
            self.counts["sdpa"] += 1
        return func(*args, **(kwargs or {}))


def _text_layers(model) -> list:
    language_model = getattr(model.model, "language_model", model.model)
    return list(language_model.layers)


def _run(model, implementation, loss_positions=None, **inputs):
    """Logits, the first layer's q_proj gradient and the attention op counts of forward + backward."""
    model.set_attn_implementation(implementation)
    model.zero_grad()
    with _AttentionOps() as ops:
        logits = model(**inputs).logits
        kept = logits if loss_positions is None else logits[loss_positions]
        kept.pow(2).mean().backward()
    return logits.detach(), _text_layers(model)[0].self_attn.q_proj.weight.grad.clone(), ops.counts


def _assert_kernel_path(croc_calls, counts, backend, layers):
    assert len(croc_calls) == layers, "croc path not taken in every attention layer (dense fallback)"
    if backend == "triton":
        assert counts["croc::mixed_attention_fwd"] == layers
        assert counts["croc::mixed_attention_bwd"] == layers
        assert counts["sdpa"] == 0, "an attention layer ran SDPA next to the kernels"


def _assert_same(model, croc_calls, backend, valid=None, croc=ATTN_IMPLEMENTATION, sdpa="sdpa", **inputs):
    """croc_mixed (``backend``) equals sdpa on logits (at ``valid``) and on the gradient, kernel path taken."""
    _skip_without_triton(backend)
    expected = _run(model, sdpa, valid, **inputs)
    got = _run(model, croc, valid, croc_backend=backend, **inputs)
    _assert_kernel_path(croc_calls, got[2], backend, len(_text_layers(model)))
    valid = slice(None) if valid is None else valid
    tol = TOLERANCE[backend]
    torch.testing.assert_close(got[0][valid], expected[0][valid], atol=tol, rtol=tol)
    torch.testing.assert_close(got[1], expected[1], atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "lengths, backend",
    [((5, 7, 4), "reference"), ((16,), "reference"), ((1, 9, 6), "reference"), ((5, 7, 4), "triton")],
)
def test_llama_packed_by_data_collator_with_flattening(croc_calls, lengths, backend):
    model = _model(LlamaForCausalLM, LlamaConfig)
    g = torch.Generator().manual_seed(1)
    features = [{"input_ids": torch.randint(0, VOCAB, (n,), generator=g).tolist()} for n in lengths]
    batch = DataCollatorWithFlattening(return_tensors="pt")(features)
    assert "attention_mask" not in batch
    inputs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    _assert_same(model, croc_calls, backend, **inputs)
    mask = croc_calls[0]
    assert mask.monotone and schedule_kind(mask, "auto") == "range"
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0)[:-1].tolist()])
    assert torch.equal(mask.kv_start[0].unique(), starts.to(torch.int32)), "documents not separated"


SLIDING_MODELS = {
    "mistral": (MistralForCausalLM, MistralConfig, {}),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, {"use_sliding_window": True, "max_window_layers": 0}),
}


@pytest.mark.parametrize(
    "name, padding, backend",
    [
        *[("mistral", padding, "reference") for padding in ("none", "left", "right")],
        ("qwen2", "right", "reference"), ("mistral", "left", "triton"), ("qwen2", "right", "triton"),
    ],
)  # fmt: skip
def test_sliding_window_shorter_than_the_sequence(croc_calls, name, padding, backend):
    model_cls, config_cls, extra = SLIDING_MODELS[name]
    model = _model(model_cls, config_cls, sliding_window=4, **extra)
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones(2, 13, dtype=torch.long)
    if padding == "left":
        attention_mask[1, :3] = 0
    elif padding == "right":
        attention_mask[1, 9:] = 0
    valid = attention_mask.bool()
    _assert_same(model, croc_calls, backend, valid, input_ids=ids, attention_mask=attention_mask)
    assert all(int((m.kv_end - m.kv_start).max()) == 4 for m in croc_calls), "window not applied"
    assert all(m.monotone for m in croc_calls)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gemma3_text_sliding_and_global_layers_with_padding(croc_calls, backend):
    model = _model(
        Gemma3ForCausalLM, Gemma3TextConfig, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[0, :2] = 0
    _assert_same(
        model, croc_calls, backend, attention_mask.bool(), input_ids=ids, attention_mask=attention_mask
    )
    assert [int((m.kv_end - m.kv_start).max()) for m in croc_calls[:2]] == [4, 12]
    assert all(m.monotone for m in croc_calls)


def _gemma3_multimodal():
    torch.manual_seed(0)
    text = Gemma3TextConfig(
        **TEXT_FIELDS, sliding_window=4, layer_types=["sliding_attention", "full_attention"]
    )
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=28, patch_size=7,
    )  # fmt: skip  # 4 x 4 patches pooled to 4 image tokens
    config = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=IMAGE,
        boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2,
    )  # fmt: skip
    return Gemma3ForConditionalGeneration(config).eval()


# two rows of 16 tokens; image tokens (4 per image) at these positions
GEMMA3_LAYOUTS = {
    "padded": ([[2, 9], [6]], [0, 3], None),  # row 1 left-padded by 3
    "packed": ([[2, 11]], None, [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6, 7, 8]),  # 2 docs of 7 + 9
}


def _gemma3_batch(layout):
    image_starts, padding, positions = GEMMA3_LAYOUTS[layout]
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, VOCAB - 4, (len(image_starts), 16), generator=gen)
    for row, starts in enumerate(image_starts):
        for start in starts:
            ids[row, start : start + 4] = IMAGE
    inputs = dict(input_ids=ids, token_type_ids=(ids == IMAGE).long(), use_cache=False)
    inputs["pixel_values"] = torch.randn(sum(map(len, image_starts)), 3, 28, 28, generator=gen)
    valid = torch.ones_like(ids, dtype=torch.bool)
    if padding is not None:
        attention_mask = torch.ones_like(ids)
        for row, left in enumerate(padding):
            attention_mask[row, :left] = 0
        valid = attention_mask.bool()
        inputs["attention_mask"] = attention_mask
    if positions is not None:
        inputs["position_ids"] = torch.tensor([positions])
    return inputs, valid


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", sorted(GEMMA3_LAYOUTS))
def test_gemma3_multimodal_images_padding_sliding_and_global_layers(croc_calls, layout, backend):
    """Gemma3ForConditionalGeneration: its image blocks (token_type_ids) on sliding and global layers.
    The SigLIP tower runs eager in both runs, so every SDPA op counted would be a text layer's."""
    model = _gemma3_multimodal()
    inputs, valid = _gemma3_batch(layout)
    implementations = {
        impl: {"text_config": impl, "vision_config": "eager"} for impl in ("sdpa", ATTN_IMPLEMENTATION)
    }
    _assert_same(
        model, croc_calls, backend, valid, croc=implementations[ATTN_IMPLEMENTATION],
        sdpa=implementations["sdpa"], **inputs,
    )  # fmt: skip
    sliding, full = croc_calls[:2]
    assert int((full.kv_end - full.kv_start).max()) > 4, "image block not seen on the global layer"
    assert sliding.monotone and full.monotone


def test_llava_with_croc_mask_equals_sdpa_with_the_dense_mask(croc_calls):
    """LLaVA given a croc_mask (image spans bidirectional, one row right-padded) against sdpa handed
    the same mask as a dense 4-D attention_mask; padding queries see themselves there (no NaN).
    The Triton kernels only: the reference backend with croc_mask is tests/test_model.py's."""
    _skip_without_triton("triton")
    config = tiny_config()
    torch.manual_seed(1)
    model = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=config.vision_config.to_dict(), text_config=config.text_config.to_dict(),
            image_token_id=TINY_IMAGE_TOKEN_ID, image_seq_length=16, vision_feature_layer=-1,
        )
    ).eval()  # fmt: skip
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(10, 256, (2, 24), generator=gen)
    ids[0, 2:18], ids[1, 5:21] = TINY_IMAGE_TOKEN_ID, TINY_IMAGE_TOKEN_ID
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 22:] = 0
    valid = attention_mask.bool()
    mask = croc.MixedMask.from_image_mask(ids == TINY_IMAGE_TOKEN_ID, attention_mask)
    dense = mask.to_dense() | (torch.eye(24, dtype=torch.bool) & ~valid[:, :, None])
    pixel_values = torch.randn(2, 3, 16, 16, generator=gen)
    common = dict(input_ids=ids, pixel_values=pixel_values, use_cache=False)
    got = _run(
        model, {"text_config": ATTN_IMPLEMENTATION, "vision_config": "eager"}, valid,
        attention_mask=attention_mask, croc_mask=mask, croc_backend="triton", **common,
    )  # fmt: skip
    _assert_kernel_path(croc_calls, got[2], "triton", 2)
    expected = _run(
        model,
        {"text_config": "sdpa", "vision_config": "eager"},
        valid,
        attention_mask=dense[:, None],
        **common,
    )
    tol = TOLERANCE["triton"]
    torch.testing.assert_close(got[0][valid], expected[0][valid], atol=tol, rtol=tol)
    torch.testing.assert_close(got[1], expected[1], atol=tol, rtol=tol)


def test_inexpressible_mask_function_falls_back_to_the_dense_mask(caplog):
    def holes(batch_idx, head_idx, q_idx, kv_idx):
        return (kv_idx % 2 == 0) | (kv_idx == q_idx)

    kwargs = dict(batch_size=1, q_length=6, kv_length=6, mask_function=holes, allow_is_causal_skip=False)
    with caplog.at_level("WARNING", logger="croc.integrations.transformers"):
        resolved = integration.croc_mixed_mask(**kwargs).resolve()
    assert torch.equal(resolved, sdpa_mask(**kwargs))
    assert "dense SDPA mask" in caplog.text


def test_padding_holes_fall_back_and_stay_correct():
    kwargs = dict(
        batch_size=1, q_length=5, kv_length=5, attention_mask=torch.tensor([[1, 0, 1, 1, 1]]).bool()
    )
    resolved = integration.croc_mixed_mask(allow_is_causal_skip=False, **kwargs).resolve()
    assert torch.equal(resolved, sdpa_mask(allow_is_causal_skip=False, **kwargs))


def _block_ids(token_type: torch.Tensor) -> torch.Tensor:
    """Gemma 3's block_sequence_ids: one id per run of image tokens (counted along the row), text -1."""
    starts = (token_type == 1) & ~torch.nn.functional.pad(token_type == 1, (1, 0))[:, :-1]
    return torch.where(token_type == 1, starts.cumsum(1) - 1, -1)


def _gemma3_image_mask_functions(token_type):
    """The mask functions the installed transformers composes for Gemma 3 (create_masks_for_vision_model),
    unpacked and packed (two documents). transformers 5.2x remaps positions in packed rows: the sliding
    layer's blocks are read at the remapped positions, the global layer's at the absolute ones; 5.17
    ANDs the packed mask (the global layer's image blocks ORed outside it)."""
    block_ids = _block_ids(token_type)
    causal_blocks = or_masks(causal_mask_function, blockwise_overlay(block_ids))
    sliding = and_masks(causal_blocks, sliding_window_overlay(3))
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]]).expand(len(token_type), -1)
    packed = packed_sequence_mask_function(torch.tensor([[0] * 5 + [1] * 7]).expand(len(token_type), -1))
    remap = getattr(masking_utils, "remap_positions_for_packed_sequence", None)  # transformers >= 5.2x
    if remap is None:
        packed_full = or_masks(and_masks(causal_mask_function, packed), blockwise_overlay(block_ids))
        packed_sliding = and_masks(sliding, packed)
    else:
        packed_full = and_masks(
            or_masks(remap(causal_mask_function, positions), blockwise_overlay(block_ids)), packed
        )
        packed_sliding = and_masks(remap(sliding, positions), packed)
    return {
        "full": causal_blocks,
        "sliding": sliding,
        "packed-full": packed_full,
        "packed-sliding": packed_sliding,
    }


@pytest.mark.parametrize("kind", ["full", "sliding", "packed-full", "packed-sliding"])
def test_gemma3_image_blocks_equal_transformers_dense_mask(kind):
    """The masks Gemma 3 builds from token_type_ids (blockwise overlay, with and without its window,
    packed or not): key intervals (monotone, so the range schedule) equal to transformers' dense mask."""
    token_type = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0]])
    attention_mask = torch.ones(2, 12, dtype=torch.bool)
    attention_mask[1, 10:] = False
    kwargs = dict(
        batch_size=2, q_length=12, kv_length=12, attention_mask=attention_mask, allow_is_causal_skip=False
    )
    fn = _gemma3_image_mask_functions(token_type)[kind]
    resolved = integration.croc_mixed_mask(mask_function=fn, **kwargs).resolve()
    assert isinstance(resolved, croc.MixedMask)
    assert resolved.monotone
    assert torch.equal(resolved.to_dense(), sdpa_mask(mask_function=fn, **kwargs)[:, 0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_non_monotone_layout_keeps_the_index_schedule_and_matches(backend):
    """Causal text whose flagged queries see every key (``causal | flag[q] >= 1``): one interval per
    query, but a flagged query's end (L) exceeds the next causal query's, so the mask is not
    monotone: flagged False, the kernels take the index schedule, and the result still matches."""
    _skip_without_triton(backend)
    flag = torch.zeros(2, 20, dtype=torch.long)
    flag[0, 3], flag[1, 9:12] = 1, 1

    def prefix_queries(batch_idx, head_idx, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (flag[batch_idx, q_idx] >= 1)

    kwargs = dict(
        batch_size=2, q_length=20, kv_length=20, mask_function=prefix_queries, allow_is_causal_skip=False
    )
    mask = integration.croc_mixed_mask(**kwargs).resolve()
    assert isinstance(mask, croc.MixedMask) and not mask.monotone
    assert schedule_kind(mask, "auto") == "index"
    dense = sdpa_mask(**kwargs)[:, 0]
    assert torch.equal(mask.to_dense(), dense)
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 2, 20, 64, generator=gen, requires_grad=True) for _ in range(3))
    out = croc.mixed_attention(q, k, v, mask, backend=backend)
    grads = torch.autograd.grad(out.pow(2).sum(), (q, k, v))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None])
    expected_grads = torch.autograd.grad(expected.pow(2).sum(), (q, k, v))
    tol = TOLERANCE[backend]
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def _family_mask_kwargs(family: str) -> dict:
    """``sdpa_mask`` kwargs of one mask family over two rows of 12 tokens (row 1 right-padded)."""
    token_type = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0]])
    attention_mask = torch.ones(2, 12, dtype=torch.bool)
    attention_mask[1, 10:] = False
    if family in ("causal", "window"):
        fn = (
            causal_mask_function
            if family == "causal"
            else and_masks(causal_mask_function, sliding_window_overlay(2))
        )
    elif family == "non-monotone":
        fn = or_masks(
            causal_mask_function, lambda b, h, q, kv: token_type[b, q] >= 1
        )  # flagged queries see all
    else:
        fn = _gemma3_image_mask_functions(token_type)[family]
    return dict(
        batch_size=2, q_length=12, kv_length=12, mask_function=fn, attention_mask=attention_mask,
        allow_is_causal_skip=False,
    )  # fmt: skip


# family: (known without the data, monotone). In packed rows the causal part of the union with the
# blocks is cut at the documents (transformers 5.2x remaps positions inside both layers' unions, 5.17
# only in the global one), no longer the causal | blocks shape: the data decide
_REMAPS = hasattr(masking_utils, "remap_positions_for_packed_sequence")
MONOTONE = {
    "causal": (True, True), "window": (True, True), "full": (True, True), "sliding": (True, True),
    "packed-sliding": (not _REMAPS, True), "packed-full": (False, True), "non-monotone": (False, False),
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(MONOTONE))
def test_monotone_flag_is_exact_per_mask_family(family):
    """The flag the kernels' schedule follows: known statically (what torch.compile gets, where the
    data cannot be looked at) for and-compositions and causal | image blocks, else read from the data
    in the builder's one sync; it always equals the data's truth (MixedMask's own check)."""
    kwargs = _family_mask_kwargs(family)
    static, expected = MONOTONE[family]
    known = integration.CausalPaddingMask._intervals(kwargs)[2]
    assert known == static
    mask = integration.croc_mixed_mask(**kwargs).resolve()
    assert isinstance(mask, croc.MixedMask) and mask.monotone == expected
    checked = croc.MixedMask.from_intervals(mask.kv_start, mask.kv_end, mask.num_keys)  # validates
    assert checked.monotone == expected
    assert torch.equal(mask.to_dense(), sdpa_mask(**kwargs)[:, 0])


@pytest.mark.parametrize(
    "croc_mask, match",
    [
        (croc.MixedMask.causal(1, 6), "croc_mask has 1 rows, but this attention call has batch 2"),
        (croc.MixedMask.causal(2, 8), "croc_mask covers 8 queries x 8 keys"),
    ],
)
def test_croc_mask_that_does_not_fit_the_call_is_a_value_error(croc_mask, match):
    model = _model(LlamaForCausalLM, LlamaConfig)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    with pytest.raises(ValueError, match=match):
        model(input_ids=torch.zeros(2, 6, dtype=torch.long), croc_mask=croc_mask)


def test_attention_dropout_on_the_croc_path_is_a_value_error():
    model = _model(LlamaForCausalLM, LlamaConfig, attention_dropout=0.1).train()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    with pytest.raises(ValueError, match=r"no attention dropout; got dropout=0\.1"):
        model(input_ids=torch.zeros(2, 6, dtype=torch.long))


def test_croc_mask_on_a_sliding_window_layer_is_a_value_error():
    model = _model(MistralForCausalLM, MistralConfig, sliding_window=4)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    with pytest.raises(ValueError, match="sliding-window attention layer"):
        model(input_ids=torch.zeros(2, 6, dtype=torch.long), croc_mask=croc.MixedMask.causal(2, 6))
