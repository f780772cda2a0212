"""The `memft` command line.

    memft finetune RECIPE [key=value ...] [--resume [CHECKPOINT]] [--overwrite] [--nproc N]
    memft validate RECIPE [key=value ...]
    memft memory RECIPE [key=value ...] [--config NAME] [--gpu NAME] [--measure] [--json] [--compare R ...]
    memft loram export RUN_DIR [--out DIR] [--no-merge]
    memft continual RECIPE [key=value ...] [--resume] [--overwrite]   tasks in sequence, forgetting metrics
    memft edit RECIPE [key=value ...]   lifelong editing with a WISE side memory
    memft recipes [--copy NAME [DEST] [--force]]  list the shipped recipes (path, description), or copy one
    memft schema [SECTION]             every recipe field with its type or choices, default and help
    memft support                      which methods each multi-process engine runs
    memft --version                    the installed version

RECIPE is a YAML file or the name of a shipped recipe (`memft finetune quickstart`). Problems with the
input exit with code 2 and one readable message; output cut short by its reader (`memft schema | head`)
ends quietly with code 141.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from memft.errors import MemftError, RecipeError
from memft.recipe_files import (RECIPES_DIR, load_finetune_recipe, recipe_kind, resolve_recipe,
                                shipped_recipes)

def _recipe_summary(path: Path) -> str:
    """A recipe's first comment line, its description."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("memft")
    except PackageNotFoundError:
        return "unknown (memft is not installed: no package metadata)"


