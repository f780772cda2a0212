"""Recipe files: a YAML path or the name of a shipped recipe, and which command runs it (its `kind`).

The shipped recipes live in the repository's top-level `recipes/` folder; a wheel carries them as
`memft/recipes/` (pyproject.toml maps the folder into the package).
"""

from __future__ import annotations

from pathlib import Path

from memft.errors import RecipeError


def _recipes_dir() -> Path:
    """`memft/recipes/` in an installed wheel, else `recipes/` beside the package (a checkout, an editable
    install)."""
    package = Path(__file__).resolve().parent
    bundled = package / "recipes"
    return bundled if any(bundled.glob("*.yaml")) else package.parent / "recipes"


RECIPES_DIR = _recipes_dir()


def resolve_recipe(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of a shipped recipe (without .yaml)."""
    path = Path(name_or_path)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    raise RecipeError(f"Recipe '{name_or_path}' is neither a file nor a shipped recipe. Shipped recipes: "
                      f"{', '.join(shipped_recipes())}.")


def shipped_recipes(kind: str | None = None) -> list[str]:
    """Names of the shipped recipes, optionally only those of one kind (finetune, continual, edit)."""
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    return [n for n in names if kind is None or recipe_kind(RECIPES_DIR / f"{n}.yaml") == kind]


BUNDLED_STAND_IN = "memft:tiny-llama"


def offline_stand_in(name: str) -> list[str]:
    """Overrides that run shipped recipe `name` offline (the test suite, the CPU benches): a recipe naming a hub
    model runs its methods, precision and sizes on the bundled tiny Llama instead, its sequence capped at that
    model's 1024 positions; a recipe on a bundled model needs none."""
    from memft.train.recipe import load_recipe

    recipe = load_recipe(RECIPES_DIR / f"{name}.yaml")
    if recipe.model.name_or_path.startswith("memft:"):
        return []
    return [f"model.name_or_path={BUNDLED_STAND_IN}", f"data.max_seq_len={min(recipe.data.max_seq_len, 1024)}"]


def recipe_kind(path: Path) -> str:
    """A recipe's top-level `kind`: 'finetune' (no `kind`), 'continual' or 'edit'."""
    from memft.train.recipe import load_recipe_data, shorten

    kind = load_recipe_data(path).get("kind", "finetune")
    if kind not in ("finetune", "continual", "edit"):
        raise RecipeError(f"Recipe '{path}': kind {shorten(repr(kind))} is not known; use 'continual', 'edit', or no kind for a "
                          "fine-tuning recipe.")
    return kind


def load_finetune_recipe(name_or_path: str, overrides: list[str]):
    """The fine-tuning recipe behind a name or path; a continual or edit recipe is pointed to its command."""
    from memft.train.recipe import load_recipe

    path = resolve_recipe(name_or_path)
    kind = recipe_kind(path) if path.is_file() else "finetune"
    if kind != "finetune":
        raise RecipeError(f"Recipe '{name_or_path}' is a {kind} recipe (kind: {kind}); run it with "
                          f"`memft {kind} {name_or_path}`.")
    return load_recipe(path, overrides)
