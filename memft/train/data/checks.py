"""Checking rows before they are tokenised: UTF-8, JSON syntax, and the columns and value types a format needs.

A problem raises a DataError naming the recipe key, the file, the line (or row index) and what is wrong.
"""

from __future__ import annotations

import codecs
import csv
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from memft.errors import DataError
from memft.train.recipe import DatasetSource

REQUIRED_COLUMNS = {"alpaca": ("instruction", "output"), "chat": ("messages",)}
OPTIONAL_COLUMNS = {"alpaca": ("input",)}
CHAT_SHAPE = 'a list of {"role": ..., "content": ...} objects'


def is_blank(path: Path) -> bool:
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


def check_utf8(local: Path, key: str, path: str) -> None:
    for _ in _lines(local, key, path):
        pass


def csv_options(files: list[Path], key: str, names: list[str]) -> dict:
    """Read every CSV column as text (pandas would turn a column of digits into numbers); the files of one
    source must share their header."""
    import datasets

    headers = []
    for local in files:
        with open(local, newline="", encoding="utf-8-sig") as f:
            headers.append(next(csv.reader(f), []))
    for name, header in zip(names[1:], headers[1:]):
        if header != headers[0]:
            raise DataError(f"{key}.path: '{name}' has the columns {', '.join(header)}, but '{names[0]}' has "
                            f"{', '.join(headers[0])}; the CSV files of one source need the same header.")
    header = headers[0]
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


@dataclass
class JsonScan:
    """Checks the JSON files of one source row by row (UTF-8, syntax, the format's column types) before
    `datasets` reads them, so that errors name the file and line. `conflict` describes the first column whose
    type changes from row to row (`datasets` cannot always load those), or is None."""

    source: DatasetSource
    key: str
    rows: int = field(default=0, init=False)
    conflict: str | None = field(default=None, init=False)
    _types: dict[str, tuple[str, str, str]] = field(default_factory=dict, init=False)  # column -> (type, where, file)
    _first_missing: dict[str, tuple[str, str]] = field(default_factory=dict, init=False)  # column -> (where, file)

    def file(self, local: Path, path: str) -> None:
        source, limit = self.source, self.source.max_examples
        for where, row in _json_rows(local, self.key, path):
            if not isinstance(row, dict):
                raise bad_row(self.key, path, where, f"it holds {_kind(row)}, but each row must be a JSON object")
            if limit is None or self.rows < limit:  # later rows are not used
                problem = row_problem(row, source, allow_missing=True)
                if problem:
                    raise bad_row(self.key, path, where, problem)
                for column in required_columns(source):
                    if row.get(column) is None:
                        self._first_missing.setdefault(column, (where, path))
            self.rows += 1
            for column, value in row.items():
                if value is not None:
                    self._note_type(column, _json_type(value), where, path)

    def _note_type(self, column: str, kind: str, where: str, path: str) -> None:
        first_kind, first_where, first_path = self._types.setdefault(column, (kind, where, path))
        if self.conflict is None and kind != first_kind:
            of = ("", "") if first_path == path else (f" of '{first_path}'", f" of '{path}'")
            self.conflict = f"column '{column}' holds {first_kind} at {first_where}{of[0]} but {kind} at {where}{of[1]}"

    def finish(self) -> None:
        """Refuse a required column that is null or absent in some used row (absent from every row is
        reported by `check_columns`, which names the columns there are)."""
        for column, (where, path) in self._first_missing.items():
            if column in self._types:
                raise bad_row(self.key, path, where, _missing_problem(column, self.source))


def check_loaded_rows(rows, source: DatasetSource, key: str, path: str) -> None:
    """The format's column types, row by row, for rows not read from JSON or text files."""
    columns = [c for c in _format_columns(source) if c in rows.column_names]
    for index, row in enumerate(rows.select_columns(columns)):
        problem = row_problem(row, source)
        if problem:
            raise bad_row(key, path, f"row index {index}", problem)


def required_columns(source: DatasetSource) -> tuple[str, ...]:
    return REQUIRED_COLUMNS.get(source.format, (source.text_field,))


def _format_columns(source: DatasetSource) -> tuple[str, ...]:
    return required_columns(source) + OPTIONAL_COLUMNS.get(source.format, ())


def row_problem(row: dict, source: DatasetSource, allow_missing: bool = False) -> str | None:
    """What makes one row unusable for its format, or None. Optional columns may always be null."""
    for column in _format_columns(source):
        value = row.get(column)
        if value is None:
            if not allow_missing and column in required_columns(source):
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


def bad_row(key: str, path: str, where: str, problem: str) -> DataError:
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


def check_columns(rows, source: DatasetSource, key: str, path: str) -> None:
    if len(rows) == 0:
        raise DataError(f"{key}.path: '{path}' has no rows. Point it at a file with data.")
    missing = [c for c in required_columns(source) if c not in rows.column_names]
    if missing:
        raise DataError(f"{key}: format '{source.format}' needs column(s) {', '.join(missing)}, but "
                        f"'{path}' has {', '.join(rows.column_names)}. Fix the file or choose the right "
                        f"{key}.format" + (f" / {key}.text_field." if source.format == "text" else "."))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__).rstrip(".") + "."
