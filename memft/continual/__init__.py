"""Continual learning and lifelong editing with adapters.

Task sequences: `run_task_sequence(model, tokenizer, tasks, method, method_options, train_options)` trains
on tasks in order with sequential LoRA ("lora"), I-LoRA ("ilora", arXiv 2402.18865) or MoRA ("mora",
arXiv 2506.21035) and returns the accuracy matrix with average accuracy, BWT, forgetting and FWT.

Editing: `WISE(model, tokenizer).edit(prompt, target, loc_prompt=...)` (arXiv 2405.14768) writes edits
into a side memory; `evaluate_edits` measures Rel / Gen / Loc after all edits.

Names are imported on first use (PEP 562), so `memft.continual.commands` (the CLI) loads without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_SOURCES = {
    "editing": ("FineTuneEditor", "LocalityReference", "evaluate_edits", "load_edits", "locality_reference",
                "run_edit_sequence"),
    "harness": ("METHODS", "ContinualResult", "TrainOptions", "answer_accuracy", "build_method",
                "run_task_sequence"),
    "ilora": ("ILoRA", "ILoRAOptions"),
    "lora": ("LoRAOptions", "SequentialLoRA"),
    "metrics": ("EditScores", "average_accuracy", "backward_transfer", "continual_metrics", "forgetting",
                "forward_transfer", "plot_accuracy_matrix"),
    "mora": ("MoRA", "MoRALinear", "MoRAOptions"),
    "replay": ("ReplayBuffer",),
    "tasks": ("SYNTHETIC_TASKS", "Task", "encode_rows", "load_task_file", "synthetic_suite"),
    "ties": ("ties_merge",),
    "wise": ("WISE", "SideMemory", "WISEOptions", "default_edit_layer"),
}
_MODULE_OF = {name: module for module, names in _SOURCES.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'memft.continual' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"memft.continual.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
