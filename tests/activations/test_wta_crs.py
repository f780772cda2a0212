"""WTA-CRS (arXiv 2305.15265): unbiasedness by Monte Carlo, variance against CRS, saved bytes, sharing, LoRA."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from memft.activations import compress_activations
from memft.activations.state import GradNormTracker
from memft.activations.wta_crs import row_probabilities, sample_count, wta_crs_plan
from tests.activations.conftest import saved_bytes, tiny_llama


def _case(kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (n, 5), dL/dy (n, 3) and the sampling distribution p (n,) of one scenario."""
    gen = torch.Generator().manual_seed(0)
    n = 40
    x, g = torch.randn(n, 5, generator=gen), torch.randn(n, 3, generator=gen)
    if kind == "concentrated":
        x[:3] *= 20
        p = row_probabilities(x.norm(dim=1), g.norm(dim=1))
    elif kind == "flat":
        x = x / x.norm(dim=1, keepdim=True)  # equal norms, no gradient estimate: uniform p
        p = row_probabilities(x.norm(dim=1), None)
    elif kind == "zero_cached_norms":
        tracker = GradNormTracker()
        tracker.ema = torch.zeros(n)  # e.g. an estimate gathered while the loss was masked out
        p = row_probabilities(x.norm(dim=1), tracker.estimate(1, n, torch.device("cpu")).reshape(n))
    elif kind == "some_zero_probabilities":
        x[::4] = 0  # rows with x_i = 0 get p_i = 0; they contribute nothing
        p = row_probabilities(x.norm(dim=1), g.norm(dim=1))
    else:
        raise AssertionError(kind)
    return x, g, p


def _draws(x: torch.Tensor, g: torch.Tensor, p: torch.Tensor, k: int, count: int, wta: bool = True) -> torch.Tensor:
    """``count`` independent estimates of ``g^T x`` (count, out, in), drawn as one batch of plans."""
    index, weight = wta_crs_plan(p.expand(count, -1), k, winner_take_all=wta)
    return torch.einsum("sko,ski->soi", g.double()[index] * weight.double()[..., None], x.double()[index])


@pytest.mark.parametrize("kind", ["concentrated", "flat", "zero_cached_norms", "some_zero_probabilities"])
def test_estimator_is_unbiased_and_error_shrinks_like_inverse_sqrt(kind: str) -> None:
    torch.manual_seed(1)
    x, g, p = _case(kind)
    exact = g.double().t() @ x.double()
    samples = _draws(x, g, p, k=12, count=1600)
    mean, std = samples.mean(0), samples.std(0)
    z = (mean - exact).abs() / (std / math.sqrt(len(samples))).clamp_min(1e-12)
    assert float(z.max()) < 4.5, float(z.max())  # 15 entries: |z| > 4.5 has probability < 1e-4
    # error of the mean over 100 draws vs over 1600 (16x): ~4x smaller, averaged over 16 disjoint blocks
    small = samples.view(16, 100, *exact.shape).mean(1)
    err_small = (small - exact).square().mean().sqrt()
    err_large = (mean - exact).square().mean().sqrt()
    assert 2.0 < float(err_small / err_large) < 8.0


def test_flat_probabilities_give_plain_crs_weights() -> None:
    x, g, p = _case("flat")
    index, weight = wta_crs_plan(p, 12)
    torch.testing.assert_close(weight, torch.full((12,), 40 / 12))  # 1 / (k p_j) with p_j = 1/n


def test_winner_take_all_has_lower_variance_than_crs_when_mass_is_concentrated() -> None:
    torch.manual_seed(2)
    x, g, p = _case("concentrated")
    k = 12
    top = torch.sort(p, descending=True).values
    bound = (1 - (torch.cumsum(top[:k], 0) - top[:k])) / (k - torch.arange(k))
    c = int(torch.argmin(bound))
    assert c > 0 and float(top[:c].sum()) > c / k  # the paper's condition for WTA-CRS to beat CRS
    wta = _draws(x, g, p, k, 800, wta=True).var(0).sum()
    crs = _draws(x, g, p, k, 800, wta=False).var(0).sum()
    assert float(wta) < 0.5 * float(crs)


def _linear(ratio: float = 0.3) -> tuple[nn.Linear, torch.Tensor, object]:
    torch.manual_seed(0)
    layer = nn.Linear(32, 4)
    handle = compress_activations(nn.Sequential(layer), "wta_crs", ratio=ratio)
    return layer, torch.randn(2, 16, 32) * torch.linspace(0.2, 3, 16)[:, None], handle


def test_saves_only_the_sampled_rows() -> None:
    layer, x, handle = _linear()
    k = sample_count(32, 0.3, 1)
    assert k == 10
    # k rows of x (fp32) + their int64 indices + fp32 weights
    assert saved_bytes(layer, lambda: layer(x.requires_grad_())) == k * 32 * 4 + k * 8 + k * 4
    handle.undo()


