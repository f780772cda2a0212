from pathlib import Path

import pytest

from memft.recipe_files import RECIPES_DIR, offline_stand_in, shipped_recipes
from memft.errors import RecipeError
from memft.train.builders import check_compatibility
from memft.train.recipe import apply_overrides, load_recipe, parse_override, validate_recipe
from memft.train.schema_doc import describe_schema


@pytest.mark.parametrize("name", shipped_recipes(kind="finetune"))
def test_every_shipped_recipe_validates(name):
    """Against its model's config; a recipe naming a hub model (not downloaded here) against the bundled one."""
    recipe = load_recipe(RECIPES_DIR / f"{name}.yaml", offline_stand_in(name))
    check_compatibility(recipe)


def test_defaults_fill_method_names():
    recipe = validate_recipe({"optimizer": {"lr": 1e-3}, "adapter": {"name": "lora"}})
    assert recipe.optimizer.name == "adamw" and recipe.adapter.name == "lora" and recipe.adapter.r == 16


@pytest.mark.parametrize("text, path, value", [
    ("train.max_steps=50", ["train", "max_steps"], 50),
    ("optimizer.lr=1e-3", ["optimizer", "lr"], "1e-3"),          # YAML keeps it a string; pydantic parses it
    ("data.packing=true", ["data", "packing"], True),
    ("train.max_grad_norm=null", ["train", "max_grad_norm"], None),
    ("adapter.target_modules=[q_proj, v_proj]", ["adapter", "target_modules"], ["q_proj", "v_proj"]),
])
def test_override_values_are_typed(text, path, value):
    assert parse_override(text) == (path, value)


def test_overrides_reach_the_recipe():
    data = apply_overrides({}, ["optimizer.lr=1e-3", "train.max_steps=7", "adapter.name=lora", "adapter.r=4"])
    recipe = validate_recipe(data)
    assert recipe.optimizer.lr == 1e-3 and recipe.train.max_steps == 7 and recipe.adapter.r == 4


@pytest.mark.parametrize("data, expected", [
    ({"trian": {}}, ["trian: unknown key. Did you mean 'train'?"]),
    ({"train": {"max_stpes": 3}}, ["train.max_stpes: unknown key. Did you mean 'max_steps'?"]),
    ({"optimizer": {"name": "adamx"}}, ["optimizer.name: 'adamx' is not a known method", "Did you mean 'adamw'?"]),
    ({"optimizer": {"lr": "fast"}}, ["optimizer.lr: Input should be a valid number"]),
    ({"adapter": {"name": "lora", "rank": 4}}, ["adapter.rank: unknown key."]),
    ({"data": {"train": {"path": "x.jsonl"}}}, ["data.train.format: required key is missing."]),
    ({"train": {"batch_size": 0, "max_steps": -1}}, ["train.batch_size: Input should be greater than or equal to 1",
                                                     "train.max_steps: Input should be greater"]),
    ({"model": {"dtype": "float64"}}, ["model.dtype: Input should be 'float32', 'bfloat16' or 'float16'"]),
])
def test_malformed_recipes_report_every_problem_with_its_path(data, expected):
    with pytest.raises(RecipeError) as info:
        validate_recipe(data)
    message = str(info.value)
    for fragment in expected:
        assert fragment in message
    assert "Traceback" not in message


def test_all_problems_reported_together():
    with pytest.raises(RecipeError, match="has 3 problems"):
        validate_recipe({"trian": {}, "optimizer": {"lr": -1}, "data": {"max_seq_len": 2}})


def test_file_level_errors(tmp_path: Path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name_or_path: x\ntrain: [")
    with pytest.raises(RecipeError, match="not valid YAML at line"):
        load_recipe(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="must hold a mapping"):
        load_recipe(listy)
    with pytest.raises(RecipeError, match="not of the form key=value"):
        load_recipe(None, ["train.max_steps"])
    with pytest.raises(RecipeError, match="is a value, not a section"):
        load_recipe(None, ["train.max_steps=3", "train.max_steps.x=1"])


def test_yaml_is_loaded_safely(tmp_path: Path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(evil)


def test_incompatible_settings_are_refused_up_front():
    with pytest.raises(RecipeError, match="fp16"):
        check_compatibility(validate_recipe({"model": {"dtype": "bfloat16"}, "train": {"mixed_precision": "fp16"}}))


def test_schema_lists_every_field_with_help():
    text = describe_schema()
    for fragment in ("train.max_steps", "optimizer.name: adamw", "adapter.r", "default 100", "Peak learning rate"):
        assert fragment in text
    assert "optimizer" in describe_schema("optimizer")
    with pytest.raises(RecipeError, match="no recipe section"):
        describe_schema("optimiser")


def test_layerwise_updates_are_refused_with_ddp():
    recipe = validate_recipe({"optimizer": {"name": "galore_adamw", "layerwise": True},
                              "distributed": {"engine": "ddp"}})
    with pytest.raises(RecipeError, match="layerwise"):
        check_compatibility(recipe)
