"""memft methods for a Hugging Face ``Trainer``, from a recipe-like dict, through the shared builders.

A *spec* is a dict with the sections of a memft recipe (``memft schema`` lists them): ``adapter``,
``loss`` and ``activations`` transform the model, ``optimizer`` (and the schedule keys of ``train``) build
the optimizer. The whole spec is validated like a recipe (unknown keys and methods are errors with a "did
you mean"), so one recipe dict can feed every function here; each function uses its own sections.
Everything goes through :mod:`memft.train.builders`, so a method added there works here unchanged.

    model, handle = apply_memft(model, {"loss": {"name": "cut_cross_entropy"}})
    optimizer, scheduler = memft_optimizer(model, {"optimizer": {"name": "adamw", "lr": 1e-3}}, 1000)
    Trainer(model=model, args=args, optimizers=(optimizer, scheduler), ...)

An optimizer built here carries ``memft_step_kind`` (``backprop``, ``zeroth_order`` or ``in_backward``, see
:class:`memft.train.builders.OptimizerPlan`); :class:`memft.integrations.MemftTrainer` drives it accordingly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from memft.train import builders
from memft.train.recipe import Recipe, validate_recipe

__all__ = ["MemftHandle", "MemftOptimizerFactory", "apply_memft", "memft_optimizer", "memft_optimizer_cls_and_kwargs"]


def _as_dict(spec: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(spec, Mapping):
        raise TypeError(f"spec must be a dict of recipe sections such as {{'loss': {{'name': 'cut_cross_entropy'}}}}, "
                        f"got {type(spec).__name__}.")
    return copy.deepcopy(dict(spec))


def _validate_spec(spec: Mapping[str, Any]) -> Recipe:
    """The spec as a validated :class:`~memft.train.recipe.Recipe` (sections it omits take their defaults)."""
    data = _as_dict(spec)
    return validate_recipe(data, source="spec")


def _mark(optimizer: torch.optim.Optimizer, plan: builders.OptimizerPlan, recipe: Recipe) -> torch.optim.Optimizer:
    """Record how a Trainer must drive the optimizer (read by MemftTrainer)."""
    optimizer.memft_step_kind = plan.step_kind
    if plan.step_kind == "in_backward":
        optimizer.unannounced_backward_message = (
            f"{type(optimizer).__name__} updates parameters inside backward and must be told where each backward "
            "stands in the accumulation window, which a transformers.Trainer (or TRL trainer) does not do: train "
            "with memft.integrations.MemftTrainer, or mix MemftTrainerMixin into your trainer class (class "
            "MySFTTrainer(MemftTrainerMixin, SFTTrainer)).")
    if plan.step_kind == "zeroth_order":
        optimizer.memft_forward_dropout = bool(getattr(recipe.optimizer, "dropout", False))
    return optimizer


# ----------------------------------------------------------------------------------------------- model
@dataclass
class MemftHandle:
    """What :func:`apply_memft` changed.

    ``undo()`` removes the patches (loss, activation compressors) in reverse order; an adapter stays, since
    its weights are what was trained. ``notes``: remarks from the builders (e.g. how to recover LoRAM).
    ``save_final(model, directory)``: how the adapter wants its final weights written, or None for
    ``save_pretrained``.
    """

    notes: list[str] = field(default_factory=list)
    save_final: Callable[[nn.Module, str], None] | None = None
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def undo(self) -> None:
        """Restore the patched forwards (idempotent)."""
        while self._undo:
            self._undo.pop()()


def apply_memft(model: nn.Module, spec: Mapping[str, Any],
                calibration: list[dict] | None = None) -> tuple[nn.Module, MemftHandle]:
    """Apply the spec's ``adapter``, ``activations`` and ``loss`` sections to ``model`` (in place where the
    method allows it); returns the model to train (a new object for adapters) and a :class:`MemftHandle`.

    ``calibration``: a few training batches (dicts of tensors) for methods that score the model on data
    (LoRAM with ``prune_method: taylor``). Call it before building the optimizer and the Trainer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}.")
    recipe = _validate_spec(spec)
    prepared = builders.prepare_model(model, recipe, calibration)
    return prepared.model, MemftHandle(list(prepared.notes), prepared.save_final, list(prepared.undo))


