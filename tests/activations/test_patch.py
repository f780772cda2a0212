"""compress_activations: bit-exact forward, what it changes, undo, checkpointing, compile refusal, fake tensors."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from memft.activations import compress_activations
from tests.activations.conftest import saved_bytes, tiny_bert, tiny_llama

METHODS = [("mesa", {}), ("wta_crs", {"others": "mesa"}), ("s2a", {})]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("method", "options"), METHODS)
def test_forward_is_bit_exact_and_backward_runs(method: str, options: dict, dtype: torch.dtype, tokens) -> None:
    for build in (tiny_llama, tiny_bert):
        model = build(dtype)
        reference = model(tokens).logits
        handle = compress_activations(model, method, **options)
        out = model(tokens).logits
        assert torch.equal(out, reference), (method, build.__name__)
        out.float().square().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        handle.undo()


def test_dropout_masks_match_functional_dropout_bit_for_bit(tokens) -> None:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        vocab_size=256, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3,
                        attn_implementation="eager")
    model = BertForMaskedLM(config).train()
    torch.manual_seed(7)
    reference = model(tokens).logits
    reference.sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # ratio 1: Linear and attention exact, masks 1-bit; norms (exact up to rounding) are tested in test_norms.py
    handle = compress_activations(model, "wta_crs", ratio=1.0, targets=("linear", "dropout", "attention"))
    assert "dropout" in {c.kind for c in handle.changes}
    torch.manual_seed(7)
    out = model(tokens).logits
    assert torch.equal(out, reference)
    out.sum().backward()
    for p, g in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
    base = saved_bytes(model, lambda: model(tokens).logits)
    handle.undo()
    assert base < saved_bytes(model, lambda: model(tokens).logits)


def test_handle_lists_changes_by_kind() -> None:
    model = tiny_llama()
    handle = compress_activations(model, "mesa")
    kinds = {c.name: c.kind for c in handle.changes}
    assert kinds["model.layers.0.self_attn.q_proj"] == "linear"
    assert kinds["model.layers.0.mlp.act_fn"] == "activation"
    assert kinds["model.layers.1.input_layernorm"] == "norm"
    assert kinds["model.layers.0.self_attn"] == "attention"
    assert kinds["lm_head"] == "linear"
    assert "model.layers.0.self_attn.q_proj" in handle.names("linear")
    assert "mesa" in handle.summary()
    handle.undo()
    only = compress_activations(model, "mesa", targets=("norm",), exclude=("model.norm",))
    assert set(c.kind for c in only.changes) == {"norm"} and "model.norm" not in only.names()
    only.undo()


def test_undo_restores_the_model_exactly(tokens) -> None:
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    baseline_bytes = saved_bytes(model, lambda: model(tokens, labels=tokens).loss)
    reference = model(tokens).logits
    handle = compress_activations(model, "mesa")
    compressed_bytes = saved_bytes(model, lambda: model(tokens, labels=tokens).loss)
    assert compressed_bytes < 0.5 * baseline_bytes
    with pytest.raises(ValueError, match="already compressed"):
        compress_activations(model, "s2a")
    model(tokens, labels=tokens).loss.backward()
    handle.undo()
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(tokens).logits, reference)
    assert saved_bytes(model, lambda: model(tokens, labels=tokens).loss) == baseline_bytes
    compress_activations(model, "s2a").undo()  # can compress again


def test_undo_keeps_an_existing_instance_forward() -> None:
    layer = nn.Linear(8, 8)
    wrapped = layer.forward
    layer.forward = lambda x: wrapped(x) * 1.0  # e.g. accelerate's hooks set an instance forward
    custom = layer.forward
    handle = compress_activations(nn.Sequential(layer), "mesa")
    assert layer.forward is not custom
    handle.undo()
    assert layer.forward is custom


def test_refuses_torch_compile(monkeypatch, tokens) -> None:
    model = tiny_llama()
    with pytest.raises(ValueError, match="torch.compile"):
        compress_activations(torch.compile(model), "mesa")
    handle = compress_activations(model, "mesa")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(ValueError, match="torch.compile"):
        model(tokens)
    monkeypatch.undo()
    handle.undo()


def test_bad_arguments() -> None:
    model = tiny_llama()
    with pytest.raises(ValueError, match="method"):
        compress_activations(model, "int8")
    with pytest.raises(ValueError, match="targets"):
        compress_activations(model, "mesa", targets=("conv",))
    with pytest.raises(ValueError, match="bits"):
        compress_activations(model, "mesa", bits=3)
    with pytest.raises(ValueError, match="ratio"):
        compress_activations(model, "wta_crs", ratio=0.0)
    with pytest.raises(ValueError, match="others"):
        compress_activations(model, "wta_crs", others="zip")
    with pytest.raises(ValueError, match="bits"):
        compress_activations(model, "s2a", bits=3)
    with pytest.raises(TypeError):
        compress_activations("model", "mesa")  # type: ignore[arg-type]
    assert not any("forward" in m.__dict__ for m in model.modules())


def _grads(method: str, checkpoint: str | None, tokens: torch.Tensor, **options) -> dict[str, torch.Tensor]:
    model = tiny_llama().train()
    if checkpoint is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpoint == "reentrant"})
        model.enable_input_require_grads()
    handle = compress_activations(model, method, **options)
    for seed in (11, 12):  # second step: EMA ranges / gradient-norm estimates are in use
        model.zero_grad()
        torch.manual_seed(seed)
        model(tokens, labels=tokens).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    handle.undo()
    return grads


@pytest.mark.parametrize(("method", "options"), [("mesa", {}), ("wta_crs", {"others": "s2a"})])
def test_non_reentrant_checkpointing_recomputes_the_same_compression(method: str, options: dict, tokens) -> None:
    plain = _grads(method, None, tokens, **options)
    checkpointed = _grads(method, "non_reentrant", tokens, **options)
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_reentrant_checkpointing_gives_close_gradients(tokens) -> None:
    model = tiny_llama()
    model(tokens, labels=tokens).loss.backward()
    exact = {n: p.grad.clone() for n, p in model.named_parameters()}
    approx = _grads("mesa", "reentrant", tokens)
    for name, g in exact.items():
        assert (approx[name] - g).norm() <= 0.1 * g.norm(), name


def test_handle_state_round_trips_through_weights_only_load(tokens) -> None:
    model = tiny_llama()
    handle = compress_activations(model, "wta_crs", others="mesa")
    model(tokens, labels=tokens).loss.backward()
    state = handle.state_dict()
    assert state and all(isinstance(v, torch.Tensor) for entry in state.values() for v in entry.values())
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    handle.undo()
    fresh = compress_activations(model, "wta_crs", others="mesa")
    model(tokens)  # creates the attention sites
    fresh.load_state_dict(loaded)
    for key, entry in fresh.state_dict().items():
        for name, value in entry.items():
            assert torch.equal(value, state[key][name])
    with pytest.raises(ValueError, match="sites"):
        fresh.load_state_dict({"nowhere": {}})
    fresh.undo()


@pytest.mark.parametrize("method", ["mesa", "wta_crs", "s2a"])
def test_runs_under_fake_tensor_mode(method: str) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = tiny_llama()
        handle = compress_activations(model, method)
        ids = torch.randint(0, 256, (2, 16))
        loss = model(ids, labels=ids).loss
        loss.backward()
        assert model.lm_head.weight.grad.shape == model.lm_head.weight.shape
        handle.undo()


def test_peft_lora_inner_layers_are_compressed(tokens) -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    reference = model(input_ids=tokens).logits
    handle = compress_activations(model, "wta_crs", others="mesa")
    names = handle.names("linear")
    assert any(n.endswith("q_proj.lora_A.default") for n in names)
    assert any(n.endswith("q_proj.base_layer") for n in names)
    assert torch.equal(model(input_ids=tokens).logits, reference)
    model(input_ids=tokens, labels=tokens).loss.backward()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    handle.undo()
    assert torch.equal(model(input_ids=tokens).logits, reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("method", "options"), METHODS)
def test_cuda_forward_bit_exact_with_dropout_and_gradients_close(method: str, options: dict) -> None:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        vocab_size=256, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2,
                        attn_implementation="eager")
    model = BertForMaskedLM(config).cuda().train()
    tokens = torch.randint(0, 256, (4, 32), device="cuda")
    torch.manual_seed(3)
    reference = model(tokens, labels=tokens)
    reference.loss.backward()
    exact = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    handle = compress_activations(model, method, **options)
    torch.manual_seed(3)
    out = model(tokens, labels=tokens)
    assert torch.equal(out.logits, reference.logits)
    out.loss.backward()
    error = sum(float((p.grad - exact[n]).norm() ** 2) for n, p in model.named_parameters()) ** 0.5
    norm = sum(float(g.norm() ** 2) for g in exact.values()) ** 0.5
    assert error < (0.1 if method != "wta_crs" else 2.0) * norm
    handle.undo()
