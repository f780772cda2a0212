"""Importance scores of prunable units (MLP neurons, KV-head groups) for LoRAM structured pruning (arXiv 2502.13533).

A unit is every weight that disappears with it:
- MLP neuron ``j``: row ``j`` of gate_proj and up_proj (and their bias entries), column ``j`` of down_proj.
- KV head ``h``: rows of head ``h`` in k_proj and v_proj, rows of its query group in q_proj, the matching columns
  of o_proj (and q/k/v bias entries).

Criteria (LLM-Pruner's element-wise variants, which LoRAM uses for its structured setting):
- ``random``: uniform random scores from a seeded generator.
- ``magnitude``: L2 norm of the unit's weights.
- ``taylor``: first-order Taylor saliency ``sum |w * dL/dw|`` over the unit's weights, with the gradient of the
  causal-LM loss accumulated over calibration batches.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from .layers import ATTENTION_PROJECTIONS, MLP_PROJECTIONS, decoder_layers, projection
from .plan import ModelDims

PRUNE_METHODS = ("random", "magnitude", "taylor")
Batch = torch.Tensor | Mapping[str, torch.Tensor]


def _mlp_unit_sums(mlp: nn.Module, elementwise: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``[intermediate]``: sum of ``elementwise(param)`` over each neuron's weights (float32)."""
    total = elementwise(mlp.gate_proj.weight).sum(1) + elementwise(mlp.up_proj.weight).sum(1)
    total = total + elementwise(mlp.down_proj.weight).sum(0)
    for proj in (mlp.gate_proj, mlp.up_proj):
        if proj.bias is not None:
            total = total + elementwise(proj.bias)
    return total


def _attention_unit_sums(
    attn: nn.Module, dims: ModelDims, elementwise: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``[num_key_value_heads]``: sum of ``elementwise(param)`` over each KV head group's weights (float32)."""
    kv = dims.num_key_value_heads

    def per_group(values: torch.Tensor) -> torch.Tensor:  # values: [channels] or [channels, in] -> [kv]
        return values.reshape(kv, -1).sum(1)

    total = per_group(elementwise(attn.q_proj.weight)) + per_group(elementwise(attn.o_proj.weight).sum(0))
    total = total + per_group(elementwise(attn.k_proj.weight)) + per_group(elementwise(attn.v_proj.weight))
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        if proj.bias is not None:
            total = total + per_group(elementwise(proj.bias))
    return total


def _random_scores(dims: ModelDims, layers: list[int], seed: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return {
        i: (
            torch.rand(dims.intermediate_size, generator=generator),
            torch.rand(dims.num_key_value_heads, generator=generator),
        )
        for i in layers
    }


def _weight_scores(
    model: nn.Module, dims: ModelDims, layers: list[int], elementwise: Callable[[torch.Tensor], torch.Tensor]
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    blocks = decoder_layers(model)
    with torch.no_grad():
        return {
            i: (
                _mlp_unit_sums(blocks[i].mlp, elementwise).float().cpu(),
                _attention_unit_sums(blocks[i].self_attn, dims, elementwise).float().cpu(),
            )
            for i in layers
        }


def _as_model_inputs(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError(
            "Each calibration batch must be a LongTensor of input_ids [batch, seq] or a mapping with 'input_ids' "
            f"(and optionally 'attention_mask', 'labels'), got {type(batch).__name__}."
        )
    if "position_ids" in batch:  # packed rows: attention stays within each example only without the mask
        batch = {k: v for k, v in batch.items() if k != "attention_mask"}
    keys = ("input_ids", "attention_mask", "position_ids", "labels")
    inputs = {k: v.to(device) for k, v in batch.items() if k in keys}
    inputs.setdefault("labels", inputs["input_ids"])
    return inputs


def _accumulate_gradients(model: nn.Module, layers: list[int], calibration: Iterable[Batch]) -> list[nn.Parameter]:
    """Backpropagate the causal-LM loss of every calibration batch, summing ``.grad`` on the prunable weights."""
    blocks = decoder_layers(model)
    params = [
        p
        for i in layers
        for name in ATTENTION_PROJECTIONS + MLP_PROJECTIONS
        for p in projection(blocks[i], name).parameters()
    ]
    previous = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    for p in params:
        p.requires_grad_(True)
    device = model.get_input_embeddings().weight.device
    batches = 0
    try:
        for batch in calibration:
            model(**_as_model_inputs(batch, device)).loss.backward()
            batches += 1
    finally:
        for p, flag in previous.items():
            p.requires_grad_(flag)
    if batches == 0:
        raise ValueError("calibration yielded no batches; the 'taylor' method needs at least one batch of input_ids.")
    return params


def unit_scores(
    model: nn.Module,
    dims: ModelDims,
    layers: list[int],
    method: str,
    calibration: Iterable[Batch] | None = None,
    seed: int = 0,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per pruned layer: (``[intermediate_size]`` neuron scores, ``[num_key_value_heads]`` KV-head scores)."""
    if method not in PRUNE_METHODS:
        raise ValueError(f"prune method must be one of {PRUNE_METHODS}, got {method!r}.")
    if method == "taylor" and calibration is None:
        raise ValueError(
            "method='taylor' needs calibration batches (an iterable of input_ids tensors or dicts) to compute "
            "|w * dL/dw|; pass calibration=... or use method='magnitude'."
        )
    if method == "random":
        return _random_scores(dims, layers, seed)
    if method == "magnitude":
        scores = _weight_scores(model, dims, layers, lambda p: p.detach().float().square())
        return {i: (mlp.sqrt(), attn.sqrt()) for i, (mlp, attn) in scores.items()}
    params = _accumulate_gradients(model, layers, calibration)
    try:
        return _weight_scores(model, dims, layers, lambda p: (p.detach().float() * p.grad.float()).abs())
    finally:
        for p in params:
            p.grad = None


def top_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Sorted indices of the ``keep`` highest scores (ties broken by lower index)."""
    order = torch.argsort(scores, descending=True, stable=True)
    return order[:keep].sort().values
