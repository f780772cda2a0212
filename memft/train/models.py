"""Loading the model, tokenizer and config a recipe names, and checking the recipe against the config.

`memft:NAME` refers to a model bundled inside the package (`memft/assets/NAME`), so the quickstart runs
offline. Anything else goes to `from_pretrained` (a local directory or a hub id), with
`trust_remote_code` off unless the recipe turns it on. What cannot be found fails at once, before any
download is tried: a local directory that does not exist, a hub id outside the local cache while offline
(HF_HUB_OFFLINE=1, or the hub does not answer a quick probe), a model type that needs its own code.

`check_fits_model` compares the recipe with the model's config (no weights are read): the sequence length
with the model's positions, adapter and GaLore ranks with the layers they apply to.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

import torch

from memft.errors import ModelError, RecipeError
from memft.train.recipe import DataSection, ModelSection, Recipe, shorten

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROBE_TIMEOUT_S = 3.0  # longest wait for the hub to answer before the machine is taken to be offline


def resolve_model_path(name_or_path: str) -> str:
    """Map `memft:NAME` to the bundled directory; return other names unchanged."""
    if name_or_path.startswith("memft:"):
        name = name_or_path.split(":", 1)[1]
        path = ASSETS / name
        if not path.is_dir():
            known = sorted(p.name for p in ASSETS.iterdir() if p.is_dir())
            raise ModelError(f"model.name_or_path: there is no bundled model '{shorten(name)}'. Bundled models: "
                             f"{', '.join('memft:' + k for k in known)}.")
        return str(path)
    return name_or_path


# ------------------------------------------------------------------------------------------- locating
def model_source(section: ModelSection) -> tuple[str, dict[str, Any]]:
    """The directory or hub id to load the recipe's model from, with its `from_pretrained` options.

    Fails at once for a local path that does not exist, and for a hub id that is not in the local cache
    when the hub is off limits (HF_HUB_OFFLINE) or does not answer within PROBE_TIMEOUT_S. A cached hub id
    on a machine without network loads from the cache (`local_files_only`) instead of retrying downloads.
    """
    from huggingface_hub import constants

    name = resolve_model_path(section.name_or_path)
    if not name.strip():
        raise ModelError("model.name_or_path is empty; give a hub id, a local directory or memft:tiny-llama.")
    options = {"revision": section.revision, "trust_remote_code": section.trust_remote_code}
    local = Path(name).expanduser()
    if local.is_dir():
        return str(local), options
    if local.exists():
        raise ModelError(f"model.name_or_path: '{shorten(name)}' is a file; point it at the directory that holds "
                         "config.json and the weights.")
    if _looks_like_path(name):
        full = str(local.absolute())
        where = f" (here: '{shorten(full)}')" if full != name else ""
        raise ModelError(f"model.name_or_path: local directory '{shorten(name)}' does not exist{where}. Check the "
                         "path; hub ids have the form 'org/name'.")
    cached = _in_hub_cache(name, section.revision)
    if constants.HF_HUB_OFFLINE:
        if not cached:
            raise ModelError(f"model.name_or_path: '{shorten(name)}' is not a local directory and not in the local "
                             f"Hugging Face cache ({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE=1 forbids "
                             "downloading it. Download it once where there is network, point model.name_or_path "
                             "at a local directory holding the model, or unset HF_HUB_OFFLINE.")
        return name, options
    if not hub_reachable(constants.ENDPOINT):
        if not cached:
            raise ModelError(f"model.name_or_path: '{shorten(name)}' is not a local directory and not in the local "
                             f"Hugging Face cache, and {constants.ENDPOINT} cannot be reached (no answer within "
                             f"{PROBE_TIMEOUT_S:g} s): this machine looks offline. Point model.name_or_path at a local "
                             "directory holding the model (saved with save_pretrained), or use memft:tiny-llama.")
        return name, {**options, "local_files_only": True}
    return name, options


def _looks_like_path(name: str) -> bool:
    """Whether `name` can only be meant as a local path: absolute, starting with '.' or '~' (hub ids
    cannot), with a backslash or more than one '/', or under a directory that exists here (runs/x)."""
    return (Path(name).is_absolute() or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1
            or ("/" in name and Path(name.split("/")[0]).is_dir()))


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)
    except ValueError as exc:  # HFValidationError: not a possible hub id
        raise ModelError(f"model.name_or_path: '{shorten(repo_id)}' is neither an existing local directory nor a "
                         f"valid hub id ('org/name'): {shorten(str(exc))}") from exc


@functools.lru_cache(maxsize=None)
def hub_reachable(endpoint: str) -> bool:
    """Whether the hub answers one HEAD request (any status) within PROBE_TIMEOUT_S. The request runs in a
    thread so that a hanging name lookup, which no socket timeout bounds, cannot stall the caller."""
    from huggingface_hub.utils import get_session

    answered: list[bool] = []

    def probe() -> None:
        try:
            get_session().head(endpoint, timeout=PROBE_TIMEOUT_S)
            answered.append(True)
        except Exception:  # noqa: BLE001 - any failure to get an answer means unreachable
            answered.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S)
    return answered == [True]


# -------------------------------------------------------------------------------------------- loading
def load_config(section: ModelSection):
    """The model's transformers config: config.json only, no weights, and no model code unless trusted."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig, PretrainedConfig

    path, options = model_source(section)
    try:
        raw, _ = PretrainedConfig.get_config_dict(path, revision=options["revision"],
                                                  local_files_only=options.get("local_files_only", False))
        _check_architecture(raw, section)
        return AutoConfig.from_pretrained(path, **options)
    except (OSError, ValueError, TypeError, StrictDataclassError) as exc:  # a field of the wrong type
        raise ModelError(_load_failure("config", path, exc)) from exc


