"""torch.compile of whole models with "croc_mixed" (tiny Llama, Mistral, the Croc LLaVA stage "croc"),
and generate() with a static cache (Llama, Gemma 3 text, Croc LLaVA); tiny configs, CPU.

Compiled with the ``aot_eager`` backend: dynamo's graph capture and AOT autograd's joint graph, as
inductor gets them, without inductor's C++ code generation (minutes on a 2-core CPU). A recording
backend keeps the captured graphs, so each test can count the attention calls croc made in them (a
silent fallback to transformers' SDPA path fails). ``fullgraph=True`` fails on any graph break and
``error_on_recompile`` on any recompilation when a new batch differs only in its layout.
"""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.backends.debugging import aot_eager
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from croc import PromptTokenPool
from croc.integrations.transformers import ATTN_IMPLEMENTATION
from croc.model import TINY_IMAGE_TOKEN_ID, CrocLlavaForConditionalGeneration, tiny_config
from croc.model.ragged import image_runs, image_runs_match

VOCAB = 96
LENGTH = 32
IMAGE_TOKENS = 16  # tiny_config: 16x16 images, patch 4
pytestmark = pytest.mark.matrix_integration


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch (no cache entries of another test's closures)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class RecordingBackend:
    """``aot_eager`` that keeps the FX graphs dynamo captured."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __deepcopy__(self, memo):  # transformers' CompileConfig.to_dict deep-copies its backend
        return self

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs.append(gm)
        return aot_eager(gm, example_inputs)

    def croc_attention_calls(self) -> int:
        """Attention calls croc made in the graphs: its Triton custom op, or the SDPA inside its reference backend."""
        count = 0
        for gm in self.graphs:
            for node in gm.graph.nodes:
                trace = node.meta.get("stack_trace") or ""
                if node.op != "call_function":
                    continue
                if node.target is torch.ops.croc.mixed_attention_fwd.default or (
                    node.target is F.scaled_dot_product_attention and "reference_attention.py" in trace
                ):
                    count += 1
        return count


def _text_model(name: str = "llama"):
    """A tiny causal LM: Llama, Mistral (sliding window 8) or Gemma 3 text (a sliding layer of
    window 4, then a global one); head_dim 64 (a size the Triton kernels take), 2 query heads on
    1 KV head (GQA)."""
    torch.manual_seed(0)
    model_cls, config_cls, extra = TEXT_MODELS[name]
    config = config_cls(
        hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, vocab_size=VOCAB, max_position_embeddings=128,
        pad_token_id=0, **extra,
    )  # fmt: skip
    return model_cls(config)


TEXT_MODELS = {
    "llama": (LlamaForCausalLM, LlamaConfig, {}),
    "mistral": (MistralForCausalLM, MistralConfig, {"sliding_window": 8}),
    "gemma3": (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
    ),
}


def _packed(lengths):
    """position_ids [2, LENGTH] restarting at every document (DataCollatorWithFlattening's layout), no mask."""
    positions = torch.cat([torch.arange(n) for n in lengths])
    return {"position_ids": positions[None].expand(2, -1), "attention_mask": None}


def _padded(left, right):
    """attention_mask [2, LENGTH]: row 0 left-padded by ``left`` tokens, row 1 right-padded by ``right``."""
    mask = torch.ones(2, LENGTH, dtype=torch.long)
    mask[0, :left] = 0
    mask[1, LENGTH - right :] = 0
    return {"position_ids": None, "attention_mask": mask}


LAYOUTS = {
    "packing": [_packed((10, 12, 10)), _packed((5, 27)), _packed((32,))],
    "padding": [_padded(3, 5), _padded(0, 9), _padded(7, 0)],
}


def _logits_and_grads(step, model, *args):
    model.zero_grad()
    logits = step(*args)
    logits.pow(2).mean().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _assert_same(got, expected, tol):
    torch.testing.assert_close(got[0], expected[0], rtol=tol, atol=tol)
    assert got[1].keys() == expected[1].keys()
    for name, grad in expected[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize(
    ("name", "kind", "backend"),
    [
        ("llama", "packing", "reference"),
        ("llama", "padding", "reference"),
        ("mistral", "padding", "reference"),  # sliding window 8 < 32 tokens
        ("llama", "packing", "triton"),  # Triton kernels, interpreted: 2 layouts (it is slow)
    ],
)
def test_compiled_text_model_equals_eager_with_no_graph_break_and_no_recompile(name, kind, backend):
    """Forward and backward of a whole LM, one graph, compiled once for batches of new layouts."""
    model = _text_model(name)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    ids = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(1))

    def step(ids, position_ids, attention_mask):
        return model(
            input_ids=ids, position_ids=position_ids, attention_mask=attention_mask,
            use_cache=False, croc_backend=backend,
        ).logits  # fmt: skip

    recorder = RecordingBackend()
    compiled = torch.compile(step, backend=recorder, fullgraph=True)
    for i, layout in enumerate(LAYOUTS[kind][: 2 if backend == "triton" else None]):
        args = (ids, layout["position_ids"], layout["attention_mask"])
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = _logits_and_grads(compiled, model, *args)
        _assert_same(got, _logits_and_grads(step, model, *args), tol=1e-5)
    assert len(recorder.graphs) == 1
    assert recorder.croc_attention_calls() == model.config.num_hidden_layers, "croc path not compiled"


def test_compiled_padding_hole_is_an_error_not_a_recompile_or_a_wrong_mask():
    """The builder's data check (one contiguous run of valid tokens per row) is a device-side
    assert under compile: a padding hole (which eager mode sends to the dense SDPA mask) stops the
    compiled step with an error, without a host sync or a guard that would recompile."""
    model = _text_model().eval()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    ids = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(1))

    def step(ids, attention_mask):
        return model(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    holes = _padded(3, 5)["attention_mask"]
    holes[0, 10] = 0
    with torch.no_grad():
        compiled(ids, _padded(3, 5)["attention_mask"])
        with (
            torch._dynamo.config.patch(error_on_recompile=True),
            pytest.raises(RuntimeError, match="padding holes"),
        ):
            compiled(ids, holes)


def _croc_batch(image_starts, seed):
    """Two rows of LENGTH + 8 tokens, one image each at ``image_starts``; captions supervised from 30 on."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 256, (2, LENGTH + 8), generator=gen)
    for row, start in enumerate(image_starts):
        ids[row, start : start + IMAGE_TOKENS] = TINY_IMAGE_TOKEN_ID
    labels = ids.clone()
    labels[:, :30] = -100
    return ids, torch.ones_like(ids), torch.randn(2, 3, 16, 16, generator=gen), labels


@pytest.mark.parametrize(
    ("validate_masks", "given_replace_mask"),
    [(False, False), (True, True)],  # the random replace mask of training; one given, ragged per image
)
def test_compiled_croc_stage_equals_eager_with_no_graph_break_and_no_recompile(
    validate_masks, given_replace_mask
):
    """A Croc training step (pool replacement with Hungarian assignment, mixed mask, reconstruction
    loss) in one graph, compiled once for batches whose images sit elsewhere in the rows. Under
    compile the layout checks of ``validate_masks`` are device-side asserts and a given replace
    mask needs no host sync for its counts. The first step is compiled cold: the model installs
    transformers' output-capturing hooks at construction (transformers would on the first call,
    under a ``threading.Lock`` dynamo cannot trace: a graph break)."""
    torch.manual_seed(0)
    config = tiny_config("llama", stage="croc", validate_masks=validate_masks, attention_backend="reference")
    model = CrocLlavaForConditionalGeneration(config)
    replace_mask = None
    if given_replace_mask:
        replace_mask = torch.zeros(2, IMAGE_TOKENS, dtype=torch.bool)
        replace_mask[0, :12], replace_mask[1, 3:8] = True, True

    def step(ids, attention_mask, pixel_values, labels):
        return model(
            input_ids=ids, attention_mask=attention_mask, pixel_values=pixel_values, labels=labels,
            replace_mask=replace_mask,
        ).loss  # fmt: skip

    def loss_and_grads(fn, batch):
        model.zero_grad()
        torch.manual_seed(5)  # the same random replace mask in the eager and the compiled step
        loss = fn(*batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    recorder = RecordingBackend()
    compiled = torch.compile(step, backend=recorder, fullgraph=True)
    for i, starts in enumerate([(2, 10), (20, 0), (5, 6)]):
        batch = _croc_batch(starts, seed=i)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = loss_and_grads(compiled, batch)
        expected = loss_and_grads(step, batch)
        _assert_same(got, expected, tol=1e-5)
        assert {"prompt_pool.tokens", "reconstruction_head.output.weight"} <= got[1].keys()
    assert len(recorder.graphs) == 1
    assert recorder.croc_attention_calls() == config.text_config.num_hidden_layers, "croc path not compiled"


@pytest.mark.parametrize(
    ("starts", "counts"),
    [
        ([[1, 9]], [4, 4]),
        ([[1], [0]], [4, 4]),
        ([[1, 5]], [4, 4]),  # the two images touch: one run of 8
        ([[1, 9]], [4, 3]),
        ([[1, 9]], [4]),
        ([[1]], [4, 4]),
    ],
)
def test_image_runs_match_agrees_with_the_eager_check(starts, counts):
    """The compile-time image-token check (static shapes) says what the eager one (runs counted on the host) says."""
    image_mask = torch.zeros(len(starts), 16, dtype=torch.bool)
    for row, row_starts in enumerate(starts):
        for start in row_starts:
            image_mask[row, start : start + 4] = True
    eager = image_runs(image_mask).tolist() == counts
    assert bool(image_runs_match(image_mask, counts)) == eager
    assert eager == (starts in ([[1, 9]], [[1], [0]]) and counts == [4, 4])


@pytest.mark.parametrize("assignment", ["hungarian", "nearest"])
def test_compiled_pool_with_a_ragged_replace_mask_equals_eager(assignment):
    """PromptTokenPool with a given replace mask (rows selecting different counts): no host sync for
    the counts under compile (every row padded to all tokens), the same tokens, columns and gradients."""
    torch.manual_seed(0)
    pool = PromptTokenPool(num_tokens=8, dim=8, assignment=assignment)  # fewer pool tokens than row tokens
    tokens = torch.randn(3, 10, 8, requires_grad=True)
    replace_mask = torch.rand(3, 10, generator=torch.Generator().manual_seed(3)) < 0.5
    replace_mask[2] = False  # a row replacing nothing
    compiled = torch.compile(pool, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (pool, compiled):
        new_tokens, cols = fn(tokens, replace_mask)
        grads = torch.autograd.grad(new_tokens.pow(2).sum(), (tokens, pool.tokens))
        results.append((new_tokens.detach(), cols, *grads))
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert (results[1][1] >= 0).sum(dim=1).tolist() == replace_mask.sum(dim=1).tolist()


def _generate(model, implementation, **kwargs):
    model.set_attn_implementation(implementation)
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :4] = 0  # left padding
    out = model.generate(
        input_ids=ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, do_sample=False,
        pad_token_id=0, cache_implementation="static", output_scores=True, return_dict_in_generate=True,
        **kwargs,
    )  # fmt: skip
    return out.sequences, torch.stack(out.scores)


NEW_TOKENS = 6


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_static_cache_generation_equals_sdpa(croc_calls, name):
    """generate() with a static cache (fixed key length, empty slots, a tensor query offset; for
    Gemma 3 also a sliding layer's ring buffer of 4 slots) runs the croc kernels in the prefill and
    in every decoding step and gives sdpa's tokens and scores."""
    model = _text_model(name).eval()
    expected = _generate(model, "sdpa")
    got = _generate(model, ATTN_IMPLEMENTATION)
    layers = model.config.num_hidden_layers
    assert len(croc_calls) == NEW_TOKENS * layers, "croc path not taken"
    prefill, last = croc_calls[layers - 1], croc_calls[-1]  # the last layer (Gemma 3: its global one)
    assert (prefill.num_queries, prefill.num_keys) == (12, 12 + NEW_TOKENS - 1), "not a static cache"
    assert (last.num_queries, last.num_keys) == (1, 12 + NEW_TOKENS - 1)
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_static_cache_compiled_decoding_equals_sdpa_and_compiles_as_often(name):
    """What generate() does on a GPU with a static cache: the decoding forward compiled (fullgraph),
    here forced on the CPU. The padding mask croc keeps has the static cache's length, so the
    decoding steps share one graph as the sequence grows (Llama: one graph). Gemma 3 compiles twice
    with sdpa too: transformers guards on the sliding layer's ring buffer filling up."""
    from transformers.generation import CompileConfig

    model = _text_model(name).eval()
    results, recorders = {}, {}
    for implementation in ("sdpa", ATTN_IMPLEMENTATION):
        recorders[implementation] = RecordingBackend()
        compile_config = CompileConfig(backend=recorders[implementation], fullgraph=True, mode="default")
        compile_config._compile_all_devices = True  # compile on the CPU too (transformers' testing switch)
        results[implementation] = _generate(model, implementation, compile_config=compile_config)
    graphs = len(recorders[ATTN_IMPLEMENTATION].graphs)
    assert graphs == len(recorders["sdpa"].graphs), "croc_mixed recompiled where sdpa did not"
    assert name != "llama" or graphs == 1
    calls = recorders[ATTN_IMPLEMENTATION].croc_attention_calls()
    assert calls == graphs * model.config.num_hidden_layers, "croc path not compiled"
    got, expected = results[ATTN_IMPLEMENTATION], results["sdpa"]
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)


def test_croc_stage_static_cache_generation_equals_the_dynamic_cache():
    """The Croc LLaVA model builds its prefill's mixed mask from the 2D padding mask, which it also
    gets from generate() with a static cache (its create_masks_for_generate)."""
    torch.manual_seed(0)
    model = CrocLlavaForConditionalGeneration(tiny_config("llama", stage="croc")).eval()
    ids, attention_mask, pixel_values, _ = _croc_batch((2, 6), seed=7)
    attention_mask[0, :2] = 0  # left padding
    kwargs = dict(
        input_ids=ids, attention_mask=attention_mask, pixel_values=pixel_values, max_new_tokens=NEW_TOKENS,
        do_sample=False, suppress_tokens=[TINY_IMAGE_TOKEN_ID], output_scores=True, return_dict_in_generate=True,
    )  # fmt: skip
    dynamic = model.generate(**kwargs)
    static = model.generate(**kwargs, cache_implementation="static")
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(static.scores), torch.stack(dynamic.scores), rtol=1e-5, atol=1e-5)
