"""QLoRAM on CPU: the installed bitsandbytes (>= 0.46) has a CPU 4-bit backend, so NF4 runs here."""

import copy

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from memft.loram import nf4_bytes, parameter_storage_bytes, prepare_loram, prune, quantize_nf4, recover  # noqa: E402

from tests.loram.loram_models import ALL_PROJECTIONS, tiny_model  # noqa: E402


def _dequantized_copy(plain, quantized):
    """The plain pruned model with every NF4 weight replaced by bitsandbytes' dequantisation of its codes."""
    reference = copy.deepcopy(plain)
    q_modules = dict(quantized.named_modules())
    with torch.no_grad():
        for name, module in reference.named_modules():
            q = q_modules.get(name)
            if isinstance(q, bnb.nn.Linear4bit):
                module.weight.copy_(bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state))
    return reference


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_model_equals_its_dequantized_reference(double_quant, token_batch):
    pruned, _ = prune(tiny_model(seed=3), 0.5, "magnitude", keep_dense_layers=(1, 1))
    quantized = quantize_nf4(copy.deepcopy(pruned), double_quant=double_quant)
    layers = quantized.model.layers
    assert all(isinstance(getattr(l.self_attn, n), bnb.nn.Linear4bit) for l in layers for n in ("q_proj", "o_proj"))
    assert all(isinstance(getattr(l.mlp, n), bnb.nn.Linear4bit) for l in layers for n in ("gate_proj", "down_proj"))
    assert type(quantized.lm_head) is torch.nn.Linear
    reference = _dequantized_copy(pruned, quantized)
    for (name, w), w_ref in zip(pruned.named_parameters(), reference.parameters()):
        if "proj" in name:
            # memft quantised this very weight: its codes decode as bitsandbytes' own NF4 of the weight does.
            codes, state = bnb.functional.quantize_4bit(w.detach(), blocksize=64, quant_type="nf4",
                                                        compress_statistics=double_quant)
            torch.testing.assert_close(w_ref, bnb.functional.dequantize_4bit(codes, state), rtol=0, atol=0)
            # NF4 keeps each weight within its block's quantisation error. (bitsandbytes' CPU kernel on some
            # CPUs quantises rows whose length is not a multiple of the block, here the 96 columns of
            # down_proj, with about 2.6x that error; the bound is checked where rows fill whole blocks.)
            if w.shape[-1] % 64 == 0:
                assert (w - w_ref).norm() < 0.15 * w.norm(), name
    with torch.no_grad():
        torch.testing.assert_close(quantized(token_batch).logits, reference(token_batch).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("double_quant", [True, False])
def test_storage_accounting_equals_bitsandbytes_bytes(double_quant):
    model = tiny_model(seed=1, intermediate_size=100)  # 100 * 128 = 12800 weights: 200 NF4 blocks
    model, plan = prune(model, 0.3, "random", keep_dense_layers=(1, 0))
    quantize_nf4(model, double_quant=double_quant)
    actual = 0
    for param in model.parameters():
        actual += param.numel() * param.element_size()
        state = getattr(param, "quant_state", None)
        if state is None:
            continue
        tensors = [state.absmax, state.code]  # bitsandbytes keeps a private code-book copy per weight
        if state.nested:
            tensors += [state.state2.absmax, state.state2.code, state.offset]
        constant_bytes = sum(t.numel() * t.element_size() for t in tensors)
        actual += constant_bytes
        assert nf4_bytes(state.shape.numel(), double_quant) == (param.numel() * param.element_size(), constant_bytes)
    predicted = parameter_storage_bytes(model.config, plan, "nf4", dtype=torch.float32, double_quant=double_quant)
    assert predicted.total_bytes == actual


def test_qloram_trains_and_recovers_to_full_shapes():
    full = tiny_model(seed=0)
    peft_model, plan = prepare_loram(
        copy.deepcopy(full), 0.5, "magnitude", (1, 1), quantize="nf4", r=4, lora_dropout=0.0
    )
    assert isinstance(peft_model.base_model.model.model.layers[1].mlp.down_proj.base_layer, bnb.nn.Linear4bit)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = (torch.arange(8)[:, None] + 3 * torch.arange(16)) % 64
    losses = []
    for _ in range(12):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    state = recover(peft_model, plan, full.config)
    assert state["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (4, 96)
    assert state["base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight"].shape == (128, 4)
    assert all(name.split(".")[-3] in ALL_PROJECTIONS for name in state)


def test_missing_4bit_backend_gives_a_clear_error(monkeypatch):
    def no_backend(*args, **kwargs):
        raise NotImplementedError("no kernel")

    monkeypatch.setattr(bnb.functional, "quantize_4bit", no_backend)
    with pytest.raises(RuntimeError, match="cannot quantise to 4-bit NF4 on device cpu"):
        quantize_nf4(tiny_model())
