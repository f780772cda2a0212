"""Multi-process runs (2 processes, gloo on CPU) of the quickstart recipe, and the single-process runs
they must reproduce.

Every run is as small as the checks allow: 3 steps on a global batch of 4 rows (2 per process) from 12
rows of up to 64 tokens (none truncated), with a constant lr so that a run stopped after step 1 and
resumed to step 3 sees the same schedule as an uninterrupted one. Step 2's loss checks the restored
weights and data position; step 3's loss is the first to depend on restored optimizer state (the
moments, GaLore's projector), since step 2's update used it. No evaluation (data.eval_fraction 0) and
no memory tracking unless a test checks them.

A launch costs seconds of process start-up and imports whatever it computes, so each single-process
baseline runs once per session, in this process (`single_process`), and each multi-process check
takes the fewest launches: one run stopped after step 1, then one `--resume` to step 3. The launches
start the 2 processes with torchrun directly, as `memft finetune` does after checking the recipe; one
test (`two_processes`) goes through `memft finetune --nproc 2` itself.
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

STEPS, STOP = 3, 1  # steps of every run; the step after which a resumed run is stopped
PER_PROCESS, PROCESSES = 2, 2
COMMON = ("data.train.max_examples=12", "data.max_seq_len=64", "data.eval_fraction=0", "train.log_every=1",
          "memory.track_steps=0", "train.lr_schedule=constant", "train.warmup_steps=0")
# GaLore with its subspace from the first (averaged) gradient, kept for the 3 steps: a resumed run must
# restore it from the checkpoint. (A refresh is not compared: an SVD turns rounding-level differences of
# the averaged gradient into a visibly different subspace when singular values sit close at the cut.)
GALORE = ("optimizer.name=galore_adamw", "optimizer.rank=16", "optimizer.update_proj_gap=3", "optimizer.lr=5e-3")


@dataclass(frozen=True)
class Run:
    losses: dict[int, float]  # training loss per step
    out: Path  # the run's output directory


def _run(command: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


def memft(*args: str, cwd) -> subprocess.CompletedProcess:
    """`memft ARGS` as a subprocess (`memft finetune` with an engine starts the processes itself)."""
    return _run([sys.executable, "-m", "memft.cli", *args], cwd)


def torchrun(*args: str, cwd) -> subprocess.CompletedProcess:
    """`memft ARGS` in each of 2 processes started by torchrun directly (what `memft finetune` runs,
    without its own start-up in a process of its own)."""
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={PROCESSES}",
                 "-m", "memft.cli", *args], cwd)


def losses(run_dir) -> dict[int, float]:
    """Training loss per step from metrics.jsonl (a resumed run appends to the same file)."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


@pytest.fixture(scope="session")
def single_process(tmp_path_factory):
    """`single_process(*overrides)`: the run of one process on the whole global batch (STEPS steps of
    PER_PROCESS x PROCESSES rows), computed once per session for each set of overrides."""
    from memft.recipe_files import load_finetune_recipe
    from memft.train.loop import finetune

    runs: dict[tuple[str, ...], Run] = {}

    def run(*overrides: str) -> Run:
        if overrides not in runs:
            out = tmp_path_factory.mktemp("single") / "run"
            recipe = load_finetune_recipe("quickstart", [*COMMON, *overrides, f"train.max_steps={STEPS}",
                                                         f"train.batch_size={PER_PROCESS * PROCESSES}",
                                                         f"train.output_dir={out}"])
            finetune(recipe)
            runs[overrides] = Run(losses(out), out)
        return runs[overrides]

    return run


def _arguments(out: Path, engine: str, overrides, steps: int) -> list[str]:
    return ["finetune", "quickstart", *COMMON, *overrides, f"train.batch_size={PER_PROCESS}",
            f"distributed.engine={engine}", f"train.output_dir={out}", f"train.max_steps={steps}"]


@pytest.fixture
def two_processes(tmp_path):
    """`two_processes(engine, *overrides)`: STEPS steps with 2 processes started by `memft finetune
    --nproc 2` (which checks the recipe, then starts them)."""

    def run(engine: str, *overrides: str) -> Run:
        out = tmp_path / engine
        memft(*_arguments(out, engine, overrides, STEPS), "--nproc", str(PROCESSES), cwd=tmp_path)
        return Run(losses(out), out)

    return run


@pytest.fixture
def two_processes_resumed(tmp_path):
    """`two_processes_resumed(engine, *overrides, first=())`: 2 processes stopped after step STOP (the
    engine's checkpoint at the end of that launch), then 2 new ones with `--resume` to STEPS.
    `first`: overrides for the first launch only (settings a resumed run may change)."""

    def run(engine: str, *overrides: str, first: tuple[str, ...] = ()) -> Run:
        out = tmp_path / engine
        torchrun(*_arguments(out, engine, (*overrides, *first), STOP), cwd=tmp_path)
        assert (out / "checkpoints" / f"step-{STOP:07d}").is_dir()
        torchrun(*_arguments(out, engine, overrides, STEPS), "--resume", cwd=tmp_path)
        return Run(losses(out), out)

    return run
