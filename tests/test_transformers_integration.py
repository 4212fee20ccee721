"""The "croc_mixed" transformers attention against "sdpa" and explicit dense masks (tiny LMs, CPU)."""

import inspect

import pytest
import torch
from mask_cases import dense_rule
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import croc
from croc.integrations.transformers import ATTN_IMPLEMENTATION, causal_padding_mask

VOCAB = 96
TEXT_MODELS = {
    "llama": (LlamaForCausalLM, LlamaConfig, 4),  # 4 KV heads: plain multi-head attention
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, 2),  # 2 KV heads for 4 query heads: GQA
}


def _model(name: str, head_dim: int = 16):
    model_cls, config_cls, kv_heads = TEXT_MODELS[name]
    torch.manual_seed(0)
    config = config_cls(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=VOCAB,
        max_position_embeddings=128,
    )
    return model_cls(config).eval()


def _logits(model, implementation: str, **inputs) -> torch.Tensor:
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(**inputs).logits


PADDINGS = {
    "none": [[1] * 11, [1] * 11],
    "left": [[0, 0, 0] + [1] * 8, [1] * 11],
    "right": [[1] * 11, [1] * 7 + [0] * 4],
}


@pytest.mark.matrix_integration
@pytest.mark.parametrize("padding", sorted(PADDINGS))
@pytest.mark.parametrize("name", sorted(TEXT_MODELS))
def test_croc_mixed_equals_sdpa_without_and_with_causal_croc_mask(name, padding):
    model = _model(name)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.tensor(PADDINGS[padding])
    expected = _logits(model, "sdpa", input_ids=ids, attention_mask=attention_mask)
    got = _logits(model, ATTN_IMPLEMENTATION, input_ids=ids, attention_mask=attention_mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    causal = croc.MixedMask.from_spans(torch.full_like(ids, -1), attention_mask)
    valid = attention_mask.bool()
    with_mask = _logits(
        model, ATTN_IMPLEMENTATION, input_ids=ids, attention_mask=attention_mask, croc_mask=causal
    )
    torch.testing.assert_close(with_mask[valid], expected[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(TEXT_MODELS))
def test_padding_holes_fall_back_to_the_dense_sdpa_mask(name):
    model = _model(name)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1, 1]])
    expected = _logits(model, "sdpa", input_ids=ids, attention_mask=attention_mask)
    got = _logits(model, ATTN_IMPLEMENTATION, input_ids=ids, attention_mask=attention_mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _spans_layout():
    """Two rows of 12 tokens with image spans; row 1 is right-padded. Span ids int64 [2, 12]."""
    span_ids = torch.full((2, 12), -1)
    span_ids[0, 2:6] = 0
    span_ids[0, 7:10] = 1
    span_ids[1, 0:5] = 0
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[1, 10:] = 0
    return span_ids, attention_mask


@pytest.mark.parametrize("name", sorted(TEXT_MODELS))
def test_image_spans_equal_an_explicit_dense_mask(name):
    model = _model(name)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    span_ids, attention_mask = _spans_layout()
    mask = croc.MixedMask.from_spans(span_ids, attention_mask)
    got = _logits(model, ATTN_IMPLEMENTATION, input_ids=ids, attention_mask=attention_mask, croc_mask=mask)
    dense = dense_rule(span_ids, attention_mask)
    dense |= torch.eye(12, dtype=torch.bool) & ~attention_mask.bool()[:, :, None]  # padding rows: no NaN
    expected = _logits(model, "sdpa", input_ids=ids, attention_mask=dense[:, None])
    valid = attention_mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=1e-5)
    causal = _logits(model, "sdpa", input_ids=ids, attention_mask=attention_mask)
    assert not torch.allclose(got[valid], causal[valid], atol=1e-3)


def _cache_kwarg(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(output):
    return output.get("cache", None) or output.get("past_key_values", None)


@pytest.mark.parametrize("whole_mask_while_decoding", [False, True])
@pytest.mark.parametrize("name", sorted(TEXT_MODELS))
def test_kv_cache_decoding_matches_the_full_forward(name, whole_mask_while_decoding):
    model = _model(name)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    ids = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(4))
    image = torch.zeros(2, 14, dtype=torch.bool)
    image[:, 3:9] = True
    full_mask = croc.MixedMask.from_image_mask(image)
    prefill = croc.MixedMask.from_image_mask(image[:, :10])
    with torch.no_grad():
        expected = model(input_ids=ids, croc_mask=full_mask).logits
        first = model(input_ids=ids[:, :10], croc_mask=prefill, use_cache=True)
        cache = {_cache_kwarg(model): _cache_of(first)}
        step = model(input_ids=ids[:, 10:11], use_cache=True, **cache)
        chunk_mask = {"croc_mask": full_mask} if whole_mask_while_decoding else {}
        chunk = model(input_ids=ids[:, 11:14], use_cache=True, **cache, **chunk_mask)
    torch.testing.assert_close(first.logits, expected[:, :10], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step.logits[:, 0], expected[:, 10], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunk.logits, expected[:, 11:14], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padding", sorted(PADDINGS))
@pytest.mark.parametrize(("q_length", "kv_length"), [(11, 11), (1, 11), (3, 11), (4, 13)])
def test_causal_padding_mask_equals_the_dense_causal_padding_rule(padding, q_length, kv_length):
    attention_mask = torch.tensor(PADDINGS[padding]).bool()
    q_offset = 11 - q_length
    mask = causal_padding_mask(2, q_length, kv_length, q_offset, 0, attention_mask)
    valid = torch.nn.functional.pad(attention_mask, (0, kv_length - 11))
    query_pos = torch.arange(q_length)[:, None] + q_offset
    expected = valid[:, None, :] & (torch.arange(kv_length)[None, :] <= query_pos)[None]
    assert mask.num_keys == kv_length
    assert torch.equal(mask.to_dense(), expected)


@pytest.mark.parametrize(
    ("croc_mask", "error", "match"),
    [
        ("not a mask", TypeError, "croc_mask must be a croc.MixedMask"),
        (croc.MixedMask.causal(2, 4), ValueError, "croc_mask covers 4 queries"),
    ],
)
def test_bad_croc_mask_is_rejected(croc_mask, error, match):
    model = _model("llama")
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    with pytest.raises(error, match=match):
        model(input_ids=torch.zeros(2, 6, dtype=torch.long), croc_mask=croc_mask)


def _triton_unavailable_reason() -> str | None:
    q = torch.randn(1, 1, 3, 64)
    try:
        croc.mixed_attention(q, q, q, croc.MixedMask.causal(1, 3), backend="triton")
    except NotImplementedError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("name", sorted(TEXT_MODELS))
def test_triton_path_under_the_interpreter_equals_the_reference_path(name):
    reason = _triton_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    model = _model(name, head_dim=64)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    span_ids, attention_mask = _spans_layout()
    mask = croc.MixedMask.from_spans(span_ids, attention_mask)
    valid = attention_mask.bool()
    results = {}
    for backend in ("reference", "triton"):
        model.zero_grad()
        logits = model(
            input_ids=ids, attention_mask=attention_mask, croc_mask=mask, croc_backend=backend
        ).logits
        logits[valid].pow(2).mean().backward()
        results[backend] = (
            logits.detach()[valid],
            model.model.layers[0].self_attn.q_proj.weight.grad.clone(),
        )
    torch.testing.assert_close(results["triton"][0], results["reference"][0], atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(results["triton"][1], results["reference"][1], atol=2e-4, rtol=2e-4)