def test_layer_gradient_is_unbiased_grad_input_and_bias_exact() -> None:
    layer, x, handle = _linear()
    x = x.requires_grad_()
    g = torch.randn(2, 16, 4)
    handle.undo()
    y = layer(x)
    exact_x, exact_w, exact_b = torch.autograd.grad(y, (x, layer.weight, layer.bias), g)
    handle = compress_activations(nn.Sequential(layer), "wta_crs", ratio=0.3)
    tracker = handle._trackers["0"]
    estimates = []
    for _ in range(200):
        out = layer(x)
        assert torch.equal(out, y)
        gx, gw, gb = torch.autograd.grad(out, (x, layer.weight, layer.bias), g)
        torch.testing.assert_close(gx, exact_x, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gb, exact_b, rtol=1e-6, atol=1e-6)
        estimates.append(gw.double())
    assert tracker.updates == 200 and tracker.ema.shape == (16,)  # per-position gradient-norm EMA
    stack = torch.stack(estimates)
    z = (stack.mean(0) - exact_w.double()).abs() / (stack.std(0) / math.sqrt(len(stack))).clamp_min(1e-12)
    assert float(z.max()) < 5.0
    handle.undo()


def test_gradient_norm_estimate_is_committed_after_backward() -> None:
    layer, x, handle = _linear()
    tracker = handle._trackers["0"]
    g = torch.randn(2, 16, 4)
    out = layer(x.requires_grad_())
    assert tracker.ema is None
    out.backward(g)
    torch.testing.assert_close(tracker.ema, g.norm(dim=2).mean(0))
    handle.undo()


def test_layers_reading_the_same_input_share_one_sample() -> None:
    torch.manual_seed(0)
    q, k = nn.Linear(32, 8), nn.Linear(32, 8)

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k = q, k

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.q(x) * self.k(x)

    pair = Pair()
    x = torch.randn(2, 16, 32, requires_grad=True)
    handle = compress_activations(pair, "wta_crs", ratio=0.3)
    assert saved_bytes(pair, lambda: pair(x)) == 10 * (32 * 4 + 8 + 4) + 2 * (2 * 16 * 8 * 4)  # + mul operands
    handle.undo()


def test_lora_a_is_sampled_and_frozen_base_saves_nothing(tokens) -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    step = lambda: model(input_ids=tokens, labels=tokens).loss  # noqa: E731
    base = saved_bytes(model, step)
    handle = compress_activations(model, "wta_crs", ratio=0.3, targets=("linear",))
    assert saved_bytes(model, step) < base
    lora_a = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default")
    x = torch.randn(2, 16, 64)
    assert saved_bytes(model, lambda: lora_a(x.requires_grad_())) == 10 * (64 * 4 + 8 + 4)
    handle.undo()


class _ToyAttention(nn.Module):
    """Two batched matmuls as in eager attention: scores = q k^T, out = softmax(scores) v."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)), dim=-1), v)


def test_attention_matmul_gradients_are_unbiased_and_only_samples_are_saved() -> None:
    torch.manual_seed(0)
    attention = _ToyAttention()
    q, k, v = (torch.randn(1, 2, 40, 8, requires_grad=True) for _ in range(3))
    g = torch.randn(1, 2, 40, 8)
    y = attention(q, k, v)
    exact = torch.autograd.grad(y, (q, k, v), g)
    handle = compress_activations(nn.Sequential(attention), "wta_crs", ratio=0.3)
    assert handle.names("attention") == ["0"]
    estimates = []
    for _ in range(100):
        out = attention(q, k, v)
        assert torch.equal(out, y)
        estimates.append(torch.autograd.grad(out, (q, k, v), g))
    for i, name in enumerate("qkv"):
        stack = torch.stack([e[i].double() for e in estimates])
        z = (stack.mean(0) - exact[i].double()).abs() / (stack.std(0) / math.sqrt(len(stack))).clamp_min(1e-12)
        assert float(z.max()) < 5.5, name  # 640 entries: |z| > 5.5 has probability < 1e-4
    # q k^T keeps 12 of 40 rows of q and 12 of 40 columns of k^T; p v keeps 12 of 40 rows of p and 10 (min_rows)
    # of 8 columns of v, i.e. all of v; plus the softmax output, int64 indices and fp32 weights per (batch, head)
    slices = 1 * 2
    sampled = slices * (12 * 8 + 12 * 8 + 12 * 40) * 4 + slices * 3 * 12 * (8 + 4)
    assert saved_bytes(attention, lambda: attention(q, k, v)) == sampled + v.numel() * 4 + slices * 40 * 40 * 4
    handle.undo()
