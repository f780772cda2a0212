"""train.report_to: the run's metrics reach accelerate's trackers (TensorBoard here, read back from its event
files); the console honours log_every and prints evaluations; a tracker that is not installed is refused."""

from __future__ import annotations

import pytest

from memft.train.trackers import flatten
from tests.conftest import tiny_recipe, write_recipe

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def test_metrics_reach_tensorboard_and_the_console(tmp_path, cli, single_thread):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(out, train={"max_steps": 6, "log_every": 2,
                                                                       "eval_every": 3, "report_to": "tensorboard"},
                                                           memory={"track_steps": 1}))
    code, _, err = cli("finetune", recipe)
    assert code == 0, err
    steps = [line.split()[1] for line in err.splitlines() if line.startswith("step ")]
    assert steps == ["2/6", "4/6", "6/6"]  # log_every, not every step
    assert [line.split(":")[0] for line in err.splitlines() if line.startswith("eval at")] == \
        ["eval at step 3", "eval at step 6"]
    events = event_accumulator.EventAccumulator(str(out / "trackers" / "run"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert [step for step, _ in scalars["loss"]] == [2, 4, 6]
    assert [step for step, _ in scalars["eval_loss"]] == [3, 6]
    assert {"lr", "tokens_per_s", "eval_perplexity", "tracked_peak_bytes"} <= set(scalars)
    metrics = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(metrics) == 3
    (out / "trackers" / "notes.txt").write_text("mine")  # inside trackers/ memft owns trackers/<run name> only
    code, _, err = cli("finetune", recipe, "--overwrite")
    assert code == 0, err
    assert (out / "trackers" / "notes.txt").read_text() == "mine" and (out / "trackers" / "run").is_dir()


def test_a_tracker_that_is_not_installed_is_refused(tmp_path, cli, monkeypatch):
    import memft.train.trackers as trackers

    monkeypatch.setattr(trackers, "get_available_trackers", lambda: [])
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "run", train={"report_to": ["tensorboard"]}))
    for command in ("validate", "finetune"):
        code, _, err = cli(command, recipe)
        assert code == 2 and "train.report_to: tensorboard is not installed" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_the_recipe_is_stored_as_flat_hyperparameters():
    assert flatten({"train": {"lr": 1e-3, "report_to": ["tensorboard"], "eval_every": None}, "seed": 0}) == \
        {"train.lr": 1e-3, "train.report_to": "['tensorboard']", "train.eval_every": "None", "seed": 0}
