"""RMSNorm that saves only the normalised input and its inverse RMS: exact gradients, half of autograd's bytes.

An RMSNorm composed of elementwise ops (the classes of T5, Llama, Mistral, Qwen, ..., and ``nn.RMSNorm`` on CPU)
makes autograd keep two ``(..., C)`` tensors: the input x (for the statistics' gradient) and the normalised
``x^ = x * r``, ``r = 1 / sqrt(mean(x^2) + eps)`` (for the weight gradient). Both gradients follow from ``x^``
and ``r`` alone, so this storage keeps one ``(..., C)`` tensor (x's dtype) and one ``(..., 1)`` float32 tensor
(float64 for float64 input). With ``gh = dL/dx^ = dy * w``:

* ``dx = r * (gh - x^ * mean(gh * x^))``,  ``dw = sum_rows dy * x^``.

It is the role of the "in-place LayerNorm" of the WTA-CRS reference deployment (arXiv 2305.15265), which keeps
the output instead of ``x^``; recovering ``x^`` from the output divides by the weight and fails where a weight
entry is 0, so memft keeps ``x^``. torch's ``nn.LayerNorm`` is left alone: its fused kernel already keeps a
single tensor.

Recognised modules: ``nn.RMSNorm`` over the last dimension, and leaf ``*RMSNorm`` / ``*LayerNorm`` classes with a
``(C,)`` weight, no bias, a float ``eps`` / ``variance_epsilon`` and the output ``w * x^``, checked on a probe
input when patching (so e.g. Gemma's ``(1 + w) * x^`` is left as it is). The forward output is the module's
own, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from .patch import Site, _needs_grad, _refuse_compiling

__all__ = ["rms_eps", "NormalizedRMSNorm", "normalized_norm_forward"]


def _normalize(x: torch.Tensor, eps: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x^, r (..., 1))`` over the last dimension, in float32 (float64 for float64 input)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + (torch.finfo(x.dtype).eps if eps is None else eps))
    return xf * r, r


def _probe_matches(module: nn.Module, eps: float, size: int) -> bool:
    """True if ``module`` computes ``w * x^`` on a random probe (assumed for fake parameters: shapes agree)."""
    weight = module.weight
    if is_fake(weight):
        return True
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, size, generator=gen) * 3 + 1).to(weight.device, weight.dtype)
    with torch.no_grad():
        expected = weight * _normalize(x, eps)[0].to(x.dtype)
        actual = module(x)
    if not isinstance(actual, torch.Tensor) or actual.shape != expected.shape:
        return False
    tol = 1e-5 if x.dtype == torch.float32 else 2e-2
    return bool(torch.allclose(actual.float(), expected.float(), rtol=tol, atol=tol))


def rms_eps(module: nn.Module) -> tuple[bool, float | None]:
    """``(recognised, eps)`` for an RMSNorm this storage handles (eps None: ``finfo(dtype).eps``, as nn.RMSNorm)."""
    if isinstance(module, nn.RMSNorm):
        return len(module.normalized_shape) == 1, module.eps
    name = type(module).__name__
    if isinstance(module, nn.LayerNorm) or not (name.endswith("RMSNorm") or name.endswith("LayerNorm")):
        return False, None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or getattr(module, "bias", None) is not None:
        return False, None
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if not isinstance(eps, float) or not _probe_matches(module, eps, weight.shape[0]):
        return False, None
    return True, eps


class NormalizedRMSNorm(torch.autograd.Function):
    """y = original(x) exactly; saves ``x^`` (x's dtype) and ``r``; backward as in the module docstring, computed in
    float32 (float64 for float64 x). x: ``(..., C)``, weight: ``(C,)`` or None."""

    @staticmethod
    def forward(ctx, x, weight, original: Callable, eps: float | None):  # type: ignore[override]
        y = original(x)
        xhat, r = _normalize(x, eps)
        ctx.x_dtype, ctx.has_weight = x.dtype, weight is not None
        ctx.save_for_backward(xhat.to(x.dtype), r, *(() if weight is None else (weight,)))
        return y

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        xhat, r, *weight = ctx.saved_tensors
        xhat, g = xhat.to(r.dtype), grad_out.to(r.dtype)
        gh = g * weight[0].to(r.dtype) if ctx.has_weight else g
        grad_x = (r * (gh - xhat * (gh * xhat).mean(-1, keepdim=True))).to(ctx.x_dtype)
        grad_w = None
        if ctx.has_weight and ctx.needs_input_grad[1]:
            grad_w = (g * xhat).reshape(-1, g.shape[-1]).sum(0).to(weight[0].dtype)
        return grad_x if ctx.needs_input_grad[0] else None, grad_w, None, None


def normalized_norm_forward(site: Site) -> tuple[Callable, str] | None:
    """Replacement forward storing ``x^`` and ``r`` for a recognised RMSNorm module, or None."""
    module, original = site.module, site.original
    recognised, eps = rms_eps(module)
    if not recognised:
        return None

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        _refuse_compiling()
        weight = getattr(module, "weight", None)
        if args or kwargs or not x.is_floating_point() or not _needs_grad(x, () if weight is None else (weight,)):
            return original(x, *args, **kwargs)
        return NormalizedRMSNorm.apply(x, weight, original, eps)

    return forward, "normalised input + 1/RMS (exact, half of autograd's storage)"
