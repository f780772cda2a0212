"""Shipped model configs reproduce the published parameter counts (built on the meta device)."""

import pytest
import torch

from memft.memory import list_configs, load_config
from memft.memory.estimate import CONFIG_DIR

SHIPPED = {
    "llama-2-7b", "llama-3-8b", "llama-2-70b", "gemma-2-2b", "opt-13b",
    "t5-base", "roberta-base", "bert-base", "tiny-llama",
}  # fmt: skip


def _opt_13b_count(c):
    """OPT (arXiv 2205.01068) decoder: embeddings, learned positions (+2 offset), pre-LN blocks."""
    h, f, v, n = c["hidden_size"], c["ffn_dim"], c["vocab_size"], c["num_hidden_layers"]
    per_layer = 4 * h * h + 4 * h + h * f + f + f * h + h + 4 * h
    return v * h + (c["max_position_embeddings"] + 2) * h + n * per_layer + 2 * h


# Counts as published on the model cards / papers (causal LMs with their head, encoders without head).
PUBLISHED = {
    "llama-2-7b": ("AutoModelForCausalLM", 6_738_415_616),
    "llama-3-8b": ("AutoModelForCausalLM", 8_030_261_248),
    "llama-2-70b": ("AutoModelForCausalLM", 68_976_648_192),
    "gemma-2-2b": ("AutoModelForCausalLM", 2_614_341_888),
    "t5-base": ("AutoModelForSeq2SeqLM", 222_903_552),
    "bert-base": ("AutoModel", 109_482_240),
    "roberta-base": ("AutoModel", 124_645_632),
}


def test_list_configs_names_every_shipped_file():
    assert set(list_configs()) == SHIPPED
    assert {p.stem for p in CONFIG_DIR.glob("*.json")} == SHIPPED


def test_unknown_config_names_the_known_ones():
    with pytest.raises(ValueError) as err:
        load_config("llama-9-1b")
    assert "llama-2-7b" in str(err.value) and "tiny-llama" in str(err.value)


def test_load_config_from_path_and_dict(tmp_path):
    path = tmp_path / "config.json"
    path.write_text((CONFIG_DIR / "bert-base.json").read_text())
    assert load_config(path) == load_config("bert-base")
    cfg = {"model_type": "llama", "hidden_size": 8}
    assert load_config(cfg) == cfg and load_config(cfg) is not cfg


def _count(name, auto_name):
    import transformers

    raw = load_config(name)
    model_type = raw.pop("model_type")
    raw.pop("torch_dtype", None)
    config = transformers.AutoConfig.for_model(model_type, **raw)
    with torch.device("meta"):
        model = getattr(transformers, auto_name).from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_published(name):
    auto_name, expected = PUBLISHED[name]
    assert _count(name, auto_name) == expected


def test_opt_13b_parameter_count_matches_architecture_formula():
    assert _count("opt-13b", "AutoModelForCausalLM") == _opt_13b_count(load_config("opt-13b"))


def test_tiny_llama_is_tiny():
    c = load_config("tiny-llama")
    assert 64 <= c["hidden_size"] <= 128 and 2 <= c["num_hidden_layers"] <= 4
