"""Train a model on tasks in order and measure forgetting: the continual-learning harness.

    result = run_task_sequence(model, tokenizer, synthetic_suite(), method="ilora",
                               method_options={"buffer_size": 200}, train_options={"steps_per_task": 60},
                               optimizer={"name": "adamw", "lr": 5e-3}, output_dir="runs/cl")

Each task is trained for `steps_per_task` optimizer steps on shuffled batches, on the fine-tuning loop's
path: the optimizer comes from the recipe's `optimizer` section through memft.train.builders (a fresh one
per task, constant learning rate, over the method's trainable parameters only: `TrainableView`), and each
step is memft.train.step.StepDriver's (one micro-batch per step, gradient clipping, the optimizer's step
kind: backprop, layer-wise GaLore inside backward, or MeZO's zeroth-order step) with the method's
`training_loss` as the loss. A `loss` section with a builder (cut cross-entropy) patches the model once,
after the method is attached, and is undone at the end. After each task every task is evaluated, giving
row i of the accuracy matrix R. Accuracy is exact match of the answer tokens (EOS excluded) under teacher
forcing: an example counts when the argmax prediction at every answer position equals the answer token.
The untrained model (method attached, nothing trained) gives the baseline b used by FWT.

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
from torch import nn

from memft.continual.base import ContinualMethod
from memft.continual.ilora import ILoRA, ILoRAOptions
from memft.continual.lora import LoRAOptions, SequentialLoRA
from memft.continual.metrics import continual_metrics, plot_accuracy_matrix
from memft.continual.mora import MoRA, MoRAOptions
from memft.continual.recipe import (MOVED_TO_OPTIMIZER, combination_problems, loss_section, optimizer_section,
                                    step_recipe)
from memft.continual.serialization import load_state, save_state
from memft.continual.tasks import PROMPT_FORMATS, Task, encode_rows
from memft.errors import DataError, RecipeError, RunError
from memft.methods import registry
from memft.methods.registry import PreparedModel
from memft.train.builders import build_optimizer
from memft.train.data import IGNORE_INDEX, BatchOrder, collate
from memft.train.distributed import Engine
from memft.train.step import StepDriver

METHODS: dict[str, tuple[type[ContinualMethod], type]] = {
    "lora": (SequentialLoRA, LoRAOptions),
    "ilora": (ILoRA, ILoRAOptions),
    "mora": (MoRA, MoRAOptions),
}
CHECKPOINT = "checkpoint"


@dataclass
class TrainOptions:
    """How each task is trained and evaluated (the optimizer and its learning rate: `optimizer`)."""
    steps_per_task: int = 100
    batch_size: int = 8
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
        moved = [key for key in MOVED_TO_OPTIMIZER if key in options]
        if moved:
            raise ValueError(f"train option(s) {', '.join(moved)} moved to the optimizer: pass optimizer="
                             f"{{'name': 'adamw', {', '.join(repr(k) + ': ...' for k in moved)}}} to run_task_sequence "
                             "(the recipe's optimizer section).")
        known = {f.name for f in fields(TrainOptions)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown train option(s): {', '.join(unknown)}. Known: {', '.join(sorted(known))}.")
        return TrainOptions(**options)
    raise TypeError(f"train_options must be a dict or TrainOptions, got {type(options).__name__}.")


class _Matrix(nn.Linear):
    """A trainable matrix seen as the weight of a linear layer (how GaLore recognises what it projects)."""

    def __init__(self, weight: nn.Parameter):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.register_parameter("bias", None)


class _Parameter(nn.Module):
    """Any other trainable tensor (biases, norm scales), as a `weight` the optimizers update plainly."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight


