"""Hugging Face TrainingArguments and LLaMA-Factory key names in a recipe are pointed to memft's keys."""

from __future__ import annotations

import re

import pytest

from memft.errors import RecipeError
from memft.train import recipe as recipe_module
from memft.train.recipe import FOREIGN_KEYS, _members, apply_overrides, load_recipe, validate_recipe

# A dotted recipe key as the table's targets and notes write them (train.max_steps, data.train.path).
RECIPE_KEY = re.compile(r"\b(?:%s)(?:\.[a-z_0-9]+)+" % "|".join(recipe_module.Recipe.model_fields))


def _is_key(path: str) -> bool:
    """Whether a dotted key exists in the recipe schema (for a method section: in any of its methods)."""
    models = [recipe_module.Recipe]
    for part in path.split("."):
        fields = [m.model_fields[part] for m in models if part in m.model_fields]
        if not fields:
            return False
        models = [member for field in fields for member in _members(field.annotation)]
    return True


@pytest.mark.parametrize("name", sorted(FOREIGN_KEYS))
def test_every_key_the_table_names_exists(name):
    target, note = FOREIGN_KEYS[name]
    if target is not None:
        assert RECIPE_KEY.fullmatch(target.split("=")[0]) and _is_key(target.split("=")[0])
    for key in RECIPE_KEY.findall(note):
        assert _is_key(key), f"'{name}': {key} is not a recipe key"
    if target and "=" in target:
        validate_recipe(apply_overrides({}, [target]))  # the value is one the key accepts
    assert name not in recipe_module.Recipe.model_fields


@pytest.mark.parametrize("name", sorted(FOREIGN_KEYS))
def test_every_name_is_answered_as_an_override(name):
    target, note = FOREIGN_KEYS[name]
    with pytest.raises(RecipeError) as caught:
        load_recipe(None, [f"{name}=1"])
    message = str(caught.value)
    assert f"- {name}: unknown key." in message
    assert (target in message) if target else (f"'{name}' is a Hugging Face / LLaMA-Factory name; memft has no "
                                               "such setting" in message and note in message)


def test_names_in_a_file_are_answered_at_the_top_level_and_in_sections(tmp_path):
    path = tmp_path / "hf.yaml"
    path.write_text("learning_rate: 2.0e-5\nnum_train_epochs: 3\n"
                    "train: {per_device_train_batch_size: 4, bf16: true, seed: 1}\n"
                    "optimizer: {name: adamw, use_galore: true, galore_rank: 8}\n"
                    "adapter: {name: lora, lora_rank: 8}\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    lines = str(caught.value).splitlines()
    assert lines[0] == f"{path} has 7 problems:"
    hf = "is a Hugging Face / LLaMA-Factory name"
    assert set(lines[1:]) == {
        f"  - learning_rate: unknown key. 'learning_rate' {hf}; in memft it is optimizer.lr.",
        f"  - num_train_epochs: unknown key. 'num_train_epochs' {hf}; in memft it is train.num_epochs (instead of "
        "train.max_steps).",
        f"  - train.per_device_train_batch_size: unknown key. 'per_device_train_batch_size' {hf}; in memft it is "
        "train.batch_size.",
        f"  - train.bf16: unknown key. 'bf16' {hf}; in memft it is train.mixed_precision=bf16.",
        f"  - optimizer.use_galore: unknown key. 'use_galore' {hf}; in memft it is optimizer.name=galore_adamw (or "
        "galore_adamw8bit, galore_adafactor).",
        f"  - optimizer.galore_rank: unknown key. 'galore_rank' {hf}; in memft it is optimizer.rank (with "
        "optimizer.name=galore_adamw).",
        f"  - adapter.lora_rank: unknown key. 'lora_rank' {hf}; in memft it is adapter.r (with adapter.name=lora).",
    }


def test_a_memft_key_in_the_wrong_section_is_pointed_to_its_section():
    with pytest.raises(RecipeError, match=r"- optimizer.seed: unknown key. Did you mean train.seed\?"):
        load_recipe(None, ["optimizer.seed=1"])
    with pytest.raises(RecipeError, match=r"- warmup_steps: unknown key. Did you mean train.warmup_steps\?"):
        load_recipe(None, ["warmup_steps=10"])


def test_the_readme_table_agrees_with_the_mapping():
    """Every Hugging Face name in the README's "Coming from" table is mapped, and its memft keys exist."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split("### Coming from the HF Trainer / TRL / LLaMA-Factory", 1)[1].split("\n\n| ", 1)[1]
    rows = [line for line in ("| " + table).split("\n\n")[0].splitlines()[2:]
            if line.startswith("| `") and "accelerate launch" not in line]  # a command, not a key
    assert len(rows) >= 8
    for row in rows:
        theirs, ours = row.strip("|").split(" | ")[:2]
        names = [name.split(":")[0] for name in re.findall(r"`([a-z_0-9]+(?::[^`]*)?)`", theirs)]
        assert names and all(name in FOREIGN_KEYS for name in names), row
        for key in RECIPE_KEY.findall(ours):
            assert _is_key(key), f"{row}: {key} is not a recipe key"
