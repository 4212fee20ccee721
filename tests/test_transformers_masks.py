""" "croc_mixed" reads transformers' own masks (packing by position_ids, sliding windows) and equals "sdpa"."""

import pytest
import torch
from transformers import (
    DataCollatorWithFlattening,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

import croc
import croc.integrations.transformers as integration
from croc.integrations.transformers import ATTN_IMPLEMENTATION

VOCAB = 96
pytestmark = pytest.mark.matrix_integration


def _model(model_cls, config_cls, **extra):
    torch.manual_seed(0)
    config = config_cls(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=128, **extra,
    )  # fmt: skip
    return model_cls(config).eval()


@pytest.fixture
def croc_calls(monkeypatch):
    """Counts the calls that reach croc.mixed_attention (the real function still runs)."""
    calls = []
    real = integration.mixed_attention

    def counted(*args, **kwargs):
        calls.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(integration, "mixed_attention", counted)
    return calls


def _logits_and_grad(model, implementation, **inputs):
    model.set_attn_implementation(implementation)
    model.zero_grad()
    logits = model(**inputs).logits
    logits.pow(2).mean().backward()
    return logits.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()


def _assert_same(model, croc_calls, **inputs):
    expected = _logits_and_grad(model, "sdpa", **inputs)
    got = _logits_and_grad(model, ATTN_IMPLEMENTATION, **inputs)
    assert len(croc_calls) == model.config.num_hidden_layers, "croc path not taken in every layer"
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lengths", [(5, 7, 4), (16,), (1, 9, 6)])
def test_llama_packed_by_data_collator_with_flattening(croc_calls, lengths):
    model = _model(LlamaForCausalLM, LlamaConfig)
    g = torch.Generator().manual_seed(1)
    features = [{"input_ids": torch.randint(0, VOCAB, (n,), generator=g).tolist()} for n in lengths]
    batch = DataCollatorWithFlattening(return_tensors="pt")(features)
    assert "attention_mask" not in batch
    _assert_same(
        model, croc_calls, input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
    )
    mask = croc_calls[0]
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0)[:-1].tolist()])
    assert torch.equal(mask.kv_start[0].unique(), starts.to(torch.int32)), "documents not separated"


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_mistral_sliding_window_shorter_than_the_sequence(croc_calls, padding):
    model = _model(MistralForCausalLM, MistralConfig, sliding_window=4)
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones(2, 13, dtype=torch.long)
    if padding == "left":
        attention_mask[1, :3] = 0
    elif padding == "right":
        attention_mask[1, 9:] = 0
    valid = attention_mask.bool()
    expected = _logits_and_grad(model, "sdpa", input_ids=ids, attention_mask=attention_mask)
    got = _logits_and_grad(model, ATTN_IMPLEMENTATION, input_ids=ids, attention_mask=attention_mask)
    assert len(croc_calls) == 2
    width = croc_calls[0].kv_end - croc_calls[0].kv_start
    assert int(width.max()) == 4
    torch.testing.assert_close(got[0][valid], expected[0][valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-5)


def test_inexpressible_mask_function_falls_back_to_the_dense_mask(croc_calls, caplog):
    from transformers.masking_utils import sdpa_mask

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
    from transformers.masking_utils import sdpa_mask

    resolved = integration.croc_mixed_mask(allow_is_causal_skip=False, **kwargs).resolve()
    assert torch.equal(resolved, sdpa_mask(allow_is_causal_skip=False, **kwargs))


def test_gemma3_text_sliding_and_global_layers_with_padding(croc_calls):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=128,
        sliding_window=4, layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    model = Gemma3ForCausalLM(config).eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[0, :2] = 0
    valid = attention_mask.bool()
    expected = _logits_and_grad(model, "sdpa", input_ids=ids, attention_mask=attention_mask)
    got = _logits_and_grad(model, ATTN_IMPLEMENTATION, input_ids=ids, attention_mask=attention_mask)
    assert len(croc_calls) == 2
    widths = [int((m.kv_end - m.kv_start).max()) for m in croc_calls]
    assert widths == [4, 12]
    torch.testing.assert_close(got[0][valid], expected[0][valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-5)


def _gemma3_image_mask_functions(block_ids):
    from transformers.masking_utils import (
        and_masks,
        blockwise_overlay,
        causal_mask_function,
        or_masks,
        sliding_window_overlay,
    )

    full = or_masks(causal_mask_function, blockwise_overlay(block_ids))
    return {"full": full, "sliding": and_masks(full, sliding_window_overlay(3))}


@pytest.mark.parametrize("kind", ["full", "sliding"])
def test_gemma3_image_blocks_equal_transformers_dense_mask(kind):
    """The masks Gemma 3 builds from token_type_ids (blockwise overlay, with and without its window)."""
    from transformers.masking_utils import sdpa_mask

    token_type = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0]])
    starts = (token_type == 1) & ~torch.nn.functional.pad(token_type == 1, (1, 0))[:, :-1]
    block_ids = torch.where(token_type == 1, starts.cumsum(1) - 1, -1)
    attention_mask = torch.ones(2, 12, dtype=torch.bool)
    attention_mask[1, 10:] = False
    kwargs = dict(
        batch_size=2, q_length=12, kv_length=12, attention_mask=attention_mask, allow_is_causal_skip=False
    )
    fn = _gemma3_image_mask_functions(block_ids)[kind]
    resolved = integration.croc_mixed_mask(mask_function=fn, **kwargs).resolve()
    assert isinstance(resolved, croc.MixedMask)
    assert torch.equal(resolved.to_dense(), sdpa_mask(mask_function=fn, **kwargs)[:, 0])
