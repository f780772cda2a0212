"""Autograd Functions that run an op exactly in forward and save a compressed form of what backward needs.

Every Function computes its forward output with the original op (so outputs are bit-exact) and saves only codec
tensors through ``ctx.save_for_backward`` (so gradient checkpointing can drop and recompute them). Shapes:

* :class:`CompressedLinear`: x ``(..., in)``, weight ``(out, in)``, bias ``(out,)``; saves the encoded x when the
  weight is trainable; grad-input and grad-bias are exact, grad-weight uses the decoded x.
* :class:`CompressedRecompute`: a pointwise or normalisation module ``fn`` (GELU, SiLU, LayerNorm, RMSNorm, ...);
  saves the encoded input and computes the vector-Jacobian product of ``fn`` at the decoded input.
* :class:`ReluMask`: ReLU with a 1-bit mask ``y > 0`` (exact gradient, 1/32 of fp32 storage).
* :class:`DropoutMask`: dropout with a 1-bit keep mask (exact; the dropout draws are those of
  ``torch.nn.functional.dropout``, so outputs match it bit for bit under the same seed).
* :class:`CompressedSoftmax`: saves the encoded output y; ``dx = y * (dy - sum(dy * y))``.
* :class:`CompressedMatmul`: ``a @ b`` for batched operands ``(..., M, K) @ (..., K, N)``; saves both encoded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from memft.kernels.quant import pack_codes, unpack_codes

from .codecs import Encoded

__all__ = [
    "CompressedLinear",
    "CompressedRecompute",
    "ReluMask",
    "DropoutMask",
    "CompressedSoftmax",
    "CompressedMatmul",
]


def _restore(ctx: Any, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return ctx.codec.decode(tensors, ctx.meta)


def _remember(ctx: Any, enc: Encoded) -> None:
    ctx.codec, ctx.meta, ctx.tracker = enc.codec, enc.meta, enc.tracker


class CompressedLinear(torch.autograd.Function):
    """y = original(x) (a Linear forward); saves the encoded x for the weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, original: Callable, enc: Encoded | None):  # type: ignore[override]
        y = original(x)
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        if enc is None:
            ctx.save_for_backward(weight)
            ctx.codec = None
        else:
            _remember(ctx, enc)
            ctx.save_for_backward(weight, *enc.tensors)
        return y

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        weight, *codes = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        g2d = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = (g2d @ weight.to(g2d.dtype)).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            x2d = _restore(ctx, tuple(codes)).reshape(-1, weight.shape[1])
            grad_w = (g2d.t() @ x2d.to(g2d.dtype)).to(weight.dtype)
            ctx.codec.observe(ctx.tracker, ctx.meta)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2d.sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None


class CompressedRecompute(torch.autograd.Function):
    """y = fn(x) exactly; backward evaluates the VJP of ``fn`` (and of its parameters) at the decoded x."""

    @staticmethod
    def forward(ctx, x, fn: Callable, enc: Encoded, *params):  # type: ignore[override]
        y = fn(x)
        ctx.fn, ctx.params = fn, params
        _remember(ctx, enc)
        ctx.save_for_backward(*enc.tensors)
        return y

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x_approx = _restore(ctx, ctx.saved_tensors)
        wanted = [p for p, need in zip(ctx.params, ctx.needs_input_grad[3:]) if need]
        with torch.enable_grad():
            xd = x_approx.detach().requires_grad_(True)
            grads = torch.autograd.grad(ctx.fn(xd), [xd, *wanted], grad_out, allow_unused=True)
        ctx.codec.observe(ctx.tracker, ctx.meta)
        rest = iter(grads[1:])
        param_grads = [next(rest) if need else None for need in ctx.needs_input_grad[3:]]
        grad_x = grads[0] if ctx.needs_input_grad[0] else None
        return (grad_x, None, None, *param_grads)


class ReluMask(torch.autograd.Function):
    """y = original(x) (a ReLU); saves the 1-bit mask ``y > 0``; dx = dy * mask (exact)."""

    @staticmethod
    def forward(ctx, x, original: Callable):  # type: ignore[override]
        y = original(x)
        ctx.numel, ctx.shape = y.numel(), y.shape
        ctx.save_for_backward(pack_codes((y > 0).to(torch.uint8), 1))
        return y

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (packed,) = ctx.saved_tensors
        mask = unpack_codes(packed, 1, ctx.numel).reshape(ctx.shape)
        return grad_out * mask.to(grad_out.dtype), None


