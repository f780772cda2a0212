"""Datasets: loading (HF `datasets`), checking, formatting, tokenisation, packing and a resumable batch order.

Formats:
- `text`: one document per row in `text_field`; every token is trained on.
- `alpaca`: `instruction`, optional `input`, `output`, rendered with the prompt template below.
- `chat`: `messages` (list of {role, content}) rendered by the tokenizer's chat template.
For alpaca and chat with `loss_on: response`, prompt tokens get label -100 so only responses are learnt.

Bad data is refused with a DataError naming the file, the line (or row index) and what is wrong; rows dropped
or truncated by tokenisation are counted in `Splits.notes`.
"""

from __future__ import annotations

import codecs
import csv
import itertools
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memft.errors import DataError
from memft.train.recipe import DataSection, DatasetSource

IGNORE_INDEX = -100
BUNDLED = {"memft:alpaca": "alpaca.jsonl", "memft:chat": "chat.jsonl", "memft:text": "text.txt"}
BUNDLED_DIR = Path(__file__).resolve().parents[1] / "data"
LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
REQUIRED_COLUMNS = {"alpaca": ("instruction", "output"), "chat": ("messages",)}
OPTIONAL_COLUMNS = {"alpaca": ("input",)}
CHAT_SHAPE = 'a list of {"role": ..., "content": ...} objects'
HELD_OUT = "the held-out split (data.eval_fraction of data.train)"


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The instruction prompt; the response follows directly after it."""
    if input_text:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def resolve_data_path(path: str) -> str:
    if path.startswith("memft:"):
        if path not in BUNDLED:
            raise DataError(f"data path '{path}' is not a bundled dataset; bundled: {', '.join(BUNDLED)}.")
        return str(BUNDLED_DIR / BUNDLED[path])
    return path


def load_rows(source: DatasetSource, key: str):
    """Rows of a local file or hub dataset as a `datasets.Dataset`; `key` names the recipe field."""
    import datasets

    path = resolve_data_path(source.path)
    local = Path(path)
    if local.suffix in LOADERS or local.exists():
        builder = _check_local_file(local, key, path)
        conflict = _scan_json(local, source, key, path) if builder == "json" else None
        if builder in ("text", "csv"):
            _check_utf8(local, key, path)
        options = _csv_options(local) if builder == "csv" else {}
        try:
            rows = datasets.load_dataset(builder, data_files=str(local), split="train", **options)
        except Exception as exc:  # datasets raises many types for malformed files
            reason = _first_line(exc.__cause__ or exc)
            if conflict:
                raise DataError(f"{key}.path: cannot load '{path}': {conflict}, which `datasets` cannot put in "
                                f"one table ({reason.rstrip('.')}). Give the column one type in every row.") from exc
            raise DataError(f"{key}.path: cannot parse '{path}' as {builder}: {reason}") from exc
    else:
        builder = "hub"
        try:
            rows = datasets.load_dataset(path, split=source.split)
        except Exception as exc:
            raise DataError(f"{key}.path: '{path}' is not a local file and loading it as a hub dataset "
                            f"failed: {_first_line(exc)} If this machine is offline, download the data and "
                            "point the path at a local file.") from exc
    if source.max_examples is not None:
        rows = rows.select(range(min(source.max_examples, len(rows))))
    _check_columns(rows, source, key, path)
    if builder in ("csv", "parquet", "hub"):  # JSON was checked line by line before loading; text is all text
        _check_loaded_rows(rows, source, key, path)
    return rows


def _check_local_file(local: Path, key: str, path: str) -> str:
    """The `datasets` builder for a local data file, once it is known to be a non-empty file."""
    if local.is_dir():
        raise DataError(f"{key}.path: '{path}' is a directory, but a data file is needed. Point {key}.path at "
                        f"one {'/'.join(LOADERS)} file.")
    if not local.is_file():
        raise DataError(f"{key}.path: file '{path}' does not exist. Check the path (relative paths are "
                        "resolved from the current directory).")
    if _is_blank(local):
        raise DataError(f"{key}.path: '{path}' has no rows. Point it at a file with data.")
    if local.suffix not in LOADERS:
        raise DataError(f"{key}.path: cannot read '{path}': supported local files are {', '.join(LOADERS)}.")
    return LOADERS[local.suffix]


def _is_blank(path: Path) -> bool:
    """Empty or whitespace only (the datasets loaders fail obscurely on such files)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    return not head.strip() and path.stat().st_size <= len(head)


