"""Peak training memory of a recipe, estimated on fake tensors or measured on real ones (`memft memory`).

The recipe's own builders run: the model is built from its config (no weights are read), the adapter,
compressors and loss patch are applied by `builders.prepare_model`, the optimizer comes from
`builders.build_optimizer`, and the step is the one the training loop would take for that optimizer
(backprop, zeroth-order or in-backward). Batches are full length (`data.max_seq_len`), the worst case.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from memft.errors import RecipeError
from memft.memory import MemoryReport, hf_training_setup, list_configs
from memft.train import builders
from memft.train.models import resolve_model_path
from memft.train.recipe import Recipe


def recipe_config(recipe: Recipe, config: str | None) -> str | dict:
    """The architecture config: `config` (shipped name or path), else the recipe model's config.json."""
    if config is not None:
        return config
    path = Path(resolve_model_path(recipe.model.name_or_path))
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    if recipe.model.name_or_path in list_configs():
        return recipe.model.name_or_path
    raise RecipeError(f"model.name_or_path '{recipe.model.name_or_path}' is not a local directory with a "
                      f"config.json, so its architecture is unknown offline. Pass --config with a shipped config "
                      f"({', '.join(list_configs())}) or a path to a config.json.")


def _step_for(kind: str):
    """The training loop's step for an optimizer plan kind, as `(model, batch, optimizer) -> None`."""
    def backprop(model, batch, optimizer):
        loss = model(**batch).loss
        loss.backward()
        del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def in_backward(model, batch, optimizer):
        optimizer.set_micro_batch(0, 1)
        model(**batch).loss.backward()
        optimizer.step()

    def zeroth_order(model, batch, optimizer):
        model.eval()
        with torch.no_grad():
            optimizer.step(lambda: model(**batch).loss)
        model.train()

    return {"backprop": backprop, "in_backward": in_backward, "zeroth_order": zeroth_order}[kind]


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
    adapter = recipe.adapter
    if adapter.name == "loram" and adapter.quantize == "nf4":
        raise RecipeError("adapter loram with quantize nf4 cannot be estimated yet: bitsandbytes' 4-bit parameters "
                          "cannot hold fake tensors. Estimate quantize=none (the bf16 pruned model) and use "
                          "memft.loram.parameter_storage_bytes for the NF4 weight bytes, or measure on a GPU "
                          "with --measure.")


def recipe_memory(recipe: Recipe, config: str | None = None, device: str = "cuda", measure: bool = False,
                  name: str | None = None) -> MemoryReport:
    """Estimated (or, with `measure`, measured) peak of two training steps of `recipe`."""
    if not measure:
        _refuse_unestimable(recipe)
    kind: dict[str, str] = {}

    def build_optimizer(model):
        plan = builders.build_optimizer(model, recipe)
        kind["step"] = plan.step_kind
        return plan.optimizer

    def transform(model):
        return builders.prepare_model(model, recipe).model

    builders.check_compatibility(recipe)
    try:
        setup = hf_training_setup(recipe_config(recipe, config), recipe.model.dtype, recipe.train.batch_size,
                                  recipe.data.max_seq_len, build_optimizer, recipe.model.gradient_checkpointing,
                                  model_transform=transform, name=name)
    except (ValueError, TypeError, OSError) as exc:
        raise RecipeError(f"the model config cannot be built: {exc}") from None
    def train_step(model, batch, optimizer):  # the optimizer (and so its plan) is built before any step
        _step_for(kind["step"])(model, batch, optimizer)

    with _module_to_without_swaps():
        if measure:
            report = setup.measure(train_step=train_step, device=device)
        else:
            report = setup.estimate(train_step=train_step, device=device)
    report.meta.update({"optimizer": recipe.optimizer.name, "adapter": recipe.adapter.name,
                        "activations": recipe.activations.name, "loss": recipe.loss.name})
    engine = recipe.distributed.engine
    if engine != "none":
        report.notes.append(
            f"This is one process's step without distributed.engine {engine}: every DDP process holds this much, "
            "while FSDP and ZeRO shard parameters, gradients and optimizer state across processes. A short run "
            "writes each process's measured peak (memory.json, memory-rank{r}.json).")
    return report
