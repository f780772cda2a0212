"""The support matrix: which memft methods run under which multi-process engine.

Every method of every recipe section is a row; the engines `ddp`, `fsdp` and `deepspeed` are the
columns (engine `none` runs everything). The rows and the refusals come from the method registrations
(memft.methods): a refused combination is stopped before anything is loaded, with the reason and what to
do instead; every other combination is supported, and
`bench/distributed.py` runs each of them with 2 processes (gloo on CPU) and records the outcome in
bench/results/distributed.md. `memft support` prints the table; the README shows it.
"""

from __future__ import annotations

from dataclasses import dataclass

from memft.methods import registry
from memft.methods.registry import ENGINES
from memft.train.recipe import Recipe

__all__ = ["ENGINES", "Row", "matrix_markdown", "recipe_rows", "refused", "rows", "unsupported"]


@dataclass(frozen=True)
class Row:
    """One line of the matrix: its label, the recipe overrides that select it, and the engines that refuse
    it with the reason."""

    label: str
    overrides: tuple[str, ...]
    refused: dict[str, str]


def rows() -> list[Row]:
    """Every registered method of every section except the sections' defaults (all optimizers), each
    section followed by its methods' variants, in registration order (the matrix's rows)."""
    out: list[Row] = []
    for section in registry.SECTIONS:
        variants: dict[str, Row] = {}
        for method in registry.methods(section):
            if section == "optimizer" or method.name != registry.DEFAULTS[section]:
                out.append(Row(f"{section} {method.name}", (f"{section}.name={method.name}",), dict(method.engines)))
            for variant in method.variants:
                variants.setdefault(variant.label, Row(variant.label, variant.overrides, dict(variant.engines)))
        out += variants.values()
    return out


def refused() -> dict[str, dict[str, str]]:
    """row label -> engine -> why the combination is refused."""
    return {row.label: row.refused for row in rows() if row.refused}


def recipe_rows(recipe: Recipe) -> list[Row]:
    """The rows a recipe uses."""
    used: dict[str, Row] = {}
    for method, section in registry.used(recipe):
        label = f"{method.section} {method.name}"
        used[label] = Row(label, (), dict(method.engines))
        for variant in method.variants:
            if variant.applies(section):
                used[variant.label] = Row(variant.label, variant.overrides, dict(variant.engines))
    return list(used.values())


def unsupported(recipe: Recipe) -> list[str]:
    """Problems with the recipe's engine, one per refused row (empty when everything is supported)."""
    engine = recipe.distributed.engine
    if engine == "none":
        return []
    problems = [f"{row.label} is not supported with distributed.engine {engine}: it {row.refused[engine]}"
                for row in recipe_rows(recipe) if engine in row.refused]
    precision = recipe.train.mixed_precision
    if engine in ("fsdp", "deepspeed") and precision == "fp16":
        problems.append(f"train.mixed_precision fp16 is not supported with distributed.engine {engine} (memft "
                        "scales fp16 losses in its own step, which the sharding engines bypass); use bf16")
    return problems


def matrix_markdown() -> str:
    """The support matrix as a markdown table (README, `memft support`)."""
    lines = ["| method | " + " | ".join(ENGINES) + " |", "|---|" + "---|" * len(ENGINES)]
    for row in rows():
        cells = ["no" if engine in row.refused else "yes" for engine in ENGINES]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
