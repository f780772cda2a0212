"""Tasks for continual learning: named datasets with a train and an eval split, and their tokenisation.

A task file is JSON lines with `instruction`, optional `input` and `output` (the alpaca columns). Give an
eval file, or a fraction of the rows is held out. The bundled synthetic suite (see
memft.continual.generate) is `synthetic_suite()`; it runs on a CPU in minutes with memft:tiny-llama.

Prompt formats: `alpaca` renders memft.train.data.alpaca_prompt and the answer follows it directly;
`compact` renders "INSTRUCTION INPUT\\nAnswer:" and the answer follows after a space (short sequences,
for quick runs of small models).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from memft.continual.generate import DATA_DIR, TASKS
from memft.errors import DataError
from memft.train.data import IGNORE_INDEX, alpaca_prompt

SYNTHETIC_TASKS = tuple(TASKS)


def _compact_prompt(instruction: str, input_text: str = "") -> str:
    return f"{instruction} {input_text}\nAnswer:" if input_text else f"{instruction}\nAnswer:"


# name -> (prompt renderer, text put between prompt and answer)
PROMPT_FORMATS: dict[str, tuple[Callable[[str, str], str], str]] = {
    "alpaca": (alpaca_prompt, ""),
    "compact": (_compact_prompt, " "),
}


@dataclass
class Task:
    """One task: `train` and `eval` rows, each a dict with instruction, input, output."""
    name: str
    train: list[dict]
    eval: list[dict]

    def __post_init__(self):
        for split in ("train", "eval"):
            rows = getattr(self, split)
            if not rows:
                raise DataError(f"task '{self.name}': the {split} split has no rows. Give the task a file with "
                                "rows, or lower eval_fraction so both splits get some.")
            for i, row in enumerate(rows):
                missing = [c for c in ("instruction", "output") if not isinstance(row.get(c), str)]
                if missing:
                    raise DataError(f"task '{self.name}', {split} row {i}: column(s) {', '.join(missing)} "
                                    "missing or not text. Task rows need 'instruction' and 'output' (strings) "
                                    "and may have 'input'.")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"task file '{path}' does not exist. Point at a .jsonl file with instruction / input / "
                        "output columns.")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"task file '{path}', line {number}: not valid JSON ({exc.msg}). Each line must "
                                "be one JSON object.") from exc
    return rows


def load_task_file(path: str | Path, eval_path: str | Path | None = None, name: str | None = None,
                   eval_fraction: float = 0.2, seed: int = 0) -> Task:
    """A task from a JSON-lines file; without `eval_path`, `eval_fraction` of the rows (shuffled with
    `seed`) become the eval split. The name defaults to the file name up to its first dot."""
    if not 0.0 < eval_fraction < 1.0 and eval_path is None:
        raise ValueError(f"eval_fraction must be in (0, 1) when no eval_path is given, got {eval_fraction}. "
                         "Pass e.g. 0.2, or give an eval file.")
    path = Path(path)
    rows = _read_jsonl(path)
    name = name or path.name.split(".")[0]
    if eval_path is not None:
        return Task(name, rows, _read_jsonl(Path(eval_path)))
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(eval_fraction * len(rows))) if len(rows) > 1 else 0
    return Task(name, [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]])


def synthetic_suite(names: Sequence[str] | None = None) -> list[Task]:
    """The bundled tasks, in the given order (default: animals, colours, words, numbers)."""
    names = list(names) if names is not None else list(SYNTHETIC_TASKS)
    unknown = [n for n in names if n not in SYNTHETIC_TASKS]
    if unknown or not names:
        raise ValueError(f"synthetic_suite: unknown task(s) {unknown or names}; the bundled tasks are "
                         f"{', '.join(SYNTHETIC_TASKS)}.")
    return [load_task_file(DATA_DIR / f"{n}.train.jsonl", DATA_DIR / f"{n}.eval.jsonl", name=n) for n in names]


def encode_rows(rows: Sequence[dict], tokenizer, prompt_format: str = "alpaca",
                max_seq_len: int | None = None) -> list[dict]:
    """Token ids and labels (-100 on the prompt) for each row; the answer ends with EOS.

    Rows whose answer would be cut by `max_seq_len` are refused rather than silently truncated.
    """
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got '{prompt_format}'.")
    render, joiner = PROMPT_FORMATS[prompt_format]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples = []
    for i, row in enumerate(rows):
        prompt = tokenizer(render(str(row["instruction"]), str(row.get("input") or "")))["input_ids"]
        answer = tokenizer(joiner + str(row["output"]), add_special_tokens=False)["input_ids"] + eos
        if max_seq_len is not None and len(prompt) + len(answer) > max_seq_len:
            raise DataError(f"row {i} is {len(prompt) + len(answer)} tokens long, more than max_seq_len="
                            f"{max_seq_len}; its answer would be cut. Raise max_seq_len or shorten the row.")
        examples.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer})
    return examples
