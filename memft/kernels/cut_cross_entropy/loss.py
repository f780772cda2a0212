"""``linear_cross_entropy``: cross-entropy of a linear classifier without materialising the logits.

Cut cross-entropy, arXiv 2411.09009.  For hidden states E [N, D], classifier C [V, D] and labels y [N]:
``loss_i = logsumexp_j(z_ij) - z_{i, y_i}`` with ``z = softcap(E @ C.T + bias)``.  Memory beyond the
inputs and their gradients is O(N) plus a bounded block; the N x V logits never exist.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .filtering import compute_dtype, resolve_filter_eps
from .op import linear_cross_entropy_forward, linear_cross_entropy_fused, resolve_impl

REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _validate(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    reduction: str,
    softcap: float | None,
    normalizer: Tensor | float | None,
) -> None:
    for name, tensor in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}.")
    if hidden.dtype not in _FLOAT_DTYPES or weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must be float32, bfloat16 or float16. "
            "Cast them, e.g. hidden.to(torch.bfloat16)."
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of class indices, got {labels.dtype}; use labels.long().")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, D] (the classifier / lm_head weight), got shape {tuple(weight.shape)}.")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dimension ({tuple(hidden.shape)}) must equal weight's D ({weight.shape[1]}); pass "
            "the final hidden states [..., D] and the weight [V, D] (not transposed)."
        )
    if tuple(hidden.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"labels {tuple(labels.shape)} must have hidden's leading shape {tuple(hidden.shape[:-1])}: one label "
            "per hidden state. For causal LMs shift the labels first (see cut_cross_entropy_loss)."
        )
    devices = {hidden.device, weight.device, labels.device} | ({bias.device} if bias is not None else set())
    if len(devices) != 1:
        raise ValueError(f"hidden, weight, labels and bias must be on one device, got {sorted(map(str, devices))}.")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != (weight.shape[0],):
            shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
            raise ValueError(f"bias must be a tensor of shape [V] = ({weight.shape[0]},), got {shape}.")
        if bias.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"bias must be float32, bfloat16 or float16, got {bias.dtype}.")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}.")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not softcap > 0:
            raise ValueError(
                f"softcap={softcap!r} must be a positive number (logits become softcap * tanh(z / softcap), "
                "e.g. Gemma 2's final_logit_softcapping=30.0) or None."
            )
    if normalizer is not None:
        if reduction != "mean":
            raise ValueError(
                f"normalizer is only used with reduction='mean' (it replaces the count of non-ignored rows), "
                f"got reduction={reduction!r}. Drop normalizer or use reduction='mean'."
            )
        if isinstance(normalizer, Tensor):
            if normalizer.numel() != 1:
                raise ValueError(f"normalizer must be a scalar tensor, got shape {tuple(normalizer.shape)}.")
        elif isinstance(normalizer, bool) or not isinstance(normalizer, numbers.Real) or not normalizer > 0:
            raise ValueError(
                f"normalizer={normalizer!r} must be a positive number or a scalar tensor (e.g. HF's "
                "num_items_in_batch: the count of label tokens over all gradient-accumulation micro-batches)."
            )


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    normalizer: Tensor | float | None = None,
    impl: str = "auto",
    filter_eps: float | str | None = "auto",
) -> Tensor:
    """Cross-entropy of ``softcap(hidden @ weight.T + bias)`` against ``labels`` without the logits.

    Args:
        hidden: [..., D] float32/bfloat16/float16 (e.g. final hidden states, flattened or not).
        weight: [V, D] classifier (``lm_head.weight``).  May differ in dtype from ``hidden``: products
            use the lower precision of the two, gradients come back in each input's dtype.
        labels: [...] integer class indices; rows equal to ``ignore_index`` are excluded from the loss,
            the gradients and the mean's count.
        bias: optional [V].
        reduction: ``"mean"`` (sum over valid rows / their count, or / ``normalizer``), ``"sum"``, or
            ``"none"`` (per-row losses of labels' shape, 0 on ignored rows).
        softcap: optional final-logit softcap ``c``: logits become ``c * tanh(z / c)`` (Gemma 2).
        normalizer: with ``"mean"``, divide the sum by this (number or scalar tensor, e.g. HF's
            ``num_items_in_batch`` under gradient accumulation) instead of the count of valid rows.
        impl: ``"auto"`` (Triton on CUDA when triton imports, else chunked PyTorch), ``"torch"``,
            ``"triton"``.
        filter_eps: gradient filtering threshold (see :mod:`.filtering`); ``"auto"`` skips backward
            blocks below ``finfo(dtype).eps / 32`` for bf16/fp16 and never for fp32; None disables it.

    With fp32 inputs, the chunked PyTorch path, no filtering, a scalar reduction and gradients to compute,
    the gradients come out of the forward (``memft::linear_cross_entropy_fused``: three logit-sized
    products instead of four) and the backward only scales them.

    Returns:
        The loss in float32 (scalar, or labels' shape for ``"none"``).  All arithmetic (logits,
        log-sum-exp, softmax, gradient accumulation) is fp32.  With ``"mean"`` and every row ignored the
        loss is 0 (not NaN) and all gradients are zero.
    """
    _validate(hidden, weight, labels, bias, reduction, softcap, normalizer)
    impl = resolve_impl(impl, hidden.device)
    eps = resolve_filter_eps(filter_eps, compute_dtype(hidden.dtype, weight.dtype))
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    cap = None if softcap is None else float(softcap)
    needs_grad = [torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    fp32 = all(t is None or t.dtype == torch.float32 for t in (hidden, weight, bias))
    if reduction != "none" and impl == "torch" and fp32 and eps is None and any(needs_grad):
        total, *_ = linear_cross_entropy_fused(
            flat_hidden, weight, bias, flat_labels, int(ignore_index), cap, *needs_grad
        )
    else:
        row_loss, _ = linear_cross_entropy_forward(
            flat_hidden, weight, bias, flat_labels, int(ignore_index), cap, eps, impl
        )
        if reduction == "none":
            return row_loss.view(labels.shape)
        total = row_loss.sum()
    if reduction == "sum":
        return total
    if normalizer is not None:
        if isinstance(normalizer, Tensor):
            normalizer = normalizer.to(device=total.device, dtype=total.dtype)
        return total / normalizer
    count = (flat_labels != ignore_index).sum().clamp(min=1)
    return total / count