def _check_architecture(raw: dict, section: ModelSection) -> None:
    """Refuse a config whose model type transformers does not ship, naming model.trust_remote_code."""
    import transformers
    from transformers import CONFIG_MAPPING

    if not isinstance(raw, dict):
        raise ModelError(f"model.name_or_path: the config.json of '{shorten(section.name_or_path)}' holds a "
                         f"{type(raw).__name__}, not a JSON object of settings; save the model with save_pretrained.")
    model_type = raw.get("model_type")
    known = isinstance(model_type, str) and model_type in CONFIG_MAPPING
    if section.trust_remote_code or known or (model_type is None and "auto_map" not in raw):
        return
    what = f"model_type '{shorten(str(model_type))}'" if model_type is not None else "no model_type"
    if "auto_map" in raw:
        reason = f"needs its own model code: its config.json has an auto_map and {what}"
    else:
        reason = (f"has {what}, which transformers {transformers.__version__} does not know (upgrade transformers "
                  "if the architecture is newer)")
    raise ModelError(f"model.name_or_path: '{shorten(section.name_or_path)}' {reason}. If the model ships its own "
                     "code, set model.trust_remote_code: true; that runs Python files from that directory or hub "
                     "repository on this machine, so only do it for a source you trust.")


def load_tokenizer(section: ModelSection):
    from transformers import AutoTokenizer

    config = load_config(section)
    path, options = model_source(section)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, config=config, **options)
    except (OSError, ValueError) as exc:
        raise ModelError(_load_failure("tokenizer", path, exc)) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(section: ModelSection):
    """An `AutoModelForCausalLM` in the recipe's dtype, attention kernel and checkpointing mode."""
    from transformers import AutoModelForCausalLM

    config = load_config(section)
    path, options = model_source(section)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=DTYPES[section.dtype],
                                                     attn_implementation=section.attn_implementation, **options)
    except (OSError, ValueError) as exc:
        raise ModelError(_load_failure("model", path, exc)) from exc
    if section.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def _load_failure(what: str, path: str, exc: Exception) -> str:
    reason = " ".join(str(exc).split()) or type(exc).__name__
    local = Path(path).exists()
    where = f"local directory '{path}'" if local else f"'{shorten(path)}' (not a local path, so treated as a hub id)"
    fix = ("Check that the directory holds a config.json and weights saved with save_pretrained."
           if local else "Check the hub id and revision, or download the model once and point "
           "model.name_or_path at the local directory, or use memft:tiny-llama.")
    return f"model.name_or_path: cannot load the {what} from {where}: {shorten(reason, 300)} {fix}"


# ------------------------------------------------------------------------------- recipe against model
def max_positions(model_or_config) -> int | None:
    """The longest sequence the model's position scheme supports, when its config states one."""
    config = getattr(model_or_config, "config", model_or_config)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def check_fits_model(recipe: Recipe) -> None:
    """Refuse a recipe its model cannot take, from the model's config alone (no weights are read)."""
    config = load_config(recipe.model)
    check_sequence_length(recipe.data, config)
    check_ranks(recipe, config)


