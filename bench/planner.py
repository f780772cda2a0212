"""The planner against the runs it plans, on memft:tiny-llama (CPU, about 3 minutes on an idle machine).

    python bench/planner.py          # writes bench/results/planner.md

For each setting that changes the training step (accumulation, autocast, attention kernel, checkpointing,
each step kind, adapter, loss and compressor) and for each shipped fine-tuning recipe (its methods, sizes
and precision, on full-length packed batches), `memft finetune` runs two tracked steps and the planner
(`memft memory`, fake tensors) estimates the same recipe; the table gives both peaks and their ratio.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memft.recipe_files import RECIPES_DIR, offline_stand_in, shipped_recipes  # noqa: E402
from memft.train.loop import finetune  # noqa: E402
from memft.train.memory_estimate import recipe_memory  # noqa: E402
from memft.train.recipe import load_recipe, validate_recipe  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PACKED = {"train": {"path": "memft:text", "format": "text", "max_examples": 400}, "packing": True,
          "eval_fraction": 0.0}
BASE = {"data": {**PACKED, "max_seq_len": 64}, "train": {"max_steps": 2, "batch_size": 4, "device": "cpu"},
        "memory": {"track_steps": 2}}
SETTINGS = {
    "adamw": {},
    "grad_accum 4": {"train": {"grad_accum": 4}},
    "bf16 autocast": {"train": {"mixed_precision": "bf16"}},
    "eager attention": {"model": {"attn_implementation": "eager"}},
    "gradient checkpointing": {"model": {"gradient_checkpointing": True}},
    "layer-wise GaLore, grad_accum 2": {"optimizer": {"name": "galore_adamw", "rank": 8, "layerwise": True},
                                       "train": {"grad_accum": 2}},
    "MeZO": {"optimizer": {"name": "mezo"}},
    "LoRA": {"adapter": {"name": "lora", "r": 4}},
    "cut cross-entropy": {"loss": {"name": "cut_cross_entropy"}},
    "Mesa": {"activations": {"name": "mesa"}},
    "WTA-CRS": {"activations": {"name": "wta_crs"}},
    "S2A (eager attention)": {"activations": {"name": "s2a"}, "model": {"attn_implementation": "eager"}},
}


def _merged(changes: dict, output_dir: Path) -> dict:
    data = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value}
    data["train"]["output_dir"] = str(output_dir)
    return data


def _compare(recipe) -> tuple[int, int]:
    finetune(recipe)
    tracked = json.loads((Path(recipe.train.output_dir) / "memory.json").read_text())["peak_bytes"]
    return recipe_memory(recipe, device="cpu").peak_bytes, tracked


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, changes in SETTINGS.items():
            rows.append((label, *_compare(validate_recipe(_merged(changes, Path(tmp) / label.replace(" ", "_"))))))
        for name in shipped_recipes(kind="finetune"):
            stand_in = offline_stand_in(name)  # a hub model's recipe runs on the bundled one
            shipped = load_recipe(RECIPES_DIR / f"{name}.yaml", stand_in)
            data = {**PACKED, "max_seq_len": shipped.data.max_seq_len}
            recipe = load_recipe(RECIPES_DIR / f"{name}.yaml", [
                *stand_in, f"train.output_dir={Path(tmp) / name}", "train.max_steps=2", "train.device=cpu",
                "memory.track_steps=2", f"data={json.dumps(data)}"])
            rows.append((f"recipe {name}", *_compare(recipe)))
    lines = ["# Planner vs. run (memft:tiny-llama, CPU, two tracked steps)", "",
             "`python bench/planner.py`: the planner's fake-tensor estimate and the peak `memft finetune` tracked "
             "for the same recipe.", "", "| setting | estimate (bytes) | run (bytes) | estimate / run |",
             "|---|---|---|---|"]
    lines += [f"| {label} | {est:,} | {run:,} | {est / run:.4f} |" for label, est, run in rows]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "planner.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
