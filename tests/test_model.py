"""croc.model: the three stages of CrocLlavaForConditionalGeneration on tiny random models (CPU)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mask_cases import dense_rule
from scipy.optimize import linear_sum_assignment
from transformers import LlavaConfig, LlavaForConditionalGeneration

import croc
from croc.model import (
    TINY_IMAGE_TOKEN_ID,
    CrocLlavaConfig,
    CrocLlavaForConditionalGeneration,
    causal_lm_loss,
    prefix_span_ids,
    tiny_config,
)

IMAGE_TOKENS = 16  # tiny_config: 16x16 images, patch 4


def _model(text_model="llama", **overrides):
    torch.manual_seed(0)
    return CrocLlavaForConditionalGeneration(tiny_config(text_model, **overrides))


def _batch(seed=0, length=24, image_starts=(2, 4), prompt_end=20):
    """Two rows, one image each (at ``image_starts``), captions supervised from ``prompt_end`` on."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 256, (2, length), generator=gen)
    for row, start in enumerate(image_starts):
        ids[row, start : start + IMAGE_TOKENS] = TINY_IMAGE_TOKEN_ID
    labels = ids.clone()
    labels[:, :prompt_end] = -100
    pixel_values = torch.randn(2, 3, 16, 16, generator=gen)
    return ids, torch.ones_like(ids), pixel_values, labels


def test_text_model_runs_croc_mixed_and_vision_keeps_its_attention():
    model = _model("qwen2")
    assert model.config.text_config._attn_implementation == "croc_mixed"
    assert model.config.vision_config._attn_implementation != "croc_mixed"
    text = model.config.text_config
    assert text.num_key_value_heads < text.num_attention_heads  # the Qwen2 option is GQA


@pytest.mark.parametrize(
    ("text_model", "assignment", "pool_init"),
    [("llama", "hungarian", "normal"), ("qwen2", "nearest", "normalized")],
)
def test_croc_stage_gradients_reach_pool_projector_llm_and_head(text_model, assignment, pool_init):
    model = _model(text_model, stage="croc", assignment=assignment, pool_init=pool_init)
    assert (model.prompt_pool.assignment, model.prompt_pool.init) == (assignment, pool_init)
    out = model(*_batch())
    assert out.loss is not None and out.lm_loss is not None and out.recon_loss is not None
    out.loss.backward()
    for name in (
        "prompt_pool.tokens",
        "model.multi_modal_projector.linear_1.weight",
        "model.language_model.layers.0.self_attn.q_proj.weight",
        "model.language_model.layers.1.mlp.down_proj.weight",
        "lm_head.weight",
        "reconstruction_head.output.weight",
    ):
        grad = model.get_parameter(name).grad
        assert grad is not None and float(grad.abs().sum()) > 0, name
    assert all(p.grad is None for p in model.model.vision_tower.parameters())
    used = out.pool_cols[out.pool_cols >= 0].unique()
    unused = torch.ones(model.prompt_pool.num_tokens, dtype=torch.bool)
    unused[used] = False
    assert bool((model.prompt_pool.tokens.grad[unused] == 0).all())


@pytest.mark.parametrize(
    ("stage", "trains", "frozen"),
    [
        ("projector", ["model.multi_modal_projector"], ["model.language_model", "lm_head", "prompt_pool"]),
        (
            "croc",
            ["model.multi_modal_projector", "model.language_model", "prompt_pool", "reconstruction_head"],
            [],
        ),
        ("finetune", ["model.multi_modal_projector", "model.language_model", "lm_head"], ["prompt_pool"]),
    ],
)
def test_set_stage_decides_which_parameters_train(stage, trains, frozen):
    model = _model()
    model.set_stage(stage)
    assert model.config.stage == stage
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {id(p) for p in model.trainable_parameters()} == {
        id(p) for n, p in model.named_parameters() if n in trainable
    }
    for prefix in trains:
        assert any(name.startswith(prefix) for name in trainable), prefix
    for prefix in [*frozen, "model.vision_tower"]:
        assert not any(name.startswith(prefix) for name in trainable), prefix
    with pytest.raises(ValueError, match="stage must be one of"):
        model.set_stage("pretrain")


