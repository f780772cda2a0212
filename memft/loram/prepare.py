"""One-call LoRAM / QLoRAM set-up (arXiv 2502.13533): prune, optionally quantise to NF4, wrap with LoRA."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .plan import DenseLayers, PruningPlan
from .prune import prune
from .quantize import QUANTIZE_CHOICES, quantize_nf4
from .scores import Batch

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# LoRA hyper-parameters of the LoRAM reference training script (r=8, alpha=16, dropout=0.05, all projections).
_DEFAULT_LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": list(DEFAULT_TARGET_MODULES)}


def _lora_config(lora_config: Any, lora_kwargs: dict[str, Any]):
    from peft import LoraConfig

    if lora_config is not None and lora_kwargs:
        raise ValueError(
            f"pass either lora_config or LoRA keyword arguments ({sorted(lora_kwargs)}), not both; put the keywords "
            "into the LoraConfig."
        )
    config = lora_config or LoraConfig(task_type="CAUSAL_LM", **{**_DEFAULT_LORA, **lora_kwargs})
    if getattr(config, "use_dora", False) or getattr(config, "lora_bias", False):
        raise ValueError(
            "LoRAM recovery is defined for plain LoRA factors only: set use_dora=False and lora_bias=False (DoRA "
            "magnitudes and LoRA biases cannot be zero-filled onto the full model without changing their meaning)."
        )
    return config


def prepare_loram(
    model: nn.Module,
    prune_ratio: float,
    prune_method: str = "random",
    keep_dense_layers: DenseLayers = (4, 2),
    quantize: str | None = None,
    *,
    calibration: Iterable[Batch] | None = None,
    seed: int = 0,
    attention_ratio: float | None = None,
    compute_dtype: torch.dtype | None = None,
    double_quant: bool = True,
    lora_config: Any = None,
    **lora_kwargs: Any,
) -> tuple[nn.Module, PruningPlan]:
    """Prune ``model`` in place (:func:`memft.loram.prune`), quantise it (``quantize="nf4"``: QLoRAM) and add LoRA.

    Returns ``(peft_model, plan)``. Train ``peft_model`` as usual, then save it with :func:`save_loram_adapter` and
    recover it for the full model with :func:`memft.loram.export_recovered`. LoRA settings come from
    ``lora_config`` (a ``peft.LoraConfig``) or keyword arguments (defaults: r=8, lora_alpha=16, lora_dropout=0.05,
    all seven projections, as in the LoRAM reference).
    """
    from peft import get_peft_model

    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}.")
    config = _lora_config(lora_config, lora_kwargs)
    model, plan = prune(model, prune_ratio, prune_method, keep_dense_layers, calibration, seed, attention_ratio)
    if quantize == "nf4":
        quantize_nf4(model, compute_dtype=compute_dtype, double_quant=double_quant)
    return get_peft_model(model, config), plan


def save_loram_adapter(peft_model: nn.Module, plan: PruningPlan, out_dir: str | Path,
                       state_dict: dict | None = None) -> Path:
    """Save the trained pruned-model adapter and its plan side by side (input of ``export_recovered(plan=None)``).
    ``state_dict``: the model's full weights when they are sharded across processes (FSDP)."""
    out_dir = Path(out_dir)
    peft_model.save_pretrained(str(out_dir), state_dict=state_dict)
    plan.save(out_dir)
    return out_dir
