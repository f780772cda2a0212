"""A model directory Hugging Face loads: the run's `final/`, and `memft export` for any checkpoint.

`write_pretrained(prepared, model, tokenizer, directory)` is the one writer of such a directory: the memft
patches (loss, activation compressors) are undone first, then the adapter's own writer runs (LoRAM: the
adapter and its pruning plan) or `save_pretrained` (full fine-tuning: config.json, generation config and
safetensors weights; LoRA: adapter_config.json and the adapter weights, naming the base model as the recipe
wrote it), and the tokenizer goes beside it. `AutoModelForCausalLM.from_pretrained(directory)` (or
`PeftModel.from_pretrained(base, directory)`) loads the result.

`memft export RUN_OR_CHECKPOINT DEST` rebuilds the checkpoint's model from the recipe stored with it, loads its
weights (every engine's format, FSDP's sharded directory included) and writes DEST the same way. The
checkpoint is verified first; a run directory means its newest intact checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from memft.errors import RunError
from memft.train import builders, checkpoint
from memft.train.data import with_chat_template
from memft.train.models import load_model, load_tokenizer
from memft.train.recipe import validate_recipe


def write_pretrained(prepared, model: torch.nn.Module, tokenizer, directory: Path,
                     state_dict: dict | None = None) -> None:
    """Write `model` (memft patches undone) and `tokenizer` into `directory`, atomically: everything goes into a
    temporary sibling that is renamed into place. `state_dict`: full weights when an engine shards them."""
    for undo in reversed(prepared.undo):
        undo()
    prepared.undo.clear()
    tmp = directory.with_name(f".tmp-{directory.name}")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        if prepared.save_final is not None:
            prepared.save_final(model, str(tmp), state_dict=state_dict)
        else:
            model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if prepared.base_model_name is not None and (tmp / "adapter_config.json").is_file():
            _name_base_model(tmp, prepared.base_model_name)
        if directory.exists():
            shutil.rmtree(directory)
        os.rename(tmp, directory)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunError(f"Could not write the model to '{directory}' ({exc.strerror}): free disk space, or choose "
                       "another directory.") from exc


def _name_base_model(directory: Path, name: str) -> None:
    """An adapter names its base model as the recipe wrote it (a hub id, the user's path, memft:tiny-llama), never
    as the path it was resolved to (the bundled model's folder inside site-packages)."""
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(directory))
    config.base_model_name_or_path = name
    config.save_pretrained(str(directory))


def _checkpoint_of(source: Path) -> Path:
    """`source` if it is a checkpoint, else the newest intact checkpoint of the run directory `source`."""
    if (source / "state.json").is_file() or (source / checkpoint.MANIFEST).is_file():
        problem = checkpoint.damage(source)
        if problem:
            raise RunError(f"'{source}' is not an intact memft checkpoint ({problem}); export another one.")
        return source
    if not source.is_dir():
        raise RunError(f"'{source}' is neither a memft run directory nor a checkpoint.")
    found, notes = checkpoint.find_checkpoint(source, True)
    if found is None:
        raise RunError(f"'{source}' has no checkpoint to export. Its final model, if the run finished, is already "
                       f"loadable: '{source / 'final'}'.")
    for note in notes:
        print(f"memft: {note}")
    return found


def _recipe_dump(ckpt: Path, state: dict) -> dict:
    if "recipe" in state:
        return state["recipe"]
    run_file = ckpt.parent.parent / "run.json"  # checkpoints written before the recipe was stored with them
    if run_file.is_file():
        return json.loads(run_file.read_text())["recipe"]
    raise RunError(f"'{ckpt}' does not say which recipe wrote it (no recipe in state.json, no run.json beside "
                   "checkpoints/); it cannot be exported.")


def _load_weights(ckpt: Path, engine: str, model: torch.nn.Module) -> None:
    if engine != "fsdp":
        checkpoint.load_trainable(model, ckpt)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    state = {"model": get_model_state_dict(model, options=options)}
    dcp.load(state, checkpoint_id=ckpt / "sharded")  # one process reads every shard
    set_model_state_dict(model, state["model"], options=options)


def export(source: Path, dest: Path) -> Path:
    """Write the checkpoint `source` (or a run directory's newest intact one) as a Hugging Face model directory
    `dest`; returns the checkpoint exported."""
    ckpt = _checkpoint_of(source)
    state = json.loads((ckpt / "state.json").read_text())
    recipe = validate_recipe(_recipe_dump(ckpt, state), source=str(ckpt / "state.json"))
    if recipe.adapter.name == "loram":
        raise RunError("A LoRAM checkpoint holds an adapter for the pruned model, whose pruning plan is written with "
                       "final/ at the end of the run; recover the full-model adapter from final/ with "
                       "`memft loram export`.")
    if dest.exists() and any(dest.iterdir()):
        raise RunError(f"'{dest}' exists and is not empty; choose a new directory (memft export never replaces "
                       "files it did not write).")
    staging = dest.with_name(f".tmp-{dest.name}")
    if staging.exists():  # write_pretrained stages there; this one is not memft's to remove
        raise RunError(f"'{staging}' exists; memft export writes '{dest}' through that name. Move it away or choose "
                       "another directory.")
    torch.manual_seed(recipe.train.seed)
    prepared = builders.prepare_model(load_model(recipe.model), recipe)
    _load_weights(ckpt, state.get("engine", "none"), prepared.model)
    if dest.exists():
        dest.rmdir()
    write_pretrained(prepared, prepared.model, with_chat_template(load_tokenizer(recipe.model), recipe.data), dest)
    return ckpt
