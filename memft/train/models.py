"""Loading the model and tokenizer a recipe names.

`memft:NAME` refers to a model bundled inside the package (`memft/assets/NAME`), so the quickstart runs
offline. Anything else goes to `from_pretrained` (a local directory or a hub id), with
`trust_remote_code` off unless the recipe turns it on.
"""

from __future__ import annotations

from pathlib import Path

import torch

from memft.errors import ModelError
from memft.train.recipe import ModelSection

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name_or_path: str) -> str:
    """Map `memft:NAME` to the bundled directory; return other names unchanged."""
    if name_or_path.startswith("memft:"):
        name = name_or_path.split(":", 1)[1]
        path = ASSETS / name
        if not path.is_dir():
            known = sorted(p.name for p in ASSETS.iterdir() if p.is_dir())
            raise ModelError(f"model.name_or_path: there is no bundled model '{name}'. Bundled models: "
                             f"{', '.join('memft:' + k for k in known)}.")
        return str(path)
    return name_or_path


def load_tokenizer(section: ModelSection):
    from transformers import AutoTokenizer

    path = resolve_model_path(section.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=section.revision,
                                                  trust_remote_code=section.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(_load_failure("tokenizer", path, exc)) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(section: ModelSection):
    """An `AutoModelForCausalLM` in the recipe's dtype, attention kernel and checkpointing mode."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(section.name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[section.dtype], attn_implementation=section.attn_implementation,
            revision=section.revision, trust_remote_code=section.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(_load_failure("model", path, exc)) from None
    if section.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def max_positions(model) -> int | None:
    """The longest sequence the model's position scheme supports, when its config states one."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def _load_failure(what: str, path: str, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    local = Path(path).exists()
    where = f"local directory '{path}'" if local else f"'{path}' (not a local path, so treated as a hub id)"
    fix = ("Check that the directory holds a config.json and weights saved with save_pretrained."
           if local else "This machine may be offline: download the model once and point "
           "model.name_or_path at the local directory, or use memft:tiny-llama.")
    return f"model.name_or_path: cannot load the {what} from {where}: {first} {fix}"
