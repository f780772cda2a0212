"""The run directory (`train.output_dir`): what memft writes there, the lock that keeps one run in it at a
time, and the only things `--overwrite` may remove.

memft deletes only what it wrote. Inside a run directory it writes exactly these entries (`OWNED`):

    run.json                    the recipe; marks the directory as a memft run
    .memft.lock                 locked (flock) while a run uses the directory; names its holder
    metrics.jsonl               one line per logged step and per evaluation
    memory.{json,md,png}        the memory report (memory-rank{r}.* for the other processes)
    checkpoints/                step-NNNNNNN/, .tmp-step-NNNNNNN/, latest
    trackers/                   trackers/<run name>/: files of the experiment trackers (train.report_to)
    final/, .tmp-final/         the trained model

A run starts only in a new or empty directory, or in one that holds nothing but these entries. With
`--overwrite` the entries above are removed (inside `checkpoints/` only memft's own names) and everything
else is kept; the directory itself is never removed, so neither is the working directory or a parent.

The lock is an advisory `flock` on `.memft.lock`: the kernel releases it when its process exits, however it
exits, so a lock left by a killed run never blocks the next one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

from memft.errors import RunError

RUN_FILE = "run.json"
LOCK_FILE = ".memft.lock"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
TRACKERS_DIR = "trackers"
_OWNED_FILES = re.compile(r"run\.json|\.memft\.lock|metrics\.jsonl|\.(run\.json|metrics\.jsonl)\.tmp-\d+"
                          r"|memory(-rank\d+)?\.(json|md|png)")
_OWNED_DIRS = {CHECKPOINTS, "final", ".tmp-final", TRACKERS_DIR}
_OWNED_IN_CHECKPOINTS = re.compile(r"(\.tmp-)?step-\d{7}|latest|\.latest\.tmp-\d+")

# Recipe keys that may differ between a run and its resumption.
RESUME_INDEPENDENT = {"train": {"output_dir", "max_steps", "num_epochs", "log_every", "eval_every", "eval_batches",
                                "save_every", "keep_checkpoints", "report_to"}, "memory": {"report", "budget_gib"}}


def is_owned(entry: Path) -> bool:
    """True for a top-level entry of a run directory that memft writes."""
    if entry.is_dir() and not entry.is_symlink():
        return entry.name in _OWNED_DIRS
    return bool(_OWNED_FILES.fullmatch(entry.name))


def foreign_entries(directory: Path) -> list[str]:
    """Names in `directory` that memft did not write (sorted)."""
    return sorted(e.name for e in directory.iterdir() if not is_owned(e))


# ---------------------------------------------------------------------------------------------- lock
class RunLock:
    """An exclusive lock on a run directory, held until `release()` or the process's exit."""

    def __init__(self, directory: Path):
        self.path = directory / LOCK_FILE
        self._handle = None

    def acquire(self) -> "RunLock":
        import fcntl

        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.seek(0)
            holder = _describe_holder(handle.read())
            handle.close()
            raise RunError(f"train.output_dir '{self.path.parent}' is in use by another memft run ({holder}). "
                           "Wait for it to finish or stop it, or choose another train.output_dir.") from exc
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}))
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file releases the flock
            self._handle = None


def _describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return (f"process {info['pid']} on {info['host']}, started {info['started']}: "
                f"{info['command'][:200]}")
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


