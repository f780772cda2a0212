"""The `memft continual` and `memft edit` commands.

    memft continual RECIPE [key=value ...] [--resume] [--overwrite]
        train a continual method on tasks in order (memft.continual.recipe.ContinualRecipe) with the recipe's
        optimizer and loss sections (those of fine-tuning recipes); writes the checkpoint, results.json (R,
        baseline, metrics), results.md and accuracy.png into output_dir
    memft edit RECIPE [key=value ...]
        write the edits into a WISE side memory (memft.continual.recipe.EditRecipe); writes scores.json,
        scores.md and the side memory (wise.safetensors + wise.json) into output_dir

RECIPE is a YAML file or a shipped recipe name (`memft continual continual`, `memft edit edit`).
Problems with the input raise memft errors, which the CLI prints as one paragraph with exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path

from memft.errors import DataError, RecipeError, RunError


def add_continual_parser(subparsers) -> None:
    p = subparsers.add_parser("continual", help="train tasks in order and measure forgetting (lora, ilora, mora)")
    p.add_argument("recipe", help="continual recipe YAML file or shipped recipe name (e.g. continual)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. method.name=mora")
    p.add_argument("--resume", action="store_true", help="continue the sequence from output_dir's checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start over even if output_dir holds a checkpoint")
    p.set_defaults(func=cmd_continual)


def add_edit_parser(subparsers) -> None:
    p = subparsers.add_parser("edit", help="apply lifelong edits with WISE and measure Rel / Gen / Loc")
    p.add_argument("recipe", help="edit recipe YAML file or shipped recipe name (e.g. edit)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. edits.limit=10")
    p.set_defaults(func=cmd_edit)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RecipeError("device: 'cuda' was asked for, but torch sees no CUDA device. Use 'auto' or 'cpu'.")
    return name


def _load_model(section):
    from memft.train.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(section)
    return load_model(section), tokenizer


def build_tasks(section) -> list:
    """The recipe's tasks: bundled (`suite`) or from files; missing files raise DataError naming the key."""
    from memft.continual.tasks import SYNTHETIC_TASKS, load_task_file, synthetic_suite

    if section.files is None:
        return synthetic_suite(section.suite or list(SYNTHETIC_TASKS))
    tasks = []
    for i, spec in enumerate(section.files):
        for key in ("train", "eval"):
            value = getattr(spec, key)
            if value is not None and not Path(value).is_file():
                raise DataError(f"tasks.files.{i}.{key}: file '{value}' does not exist. Point it at a JSON-lines "
                                "file with instruction / input / output columns.")
        tasks.append(load_task_file(spec.train, spec.eval, spec.name, eval_fraction=section.eval_fraction))
    names = [t.name for t in tasks]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise RecipeError(f"tasks.files: task name(s) {', '.join(duplicated)} occur more than once. Give each file "
                          "a distinct `name`.")
    return tasks


def cmd_continual(args) -> int:
    from memft.recipe_files import resolve_recipe
    from memft.continual.harness import CHECKPOINT, build_method, run_task_sequence
    from memft.continual.recipe import load_continual_recipe

    recipe = load_continual_recipe(resolve_recipe(args.recipe), args.overrides)
    out = Path(recipe.output_dir)
    has_checkpoint = (out / f"{CHECKPOINT}.json").is_file()
    if args.resume and not has_checkpoint:
        raise RunError(f"output_dir '{out}' holds no checkpoint to resume. Run without --resume to start the "
                       "sequence.")
    if has_checkpoint and not args.resume and not args.overwrite:
        raise RunError(f"output_dir '{out}' already holds a continual checkpoint. Pass --resume to continue it, "
                       "--overwrite to start over, or set output_dir=<new directory>.")
    tasks = build_tasks(recipe.tasks)
    model, tokenizer = _load_model(recipe.model)
    train = {**recipe.train.model_dump(), "device": _device(recipe.train.device)}
    try:  # options are checked here; a failure inside the run is not a recipe error
        method = build_method(recipe.method.name, recipe.method.model_dump(exclude={"name"}))
    except ValueError as exc:
        raise RecipeError(f"method ({recipe.method.name}): {exc}") from exc
    result = run_task_sequence(model, tokenizer, tasks, method, None, train, output_dir=out, resume=args.resume,
                               optimizer=recipe.optimizer, loss=recipe.loss)
    m = result.metrics
    print(f"{recipe.method.name} on {', '.join(result.task_names)}: average accuracy {m['average_accuracy']:.3f}, "
          f"BWT {m['bwt']:+.3f}, forgetting {m['forgetting']:.3f}, FWT {m['fwt']:+.3f}. Results in {out} "
          "(results.json, results.md, accuracy.png).")
    return 0


def cmd_edit(args) -> int:
    from memft.recipe_files import resolve_recipe
    from memft.continual.editing import evaluate_edits, load_edits, locality_reference, run_edit_sequence
    from memft.continual.recipe import BUNDLED_EDITS, load_edit_recipe
    from memft.continual.wise import WISE, WISEOptions

    recipe = load_edit_recipe(resolve_recipe(args.recipe), args.overrides)
    path = None if recipe.edits.path == BUNDLED_EDITS else Path(recipe.edits.path)
    if path is not None and not path.is_file():
        raise DataError(f"edits.path: file '{path}' does not exist. Point it at a JSON-lines file with prompt, "
                        f"target and loc_prompt per line, or use '{BUNDLED_EDITS}'.")
    try:
        edits = load_edits(path, recipe.edits.limit)
    except ValueError as exc:
        raise RecipeError(f"edits.limit: {exc} Lower edits.limit or remove it.") from exc
    model, tokenizer = _load_model(recipe.model)
    model = model.to(_device(recipe.device)).eval()
    reference = locality_reference(model, tokenizer, edits)
    try:
        editor = WISE(model, tokenizer, WISEOptions(**recipe.wise.model_dump()))
    except ValueError as exc:
        raise RecipeError(f"wise: {exc}") from exc
    run_edit_sequence(editor, edits)
    scores = evaluate_edits(model, tokenizer, edits, reference)
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    editor.save(out)
    (out / "scores.json").write_text(json.dumps({**scores.as_dict(), "side_memory_bytes": editor.parameter_bytes()},
                                                indent=1))
    (out / "scores.md").write_text(scores_markdown(scores))
    gen = "n/a" if scores.gen_exact is None else f"{scores.gen_exact:.2f}"
    print(f"WISE, {scores.num_edits} edits: Rel {scores.rel_exact:.2f}, Gen {gen}, Loc {scores.loc_exact:.2f} "
          f"(greedy exact match). Side memory and scores in {out}.")
    return 0


def scores_markdown(scores) -> str:
    """Rel / Gen / Loc as a markdown table."""
    def cell(value):
        return "n/a" if value is None else f"{value:.3f}"
    return "\n".join([
        f"# WISE edits: T = {scores.num_edits}, measured after all edits", "",
        "| metric | teacher-forced token accuracy | greedy exact match |", "|---|---|---|",
        f"| Rel | {cell(scores.rel_token)} | {cell(scores.rel_exact)} |",
        f"| Gen | {cell(scores.gen_token)} | {cell(scores.gen_exact)} |",
        f"| Loc | {cell(scores.loc_token)} | {cell(scores.loc_exact)} |", ""])