# ------------------------------------------------------------------------------------------ optimizers
def memft_optimizer(model: nn.Module, spec: Mapping[str, Any],
                    num_training_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """``(optimizer, scheduler)`` for ``Trainer(optimizers=...)`` from the spec's ``optimizer`` section.

    Every knob of the section reaches the optimizer (``lr``, ``weight_decay`` on matrices only, ``betas``,
    ``eps``, method options). The schedule is memft's: ``train.lr_schedule``, ``warmup_steps`` and
    ``min_lr_ratio`` from the spec over ``num_training_steps`` optimizer steps (the Trainer's ``max_steps``),
    stepped once per optimizer step by the Trainer. Zeroth-order and layer-wise optimizers need
    :class:`memft.integrations.MemftTrainer`; a layer-wise optimizer clips with ``train.max_grad_norm`` (default
    1.0, like ``TrainingArguments.max_grad_norm``, which it must equal unless that is 0).
    """
    if isinstance(num_training_steps, bool) or not isinstance(num_training_steps, int) or num_training_steps < 1:
        raise ValueError(f"num_training_steps must be a positive int (the Trainer's max_steps), got "
                         f"{num_training_steps!r}.")
    data = _as_dict(spec)
    train = data.get("train") or {}
    if isinstance(train, Mapping):  # anything else is reported by the validation
        if train.get("num_epochs") is not None:
            raise ValueError("spec train.num_epochs: under a Trainer the run's length is the Trainer's "
                             "(TrainingArguments num_train_epochs or max_steps), passed here as num_training_steps; "
                             "drop train.num_epochs from the spec.")
        if train.get("max_steps", num_training_steps) != num_training_steps:
            raise ValueError(f"spec train.max_steps={train['max_steps']} differs from num_training_steps="
                             f"{num_training_steps}; drop train.max_steps from the spec (num_training_steps sets it).")
        data["train"] = {**train, "max_steps": num_training_steps}
    recipe = _validate_spec(data)
    plan = _build(model, recipe)
    return _mark(plan.optimizer, plan, recipe), builders.build_scheduler(plan.optimizer, recipe)


def _build(model: nn.Module, recipe: Recipe) -> builders.OptimizerPlan:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    return builders.build_optimizer(model, recipe)


class MemftOptimizerFactory:
    """An optimizer factory in the form ``Trainer(optimizer_cls_and_kwargs=...)`` accepts: the Trainer calls
    ``MemftOptimizerFactory()(model, spec=spec)`` when it creates its optimizer; use
    :func:`memft_optimizer_cls_and_kwargs`."""

    def __call__(self, model: nn.Module, spec: Mapping[str, Any]) -> torch.optim.Optimizer:
        recipe = _validate_spec(spec)
        plan = _build(model, recipe)
        return _mark(plan.optimizer, plan, recipe)


def memft_optimizer_cls_and_kwargs(spec: Mapping[str, Any]) -> tuple[type[MemftOptimizerFactory], dict[str, Any]]:
    """``Trainer(optimizer_cls_and_kwargs=memft_optimizer_cls_and_kwargs(spec))``: the Trainer builds the spec's
    optimizer on its own model and pairs it with its own schedule (``TrainingArguments.lr_scheduler_type``,
    warmup). The spec's ``optimizer.lr`` is the peak lr; ``TrainingArguments.learning_rate`` is not used.
    The spec is validated now, so mistakes surface before the Trainer is built."""
    _validate_spec(spec)
    return MemftOptimizerFactory, {"spec": copy.deepcopy(dict(spec))}
