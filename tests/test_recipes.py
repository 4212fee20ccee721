"""croc.recipes: each recipe is a set of CrocLlavaConfig fields, and each field changes exactly
what it names (tiny random models on the CPU)."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from croc.model import CrocLlavaConfig, CrocLlavaForConditionalGeneration, tiny_config
from croc.model import modeling as modeling_module
from croc.recipes import DEFAULT_RECIPE, RECIPE_NAMES, RECIPES, recipe_config
from croc.train.param_groups import parameter_groups

IMAGE_TOKENS = 16


def _model(recipe=None, **fields):
    torch.manual_seed(0)
    config = {**(recipe_config(recipe) if recipe else {}), **fields}
    return CrocLlavaForConditionalGeneration(tiny_config(**config))


def _batch(length=28, image_start=3, prompt_end=22):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 256, (2, length), generator=gen)
    ids[:, image_start : image_start + IMAGE_TOKENS] = 3
    labels = ids.clone()
    labels[:, :prompt_end] = -100
    return ids, torch.ones_like(ids), torch.randn(2, 3, 16, 16, generator=gen), labels


def _llm_inputs(model, *batch, **kwargs):
    """(inputs_embeds, croc_mask, output) the language model receives in one forward."""
    seen = {}

    def hook(_, args, kw):
        seen.update(kw)

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = model(*batch, **kwargs)
    finally:
        handle.remove()
    return seen["inputs_embeds"], seen.get("croc_mask"), out


def test_recipes_are_config_fields_documented_and_valid():
    assert tuple(RECIPES) == RECIPE_NAMES and DEFAULT_RECIPE == "paper"
    for name, recipe in RECIPES.items():
        config = tiny_config(**recipe.config)
        assert config.recipe == name
        for field, value in recipe.config.items():
            assert getattr(config, field) == value
            assert f"{field}" in CrocLlavaConfig.__doc__, f"{field} is not documented"
    with pytest.raises(ValueError, match="recipe must be one of"):
        recipe_config("llava")


def test_paper_is_todays_default():
    default = tiny_config()
    for field, value in RECIPES["paper"].config.items():
        assert getattr(default, field) == value, field
    assert RECIPES["paper"].training == {}


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_saved_config_records_every_recipe_field(tmp_path, name):
    _model(name).config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {field: saved[field] for field in RECIPES[name].config} == dict(RECIPES[name].config)


@pytest.mark.parametrize("stage", ["projector", "croc", "finetune"])
def test_normalize_visual_gives_unit_norm_visual_tokens_in_every_stage(stage):
    batch = _batch()
    image = batch[0] == 3
    for recipe, unit in (("croc-release", True), ("paper", False)):
        model = _model(recipe, stage=stage)
        embeds, _, out = _llm_inputs(model, *batch)
        kept = image.clone()
        if out.pool_cols is not None:
            kept[image] = out.pool_cols.reshape(-1) == -1  # replaced tokens are pool tokens
        assert bool(torch.allclose(embeds[kept].norm(dim=-1), torch.ones(int(kept.sum())), atol=1e-5)) == unit
        assert int(kept.sum()) == (2 * IMAGE_TOKENS if stage != "croc" else 2 * (IMAGE_TOKENS - 12))


@pytest.mark.parametrize(
    ("recipe", "rule"),
    [
        ("victor", "causal"),
        ("paper", "image"),
        ("croc-release", "prefix"),
    ],
)
def test_mask_kind_of_each_recipe(recipe, rule):
    ids, attention_mask, pixel_values, labels = _batch()
    _, mask, _ = _llm_inputs(_model(recipe, stage="croc"), ids, attention_mask, pixel_values, labels)
    dense = mask.to_dense()[0]
    length = ids.shape[1]
    expected = torch.ones(length, length, dtype=torch.bool).tril()
    if rule == "image":
        expected[3:19, 3:19] = True
    if rule == "prefix":
        expected[:22, :22] = True  # every token before the first supervised one (position 22)
    assert torch.equal(dense, expected)


def test_recon_head_kind():
    linear, transformer = _model("victor").reconstruction_head, _model("paper").reconstruction_head
    assert linear.kind == "linear" and not hasattr(linear, "encoder")
    hidden = torch.randn(2, 5, 64)
    torch.testing.assert_close(linear(hidden), linear.output(hidden))
    assert transformer.kind == "transformer" and hasattr(transformer, "encoder")


def test_assignment_nearest_takes_each_tokens_nearest_pool_token():
    model = _model("croc-release", stage="croc", normalize_visual=False)
    batch = _batch()
    out = model(*batch)
    visual = model.visual_tokens(batch[2])
    replaced = out.pool_cols >= 0
    nearest = model.prompt_pool.cost(visual[replaced][None])[0].argmin(-1)
    assert torch.equal(out.pool_cols[replaced], nearest)
    assert (replaced.sum(1) == 12).all()


@pytest.mark.parametrize("recon_tokens", ["all", "replaced"])
def test_recon_tokens_decides_the_counted_positions(monkeypatch, recon_tokens):
    seen = {}
    original = modeling_module.reconstruction_loss

    def spy(prediction, target, beta, mask=None):
        seen["mask"] = mask
        return original(prediction, target, beta, mask)

    monkeypatch.setattr(modeling_module, "reconstruction_loss", spy)
    out = _model(stage="croc", recon_tokens=recon_tokens)(*_batch())
    if recon_tokens == "all":
        assert seen["mask"] is None  # every visual token of every image
    else:
        assert torch.equal(seen["mask"], out.pool_cols >= 0)


def test_masked_reconstruction_loss_averages_only_the_counted_tokens():
    from croc.model import reconstruction_loss

    prediction, target = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 1], mask[1, 4] = True, True
    picked = reconstruction_loss(prediction[mask][None], target[mask][None], 0.01)
    torch.testing.assert_close(reconstruction_loss(prediction, target, 0.01, mask), picked)


@pytest.mark.parametrize(
    ("recipe", "tower_trains"), [("victor", True), ("paper", False), ("croc-release", False)]
)
def test_train_vision_tower_and_learning_rate_groups(recipe, tower_trains):
    model = _model(recipe, stage="croc")
    trains = {p.requires_grad for p in model.model.vision_tower.parameters()}
    assert trains == {tower_trains}
    model.set_stage("projector")
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    model.set_stage("croc")
    groups = {g["name"]: g["lr"] for g in parameter_groups(model, 1e-5, 0.0, set())}
    fields = RECIPES[recipe].config
    expected = {"pool": fields["pool_lr"] or 1e-5, "projector": 1e-5, "llm": 1e-5}
    if tower_trains:
        expected["vision_tower"] = fields["vision_tower_lr"]
    assert groups == expected
