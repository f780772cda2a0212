"""`memft memory`: a recipe's estimate equals its measurement, for each kind of training step."""

import json

import pytest

from memft.cli import main
from memft.train.memory_estimate import recipe_memory
from memft.train.recipe import validate_recipe

SMALL = {"data": {"max_seq_len": 32}, "train": {"batch_size": 2}}


@pytest.mark.parametrize("methods", [
    {},
    {"adapter": {"name": "lora", "r": 4}},
    {"optimizer": {"name": "mezo"}},
    {"adapter": {"name": "lora", "r": 4}, "optimizer": {"name": "mezo"}},
    {"loss": {"name": "cut_cross_entropy"}},
], ids=["adamw", "lora", "mezo", "mezo+lora", "cut-ce"])
def test_estimate_equals_measurement(methods):
    recipe = validate_recipe({**SMALL, **methods})
    estimated = recipe_memory(recipe, device="cpu")
    measured = recipe_memory(recipe, device="cpu", measure=True)
    assert estimated.peak_bytes == measured.peak_bytes
    assert estimated.breakdown == measured.breakdown


def test_mezo_needs_no_more_than_inference_state():
    adamw = recipe_memory(validate_recipe(SMALL), device="cpu")
    mezo = recipe_memory(validate_recipe({**SMALL, "optimizer": {"name": "mezo"}}), device="cpu")
    assert mezo.breakdown["gradients"] == mezo.breakdown["optimizer_state"] == 0
    assert mezo.peak_bytes < adamw.peak_bytes / 3


def test_cut_cross_entropy_removes_the_logits_from_the_peak():
    big_vocab = {**SMALL, "data": {"max_seq_len": 256}, "train": {"batch_size": 8}}
    plain = recipe_memory(validate_recipe(big_vocab), device="cpu")
    cut = recipe_memory(validate_recipe({**big_vocab, "loss": {"name": "cut_cross_entropy"}}), device="cpu")
    logits = 8 * 256 * 1024 * 4  # fp32 [B, T, V]
    assert plain.peak_bytes - cut.peak_bytes > logits


def test_memory_command_json_and_errors(capsys, tmp_path):
    assert main(["memory", "quickstart", "data.max_seq_len=32", "train.batch_size=2", "--device", "cpu",
                 "--json", "--gpu", "4090", "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["peak_bytes"] > 0 and result["fits"][0]["fits"] is True
    assert (tmp_path / "memory-quickstart.png").exists()
    assert main(["memory", "quickstart", "--gpu", "GTX 9999"]) == 2
    assert "--gpu" in capsys.readouterr().err
    assert main(["memory", "quickstart", "--config", "no-such-model"]) == 2
    assert "Known configs" in capsys.readouterr().err


def test_estimate_under_an_engine_says_it_is_one_process(capsys):
    from memft.cli import main

    assert main(["memory", "quickstart", "distributed.engine=fsdp", "--device", "cpu"]) == 0
    assert "one process's step without distributed.engine fsdp" in capsys.readouterr().out
