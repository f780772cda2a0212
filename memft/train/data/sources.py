"""Reading a data source's rows as a `datasets.Dataset`.

A source's `path` is, in this order: a bundled set (`memft:NAME`); with `name` or `data_files`, whatever
`datasets.load_dataset` takes; a glob of data files; a folder written by `datasets.save_to_disk`; a folder of
data files (those directly in it); a data file; anything else goes to `datasets.load_dataset` (a builder name,
a dataset folder or a hub id). The files of one source share one format. Rows are checked before they are used
(memft.train.data.checks), so that a bad row is named by its file and line.
"""

from __future__ import annotations

import glob
from contextlib import contextmanager
from pathlib import Path

from memft.errors import DataError
from memft.train.data.checks import (JsonScan, check_columns, check_loaded_rows, check_utf8, csv_options,
                                     first_line, is_blank)
from memft.train.recipe import DatasetSource

BUNDLED = {"memft:alpaca": "alpaca.jsonl", "memft:chat": "chat.jsonl", "memft:text": "text.txt"}
BUNDLED_DIR = Path(__file__).resolve().parents[2] / "data"
LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what `save_to_disk` writes for a DatasetDict / a Dataset


def resolve_data_path(path: str) -> str:
    if path.startswith("memft:"):
        if path not in BUNDLED:
            raise DataError(f"data path '{path}' is not a bundled dataset; bundled: {', '.join(BUNDLED)}.")
        return str(BUNDLED_DIR / BUNDLED[path])
    return path


def load_rows(source: DatasetSource, key: str):
    """The rows of `source`, checked for its format; `key` names the source in the recipe (data.train)."""
    path = resolve_data_path(source.path)
    local = Path(path)
    if source.name is not None or source.data_files is not None:
        rows, checked = _load_dataset(path, source, key), False
    elif glob.has_magic(path) and not local.exists():  # a file named data[1].jsonl is that file
        rows, checked = _load_files(_matching_files(path, key), source, key, path)
    elif local.is_dir() and any((local / marker).is_file() for marker in SAVED_MARKERS):
        rows, checked = _load_saved(local, source, key, path), False
    elif local.is_dir():
        rows, checked = _load_files(_folder_files(local, key, path), source, key, path)
    elif local.suffix in LOADERS or local.exists():
        rows, checked = _load_files([local], source, key, path)
    else:
        rows, checked = _load_dataset(path, source, key), False
    if source.max_examples is not None:
        rows = rows.select(range(min(source.max_examples, len(rows))))
    check_columns(rows, source, key, path)
    if not checked:
        check_loaded_rows(rows, source, key, path)
    return rows


# ----------------------------------------------------------------------------------------------- files
def _matching_files(pattern: str, key: str) -> list[Path]:
    files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not files:
        raise DataError(f"{key}.path: no file matches '{pattern}'. Check the pattern (relative patterns are resolved "
                        "from the current directory; '**' matches folders at any depth).")
    for local in files:
        if local.suffix not in LOADERS:
            raise DataError(f"{key}.path: '{pattern}' matches '{local}', which is not a data file (supported: "
                            f"{', '.join(LOADERS)}). Narrow the pattern, e.g. to '*.jsonl'.")
    return files


def _folder_files(folder: Path, key: str, path: str) -> list[Path]:
    """The data files directly in `folder` (hidden files and other suffixes are left out)."""
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix in LOADERS and not p.name.startswith("."))
    if not files:
        nested = any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir())
        hint = (f" Its data files are in subfolders: use a glob such as '{folder / '**' / '*.jsonl'}', or "
                f"{key}.data_files / {key}.name to read a dataset laid out for datasets.load_dataset."
                if nested else "")
        raise DataError(f"{key}.path: '{path}' is a directory without data files in it, so a data file is needed "
                        f"({', '.join(LOADERS)}; a folder of them, all of one format) or a folder written by "
                        f"datasets.save_to_disk.{hint}")
    return files


def _load_files(files: list[Path], source: DatasetSource, key: str, path: str):
    """Rows of local data files of one format, checked before `datasets` reads them. Returns (rows, whether
    their values were checked)."""
    import datasets

    names = [path] if len(files) == 1 else [str(f) for f in files]  # what messages call each file
    builders = {}
    for local, name in zip(files, names):
        builders.setdefault(_builder(local, key, name), name)
    if len(builders) > 1:
        found = ", ".join(f"{builder} ('{name}')" for builder, name in builders.items())
        raise DataError(f"{key}.path: '{path}' holds files of several formats: {found}. A source reads one format; "
                        "give each format its own source in data.mix, or narrow the path.")
    builder = next(iter(builders))
    scan = JsonScan(source, key) if builder == "json" else None
    for local, name in zip(files, names):
        if scan is not None:
            scan.file(local, name)
        elif builder in ("text", "csv"):
            check_utf8(local, key, name)
    if scan is not None:
        scan.finish()
    options = csv_options(files, key, names) if builder == "csv" else {}
    try:
        rows = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **options)
    except Exception as exc:  # datasets raises many types for malformed files
        reason = first_line(exc.__cause__ or exc)
        if scan is not None and scan.conflict:
            raise DataError(f"{key}.path: cannot load '{path}': {scan.conflict}, which `datasets` cannot put in "
                            f"one table ({reason.rstrip('.')}). Give the column one type in every row.") from exc
        raise DataError(f"{key}.path: cannot parse '{path}' as {builder}: {reason}") from exc
    return rows, builder in ("json", "text")


