import pytest
import torch
from transformers import LlamaConfig

from memft.loram import parameter_storage_bytes, prune

from tests.loram.loram_models import tiny_model


def test_meta_count_equals_the_real_pruned_models_bytes():
    model, plan = prune(tiny_model(seed=2), 0.6, "random", keep_dense_layers=(1, 1))
    real = sum(p.numel() * p.element_size() for p in model.parameters())
    by_plan = parameter_storage_bytes(model.config, plan, dtype=torch.float32)
    by_ratio = parameter_storage_bytes(model.config, 0.6, keep_dense_layers=(1, 1), dtype=torch.float32)
    assert by_plan.total_bytes == by_ratio.total_bytes == real
    assert by_plan.parameter_count == sum(p.numel() for p in model.parameters())
    full = parameter_storage_bytes(model.config, dtype=torch.bfloat16)
    assert full.total_bytes == 2 * sum(p.numel() for p in tiny_model().parameters())
    with pytest.raises(ValueError, match="quantize"):
        parameter_storage_bytes(model.config, 0.5, "int4")


def test_llama2_70b_at_ratio_085_matches_the_paper_accounting():
    """LLaMA-2-70B, layers 4..77 pruned at 0.85 (4300 of 28672 neurons, 2 of 8 KV heads with their 16 query heads)."""
    config = LlamaConfig(
        hidden_size=8192,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        intermediate_size=28672,
        vocab_size=32000,
    )
    hidden, head_dim = 8192, 128

    def layer_params(kv_heads, neurons):
        attention = hidden * head_dim * (2 * kv_heads * 8 + 2 * kv_heads)  # q and o: 8 query heads per KV head
        return attention + 3 * hidden * neurons + 2 * hidden

    full = 2 * 32000 * hidden + hidden + 80 * layer_params(8, 28672)
    pruned = 2 * 32000 * hidden + hidden + 6 * layer_params(8, 28672) + 74 * layer_params(2, 4300)
    report = parameter_storage_bytes(config, 0.85, keep_dense_layers=(4, 2))
    assert report.parameter_count == pruned
    assert report.total_bytes == 2 * pruned
    # The paper's figure: 16-bit parameters of the full model over 4-bit parameters of the pruned one.
    assert round(4 * full / pruned, 2) == 16.95
