"""SIGKILL at random points of a run, many inside checkpoint writing (torn files, before renames and
fsyncs); each kill is followed by a resume, and the run must end exactly as an uninterrupted one: the same
per-step metrics (one line per step) and bitwise the same final weights.

Each life of the run, and the uninterrupted run, is a forked child of the test process (the libraries
are imported once) on one thread (OpenMP's thread pool does not survive a fork), which kills itself with
SIGKILL when its randomly drawn event comes. Events are: the end of every optimizer
step, every `torch.save` / `save_file` (killed half-way through writing the file), every `os.rename`,
`os.replace` and `os.fsync`.
"""

from __future__ import annotations

import io
import itertools
import os
import random
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memft.train import run_dir
from memft.train.loop import Trainer, finetune
from memft.train.recipe import validate_recipe
from tests.reliability.conftest import small_recipe, step_lines

KILLS = 20
RECIPE = {"train": {"max_steps": 40, "save_every": 1, "keep_checkpoints": 2, "eval_every": 10}}


def _die_at(kill_at: int) -> None:
    """In the child: count events and SIGKILL this process at event `kill_at`."""
    import memft.train.checkpoint as checkpoint
    from safetensors.torch import save as safetensors_bytes

    counter = itertools.count(1)

    def now() -> bool:
        return next(counter) == kill_at

    def kill() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def torn(write_bytes):
        def write(obj, path, *args, **kwargs):
            if now():
                data = write_bytes(obj)
                Path(path).write_bytes(data[: len(data) // 2])
                kill()
            return write.real(obj, path, *args, **kwargs)
        return write

    def before(real):
        def call(*args, **kwargs):
            if now():
                kill()
            return real(*args, **kwargs)
        return call

    def buffer(obj):
        out = io.BytesIO()
        torch_save(obj, out)
        return out.getvalue()

    torch_save = torch.save
    torch.save = torn(buffer)
    torch.save.real = torch_save
    checkpoint.save_file = torn(lambda tensors: safetensors_bytes(tensors))
    checkpoint.save_file.real = load_save_file()
    os.rename, os.replace, os.fsync = before(os.rename), before(os.replace), before(os.fsync)
    step = Trainer.train_step

    def train_step(self, micro):
        loss = step(self, micro)
        if now():
            kill()
        return loss

    Trainer.train_step = train_step


def load_save_file():
    from safetensors.torch import save_file

    return save_file


def _life(run: Path, kill_at: int | None) -> int:
    """Run (or resume) in a forked child; returns the child's wait status."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            torch.set_num_threads(1)
            if kill_at is not None:
                _die_at(kill_at)
            resume = (run / "run.json").exists()
            finetune(validate_recipe(small_recipe(run, **RECIPE)), resume=resume)
            code = 0
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_exact(tmp_path):
    assert os.waitstatus_to_exitcode(_life(tmp_path / "uninterrupted", None)) == 0
    run, draws = tmp_path / "killed", random.Random(19)
    kills = []
    while len(kills) < KILLS:
        kill_at = draws.randint(1, 30)
        status = _life(run, kill_at)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
            f"life {len(kills) + 1} (kill at event {kill_at}) ended with status {status}, kills so far {kills}"
        kills.append(kill_at)
    assert os.waitstatus_to_exitcode(_life(run, None)) == 0

    assert step_lines(run) == step_lines(tmp_path / "uninterrupted")
    expected = load_file(tmp_path / "uninterrupted" / "final" / "model.safetensors")
    final = load_file(run / "final" / "model.safetensors")
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected)
    leftovers = [p.name for p in [*run.iterdir(), *(run / "checkpoints").iterdir()] if ".tmp" in p.name]
    assert not leftovers
    run_dir.RunLock(run).acquire().release()  # no lock left behind
