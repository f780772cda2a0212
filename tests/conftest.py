"""Shared fixtures: quiet libraries, the bundled tiny model, small recipes."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Without a GPU, Triton kernels run in its interpreter; the variable must be set before any test module
# (or a library such as transformers) imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import yaml  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """Every test, and every module- or session-scoped fixture, runs on one intra-op thread: the tiny models
    here issue many small ops, and on a loaded 2-core machine OpenMP hand-offs between threads would
    dominate the time (and reductions stay in one order). Restored when the session ends."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_recipe(output_dir, **sections) -> dict:
    """A recipe dict for a seconds-long run of the bundled tiny Llama."""
    recipe = {
        "model": {"name_or_path": "memft:tiny-llama"},
        "data": {"train": {"path": "memft:alpaca", "format": "alpaca", "max_examples": 200},
                 "max_seq_len": 64, "eval_fraction": 0.1},
        "optimizer": {"name": "adamw", "lr": 2e-3},
        "train": {"output_dir": str(output_dir), "max_steps": 8, "batch_size": 4, "log_every": 1,
                  "eval_batches": 2, "device": "cpu"},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    return recipe


@pytest.fixture
def recipe_dict(tmp_path):
    return tiny_recipe(tmp_path / "run")


def crash(recipe: dict, after: int) -> None:
    """Run `recipe` and die (SystemExit, a power cut) once `after` steps are done."""
    from memft.train.loop import Trainer
    from memft.train.recipe import validate_recipe

    trainer = Trainer(validate_recipe(recipe))
    original = trainer.train_step

    def power_cut(micro):
        if trainer.step == after:
            raise SystemExit("power cut")
        return original(micro)

    trainer.train_step = power_cut
    with pytest.raises(SystemExit):
        trainer.run()


def crash_and_resume(tmp_path, crash_after: int, **sections) -> tuple[list[float], list[float]]:
    """Run a tiny recipe uninterrupted (in tmp_path/a) and again (in tmp_path/b) with a crash once
    `crash_after` steps are done, then resume b from its latest checkpoint. Returns the uninterrupted
    losses and the resumed run's losses."""
    from memft.train.loop import finetune
    from memft.train.recipe import validate_recipe

    full = finetune(validate_recipe(tiny_recipe(tmp_path / "a", **sections)))
    crash(tiny_recipe(tmp_path / "b", **sections), crash_after)
    resumed = finetune(validate_recipe(tiny_recipe(tmp_path / "b", **sections)), resume=True)
    return full.losses, resumed.losses


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def cli(capsys):
    """Run `memft.cli.main(args)` in this process; returns (exit code, stdout, stderr)."""
    from memft.cli import main

    def run(*args):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


class FakeAllocator:
    """The CUDA caching allocator's peak counters, for a machine without a GPU."""

    def __init__(self):
        self.peak, self.resets = 0, 0

    def allocate(self, nbytes: int) -> None:
        self.peak = max(self.peak, nbytes)

    def max_memory_allocated(self, device=None) -> int:
        return self.peak

    def max_memory_reserved(self, device=None) -> int:
        return self.peak + 512

    def reset_peak_memory_stats(self, device=None) -> None:
        self.peak, self.resets = 0, self.resets + 1
