"""Structured pruning plan for LoRAM (arXiv 2502.13533): which MLP neurons and KV heads each layer keeps.

A plan is the single source of truth shared by pruning (`apply_plan`), LoRA recovery (`recover`) and storage
accounting. It stores, for every pruned decoder layer, the kept intermediate neurons (indices into
``intermediate_size``) and the kept key/value heads (indices into ``num_key_value_heads``); a kept KV head keeps
its whole query group (``num_attention_heads // num_key_value_heads`` query heads), ``head_dim`` is unchanged.
Layers absent from the plan stay dense. The original model dimensions are recorded so that a plan applied to the
wrong model is refused with a message naming the field that differs.

On disk a plan is two files beside each other (they can share a directory with a PEFT adapter):
``loram_plan.json`` (metadata, dims, pruned layers) and ``loram_plan.safetensors`` (int64 kept indices).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch._subclasses.fake_tensor import is_fake
from safetensors.torch import load_file, save_file

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
PLAN_JSON = "loram_plan.json"
PLAN_TENSORS = "loram_plan.safetensors"
_FORMAT = "memft.loram.pruning_plan"
_VERSION = 1
# Layers left unpruned: (first_k, last_k) or explicit layer indices.
DenseLayers = tuple[int, int] | list[int] | range | set[int]


@dataclass(frozen=True)
class ModelDims:
    """The dimensions of a Llama-family decoder that a pruning plan depends on."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int

    @classmethod
    def from_config(cls, config: Any) -> "ModelDims":
        """Read the dims from a Hugging Face config (LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config)."""
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"LoRAM pruning supports model_type in {SUPPORTED_MODEL_TYPES}, got {model_type!r}. These share the "
                "Llama decoder layout (q/k/v/o_proj attention with grouped KV heads, gate/up/down_proj MLP); pass a "
                "model of one of these families."
            )
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if heads % kv_heads:
            raise ValueError(
                f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}; grouped-query "
                "attention needs equal query groups per KV head. Fix the model config."
            )
        return cls(
            model_type=model_type,
            hidden_size=int(config.hidden_size),
            num_hidden_layers=int(config.num_hidden_layers),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=int(head_dim),
            intermediate_size=int(config.intermediate_size),
        )

    @property
    def query_group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_attention_heads // self.num_key_value_heads

    def differences(self, other: "ModelDims") -> list[str]:
        """Human-readable ``field: self vs other`` entries for every differing dim."""
        return [
            f"{name}: plan has {getattr(self, name)!r}, model has {getattr(other, name)!r}"
            for name in self.__dataclass_fields__
            if getattr(self, name) != getattr(other, name)
        ]


