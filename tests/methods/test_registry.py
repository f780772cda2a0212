"""The method registry: one registration makes a method reachable from the recipe, the builders, the
support matrix, the planner and `memft finetune`; the recipe's choices are the library's own."""

from __future__ import annotations

import json
from typing import Literal

import pytest
import torch
from pydantic import Field

from memft.activations.patch import METHODS as COMPRESSORS
from memft.cli import main
from memft.errors import RecipeError
from memft.methods import Method, Section, register, registry, unregister
from memft.train import recipe as recipe_module
from memft.train.memory_estimate import recipe_memory
from memft.train.recipe import validate_recipe
from memft.train.support import matrix_markdown, unsupported
from tests.conftest import tiny_recipe


class SignSGD(torch.optim.Optimizer):
    """Test-only optimizer: p <- p - lr * sign(grad)."""

    def __init__(self, params, lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


class SignSGDSection(Section):
    name: Literal["sign_sgd"] = Field(..., description="Test-only sign descent.")
    lr: float = Field(1e-3, gt=0, description="Step size.")


@pytest.fixture
def sign_sgd():
    """A method registered from a test: a schema, a builder and one refused engine, nothing else."""
    register(Method("optimizer", SignSGDSection,
                    lambda model, section, recipe: SignSGD([p for p in model.parameters() if p.requires_grad],
                                                           section.lr),
                    engines={"fsdp": "is a test-only method; use engine ddp"}))
    recipe_module.refresh_methods()
    yield
    unregister("optimizer", "sign_sgd")
    recipe_module.refresh_methods()


def test_a_registered_method_is_reachable_everywhere(sign_sgd, tmp_path, capsys):
    recipe = validate_recipe(tiny_recipe(tmp_path / "run", optimizer={"name": "sign_sgd", "lr": 1e-3},
                                         train={"max_steps": 6}))
    assert "| optimizer sign_sgd | yes | no | yes |" in matrix_markdown()
    fsdp = validate_recipe({**recipe.model_dump(mode="json"), "distributed": {"engine": "fsdp"}})
    assert unsupported(fsdp) == ["optimizer sign_sgd is not supported with distributed.engine fsdp: it is a "
                                 "test-only method; use engine ddp"]
    with pytest.raises(RecipeError, match=r"optimizer.lr_typo: unknown key"):
        validate_recipe({"optimizer": {"name": "sign_sgd", "lr_typo": 1}})
    assert recipe_memory(recipe, device="cpu").peak_bytes > 0
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe.model_dump(mode="json")))
    assert main(["finetune", str(path)]) == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert main(["schema", "optimizer"]) == 0
    assert "[optimizer.name: sign_sgd] Test-only sign descent." in capsys.readouterr().out


def test_unregistering_removes_the_method(sign_sgd):
    unregister("optimizer", "sign_sgd")
    recipe_module.refresh_methods()
    with pytest.raises(RecipeError, match="'sign_sgd' is not a known method"):
        validate_recipe({"optimizer": {"name": "sign_sgd"}})
    register(Method("optimizer", SignSGDSection))  # the fixture removes it again


def test_a_method_is_registered_once():
    with pytest.raises(ValueError, match="registered already"):
        register(Method("optimizer", registry.get("optimizer", "adamw").schema))


def test_the_recipe_offers_the_compressors_the_library_has():
    names = [m.name for m in registry.methods("activations") if m.name != "none"]
    assert sorted(names) == sorted(COMPRESSORS)


@pytest.mark.parametrize("section, message", [
    ({"activations": {"name": "mesa", "bits": 3}}, "activations.bits"),
    ({"activations": {"name": "s2a", "bits": 3}}, "activations.bits"),
    ({"activations": {"name": "s2a", "softmax_bits": 5}}, "activations.softmax_bits"),
])
def test_bit_widths_the_codecs_cannot_store_are_refused(section, message):
    with pytest.raises(RecipeError, match=message):
        validate_recipe(section)
