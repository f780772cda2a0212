"""LoRAM recovery (arXiv 2502.13533): lift LoRA factors trained on a pruned model to the full model's shapes.

For a pruned layer, only the factor that lives on a pruned axis changes; it is zero-filled off the kept indices:

====================  ==========  ==========================================================
module                factor      recovered axis (full size)
====================  ==========  ==========================================================
mlp.gate_proj/up_proj lora_B      rows by kept neuron        ``[intermediate_size, r]``
mlp.down_proj         lora_A      columns by kept neuron     ``[r, intermediate_size]``
self_attn.q_proj      lora_B      rows by kept query channel ``[heads * head_dim, r]``
self_attn.k/v_proj    lora_B      rows by kept KV channel    ``[kv_heads * head_dim, r]``
self_attn.o_proj      lora_A      columns by query channel   ``[r, heads * head_dim]``
====================  ==========  ==========================================================

The other factor (on the hidden axis) and every tensor of a dense layer or of another module (embeddings,
lm_head, ...) is copied. Hence the recovered ``ΔW = B A`` equals the pruned ``ΔW`` on the kept rows/columns and is
zero elsewhere: pruned units get no update, exactly as in the reference "zeroA" recovery.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file
from torch import nn

from .plan import ModelDims, PruningPlan

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_LORA_KEY = re.compile(
    r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.(.+)$"
)
# (projection, factor) -> (axis of the pruned dimension, kind of kept index)
_RECOVERED_AXES = {
    ("gate_proj", "lora_B.weight"): (0, "neurons"),
    ("up_proj", "lora_B.weight"): (0, "neurons"),
    ("down_proj", "lora_A.weight"): (1, "neurons"),
    ("q_proj", "lora_B.weight"): (0, "query"),
    ("k_proj", "lora_B.weight"): (0, "kv"),
    ("v_proj", "lora_B.weight"): (0, "kv"),
    ("o_proj", "lora_A.weight"): (1, "query"),
}
_COPIED_FACTORS = {
    ("gate_proj", "lora_A.weight"),
    ("up_proj", "lora_A.weight"),
    ("down_proj", "lora_B.weight"),
    ("q_proj", "lora_A.weight"),
    ("k_proj", "lora_A.weight"),
    ("v_proj", "lora_A.weight"),
    ("o_proj", "lora_B.weight"),
}


def _kept_index(plan: PruningPlan, layer: int, kind: str) -> tuple[torch.Tensor, int]:
    dims = plan.dims
    if kind == "neurons":
        return plan.mlp_kept[layer], dims.intermediate_size
    if kind == "query":
        return plan.query_channels(layer), dims.num_attention_heads * dims.head_dim
    return plan.kv_channels(layer), dims.num_key_value_heads * dims.head_dim


def _zero_fill(key: str, tensor: torch.Tensor, axis: int, index: torch.Tensor, full: int) -> torch.Tensor:
    if tensor.dim() != 2 or tensor.shape[axis] != index.numel():
        raise ValueError(
            f"{key} has shape {tuple(tensor.shape)}, but the plan keeps {index.numel()} entries on axis {axis}: the "
            "adapter was trained on a model pruned with a different plan. Pass the plan saved with this adapter."
        )
    shape = list(tensor.shape)
    shape[axis] = full
    return tensor.new_zeros(shape).index_copy_(axis, index.to(tensor.device), tensor)


def adapter_state(
    adapter: nn.Module | Mapping[str, torch.Tensor], adapter_name: str = "default"
) -> dict[str, torch.Tensor]:
    """The PEFT-format LoRA state (keys as in ``adapter_model.safetensors``) of a PeftModel or a state mapping."""
    if isinstance(adapter, nn.Module):
        if not hasattr(adapter, "peft_config"):
            raise TypeError(f"expected a PeftModel or a LoRA state dict, got {type(adapter).__name__}.")
        from peft import get_peft_model_state_dict

        return dict(get_peft_model_state_dict(adapter, adapter_name=adapter_name))
    if not isinstance(adapter, Mapping):
        raise TypeError(f"expected a PeftModel or a LoRA state dict, got {type(adapter).__name__}.")
    return dict(adapter)


def recover(
    adapter: nn.Module | Mapping[str, torch.Tensor],
    plan: PruningPlan,
    full_config: Any | None = None,
    adapter_name: str = "default",
) -> dict[str, torch.Tensor]:
    """Full-shape LoRA state dict from a LoRA trained on the model pruned with ``plan``.

    ``adapter``: a PeftModel wrapping the pruned model, or its PEFT-format state dict (``adapter_model.safetensors``
    content, keys like ``base_model.model.model.layers.3.mlp.down_proj.lora_A.weight``). ``full_config``: the full
    model's config; when given, it must match the plan's recorded dims. Returns new tensors (same dtype/device).
    """
    state = adapter_state(adapter, adapter_name)
    if full_config is not None:
        plan.check_dims(ModelDims.from_config(full_config), "full model config")
    pruned = set(plan.pruned_layers)
    recovered: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = _LORA_KEY.search(key)
        if match is None or int(match.group(1)) not in pruned:
            recovered[key] = tensor.clone()
            continue
        layer, proj, factor = int(match.group(1)), match.group(2), match.group(3)
        if (proj, factor) in _RECOVERED_AXES:
            axis, kind = _RECOVERED_AXES[proj, factor]
            index, full = _kept_index(plan, layer, kind)
            recovered[key] = _zero_fill(key, tensor, axis, index, full)
        elif (proj, factor) in _COPIED_FACTORS:
            recovered[key] = tensor.clone()
        else:
            raise ValueError(
                f"cannot recover {key}: only plain LoRA factors (lora_A.weight, lora_B.weight) are defined on a "
                "pruned layer. DoRA magnitudes and LoRA biases depend on the pruned rows in a way zero-filling does "
                "not preserve; train LoRAM adapters with use_dora=False and lora_bias=False."
            )
    return recovered


def save_recovered_adapter(
    state: Mapping[str, torch.Tensor],
    lora_config: Any,
    out_dir: str | Path,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write a standard PEFT adapter directory (adapter_config.json + adapter_model.safetensors) for the full model.

    ``lora_config``: the ``peft.LoraConfig`` the pruned adapter was trained with (ranks and targets are unchanged
    by recovery). ``PeftModel.from_pretrained(full_model, out_dir)`` loads the result.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(lora_config)
    if base_model_name_or_path is not None:
        config.base_model_name_or_path = str(base_model_name_or_path)
    config.inference_mode = True
    config.save_pretrained(str(out_dir))
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), {"format": "pt"})
    return out_dir
