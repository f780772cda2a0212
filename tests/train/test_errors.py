"""Errors are translated once: library code raises specific types, chained to their cause; runtime failures
such as out-of-memory are never reported as recipe errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from memft.errors import RecipeError
from memft.train import builders
from memft.train.recipe import validate_recipe
from tests.loram.loram_models import tiny_model


def test_out_of_memory_while_preparing_loram_is_not_a_recipe_error(monkeypatch):
    import memft.loram

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(memft.loram, "prepare_loram", out_of_memory)
    recipe = validate_recipe({"adapter": {"name": "loram", "keep_dense_layers": [0]}})
    with pytest.raises(torch.OutOfMemoryError):
        builders.prepare_model(tiny_model(), recipe)


def test_a_recipe_error_keeps_its_cause():
    recipe = validate_recipe({"adapter": {"name": "lora", "target_modules": ["no_such_layer"]}})
    with pytest.raises(RecipeError, match="adapter.target_modules") as caught:
        builders.prepare_model(tiny_model(), recipe)
    assert isinstance(caught.value.__cause__, ValueError)


def test_hf_entry_points_raise_value_errors():
    from memft.integrations import memft_optimizer

    with pytest.raises(ValueError, match="optimizer.name"):
        memft_optimizer(tiny_model(), {"optimizer": {"name": "galor"}}, num_training_steps=10)


def test_the_library_never_imports_the_command_line():
    package = Path(__file__).resolve().parents[2] / "memft"
    importers = [str(p.relative_to(package)) for p in package.rglob("*.py") if p.name != "cli.py"
                 and re.search(r"^\s*(from memft\.cli import|import memft\.cli|from memft import cli)", p.read_text(),
                               re.MULTILINE)]
    assert importers == []
