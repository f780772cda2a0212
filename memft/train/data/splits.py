"""The run's data: the recipe's data section read, tokenised, mixed and packed into training and eval examples."""

from __future__ import annotations

from dataclasses import dataclass, field

from memft.train.data.encoding import load_chat_template, tokenize_rows
from memft.train.data.mixing import mix
from memft.train.data.packing import pack, packing_note
from memft.train.data.sources import load_rows
from memft.train.recipe import DataSection, DatasetSource


def held_out(key: str) -> str:
    """What messages call the rows held out of `key` for evaluation."""
    return f"the held-out split (data.eval_fraction of {key})"


HELD_OUT = held_out("data.train")


@dataclass
class Splits:
    train: list[dict]
    eval: list[dict]
    notes: list[str] = field(default_factory=list)  # rows read, dropped, truncated (per source); mixing; packing


def training_sources(data: DataSection) -> list[tuple[str, DatasetSource, float | None]]:
    """(recipe key, source, weight) of each training source: data.train, or data.mix.i with its weight."""
    if data.mix is None:
        return [("data.train", data.train, None)]
    return [(f"data.mix.{i}", source, source.weight) for i, source in enumerate(data.mix)]


def build_splits(data: DataSection, tokenizer, seed: int) -> Splits:
    """Training and evaluation examples. Without data.eval, data.eval_fraction of each training source's rows
    is held out (drawn by `seed`) before mixing, so no evaluation row is trained on."""
    template = load_chat_template(data, tokenizer)
    train_rows = [(key, source, weight, load_rows(source, key)) for key, source, weight in training_sources(data)]
    eval_rows = []
    if data.eval is not None:
        eval_rows.append(("data.eval", data.eval, load_rows(data.eval, "data.eval")))
    elif data.eval_fraction > 0:
        for i, (key, source, weight, rows) in enumerate(train_rows):
            if len(rows) >= 2:
                parts = rows.train_test_split(test_size=data.eval_fraction, seed=seed, shuffle=True)
                train_rows[i] = (key, source, weight, parts["train"])
                eval_rows.append((held_out(key), source, parts["test"]))
    notes: list[str] = []
    parts = [(key, tokenize_rows(rows, source, tokenizer, data, key, notes, template), weight)
             for key, source, weight, rows in train_rows]
    if data.mix is None:
        train = parts[0][1]
    else:
        train, note = mix(parts, seed)
        notes.append(note)
    train = _maybe_packed(train, "data.mix" if data.mix else "data.train", data, tokenizer, notes)
    evaluation = [example for key, source, rows in eval_rows
                  for example in tokenize_rows(rows, source, tokenizer, data, key, notes, template)]
    eval_key = "data.eval" if data.eval is not None else held_out("data.mix" if data.mix else "data.train")
    return Splits(train, _maybe_packed(evaluation, eval_key, data, tokenizer, notes), notes)


def _maybe_packed(examples: list[dict], key: str, data: DataSection, tokenizer, notes: list[str]) -> list[dict]:
    if not data.packing or not examples:
        return examples
    rows = pack(examples, data.max_seq_len, tokenizer.pad_token_id)
    notes.append(packing_note(key, len(examples), rows, data.max_seq_len))
    return rows
