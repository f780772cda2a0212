"""A run started by a launcher (`accelerate launch`, `torchrun`): what the launcher decided, and how it combines
with the recipe.

`accelerate launch` passes its choices (its flags, else the accelerate config file) in the environment:
`ACCELERATE_MIXED_PRECISION`, `ACCELERATE_USE_FSDP` / `ACCELERATE_USE_DEEPSPEED` (the distributed type),
`ACCELERATE_DEEPSPEED_ZERO_STAGE`, `ACCELERATE_GRADIENT_ACCUMULATION_STEPS`; it and torchrun start the
processes and set `WORLD_SIZE` / `LOCAL_WORLD_SIZE` in each. The rule, per recipe key:

- the recipe is silent: the launcher's choice is taken, and said so in one line;
- both speak and agree: nothing to say;
- both speak and disagree: the run is refused, naming both values and the two ways to fix it.

accelerate's `mixed_precision: no` is its default as much as a choice, so it never overrides a recipe's
`train.mixed_precision`. Under a launcher memft never starts processes of its own: the launcher's
processes are the run's (`distributed.nproc_per_node` is theirs; several processes need an engine, `ddp`
unless the launcher says FSDP or DeepSpeed). FP8 has no memft path and is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from memft.errors import RecipeError

TRUE = ("1", "true", "yes")


@dataclass(frozen=True)
class Launcher:
    """The launcher of this process and its settings as recipe keys (``"train.mixed_precision": "bf16"``)."""

    name: str
    processes: int
    settings: dict[str, Any] = field(default_factory=dict)


STARTED_BY_MEMFT = "MEMFT_STARTED_PROCESSES"  # set in the processes `memft finetune` starts itself


def detect(env: Mapping[str, str]) -> Launcher | None:
    """The launcher that started this process, or None for a plain `memft` command (or one of the processes
    it started itself)."""
    if env.get(STARTED_BY_MEMFT):
        return None
    accelerate = "ACCELERATE_MIXED_PRECISION" in env
    torchrun = "TORCHELASTIC_RUN_ID" in env or "LOCAL_RANK" in env
    if not (accelerate or torchrun):
        return None
    processes = int(env.get("LOCAL_WORLD_SIZE") or env.get("WORLD_SIZE") or 1)
    settings: dict[str, Any] = {"distributed.nproc_per_node": processes}
    if not accelerate:
        return Launcher("torchrun", processes, settings)
    precision = env["ACCELERATE_MIXED_PRECISION"].lower()
    if precision not in ("no", "bf16", "fp16"):
        raise RecipeError(f"accelerate launch asks for mixed_precision {precision!r}; memft trains with no, bf16 or "
                          "fp16. Pass --mixed_precision bf16 (or no) to accelerate launch, or change it in the "
                          "accelerate config file (accelerate config).")
    if precision != "no":
        settings["train.mixed_precision"] = precision
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in TRUE:
        settings["distributed.engine"] = "deepspeed"
        if env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"):
            settings["distributed.deepspeed.stage"] = int(env["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
        if env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS"):
            settings["train.grad_accum"] = int(env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"])
    elif env.get("ACCELERATE_USE_FSDP", "").lower() in TRUE:
        settings["distributed.engine"] = "fsdp"
    elif processes > 1:
        settings["distributed.engine"] = "ddp"
    return Launcher("accelerate launch", processes, settings)


def _recipe_value(recipe, key: str) -> tuple[bool, Any]:
    """(whether the recipe or an override set `key`, its value)."""
    node, *path, name = key.split(".")
    section = getattr(recipe, node)
    for part in path:
        if part not in section.model_fields_set:
            return False, getattr(getattr(section, part), name)
        section = getattr(section, part)
    return name in section.model_fields_set, getattr(section, name)


def reconcile(recipe, launcher: Launcher, reload: Callable[[list[str]], Any]) -> tuple[Any, list[str]]:
    """The recipe to run under `launcher` and the lines to print about it; `reload(extra_overrides)` loads the
    recipe again with more `key=value` overrides (so every check of a recipe runs on the result)."""
    taken, conflicts = [], []
    for key, value in launcher.settings.items():
        was_set, current = _recipe_value(recipe, key)
        if current == value:
            continue
        if was_set:
            conflicts.append(f"{key}: the recipe says {current!r}, {launcher.name} says {value!r}")
        else:
            taken.append(f"{key}={value}")
    if not conflicts and launcher.processes > 1 and recipe.distributed.engine == "none" \
            and "distributed.engine" not in launcher.settings:
        conflicts.append(f"distributed.engine: {launcher.name} started {launcher.processes} processes and the recipe "
                         "runs one ('none')")
    if conflicts:
        raise RecipeError(
            f"The recipe and {launcher.name} disagree: " + "; ".join(conflicts) + ". Make them agree: change the "
            f"recipe (e.g. {_example(conflicts[0], launcher)}), or the {launcher.name} flags / accelerate config, "
            "or leave the key out of the recipe to take the launcher's choice.")
    if not taken:
        return recipe, []
    return reload(taken), [f"From {launcher.name}: {', '.join(taken)} (the recipe leaves them to the launcher)."]


def _example(conflict: str, launcher: Launcher) -> str:
    key = conflict.split(":")[0]
    value = launcher.settings.get(key, "ddp" if key == "distributed.engine" else None)
    return f"{key}={value}"
