"""Tiny models and a saved-for-backward byte counter shared by the activation-compressor tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn


def saved_bytes(model: nn.Module | None, step: Callable[[], torch.Tensor]) -> int:
    """Bytes of distinct storages autograd saves during ``step()`` (parameters excluded), counted by hooks."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()} if model is not None else set()
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and not isinstance(t, nn.Parameter):
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    del out
    return sum(storages.values())


def tiny_llama(dtype: torch.dtype = torch.float32, seed: int = 0, layers: int = 2) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=256,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config)
    return model if dtype == torch.float32 else model.to(dtype)


def tiny_bert(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=256,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    model = BertForMaskedLM(config)
    return model if dtype == torch.float32 else model.to(dtype)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
