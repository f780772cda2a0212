"""The method registry: every memory-saving method of a recipe declares itself once.

A registration (`Method`) holds, for one method of one recipe section (`optimizer`, `activations`, `loss`,
`adapter`): its recipe schema (a pydantic section whose `name` is the method's name; choices come from the
library's own constants), its builder, its step kind, the settings it cannot compose with and why, which
multi-process engines refuse it and why, and whether the planner can estimate it. From the registrations
come the recipe's method unions (memft.train.recipe), the builders (memft.train.builders), the support
matrix and its refusals (memft.train.support, `memft support`), the checks of `memft validate`, and the
planner's refusals (memft.train.memory_estimate).

Builders take:
    optimizer                  build(model, section, recipe) -> torch.optim.Optimizer
    activations, loss, adapter build(prepared: PreparedModel, section, calibration) -> None

A new method is one module that calls `register(Method(...))` at import, imported by `memft.methods` (or,
for a method of your own, imported before the recipe is validated; `tests/methods` registers one).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field

SECTIONS = ("optimizer", "activations", "loss", "adapter")
DEFAULTS = {"optimizer": "adamw", "activations": "none", "loss": "cross_entropy", "adapter": "none"}
ENGINES = ("ddp", "fsdp", "deepspeed")
StepKind = Literal["backprop", "zeroth_order", "in_backward"]


class Section(BaseModel):
    """A recipe section: unknown keys are errors, defaults are validated."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


@dataclass
class OptimizerPlan:
    """An optimizer and how the step must drive it (memft.train.step): `backprop` (backward, then step),
    `zeroth_order` (`step(closure)` on forward passes), `in_backward` (parameters step inside backward)."""

    optimizer: torch.optim.Optimizer
    step_kind: StepKind = "backprop"


@dataclass
class PreparedModel:
    """The model after adapters and patches, with a way to undo the patches (not the adapter).

    `save_final(model, directory, state_dict=None)` writes what `final/` holds for this adapter (default:
    save_pretrained); `state_dict` holds the full weights when an engine shards them. `base_model_name`: the
    model as the recipe names it, which a saved adapter records as its base.
    """

    model: torch.nn.Module
    undo: list[Callable[[], None]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    save_final: Callable[..., None] | None = None
    base_model_name: str | None = None


@dataclass(frozen=True)
class Variant:
    """A setting of a method with its own support-matrix row, e.g. `optimizer.layerwise`."""

    label: str
    overrides: tuple[str, ...]          # recipe overrides that select it
    applies: Callable[[Any], bool]      # section -> whether the recipe's section uses it
    engines: Mapping[str, str] = field(default_factory=dict)  # engine -> why it is refused


def _nothing(_: Any) -> list[str]:
    return []


def _backprop(_: Any) -> StepKind:
    return "backprop"


def _estimable(_: Any) -> str | None:
    return None


@dataclass(frozen=True)
class Method:
    """One method of one recipe section; see the module docstring."""

    section: str
    schema: type[Section]
    build: Callable[..., Any] | None = None
    step_kind: Callable[[Any], StepKind] = _backprop          # section -> kind (optimizers)
    refuses: Callable[[Any], list[str]] = _nothing             # recipe -> problems with the rest of it
    engines: Mapping[str, str] = field(default_factory=dict)   # engine -> why it is refused
    variants: tuple[Variant, ...] = ()
    not_estimable: Callable[[Any], str | None] = _estimable    # section -> why the planner cannot, or None

    @property
    def name(self) -> str:
        return get_args(self.schema.model_fields["name"].annotation)[0]


_REGISTRY: dict[str, dict[str, Method]] = {section: {} for section in SECTIONS}


def register(method: Method) -> Method:
    """Add a method; its section and name must be new."""
    if method.section not in SECTIONS:
        raise ValueError(f"Method section {method.section!r} is not one of {', '.join(SECTIONS)}.")
    if method.name in _REGISTRY[method.section]:
        raise ValueError(f"{method.section} method '{method.name}' is registered already.")
    _REGISTRY[method.section][method.name] = method
    return method


def unregister(section: str, name: str) -> None:
    """Remove a method (tests that register one of their own clean up with this)."""
    del _REGISTRY[section][name]


def methods(section: str) -> list[Method]:
    """The methods of a section, in registration order."""
    return list(_REGISTRY[section].values())


def get(section: str, name: str) -> Method:
    return _REGISTRY[section][name]


def used(recipe: Any) -> list[tuple[Method, Any]]:
    """(method, its recipe section) for every method section of `recipe`."""
    return [(get(section, getattr(recipe, section).name), getattr(recipe, section)) for section in SECTIONS]


def union(section: str) -> Any:
    """The pydantic tagged union of a section's schemas (what the recipe's section accepts)."""
    schemas = tuple(m.schema for m in methods(section))
    if len(schemas) == 1:
        return schemas[0]
    return Annotated[Union[schemas], Field(discriminator="name")]  # noqa: UP007
