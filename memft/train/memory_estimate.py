"""Peak training memory of a recipe, estimated on fake tensors or measured on real ones (`memft memory`).

The recipe's own builders run: the model is built from its config (no weights are read) with the recipe's
attention kernel, the adapter, compressors and loss patch are applied by `builders.prepare_model`, the
optimizer comes from `builders.build_optimizer`, and each step is the training loop's own
(`memft.train.step.StepDriver`). Batches are full length (`data.max_seq_len`), the worst case.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from memft.errors import RecipeError
from memft.memory import MemoryReport, hf_training_setup, list_configs
from memft.methods import registry
from memft.train import builders
from memft.train.models import load_config
from memft.train.distributed import Engine
from memft.train.recipe import Recipe
from memft.train.step import StepDriver


def recipe_config(recipe: Recipe, config: str | None) -> str | dict:
    """The architecture config: `config` (shipped name or path), else a shipped config named by the recipe,
    else the recipe model's own config (memft.train.models.load_config: local directory, HF cache or hub)."""
    if config is not None:
        return config
    if recipe.model.name_or_path in list_configs():
        return recipe.model.name_or_path
    return load_config(recipe.model).to_dict()


@contextmanager
def _module_to_without_swaps() -> Iterator[None]:
    """`Module.to` that assigns converted tensors instead of swapping them.

    Under FakeTensorMode `Module.to` must swap parameters in place, which fails because fake tensors carry
    weak references; peft calls it when it injects adapters. Assigning new Parameters is equivalent for a
    model that is only built and trained once, as in an estimate."""
    original = torch.nn.Module.to

    def to(self, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        for module in self.modules():
            for name, p in list(module._parameters.items()):
                new = _converted(p, device, dtype)
                if new is not None:
                    module._parameters[name] = torch.nn.Parameter(new, requires_grad=p.requires_grad)
            for name, b in list(module._buffers.items()):
                new = _converted(b, device, dtype)
                if new is not None:
                    module._buffers[name] = new
        return self

    torch.nn.Module.to = to
    try:
        yield
    finally:
        torch.nn.Module.to = original


def _converted(t, device, dtype):
    if t is None:
        return None
    new_dtype = dtype if dtype is not None and (t.is_floating_point() or t.is_complex()) else t.dtype
    new_device = device if device is not None else t.device
    if t.device == new_device and t.dtype == new_dtype:
        return None
    return t.detach().to(new_device, new_dtype)


def _refuse_unestimable(recipe: Recipe) -> None:
    """Methods whose registration says the planner cannot estimate them (with the reason and what to do)."""
    for method, section in registry.used(recipe):
        reason = method.not_estimable(section)
        if reason:
            raise RecipeError(reason)


def _prepare(model, recipe: Recipe):
    """`builders.prepare_model` for a fake-tensor model. LoRAM's taylor pruning scores units by gradients of
    real data, which fake tensors do not have; magnitude pruning keeps the same number of units of every
    layer, so the model, and its memory, have the same shapes."""
    if getattr(recipe.adapter, "prune_method", "") == "taylor":
        recipe = recipe.model_copy(update={"adapter": recipe.adapter.model_copy(update={"prune_method": "magnitude"})})
    return builders.prepare_model(model, recipe).model


def check_builds(recipe: Recipe) -> None:
    """Build the recipe's model from its config, its methods and its optimizer on fake tensors (nothing is
    allocated), so that `memft validate` refuses, with the same message, what would fail as a run starts. An
    optimizer the planner cannot estimate is not built (its library cannot take fake tensors); the schema has
    checked its settings."""
    builders.check_compatibility(recipe)
    try:
        setup = hf_training_setup(recipe_config(recipe, None), recipe.model.dtype, 1, recipe.data.max_seq_len,
                                  lambda model: builders.build_optimizer(model, recipe).optimizer,
                                  recipe.model.gradient_checkpointing,
                                  model_transform=lambda model: _prepare(model, recipe),
                                  attn_implementation=recipe.model.attn_implementation)
    except (ValueError, TypeError, OSError) as exc:
        raise RecipeError(f"the model config cannot be built: {exc}") from exc
    optimizer = registry.get("optimizer", recipe.optimizer.name)
    with FakeTensorMode(allow_non_fake_inputs=True), _module_to_without_swaps(), torch.device("cpu"):
        model = setup.build_model()
        if optimizer.not_estimable(recipe.optimizer) is None:  # else its library cannot take fake tensors
            setup.build_optimizer(model)


def recipe_memory(recipe: Recipe, config: str | None = None, device: str = "cuda", measure: bool = False,
                  name: str | None = None) -> MemoryReport:
    """Estimated (or, with `measure`, measured) peak of two optimizer steps of `recipe`, each the training
    loop's own step (memft.train.step.StepDriver): `train.grad_accum` full-length micro-batches, autocast per
    `train.mixed_precision`, clipping and the optimizer's step kind, one process's engine."""
    if not measure:
        _refuse_unestimable(recipe)
    t = recipe.train
    engine = Engine(recipe)  # one process's step, whatever distributed.engine says (noted below)
    accelerator = engine.accelerator(on_cpu=True)
    driver: dict[str, StepDriver] = {}

    def build_optimizer(model):
        plan = builders.build_optimizer(model, recipe)
        driver["step"] = StepDriver.for_recipe(recipe, plan.step_kind, engine, accelerator)
        return plan.optimizer

    def transform(model):
        return _prepare(model, recipe)

    builders.check_compatibility(recipe, against_model=config is None)  # --config stands in for the model
    try:
        setup = hf_training_setup(recipe_config(recipe, config), recipe.model.dtype, t.batch_size,
                                  recipe.data.max_seq_len, build_optimizer, recipe.model.gradient_checkpointing,
                                  model_transform=transform, name=name,
                                  attn_implementation=recipe.model.attn_implementation)
    except (ValueError, TypeError, OSError) as exc:
        raise RecipeError(f"the model config cannot be built: {exc}") from exc
    one_batch = setup.make_batch
    tokens = t.grad_accum * t.batch_size * (recipe.data.max_seq_len - 1)  # every label trained, after the shift

    packed = recipe.data.packing

    def micro_batches() -> list[dict]:
        # Labels in their own tensor, as the loop's collate makes them. No attention mask: on the loop's
        # all-ones mask transformers skips the mask, which it cannot see on fake tensors; packed rows go
        # without one too, with position ids restarting at each sequence (here two per row).
        batches = [one_batch() for _ in range(t.grad_accum)]
        micro = [{"input_ids": b["input_ids"], "labels": b["labels"].clone()} for b in batches]
        if packed:
            for b in micro:
                rows, length = b["input_ids"].shape
                b["position_ids"] = (torch.arange(length) % ((length + 1) // 2)).expand(rows, length)
        return micro

    def train_step(model, micro, optimizer):
        driver["step"].step(model, optimizer, micro, num_items=tokens)

    setup = dataclasses.replace(setup, make_batch=micro_batches, packed=packed)
    with _module_to_without_swaps():
        if measure:
            report = setup.measure(train_step=train_step, device=device)
        else:
            report = setup.estimate(train_step=train_step, device=device)
    report.meta.update({"grad_accum": t.grad_accum, "mixed_precision": t.mixed_precision,
                        "attn_implementation": recipe.model.attn_implementation})
    report.meta.update({"optimizer": recipe.optimizer.name, "adapter": recipe.adapter.name,
                        "activations": recipe.activations.name, "loss": recipe.loss.name})
    engine = recipe.distributed.engine
    if engine != "none":
        report.notes.append(
            f"This is one process's step without distributed.engine {engine}: every DDP process holds this much, "
            "while FSDP and ZeRO shard parameters, gradients and optimizer state across processes. A short run "
            "writes each process's measured peak (memory.json, memory-rank{r}.json).")
    return report