def test_replaced_tokens_are_one_to_one_pool_tokens():
    model = _model(stage="croc", replace_ratio=0.75)
    ids, attention_mask, pixel_values, labels = _batch()
    seen = {}
    model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"].detach()), with_kwargs=True
    )
    out = model(ids, attention_mask, pixel_values, labels)
    cols = out.pool_cols
    assert cols.shape == (2, IMAGE_TOKENS)
    assert (cols >= 0).sum(1).tolist() == [12, 12]
    image_embeds = seen["embeds"][ids == TINY_IMAGE_TOKEN_ID].view(2, IMAGE_TOKENS, -1)
    visual = model.visual_tokens(pixel_values).detach()
    for row in range(2):
        replaced = cols[row] >= 0
        assert cols[row][replaced].unique().numel() == int(replaced.sum())
        torch.testing.assert_close(
            image_embeds[row][replaced], model.prompt_pool.tokens.detach()[cols[row][replaced]]
        )
        torch.testing.assert_close(image_embeds[row][~replaced], visual[row][~replaced])


def _smooth_l1(prediction, target, beta):
    diff = (prediction - target).abs()
    return torch.where(diff < beta, 0.5 * diff**2 / beta, diff - 0.5 * beta).mean()


@pytest.mark.parametrize("mask_kind", ["image", "prefix"])
def test_loss_matches_a_hand_written_reference(mask_kind):
    model = _model(stage="croc", mask_kind=mask_kind)
    ids, attention_mask, pixel_values, labels = _batch(seed=3)
    attention_mask[1, -2:] = 0
    labels[1, -2:] = -100
    replace_mask = torch.zeros(2, IMAGE_TOKENS, dtype=torch.bool)
    replace_mask[0, ::2] = True
    replace_mask[1, 1::2] = True
    out = model(ids, attention_mask, pixel_values, labels, replace_mask=replace_mask)

    with torch.no_grad():
        vision = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-1][:, 1:]
        visual = model.model.multi_modal_projector(vision)
        pool = model.prompt_pool.tokens
        inputs = visual.clone()
        for row in range(2):
            chosen = F.normalize(visual[row][replace_mask[row]], dim=-1)
            cost = torch.cdist(chosen.double(), pool.double()).numpy()
            _, cols = linear_sum_assignment(cost)
            inputs[row][replace_mask[row]] = pool[torch.from_numpy(np.asarray(cols))]
        embeds = model.get_input_embeddings()(ids)
        embeds[ids == TINY_IMAGE_TOKEN_ID] = inputs.reshape(-1, inputs.shape[-1])
        if mask_kind == "image":
            span_ids = torch.where(ids == TINY_IMAGE_TOKEN_ID, 0, -1)
        else:
            span_ids = torch.full_like(ids, -1)
            span_ids[:, :20] = 0  # the prompt before the first supervised token
        dense = dense_rule(span_ids, attention_mask)
        dense |= torch.eye(ids.shape[1], dtype=torch.bool) & ~attention_mask.bool()[:, :, None]
        hidden = model.model.language_model(
            inputs_embeds=embeds, attention_mask=dense[:, None]
        ).last_hidden_state
        logits = model.lm_head(hidden)
        targets = labels[:, 1:]
        picked = targets != -100
        lm_loss = F.cross_entropy(logits[:, :-1][picked], targets[picked])
        image_hidden = hidden[ids == TINY_IMAGE_TOKEN_ID].view(2, IMAGE_TOKENS, -1)
        prediction = model.reconstruction_head(image_hidden)
        target = visual / visual.norm(dim=-1, keepdim=True)
        recon_loss = _smooth_l1(prediction, target, 0.01)

    torch.testing.assert_close(out.lm_loss, lm_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.recon_loss, recon_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, lm_loss + 10.0 * recon_loss, atol=1e-5, rtol=1e-5)
    valid = attention_mask.bool()
    torch.testing.assert_close(out.logits[valid], logits[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stage", ["projector", "finetune"])
def test_causal_stages_equal_plain_llava(stage):
    model = _model(stage=stage)
    config = model.config
    plain = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=config.vision_config.to_dict(),
            text_config=config.text_config.to_dict(),
            image_token_id=TINY_IMAGE_TOKEN_ID,
            image_seq_length=IMAGE_TOKENS,
            vision_feature_layer=-1,
        )
    )
    plain.load_state_dict(model.state_dict(), strict=False)
    plain.set_attn_implementation("sdpa")
    ids, attention_mask, pixel_values, labels = _batch(seed=4)
    attention_mask[0, :3] = 0
    labels[0, :3] = -100
    out = model(ids, attention_mask, pixel_values, labels)
    expected = plain(input_ids=ids, attention_mask=attention_mask, pixel_values=pixel_values, labels=labels)
    assert out.recon_loss is None and out.pool_cols is None
    torch.testing.assert_close(out.lm_loss, expected.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stage", ["projector", "croc"])
def test_packed_rows_equal_separate_rows(stage):
    model = _model(stage=stage)
    first, _, pixels, first_labels = _batch(seed=5, length=20, image_starts=(1, 1), prompt_end=18)
    second, _, _, second_labels = _batch(seed=6, length=22, image_starts=(2, 2), prompt_end=19)
    packed_ids = torch.cat([first[:1], second[:1]], dim=1)
    packed_labels = torch.cat([first_labels[:1], second_labels[:1]], dim=1)
    segment_ids = torch.cat(
        [torch.zeros(1, 20, dtype=torch.long), torch.ones(1, 22, dtype=torch.long)], dim=1
    )
    position_ids = torch.cat([torch.arange(20), torch.arange(22)])[None]
    replace_mask = torch.zeros(2, IMAGE_TOKENS, dtype=torch.bool)
    replace_mask[:, :12] = True
    extra = {"replace_mask": replace_mask} if stage == "croc" else {}
    packed = model(
        packed_ids, None, pixels, packed_labels, segment_ids=segment_ids, position_ids=position_ids, **extra
    )
    alone_first = model(first[:1], None, pixels[:1], first_labels[:1], **_first_row(extra))
    alone_second = model(second[:1], None, pixels[1:], second_labels[:1], **_first_row(extra))
    torch.testing.assert_close(packed.logits[:, :20], alone_first.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.logits[:, 20:], alone_second.logits, atol=1e-5, rtol=1e-5)
    targets = [(first_labels[:1, 1:] != -100).sum(), (second_labels[:1, 1:] != -100).sum()]
    weighted = (alone_first.lm_loss * targets[0] + alone_second.lm_loss * targets[1]) / sum(targets)
    torch.testing.assert_close(packed.lm_loss, weighted, atol=1e-5, rtol=1e-5)


def _first_row(extra):
    return {key: value[:1] for key, value in extra.items()}


def test_causal_lm_loss_normalisation_and_segment_boundaries():
    logits = torch.randn(2, 6, 11, generator=torch.Generator().manual_seed(10))
    labels = torch.tensor([[-100, 1, 2, 3, -100, 4], [-100, -100, 5, 6, 7, 8]])
    per_token = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), reduction="none")
    picked = labels[:, 1:].reshape(-1) != -100
    torch.testing.assert_close(causal_lm_loss(logits, labels), per_token[picked].mean())
    torch.testing.assert_close(
        causal_lm_loss(logits, labels, num_items_in_batch=20), per_token[picked].sum() / 20
    )
    segments = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    crossing = torch.zeros_like(picked)
    crossing[2] = True  # row 0 target 3 sits in the next document
    expected = per_token[picked & ~crossing].mean()
    torch.testing.assert_close(causal_lm_loss(logits, labels, segment_ids=segments), expected)