def _builder(local: Path, key: str, path: str) -> str:
    """The `datasets` builder for a local data file, once it is known to be a non-empty file."""
    if not local.is_file():
        raise DataError(f"{key}.path: file '{path}' does not exist. Check the path (relative paths are "
                        "resolved from the current directory).")
    if is_blank(local):
        raise DataError(f"{key}.path: '{path}' has no rows. Point it at a file with data.")
    if local.suffix not in LOADERS:
        raise DataError(f"{key}.path: cannot read '{path}': supported local files are {', '.join(LOADERS)}.")
    return LOADERS[local.suffix]


# --------------------------------------------------------------------------------------- save_to_disk
def _load_saved(folder: Path, source: DatasetSource, key: str, path: str):
    """A `Dataset` or one split of a `DatasetDict` written by `save_to_disk`."""
    import datasets

    try:
        saved = datasets.load_from_disk(str(folder))
    except Exception as exc:  # a damaged or partial folder
        raise DataError(f"{key}.path: cannot read '{path}' as a datasets.save_to_disk folder: "
                        f"{first_line(exc)}") from exc
    if isinstance(saved, datasets.DatasetDict):
        if source.split not in saved:
            raise DataError(f"{key}.split: '{source.split}' is not a split of '{path}' (a datasets.save_to_disk "
                            f"folder with splits {', '.join(saved)}). Set {key}.split to one of them.")
        return saved[source.split]
    return saved


# --------------------------------------------------------------------------------------- load_dataset
def _load_dataset(path: str, source: DatasetSource, key: str):
    """`datasets.load_dataset(path, name, data_files=..., split=...)`; its failures named by recipe key. A hub
    id on a machine whose hub does not answer a quick probe (memft.train.models) is read from the local cache
    only, so it fails at once instead of after `datasets`' own retries."""
    import datasets

    offline = bool(datasets.config.HF_HUB_OFFLINE)
    unreachable = not offline and _is_hub_id(path) and not _hub_answers()
    try:
        with _datasets_offline(unreachable):
            return datasets.load_dataset(path, source.name, data_files=source.data_files, split=source.split)
    except ConnectionError as exc:
        raise DataError(_unreachable(path, key, exc, offline)) from exc
    except (FileNotFoundError, StopIteration) as exc:  # StopIteration: a data_files glob that matches nothing
        field = "data_files" if source.data_files is not None else "path"
        raise DataError(f"{key}.{field}: datasets.load_dataset('{path}') finds no such data: "
                        f"{first_line(exc) if str(exc) else 'nothing matches ' + repr(source.data_files)} Check "
                        f"{key}.{field} (relative paths are resolved from the current directory).") from exc
    except ValueError as exc:
        text = str(exc)
        field = "split" if "split" in text else "name" if "config" in text.lower() else "path"
        raise DataError(f"{key}.{field}: datasets.load_dataset('{path}') refuses it: {' '.join(text.split())}") from exc
    except Exception as exc:  # datasets raises many types for builders and hub repositories
        raise DataError(f"{key}.path: datasets.load_dataset('{path}') failed: {first_line(exc)}") from exc


def _is_hub_id(path: str) -> bool:
    """Not a local path and not one of `datasets`' packaged builders (json, csv, parquet, text, ...)."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    return not Path(path).exists() and path not in _PACKAGED_DATASETS_MODULES


def _hub_answers() -> bool:
    from huggingface_hub import constants

    from memft.train.models import hub_reachable

    return hub_reachable(constants.ENDPOINT)


@contextmanager
def _datasets_offline(active: bool):
    """`datasets` in offline mode (the local cache only) while active."""
    import datasets

    if not active:
        yield
        return
    previous = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = previous


def _unreachable(path: str, key: str, exc: BaseException, offline: bool) -> str:
    why = ("HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE) is set, and it is not in the local datasets cache"
           if offline else "the hub cannot be reached: this machine looks offline")
    return (f"{key}.path: '{path}' is not a local file or folder, so it was looked up on the Hugging Face hub; "
            f"{why} ({first_line(exc).rstrip('.')}). Where there is network, download it once (e.g. "
            f"datasets.load_dataset('{path}').save_to_disk('DIR')) and point {key}.path at that folder.")
