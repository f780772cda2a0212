"""A run under `accelerate launch` or `torchrun`: the launcher's choices fill what the recipe leaves open, a real
disagreement is refused, and memft starts no processes of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from memft.errors import RecipeError
from memft.recipe_files import load_finetune_recipe
from memft.train import launcher

ACCELERATE_ONE = {"ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_USE_CPU": "True"}
ACCELERATE_TWO = {"ACCELERATE_MIXED_PRECISION": "no", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}


def under(env, overrides=()):
    """The quickstart recipe as a launch with `env` would run it, and the notes printed."""
    reload = lambda extra: load_finetune_recipe("quickstart", [*overrides, *extra])  # noqa: E731
    return launcher.reconcile(reload([]), launcher.detect(env), reload)


def test_a_plain_command_has_no_launcher():
    assert launcher.detect({}) is None
    assert launcher.detect({"LOCAL_RANK": "0", launcher.STARTED_BY_MEMFT: "1"}) is None


def test_the_launchers_precision_fills_a_silent_recipe():
    recipe, notes = under(ACCELERATE_ONE)
    assert recipe.train.mixed_precision == "bf16" and recipe.distributed.nproc_per_node == 1
    assert notes == ["From accelerate launch: distributed.nproc_per_node=1, train.mixed_precision=bf16 (the recipe "
                     "leaves them to the launcher)."]


def test_accelerates_default_precision_never_overrides_the_recipe():
    recipe, _ = under({**ACCELERATE_ONE, "ACCELERATE_MIXED_PRECISION": "no"}, ["train.mixed_precision=bf16"])
    assert recipe.train.mixed_precision == "bf16"


def test_a_disagreement_is_refused_with_both_values_and_the_fix():
    with pytest.raises(RecipeError, match=r"train.mixed_precision: the recipe says 'fp16', accelerate launch says "
                                          r"'bf16'.*train.mixed_precision=bf16"):
        under(ACCELERATE_ONE, ["train.mixed_precision=fp16"])


def test_several_processes_get_an_engine():
    recipe, _ = under(ACCELERATE_TWO)
    assert (recipe.distributed.engine, recipe.distributed.nproc_per_node) == ("ddp", 2)
    recipe, _ = under({**ACCELERATE_TWO, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1",
                       "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"})
    assert (recipe.distributed.engine, recipe.distributed.deepspeed.stage, recipe.train.grad_accum) == \
        ("deepspeed", 1, 4)
    with pytest.raises(RecipeError, match=r"distributed.engine: the recipe says 'none', accelerate launch says 'ddp'"):
        under(ACCELERATE_TWO, ["distributed.engine=none"])
    with pytest.raises(RecipeError, match=r"torchrun started 2 processes and the recipe runs one.*"
                                          r"distributed.engine=ddp"):
        under({"LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})
    with pytest.raises(RecipeError, match=r"distributed.nproc_per_node: the recipe says 4, accelerate launch says 2"):
        under(ACCELERATE_TWO, ["distributed.nproc_per_node=4"])


def test_fp8_is_refused():
    with pytest.raises(RecipeError, match="mixed_precision 'fp8'"):
        launcher.detect({"ACCELERATE_MIXED_PRECISION": "fp8"})


def test_accelerate_launch_mixed_precision_reaches_the_run(tmp_path):
    """The real launcher: `accelerate launch --cpu --mixed_precision bf16 -m memft.cli finetune quickstart`
    trains with bf16 autocast in this one process (the recipe stored with the run says so)."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
               "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no", "-m", "memft.cli",
               "finetune", "quickstart", f"train.output_dir={out}", "train.max_steps=2", "train.batch_size=2",
               "data.train.max_examples=16", "data.max_seq_len=32", "memory.track_steps=0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "From accelerate launch: distributed.nproc_per_node=1, train.mixed_precision=bf16" in done.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["recipe"]["train"]["mixed_precision"] == "bf16"
