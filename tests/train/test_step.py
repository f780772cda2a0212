"""The planner estimates the very step `memft finetune` takes: its fake-tensor estimate is held against the
tracked peak of a real run (memory.json) for each setting that changes the step."""

from __future__ import annotations

import json

import pytest
import torch

from memft.train.loop import finetune
from memft.train.memory_estimate import recipe_memory
from memft.recipe_files import RECIPES_DIR, offline_stand_in, shipped_recipes
from memft.train.recipe import load_recipe, validate_recipe
from memft.train.step import StepDriver, count_items

# Packed text (lines of 42-47 tokens, two to a row of 96): every batch is full length and holds several
# sequences per row, as the planner's packed batches.
BASE = {"data": {"train": {"path": "memft:text", "format": "text", "max_examples": 120}, "max_seq_len": 96,
                 "packing": True, "eval_fraction": 0.0},
        "train": {"max_steps": 2, "batch_size": 4, "log_every": 1, "device": "cpu"},
        "memory": {"track_steps": 2}}
CASES = {
    "adamw": {},
    "grad_accum 4": {"train": {"grad_accum": 4}},
    "bf16 autocast": {"train": {"mixed_precision": "bf16"}},
    "eager attention": {"model": {"attn_implementation": "eager"}},
    "checkpointing": {"model": {"gradient_checkpointing": True}},
    "layer-wise galore, accumulation": {"optimizer": {"name": "galore_adamw", "rank": 8, "layerwise": True},
                                        "train": {"grad_accum": 2}},
    "mezo": {"optimizer": {"name": "mezo"}},
    "lora": {"adapter": {"name": "lora", "r": 4}},
    "cut cross-entropy": {"loss": {"name": "cut_cross_entropy"}},
    "mesa": {"activations": {"name": "mesa"}},
    "wta-crs": {"activations": {"name": "wta_crs"}},
    "s2a": {"activations": {"name": "s2a"}, "model": {"attn_implementation": "eager"}},
}


def _recipe(tmp_path, changes: dict):
    data = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value}
    data["train"]["output_dir"] = str(tmp_path / "run")
    return validate_recipe(data)


@pytest.mark.parametrize("changes", CASES.values(), ids=CASES.keys())
def test_the_estimate_is_the_runs_tracked_peak(tmp_path, changes):
    recipe = _recipe(tmp_path, changes)
    finetune(recipe)
    tracked = json.loads((tmp_path / "run" / "memory.json").read_text())["peak_bytes"]
    estimated = recipe_memory(recipe, device="cpu").peak_bytes
    assert abs(estimated / tracked - 1) < 0.01, (estimated, tracked)


def test_grad_accum_and_precision_change_the_estimate(tmp_path):
    base = recipe_memory(_recipe(tmp_path, {}), device="cpu").peak_bytes
    assert recipe_memory(_recipe(tmp_path, CASES["grad_accum 4"]), device="cpu").peak_bytes > base
    assert recipe_memory(_recipe(tmp_path, CASES["bf16 autocast"]), device="cpu").peak_bytes < base
    assert recipe_memory(_recipe(tmp_path, CASES["eager attention"]), device="cpu").peak_bytes > base


def test_accumulated_micro_batches_give_the_gradient_of_the_whole_batch():
    torch.manual_seed(0)
    from memft.train.distributed import Engine

    recipe = validate_recipe(BASE)
    model = torch.nn.Module()
    model.head = torch.nn.Linear(8, 5)

    class Output:
        def __init__(self, loss):
            self.loss = loss

    def forward(input_ids, labels, num_items_in_batch, use_cache, attention_mask=None):
        logits = model.head(torch.nn.functional.one_hot(input_ids, 8).float())[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 5), labels[:, 1:].reshape(-1), reduction="sum")
        return Output(loss / num_items_in_batch)

    model.forward = forward
    engine = Engine(recipe)
    driver = StepDriver("backprop", engine, engine.accelerator(on_cpu=True))
    ids = torch.randint(0, 8, (4, 6))
    labels = torch.randint(0, 5, (4, 6))
    labels[0, 3:] = -100
    whole = [{"input_ids": ids, "labels": labels}]
    halves = [{"input_ids": ids[:2], "labels": labels[:2]}, {"input_ids": ids[2:], "labels": labels[2:]}]
    start = {k: v.clone() for k, v in model.head.state_dict().items()}
    after = []
    for micro in (whole, halves):
        model.head.load_state_dict(start)
        loss = driver.step(model, torch.optim.SGD(model.head.parameters(), lr=1.0), micro)
        after.append((float(loss), {k: v.clone() for k, v in model.head.state_dict().items()}))
    assert count_items(whole) == count_items(halves) == 4 * 5 - 3
    assert after[0][0] == pytest.approx(after[1][0], rel=1e-6)
    assert all(torch.allclose(after[0][1][k], after[1][1][k], atol=1e-6) for k in start)
    assert not torch.equal(after[0][1]["weight"], start["weight"])


@pytest.mark.parametrize("name", shipped_recipes(kind="finetune"))
def test_the_estimate_of_each_shipped_recipe_is_its_runs_tracked_peak(tmp_path, name):
    """Each shipped recipe's methods, sizes and precision, on full-length (packed) batches for two steps."""
    full_length = {"train": {"path": "memft:text", "format": "text", "max_examples": 400}, "packing": True,
                   "eval_fraction": 0.0}
    stand_in = offline_stand_in(name)  # a hub model's recipe runs on the bundled one
    shipped = load_recipe(RECIPES_DIR / f"{name}.yaml", stand_in)
    data = {**full_length, "max_seq_len": shipped.data.max_seq_len}
    recipe = load_recipe(RECIPES_DIR / f"{name}.yaml", [
        *stand_in, f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.device=cpu",
        "memory.track_steps=2", f"data={json.dumps(data)}"])
    finetune(recipe)
    tracked = json.loads((tmp_path / "run" / "memory.json").read_text())["peak_bytes"]
    estimated = recipe_memory(recipe, device="cpu").peak_bytes
    assert abs(estimated / tracked - 1) < 0.01, (estimated, tracked)