def kept_count(total: int, ratio: float, group_size: int = 1) -> int:
    """Units kept when a fraction ``ratio`` of ``total`` units of ``group_size`` channels each is pruned (>= 1).

    The rounding of LLM-Pruner / torch-pruning, the pruner behind the LoRAM paper's structured results: the kept
    channel count is rounded down, ``floor((1 - ratio) * total * group_size)``, and only whole units are removed.
    So an MLP (``group_size=1``) keeps ``floor((1 - ratio) * total)`` neurons, and KV heads (``group_size=head_dim``)
    lose ``floor(ratio * total)`` heads. With LLaMA-2-70B at ratio 0.85 this keeps 4300 of 28672 neurons and 2 of
    8 KV heads, which reproduces the paper's storage figures.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"pruning ratio must be in [0, 1), got {ratio!r}; it is the fraction of units removed.")
    channels = total * group_size
    kept_channels = math.floor(channels * (1.0 - ratio) + 1e-9)
    return max(1, total - (channels - kept_channels) // group_size)


def resolve_dense_layers(keep_dense_layers: DenseLayers, num_layers: int) -> list[int]:
    """Layers left unpruned: a ``tuple`` ``(first_k, last_k)`` or an explicit ``list``/``range``/``set`` of indices."""
    if isinstance(keep_dense_layers, tuple):
        if len(keep_dense_layers) != 2 or not all(isinstance(k, int) and k >= 0 for k in keep_dense_layers):
            raise ValueError(
                f"keep_dense_layers as a tuple must be (first_k, last_k) with non-negative ints, got "
                f"{keep_dense_layers!r}; pass a list of layer indices to name the dense layers explicitly."
            )
        first, last = keep_dense_layers
        dense = set(range(min(first, num_layers))) | set(range(max(num_layers - last, 0), num_layers))
    elif isinstance(keep_dense_layers, (list, range, set, frozenset)):
        dense = set(keep_dense_layers)
        bad = sorted(i for i in dense if not isinstance(i, int) or not 0 <= i < num_layers)
        if bad:
            raise ValueError(
                f"keep_dense_layers names layers {bad} outside 0..{num_layers - 1}; list valid decoder layer indices."
            )
    else:
        raise TypeError(
            f"keep_dense_layers must be a tuple (first_k, last_k) or a list of layer indices, got "
            f"{type(keep_dense_layers).__name__}."
        )
    return sorted(dense)


def _check_indices(name: str, index: torch.Tensor, total: int) -> torch.Tensor:
    index = torch.as_tensor(index)
    if index.dtype not in (torch.int64, torch.int32) or index.dim() != 1 or index.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D integer tensor of kept indices, got {index!r}.")
    index = index.to(device="cpu", dtype=torch.int64)
    if is_fake(index):  # the planner's fake tensors carry shapes only: the values cannot be checked
        return index
    if bool((index[1:] <= index[:-1]).any()) or int(index[0]) < 0 or int(index[-1]) >= total:
        raise ValueError(f"{name} must be strictly increasing indices in [0, {total}), got {index.tolist()}.")
    return index


@dataclass
class PruningPlan:
    """Kept units per pruned layer, plus the original model dims.

    ``mlp_kept[layer]``: int64 ``[kept_neurons]`` indices into ``intermediate_size``.
    ``kv_heads_kept[layer]``: int64 ``[kept_kv_heads]`` indices into ``num_key_value_heads``.
    """

    dims: ModelDims
    mlp_kept: dict[int, torch.Tensor]
    kv_heads_kept: dict[int, torch.Tensor]
    ratio: float | None = None
    attention_ratio: float | None = None
    method: str | None = None
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.mlp_kept) != set(self.kv_heads_kept):
            raise ValueError(
                "mlp_kept and kv_heads_kept must name the same pruned layers, got "
                f"{sorted(self.mlp_kept)} and {sorted(self.kv_heads_kept)}."
            )
        for layer in self.mlp_kept:
            if not 0 <= layer < self.dims.num_hidden_layers:
                raise ValueError(f"pruned layer {layer} is outside 0..{self.dims.num_hidden_layers - 1}.")
        self.mlp_kept = {
            int(i): _check_indices(f"mlp_kept[{i}]", t, self.dims.intermediate_size) for i, t in self.mlp_kept.items()
        }
        self.kv_heads_kept = {
            int(i): _check_indices(f"kv_heads_kept[{i}]", t, self.dims.num_key_value_heads)
            for i, t in self.kv_heads_kept.items()
        }

    @property
    def pruned_layers(self) -> list[int]:
        return sorted(self.mlp_kept)

    def intermediate_size(self, layer: int) -> int:
        """MLP width of ``layer`` after pruning."""
        return int(self.mlp_kept[layer].numel()) if layer in self.mlp_kept else self.dims.intermediate_size

    def num_key_value_heads(self, layer: int) -> int:
        return int(self.kv_heads_kept[layer].numel()) if layer in self.kv_heads_kept else self.dims.num_key_value_heads

    def num_attention_heads(self, layer: int) -> int:
        return self.num_key_value_heads(layer) * self.dims.query_group_size

    def query_heads(self, layer: int) -> torch.Tensor:
        """Kept query heads ``[kept_kv * group]``: every query head of every kept KV head (HF GQA layout)."""
        group = self.dims.query_group_size
        return (self.kv_heads_kept[layer][:, None] * group + torch.arange(group)).reshape(-1)

    def query_channels(self, layer: int) -> torch.Tensor:
        """Kept rows of q_proj (= kept columns of o_proj), ``[kept_heads * head_dim]``."""
        return _head_channels(self.query_heads(layer), self.dims.head_dim)

    def kv_channels(self, layer: int) -> torch.Tensor:
        """Kept rows of k_proj and v_proj, ``[kept_kv * head_dim]``."""
        return _head_channels(self.kv_heads_kept[layer], self.dims.head_dim)

    def check_dims(self, dims: ModelDims, what: str = "model") -> None:
        """Raise ValueError naming every dim on which this plan and ``dims`` disagree."""
        diff = self.dims.differences(dims)
        if diff:
            raise ValueError(
                f"The pruning plan does not match the {what}: " + "; ".join(diff) + ". A plan only applies to the "
                "model (config) it was made for; make a new plan with memft.loram.prune for this model."
            )

    def save(self, directory: str | Path) -> Path:
        """Write ``loram_plan.json`` and ``loram_plan.safetensors`` into ``directory`` (created if missing)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for layer in self.pruned_layers:
            tensors[f"layers.{layer}.mlp.kept_neurons"] = self.mlp_kept[layer].contiguous()
            tensors[f"layers.{layer}.self_attn.kept_kv_heads"] = self.kv_heads_kept[layer].contiguous()
        save_file(tensors, str(directory / PLAN_TENSORS))
        meta = {
            "format": _FORMAT,
            "version": _VERSION,
            "dims": {name: getattr(self.dims, name) for name in self.dims.__dataclass_fields__},
            "pruned_layers": self.pruned_layers,
            "ratio": self.ratio,
            "attention_ratio": self.attention_ratio,
            "method": self.method,
            "seed": self.seed,
            "extra": self.extra,
        }
        (directory / PLAN_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "PruningPlan":
        """Read a plan written by :meth:`save`."""
        directory = Path(directory)
        json_path, tensor_path = directory / PLAN_JSON, directory / PLAN_TENSORS
        missing = [p.name for p in (json_path, tensor_path) if not p.is_file()]
        if missing:
            raise ValueError(
                f"No LoRAM pruning plan in {directory}: missing {missing}. Pass the directory that "
                "PruningPlan.save (or memft.loram.save_loram_adapter) wrote."
            )
        meta = json.loads(json_path.read_text())
        if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
            raise ValueError(
                f"{json_path} is not a version-{_VERSION} {_FORMAT} file (format={meta.get('format')!r}, "
                f"version={meta.get('version')!r})."
            )
        tensors = load_file(str(tensor_path))
        layers = [int(i) for i in meta["pruned_layers"]]
        try:
            mlp = {i: tensors[f"layers.{i}.mlp.kept_neurons"] for i in layers}
            kv = {i: tensors[f"layers.{i}.self_attn.kept_kv_heads"] for i in layers}
        except KeyError as err:
            raise ValueError(f"{tensor_path} lacks tensor {err} named by pruned_layers in {json_path}.") from err
        return cls(
            dims=ModelDims(**meta["dims"]),
            mlp_kept=mlp,
            kv_heads_kept=kv,
            ratio=meta.get("ratio"),
            attention_ratio=meta.get("attention_ratio"),
            method=meta.get("method"),
            seed=meta.get("seed"),
            extra=dict(meta.get("extra") or {}),
        )

    def summary(self) -> Mapping[str, Any]:
        """Per-layer kept counts, for logs and reports."""
        return {
            "pruned_layers": self.pruned_layers,
            "intermediate_size": {i: self.intermediate_size(i) for i in self.pruned_layers},
            "num_key_value_heads": {i: self.num_key_value_heads(i) for i in self.pruned_layers},
        }


def _head_channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def plan_from_counts(
    dims: ModelDims,
    ratio: float,
    keep_dense_layers: DenseLayers = (4, 2),
    attention_ratio: float | None = None,
) -> PruningPlan:
    """A plan keeping the first units of every pruned layer: for size/storage accounting, where only counts matter.

    Build plans outside ``FakeTensorMode`` (their index tensors are validated on real values); a plan built
    beforehand can then be applied to a fake or meta model.
    """
    attention_ratio = ratio if attention_ratio is None else attention_ratio
    dense = set(resolve_dense_layers(keep_dense_layers, dims.num_hidden_layers))
    layers = [i for i in range(dims.num_hidden_layers) if i not in dense]
    n_mlp = kept_count(dims.intermediate_size, ratio)
    n_kv = kept_count(dims.num_key_value_heads, attention_ratio, dims.head_dim)
    return PruningPlan(
        dims=dims,
        mlp_kept={i: torch.arange(n_mlp) for i in layers},
        kv_heads_kept={i: torch.arange(n_kv) for i in layers},
        ratio=ratio,
        attention_ratio=attention_ratio,
        method="counts",
    )
