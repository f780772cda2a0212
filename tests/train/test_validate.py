"""`memft validate` builds the recipe as a run starts (on fake tensors): what it accepts starts training, and
what cannot start is refused by validate with the very message `memft finetune` gives."""

from __future__ import annotations

import pytest

from memft.methods import registry
from tests.conftest import tiny_recipe
from tests.conftest import write_recipe

SMALL = ["data.train.max_examples=40", "train.batch_size=2", "train.max_steps=1",
         "train.eval_batches=1", "memory.track_steps=0", "train.device=cpu"]

BAD = {
    "loram layers beyond the model": ["adapter.name=loram", "adapter.keep_dense_layers=[30,30]"],
    "lora targets matching nothing": ["adapter.name=lora", "adapter.target_modules=[no_such_layer]"],
    "galore targets matching nothing": ["optimizer.name=galore_adamw", "optimizer.target_modules=[no_such_layer]"],
    "lora rank above the layers": ["adapter.name=lora", "adapter.r=100000"],
    "sequence beyond the positions": ["data.max_seq_len=5000"],
    "mezo with checkpointing": ["optimizer.name=mezo", "model.gradient_checkpointing=true"],
    "layer-wise under ddp": ["optimizer.name=galore_adamw", "optimizer.layerwise=true", "distributed.engine=ddp"],
    "mesa bits the codec lacks": ["activations.name=mesa", "activations.bits=3"],
    "fp16 weights without scaling": ["model.dtype=float16"],
    "no trainable token in the held-out rows": ["data.max_seq_len=24"],
}

GOOD = {
    "8-bit layer-wise galore, cut cross-entropy, mesa": ["optimizer.name=galore_adamw8bit", "optimizer.rank=4",
                                                         "optimizer.layerwise=true", "loss.name=cut_cross_entropy",
                                                         "activations.name=mesa", "train.grad_accum=2"],
    "mezo on lora": ["optimizer.name=mezo", "adapter.name=lora", "adapter.r=4"],
    "loram (taylor) with s2a on eager attention": ["adapter.name=loram", "adapter.prune_method=taylor",
                                                   "adapter.keep_dense_layers=[1,1]", "adapter.calibration_batches=1",
                                                   "activations.name=s2a", "model.attn_implementation=eager"],
    "wta-crs, bf16 autocast, accumulation": ["activations.name=wta_crs", "train.mixed_precision=bf16",
                                             "train.grad_accum=2"],
    "sgd with checkpointing": ["optimizer.name=sgd", "model.gradient_checkpointing=true"],
    "bitsandbytes 8-bit adamw": ["optimizer.name=adamw8bit"],
}


@pytest.fixture
def recipe_file(tmp_path):
    return write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "run"))


@pytest.mark.parametrize("overrides", BAD.values(), ids=BAD.keys())
def test_what_cannot_start_is_refused_by_validate_with_the_runs_message(cli, recipe_file, overrides):
    code, _, validate_err = cli("validate", recipe_file, *SMALL, *overrides)
    assert code == 2 and validate_err.startswith("memft validate: error: ")
    code, _, finetune_err = cli("finetune", recipe_file, *SMALL, *overrides)
    assert code == 2 and "Traceback" not in finetune_err
    assert validate_err.removeprefix("memft validate: error: ") in finetune_err


@pytest.mark.parametrize("overrides", GOOD.values(), ids=GOOD.keys())
def test_what_validate_accepts_starts_training(cli, recipe_file, overrides):
    code, out, err = cli("validate", recipe_file, *SMALL, *overrides)
    assert code == 0, err
    code, out, err = cli("finetune", recipe_file, *SMALL, *overrides)
    assert code == 0 and "Finished 1 steps" in out, err


@pytest.mark.parametrize("name", [m.name for m in registry.methods("optimizer")])
def test_the_planner_estimates_every_optimizer_or_says_why_not(cli, recipe_file, name):
    code, out, err = cli("memory", recipe_file, f"optimizer.name={name}", "data.max_seq_len=32")
    assert "Traceback" not in err
    reason = registry.get("optimizer", name).not_estimable(None)
    assert (code, bool(reason)) in ((0, False), (2, True)), err
    if reason:
        assert err == f"memft memory: error: {reason}\n"
