"""Train a model on tasks in order and measure forgetting: the continual-learning harness.

    result = run_task_sequence(model, tokenizer, synthetic_suite(), method="ilora",
                               method_options={"buffer_size": 200}, train_options={"steps_per_task": 60},
                               output_dir="runs/cl")

Each task is trained for `steps_per_task` AdamW steps (a fresh optimizer per task, constant learning
rate, gradient clipping) on shuffled batches; after each task every task is evaluated, giving row i of
the accuracy matrix R. Accuracy is exact match of the answer tokens (EOS excluded) under teacher forcing:
an example counts when the argmax prediction at every answer position equals the answer token. The
untrained model (method attached, nothing trained) gives the baseline b used by FWT.

With `output_dir`, a checkpoint (method state + R so far) is saved after every task, and
`resume=True` continues a sequence from it; results.json, results.md and accuracy.png are written at the
end.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from memft.continual.base import ContinualMethod
from memft.continual.ilora import ILoRA, ILoRAOptions
from memft.continual.lora import LoRAOptions, SequentialLoRA
from memft.continual.metrics import continual_metrics, plot_accuracy_matrix
from memft.continual.mora import MoRA, MoRAOptions
from memft.continual.serialization import load_state, save_state
from memft.continual.tasks import PROMPT_FORMATS, Task, encode_rows
from memft.errors import DataError, RunError
from memft.train.data import IGNORE_INDEX, BatchOrder, collate

METHODS: dict[str, tuple[type[ContinualMethod], type]] = {
    "lora": (SequentialLoRA, LoRAOptions),
    "ilora": (ILoRA, ILoRAOptions),
    "mora": (MoRA, MoRAOptions),
}
CHECKPOINT = "checkpoint"


@dataclass
class TrainOptions:
    """How each task is trained and evaluated."""
    steps_per_task: int = 100
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    max_seq_len: int = 256
    eval_batch_size: int = 64
    max_eval_examples: int | None = None
    prompt_format: str = "alpaca"
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        for name in ("steps_per_task", "batch_size", "max_seq_len", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"train option {name} must be a positive integer, got {value!r}.")
        if not self.lr > 0:
            raise ValueError(f"train option lr must be > 0, got {self.lr!r}.")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"train option max_grad_norm must be > 0 or None (no clipping), got "
                             f"{self.max_grad_norm!r}.")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"train option prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got "
                             f"'{self.prompt_format}'.")


@dataclass
class ContinualResult:
    """R (accuracy[i][j]: task j after task i), baseline b, summary metrics, per-task memory and losses."""
    method: str
    task_names: list[str]
    accuracy: list[list[float]]
    baseline: list[float]
    metrics: dict[str, float]
    parameter_bytes: list[dict[str, int]]
    losses: list[list[float]] = field(default_factory=list)
    output_dir: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def build_method(method: str | ContinualMethod, options=None) -> ContinualMethod:
    """A method instance from its name ('lora', 'ilora', 'mora') and options (dict or options dataclass)."""
    if isinstance(method, ContinualMethod):
        if options is not None:
            raise ValueError("method_options cannot be given with a method instance; configure the instance.")
        return method
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)} (or a ContinualMethod instance), got "
                         f"'{method}'.")
    cls, options_cls = METHODS[method]
    if options is None or isinstance(options, options_cls):
        return cls(options)
    if not isinstance(options, dict):
        raise TypeError(f"method_options for '{method}' must be a dict or {options_cls.__name__}, got "
                        f"{type(options).__name__}.")
    known = {f.name for f in fields(options_cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown option(s) for method '{method}': {', '.join(unknown)}. Known options: "
                         f"{', '.join(sorted(known))}.")
    return cls(options_cls(**options))


def _train_options(options) -> TrainOptions:
    if options is None:
        return TrainOptions()
    if isinstance(options, TrainOptions):
        return options
    if isinstance(options, dict):
        known = {f.name for f in fields(TrainOptions)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown train option(s): {', '.join(unknown)}. Known: {', '.join(sorted(known))}.")
        return TrainOptions(**options)
    raise TypeError(f"train_options must be a dict or TrainOptions, got {type(options).__name__}.")


@torch.no_grad()
def answer_accuracy(model, examples: list[dict], pad_id: int, eos_id: int | None, batch_size: int = 64,
                    device: str | torch.device = "cpu") -> float:
    """Fraction of examples whose answer tokens (labels != -100, EOS excluded) are all predicted exactly by
    teacher-forced argmax."""
    if not examples:
        raise ValueError("answer_accuracy needs at least one example.")
    correct = 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start: start + batch_size], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        predicted, target = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
        scored = target != IGNORE_INDEX
        if eos_id is not None:
            scored &= target != eos_id
        wrong = (predicted != target) & scored
        correct += int(((~wrong.any(dim=1)) & scored.any(dim=1)).sum())
    return correct / len(examples)


def run_task_sequence(model, tokenizer, tasks: list[Task], method: str | ContinualMethod = "lora",
                      method_options=None, train_options=None, output_dir: str | Path | None = None,
                      resume: bool = False, max_tasks: int | None = None) -> ContinualResult:
    """Train `model` (modified in place: the method attaches to it) on `tasks` in order; see module doc.

    `max_tasks` stops after that many tasks have been trained in this call (the checkpoint in
    `output_dir` lets a later call with resume=True go on); the result then covers the tasks done so far.
    """
    options = _train_options(train_options)
    if not tasks:
        raise ValueError("tasks is empty; give at least one Task (e.g. memft.continual.synthetic_suite()).")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}.")
    if resume and output_dir is None:
        raise ValueError("resume=True needs the output_dir that holds the checkpoint.")
    if max_tasks is not None and (not isinstance(max_tasks, int) or max_tasks < 1):
        raise ValueError(f"max_tasks must be a positive integer or None, got {max_tasks!r}.")
    cl = build_method(method, method_options)
    device = torch.device(options.device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_sets = [encode_rows(t.train, tokenizer, options.prompt_format, options.max_seq_len) for t in tasks]
    eval_sets = [encode_rows(t.eval[: options.max_eval_examples], tokenizer, options.prompt_format,
                             options.max_seq_len) for t in tasks]

    for name, rows in zip(names, train_sets):
        if len(rows) < options.batch_size:
            raise DataError(f"task '{name}' has {len(rows)} training rows, fewer than one batch "
                            f"(batch_size {options.batch_size}). Lower the batch size or give the task more rows.")

    torch.manual_seed(options.seed)
    model = cl.attach(model.to(device))
    out = Path(output_dir) if output_dir is not None else None

    def evaluate_all() -> list[float]:
        with cl.evaluating() as eval_model:
            return [answer_accuracy(eval_model, ex, pad_id, tokenizer.eos_token_id, options.eval_batch_size,
                                    device) for ex in eval_sets]

    progress = {"next_task": 0, "accuracy": [], "baseline": None, "parameter_bytes": [], "losses": []}
    if resume:
        progress = _resume(cl, out, names, cl.name)
    if progress["baseline"] is None:
        progress["baseline"] = evaluate_all()

    stop = len(tasks) if max_tasks is None else min(len(tasks), progress["next_task"] + max_tasks)
    for t in range(progress["next_task"], stop):
        cl.begin_task(t)
        model.train()
        optimizer = torch.optim.AdamW(cl.trainable_parameters(), lr=options.lr,
                                      weight_decay=options.weight_decay)
        order = BatchOrder(len(train_sets[t]), options.batch_size, options.seed + t)
        losses = []
        for _ in range(options.steps_per_task):
            batch = collate([train_sets[t][i] for i in order.next_indices()], pad_id)
            loss = cl.training_loss({k: v.to(device) for k, v in batch.items()})
            if not math.isfinite(loss.item()):
                raise RunError(f"task '{names[t]}': the loss became {loss.item()}. Lower train.lr.")
            loss.backward()
            if options.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(cl.trainable_parameters(), options.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            cl.after_step()
            losses.append(loss.item())
        cl.end_task(t)
        progress["accuracy"].append(evaluate_all())
        progress["parameter_bytes"].append(cl.parameter_bytes())
        progress["losses"].append(losses)
        progress["next_task"] = t + 1
        if out is not None:
            save_state(out, CHECKPOINT, {"method_name": cl.name, "task_names": names, "progress": progress,
                                         "method": cl.state_dict()})

    done = progress["next_task"]
    accuracy = [row[:done] for row in progress["accuracy"]]
    result = ContinualResult(cl.name, names[:done], accuracy, progress["baseline"][:done],
                             continual_metrics(accuracy, progress["baseline"][:done]) if done else {},
                             progress["parameter_bytes"], progress["losses"], str(out) if out else None)
    if out is not None and done == len(tasks):
        (out / "results.json").write_text(json.dumps(result.to_dict(), indent=1))
        (out / "results.md").write_text(result_markdown(result))
        plot_accuracy_matrix(result.accuracy, names, out / "accuracy.png", title=f"{cl.name}: accuracy matrix")
    return result


def result_markdown(result: ContinualResult) -> str:
    """The summary metrics and the accuracy matrix R as markdown."""
    m = result.metrics
    names = result.task_names
    lines = [f"# {result.method}: {' -> '.join(names)}", "",
             "| average accuracy | BWT | forgetting | FWT |", "|---|---|---|---|",
             f"| {m['average_accuracy']:.3f} | {m['bwt']:+.3f} | {m['forgetting']:.3f} | {m['fwt']:+.3f} |", "",
             "Accuracy matrix R (row: after training task i; column: evaluated task j):", "",
             "| after | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {names[i]} | " + " | ".join(f"{x:.3f}" for x in row) + " |" for i, row in enumerate(result.accuracy)]
    lines += ["| untrained | " + " | ".join(f"{x:.3f}" for x in result.baseline) + " |", ""]
    return "\n".join(lines)


def _resume(cl: ContinualMethod, out: Path, names: list[str], method_name: str) -> dict:
    state = load_state(out, CHECKPOINT)
    if state["method_name"] != method_name or state["task_names"] != names:
        raise RunError(f"the checkpoint in '{out}' was written by method '{state['method_name']}' on tasks "
                       f"{state['task_names']}; this run is '{method_name}' on {names}. Use the same method and "
                       "tasks, or another output_dir.")
    cl.load_state_dict(state["method"])
    return state["progress"]

