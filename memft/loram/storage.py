"""Exact parameter-storage accounting for LoRAM / QLoRAM (arXiv 2502.13533), counted on meta tensors.

The model is built from its config on ``torch.device("meta")`` (no memory), pruned with the plan's shapes and
every parameter's bytes are summed. NF4 (bitsandbytes ``Linear4bit`` layout, blocksize 64) costs per weight
tensor of ``n`` elements:

- packed codes: ``ceil(n / 2)`` bytes (two 4-bit codes per uint8);
- absmax, one per block of 64: ``4 * ceil(n / 64)`` bytes (float32) without double quantisation, or with it
  (QLoRA double quant, blocks of 256 absmax values): ``ceil(n / 64)`` uint8 + ``4 * ceil(ceil(n / 64) / 256)``
  float32 second-level absmax + 4 bytes float32 offset;
- code books: bitsandbytes (checked on 0.50) keeps a private float32 copy of the 16-entry NF4 code (64 bytes)
  per weight and, with double quantisation, of the 256-entry 8-bit dynamic code (1024 bytes).

Biases, norms, embeddings and (unless ``include_lm_head``) ``lm_head`` stay in ``dtype``. Buffers (rotary
tables) are not parameters and not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .layers import decoder_layers
from .plan import DenseLayers, ModelDims, PruningPlan, plan_from_counts
from .prune import apply_plan
from .quantize import DOUBLE_QUANT_BLOCKSIZE, NF4_BLOCKSIZE, QUANTIZE_CHOICES

_NF4_CODE_BYTES = 16 * 4
_DYNAMIC_CODE_BYTES = 256 * 4


@dataclass(frozen=True)
class StorageReport:
    """Bytes of parameter storage, total and by category, and the number of (unquantised-equivalent) parameters.

    Categories: ``embeddings``, ``lm_head``, ``decoder_weights`` (projection weights; packed codes when
    quantised), ``quant_constants`` (NF4 absmax, double-quant state, code books), ``other`` (norms, biases).
    """

    total_bytes: int
    parameter_count: int
    by_category: dict[str, int]


def nf4_bytes(numel: int, double_quant: bool = True) -> tuple[int, int]:
    """``(packed_code_bytes, quant_constant_bytes)`` of one NF4 weight tensor with ``numel`` elements."""
    blocks = math.ceil(numel / NF4_BLOCKSIZE)
    if double_quant:
        constants = blocks + 4 * math.ceil(blocks / DOUBLE_QUANT_BLOCKSIZE) + 4 + _DYNAMIC_CODE_BYTES
    else:
        constants = 4 * blocks
    return (numel + 1) // 2, constants + _NF4_CODE_BYTES


def _quantized_weights(model: nn.Module, include_lm_head: bool) -> set[int]:
    ids = {
        id(module.weight)
        for layer in decoder_layers(model)
        for module in layer.modules()
        if type(module) is nn.Linear
    }
    if include_lm_head:
        ids.add(id(model.get_output_embeddings().weight))
    return ids


def parameter_storage_bytes(
    config: Any,
    pruning: PruningPlan | float | None = None,
    quantize: str | None = None,
    *,
    keep_dense_layers: DenseLayers = (4, 2),
    attention_ratio: float | None = None,
    dtype: torch.dtype = torch.bfloat16,
    double_quant: bool = True,
    include_lm_head: bool = False,
) -> StorageReport:
    """Exact parameter bytes of the model of ``config``, pruned by ``pruning`` and stored as ``quantize``.

    ``pruning``: None (full model), a PruningPlan, or a ratio (then ``keep_dense_layers`` and ``attention_ratio``
    define the plan as in :func:`memft.loram.prune`; only the kept counts matter for storage).
    ``quantize``: None (``dtype`` everywhere) or ``"nf4"`` (decoder projections, optionally lm_head).
    """
    from transformers import AutoModelForCausalLM

    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}.")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if pruning is not None:
        plan = (
            pruning
            if isinstance(pruning, PruningPlan)
            else plan_from_counts(ModelDims.from_config(config), float(pruning), keep_dense_layers, attention_ratio)
        )
        apply_plan(model, plan)
    quantized = _quantized_weights(model, include_lm_head) if quantize == "nf4" else set()
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    by_category = dict.fromkeys(("embeddings", "lm_head", "decoder_weights", "quant_constants", "other"), 0)
    count = 0
    for param in model.parameters():
        count += param.numel()
        if id(param) in quantized:
            codes, constants = nf4_bytes(param.numel(), double_quant)
            by_category["quant_constants"] += constants
        else:
            codes = param.numel() * param.element_size()
        if param is embedding:
            by_category["embeddings"] += codes
        elif param is head:
            by_category["lm_head"] += codes
        elif param.dim() == 2:
            by_category["decoder_weights"] += codes
        else:
            by_category["other"] += codes
    return StorageReport(sum(by_category.values()), count, by_category)
