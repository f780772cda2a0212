"""Tiny Llama-family models and an independent reference for LoRAM pruning: zeroing the pruned units in place."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_config(model_type: str = "llama", **overrides):
    """4 layers, 8 query heads over 4 KV heads (GQA, group 2), head_dim 16, MLP width 96."""
    base = dict(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=16,
        intermediate_size=96,
        vocab_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    base.update(overrides)
    return CONFIGS[model_type](**base)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)).eval()


def zero_pruned_units(model, plan) -> None:
    """Reference: in the FULL model, zero the output side of every pruned unit (written without memft's code).

    MLP neuron j removed -> column j of down_proj is zero; KV head h removed -> o_proj columns of every query head
    q with q // group == h are zero. A zeroed unit then adds nothing to the residual stream.
    """
    cfg = model.config
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    head_dim = cfg.head_dim
    with torch.no_grad():
        for i in plan.pruned_layers:
            layer = model.model.layers[i]
            kept_neurons = set(plan.mlp_kept[i].tolist())
            for j in range(cfg.intermediate_size):
                if j not in kept_neurons:
                    layer.mlp.down_proj.weight[:, j] = 0
            kept_kv = set(plan.kv_heads_kept[i].tolist())
            for q in range(cfg.num_attention_heads):
                if q // group not in kept_kv:
                    layer.self_attn.o_proj.weight[:, q * head_dim : (q + 1) * head_dim] = 0


def token_batch() -> torch.Tensor:
    """Two fixed random sequences of 12 tokens."""
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
