"""Adapters as recipe `adapter` sections: LoRA (peft) and LoRAM / QLoRAM (memft.loram)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from memft.errors import RecipeError
from memft.methods.registry import Method, Section, Variant, register

_NF4_SHARDED = ("keeps frozen weights as bitsandbytes 4-bit tensors, which {engine} cannot shard; use engine ddp, "
                "or adapter.quantize none")


class NoAdapter(Section):
    name: Literal["none"] = Field("none", description="Train the model's weights directly.")


class LoRASection(Section):
    name: Literal["lora"] = Field(..., description="LoRA adapters through peft (arXiv 2106.09685).")
    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: float = Field(32.0, gt=0, description="Scale numerator: updates are scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module name suffixes that receive adapters, or 'all-linear'.")


class LoRAMSection(Section):
    name: Literal["loram"] = Field(..., description="LoRAM (arXiv 2502.13533): train LoRA on a structurally "
                                   "pruned copy of the model (QLoRAM: also NF4-quantised), recover it onto the "
                                   "full model with `memft loram export`.")
    prune_ratio: float = Field(0.5, gt=0, lt=1, description="Fraction of MLP neurons and of KV heads (with their "
                               "query groups) removed in each pruned layer.")
    prune_method: Literal["random", "magnitude", "taylor"] = Field("magnitude", description="Which units to keep: "
                                                                  "random, largest weight norm, or first-order "
                                                                  "Taylor importance on calibration batches.")
    keep_dense_layers: tuple[int, int] | list[int] = Field((4, 2), description="Layers left unpruned: (first k, "
                                                          "last k) or an explicit list of layer indices.")
    quantize: Literal["none", "nf4"] = Field("none", description="'nf4': QLoRAM, the pruned model in 4-bit NF4 "
                                             "through bitsandbytes.")
    calibration_batches: int = Field(4, ge=1, description="Training batches used to score units (taylor).")
    r: int = Field(8, ge=1, description="Adapter rank.")
    alpha: float = Field(16.0, gt=0, description="Scale numerator: updates are scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Projection names that receive adapters.")


def _apply_lora(prepared, section, calibration=None) -> None:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
                        target_modules=section.target_modules, task_type="CAUSAL_LM")
    try:
        prepared.model = get_peft_model(prepared.model, config)
    except ValueError as exc:
        raise RecipeError(f"adapter.target_modules: {exc}") from exc


def _apply_loram(prepared, section, calibration=None) -> None:
    """Prune (and quantise), then LoRA; `final/` holds the adapter and its pruning plan."""
    from memft.loram import prepare_loram, save_loram_adapter

    dense = section.keep_dense_layers
    dense = tuple(dense) if isinstance(dense, tuple) else list(dense)
    try:
        model, plan = prepare_loram(
            prepared.model, section.prune_ratio, section.prune_method, dense,
            None if section.quantize == "none" else section.quantize,
            calibration=calibration if section.prune_method == "taylor" else None,
            r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
            target_modules=list(section.target_modules))
    except ValueError as exc:  # a bad option; runtime failures (out of memory) are not recipe errors
        raise RecipeError(f"adapter (loram): {exc}") from exc
    prepared.model = model
    prepared.save_final = lambda m, directory, state_dict=None: save_loram_adapter(m, plan, directory, state_dict)
    prepared.notes.append(f"LoRAM: pruned to {sum(p.numel() for p in model.parameters()):,} parameters; recover "
                          "with `memft loram export`")


def _nf4(section) -> bool:
    return getattr(section, "quantize", "none") == "nf4"


def _loram_not_estimable(section) -> str | None:
    if _nf4(section):
        return ("adapter loram with quantize nf4 cannot be estimated yet: bitsandbytes' 4-bit parameters cannot hold "
                "fake tensors. Estimate quantize=none (the bf16 pruned model) and use "
                "memft.loram.parameter_storage_bytes for the NF4 weight bytes, or measure on a GPU with --measure.")
    return None


QLORAM = Variant("adapter loram (quantize nf4)", ("adapter.name=loram", "adapter.quantize=nf4"), _nf4,
                 {"fsdp": _NF4_SHARDED.format(engine="FSDP2"), "deepspeed": _NF4_SHARDED.format(engine="ZeRO")})

register(Method("adapter", NoAdapter))
register(Method("adapter", LoRASection, _apply_lora))
register(Method("adapter", LoRAMSection, _apply_loram, variants=(QLORAM,), not_estimable=_loram_not_estimable))