class TrainableView(nn.Module):
    """The continual method's trainable parameters as a module, for the shared optimizer builders and step.

    `parameters()` are exactly `cl.trainable_parameters()`, in that order, whatever else in the model requires
    grad (I-LoRA's slow adapter, a base weight a method left unfrozen): the optimizer is built on them, and
    clipping and MeZO's perturbations cover only them. Each one is the `weight` of a child named after its
    full name in the model with `__` for dots (matrices are linear layers: GaLore's `target_modules` match
    those names, so the defaults project the factors or experts of the q_proj, ..., down_proj adapters).
    `train(mode)` sets the mode of the whole attached model (MeZO's eval-mode passes)."""

    def __init__(self, model: nn.Module, parameters: list[nn.Parameter]):
        super().__init__()
        object.__setattr__(self, "attached", model)  # not a child: its other parameters stay out
        names = {id(p): n for n, p in model.named_parameters()}
        seen = set()
        for i, param in enumerate(parameters):
            if id(param) in seen:
                continue
            seen.add(id(param))
            key = names.get(id(param), f"parameter_{i}").replace(".", "__")
            self.add_module(key, _Matrix(param) if param.ndim == 2 else _Parameter(param))

    def train(self, mode: bool = True) -> TrainableView:
        self.attached.train(mode)
        return super().train(mode)


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
                      resume: bool = False, max_tasks: int | None = None, optimizer=None,
                      loss=None) -> ContinualResult:
    """Train `model` (modified in place: the method attaches to it) on `tasks` in order; see module doc.

    `max_tasks` stops after that many tasks have been trained in this call (the checkpoint in
    `output_dir` lets a later call with resume=True go on); the result then covers the tasks done so far.
    `optimizer` and `loss`: recipe sections or dicts as in a recipe's `optimizer` / `loss` (default adamw
    at lr 2e-3, cross_entropy); combinations the method cannot train with raise RecipeError.
    """
    options = _train_options(train_options)
    optimizer, loss = optimizer_section(optimizer), loss_section(loss)
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
    problems = combination_problems(cl.name, getattr(cl, "options", None), optimizer, loss, options.max_grad_norm)
    if problems:
        raise RecipeError(f"method {cl.name} cannot train with optimizer {optimizer.name} and loss {loss.name}:\n"
                          + "\n".join(f"  - {p}." for p in problems))
    recipe = step_recipe(optimizer, loss, options.max_grad_norm)
    device = torch.device(options.device)
    train_sets = [encode_rows(t.train, tokenizer, options.prompt_format, options.max_seq_len) for t in tasks]
    eval_sets = [encode_rows(t.eval[: options.max_eval_examples], tokenizer, options.prompt_format,
                             options.max_seq_len) for t in tasks]

    for name, rows in zip(names, train_sets):
        if len(rows) < options.batch_size:
            raise DataError(f"task '{name}' has {len(rows)} training rows, fewer than one batch "
                            f"(batch_size {options.batch_size}). Lower the batch size or give the task more rows.")

    torch.manual_seed(options.seed)
    model = cl.attach(model.to(device))
    prepared = PreparedModel(model)
    build_loss = registry.get("loss", loss.name).build
    if build_loss is not None:  # e.g. cut cross-entropy: the model's loss from labels, without logits
        build_loss(prepared, loss, None)
    try:
        return _run(cl, model, tokenizer, tasks, options, recipe, train_sets, eval_sets, output_dir, resume,
                    max_tasks)
    finally:
        for undo in reversed(prepared.undo):
            undo()


def _run(cl: ContinualMethod, model, tokenizer, tasks: list[Task], options: TrainOptions, recipe, train_sets,
         eval_sets, output_dir, resume: bool, max_tasks: int | None) -> ContinualResult:
    names = [t.name for t in tasks]
    device = torch.device(options.device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = Path(output_dir) if output_dir is not None else None
    engine = Engine(recipe)
    accelerator = engine.accelerator(on_cpu=device.type == "cpu")

    def method_loss(_model, batch: dict, _num_items: int) -> torch.Tensor:
        return cl.training_loss(batch)  # its own normalisation: one micro-batch per step

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
        view = TrainableView(model, cl.trainable_parameters())
        plan = build_optimizer(view, recipe)  # a fresh optimizer per task, over the method's parameters only
        driver = StepDriver(plan.step_kind, engine, accelerator, max_grad_norm=options.max_grad_norm,
                            forward_dropout=bool(getattr(recipe.optimizer, "dropout", False)), loss_fn=method_loss)
        order = BatchOrder(len(train_sets[t]), options.batch_size, options.seed + t)
        losses = []
        try:
            for _ in range(options.steps_per_task):
                batch = collate([train_sets[t][i] for i in order.next_indices()], pad_id)
                loss = float(driver.step(view, plan.optimizer, [{k: v.to(device) for k, v in batch.items()}]))
                if not math.isfinite(loss):
                    raise RunError(f"task '{names[t]}': the loss became {loss}. Lower optimizer.lr.")
                cl.after_step()
                losses.append(loss)
        finally:
            if hasattr(plan.optimizer, "remove_hooks"):  # layer-wise: the parameters outlive this optimizer
                plan.optimizer.remove_hooks()
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