# ------------------------------------------------------------------------------------------ commands
def _choose_deepspeed_accelerator() -> None:
    """On machines without CUDA, tell DeepSpeed (imported by accelerate whenever it is installed) to use
    its CPU accelerator, instead of letting it probe for GPUs and print a warning in every run. Set before
    anything imports DeepSpeed; inherited by the processes `memft finetune` starts."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def cmd_finetune(args) -> int:
    _choose_deepspeed_accelerator()
    from memft.train.loop import finetune

    from memft.train import launcher

    overrides = list(args.overrides) + ([f"distributed.nproc_per_node={args.nproc}"] if args.nproc else [])
    recipe = load_finetune_recipe(args.recipe, overrides)
    started_by = launcher.detect(os.environ)
    if started_by is not None:
        if args.nproc:
            raise RecipeError(f"--nproc starts processes, but {started_by.name} already started this run's "
                              f"{started_by.processes}; drop --nproc and choose the processes in {started_by.name}.")
        recipe, notes = launcher.reconcile(recipe, started_by,
                                           lambda extra: load_finetune_recipe(args.recipe, overrides + extra))
        if os.environ.get("RANK", "0") == "0":
            for note in notes:
                print(note, file=sys.stderr)
    if args.nproc and args.nproc > 1 and recipe.distributed.engine == "none":
        raise RecipeError(f"--nproc {args.nproc} starts several processes, but distributed.engine is 'none'. Add "
                          "distributed.engine=ddp (or fsdp, deepspeed).")
    if recipe.distributed.engine != "none" and started_by is None and "LOCAL_RANK" not in os.environ:
        from memft.train.builders import check_compatibility

        check_compatibility(recipe)  # refuse before starting processes
        return _launch_processes(recipe.distributed.nproc_per_node, args.argv)
    try:
        result = finetune(recipe, resume=args.resume if args.resume is not None else False,
                          overwrite=args.overwrite)
    finally:
        _leave_process_group()
    if os.environ.get("RANK", "0") != "0":
        return 0  # the main process reports
    if result.interrupted:
        done = (f"Interrupted at step {result.steps}; checkpoint saved." if result.losses else
                "Interrupted before the first step of this run; nothing new was trained or saved.")
        print(f"{done} Continue with: memft finetune {args.recipe} {' '.join(args.overrides)} --resume".rstrip(),
              file=sys.stderr)
        return 130
    first, last = result.losses[0] if result.losses else float("nan"), result.losses[-1] if result.losses else 0
    print(f"Finished {result.steps} steps: loss {first:.4f} -> {last:.4f}"
          + (f", eval loss {result.eval['eval_loss']:.4f}" if result.eval else "")
          + f". Model in {result.output_dir / 'final'}")
    return 0


def _leave_process_group() -> None:
    """Destroy the process group a multi-process run joined, before the interpreter exits: a gloo group left
    to the exit handlers can abort a process ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def without_nproc(argv: list[str]) -> list[str]:
    """The command line for the started processes: they need no --nproc (and torchrun, which reads the
    line first, would take it for an abbreviation of its own --nproc-per-node)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _launch_processes(nproc: int, argv: list[str]) -> int:
    """Re-run this very command under torch.distributed.run with `nproc` processes on this machine."""
    import subprocess

    from memft.train.launcher import STARTED_BY_MEMFT

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "memft.cli", *without_nproc(argv)]
    return subprocess.call(command, env={**os.environ, STARTED_BY_MEMFT: "1"})


def cmd_validate(args) -> int:
    path = resolve_recipe(args.recipe)
    kind = recipe_kind(path) if path.is_file() else "finetune"
    if kind == "continual":
        from memft.continual.recipe import load_continual_recipe

        load_continual_recipe(path, args.overrides)
    elif kind == "edit":
        from memft.continual.recipe import load_edit_recipe

        load_edit_recipe(path, args.overrides)
    else:
        from memft.train.data import build_splits, with_run_length
        from memft.train.memory_estimate import check_builds
        from memft.train.models import load_tokenizer
        from memft.train.trackers import check_installed

        recipe = load_finetune_recipe(args.recipe, args.overrides)
        check_installed(recipe.train.report_to)
        check_builds(recipe)  # model, methods and optimizer as a run starts, on fake tensors
        splits = build_splits(recipe.data, load_tokenizer(recipe.model), recipe.train.seed)
        processes = recipe.distributed.nproc_per_node if recipe.distributed.engine != "none" else 1
        for note in splits.notes + with_run_length(recipe, len(splits.train), processes)[1]:
            print(note)
    print(f"{args.recipe}: valid {kind} recipe.")
    return 0


def cmd_memory(args) -> int:
    """Estimate (or measure) a recipe's training peak; fits table, largest category, what would cut it."""
    import json

    from memft.memory import comparison_markdown, get_gpu, plot_comparison, print_report
    from memft.train.memory_estimate import recipe_memory

    try:
        gpus = [get_gpu(args.gpu)] if args.gpu else None
    except ValueError as exc:
        raise RecipeError(f"--gpu: {exc}") from exc
    names = [args.recipe] + list(args.compare or [])
    reports = {}
    for name in names:
        recipe = load_finetune_recipe(name, args.overrides)
        label = Path(name).stem
        reports[label] = recipe_memory(recipe, config=args.config, device=args.device, measure=args.measure,
                                       name=label)
    if args.json:
        print(json.dumps({k: r.to_dict(gpus) for k, r in reports.items()} if args.compare
                         else reports[Path(args.recipe).stem].to_dict(gpus), indent=2))
    else:
        for report in reports.values():
            how = "measured on real tensors" if args.measure else "estimated on fake tensors (nothing allocated)"
            print(f"{report.name}: {how}, device {args.device}")
            print_report(report, gpus)
            for note in report.notes:
                print(f"note: {note}")
        if args.compare:
            print(comparison_markdown(reports))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for report in reports.values():
            report.save(out, stem=f"memory-{report.name}")
        if args.compare:
            plot_comparison(reports, out / "memory-comparison.png")
    return 0


