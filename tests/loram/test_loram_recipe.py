"""LoRAM through the recipe path: train on the pruned model, export, the full model improves."""

import torch

from memft.cli import main
from memft.train.data import collate
from memft.train.loop import finetune
from memft.train.recipe import validate_recipe
from tests.conftest import tiny_recipe


def _loss(model, batch) -> float:
    with torch.no_grad():
        return model(**batch).loss.item()


def test_loram_recipe_trains_exports_and_improves_the_full_model(tmp_path, capsys):
    recipe = validate_recipe(tiny_recipe(
        tmp_path / "run", adapter={"name": "loram", "prune_ratio": 0.5, "keep_dense_layers": [1, 1], "r": 4,
                                   "alpha": 8, "prune_method": "taylor", "calibration_batches": 2},
        optimizer={"lr": 1e-2}, train={"max_steps": 15}))
    result = finetune(recipe)
    assert (tmp_path / "run" / "final" / "loram_plan.json").exists()
    assert main(["loram", "export", str(tmp_path / "run")]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memft.train.data import build_splits
    from memft.train.models import resolve_model_path

    base_path = resolve_model_path("memft:tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    batch = collate(build_splits(recipe.data, tokenizer, seed=0).eval[:16], tokenizer.pad_token_id)
    before = _loss(AutoModelForCausalLM.from_pretrained(base_path), batch)
    after = _loss(AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "recovered" / "merged"), batch)
    assert after < before - 0.5, (before, after, result.losses)


def test_export_refuses_a_non_loram_run(tmp_path, capsys):
    finetune(validate_recipe(tiny_recipe(tmp_path / "run", train={"max_steps": 1})))
    assert main(["loram", "export", str(tmp_path / "run")]) == 2
    assert "not loram" in capsys.readouterr().err
