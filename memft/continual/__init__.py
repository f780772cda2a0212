"""Continual learning and lifelong editing with adapters.

Task sequences: `run_task_sequence(model, tokenizer, tasks, method, method_options, train_options)` trains
on tasks in order with sequential LoRA ("lora"), I-LoRA ("ilora", arXiv 2402.18865) or MoRA ("mora",
arXiv 2506.21035) and returns the accuracy matrix with average accuracy, BWT, forgetting and FWT.

Editing: `WISE(model, tokenizer).edit(prompt, target, loc_prompt=...)` (arXiv 2405.14768) writes edits
into a side memory; `evaluate_edits` measures Rel / Gen / Loc after all edits.
"""

from memft.continual.editing import (FineTuneEditor, LocalityReference, evaluate_edits, load_edits,
                                     locality_reference, run_edit_sequence)
from memft.continual.harness import (METHODS, ContinualResult, TrainOptions, answer_accuracy, build_method,
                                     run_task_sequence)
from memft.continual.ilora import ILoRA, ILoRAOptions
from memft.continual.lora import LoRAOptions, SequentialLoRA
from memft.continual.metrics import (EditScores, average_accuracy, backward_transfer, continual_metrics,
                                     forgetting, forward_transfer, plot_accuracy_matrix)
from memft.continual.mora import MoRA, MoRALinear, MoRAOptions
from memft.continual.replay import ReplayBuffer
from memft.continual.tasks import SYNTHETIC_TASKS, Task, encode_rows, load_task_file, synthetic_suite
from memft.continual.ties import ties_merge
from memft.continual.wise import WISE, SideMemory, WISEOptions, default_edit_layer

__all__ = [
    "METHODS", "SYNTHETIC_TASKS", "ContinualResult", "EditScores", "FineTuneEditor", "ILoRA", "ILoRAOptions",
    "LoRAOptions", "LocalityReference", "MoRA", "MoRALinear", "MoRAOptions", "ReplayBuffer", "SequentialLoRA",
    "SideMemory", "Task", "TrainOptions", "WISE", "WISEOptions", "answer_accuracy", "average_accuracy",
    "backward_transfer", "build_method", "continual_metrics", "default_edit_layer", "encode_rows",
    "evaluate_edits", "forgetting", "forward_transfer", "load_edits", "load_task_file", "locality_reference",
    "plot_accuracy_matrix", "run_edit_sequence", "run_task_sequence", "synthetic_suite", "ties_merge",
]
