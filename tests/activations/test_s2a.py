"""S2A (arXiv 2503.08154): derivative tables, per-element gradient bound, 4-bit storage, parametric modes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from memft.activations import apply_parametric, compress_activations
from memft.activations.s2a import DERIVATIVES, derivative_levels
from tests.activations.conftest import saved_bytes, tiny_bert, tiny_llama


@pytest.mark.parametrize("function", sorted(DERIVATIVES))
def test_derivative_table_bounds_the_error_everywhere(function: str) -> None:
    table = derivative_levels(function)
    assert table.levels.shape == (16,) and table.boundaries.shape == (15,)
    assert bool((table.levels[1:] > table.levels[:-1]).all())
    x = torch.cat([torch.randn(20_000, dtype=torch.float64) * 3, torch.linspace(-50, 50, 20_001, dtype=torch.float64)])
    slope = DERIVATIVES[function](x)
    level = table.levels.double()[torch.bucketize(slope.float(), table.boundaries)]
    assert float((level - slope).abs().max()) <= table.max_error + 1e-6
    # the Lloyd-Max levels beat 16 evenly spaced levels over the range of f' in Gaussian-weighted error
    grid = torch.linspace(-9, 9, 6001, dtype=torch.float64)
    weights = torch.exp(-0.5 * grid**2)
    weights /= weights.sum()
    values = DERIVATIVES[function](grid)
    even = torch.linspace(float(values.min()), float(values.max()), 16, dtype=torch.float64)
    even_error = (weights * (values[:, None] - even).abs().min(1).values ** 2).sum().sqrt()
    assert table.weighted_rms_error < float(even_error)


ACTIVATIONS = [
    (nn.GELU(), "gelu"),
    (nn.GELU(approximate="tanh"), "gelu_tanh"),
    (nn.SiLU(), "silu"),
]


def _transformers_activations() -> list[tuple[nn.Module, str]]:
    from transformers.activations import GELUActivation, NewGELUActivation, QuickGELUActivation, SiLUActivation

    return [(GELUActivation(), "gelu"), (NewGELUActivation(), "gelu_tanh"), (QuickGELUActivation(), "quick_gelu"),
            (SiLUActivation(), "silu")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonlinearity_gradient_bound_and_4bit_storage(dtype: torch.dtype) -> None:
    for act, function in ACTIVATIONS + _transformers_activations():
        x = (torch.randn(2, 9, 37) * 2).to(dtype).requires_grad_()  # odd element count: 666
        g = torch.randn(2, 9, 37).to(dtype)
        y = act(x)
        exact = torch.autograd.grad(y, x, g)[0]
        bf16_bytes = x.numel() * 2
        handle = compress_activations(nn.Sequential(act), "s2a")
        assert handle.changes[0].kind == "activation"
        assert saved_bytes(None, lambda: act(x)) == math.ceil(x.numel() / 2)  # 4 bits per element
        assert bf16_bytes / math.ceil(x.numel() / 2) >= 3.5
        out = act(x)
        assert torch.equal(out, y)
        approx = torch.autograd.grad(out, x, g)[0]
        bound = g.float().abs() * derivative_levels(function).max_error
        slack = 1e-5 if dtype == torch.float32 else 2e-2 * g.float().abs() * 1.2
        assert bool(((approx.float() - exact.float()).abs() <= bound + slack).all()), type(act).__name__
        handle.undo()


def test_relu_is_exact_with_one_bit() -> None:
    act = nn.ReLU()
    x = torch.randn(3, 50, requires_grad=True)
    handle = compress_activations(nn.Sequential(act), "s2a")
    assert saved_bytes(None, lambda: act(x)) == math.ceil(150 / 8)
    grad = torch.autograd.grad(act(x).sum(), x)[0]
    assert torch.equal(grad, (x > 0).float())
    handle.undo()


def test_softmax_is_stored_at_4_bits_per_row(tokens) -> None:
    class ToyAttention(nn.Module):
        def forward(self, s: torch.Tensor) -> torch.Tensor:
            return nn.functional.softmax(s, dim=-1)

    attention = ToyAttention()
    scores = torch.randn(2, 3, 8, 10, requires_grad=True)
    handle = compress_activations(nn.Sequential(attention), "s2a")
    rows = 2 * 3 * 8
    assert saved_bytes(None, lambda: attention(scores)) == math.ceil(rows * 10 / 2) + rows * 2 * 4
    probs = attention(scores)
    g = torch.randn_like(probs)
    approx = torch.autograd.grad(probs, scores, g)[0]
    handle.undo()
    exact = torch.autograd.grad(attention(scores), scores, g)[0]
    # |p~ - p| < (row max - row min) / 15 per element; the softmax VJP is Lipschitz in p
    assert float((approx - exact).norm()) < 0.15 * float(exact.norm())


def test_model_nonlinearities_shrink_4x_against_bf16(tokens) -> None:
    # activation inputs: 2 layers x (tokens x intermediate 128); BERT's MLM head adds one of width 64
    for build, elements in ((tiny_llama, 2 * 32 * 128), (tiny_bert, 2 * 32 * 128 + 32 * 64)):
        model = build(torch.bfloat16)
        handle = compress_activations(model, "s2a", targets=("activation",))
        compressed = saved_bytes(model, lambda: model(tokens).logits)
        handle.undo()
        base = saved_bytes(model, lambda: model(tokens).logits)
        assert base - compressed == 2 * elements - elements // 2, build.__name__  # bf16 -> 4 bits


def test_bias_mode_trains_biases_and_norms_and_saves_no_linear_input(tokens) -> None:
    model = tiny_bert()
    step = lambda: model(tokens, labels=tokens).loss  # noqa: E731
    full = saved_bytes(model, step)
    handle = apply_parametric(model, "bias")
    trainable = handle.trainable
    assert trainable and all(n.endswith("bias") or "LayerNorm" in n for n in trainable)
    assert any("LayerNorm.weight" in n for n in trainable)
    bias_only = saved_bytes(model, step)
    assert bias_only < 0.75 * full
    model(tokens, labels=tokens).loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
    handle.undo()
    assert all(p.requires_grad for p in model.parameters())
    assert saved_bytes(model, step) == full


def test_side_mode_starts_as_the_backbone_and_trains_only_the_side(tokens) -> None:
    model = tiny_llama()
    reference = model(tokens).logits
    full = saved_bytes(model, lambda: model(tokens, labels=tokens).loss)
    handle = apply_parametric(model, "side", reduction=4)
    assert handle.side is not None and all(n.startswith("memft_side.") for n in handle.trainable)
    assert torch.equal(model(tokens).logits, reference)
    side_bytes = saved_bytes(model, lambda: model(tokens, labels=tokens).loss)
    assert side_bytes < 0.5 * full
    model(tokens, labels=tokens).loss.backward()
    assert model.memft_side.up.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("memft_side."))
    handle.undo()
    assert not hasattr(model, "memft_side")
    assert torch.equal(model(tokens).logits, reference)


def test_parametric_bad_arguments() -> None:
    model = tiny_llama()
    with pytest.raises(ValueError, match="mode"):
        apply_parametric(model, "prompt")
    with pytest.raises(ValueError, match="head"):
        apply_parametric(model, "side", head="nowhere")
    assert all(p.requires_grad for p in model.parameters())
