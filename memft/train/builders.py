"""The builders every entry point shares: recipe sections -> adapters, patches, optimizer, schedule.

This is where methods plug in. Each method section of the recipe maps, by `name`, to one builder in a
registry below; the training loop, the CLI, the memory estimator and the HF Trainer integration all call
`prepare_model` and `build_optimizer`, so a method is implemented once.

An optimizer builder returns an `OptimizerPlan`: the optimizer plus how the loop must drive it
(`backprop`: backward then step; `zeroth_order`: `step(closure)` with a forward-only closure;
`in_backward`: parameters step inside backward, the loop only marks micro-batches and finishes the step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from memft.errors import RecipeError
from memft.train.models import check_fits_model
from memft.train.recipe import Recipe
from memft.train.support import unsupported

StepKind = Literal["backprop", "zeroth_order", "in_backward"]


@dataclass
class OptimizerPlan:
    optimizer: torch.optim.Optimizer
    step_kind: StepKind = "backprop"


@dataclass
class PreparedModel:
    """The model after adapters and patches, with a way to undo the patches (not the adapter).

    `save_final(model, directory, state_dict=None)` writes what `final/` holds for this adapter (default:
    save_pretrained); `state_dict` holds the full weights when an engine shards them.
    """

    model: torch.nn.Module
    undo: list[Callable[[], None]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    save_final: Callable[..., None] | None = None


# ------------------------------------------------------------------------------------------- adapters
def _apply_lora(prepared: PreparedModel, section, calibration) -> None:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
                        target_modules=section.target_modules, task_type="CAUSAL_LM")
    try:
        prepared.model = get_peft_model(prepared.model, config)
    except ValueError as exc:
        raise RecipeError(f"adapter.target_modules: {exc}") from exc


def _apply_loram(prepared: PreparedModel, section, calibration) -> None:
    """Prune (and quantise), then LoRA; `final/` holds the adapter and its pruning plan."""
    from memft.loram import prepare_loram, save_loram_adapter

    dense = section.keep_dense_layers
    dense = tuple(dense) if isinstance(dense, tuple) else list(dense)
    try:
        model, plan = prepare_loram(
            prepared.model, section.prune_ratio, section.prune_method, dense,
            None if section.quantize == "none" else section.quantize,
            calibration=calibration if section.prune_method == "taylor" else None,
            r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
            target_modules=list(section.target_modules))
    except ValueError as exc:  # a bad option; runtime failures (out of memory) are not recipe errors
        raise RecipeError(f"adapter (loram): {exc}") from exc
    prepared.model = model
    prepared.save_final = lambda m, directory, state_dict=None: save_loram_adapter(m, plan, directory, state_dict)
    prepared.notes.append(f"LoRAM: pruned to {sum(p.numel() for p in model.parameters()):,} parameters; recover "
                          "with `memft loram export`")


ADAPTERS: dict[str, Callable] = {"lora": _apply_lora, "loram": _apply_loram}
def _cut_cross_entropy(prepared: PreparedModel, section) -> None:
    from memft.losses import patch_loss

    try:
        handle = patch_loss(prepared.model, "cut_cross_entropy", impl=section.impl)
    except ValueError as exc:
        raise RecipeError(f"loss (cut_cross_entropy): {exc}") from exc
    prepared.undo.append(handle.undo)


def _compress_activations(prepared: PreparedModel, section) -> None:
    from memft.activations import compress_activations

    options = section.model_dump(exclude={"name"})
    if options.get("others") == "none":
        options["others"] = None
    try:
        handle = compress_activations(prepared.model, section.name, **options)
    except ValueError as exc:
        raise RecipeError(f"activations ({section.name}): {exc}") from exc
    prepared.undo.append(handle.undo)
    prepared.notes.append(f"activations: {section.name} on {len(handle.changes)} modules")


ACTIVATIONS: dict[str, Callable] = {"mesa": _compress_activations, "wta_crs": _compress_activations,
                                    "s2a": _compress_activations}
LOSSES: dict[str, Callable] = {"cut_cross_entropy": _cut_cross_entropy}


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
    if getattr(recipe.optimizer, "layerwise", False) and recipe.train.mixed_precision == "fp16":
        problems.append("optimizer.layerwise steps inside backward, before fp16 gradient scaling could unscale "
                        "and check the gradients; use bfloat16 or float32")
    if recipe.optimizer.name == "mezo" and recipe.train.mixed_precision == "fp16":
        problems.append("optimizer mezo runs no backward, so fp16 gradient scaling has nothing to scale; use "
                        "train.mixed_precision 'no' or 'bf16', or load the model in float16/bfloat16")
    if recipe.optimizer.name == "mezo" and recipe.model.gradient_checkpointing:
        problems.append("optimizer mezo runs no backward: model.gradient_checkpointing would only slow it down")
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
    # Methods are applied to the model in the mode it trains in. `from_pretrained` returns it in eval mode, and
    # compressors applied then kept up to 45% more activation bytes once training began (Mesa on the tiny
    # Llama: 10.1 MB instead of 7.0 MB; tests/train/test_step.py compares the loop with the planner).
    model.train()
    if recipe.adapter.name != "none":
        ADAPTERS[recipe.adapter.name](prepared, recipe.adapter, calibration)
    if recipe.activations.name != "none":
        ACTIVATIONS[recipe.activations.name](prepared, recipe.activations)
    if recipe.loss.name != "cross_entropy":
        LOSSES[recipe.loss.name](prepared, recipe.loss)
    return prepared


# ----------------------------------------------------------------------------------------- optimizers
def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RecipeError("The model has no trainable parameters (check adapter.target_modules).")
    return params


def _decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not biases or norm scales), the usual convention for LMs."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    trainable_parameters(model)
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def _adamw(model, s) -> OptimizerPlan:
    return OptimizerPlan(torch.optim.AdamW(_decay_groups(model, s.weight_decay), lr=s.lr, betas=s.betas,
                                           eps=s.eps))


def _adamw8bit(model, s) -> OptimizerPlan:
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise RecipeError("optimizer.name adamw8bit needs bitsandbytes: pip install 'memft[bnb]'.") from exc
    return OptimizerPlan(bnb.optim.AdamW8bit(_decay_groups(model, s.weight_decay), lr=s.lr, betas=s.betas,
                                             eps=s.eps))


def _sgd(model, s) -> OptimizerPlan:
    return OptimizerPlan(torch.optim.SGD(_decay_groups(model, s.weight_decay), lr=s.lr, momentum=s.momentum))


def _mezo(model, s) -> OptimizerPlan:
    from memft.optimizers.mezo import MeZO

    params = trainable_parameters(model)
    return OptimizerPlan(MeZO(params, lr=s.lr, eps=s.eps, weight_decay=s.weight_decay, n_samples=s.n_samples),
                         step_kind="zeroth_order")


def _galore(model, s, max_grad_norm: float | None) -> OptimizerPlan:
    """GaLore family: low-rank groups for the target projections, plain updates for the rest."""
    from memft.optimizers.galore import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, galore_param_groups
    from memft.optimizers.layerwise import LayerwiseOptimizer
    from memft.optimizers.natural_galore import NaturalGaLoreAdamW

    trainable_parameters(model)
    groups = galore_param_groups(model, target_modules=s.target_modules, rank=s.rank,
                                 update_proj_gap=s.update_proj_gap, scale=s.scale, proj_type=s.proj_type,
                                 svd=s.svd, weight_decay=s.weight_decay)
    plain = [p for g in groups if "rank" not in g for p in g["params"]]
    groups = [g for g in groups if "rank" in g] + [  # decay on matrices only, as for the other optimizers
        {"params": [p for p in plain if p.ndim >= 2], "weight_decay": s.weight_decay},
        {"params": [p for p in plain if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if s.name == "galore_adafactor":
        cls, kwargs = GaLoreAdafactor, {"lr": s.lr, "relative_step": False, "scale_parameter": False,
                                        "beta1": s.beta1, "weight_decay": s.weight_decay}
    else:
        cls = {"galore_adamw": GaLoreAdamW, "galore_adamw8bit": GaLoreAdamW8bit,
               "natural_galore_adamw": NaturalGaLoreAdamW}[s.name]
        kwargs = {"lr": s.lr, "betas": s.betas, "eps": s.eps, "weight_decay": s.weight_decay}
        if s.name == "natural_galore_adamw":
            kwargs.update(history_size=s.history_size, damping=s.damping, history_on_refresh=s.history_on_refresh)
    kwargs["moments_on_refresh"] = s.moments_on_refresh
    if s.layerwise:
        return OptimizerPlan(LayerwiseOptimizer(groups, cls, max_grad_norm=max_grad_norm, **kwargs),
                             step_kind="in_backward")
    return OptimizerPlan(cls(groups, **kwargs))


OPTIMIZERS: dict[str, Callable] = {"adamw": _adamw, "adamw8bit": _adamw8bit, "sgd": _sgd, "mezo": _mezo}
GALORE = ("galore_adamw", "galore_adamw8bit", "galore_adafactor", "natural_galore_adamw")


def build_optimizer(model: torch.nn.Module, recipe: Recipe) -> OptimizerPlan:
    if recipe.optimizer.name in GALORE:
        return _galore(model, recipe.optimizer, recipe.train.max_grad_norm)
    return OPTIMIZERS[recipe.optimizer.name](model, recipe.optimizer)


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
