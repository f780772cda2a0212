"""Nested states on disk as `NAME.safetensors` (every tensor) + `NAME.json` (everything else).

A state is a tree of dicts and lists whose leaves are tensors, ints, floats, bools, strings or None, as
returned by the continual methods' `state_dict()`. Tensors are replaced in the JSON by
`{"__tensor__": KEY}` and stored under KEY in the safetensors file, so loading never unpickles anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

TENSOR_TAG = "__tensor__"


def flatten_tensors(state: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """The JSON skeleton of `state`; its tensors are moved into `tensors` under dotted keys."""
    if isinstance(state, torch.Tensor):
        tensors[prefix] = state.detach().to("cpu").contiguous().clone()
        return {TENSOR_TAG: prefix}
    if isinstance(state, dict):
        for key in state:
            if not isinstance(key, str):
                raise TypeError(f"state keys must be strings to be saved, got {key!r} at '{prefix}'. Convert "
                                "the key with str() in state_dict().")
        return {key: flatten_tensors(value, tensors, f"{prefix}.{key}" if prefix else key)
                for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return [flatten_tensors(value, tensors, f"{prefix}.{i}" if prefix else str(i))
                for i, value in enumerate(state)]
    if state is None or isinstance(state, (bool, int, float, str)):
        return state
    raise TypeError(f"cannot save a {type(state).__name__} at '{prefix}': states hold tensors, numbers, "
                    "strings, lists and dicts only.")


def unflatten_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `flatten_tensors`."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {TENSOR_TAG}:
            return tensors[skeleton[TENSOR_TAG]]
        return {key: unflatten_tensors(value, tensors) for key, value in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten_tensors(value, tensors) for value in skeleton]
    return skeleton


def save_state(directory: str | Path, name: str, state: dict) -> None:
    """Write `directory/name.safetensors` and `directory/name.json` (each replaced atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten_tensors(state, tensors)
    tmp_tensors, tmp_json = directory / f".{name}.safetensors.tmp", directory / f".{name}.json.tmp"
    save_file(tensors, str(tmp_tensors))
    tmp_json.write_text(json.dumps(skeleton))
    os.replace(tmp_tensors, directory / f"{name}.safetensors")
    os.replace(tmp_json, directory / f"{name}.json")


def load_state(directory: str | Path, name: str) -> dict:
    """Read a state written by `save_state`."""
    directory = Path(directory)
    json_path, tensor_path = directory / f"{name}.json", directory / f"{name}.safetensors"
    if not json_path.is_file() or not tensor_path.is_file():
        raise FileNotFoundError(f"no saved state '{name}' in '{directory}' (expected {json_path.name} and "
                                f"{tensor_path.name}). Point at the directory the state was saved to.")
    return unflatten_tensors(json.loads(json_path.read_text()), load_file(str(tensor_path)))


def tensor_bytes(tensors) -> int:
    """Storage bytes of an iterable of tensors."""
    return int(sum(t.numel() * t.element_size() for t in tensors))
