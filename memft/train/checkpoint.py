"""Checkpoints written atomically and read back safely, and the run directory's identity.

A checkpoint is a directory `checkpoints/step-NNNNNNN/`:
    trainable.safetensors   trainable parameters (all weights for full fine-tuning, the adapter for LoRA)
    optimizer.pt            optimizer.state_dict()          (torch.load(weights_only=True))
    scheduler.pt            scheduler.state_dict()
    rng.pt                  torch / CUDA / Python / NumPy generator states as tensors (rng-rank{r}.pt
                            for the other processes)
    state.json              step, data position, tokens seen, engine and process count
Engines that shard write their own share instead of the first two (memft.train.distributed): FSDP a
torch.distributed.checkpoint directory `sharded/`, DeepSpeed `optimizer-rank{r}.pt` per process.
It is written under a temporary name and renamed into place, then `checkpoints/latest` is replaced
atomically; a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from memft.errors import RunError

RUN_FILE = "run.json"
RESUME_INDEPENDENT = {"train": {"max_steps", "log_every", "eval_every", "eval_batches", "save_every",
                                "keep_checkpoints"}, "memory": {"report", "budget_gib"}}


# ------------------------------------------------------------------------------------------ run dir
def prepare_output_dir(output_dir: Path, recipe_dump: dict, resume: bool, overwrite: bool) -> None:
    """Check (and create) the run directory before anything is loaded: an existing run is refused unless
    --resume (same recipe) or --overwrite is given; a non-empty foreign directory is never written into."""
    run_file = output_dir / RUN_FILE
    if output_dir.exists() and not output_dir.is_dir():
        raise RunError(f"train.output_dir '{output_dir}' exists and is not a directory. Choose another path.")
    if run_file.exists():
        if overwrite:
            shutil.rmtree(output_dir)
        elif resume:
            previous = json.loads(run_file.read_text())["recipe"]
            changed = _recipe_differences(previous, recipe_dump)
            if changed:
                raise RunError(f"train.output_dir '{output_dir}' holds a run of a different recipe "
                               f"({', '.join(changed)} changed), so it cannot be resumed with this one. Use the "
                               "original recipe, another output_dir, or --overwrite to start again.")
        else:
            raise RunError(f"train.output_dir '{output_dir}' already holds a run. Pass --resume to continue it, "
                           "--overwrite to replace it, or set train.output_dir=<new directory>.")
    elif output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise RunError(f"train.output_dir '{output_dir}' is not empty and holds no memft run; refusing to write "
                       "into it. Choose an empty or new directory.")
    elif resume:
        raise RunError(f"--resume: train.output_dir '{output_dir}' holds no run to resume. Drop --resume to "
                       "start a new run.")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise RunError(f"train.output_dir '{output_dir}' is not writable ({exc.strerror}). Choose a directory "
                       "you can write to.") from None


def write_run_file(output_dir: Path, recipe_dump: dict) -> None:
    """Mark the directory as holding a run of this recipe (checked by later --resume / new runs)."""
    if not (output_dir / RUN_FILE).exists():
        _atomic_write_text(output_dir / RUN_FILE, json.dumps({"recipe": recipe_dump}, indent=2))


def _recipe_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for key in keys:
        section = prefix.rstrip(".")
        if key in RESUME_INDEPENDENT.get(section, ()):
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _recipe_differences(a, b, f"{prefix}{key}.")
        elif a != b and not (isinstance(a, list) and isinstance(b, tuple) and list(b) == a):
            out.append(f"{prefix}{key}")
    return out


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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


# ------------------------------------------------------------------------------------- checkpoints
def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def save_trainable(model: torch.nn.Module, directory: Path) -> None:
    save_file(trainable_state(model), directory / "trainable.safetensors")


def load_trainable(model: torch.nn.Module, directory: Path) -> None:
    weights = load_file(directory / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise RunError(f"--resume: checkpoint '{directory}' has parameters this model lacks ({missing[0]}, ...): "
                       "the recipe's model or adapter differs from the checkpoint's.")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)


def _rng_file(rank: int) -> str:
    return "rng.pt" if rank == 0 else f"rng-rank{rank}.pt"


def save_checkpoint(ckpt_root: Path, step: int, engine, model, optimizer, scheduler, state: dict, keep: int,
                    processes) -> Path:
    """Write checkpoint `step` with every process (each writes its share through `engine.save_state`);
    the main process then renames it into place and updates `latest`."""
    final = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".tmp-step-{step:07d}"
    if processes.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    processes.barrier()
    engine.save_state(tmp, model, optimizer, processes)
    torch.save(rng_state(), tmp / _rng_file(processes.rank))
    processes.barrier()
    if processes.is_main:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "processes": processes.world,
                                                    "engine": engine.name}, indent=2))
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _atomic_write_text(ckpt_root / "latest", final.name)
        for old in sorted(ckpt_root.glob("step-*"))[:-keep]:
            shutil.rmtree(old)
    processes.barrier()
    return final


def find_checkpoint(output_dir: Path, resume: str | bool) -> Path:
    """`resume=True` -> the latest checkpoint of output_dir; a string -> that checkpoint directory."""
    if isinstance(resume, str) and resume not in ("", "latest"):
        path = Path(resume)
    else:
        latest = output_dir / "checkpoints" / "latest"
        if not latest.exists():
            raise RunError(f"--resume: '{output_dir}' has no checkpoint yet (no checkpoints/latest). Start the "
                           "run again without --resume, or with --overwrite.")
        path = output_dir / "checkpoints" / latest.read_text().strip()
    if not (path / "state.json").is_file():
        raise RunError(f"--resume: '{path}' is not a complete memft checkpoint (state.json missing).")
    return path


def load_checkpoint(path: Path, engine, model, optimizer, scheduler, processes) -> dict:
    """Restore model, optimizer, scheduler and RNG in place on every process; return the loop state."""
    state = json.loads((path / "state.json").read_text())
    saved_engine = state.get("engine", "none")
    same_files = {saved_engine, engine.name} <= {"none", "ddp"}  # one process and DDP write the same files
    if saved_engine != engine.name and not same_files:
        raise RunError(f"--resume: checkpoint '{path}' was written by engine '{saved_engine}', but the recipe "
                           f"runs engine '{engine.name}'. Resume with distributed.engine={saved_engine}.")
    engine.load_state(path, model, optimizer, processes)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = path / _rng_file(processes.rank)
    set_rng_state(torch.load(rng if rng.is_file() else path / "rng.pt", weights_only=True))
    return state
