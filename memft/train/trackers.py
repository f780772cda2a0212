"""Experiment trackers for `train.report_to`: accelerate's own tracker classes (TensorBoard, W&B, MLflow, ...).

The main process starts one tracker per name, stores the recipe as the run's configuration (flattened to
dotted keys, lists as text) and logs every line the run writes to `metrics.jsonl`: training loss, lr,
tokens, tokens/s and memory per logged step, evaluation loss and perplexity, and the run's memory peaks.
Trackers that write files write them under `output_dir/trackers/` (memft owns that folder, so `--overwrite`
may remove it); TensorBoard: `tensorboard --logdir output_dir/trackers`. Offline use is the trackers' own
setting (e.g. `WANDB_MODE=offline`, an `MLFLOW_TRACKING_URI` that is a local folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
from accelerate.utils import LoggerType

from memft.errors import RecipeError
from memft.train.run_dir import TRACKERS_DIR

TRACKERS = tuple(kind.value for kind in LoggerType if kind is not LoggerType.ALL)


def check_installed(names: list[str]) -> None:
    """Refuse trackers whose library is not installed (before anything is loaded)."""
    available = {str(kind.value) if isinstance(kind, LoggerType) else str(kind) for kind in get_available_trackers()}
    missing = [name for name in names if name not in available]
    if missing:
        raise RecipeError(f"train.report_to: {', '.join(missing)} is not installed in this environment; install it "
                          f"(pip install {' '.join(missing)}) or remove it from train.report_to.")


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """`{"train": {"lr": 1}}` -> `{"train.lr": 1}`; values a tracker cannot store (lists, None) become text."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


class Trackers:
    """The run's trackers (main process): `log(record)` with a metrics line, `finish()` at the end."""

    def __init__(self, names: list[str], output_dir: Path, run_name: str, config: dict):
        check_installed(names)
        self._trackers = []
        for name in names:
            cls = LOGGER_TYPE_TO_CLASS[name]
            tracker = cls(run_name, str(output_dir / TRACKERS_DIR)) if cls.requires_logging_directory else cls(run_name)
            tracker.start()
            tracker.store_init_configuration(flatten(config))
            self._trackers.append(tracker)

    def log(self, record: dict) -> None:
        """A metrics.jsonl line (`{"step": n, ...}`); its numbers go to every tracker at that step."""
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))
                  and not isinstance(v, bool)}
        for tracker in self._trackers:
            tracker.log(values, step=record.get("step"))

    def finish(self) -> None:
        for tracker in self._trackers:
            tracker.finish()
        self._trackers = []
