"""Checkpoints: written atomically, verified before they are loaded, read back without pickle.

A checkpoint is a directory `checkpoints/step-NNNNNNN/`:
    trainable.safetensors   trainable parameters (all weights for full fine-tuning, the adapter for LoRA)
    optimizer.pt            optimizer.state_dict()          (torch.load(weights_only=True))
    scheduler.pt            scheduler.state_dict()
    rng.pt                  torch / CUDA / Python / NumPy generator states as tensors (rng-rank{r}.pt
                            for the other processes)
    state.json              step, data position, tokens seen, metrics.jsonl size, engine, process count and
                            the recipe
    manifest.json           size and SHA-256 of every other file
Engines that shard write their own share instead of the first two (memft.train.distributed): FSDP a
torch.distributed.checkpoint directory `sharded/`, DeepSpeed `optimizer-rank{r}.pt` per process.

Writing: every file goes into `.tmp-step-NNNNNNN/`, is fsynced, and the directory is renamed into place;
then `checkpoints/latest` is replaced atomically. A crash mid-write leaves the earlier checkpoints intact; a
failed write (a full disk) removes the partial directory and stops the run with a message.
Loading: the manifest is checked first; a damaged checkpoint is skipped, with a message, for the newest
intact one. Files are read with safetensors and `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from memft.errors import RunError
from memft.train.run_dir import CHECKPOINTS, atomic_write_text, recipe_differences

MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"step-(\d{7})")


# -------------------------------------------------------------------------------------- rng states
def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(internal, dtype=torch.int64),
        "python_version": version,
        "python_gauss": gauss,
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------- reading files
def load_tensors(path: Path):
    """`torch.load(path, weights_only=True)`, with a RunError naming the file when it is damaged or holds
    anything but tensors and plain values (memft never writes such a file, and never loads one)."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise RunError(f"'{path}' is not a memft checkpoint file: it holds Python objects other than tensors "
                       "and plain values, which memft never writes, so it was not loaded. Resume from a "
                       "checkpoint memft wrote.") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise RunError(f"'{path}' cannot be read ({_first_line(exc)}); the file is damaged.") from exc


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


# ------------------------------------------------------------------------------------- checkpoints
def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def save_trainable(model: torch.nn.Module, directory: Path) -> None:
    save_file(trainable_state(model), directory / "trainable.safetensors")


def load_trainable(model: torch.nn.Module, directory: Path) -> None:
    """Copy the checkpoint's trainable weights into `model`; refuse (naming them) names or shapes that
    differ, before anything is copied."""
    path = directory / "trainable.safetensors"
    try:
        weights = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise RunError(f"'{path}' cannot be read ({_first_line(exc)}); the file is damaged.") from exc
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise RunError(f"--resume: checkpoint '{directory}' has parameters this model lacks ({missing[0]}, ...): "
                       "the recipe's model or adapter differs from the checkpoint's.")
    shapes = [f"{n}: checkpoint {list(t.shape)}, model {list(params[n].shape)}" for n, t in weights.items()
              if t.shape != params[n].shape]
    if shapes:
        raise RunError(f"--resume: checkpoint '{directory}' does not fit this model ({'; '.join(shapes[:2])}"
                       f"{' ...' if len(shapes) > 2 else ''}): it was written by a recipe with another model or "
                       "adapter shape. Resume with that recipe.")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)


def _rng_file(rank: int) -> str:
    return "rng.pt" if rank == 0 else f"rng-rank{rank}.pt"


def save_checkpoint(ckpt_root: Path, step: int, engine, model, optimizer, scheduler, state: dict, keep: int,
                    processes) -> Path:
    """Write checkpoint `step` with every process (each writes its share through `engine.save_state`); the
    main process then writes the manifest, renames the directory into place, updates `latest` and prunes to
    the newest `keep`. An OSError (a full disk) removes the partial checkpoint and raises a RunError."""
    final = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".tmp-step-{step:07d}"
    error = None
    if processes.is_main:
        error = _attempt(lambda: _fresh_directory(ckpt_root, tmp))
    _agree(processes, error, tmp, step)
    error = _attempt(lambda: (engine.save_state(tmp, model, optimizer, processes),
                              torch.save(rng_state(), tmp / _rng_file(processes.rank))))
    _agree(processes, error, tmp, step)
    if processes.is_main:
        error = _attempt(lambda: _finish(ckpt_root, tmp, final, scheduler, state, step, keep, engine, processes))
    _agree(processes, error, tmp, step)
    return final


def _attempt(write) -> OSError | None:
    try:
        write()
    except OSError as exc:
        return exc
    return None


def _agree(processes, error: OSError | None, tmp: Path, step: int) -> None:
    """Every process learns whether any failed; the main process removes the partial checkpoint; all raise."""
    if not processes.sum(1.0 if error is not None else 0.0):
        return
    if processes.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    reason = f"{error.strerror or error}" if error is not None else "another process failed"
    kept = sorted(p.name for p in tmp.parent.glob("step-*"))
    raise RunError(f"Could not write the checkpoint of step {step} in '{tmp.parent}' ({reason}). The partial "
                   f"checkpoint was removed; " + (f"the earlier checkpoints are intact (latest: {kept[-1]}). "
                                                  if kept else "no earlier checkpoint exists. ") +
                   "Free disk space (or fix the directory) and continue with --resume.") from error


