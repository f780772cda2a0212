import copy
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM

from memft.loram import (
    export_recovered,
    prepare_loram,
    prune,
    recover,
    save_loram_adapter,
    save_recovered_adapter,
    select_plan,
)

from tests.loram.loram_models import ALL_PROJECTIONS, tiny_model, zero_pruned_units

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_PROJECTIONS)


def _random_lora(model, seed=0):
    """LoRA with random non-zero A and B (init_lora_weights=False), scaled down to keep logits moderate."""
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **LORA))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    return peft_model.eval()


@pytest.fixture
def trained_pruned():
    """(full model, pruned LoRA model with random factors, plan): layers 1 and 2 pruned to half."""
    full = tiny_model(seed=4)
    pruned, plan = prune(copy.deepcopy(full), 0.5, "magnitude", keep_dense_layers=(1, 1))
    return full, _random_lora(pruned, seed=5), plan


def _delta_w(state, prefix, scale):
    return scale * state[f"{prefix}.lora_B.weight"] @ state[f"{prefix}.lora_A.weight"]


def test_recovered_adapter_has_the_shapes_of_a_full_model_lora(trained_pruned):
    full, pruned_lora, plan = trained_pruned
    recovered = recover(pruned_lora, plan, full.config)
    reference = get_peft_model_state_dict(get_peft_model(copy.deepcopy(full), LoraConfig(**LORA)))
    assert recovered.keys() == reference.keys()
    assert {k: v.shape for k, v in recovered.items()} == {k: v.shape for k, v in reference.items()}