def cmd_loram_export(args) -> int:
    """Recover a LoRAM run's adapter onto the full model (and merge it) for inference."""
    import json

    from memft.loram import export_recovered
    from memft.train.models import resolve_model_path
    from memft.train.recipe import validate_recipe

    run = Path(args.run_dir)
    if not (run / "run.json").is_file() or not (run / "final").is_dir():
        raise RecipeError(f"'{run}' is not a finished memft run (run.json and final/ are needed). Pass the "
                          "train.output_dir of a finished `adapter: {name: loram}` run.")
    recipe = validate_recipe(json.loads((run / "run.json").read_text())["recipe"])
    if recipe.adapter.name != "loram":
        raise RecipeError(f"'{run}' was trained with adapter '{recipe.adapter.name}', not loram; its final/ "
                          "already fits the model it was trained on.")
    out = Path(args.out) if args.out else run / "recovered"
    try:
        result = export_recovered(resolve_model_path(recipe.model.name_or_path), run / "final", None, out,
                                  merge=not args.no_merge)
    except ValueError as exc:
        raise RecipeError(f"loram export: {exc}") from exc
    print(f"Recovered adapter: {result.adapter_dir}" + (f"\nMerged model: {result.merged_dir}"
                                                         if result.merged_dir else ""))
    return 0


def cmd_export(args) -> int:
    """Write a checkpoint (or a run's newest intact one) as a directory `from_pretrained` loads."""
    from memft.train.export import export

    ckpt = export(Path(args.source), Path(args.dest))
    print(f"Exported {ckpt} to {args.dest}: load it with AutoModelForCausalLM.from_pretrained (or "
          "PeftModel.from_pretrained for an adapter).")
    return 0


def cmd_recipes(args) -> int:
    if args.copy:
        return _copy_recipe(args.copy, args.dest, args.force)
    if args.force or args.dest:
        raise RecipeError(f"{'--force' if args.force else f'DEST {args.dest!r}'} applies to --copy only: "
                          "memft recipes --copy NAME [DEST] [--force].")
    names = shipped_recipes()
    width = max(map(len, names)) + 2
    for name in names:
        path = RECIPES_DIR / f"{name}.yaml"
        print(f"{name:{width}s}{_recipe_summary(path)}\n{'':{width}s}{path}")
    print("\nRun one by name (memft finetune quickstart), or copy one to edit: memft recipes --copy NAME [DEST].")
    return 0


def _copy_recipe(name: str, dest: str | None, force: bool) -> int:
    """Write shipped recipe `name` to `dest` (default ./NAME.yaml; into `dest` when it is a directory)."""
    import yaml

    if name not in shipped_recipes():
        raise RecipeError(f"--copy: '{name}' is not a shipped recipe. Shipped recipes: {', '.join(shipped_recipes())}.")
    source = RECIPES_DIR / f"{name}.yaml"
    dest = Path(dest) if dest else Path(source.name)
    if dest.is_dir():
        dest = dest / source.name
    if dest.exists() and not force:
        raise RecipeError(f"'{dest}' exists already. Pass --force to replace it, or give another DEST.")
    if not dest.parent.is_dir():
        raise RecipeError(f"Cannot write '{dest}': directory '{dest.parent}' does not exist.")
    text = source.read_text()
    try:
        dest.write_text(text)
    except OSError as exc:
        raise RecipeError(f"Cannot write '{dest}': {exc.strerror}.") from exc
    kind = yaml.safe_load(text).get("kind", "finetune")
    print(f"Wrote {dest} (a copy of the shipped recipe '{name}'). Edit it, then: memft {kind} {dest}")
    return 0


def cmd_support(args) -> int:
    from memft.train.support import ENGINES, matrix_markdown, rows

    print(matrix_markdown())
    print("\nRefused combinations are stopped before anything is loaded, with the reason:")
    for row in rows():
        for engine in ENGINES:
            if engine in row.refused:
                print(f"  - {row.label} with {engine}: it {row.refused[engine]}.")
    return 0


