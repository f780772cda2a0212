"""Each method reached through the recipe path: it trains, and resume stays exact."""

import pytest

from memft.errors import RecipeError
from memft.train.builders import check_compatibility
from memft.train.loop import finetune
from memft.train.recipe import validate_recipe
from tests.conftest import crash_and_resume, tiny_recipe

MEZO = {"name": "mezo", "lr": 3e-3, "eps": 1e-2}
LORA = {"name": "lora", "r": 4, "alpha": 8}


def _crash_and_resume(tmp_path, **sections) -> tuple[list[float], list[float]]:
    """Steps 4..6 of an uninterrupted run and of the same run crashed after step 4, resumed from step 3."""
    train = {"max_steps": 6, "save_every": 3, **sections.pop("train", {})}
    full, resumed = crash_and_resume(tmp_path, 4, train=train, **sections)
    return full[3:], resumed


def test_mezo_lora_lowers_the_loss(tmp_path):
    result = finetune(validate_recipe(tiny_recipe(tmp_path / "run", optimizer=MEZO, adapter=LORA,
                                                  train={"max_steps": 40, "max_grad_norm": None})))
    assert sum(result.losses[-5:]) / 5 < 0.8 * result.losses[0]


def test_mezo_resume_is_exact(tmp_path):
    full, resumed = _crash_and_resume(tmp_path, optimizer=MEZO, adapter=LORA)
    assert resumed == full


def test_mezo_refuses_fp16_scaling_and_checkpointing():
    with pytest.raises(RecipeError, match="mezo"):
        check_compatibility(validate_recipe({"optimizer": {"name": "mezo"}, "model": {"gradient_checkpointing": True}}))


def test_cut_cross_entropy_trains_like_the_full_logit_loss(tmp_path):
    train = {"max_steps": 5}
    plain = finetune(validate_recipe(tiny_recipe(tmp_path / "a", train=train)))
    cut = finetune(validate_recipe(tiny_recipe(tmp_path / "b", train=train, loss={"name": "cut_cross_entropy"})))
    assert cut.losses == pytest.approx(plain.losses, rel=1e-4)
    assert cut.eval["eval_loss"] == pytest.approx(plain.eval["eval_loss"], rel=1e-4)


def test_cut_cross_entropy_with_lora_and_grad_accum_resumes_exactly(tmp_path):
    full, resumed = _crash_and_resume(tmp_path, loss={"name": "cut_cross_entropy"}, adapter=LORA,
                                      train={"grad_accum": 2})
    assert resumed == full


GALORE = {"name": "galore_adamw", "lr": 2e-3, "rank": 8, "update_proj_gap": 3}


@pytest.mark.parametrize("name", ["galore_adamw", "galore_adamw8bit", "galore_adafactor", "natural_galore_adamw"])
def test_galore_family_lowers_the_loss(tmp_path, name):
    result = finetune(validate_recipe(tiny_recipe(tmp_path / "run", optimizer={**GALORE, "name": name},
                                                  train={"max_steps": 10})))
    assert sum(result.losses[-3:]) / 3 < 0.7 * result.losses[0]


def test_layerwise_galore_equals_the_ordinary_step_through_the_loop(tmp_path):
    train = {"max_steps": 6, "max_grad_norm": None}
    ordinary = finetune(validate_recipe(tiny_recipe(tmp_path / "a", optimizer=GALORE, train=train)))
    layerwise = finetune(validate_recipe(tiny_recipe(tmp_path / "b", optimizer={**GALORE, "layerwise": True},
                                                     train=train)))
    assert layerwise.losses == pytest.approx(ordinary.losses, rel=1e-5)


def test_layerwise_galore_with_accumulation_and_clipping_resumes_exactly(tmp_path):
    full, resumed = _crash_and_resume(tmp_path, optimizer={**GALORE, "name": "galore_adamw8bit", "layerwise": True},
                                      train={"grad_accum": 2})
    assert resumed == full


COMPRESSOR_STEPS = {"max_steps": 6}


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """The uncompressed run the activation compressors are compared with (trained once for all of them)."""
    return finetune(validate_recipe(tiny_recipe(tmp_path_factory.mktemp("plain") / "run", train=COMPRESSOR_STEPS)))


@pytest.mark.parametrize("activations", [{"name": "mesa"}, {"name": "s2a"}, {"name": "wta_crs", "ratio": 0.5}])
def test_activation_compressors_train_through_the_recipe(tmp_path, plain_run, activations):
    compressed = finetune(validate_recipe(tiny_recipe(tmp_path / "b", train=COMPRESSOR_STEPS,
                                                      activations=activations)))
    assert compressed.losses[0] == pytest.approx(plain_run.losses[0], rel=1e-6)  # forward is exact
    assert compressed.losses[-1] < 0.7 * compressed.losses[0]


def test_mesa_cuts_saved_activations_in_the_estimate():
    from memft.train.memory_estimate import recipe_memory

    small = {"data": {"max_seq_len": 64}, "train": {"batch_size": 4}}
    plain = recipe_memory(validate_recipe(small), device="cpu")
    mesa = recipe_memory(validate_recipe({**small, "activations": {"name": "mesa"}}), device="cpu")
    assert mesa.peak_bytes < plain.peak_bytes
