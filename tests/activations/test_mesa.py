"""Mesa (arXiv 2111.11124): exact saved bytes, gradient error bound, EMA ranges, saturation, dtypes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from memft.activations import compress_activations
from memft.kernels.quant import group_min_max
from tests.activations.conftest import saved_bytes, tiny_bert, tiny_llama


def _x(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(2, 8, 128, generator=gen) * torch.linspace(0.1, 4.0, 128)).to(dtype).requires_grad_()


def _grads(layer: nn.Linear, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.detach().requires_grad_()
    y = layer(x)
    y.backward(g)
    out = (y.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone())
    layer.zero_grad()
    return out


def test_linear_saves_exactly_the_packed_bytes() -> None:
    layer = nn.Linear(128, 32)
    x = _x()
    handle = compress_activations(nn.Sequential(layer), "mesa")
    # 8-bit codes for 2*8*128 values + fp32 scale and offset for 128/64 = 2 channel groups
    assert saved_bytes(layer, lambda: layer(x)) == 2 * 8 * 128 + 2 * 2 * 4
    handle.undo()
    assert saved_bytes(layer, lambda: layer(x)) == 2 * 8 * 128 * 4


class ToyAttention(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v


def test_attention_operands_and_softmax_are_8bit_per_head() -> None:
    attention = ToyAttention()
    q, k, v = (torch.randn(2, 3, 8, 16, requires_grad=True) for _ in range(3))
    handle = compress_activations(nn.Sequential(attention), "mesa")
    assert [c.kind for c in handle.changes] == ["attention"]
    heads = 3 * 2 * 4  # fp32 scale + offset per head
    operand, probs = 2 * 3 * 8 * 16 + heads, 2 * 3 * 8 * 8 + heads
    # q, k^T, softmax output, softmax output as matmul operand, v
    assert saved_bytes(None, lambda: attention(q, k, v)) == 3 * operand + 2 * probs
    out = attention(q, k, v)
    reference = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
    assert torch.equal(out, reference)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    exact = torch.autograd.grad(reference.square().sum(), (q, k, v))
    for got, want in zip(grads, exact):
        assert (got - want).norm() <= 0.05 * want.norm()
    handle.undo()


def test_linear_weight_gradient_error_bound() -> None:
    """||dW~ - dW||_F <= ||dY||_F * ||x~ - x||_F with |x~ - x| <= s/2 per element (nearest rounding)."""
    torch.manual_seed(0)
    layer = nn.Linear(128, 32)
    x, g = _x(), torch.randn(2, 8, 32)
    y, gx, gw, gb = _grads(layer, x, g)
    handle = compress_activations(nn.Sequential(layer), "mesa", rounding="nearest")
    y2, gx2, gw2, gb2 = _grads(layer, x, g)
    assert torch.equal(y, y2)
    torch.testing.assert_close(gx2, gx, rtol=1e-6, atol=1e-6)  # grad-input is exact
    torch.testing.assert_close(gb2, gb, rtol=1e-6, atol=1e-6)  # grad-bias is exact
    lo, hi = group_min_max(x, -1, 64)
    step = ((hi - lo) / 255).repeat_interleave(64)  # per channel
    x_error_bound = math.sqrt(float((step / 2).square().sum()) * 2 * 8)
    bound = float(g.norm()) * x_error_bound
    error = float((gw2 - gw).norm())
    assert 0 < error <= bound * 1.001, (error, bound)
    handle.undo()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradients_are_close(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(128, 32).to(dtype)
    x, g = _x(dtype), torch.randn(2, 8, 32).to(dtype)
    y, _, gw, _ = _grads(layer, x, g)
    handle = compress_activations(nn.Sequential(layer), "mesa")
    y2, _, gw2, _ = _grads(layer, x, g)
    assert torch.equal(y, y2) and gw2.dtype == dtype
    assert float((gw2.float() - gw.float()).norm()) <= 0.02 * float(gw.float().norm())
    handle.undo()


def test_ema_ranges_update_after_backward_and_saturate_without_wrapping() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 8)
    handle = compress_activations(nn.Sequential(layer), "mesa", rounding="nearest", momentum=0.9)
    tracker = handle._trackers["0"]
    x1 = torch.rand(1, 4, 64) * 2 - 1
    out = layer(x1)
    assert tracker.lo is None  # nothing committed before backward
    out.sum().backward()
    lo1, hi1 = group_min_max(x1, -1, 64)
    assert torch.equal(tracker.lo, lo1) and torch.equal(tracker.hi, hi1)
    x2 = x1 * 3
    layer(x2).sum().backward()
    lo2, hi2 = group_min_max(x2, -1, 64)
    torch.testing.assert_close(tracker.lo, 0.9 * lo1 + 0.1 * lo2)
    torch.testing.assert_close(tracker.hi, 0.9 * hi1 + 0.1 * hi2)

    # a value far above the tracked range is stored as the top of the range used for this batch
    x3 = x1.clone()
    x3[0, 0, 0] = 1000.0
    lo_used = 0.9 * tracker.lo + 0.1 * x3.min()
    hi_used = 0.9 * tracker.hi + 0.1 * x3.max()
    step = float((hi_used - lo_used) / 255)
    layer.zero_grad()
    layer(x3).backward(torch.ones(1, 4, 8))
    expected = float(hi_used) + float(x3[0, 1:, 0].sum())
    wrapped_code = math.floor((1000.0 - float(lo_used)) / step + 0.5) % 256  # what modulo-256 storage gives
    wrapped = float(lo_used) + wrapped_code * step + float(x3[0, 1:, 0].sum())
    assert abs(expected - wrapped) > 10 * step
    assert layer.weight.grad[:, 0] == pytest.approx([expected] * 8, abs=2 * step)
    handle.undo()


@pytest.mark.parametrize(("dtype", "limit"), [(torch.float32, 0.45), (torch.bfloat16, 0.6)])
def test_model_saved_bytes_shrink(dtype: torch.dtype, limit: float, tokens) -> None:
    for build in (tiny_llama, tiny_bert):
        model = build(dtype)
        base = saved_bytes(model, lambda: model(tokens).logits)
        handle = compress_activations(model, "mesa")
        compressed = saved_bytes(model, lambda: model(tokens).logits)
        assert compressed <= limit * base, (build.__name__, compressed / base)
        handle.undo()
