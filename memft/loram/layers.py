"""Access to the decoder layers and projections of a Llama-family Hugging Face model."""

from __future__ import annotations

from torch import nn

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``ModuleList`` of decoder layers of a ``*ForCausalLM``, a bare ``*Model`` or a PEFT wrapper of either."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(
            f"{type(model).__name__} has no decoder layer list at .model.layers or .layers; LoRAM pruning needs a "
            "Llama-family model (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)."
        )
    return layers


def model_config(model: nn.Module):
    """The Hugging Face config of ``model`` (unwrapping PEFT)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no .config; pass a Hugging Face PreTrainedModel.")
    return config


def projection(layer: nn.Module, name: str) -> nn.Module:
    """``layer.self_attn.<name>`` or ``layer.mlp.<name>``."""
    parent = layer.self_attn if name in ATTENTION_PROJECTIONS else layer.mlp
    return getattr(parent, name)