def _fresh_directory(root: Path, tmp: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()


def _finish(root: Path, tmp: Path, final: Path, scheduler, state: dict, step: int, keep: int, engine,
            processes) -> None:
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "processes": processes.world,
                                                "engine": engine.name}, indent=2))
    files = sorted(f for f in tmp.rglob("*") if f.is_file())
    manifest = {"files": {f.relative_to(tmp).as_posix(): {"size": f.stat().st_size, "sha256": _sha256(f)}
                          for f in files}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for f in files + [tmp / MANIFEST]:
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_directory(root)
    atomic_write_text(root / "latest", final.name)
    for old in _step_directories(root)[keep:]:
        shutil.rmtree(old)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_of(path: Path) -> int:
    """The step of a checkpoint directory named step-NNNNNNN."""
    return int(STEP_DIR.fullmatch(path.name)[1])


def _step_directories(root: Path) -> list[Path]:
    """Checkpoint directories, newest first."""
    found = [p for p in root.glob("step-*") if p.is_dir() and STEP_DIR.fullmatch(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


# ---------------------------------------------------------------------------------------- verifying
def damage(path: Path) -> str | None:
    """What is wrong with checkpoint `path` (None when every file matches its manifest). Checkpoints of
    memft versions without a manifest are checked for their state.json only."""
    if not path.is_dir():
        return "not a directory"
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return _state_damage(path) or (None if (path / "state.json").is_file() else "state.json missing")
    try:
        files = json.loads(manifest_path.read_text())["files"]
        entries = [(name, int(e["size"]), str(e["sha256"])) for name, e in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{MANIFEST} is unreadable ({_first_line(exc)})"
    for name, size, digest in entries:
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        actual = file.stat().st_size
        if actual != size:
            return f"{name} has {actual:,} bytes, {size:,} were written"
        if _sha256(file) != digest:
            return f"{name} does not match the checksum recorded when it was written"
    return _state_damage(path)


def _state_damage(path: Path) -> str | None:
    try:
        state = json.loads((path / "state.json").read_text())
        int(state["step"]), int(state["tokens_seen"]), dict(state["data"])
    except FileNotFoundError:
        return "state.json is missing"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"state.json is unreadable ({_first_line(exc)})"
    return None


def find_checkpoint(output_dir: Path, resume: str | bool) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from and notes for the user.

    `resume=True` or "latest": the newest intact checkpoint of output_dir (damaged ones are skipped and
    named in the notes); None when the run has written no checkpoint yet (it starts from step 0). A path:
    that checkpoint, which must be intact.
    """
    if isinstance(resume, str) and resume not in ("", "latest"):
        path = Path(resume)
        problem = damage(path)
        if problem:
            raise RunError(f"--resume: '{path}' is not an intact memft checkpoint ({problem}). Pass another "
                           "checkpoint directory, or --resume alone for the newest intact one.")
        return path, []
    root = output_dir / CHECKPOINTS
    candidates = _step_directories(root) if root.is_dir() else []
    if not candidates:
        return None, [f"'{output_dir}' has no checkpoint yet (the run stopped before its first save); starting "
                      "it from step 0."]
    damaged = []
    for path in candidates:
        problem = damage(path)
        if problem is None:
            notes = [f"{d}; skipped." for d in damaged]
            return path, notes + ([f"Resuming from {path.name}, the newest intact checkpoint."] if damaged else [])
        damaged.append(f"Checkpoint {path.name} is damaged ({problem})")
    raise RunError(f"--resume: no checkpoint in '{root}' is intact: " + ". ".join(damaged) +
                   ". Start the run again with --overwrite.")


def load_checkpoint(path: Path, engine, model, optimizer, scheduler, processes, recipe_dump: dict) -> dict:
    """Restore model, optimizer, scheduler and RNG in place on every process; return the loop state.
    A checkpoint of another recipe or engine is refused before anything is restored."""
    state = json.loads((path / "state.json").read_text())
    changed = recipe_differences(state["recipe"], recipe_dump) if "recipe" in state else []
    if changed:
        raise RunError(f"--resume: checkpoint '{path}' was written by a different recipe ({', '.join(changed)} "
                       "changed). Resume it with its own recipe, or start a new run.")
    saved_engine = state.get("engine", "none")
    same_files = {saved_engine, engine.name} <= {"none", "ddp"}  # one process and DDP write the same files
    if saved_engine != engine.name and not same_files:
        raise RunError(f"--resume: checkpoint '{path}' was written by engine '{saved_engine}', but the recipe "
                       f"runs engine '{engine.name}'. Resume with distributed.engine={saved_engine}.")
    engine.load_state(path, model, optimizer, processes)
    scheduler.load_state_dict(load_tensors(path / "scheduler.pt"))
    rng = path / _rng_file(processes.rank)
    set_rng_state(load_tensors(rng if rng.is_file() else path / "rng.pt"))
    return state
