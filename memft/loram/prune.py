"""Structured pruning of Llama-family decoders for LoRAM (arXiv 2502.13533).

In every non-dense layer, MLP intermediate neurons are removed (rows of gate_proj/up_proj, columns of down_proj)
and whole KV heads are removed together with their query groups (rows of k/v_proj and q_proj, columns of o_proj);
``head_dim`` is unchanged. Per-layer widths then differ between layers.

Why a normal Hugging Face forward still runs (checked against transformers 5.x ``LlamaAttention``, identical in
Mistral/Qwen2/Qwen3): the attention reshapes projections with ``view(*input_shape, -1, head_dim)`` and
``reshape(*input_shape, -1)``, so the head count is inferred per layer from the weight shapes; the only per-module
head attribute read in the forward is ``num_key_value_groups`` (used by ``repeat_kv`` / SDPA's GQA path), and
removing whole query groups leaves it unchanged. ``DynamicCache`` sizes each layer from its first update, so cached
generation works too. ``model.config`` keeps the original dims: a pruned model is never saved as such; it is
rebuilt from the full checkpoint with :func:`apply_plan`. Code that sizes buffers from the config (``StaticCache``)
does not apply to a pruned model.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from .layers import ATTENTION_PROJECTIONS, MLP_PROJECTIONS, decoder_layers, model_config, projection
from .plan import DenseLayers, ModelDims, PruningPlan, kept_count, resolve_dense_layers
from .scores import Batch, top_indices, unit_scores


def select_plan(
    model: nn.Module,
    ratio: float,
    method: str = "random",
    keep_dense_layers: DenseLayers = (4, 2),
    calibration: Iterable[Batch] | None = None,
    seed: int = 0,
    attention_ratio: float | None = None,
) -> PruningPlan:
    """Score the units of ``model`` and keep the best ``1 - ratio`` share in every non-dense layer.

    ``ratio`` is the fraction of MLP neurons removed in each pruned layer, ``attention_ratio`` (default: ``ratio``)
    the fraction of KV heads (with their query groups) removed; counts are rounded as in :func:`kept_count` (MLP
    keeps ``floor((1 - ratio) * intermediate_size)``, ``floor(ratio * kv_heads)`` KV heads go). At least one unit
    of each kind is kept.
    ``keep_dense_layers``: ``(first_k, last_k)`` or an explicit list of layer indices left unpruned.
    """
    dims = ModelDims.from_config(model_config(model))
    attention_ratio = ratio if attention_ratio is None else attention_ratio
    n_mlp = kept_count(dims.intermediate_size, ratio)
    n_kv = kept_count(dims.num_key_value_heads, attention_ratio, dims.head_dim)
    dense = set(resolve_dense_layers(keep_dense_layers, dims.num_hidden_layers))
    layers = [i for i in range(dims.num_hidden_layers) if i not in dense]
    scores = unit_scores(model, dims, layers, method, calibration, seed)
    return PruningPlan(
        dims=dims,
        mlp_kept={i: top_indices(scores[i][0], n_mlp) for i in layers},
        kv_heads_kept={i: top_indices(scores[i][1], n_kv) for i in layers},
        ratio=ratio,
        attention_ratio=attention_ratio,
        method=method,
        seed=seed,
    )


def _take(tensor: torch.Tensor, dim: int, index: torch.Tensor | int) -> torch.Tensor:
    """``tensor.index_select(dim, index)``; ``index`` is a kept count for meta/fake tensors (shape only, no data)."""
    if isinstance(index, int):
        shape = list(tensor.shape)
        shape[dim] = index
        return tensor.new_empty(shape)
    return tensor.index_select(dim, index.to(tensor.device)).contiguous()


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))


def _keep_rows(linear: nn.Linear, index: torch.Tensor | int) -> None:
    _replace(linear, "weight", _take(linear.weight, 0, index))
    if linear.bias is not None:
        _replace(linear, "bias", _take(linear.bias, 0, index))
    linear.out_features = linear.weight.shape[0]


def _keep_columns(linear: nn.Linear, index: torch.Tensor | int) -> None:
    _replace(linear, "weight", _take(linear.weight, 1, index))
    linear.in_features = linear.weight.shape[1]


def _kept_units(plan: PruningPlan, layer: int, symbolic: bool) -> tuple[torch.Tensor | int, ...]:
    """(neurons, query channels, KV channels) kept in ``layer``: index tensors, or counts when ``symbolic``.

    Counts are used for meta/fake models so that no index arithmetic runs inside an active ``FakeTensorMode``.
    """
    if symbolic:
        head_dim = plan.dims.head_dim
        return (
            plan.intermediate_size(layer),
            plan.num_attention_heads(layer) * head_dim,
            plan.num_key_value_heads(layer) * head_dim,
        )
    return plan.mlp_kept[layer], plan.query_channels(layer), plan.kv_channels(layer)


def _check_unpruned(layer: nn.Module, index: int, dims: ModelDims) -> None:
    expected = {
        "q_proj": (dims.num_attention_heads * dims.head_dim, dims.hidden_size),
        "k_proj": (dims.num_key_value_heads * dims.head_dim, dims.hidden_size),
        "v_proj": (dims.num_key_value_heads * dims.head_dim, dims.hidden_size),
        "o_proj": (dims.hidden_size, dims.num_attention_heads * dims.head_dim),
        "gate_proj": (dims.intermediate_size, dims.hidden_size),
        "up_proj": (dims.intermediate_size, dims.hidden_size),
        "down_proj": (dims.hidden_size, dims.intermediate_size),
    }
    for name in ATTENTION_PROJECTIONS + MLP_PROJECTIONS:
        module = projection(layer, name)
        if type(module) is not nn.Linear:
            raise ValueError(
                f"layer {index} {name} is a {type(module).__name__}, not a plain nn.Linear: prune the full-precision "
                "model before quantizing it or adding LoRA adapters (memft.loram.prepare_loram does this in order)."
            )
        if tuple(module.weight.shape) != expected[name]:
            raise ValueError(
                f"layer {index} {name}.weight has shape {tuple(module.weight.shape)}, but the plan expects the "
                f"unpruned shape {expected[name]}: the model is already pruned or is not the model of this plan."
            )


def apply_plan(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Prune ``model`` in place to the kept units of ``plan`` and return it.

    Works on real, meta and fake tensors (the latter two without reading data), so a memory estimator can build
    the pruned model under ``FakeTensorMode``. Raises ValueError naming what differs if the plan was made for a
    model with other dims.
    """
    dims = ModelDims.from_config(model_config(model))
    plan.check_dims(dims)
    blocks = decoder_layers(model)
    if len(blocks) != dims.num_hidden_layers:
        raise ValueError(
            f"the model has {len(blocks)} decoder layers but its config says num_hidden_layers="
            f"{dims.num_hidden_layers}; pass an unmodified model."
        )
    for i in plan.pruned_layers:
        _check_unpruned(blocks[i], i, dims)
    for i in plan.pruned_layers:
        attn, mlp = blocks[i].self_attn, blocks[i].mlp
        weight = attn.q_proj.weight
        neurons, q_channels, kv_channels = _kept_units(plan, i, weight.is_meta or is_fake(weight))
        with torch.no_grad():
            _keep_rows(mlp.gate_proj, neurons)
            _keep_rows(mlp.up_proj, neurons)
            _keep_columns(mlp.down_proj, neurons)
            _keep_rows(attn.q_proj, q_channels)
            _keep_rows(attn.k_proj, kv_channels)
            _keep_rows(attn.v_proj, kv_channels)
            _keep_columns(attn.o_proj, q_channels)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = plan.intermediate_size(i)
        # transformers < 4.48 reshaped with these attributes instead of -1; keep them truthful where present.
        if hasattr(attn, "num_heads"):
            attn.num_heads = plan.num_attention_heads(i)
        if hasattr(attn, "num_key_value_heads"):
            attn.num_key_value_heads = plan.num_key_value_heads(i)
    return model


def prune(
    model: nn.Module,
    ratio: float,
    method: str = "random",
    keep_dense_layers: DenseLayers = (4, 2),
    calibration: Iterable[Batch] | None = None,
    seed: int = 0,
    attention_ratio: float | None = None,
) -> tuple[nn.Module, PruningPlan]:
    """Select a plan (:func:`select_plan`) and prune ``model`` in place with it; returns ``(model, plan)``."""
    plan = select_plan(model, ratio, method, keep_dense_layers, calibration, seed, attention_ratio)
    return apply_plan(model, plan), plan
