"""Multi-process runs: `memft finetune` started as a subprocess, which launches 2 processes (gloo on CPU)."""

import json
import os
import subprocess
import sys

import pytest

# 4 steps of the tiny model on a fixed global batch of 8; a constant lr so that a run stopped after 2
# steps and resumed to 4 sees the same schedule as an uninterrupted one.
COMMON = ("train.log_every=1", "memory.track_steps=0", "train.eval_batches=1", "data.train.max_examples=300",
          "train.lr_schedule=constant", "train.warmup_steps=0")
# GaLore with its subspace from the first (averaged) gradient, kept for the 4 steps: a resumed run must
# restore it from the checkpoint. (A refresh later in the run is not compared: an SVD turns rounding-level
# differences of the averaged gradient into a visibly different subspace when singular values sit close
# at the cut.)
GALORE = ("optimizer.name=galore_adamw", "optimizer.rank=16", "optimizer.update_proj_gap=3", "optimizer.lr=5e-3")


def memft(*args: str, cwd, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "memft.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


def losses(run_dir) -> dict[int, float]:
    """Training loss per step from metrics.jsonl (a resumed run appends to the same file)."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def single_process_losses(tmp_path, *overrides: str, steps: int = 4) -> dict[int, float]:
    out = tmp_path / "single"
    memft("finetune", "quickstart", *COMMON, *overrides, f"train.max_steps={steps}", "train.batch_size=8",
          f"train.output_dir={out}", cwd=tmp_path)
    return losses(out)


@pytest.fixture
def run_two_processes(tmp_path):
    """Run `engine` with 2 processes: 2 steps, then --resume to 4 (checkpoint at step 2 by the engine)."""

    def run(engine: str, *overrides: str, resume: bool = True) -> dict[int, float]:
        out = tmp_path / engine
        base = ("finetune", "quickstart", *COMMON, *overrides, "train.batch_size=4", f"distributed.engine={engine}",
                "distributed.nproc_per_node=2", f"train.output_dir={out}")
        if resume:
            memft(*base, "train.max_steps=2", cwd=tmp_path)
            assert (out / "checkpoints" / "step-0000002").is_dir()
            memft(*base, "train.max_steps=4", "--resume", cwd=tmp_path)
        else:
            memft(*base, "train.max_steps=4", cwd=tmp_path)
        return losses(out)

    return run