def test_recovered_delta_w_is_zero_off_kept_indices_and_equal_on_them(trained_pruned):
    full, pruned_lora, plan = trained_pruned
    cfg = full.config
    pruned_state = get_peft_model_state_dict(pruned_lora)
    recovered = recover(pruned_state, plan, cfg)
    scale = LORA["lora_alpha"] / LORA["r"]
    group, hd = cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim
    for layer in range(cfg.num_hidden_layers):
        if layer not in plan.pruned_layers:
            for name in ALL_PROJECTIONS:
                parent = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
                prefix = f"base_model.model.model.layers.{layer}.{parent}.{name}"
                torch.testing.assert_close(_delta_w(recovered, prefix, scale), _delta_w(pruned_state, prefix, scale))
            continue
        neurons = plan.mlp_kept[layer].tolist()
        kv = plan.kv_heads_kept[layer].tolist()
        q_rows = [q * hd + d for q in range(cfg.num_attention_heads) if q // group in kv for d in range(hd)]
        kv_rows = [h * hd + d for h in kv for d in range(hd)]
        # (module, kept index, axis): axis 0 = output rows are pruned, axis 1 = input columns are pruned
        cases = [
            ("mlp.gate_proj", neurons, 0),
            ("mlp.up_proj", neurons, 0),
            ("mlp.down_proj", neurons, 1),
            ("self_attn.q_proj", q_rows, 0),
            ("self_attn.k_proj", kv_rows, 0),
            ("self_attn.v_proj", kv_rows, 0),
            ("self_attn.o_proj", q_rows, 1),
        ]
        for module, kept, axis in cases:
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            full_dw, pruned_dw = _delta_w(recovered, prefix, scale), _delta_w(pruned_state, prefix, scale)
            index = torch.tensor(kept)
            torch.testing.assert_close(full_dw.index_select(axis, index), pruned_dw, rtol=1e-6, atol=1e-7)
            off = torch.ones(full_dw.shape[axis], dtype=torch.bool)
            off[index] = False
            assert off.any() and not full_dw.index_select(axis, off.nonzero().squeeze(1)).any(), module


def test_zeroed_full_model_with_recovered_adapter_equals_pruned_model_with_adapter(trained_pruned, token_batch):
    """End to end: units that pruning removed contribute nothing once zeroed, and recovery adds nothing to them."""
    full, pruned_lora, plan = trained_pruned
    zeroed = copy.deepcopy(full)
    zero_pruned_units(zeroed, plan)
    full_lora = get_peft_model(zeroed, LoraConfig(**LORA)).eval()
    set_peft_model_state_dict(full_lora, recover(pruned_lora, plan, full.config))
    with torch.no_grad():
        torch.testing.assert_close(full_lora(token_batch).logits, pruned_lora(token_batch).logits, rtol=1e-5, atol=1e-5)


def test_export_writes_a_loadable_adapter_and_merged_model(trained_pruned, tmp_path, token_batch):
    full, pruned_lora, plan = trained_pruned
    full.save_pretrained(tmp_path / "full")
    tokenizer_dir = Path(__file__).resolve().parents[2] / "memft" / "assets" / "tiny-llama"
    shutil.copy2(tokenizer_dir / "tokenizer_config.json", tmp_path / "full" / "tokenizer_config.json")
    save_loram_adapter(pruned_lora, plan, tmp_path / "trained")
    result = export_recovered(tmp_path / "full", tmp_path / "trained", None, tmp_path / "out", merge=True)

    # Reference: W + (alpha/r) B A with the recovered factors, applied by hand to a copy of the full model.
    recovered = recover(pruned_lora, plan, full.config)
    manual = copy.deepcopy(full)
    with torch.no_grad():
        for name, module in manual.named_modules():
            key = f"base_model.model.{name}.lora_A.weight"
            if key in recovered:
                module.weight += _delta_w(recovered, f"base_model.model.{name}", LORA["lora_alpha"] / LORA["r"])
        expected = manual(token_batch).logits
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
        unmerged = PeftModel.from_pretrained(base, result.adapter_dir)
        merged = AutoModelForCausalLM.from_pretrained(result.merged_dir)
        torch.testing.assert_close(unmerged.eval()(token_batch).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged.eval()(token_batch).logits, expected, rtol=1e-5, atol=1e-5)
    assert (result.merged_dir / "tokenizer_config.json").is_file()
    assert not any("lora" in k for k in merged.state_dict())


def test_training_on_the_pruned_model_lowers_the_full_models_loss():
    """Train LoRA on the pruned model (task: x[t+1] = x[t] + 3 mod V), recover it: the FULL model's loss drops."""

    def batch(generator, n=8, length=16):
        start = torch.randint(0, 64, (n, 1), generator=generator)
        return (start + 3 * torch.arange(length)) % 64

    full = tiny_model(seed=0)
    peft_model, plan = prepare_loram(
        copy.deepcopy(full), 0.5, "magnitude", (1, 1), r=8, lora_alpha=16, lora_dropout=0.0
    )
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    peft_model.train()
    for _ in range(40):
        ids = batch(generator)
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    held_out = batch(torch.Generator().manual_seed(99), n=16)
    full_lora = get_peft_model(copy.deepcopy(full), LoraConfig(r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS))
    set_peft_model_state_dict(full_lora, recover(peft_model, plan, full.config))
    with torch.no_grad():
        before = full(input_ids=held_out, labels=held_out).loss.item()
        after = full_lora.eval()(input_ids=held_out, labels=held_out).loss.item()
    assert after < before - 0.5, (before, after)


def test_recovery_refuses_a_plan_that_does_not_fit(trained_pruned, tmp_path):
    full, pruned_lora, plan = trained_pruned
    other = select_plan(tiny_model(), 0.25, "random", keep_dense_layers=(1, 1))
    with pytest.raises(ValueError, match="different plan"):
        recover(pruned_lora, other, full.config)
    with pytest.raises(ValueError, match="does not match the full model config: num_hidden_layers"):
        recover(pruned_lora, plan, tiny_model(num_hidden_layers=5).config)
    state = get_peft_model_state_dict(pruned_lora)
    state["base_model.model.model.layers.1.mlp.up_proj.lora_magnitude_vector"] = torch.ones(48)
    with pytest.raises(ValueError, match="use_dora=False"):
        recover(state, plan)
    with pytest.raises(ValueError, match="not a PEFT adapter directory"):
        export_recovered(tmp_path, tmp_path, plan, tmp_path / "out")


def test_prepare_loram_refuses_dora_and_conflicting_lora_arguments():
    with pytest.raises(ValueError, match="use_dora=False"):
        prepare_loram(tiny_model(), 0.5, "random", (1, 1), use_dora=True)
    with pytest.raises(ValueError, match="not both"):
        prepare_loram(tiny_model(), 0.5, "random", (1, 1), lora_config=LoraConfig(r=2), r=4)
    with pytest.raises(ValueError, match="quantize"):
        prepare_loram(tiny_model(), 0.5, "random", (1, 1), quantize="int8")


def test_saved_recovered_state_round_trips_with_weights_only_load(trained_pruned, tmp_path):
    full, pruned_lora, plan = trained_pruned
    state = recover(pruned_lora, plan)
    torch.save(state, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    out = save_recovered_adapter(state, pruned_lora.peft_config["default"], tmp_path / "adapter", "full-model")
    assert LoraConfig.from_pretrained(str(out)).base_model_name_or_path == "full-model"