def _lines(local: Path, key: str, path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a local file; a line that is not UTF-8 raises a DataError."""
    with open(local, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                utf16 = number == 1 and raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
                raise DataError(f"{key}.path: cannot read '{path}': line {number} is not UTF-8 text (byte "
                                f"{raw[exc.start]:#04x} at column {exc.start + 1}"
                                f"{'; the file looks like UTF-16' if utf16 else ''}). Re-save the file as "
                                "UTF-8.") from exc


def _check_utf8(local: Path, key: str, path: str) -> None:
    for _ in _lines(local, key, path):
        pass


def _csv_options(local: Path) -> dict:
    """Read every CSV column as text: pandas would turn a column of digits into numbers."""
    import datasets

    with open(local, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    if not all(header) or len(set(header)) < len(header):  # pandas renames such columns; let it infer
        return {}
    return {"features": datasets.Features({name: datasets.Value("string") for name in header})}


def _json_rows(local: Path, key: str, path: str) -> Iterator[tuple[str, object]]:
    """(where, row) for each row of JSON Lines, or of one JSON list when the file starts with '[' (as
    `datasets` reads them); `where` is 'line N' or 'row index N'."""
    lines = _lines(local, key, path)
    number, text = next(((n, t) for n, t in lines if t.strip()), (0, ""))
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text + "".join(rest for _, rest in lines))
        except json.JSONDecodeError as exc:
            raise DataError(f"{key}.path: cannot parse '{path}': it is not valid JSON ({exc.msg} at line "
                            f"{exc.lineno + number - 1}, column {exc.colno}).") from exc
        for index, item in enumerate(items):
            yield f"row index {index}", {"text": item} if isinstance(item, str) else item
        return
    for number, text in itertools.chain([(number, text)], lines):
        if not text.strip():
            continue
        try:
            yield f"line {number}", json.loads(text.rstrip("\r\n"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{key}.path: cannot parse '{path}': line {number} is not valid JSON ({exc.msg} at "
                            f"column {exc.colno}). Each line of a JSON Lines file must hold one complete JSON "
                            "object.") from exc


def _scan_json(local: Path, source: DatasetSource, key: str, path: str) -> str | None:
    """Check a local JSON file row by row (UTF-8, syntax, the format's column types) before `datasets` reads
    it, so that errors name the line. Returns a description of the first column whose type changes from row
    to row (`datasets` cannot always load those), or None."""
    types: dict[str, tuple[str, str]] = {}
    first_missing: dict[str, str] = {}
    conflict = None
    for count, (where, row) in enumerate(_json_rows(local, key, path)):
        if not isinstance(row, dict):
            raise _bad_row(key, path, where, f"it holds {_kind(row)}, but each row must be a JSON object")
        if source.max_examples is None or count < source.max_examples:  # later rows are not used
            problem = _row_problem(row, source, allow_missing=True)
            if problem:
                raise _bad_row(key, path, where, problem)
            for column in _required_columns(source):
                if row.get(column) is None:
                    first_missing.setdefault(column, where)
        for column, value in row.items():
            if value is not None:
                first_type, first_where = types.setdefault(column, (_json_type(value), where))
                if conflict is None and _json_type(value) != first_type:
                    conflict = (f"column '{column}' holds {first_type} at {first_where} but "
                                f"{_json_type(value)} at {where}")
    for column, where in first_missing.items():
        if column in types:  # a column absent from every row is reported by _check_columns
            raise _bad_row(key, path, where, _missing_problem(column, source))
    return conflict


def _check_loaded_rows(rows, source: DatasetSource, key: str, path: str) -> None:
    """The format's column types, row by row, for data not read as JSON Lines (csv, parquet, hub)."""
    columns = [c for c in _format_columns(source) if c in rows.column_names]
    for index, row in enumerate(rows.select_columns(columns)):
        problem = _row_problem(row, source)
        if problem:
            raise _bad_row(key, path, f"row index {index}", problem)


def _required_columns(source: DatasetSource) -> tuple[str, ...]:
    return REQUIRED_COLUMNS.get(source.format, (source.text_field,))


def _format_columns(source: DatasetSource) -> tuple[str, ...]:
    return _required_columns(source) + OPTIONAL_COLUMNS.get(source.format, ())


def _row_problem(row: dict, source: DatasetSource, allow_missing: bool = False) -> str | None:
    """What makes one row unusable for its format, or None. Optional columns may always be null."""
    for column in _format_columns(source):
        value = row.get(column)
        if value is None:
            if not allow_missing and column in _required_columns(source):
                return _missing_problem(column, source)
        elif source.format == "chat":
            problem = _messages_problem(value)
            if problem:
                return problem
        elif not isinstance(value, str):
            return f"column '{column}' holds {_kind(value)}, but format '{source.format}' needs a string"
    return None


def _missing_problem(column: str, source: DatasetSource) -> str:
    needed = CHAT_SHAPE if source.format == "chat" else "a string"
    return f"column '{column}' is missing or null, but format '{source.format}' needs {needed}"


def _messages_problem(messages) -> str | None:
    if not isinstance(messages, list):
        return f"column 'messages' holds {_kind(messages)}, but format 'chat' needs {CHAT_SHAPE}"
    for number, message in enumerate(messages, 1):
        where = f"message {number} of column 'messages'"
        if not isinstance(message, dict):
            return f"{where} is {_kind(message)}, but format 'chat' needs {CHAT_SHAPE}"
        for name in ("role", "content"):
            if message.get(name) is None:
                return f"{where} has no '{name}', but format 'chat' needs {CHAT_SHAPE}"
            if not isinstance(message[name], str):
                return f"the '{name}' of {where} is {_kind(message[name])}, but format 'chat' needs a string"
    return None


def _bad_row(key: str, path: str, where: str, problem: str) -> DataError:
    return DataError(f"{key}.path: '{path}' {where}: {problem}. Fix or remove that row.")


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    names = {str: "a string", list: "a list", dict: "an object"}
    return next((name for kind, name in names.items() if isinstance(value, kind)), f"a {type(value).__name__}")


def _kind(value) -> str:
    """The JSON type of a value with a short preview, e.g. 'a number (7)'."""
    if value is None:
        return "null"
    preview = json.dumps(value, ensure_ascii=False, default=str)
    return f"{_json_type(value)} ({preview if len(preview) <= 40 else preview[:37] + '...'})"


def _check_columns(rows, source: DatasetSource, key: str, path: str) -> None:
    if len(rows) == 0:
        raise DataError(f"{key}.path: '{path}' has no rows. Point it at a file with data.")
    required = _required_columns(source)
    missing = [c for c in required if c not in rows.column_names]
    if missing:
        raise DataError(f"{key}: format '{source.format}' needs column(s) {', '.join(missing)}, but "
                        f"'{path}' has {', '.join(rows.column_names)}. Fix the file or choose the right "
                        f"{key}.format" + (f" / {key}.text_field." if source.format == "text" else "."))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__).rstrip(".") + "."


# ------------------------------------------------------------------------------------- tokenisation
def encode_row(row: dict, source: DatasetSource, tokenizer, loss_on: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one row, before truncation."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if source.format == "text":
        ids = tokenizer(str(row[source.text_field]))["input_ids"] + eos
        return ids, list(ids)
    if source.format == "alpaca":
        prompt = tokenizer(alpaca_prompt(str(row["instruction"]), str(row.get("input") or "")))["input_ids"]
        response = tokenizer(str(row["output"]), add_special_tokens=False)["input_ids"] + eos
        prompt_labels = [IGNORE_INDEX] * len(prompt) if loss_on == "response" else list(prompt)
        return prompt + response, prompt_labels + response
    return _encode_chat(row["messages"], tokenizer, loss_on)


def _encode_chat(messages: list[dict], tokenizer, loss_on: str) -> tuple[list[int], list[int]]:
    """Render with the chat template; label only the assistant turns (found by rendering prefixes)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("data format 'chat' needs a tokenizer with a chat template; this tokenizer has none. "
                        "Use format 'alpaca' or 'text', or a model whose tokenizer defines chat_template.")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") == "assistant":
            start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
            end = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
            spans.append((start, end))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    if loss_on == "all":
        return ids, list(ids)
    labels = [tok if any(s <= a and b <= e for s, e in spans) and b > a else IGNORE_INDEX
              for tok, (a, b) in zip(ids, encoded["offset_mapping"])]
    return ids, labels


def tokenize_rows(rows, source: DatasetSource, tokenizer, data: DataSection, key: str,
                  notes: list[str] | None = None) -> list[dict]:
    """Encode rows (truncated to data.max_seq_len unless packing) and drop those left without a trainable
    token; one sentence counting rows read, dropped (and why) and truncated is appended to `notes`."""
    no_assistant = "no assistant message"
    beyond = f"no trainable token within data.max_seq_len={data.max_seq_len} (raise data.max_seq_len)"
    examples, dropped, truncated = [], Counter(), 0
    for row in rows:
        if (source.format == "chat" and data.loss_on == "response"
                and not any(m["role"] == "assistant" for m in row["messages"])):
            dropped[no_assistant] += 1
            continue
        ids, labels = encode_row(row, source, tokenizer, data.loss_on)
        cut = not data.packing and len(ids) > data.max_seq_len
        if cut:
            ids, labels = ids[: data.max_seq_len], labels[: data.max_seq_len]
        if not any(label != IGNORE_INDEX for label in labels):
            dropped[beyond if cut else "no trainable token"] += 1
            continue
        truncated += cut
        examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        if set(dropped) == {no_assistant}:
            raise DataError(f"{key}: no row of '{source.path}' has a message with role 'assistant', so with "
                            "data.loss_on=response there is nothing to learn. Chat rows need at least one "
                            '{"role": "assistant", "content": ...} message (or set data.loss_on=all).')
        raise DataError(f"{key}: no row of '{source.path}' has a trainable token after tokenisation and "
                        f"truncation to data.max_seq_len={data.max_seq_len}. Raise max_seq_len or check the data.")
    packed = pack(examples, data.max_seq_len) if data.packing else examples
    if notes is not None:
        notes.append(_row_note(key, len(rows), dropped, truncated, len(packed) if data.packing else None, data))
    return packed


def _row_note(key: str, read: int, dropped: Counter, truncated: int, packed: int | None, data: DataSection) -> str:
    """E.g. 'data.train: 12 of 1,500 rows dropped: no assistant message; 180 rows truncated to ...'."""
    parts = []
    if dropped:
        reasons = (next(iter(dropped)) if len(dropped) == 1
                   else ", ".join(f"{n:,} with {reason}" for reason, n in dropped.items()))
        parts.append(f"{sum(dropped.values()):,} of {_count(read, 'row')} dropped: {reasons}")
    if truncated:
        counted = _count(truncated, "row") if parts else f"{truncated:,} of {_count(read, 'row')}"
        parts.append(f"{counted} truncated to data.max_seq_len={data.max_seq_len}")
    if not parts:
        parts.append(f"{_count(read, 'row')} read, none dropped or truncated")
    if packed is not None:
        parts.append(f"packed into {_count(packed, 'sequence')} of up to {data.max_seq_len} tokens")
    return f"{key}: {'; '.join(parts)}."


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def pack(examples: list[dict], seq_len: int) -> list[dict]:
    """Concatenate examples and cut into `seq_len` blocks (the last, shorter block is kept)."""
    ids = [t for ex in examples for t in ex["input_ids"]]
    labels = [t for ex in examples for t in ex["labels"]]
    return [{"input_ids": ids[i: i + seq_len], "labels": labels[i: i + seq_len]}
            for i in range(0, len(ids), seq_len)]


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels (-100 on padding)."""
    length = max(len(ex["input_ids"]) for ex in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids[i, :n] = torch.tensor(ex["input_ids"])
        labels[i, :n] = torch.tensor(ex["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------------------------------- the splits
@dataclass
class Splits:
    train: list[dict]
    eval: list[dict]
    notes: list[str] = field(default_factory=list)  # one sentence per split: rows read, dropped, truncated


def build_splits(data: DataSection, tokenizer, seed: int) -> Splits:
    train_rows = load_rows(data.train, "data.train")
    eval_key = "data.eval"
    if data.eval is not None:
        eval_rows = load_rows(data.eval, "data.eval")
    elif data.eval_fraction > 0 and len(train_rows) >= 2:
        parts = train_rows.train_test_split(test_size=data.eval_fraction, seed=seed, shuffle=True)
        train_rows, eval_rows, eval_key = parts["train"], parts["test"], HELD_OUT
    else:
        eval_rows = None
    notes: list[str] = []
    train = tokenize_rows(train_rows, data.train, tokenizer, data, "data.train", notes)
    evals = tokenize_rows(eval_rows, data.eval or data.train, tokenizer, data, eval_key, notes) if eval_rows else []
    return Splits(train, evals, notes)


class BatchOrder:
    """Shuffled batches, epoch after epoch, with a resumable position.

    The order of epoch e is a permutation drawn from `seed + e`, so the position (epoch, cursor) is all
    that resume needs. With several processes each takes its slice of every global batch.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if size < batch_size * world:
            raise DataError(f"data.train has {size} examples after tokenisation, fewer than one global batch "
                            f"({batch_size} x {world} processes). Lower train.batch_size or add data.")
        self.size, self.batch_size, self.seed, self.rank, self.world = size, batch_size, seed, rank, world
        self.epoch, self.cursor = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def next_indices(self) -> list[int]:
        global_batch = self.batch_size * self.world
        if self.cursor + global_batch > self.size:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._perm = self._permutation()
        start = self.cursor + self.rank * self.batch_size
        self.cursor += global_batch
        return self._perm[start: start + self.batch_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._perm = self._permutation()