def cmd_schema(args) -> int:
    from memft.train.schema_doc import describe_schema

    print(describe_schema(args.section))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memft", description="Memory-efficient fine-tuning.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                        help="print the installed memft version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="one of the commands below; `memft COMMAND --help` shows its arguments")

    p = sub.add_parser("finetune", help="train a recipe")
    p.add_argument("recipe", help="recipe YAML file or shipped recipe name")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=50")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint of train.output_dir, or from CHECKPOINT")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in train.output_dir")
    p.add_argument("--nproc", type=int, metavar="N", help="processes to start on this machine (sets "
                   "distributed.nproc_per_node; the recipe chooses distributed.engine)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("validate", help="check a recipe (of any kind) without running it")
    p.add_argument("recipe", help="recipe YAML file or shipped recipe name")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=50")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("memory", help="estimate a recipe's peak training memory and which GPUs it fits")
    p.add_argument("recipe", help="recipe YAML file or shipped recipe name")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--config", help="architecture to estimate instead of the recipe's model: a shipped config "
                   "name (llama-2-7b, gemma-2-2b, ...) or a config.json path")
    p.add_argument("--gpu", help="report only this GPU (e.g. 'RTX 4090')")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="device whose memory is estimated (cuda rounds to the allocator's 512-byte blocks)")
    p.add_argument("--measure", action="store_true", help="run the steps on real tensors instead (the model "
                   "must fit this machine)")
    p.add_argument("--compare", nargs="+", metavar="RECIPE", help="more recipes to compare side by side")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", help="directory for memory-<recipe>.md/.json/.png (and memory-comparison.png)")
    p.set_defaults(func=cmd_memory)

    p = sub.add_parser("loram", help="LoRAM tools")
    loram = p.add_subparsers(dest="loram_command", required=True, metavar="TOOL", help="the LoRAM tool to run")
    e = loram.add_parser("export", help="recover a LoRAM run's adapter onto the full model and merge it")
    e.add_argument("run_dir", help="train.output_dir of a finished loram run")
    e.add_argument("--out", help="output directory (default RUN_DIR/recovered)")
    e.add_argument("--no-merge", action="store_true", help="write only the recovered PEFT adapter")
    e.set_defaults(func=cmd_loram_export)

    p = sub.add_parser("export", help="write a checkpoint as a model directory that from_pretrained loads")
    p.add_argument("source", help="a checkpoint directory (checkpoints/step-NNNNNNN), or a run directory for its "
                   "newest intact checkpoint")
    p.add_argument("dest", help="a new (or empty) directory for the model, its config and its tokenizer")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("recipes", help="list the shipped recipes (path and description), or copy one to edit")
    p.add_argument("--copy", metavar="NAME", help="write shipped recipe NAME to a file to edit (DEST)")
    p.add_argument("dest", nargs="?", metavar="DEST", help="with --copy: the file to write (default ./NAME.yaml; "
                   "a directory gets NAME.yaml inside)")
    p.add_argument("--force", action="store_true", help="with --copy: replace DEST if it exists")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("support", help="print which methods each multi-process engine runs")
    p.set_defaults(func=cmd_support)

    p = sub.add_parser("schema", help="print every recipe field with its type or choices, default and help")
    p.add_argument("section", nargs="?", help="only this section (e.g. optimizer)")
    p.set_defaults(func=cmd_schema)

    from memft.continual.commands import add_continual_parser, add_edit_parser

    add_continual_parser(sub)
    add_edit_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command and return its exit code."""
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()  # a reader that left early (`memft schema | head`) shows here at the latest
    except BrokenPipeError:
        # Nothing more can be written: stdout goes to devnull, so the flush at exit stays quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what the shell reports for a command stopped by a closed pipe


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    args.argv = argv
    # Overrides may also follow flags (`finetune r.yaml --overwrite train.max_steps=5`).
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return args.func(args)
    except MemftError as exc:
        print(f"memft {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        after = (" Checkpoints already written are kept; continue with --resume." if args.command == "finetune"
                 else "")
        print(f"memft {args.command}: interrupted (Ctrl-C), stopped at once.{after}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