def check_sequence_length(data: DataSection, config) -> None:
    """Refuse `data.max_seq_len` above the model's position limit (`config`: a model's or its config)."""
    limit = max_positions(config)
    if limit is not None and data.max_seq_len > limit:
        raise RecipeError(f"data.max_seq_len={data.max_seq_len} exceeds the model's limit of {limit} positions. "
                          f"Set data.max_seq_len to at most {limit}.")


def check_ranks(recipe: Recipe, config) -> None:
    """Refuse an adapter rank above the smallest dimension of the layers it adapts, and a GaLore rank above
    min(m, n) of every matrix it projects: such ranks cost memory and time and add nothing. The layers come
    from the model built on the meta device (shapes only, no memory)."""
    lora = recipe.adapter.name in ("lora", "loram")
    galore = hasattr(recipe.optimizer, "rank") and recipe.adapter.name == "none"  # with an adapter: its matrices
    if not (lora or galore):
        return
    model = _meta_model(config, recipe.model)
    if lora:
        _check_adapter_rank(recipe.adapter, model)
    if galore:
        _check_galore_rank(recipe.optimizer, model)


def _check_adapter_rank(adapter, model: torch.nn.Module) -> None:
    targets = _lora_targets(model, adapter.target_modules)
    if not targets:
        raise RecipeError(f"adapter.target_modules: no layer name of the model ends in one of "
                          f"{shorten(str(adapter.target_modules))}; its linear layers are {_linear_names(model)}.")
    name, weight = min(targets, key=lambda item: min(item[1].shape))
    limit = min(weight.shape)
    if adapter.r > limit:
        raise RecipeError(f"adapter.r={adapter.r} exceeds what the adapted layers can use: the smallest, {name} "
                          f"(weight {_shape(weight)}), has rank at most {limit}, so a larger adapter only costs "
                          f"memory and time. Set adapter.r to at most {limit}.")


def _check_galore_rank(optimizer, model: torch.nn.Module) -> None:
    name, weight = max(_galore_targets(model, optimizer), key=lambda item: min(item[1].shape))
    limit = min(weight.shape)
    if optimizer.rank > limit:
        raise RecipeError(f"optimizer.rank={optimizer.rank} is above min(m, n) of every matrix GaLore projects "
                          f"(the largest is {limit}, {name} with weight {_shape(weight)}), so no gradient would be "
                          f"compressed. Set optimizer.rank to at most {limit}.")


def _meta_model(config, section: ModelSection) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=section.trust_remote_code)
    except (ValueError, TypeError, RuntimeError, ImportError) as exc:
        raise ModelError(f"model.name_or_path: '{shorten(section.name_or_path)}': cannot build a causal language "
                         f"model from its config: {shorten(str(exc), 300)}") from exc


def _lora_targets(model: torch.nn.Module, targets: list[str] | str) -> list[tuple[str, torch.Tensor]]:
    """(name, weight) of the layers peft adapts: names equal to or ending in a target, or with
    'all-linear' every linear layer but the output head."""
    if targets == "all-linear":
        head = model.get_output_embeddings()
        chosen = [(n, m) for n, m in model.named_modules() if _is_linear(m) and m is not head]
    else:
        chosen = [(n, m) for n, m in model.named_modules() if any(n == t or n.endswith("." + t) for t in targets)]
    return [(n, m.weight) for n, m in chosen if getattr(m, "weight", None) is not None and m.weight.ndim == 2]


def _galore_targets(model: torch.nn.Module, section) -> list[tuple[str, torch.Tensor]]:
    """(name, weight) of the matrices GaLore projects, chosen by the optimizer's own rule."""
    from memft.optimizers.galore import galore_param_groups

    try:
        groups = galore_param_groups(model, target_modules=section.target_modules, rank=section.rank)
    except ValueError as exc:
        raise RecipeError(f"optimizer.target_modules: no linear layer of the model has a name containing one of "
                          f"{shorten(str(section.target_modules))}; its linear layers are {_linear_names(model)}."
                          ) from exc
    projected = {id(p) for g in groups if "rank" in g for p in g["params"]}
    return [(n.removesuffix(".weight"), p) for n, p in model.named_parameters() if id(p) in projected]


def _linear_names(model: torch.nn.Module) -> str:
    """The distinct last name parts of the model's linear layers ('q_proj, k_proj, ...')."""
    names = dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m))
    return shorten(", ".join(names))


def _is_linear(module: torch.nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def _shape(weight: torch.Tensor) -> str:
    return " x ".join(str(d) for d in weight.shape)
