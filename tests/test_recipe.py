"""Recipes: presets parse, YAML round-trips, mistakes get one clear line."""

from __future__ import annotations

import pytest

from llmpress.compress.quant.gptq import GPTQStage
from llmpress.compress.recipe import Recipe, load_recipe, parse_recipe, shipped_recipes
from llmpress.errors import RecipeError

REQUIRED = ["rtn-w4", "rtn-w4-g64", "rtn-w3-g64", "rtn-w2-g64", "rtn-w8",
            "gptq-w4", "gptq-w4-g64", "gptq-w3-g64", "gptq-w2-g64"]


@pytest.mark.parametrize("name", REQUIRED)
def test_required_presets_parse_and_match_their_names(name):
    recipe = load_recipe(name)
    stage = recipe.stages[0]
    method, bits, *group = name.split("-")
    assert stage.method == method and stage.bits == int(bits[1:])
    assert stage.group_size == (int(group[0][1:]) if group else -1)
    if method == "gptq":
        assert stage.act_order and stage.true_sequential
    assert parse_recipe(__import__("yaml").safe_load(recipe.to_yaml())) == recipe


def test_every_shipped_recipe_parses():
    assert set(REQUIRED) <= set(shipped_recipes())
    for name in shipped_recipes():
        load_recipe(name)


def test_unknown_key_suggests_the_closest():
    with pytest.raises(RecipeError, match=r"unknown key 'bitz' in stage 1 \(gptq\); did you mean 'bits'\?"):
        parse_recipe({"stages": [{"method": "gptq", "bitz": 4}]})
    with pytest.raises(RecipeError, match=r"unknown key 'act_ordr'.*'act_order'"):
        parse_recipe({"stages": [{"method": "gptq", "bits": 4, "act_ordr": True}]})


def test_unknown_method_and_bad_values():
    with pytest.raises(RecipeError, match=r"unknown method 'gptqq'.*did you mean 'gptq'"):
        parse_recipe({"stages": [{"method": "gptqq", "bits": 4}]})
    with pytest.raises(RecipeError, match="bits must be one of"):
        parse_recipe({"stages": [{"method": "rtn", "bits": 5}]})
    with pytest.raises(RecipeError, match="group_size"):
        parse_recipe({"stages": [{"method": "rtn", "bits": 4, "group_size": 0}]})
    with pytest.raises(RecipeError, match="bits"):
        parse_recipe({"stages": [{"method": "rtn", "bits": "four"}]})
    with pytest.raises(RecipeError, match="stages"):
        parse_recipe({"stages": []})
    with pytest.raises(RecipeError, match="no recipe named 'gptq-w4-g46'; did you mean 'gptq-w4-g64'"):
        load_recipe("gptq-w4-g46")


def test_settings_and_overrides():
    recipe = load_recipe("gptq-w3-g64", ["act_order=false", "damp=0.05"])
    assert recipe.stages[0].act_order is False and recipe.stages[0].damp == 0.05
    with pytest.raises(RecipeError, match="--set bitss: no stage.*did you mean 'bits'"):
        load_recipe("gptq-w3-g64", ["bitss=3"])
    stage = GPTQStage(bits=3, group_size=64, overrides={r"down_proj$": {"bits": 4}}, ignore=[r"\.0\.mlp"])
    assert stage.for_module("model.layers.3.mlp.down_proj").bits == 4
    assert stage.for_module("model.layers.3.mlp.up_proj").bits == 3
    assert not stage.selects("model.layers.0.mlp.up_proj") and stage.selects("model.layers.1.mlp.up_proj")
    with pytest.raises(RecipeError):
        parse_recipe({"stages": [{"method": "gptq", "bits": 3, "overrides": {"down": {"bits": 7}}}]})


def test_recipe_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nstages:\n  - method: rtn\n    bits: 8\n")
    assert load_recipe(str(path)).stages[0].bits == 8
    path.write_text("stages: [\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(path))
    assert isinstance(Recipe.model_validate({"stages": [{"method": "rtn", "bits": 2}]}), Recipe)


def test_settings_are_named_in_the_recipe_name():
    assert load_recipe("gptq-w4", ["group_size=32"]).name == "gptq-w4 [group_size=32]"
    assert load_recipe("gptq-w4").name == "gptq-w4"


def test_settings_and_drop_apply_to_a_recipe_object_too():
    from llmpress.compress.recipe import customize_recipe

    recipe = parse_recipe({"name": "mine", "stages": [{"method": "rht"}, {"method": "gptq", "bits": 3}]})
    changed = customize_recipe(recipe, ["damp=0.05"], ["rht"])
    assert [s.method for s in changed.stages] == ["gptq"] and changed.stages[0].damp == 0.05
    assert changed.name == "mine [damp=0.05, -rht]"
    assert customize_recipe(recipe) is recipe
    with pytest.raises(RecipeError, match="no stage of this recipe has that key"):
        customize_recipe(recipe, ["group_sise=64"])