def _fused_dropout_device(x: torch.Tensor) -> bool:
    """Devices where ``F.dropout`` uses ``native_dropout`` (mirrors ATen's ``is_fused_kernel_acceptable``)."""
    return x.device.type in ("cuda", "xpu", "lazy", "privateuseone") and x.numel() > 0


class DropoutMask(torch.autograd.Function):
    """y = dropout(x, p) drawn exactly as ``F.dropout(x, p, training=True)``; saves the 1-bit keep mask."""

    @staticmethod
    def forward(ctx, x, p: float):  # type: ignore[override]
        if _fused_dropout_device(x):
            y, keep = torch.native_dropout(x, p, True)
        else:  # ATen's CPU path: Bernoulli noise in x's dtype, divided by 1 - p, multiplied in
            noise = torch.empty_like(x).bernoulli_(1 - p)
            noise.div_(1 - p)
            y, keep = x * noise, noise != 0
        ctx.scale, ctx.numel, ctx.shape = 1.0 / (1.0 - p), x.numel(), x.shape
        ctx.save_for_backward(pack_codes(keep.to(torch.uint8), 1))
        return y

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (packed,) = ctx.saved_tensors
        keep = unpack_codes(packed, 1, ctx.numel).reshape(ctx.shape)
        return grad_out * keep.to(grad_out.dtype) * ctx.scale, None


class CompressedSoftmax(torch.autograd.Function):
    """y = func(x, dim, dtype) exactly; saves the encoded y."""

    @staticmethod
    def forward(ctx, x, func: Callable, args: tuple, kwargs: dict, dim: int, codec, tracker):  # type: ignore[override]
        y = func(*args, **kwargs)
        ctx.dim, ctx.x_dtype = dim, x.dtype
        enc = codec.encoded(y, tracker)
        _remember(ctx, enc)
        ctx.save_for_backward(*enc.tensors)
        return y

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        y = _restore(ctx, ctx.saved_tensors).to(grad_out.dtype)
        grad_x = y * (grad_out - (grad_out * y).sum(dim=ctx.dim, keepdim=True))
        ctx.codec.observe(ctx.tracker, ctx.meta)
        return grad_x.to(ctx.x_dtype), None, None, None, None, None, None


class CompressedMatmul(torch.autograd.Function):
    """y = func(a, b) exactly for batched operands; saves encoded b (for grad a) and encoded a (for grad b)."""

    @staticmethod
    def forward(ctx, a, b, func: Callable, codec, tracker_a, tracker_b):  # type: ignore[override]
        y = func(a, b)
        ctx.a_shape, ctx.b_shape, ctx.a_dtype, ctx.b_dtype = a.shape, b.shape, a.dtype, b.dtype
        ctx.codec = codec
        saved: list[torch.Tensor] = []
        ctx.metas, ctx.trackers, ctx.counts = [], [], []
        for operand, tracker, needed in ((a, tracker_a, b.requires_grad), (b, tracker_b, a.requires_grad)):
            if needed:
                tensors, meta = codec.encode(operand, tracker)
                saved.extend(tensors)
                ctx.metas.append(meta)
                ctx.trackers.append(tracker)
                ctx.counts.append(len(tensors))
            else:
                ctx.metas.append(None)
                ctx.trackers.append(None)
                ctx.counts.append(0)
        ctx.save_for_backward(*saved)
        return y

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        saved = ctx.saved_tensors
        a_codes, b_codes = saved[: ctx.counts[0]], saved[ctx.counts[0] :]
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            b = ctx.codec.decode(b_codes, ctx.metas[1]).to(grad_out.dtype)
            grad_a = (grad_out @ b.transpose(-1, -2)).sum_to_size(ctx.a_shape).to(ctx.a_dtype)
        if ctx.needs_input_grad[1]:
            a = ctx.codec.decode(a_codes, ctx.metas[0]).to(grad_out.dtype)
            grad_b = (a.transpose(-1, -2) @ grad_out).sum_to_size(ctx.b_shape).to(ctx.b_dtype)
        for tracker, meta in zip(ctx.trackers, ctx.metas):
            if meta is not None:
                ctx.codec.observe(tracker, meta)
        return grad_a, grad_b, None, None, None, None