def test_prefix_span_ids_per_document():
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]])
    segment_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, 5, 6, -100, -100, 7, -100, -100]])
    image = torch.zeros_like(attention_mask, dtype=torch.bool)
    spans = prefix_span_ids(attention_mask, segment_ids, labels, image)
    assert spans.tolist() == [[0, -1, -1, 1, 1, -1, -1, -1]]
    image[0, 4] = True
    spans = prefix_span_ids(attention_mask, segment_ids, None, image)
    assert spans.tolist() == [[-1, -1, -1, 1, 1, -1, -1, -1]]


@pytest.mark.parametrize(
    ("text_model", "mask_kind"), [("llama", "image"), ("qwen2", "image"), ("llama", "prefix")]
)
def test_generate_with_and_without_cache_gives_the_same_tokens(text_model, mask_kind):
    model = _model(text_model, stage="croc", mask_kind=mask_kind).eval()
    ids, attention_mask, pixel_values, _ = _batch(seed=7, length=21)
    attention_mask[0, :2] = 0  # left padding
    kwargs = dict(
        input_ids=ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        max_new_tokens=6,
        do_sample=False,
        suppress_tokens=[TINY_IMAGE_TOKEN_ID],
    )
    cached = model.generate(**kwargs)
    uncached = model.generate(**kwargs, use_cache=False)
    assert cached.shape == (2, 27)
    assert torch.equal(cached, uncached)


def _plain_llava(seed=1):
    config = tiny_config()
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=config.vision_config.to_dict(),
            text_config=config.text_config.to_dict(),
            image_token_id=TINY_IMAGE_TOKEN_ID,
            image_seq_length=IMAGE_TOKENS,
            vision_feature_layer=-1,
        )
    ).eval()


