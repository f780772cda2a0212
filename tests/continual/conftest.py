"""Fixtures for the continual-learning tests: the bundled tiny Llama, its tokenizer, a from-scratch
micro Llama for unit tests."""

from __future__ import annotations

import pytest
import torch

from memft.train.models import resolve_model_path


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path("memft:tiny-llama"))


@pytest.fixture(scope="session")
def load_tiny():
    """A function returning a fresh copy of the pretrained bundled tiny Llama."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path("memft:tiny-llama")

    def load():
        return AutoModelForCausalLM.from_pretrained(path)

    return load


@pytest.fixture(scope="session")
def micro_llama():
    """A function returning a randomly initialised 2-layer Llama (hidden 32, vocab 64) for unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(seed: int = 0):
        torch.manual_seed(seed)
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, pad_token_id=0)
        return LlamaForCausalLM(config)

    return build
