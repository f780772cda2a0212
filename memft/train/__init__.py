"""One training path: recipe -> model -> data -> optimizer -> loop -> checkpoints (see loop.py)."""

from memft.train.loop import RunResult, Trainer, finetune
from memft.train.recipe import Recipe, load_recipe, validate_recipe

__all__ = ["Recipe", "RunResult", "Trainer", "finetune", "load_recipe", "validate_recipe"]