def test_from_llava_copies_an_in_memory_model():
    llava = _plain_llava()
    model = CrocLlavaForConditionalGeneration.from_llava(llava, stage="projector", prompt_pool_size=16).eval()
    assert (model.config.stage, model.config.prompt_pool_size) == ("projector", 16)
    assert llava.config.text_config._attn_implementation == "sdpa"  # the source model is left alone
    ids, attention_mask, pixel_values, _ = _batch(seed=9)
    with torch.no_grad():
        expected = llava(input_ids=ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
        got = model(ids, attention_mask, pixel_values).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_plain_llava_with_croc_mixed_and_croc_mask_equals_the_croc_stage():
    llava = _plain_llava(seed=2)
    model = CrocLlavaForConditionalGeneration.from_llava(llava, stage="croc").eval()
    llava.set_attn_implementation({"text_config": "croc_mixed"})
    assert llava.config.vision_config._attn_implementation == "sdpa"
    ids, attention_mask, pixel_values, _ = _batch(seed=11)
    mask = croc.MixedMask.from_image_mask(ids == TINY_IMAGE_TOKEN_ID, attention_mask)
    with torch.no_grad():
        expected = model(ids, attention_mask, pixel_values).logits
        got = llava(
            input_ids=ids, attention_mask=attention_mask, pixel_values=pixel_values, croc_mask=mask
        ).logits
        causal = llava(input_ids=ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(causal, expected, atol=1e-3)


def test_from_pretrained_llava_checkpoint_and_save_load_round_trip(tmp_path):
    llava = _plain_llava()
    llava.save_pretrained(tmp_path / "llava")
    model = CrocLlavaForConditionalGeneration.from_pretrained(
        tmp_path / "llava", stage="finetune", prompt_pool_size=32, mask_kind="prefix"
    ).eval()
    assert isinstance(model.config, CrocLlavaConfig)
    assert (model.config.stage, model.config.prompt_pool_size, model.config.mask_kind) == (
        "finetune",
        32,
        "prefix",
    )
    assert model.config.text_config._attn_implementation == "croc_mixed"
    trained = ("model.multi_modal_projector", "model.language_model", "lm_head")  # stage "finetune"
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith(trained) for name in trainable)
    assert (
        torch.isfinite(model.prompt_pool.tokens).all() and 0.8 < model.prompt_pool.tokens.std().item() < 1.2
    )
    ids, attention_mask, pixel_values, _ = _batch(seed=8)
    with torch.no_grad():
        expected = llava(input_ids=ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
        got = model(ids, attention_mask, pixel_values).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    model.set_stage("croc")
    model.save_pretrained(tmp_path / "croc")
    loaded = CrocLlavaForConditionalGeneration.from_pretrained(tmp_path / "croc")
    assert (loaded.config.stage, loaded.config.mask_kind) == ("croc", "prefix")
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[key], loaded_state[key]) for key in state)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"stage": "pretrain"}, "stage"),
        ({"mask_kind": "sliding"}, "mask_kind"),
        ({"assignment_scope": "batch"}, "assignment_scope"),
        ({"recon_head": "mlp"}, "recon_head"),
        ({"recon_tokens": "kept"}, "recon_tokens"),
        ({"max_image_tokens": 0}, "max_image_tokens"),
        ({"pool_lr": -1.0}, "pool_lr"),
        ({"assignment": "auction"}, "assignment"),
        ({"replace_ratio": 1.5}, "replace_ratio"),
        ({"attention_backend": "cuda"}, "attention_backend"),
    ],
)
def test_config_rejects_bad_fields(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


def test_image_token_count_mismatch_is_a_clear_error():
    model = _model(stage="croc")
    ids, attention_mask, pixel_values, labels = _batch()
    ids[0, 2] = 50
    with pytest.raises(ValueError, match="image tokens"):
        model(ids, attention_mask, pixel_values, labels)


# ----------------------------------------------------------------------------- ragged images
def _ragged_batch(sizes_per_row=((16, 8), (12,)), length=40, seed=0):
    """Rows holding images of the given sizes (16 -> 16 tokens, 12 -> 9, 8 -> 4), each image's run
    of tokens followed by two text tokens; captions supervised from position 30 on."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 256, (len(sizes_per_row), length), generator=gen)
    images = []
    for row, sizes in enumerate(sizes_per_row):
        start = 1
        for size in sizes:
            tokens = (size // 4) ** 2
            ids[row, start : start + tokens] = TINY_IMAGE_TOKEN_ID
            start += tokens + 2
            images.append(torch.randn(3, size, size, generator=gen))
    labels = ids.clone()
    labels[:, :30] = -100
    return ids, torch.ones_like(ids), images, labels


def _ragged_mask(counts, width, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(counts), width, dtype=torch.bool)
    for i, count in enumerate(counts):
        mask[i, torch.randperm(count, generator=gen)[: round(0.75 * count)]] = True
    return mask


def test_images_of_different_sizes_and_several_per_sample_in_one_batch():
    model = _model(stage="croc")
    ids, attention_mask, images, labels = _ragged_batch()
    out = model(ids, attention_mask, images, labels)
    assert torch.isfinite(out.loss)
    assert out.pool_cols.shape == (3, 16)
    assert (out.pool_cols >= 0).sum(1).tolist() == [12, 3, 7]  # round(0.75 * [16, 4, 9])
    assert bool((out.pool_cols[1, 4:] == -1).all() and (out.pool_cols[2, 9:] == -1).all())
    out.loss.backward()
    assert float(model.prompt_pool.tokens.grad.abs().sum()) > 0


def test_a_ragged_batch_gives_each_sample_what_it_gets_alone():
    model = _model(stage="croc")
    ids, attention_mask, images, labels = _ragged_batch()
    mask = _ragged_mask([16, 4, 9], 16)
    batch = model(ids, attention_mask, images, labels, replace_mask=mask)
    alone = model(ids[1:], attention_mask[1:], images[2:], labels[1:], replace_mask=mask[2:, :9])
    torch.testing.assert_close(batch.logits[1], alone.logits[0], atol=1e-5, rtol=1e-4)
    assert torch.equal(batch.pool_cols[2, :9], alone.pool_cols[0])


def test_per_sample_assignment_is_one_problem_over_all_images_of_a_sample():
    ids, attention_mask, images, labels = _ragged_batch()
    mask = _ragged_mask([16, 4, 9], 16)
    model = _model(stage="croc", assignment_scope="sample", prompt_pool_size=18)
    cols = model(ids, attention_mask, images, labels, replace_mask=mask).pool_cols
    row0 = torch.cat([cols[0][mask[0]], cols[1][mask[1]]])
    assert len(set(row0.tolist())) == 15  # one-to-one across the sample's two images
    visual, _ = model.encode_images(images)
    selected = torch.cat([visual[0][mask[0]], visual[1][mask[1]]])
    cost = model.prompt_pool.cost(selected[None])[0].double().numpy()
    rows, ref = linear_sum_assignment(cost)
    assert cost[rows, row0.numpy()].sum() == pytest.approx(cost[rows, ref].sum(), rel=1e-6)


def test_per_sample_solve_larger_than_the_pool_names_the_sample_unless_nearest():
    ids, attention_mask, images, labels = _ragged_batch()
    mask = _ragged_mask([16, 4, 9], 16)
    with pytest.raises(ValueError, match=r"sample at row 0 replaces 15 visual tokens over its 2 image"):
        _model(stage="croc", assignment_scope="sample", prompt_pool_size=14)(
            ids, attention_mask, images, labels, replace_mask=mask
        )
    for fields in ({"assignment_scope": "image"}, {"assignment_scope": "sample", "assignment": "nearest"}):
        out = _model(stage="croc", prompt_pool_size=14, **fields)(
            ids, attention_mask, images, labels, replace_mask=mask
        )
        assert torch.isfinite(out.loss)


def test_image_token_runs_must_match_each_image():
    model = _model(stage="croc")
    ids, attention_mask, images, labels = _ragged_batch()
    images[1], images[2] = images[2], images[1]  # 9 and 4 tokens where the ids hold 4 and 9
    with pytest.raises(
        ValueError, match=r"image 1: input_ids hold 4 image tokens but the vision tower gives 9"
    ):
        model(ids, attention_mask, images, labels)


def test_reconstruction_head_positions_cover_max_image_tokens():
    ids, attention_mask, images, labels = _ragged_batch(sizes_per_row=((20,), (8,)))  # 25 and 4 tokens
    with pytest.raises(ValueError, match="max_image_tokens"):
        _model(stage="croc")(ids, attention_mask, images, labels)
    out = _model(stage="croc", max_image_tokens=25)(ids, attention_mask, images, labels)
    assert torch.isfinite(out.loss) and out.pool_cols.shape == (2, 25)