# ------------------------------------------------------------------------------------------ preparing
def prepare(output_dir: Path, recipe_dump: dict, resume: bool, overwrite: bool) -> tuple[RunLock, list[str]]:
    """Lock the run directory and check it against the request before anything is loaded.

    Returns the held lock and notes for the user (e.g. files kept by --overwrite). Refuses with a RunError:
    a path that is not a directory, a directory holding files memft did not write and no run, an existing
    run without --resume or --overwrite, a --resume of a different recipe or of nothing.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise RunError(f"train.output_dir '{output_dir}' exists and is not a directory. Choose another path.")
    run_file = output_dir / RUN_FILE
    if output_dir.is_dir() and not run_file.exists():
        foreign = foreign_entries(output_dir)
        if foreign:
            raise RunError(f"train.output_dir '{output_dir}' holds files memft did not write "
                           f"({_names(foreign)}) and no memft run; memft never writes into or deletes such a "
                           "directory" + (", with --overwrite neither" if overwrite else "") +
                           ". Choose an empty or new directory.")
        if resume:
            raise RunError(f"--resume: train.output_dir '{output_dir}' holds no run to resume. Drop --resume to "
                           "start a new run.")
    elif resume and not output_dir.exists():
        raise RunError(f"--resume: train.output_dir '{output_dir}' does not exist, so there is no run to resume. "
                       "Drop --resume to start a new run.")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(output_dir).acquire()
    except OSError as exc:
        raise RunError(f"train.output_dir '{output_dir}' is not writable ({exc.strerror}). Choose a directory "
                       "you can write to.") from exc
    try:
        return lock, _check_existing_run(output_dir, recipe_dump, resume, overwrite)
    except BaseException:
        lock.release()
        raise


def _check_existing_run(output_dir: Path, recipe_dump: dict, resume: bool, overwrite: bool) -> list[str]:
    # Partial files of a killed run (the lock says no one is writing them now).
    partials = [p for p in (output_dir / CHECKPOINTS).glob(".*tmp-*") if _OWNED_IN_CHECKPOINTS.fullmatch(p.name)]
    for partial in partials + [p for p in output_dir.glob(".*tmp-*") if is_owned(p)]:
        _remove(partial)
    run_file = output_dir / RUN_FILE
    if not run_file.exists():
        remove_owned(output_dir)  # leftovers of a start that failed before its run began (no run.json)
        return []
    if overwrite:
        remove_owned(output_dir)
        kept = foreign_entries(output_dir)
        return [f"--overwrite removed the previous run in '{output_dir}' and kept the files memft did not write "
                f"({_names(kept)})."] if kept else []
    if not resume:
        has_checkpoint = any((output_dir / CHECKPOINTS).glob("step-*"))
        what = "a run" if has_checkpoint else "a run that stopped before its first checkpoint"
        raise RunError(f"train.output_dir '{output_dir}' already holds {what}. Pass --resume to continue it"
                       + ("" if has_checkpoint else " (it starts again from step 0)") +
                       ", --overwrite to replace it, or set train.output_dir=<new directory>.")
    try:
        previous = json.loads(run_file.read_text())["recipe"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunError(f"--resume: '{run_file}' is damaged ({exc}), so the run's recipe is unknown. Start "
                       "again with --overwrite, or restore run.json.") from exc
    changed = recipe_differences(previous, recipe_dump)
    if changed:
        raise RunError(f"train.output_dir '{output_dir}' holds a run of a different recipe "
                       f"({', '.join(changed)} changed), so it cannot be resumed with this one. Use the "
                       "original recipe, another output_dir, or --overwrite to start again.")
    return []


def remove_owned(output_dir: Path) -> None:
    """Remove what memft wrote in `output_dir` (never the lock, never anything else)."""
    for entry in output_dir.iterdir():
        if entry.name == LOCK_FILE or not is_owned(entry):
            continue
        if entry.name in (CHECKPOINTS, TRACKERS_DIR):  # inside them, only memft's own names
            for item in entry.iterdir():
                if (_OWNED_IN_CHECKPOINTS.fullmatch(item.name) if entry.name == CHECKPOINTS
                        else item.name == output_dir.resolve().name):
                    _remove(item)
            if not any(entry.iterdir()):
                entry.rmdir()
        else:
            _remove(entry)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def write_run_file(output_dir: Path, recipe_dump: dict) -> None:
    """Mark the directory as holding a run of this recipe (checked by later --resume and new runs)."""
    if not (output_dir / RUN_FILE).exists():
        atomic_write_text(output_dir / RUN_FILE, json.dumps({"recipe": recipe_dump}, indent=2))


def recipe_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, except those a resumed run may change (`RESUME_INDEPENDENT`)."""
    out = []
    for key in sorted(set(old) | set(new)):
        section = prefix.rstrip(".")
        if key in RESUME_INDEPENDENT.get(section, ()):
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += recipe_differences(a, b, f"{prefix}{key}.")
        elif a != b and not (isinstance(a, list) and isinstance(b, (list, tuple)) and list(b) == a):
            out.append(f"{prefix}{key}")
    return out


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename (readers see old or new, never half)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------- metrics
def metrics_size(output_dir: Path) -> int:
    """Bytes of metrics.jsonl written so far (recorded in each checkpoint)."""
    path = output_dir / METRICS_FILE
    return path.stat().st_size if path.exists() else 0


def rewind_metrics(output_dir: Path, size: int | None, step: int) -> None:
    """Cut metrics.jsonl back to what it held when the resumed checkpoint was written: its recorded `size`
    in bytes, or (checkpoints without one) the lines up to `step`. A resumed run then leaves one line per
    step, and a line torn by a crash disappears."""
    path = output_dir / METRICS_FILE
    if not path.exists():
        return
    if size is not None:
        with open(path, "r+b") as handle:
            handle.truncate(min(size, path.stat().st_size))
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            break
    atomic_write_text(path, "".join(kept))
