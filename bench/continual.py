"""Continual learning and lifelong editing on memft:tiny-llama (CPU, about 15 minutes on an idle machine).

    python bench/continual.py            # writes bench/results/continual.md and continual_*.png

1. Task sequence: sequential LoRA vs I-LoRA vs MoRA (the paper's free keys, and with input-orthogonal
   keys) on the bundled synthetic suite (animals, colours, words, numbers; memft.continual.generate), same
   steps, learning rate and data order for all; average accuracy, BWT, forgetting, FWT, adapter memory
   after each task and one heatmap per method at the first seed; BWT and average accuracy at every seed
   (I-LoRA only at the first: it is the slowest).
2. Editing: WISE vs plain fine-tuning of the same down projection, T = 1, 10, 100 bundled counterfactual
   edits; Rel / Gen / Loc measured after all T edits (teacher-forced token accuracy and greedy exact match).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from memft.continual import (WISE, FineTuneEditor, evaluate_edits, load_edits, locality_reference,  # noqa: E402
                             plot_accuracy_matrix, run_edit_sequence, run_task_sequence, synthetic_suite)
from memft.train.models import resolve_model_path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def load():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path("memft:tiny-llama")
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


SEQUENCE_METHODS = {  # label: (method, options)
    "lora": ("lora", None),
    "ilora": ("ilora", None),
    "mora": ("mora", None),
    "mora + input-orthogonal keys": ("mora", {"input_subspace_energy": 0.95}),
}


def bench_sequence(steps: int, seeds: list[int]) -> tuple[list[str], list[str], list[str]]:
    tasks = synthetic_suite()
    rows, notes, per_seed = [], [], {}
    for seed in seeds:
        train = {"steps_per_task": steps, "batch_size": 8, "prompt_format": "compact", "seed": seed}
        for label, (method, options) in SEQUENCE_METHODS.items():
            if seed != seeds[0] and method == "ilora":
                continue  # I-LoRA (replay) is measured at the first seed only: it is the slowest
            options = {**(options or {}), "seed": seed} if method == "mora" else options
            model, tokenizer = load()
            start = time.perf_counter()
            result = run_task_sequence(model, tokenizer, tasks, method, options, train_options=train,
                                       optimizer={"name": "adamw", "lr": 5e-3})
            seconds = time.perf_counter() - start
            m = result.metrics
            per_seed.setdefault(label, []).append((seed, m["bwt"], m["average_accuracy"]))
            print(f"seed {seed} {label}: R={result.accuracy} {m}", flush=True)
            if seed != seeds[0]:
                continue
            growth = " / ".join(f"{p['adapter_total'] / 1024:.0f}" for p in result.parameter_bytes)
            extra = result.parameter_bytes[-1].get("replay_buffer") or result.parameter_bytes[-1].get("input_basis")
            kind = "buffer" if method == "ilora" else "input basis"
            rows.append(f"| {label} | {m['average_accuracy']:.3f} | {m['bwt']:+.3f} | {m['forgetting']:.3f} | "
                        f"{m['fwt']:+.3f} | {growth}{f' (+{extra / 1024:.0f} {kind})' if extra else ''} | "
                        f"{seconds:.0f} |")
            stem = method if label == method else f"{method}_orthogonal_keys"
            png = plot_accuracy_matrix(result.accuracy, result.task_names, RESULTS / f"continual_{stem}.png",
                                       title=f"{label}: accuracy after each task")
            notes.append(f"- {label}: R = {[[round(x, 2) for x in row] for row in result.accuracy]} "
                         f"(heatmap `{png.name}`)")
    seed_rows = [f"| {label} | " + " | ".join(f"{bwt:+.3f} / {acc:.3f}" for _, bwt, acc in values)
                 + f" | {sum(b for _, b, _ in values) / len(values):+.3f} |"
                 for label, values in per_seed.items() if len(values) == len(seeds)]
    return rows, notes, seed_rows


def edit_run(kind: str, edits: list[dict], **options):
    model, tokenizer = load()
    model.eval()
    reference = locality_reference(model, tokenizer, edits)
    editor = WISE(model, tokenizer, **options) if kind == "wise" else FineTuneEditor(model, tokenizer, **options)
    start = time.perf_counter()
    run_edit_sequence(editor, edits)
    seconds = time.perf_counter() - start
    return evaluate_edits(model, tokenizer, edits, reference), editor.parameter_bytes()["total"], seconds


def bench_editing(n_iter: int) -> tuple[list[str], list[tuple[str, int, object]]]:
    rows, points = [], []
    plans = [("FT (down_proj, AdamW 1e-2)", "ft", {"lr": 1e-2, "n_iter": n_iter}),
             ("WISE-Merge", "wise", {"n_iter": n_iter, "shard_size": 50, "merge_every": 100, "mode": "merge"}),
             ("WISE-Retrieve", "wise", {"n_iter": n_iter, "shard_size": 50, "merge_every": 50, "mode": "retrieve"}),
             ("WISE-Retrieve, shards of 10", "wise", {"n_iter": n_iter, "shard_size": 10, "merge_every": 10,
                                                      "mode": "retrieve"})]
    for T in (1, 10, 100):
        edits = load_edits(limit=T)
        for label, kind, options in plans:
            if T < 100 and label.startswith("WISE-Retrieve"):
                continue  # below 50 edits no shard is stored: identical to WISE-Merge (T = 10: one shard of 10)
            scores, size, seconds = edit_run(kind, edits, **options)
            name = label if T == 100 or kind == "ft" else "WISE"
            rows.append(f"| {T} | {name} | {scores.rel_token:.2f} / {scores.rel_exact:.2f} | "
                        f"{scores.gen_token:.2f} / {scores.gen_exact:.2f} | {scores.loc_token:.2f} / "
                        f"{scores.loc_exact:.2f} | {size / 1024:.0f} | {seconds:.0f} |")
            points.append((name, T, scores))
            print(rows[-1], flush=True)
    return rows, points


def plot_editing(points, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
    names = [n for n in dict.fromkeys(n for n, _, _ in points) if n != "WISE"]
    for ax, metric in zip(axes, ("rel_exact", "gen_exact", "loc_exact")):
        for name in names:  # the WISE points at T < 100 start both WISE-Merge and WISE-Retrieve lines
            series = [(T, getattr(s, metric)) for n, T, s in points
                      if n == name or (n == "WISE" and name.startswith("WISE-"))]
            ax.plot([t for t, _ in series], [v for _, v in series], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_title(metric.replace("_exact", " (exact match)"))
        ax.set_xlabel("edits T")
    axes[0].set_ylim(-0.05, 1.05)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=70, help="training steps per task")
    parser.add_argument("--edit-iters", type=int, default=20, help="optimisation steps per edit")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the task sequences "
                        "(the first gives the main table and the heatmaps)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sequence_rows, notes, seed_rows = bench_sequence(args.steps, args.seeds)
    edit_rows, points = bench_editing(args.edit_iters)
    plot_editing(points, RESULTS / "continual_editing.png")
    total = time.perf_counter() - start
    text = "\n".join([
        "# Continual adapters and lifelong editing (memft:tiny-llama, CPU)",
        "",
        f"`python bench/continual.py --steps {args.steps} --edit-iters {args.edit_iters} --seeds "
        f"{' '.join(map(str, args.seeds))}`; one CPU thread, "
        f"{total / 60:.1f} min in all on a shared machine (timings are indicative only).",
        "",
        f"## Task sequence: synthetic suite (animals, colours, words, numbers), {args.steps} AdamW steps per task,",
        "batch 8, lr 5e-3, compact prompts, accuracy = exact match of the answer under teacher forcing",
        "",
        "BWT = mean over the first T-1 tasks of R[T-1][j] - R[j][j]; forgetting = mean of max_{l<T-1} R[l][j] - "
        "R[T-1][j]; FWT = mean of R[i-1][i] - b_i (b: untrained model).",
        "",
        f"Seed {args.seeds[0]} (data order, adapter initialisation):",
        "",
        "| method | avg acc | BWT | forgetting | FWT | adapter KiB after each task | s |",
        "|---|---|---|---|---|---|---|",
        *sequence_rows,
        "",
        *notes,
        "",
        "MoRA rows: the paper's method (free keys, per-token relevance) and the memft extension that keeps new "
        "experts' keys orthogonal to the input subspace holding 95% of earlier tasks' input energy "
        "(`input_subspace_energy: 0.95`, see memft/continual/mora.py).",
        "",
        "BWT / average accuracy per seed:",
        "",
        "| method | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean BWT |",
        "|---|" + "---|" * (len(args.seeds) + 1),
        *seed_rows,
        "",
        "## Editing: counterfactual facts about the pretraining world, evaluated after all T edits",
        "",
        f"Each edit: {args.edit_iters} optimisation steps. Cells: teacher-forced token accuracy / greedy exact "
        "match. Loc compares with the unedited model's answers on unrelated river facts. WISE at T < 100 keeps "
        "all edits in one shard (merge and retrieve coincide); at T = 100 shards of 50 edits are TIES-merged "
        "(Merge: one memory; Retrieve: a memory per shard); the last row stores a shard every 10 edits and "
        "retrieves among 10 memories.",
        "",
        "| T | method | Rel | Gen | Loc | side memory KiB | edit s |",
        "|---|---|---|---|---|---|---|",
        *edit_rows,
        "",
        "Plot: `continual_editing.png`.",
        "",
    ])
    (RESULTS / "continual.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
