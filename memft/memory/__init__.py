"""Memory measurement for memft: exact tracking, fake-tensor estimation, GPU fit, reports.

- ``track(model, optimizer)`` / ``MemoryTracker``: live tensor storage by category during real steps.
- ``estimate_training_memory`` / ``estimate_from_config``: the same step on fake tensors (no allocation);
  ``measure_training_memory`` / ``hf_training_setup(...).measure()``: the same step on real tensors.
- ``get_gpu`` / ``fits_table``: consumer and data-centre GPU capacities.
- ``MemoryReport`` and its renderings: terminal table, markdown, JSON, PNG bars, comparisons.
"""

from memft.memory.estimate import (
    HFTrainingSetup,
    default_loss,
    default_train_step,
    estimate_from_config,
    estimate_training_memory,
    hf_training_setup,
    list_configs,
    load_config,
    measure_training_memory,
)
from memft.memory.gpus import CONSUMER_GPUS, GPU, GPUS, FitRow, fits_table, get_gpu
from memft.memory.report import (
    CATEGORIES,
    MemoryReport,
    comparison_markdown,
    largest_category,
    plot_breakdown,
    plot_comparison,
    print_report,
    render_table,
    save_report,
    suggestions,
    to_json_dict,
    to_markdown,
)
from memft.memory.tracker import MemoryTracker, track

__all__ = [
    "CATEGORIES",
    "CONSUMER_GPUS",
    "GPU",
    "GPUS",
    "FitRow",
    "HFTrainingSetup",
    "MemoryReport",
    "MemoryTracker",
    "comparison_markdown",
    "default_loss",
    "default_train_step",
    "estimate_from_config",
    "estimate_training_memory",
    "fits_table",
    "get_gpu",
    "hf_training_setup",
    "largest_category",
    "list_configs",
    "load_config",
    "measure_training_memory",
    "plot_breakdown",
    "plot_comparison",
    "print_report",
    "render_table",
    "save_report",
    "suggestions",
    "to_json_dict",
    "to_markdown",
    "track",
]
