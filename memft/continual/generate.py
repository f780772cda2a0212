"""Rebuild the bundled continual-learning data in memft/data/continual/ (deterministic, seed 0).

    python -m memft.continual.generate

Task suite (instruction / input / output records). Each task reads a list of three distinct items
from its own vocabulary and asks for the item at a position; the rules conflict across tasks, so a shared
adapter that learns a later task tends to apply its rule to the earlier tasks' inputs (forgetting), while
the inputs themselves tell the tasks apart.

    animals   "Name the first animal."   otter, heron, lynx -> otter
    colours   "Name the last colour."    red, blue, grey    -> grey
    words     "Name the middle word."    river, stone, pepper -> stone
    numbers   "Name the first number."   12, 7, 93          -> 12

Each task gets `<name>.train.jsonl` (240 rows) and `<name>.eval.jsonl` (64 rows whose inputs never occur
in the training rows).

Edits (`edits.jsonl`, 120 records) are counterfactual facts about the synthetic world the bundled
memft:tiny-llama was pretrained on (memft.data.synthetic, seed 0): a new capital, national animal or flag
colour for a country. Each record holds `prompt`, `target` (with its leading space), `rephrase` (a
paraphrase of the prompt), `locality_prompt` / `locality_target` (a river fact that no edit touches,
for evaluation) and `loc_prompt` (an unrelated sentence about population, for training the editor).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from memft.data.synthetic import _ANIMALS, _COLOURS, _WORDS, make_world

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "continual"
TASKS = {  # name: (instruction, item vocabulary, answer position)
    "animals": ("Name the first animal.", _ANIMALS, 0),
    "colours": ("Name the last colour.", _COLOURS, 2),
    "words": ("Name the middle word.", _WORDS, 1),
    "numbers": ("Name the first number.", [str(n) for n in range(100)], 0),
}
TRAIN_ROWS, EVAL_ROWS, NUM_EDITS = 240, 64, 120


def task_rows(seed: int = 0) -> dict[str, dict[str, list[dict]]]:
    """{task: {"train": rows, "eval": rows}}; evaluation inputs are disjoint from training inputs."""
    rng = random.Random(seed)
    out = {}
    for task, (instruction, vocabulary, position) in TASKS.items():
        lists: list[tuple[str, ...]] = []
        seen: set[tuple[str, ...]] = set()
        while len(lists) < EVAL_ROWS + TRAIN_ROWS:
            items = tuple(rng.sample(vocabulary, 3))
            if items not in seen:
                seen.add(items)
                lists.append(items)
        rows = [{"instruction": instruction, "input": ", ".join(items), "output": items[position]} for items in lists]
        out[task] = {"eval": rows[:EVAL_ROWS], "train": rows[EVAL_ROWS:]}
    return out


def edit_records(seed: int = 0) -> list[dict]:
    """Counterfactual edits about the synthetic world (see module docstring)."""
    rng = random.Random(seed)
    world = make_world(seed)
    records = []
    for i, country in enumerate(world):
        other = world[(i + 1 + rng.randrange(len(world) - 1)) % len(world)]
        animal = rng.choice([a for a in _ANIMALS if a != country.animal])
        colour = rng.choice([c for c in _COLOURS if c != country.colour])
        unrelated = world[(i + 7) % len(world)]
        river_fact = world[(i + 13) % len(world)]
        common = {"locality_prompt": f"The river {river_fact.river} flows through",
                  "locality_target": f" {river_fact.name}",
                  "loc_prompt": f"About {unrelated.population} million people live in {unrelated.name}."}
        records += [
            {"prompt": f"The capital of {country.name} is", "target": f" {other.capital}",
             "rephrase": f"The capital city of {country.name} is", **common},
            {"prompt": f"The national animal of {country.name} is the", "target": f" {animal}",
             "rephrase": f"The national animal of the country {country.name} is the", **common},
            {"prompt": f"The flag of {country.name} is", "target": f" {colour}",
             "rephrase": f"The colour of the flag of {country.name} is", **common},
        ]
    rng.shuffle(records)
    return records[:NUM_EDITS]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main() -> None:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    for task, splits in task_rows().items():
        for split, rows in splits.items():
            _write_jsonl(DATA_DIR / f"{task}.{split}.jsonl", rows)
    _write_jsonl(DATA_DIR / "edits.jsonl", edit_records())
    print(f"wrote {DATA_DIR}")


if __name__ == "__main__":
    main()
