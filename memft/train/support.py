"""The support matrix: which memft methods run under which multi-process engine.

Every method of every recipe section is a row; the engines `ddp`, `fsdp` and `deepspeed` are the
columns (engine `none` runs everything). A combination listed in `REFUSED` is refused before anything
is loaded, with the reason and what to do instead; every other combination is supported, and
`bench/distributed.py` runs each of them with 2 processes (gloo on CPU) and records the outcome in
bench/results/distributed.md. `memft support` prints the table; the README shows it.
"""

from __future__ import annotations

from dataclasses import dataclass

from memft.train.recipe import Recipe, method_names

ENGINES = ("ddp", "fsdp", "deepspeed")
GALORE = ("galore_adamw", "galore_adamw8bit", "galore_adafactor", "natural_galore_adamw")

_LAYERWISE = ("steps each parameter inside backward, before the engine has reduced its gradient across "
              "processes (and FSDP/ZeRO hold only a shard of it); use optimizer.layerwise false")
_GALORE_ZERO = ("projects weight matrices, but ZeRO flattens the parameters of a group into 1-D partitions "
                "before the optimizer sees them; use engine ddp")
_MEZO_FSDP = ("draws one perturbation per whole parameter from a shared seed and needs no gradients, so "
              "sharding buys nothing over its inference-level memory; use engine ddp (one scalar all-reduce "
              "per step)")
_MEZO_ZERO = ("never calls backward, which DeepSpeed's engine is built around; use engine ddp (one scalar "
              "all-reduce per step, no gradient traffic)")
_BNB_FSDP = ("keeps its 8-bit state in bitsandbytes, which updates plain tensors and not FSDP2's DTensor "
             "shards; use optimizer adamw, or engine ddp or deepspeed")
_NF4_SHARDED = ("keeps frozen weights as bitsandbytes 4-bit tensors, which {engine} cannot shard; use engine ddp, "
                "or adapter.quantize none")

# row -> engine -> why the combination is refused
REFUSED: dict[str, dict[str, str]] = {
    "optimizer.layerwise": {e: _LAYERWISE for e in ENGINES},
    "optimizer mezo": {"fsdp": _MEZO_FSDP, "deepspeed": _MEZO_ZERO},
    "optimizer adamw8bit": {"fsdp": _BNB_FSDP},
    **{f"optimizer {name}": {"deepspeed": _GALORE_ZERO} for name in GALORE},
    "adapter loram (quantize nf4)": {"fsdp": _NF4_SHARDED.format(engine="FSDP2"),
                                     "deepspeed": _NF4_SHARDED.format(engine="ZeRO")},
}


@dataclass(frozen=True)
class Row:
    """One line of the matrix: its label and the recipe overrides that select it."""

    label: str
    overrides: tuple[str, ...]


def rows() -> list[Row]:
    """Every method of every section, in schema order (the matrix's rows)."""
    out = []
    for name in method_names("optimizer"):
        out.append(Row(f"optimizer {name}", (f"optimizer.name={name}",)))
    out.append(Row("optimizer.layerwise", ("optimizer.name=galore_adamw", "optimizer.layerwise=true")))
    for section, default in (("activations", "none"), ("loss", "cross_entropy"), ("adapter", "none")):
        for name in method_names(section):
            if name != default:
                out.append(Row(f"{section} {name}", (f"{section}.name={name}",)))
    out.append(Row("adapter loram (quantize nf4)", ("adapter.name=loram", "adapter.quantize=nf4")))
    return out


def recipe_rows(recipe: Recipe) -> list[str]:
    """The rows a recipe uses."""
    used = [f"optimizer {recipe.optimizer.name}"]
    if getattr(recipe.optimizer, "layerwise", False):
        used.append("optimizer.layerwise")
    for section, default in (("activations", "none"), ("loss", "cross_entropy"), ("adapter", "none")):
        name = getattr(recipe, section).name
        if name != default:
            used.append(f"{section} {name}")
    if recipe.adapter.name == "loram" and recipe.adapter.quantize == "nf4":
        used.append("adapter loram (quantize nf4)")
    return used


def unsupported(recipe: Recipe) -> list[str]:
    """Problems with the recipe's engine, one per refused row (empty when everything is supported)."""
    engine = recipe.distributed.engine
    if engine == "none":
        return []
    problems = []
    for row in recipe_rows(recipe):
        reason = REFUSED.get(row, {}).get(engine)
        if reason:
            problems.append(f"{row} is not supported with distributed.engine {engine}: it {reason}")
    precision = recipe.train.mixed_precision
    if engine in ("fsdp", "deepspeed") and precision == "fp16":
        problems.append(f"train.mixed_precision fp16 is not supported with distributed.engine {engine} (memft "
                        "scales fp16 losses through accelerate's scaler, which the sharding engines bypass); "
                        "use bf16")
    return problems


def matrix_markdown() -> str:
    """The support matrix as a markdown table (README, `memft support`)."""
    lines = ["| method | " + " | ".join(ENGINES) + " |", "|---|" + "---|" * len(ENGINES)]
    for row in rows():
        cells = ["no" if row.label in REFUSED and engine in REFUSED[row.label] else "yes" for engine in ENGINES]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
