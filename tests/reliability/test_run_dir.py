"""The run directory: --overwrite deletes only what memft wrote, one run at a time, resume after moves and
kills leaves one metrics line per step, Ctrl-C never prints a traceback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from memft.errors import RunError
from memft.train import run_dir
from memft.train.loop import Trainer, finetune
from memft.train.recipe import validate_recipe
from tests.conftest import crash, write_recipe
from tests.reliability.conftest import memft_process, small_recipe, step_lines


# ------------------------------------------------------------------------------------- --overwrite
def test_overwrite_never_writes_into_or_deletes_a_foreign_directory(tmp_path, cli):
    mine = tmp_path / "mydir"
    mine.mkdir()
    (mine / "thesis.txt").write_text("precious")
    recipe = write_recipe(tmp_path / "r.yaml", small_recipe(mine))
    for _ in range(2):
        code, _, err = cli("finetune", recipe, "--overwrite")
        assert code == 2 and "holds files memft did not write (thesis.txt)" in err and "Traceback" not in err
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.txt"]  # not even a lock file
    assert (mine / "thesis.txt").read_text() == "precious"


def test_overwrite_removes_only_memft_files_and_keeps_the_directory(tmp_path, cli, monkeypatch):
    # A project directory used as the run directory (train.output_dir=.), twice with --overwrite, after the
    # user put files of their own next to the run and into its checkpoints/.
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    recipe = write_recipe(tmp_path / "r.yaml", small_recipe(".", train={"max_steps": 2}))
    assert cli("finetune", recipe)[0] == 0
    (project / "notes.txt").write_text("mine")
    (project / "checkpoints" / "README").write_text("mine too")
    for _ in range(2):
        code, _, err = cli("finetune", recipe, "--overwrite")
        assert code == 0, err
        assert "kept the files memft did not write (checkpoints" not in err
        assert "kept the files memft did not write (notes.txt)" in err
    assert (project / "notes.txt").read_text() == "mine"
    assert (project / "checkpoints" / "README").read_text() == "mine too"
    assert (project / "final").is_dir() and (project / "run.json").is_file()


def test_a_run_that_failed_before_starting_leaves_only_its_own_files(tmp_path, cli):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", small_recipe(out))
    code, _, err = cli("finetune", recipe, "data.train.path=missing.jsonl")
    assert code == 2 and "missing.jsonl" in err
    assert all(run_dir.is_owned(p) for p in out.iterdir())
    assert cli("finetune", recipe, "train.max_steps=1")[0] == 0  # the same directory starts a run


# --------------------------------------------------------------------------------------------- lock
def test_a_second_run_in_the_same_directory_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    lock, _ = run_dir.prepare(out, {}, resume=False, overwrite=False)
    try:
        with pytest.raises(RunError, match=rf"in use by another memft run \(process {os.getpid()} on "):
            run_dir.prepare(out, {}, resume=False, overwrite=True)
    finally:
        lock.release()
    run_dir.prepare(out, {}, resume=False, overwrite=False)[0].release()  # free again


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from memft.train.run_dir import RunLock; "
        f"Path({str(out)!r}).mkdir(); lock = RunLock(Path({str(out)!r})).acquire(); print('locked', flush=True); "
        "time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunError, match=f"process {holder.pid} on"):
            run_dir.prepare(out, {}, resume=False, overwrite=False)
    finally:
        holder.kill()
        holder.wait()
    lock, _ = run_dir.prepare(out, {}, resume=False, overwrite=False)  # the kernel released the dead lock
    lock.release()


def test_concurrent_runs_cannot_mix_their_outputs(tmp_path):
    recipe = small_recipe(tmp_path / "run", train={"max_steps": 3})
    first = Trainer(validate_recipe(recipe))  # holds the directory from here on
    with pytest.raises(RunError, match="in use by another memft run"):
        Trainer(validate_recipe(small_recipe(tmp_path / "run", optimizer={"lr": 1e-3})), overwrite=True)
    first.run()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["recipe"]["optimizer"]["lr"] == 2e-3
    assert [r["step"] for r in step_lines(tmp_path / "run") if "loss" in r] == [1, 2, 3]


# ------------------------------------------------------------------------------------------ resume
def test_resume_after_a_crash_leaves_one_metrics_line_per_step(tmp_path):
    recipe = small_recipe(tmp_path / "b", train={"max_steps": 8, "save_every": 3})
    full = finetune(validate_recipe(small_recipe(tmp_path / "a", train={"max_steps": 8, "save_every": 3})))
    crash(recipe, after=5)  # steps 4 and 5 are logged, then lost: the last checkpoint is step 3
    resumed = finetune(validate_recipe(recipe), resume=True)
    assert resumed.losses == full.losses[3:]
    assert step_lines(tmp_path / "b") == step_lines(tmp_path / "a")


def test_a_moved_run_resumes_in_its_new_place(tmp_path):
    crash(small_recipe(tmp_path / "old", train={"max_steps": 6, "save_every": 2}), after=3)
    shutil.move(tmp_path / "old", tmp_path / "new")
    full = finetune(validate_recipe(small_recipe(tmp_path / "a", train={"max_steps": 6, "save_every": 2})))
    resumed = finetune(validate_recipe(small_recipe(tmp_path / "new", train={"max_steps": 6, "save_every": 2})),
                       resume=True)
    assert resumed.losses == full.losses[2:]


def test_a_run_killed_before_its_first_checkpoint(tmp_path, cli):
    out = tmp_path / "run"
    recipe = small_recipe(out, train={"max_steps": 4})
    crash(recipe, after=2)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    code, _, err = cli("finetune", path)
    assert code == 2 and "stopped before its first checkpoint" in err
    assert "--resume" in err and "starts again from step 0" in err and "--overwrite" in err
    code, _, err = cli("finetune", path, "--resume")
    assert code == 0 and "has no checkpoint yet" in err and "starting it from step 0" in err
    full = finetune(validate_recipe(small_recipe(tmp_path / "a", train={"max_steps": 4})))
    assert step_lines(out) == step_lines(tmp_path / "a") and full.steps == 4


# ------------------------------------------------------------------------------------------- Ctrl-C
def _wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_ctrl_c_at_start_up_prints_no_traceback(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", small_recipe(tmp_path / "run", train={"max_steps": 100000}))
    early = memft_process("finetune", recipe)
    _wait_for(lambda: (tmp_path / "run" / ".memft.lock").exists())  # loading the model and data
    early.send_signal(signal.SIGINT)
    _, err = early.communicate(timeout=120)
    assert early.returncode == 130 and "Traceback" not in err
    assert "Ctrl-C: stopping at the end of the current step" in err and "Interrupted " in err


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(tmp_path, cli, monkeypatch):
    original = Trainer.train_step

    def two_ctrl_c(self, micro):
        if self.step == 2:
            self._request_stop(signal.SIGINT, None)
            self._request_stop(signal.SIGINT, None)  # raises KeyboardInterrupt, as the handler does
        return original(self, micro)

    monkeypatch.setattr(Trainer, "train_step", two_ctrl_c)
    recipe = write_recipe(tmp_path / "r.yaml", small_recipe(tmp_path / "run", train={"save_every": 1}))
    code, _, err = cli("finetune", recipe)
    assert code == 130 and "stopping at the end of the current step" in err and "stopped at once" in err
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-0000002"
    monkeypatch.setattr(Trainer, "train_step", original)
    assert cli("finetune", recipe, "--resume")[0] == 0
