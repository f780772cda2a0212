"""The block-wise randomized subspace refresh through the recipe path (bf16 tiny Llama, layer-wise 8-bit GaLore,
LM head a GaLore target): the planner's estimate is the run's tracked peak, and a resumed run draws the same
subspaces as the uninterrupted one."""

from __future__ import annotations

import json

from memft.train.loop import finetune
from memft.train.memory_estimate import recipe_memory
from memft.train.recipe import validate_recipe
from tests.conftest import crash_and_resume

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
COMPOSITION = {"name": "galore_adamw8bit", "layerwise": True, "rank": 8, "svd": "randomized", "target_modules": TARGETS}


def test_the_estimate_is_the_runs_tracked_peak(tmp_path):
    """Every step refreshes every subspace (update_proj_gap 1), on full-length packed batches as in
    tests/train/test_step.py."""
    recipe = validate_recipe({
        "model": {"dtype": "bfloat16"},
        "data": {"train": {"path": "memft:text", "format": "text", "max_examples": 120}, "max_seq_len": 96,
                 "packing": True, "eval_fraction": 0.0},
        "optimizer": {**COMPOSITION, "update_proj_gap": 1},
        "train": {"max_steps": 2, "batch_size": 4, "log_every": 1, "device": "cpu",
                  "output_dir": str(tmp_path / "run")},
        "memory": {"track_steps": 2},
    })  # fmt: skip
    finetune(recipe)
    tracked = json.loads((tmp_path / "run" / "memory.json").read_text())["peak_bytes"]
    estimated = recipe_memory(recipe, device="cpu").peak_bytes
    assert abs(estimated / tracked - 1) < 0.01, (estimated, tracked)


def test_resume_with_randomized_refreshes_is_exact(tmp_path):
    """Refreshes at steps 0, 2, 4: the run resumed from step 3's checkpoint redraws step 4's test matrices."""
    full, resumed = crash_and_resume(tmp_path, 4, model={"dtype": "bfloat16"},
                                     optimizer={**COMPOSITION, "update_proj_gap": 2},
                                     train={"max_steps": 6, "save_every": 3})
    assert resumed == full[3:]
