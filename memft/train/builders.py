"""The builders every entry point shares: recipe sections -> adapters, patches, optimizer, schedule.

The training loop, the CLI, the planner and the HF Trainer integration all call `prepare_model` and
`build_optimizer`; each method's own builder comes from its registration (memft.methods), so a method is
implemented once. `build_optimizer` returns an `OptimizerPlan`: the optimizer and the step kind that drives it.
"""

from __future__ import annotations

import math

import torch

from memft.errors import RecipeError
from memft.methods import registry
from memft.methods.registry import OptimizerPlan, PreparedModel
from memft.train.models import check_fits_model
from memft.train.recipe import Recipe
from memft.train.support import unsupported

__all__ = ["OptimizerPlan", "PreparedModel", "build_optimizer", "build_scheduler", "check_compatibility",
           "prepare_model"]


def check_compatibility(recipe: Recipe, against_model: bool = True) -> None:
    """Refuse combinations that cannot work, before any weights are loaded. With `against_model`, also
    read the model's config and refuse a sequence length or rank the model cannot take (off where another
    architecture stands in for the recipe's model, as in `memft memory --config`)."""
    problems = []
    if recipe.model.dtype == "float16" and recipe.train.mixed_precision == "no" and recipe.optimizer.name != "mezo":
        problems.append("model.dtype float16 with train.mixed_precision 'no' trains pure fp16 weights, which "
                        "underflow; load float32 with mixed_precision fp16, or use bfloat16")
    if recipe.train.mixed_precision == "fp16" and recipe.model.dtype != "float32":
        problems.append("train.mixed_precision fp16 needs float32 master weights (model.dtype float32) for "
                        "gradient scaling")
    for method, _ in registry.used(recipe):
        problems += method.refuses(recipe)
    problems += unsupported(recipe)
    if problems:
        raise RecipeError("The recipe combines settings that cannot work together:\n"
                          + "\n".join(f"  - {p}." for p in problems))
    if against_model:
        check_fits_model(recipe)


def prepare_model(model: torch.nn.Module, recipe: Recipe, calibration: list[dict] | None = None) -> PreparedModel:
    """Apply the adapter, then activation compression, then the loss patch. `calibration`: a few training
    batches for methods that score the model on data (LoRAM's taylor pruning)."""
    prepared = PreparedModel(model)
    # Methods are applied to the model in the mode it trains in: `from_pretrained` returns it in eval mode, and
    # compressors applied then kept more activation bytes once training began (tests/train/test_step.py holds
    # each compressor's run to the planner, which builds its model in train mode).
    model.train()
    for section in ("adapter", "activations", "loss"):  # the adapter first: the others patch its modules too
        options = getattr(recipe, section)
        build = registry.get(section, options.name).build
        if build is not None:
            build(prepared, options, calibration)
    if "name_or_path" in recipe.model.model_fields_set:
        prepared.base_model_name = recipe.model.name_or_path
    return prepared


# ----------------------------------------------------------------------------------------- optimizers
def build_optimizer(model: torch.nn.Module, recipe: Recipe) -> OptimizerPlan:
    """The recipe's optimizer for `model`'s trainable parameters and the step kind that drives it."""
    method = registry.get("optimizer", recipe.optimizer.name)
    return OptimizerPlan(method.build(model, recipe.optimizer, recipe), method.step_kind(recipe.optimizer))


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak lr, then constant, linear or cosine decay to `min_lr_ratio` of it."""
    t = recipe.train
    decay_steps = max(1, t.max_steps - t.warmup_steps)

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        progress = min(1.0, (step - t.warmup_steps) / decay_steps)
        if t.lr_schedule == "constant":
            return 1.0
        shape = 1.0 - progress if t.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
