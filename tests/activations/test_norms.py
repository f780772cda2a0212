"""RMSNorms that save only the normalised input: exact gradients (against autograd), half the bytes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memft.activations import compress_activations
from memft.activations.norms import rms_eps
from tests.activations.conftest import saved_bytes


def _hf_norms() -> list[nn.Module]:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    return [T5LayerNorm(24, eps=1e-6), LlamaRMSNorm(24, eps=1e-5)]


def _modules() -> list[nn.Module]:
    return [nn.RMSNorm(24), nn.RMSNorm(24, eps=1e-5), *_hf_norms()]


@pytest.mark.parametrize("index", range(4))
def test_gradients_match_autograd_and_half_the_bytes_are_saved(index: int) -> None:
    # nn.RMSNorm in float64: exact math to float64 rounding; the HF classes compute their statistics in float32
    # whatever the input dtype, so they are compared in float32, to float32 rounding
    dtype = torch.float64 if index < 2 else torch.float32
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    torch.manual_seed(index)
    norm = _modules()[index].to(dtype)
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn_like(p))
        norm.weight[3] = 0.0  # a zero weight entry: the gradients stay exact (no division by the weight)
    x = (torch.randn(2, 5, 24, dtype=dtype) * 3 + 1).requires_grad_()
    g = torch.randn(2, 5, 24, dtype=dtype)
    params = list(norm.parameters())
    y = norm(x)
    exact = torch.autograd.grad(y, [x, *params], g)
    base = saved_bytes(norm, lambda: norm(x))
    handle = compress_activations(nn.Sequential(norm), "wta_crs")
    assert handle.names("norm") == ["0"]
    out = norm(x)
    assert torch.equal(out, y)
    for got, want in zip(torch.autograd.grad(out, [x, *params], g), exact):
        torch.testing.assert_close(got, want, **tol)
    size = x.element_size()
    assert saved_bytes(norm, lambda: norm(x)) == x.numel() * size + 2 * 5 * size  # x^ and r (one per row)
    assert base >= 2 * x.numel() * size
    handle.undo()


def test_unrecognised_norms_are_left_alone() -> None:
    class GemmaRMSNorm(nn.Module):  # output (1 + w) * x^: not the w * x^ the backward assumes
        def __init__(self) -> None:
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.zeros(8)), 1e-6

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    assert not rms_eps(GemmaRMSNorm())[0]
    assert not rms_eps(nn.RMSNorm((4, 8)))[0]  # normalised over two dims
    assert not rms_eps(nn.LayerNorm(8))[0]  # fused kernel: already a single saved tensor
    assert rms_eps(_hf_norms()[0]) == (True, 1e-6)
