"""``torch.library`` registration of cut cross-entropy (arXiv 2411.09009).

Three custom ops, so that the loss is opaque to ``torch.compile`` and runs under ``FakeTensorMode``:

- ``memft::linear_cross_entropy_forward(hidden[N,D], weight[V,D], bias[V]?, labels[N], ignore_index,
  softcap?, filter_eps?, impl) -> (loss[N] fp32, lse[N] fp32)``
- ``memft::linear_cross_entropy_backward(grad_loss[N], hidden, weight, bias?, labels, lse, ignore_index,
  softcap?, filter_eps?, impl, needs_hidden_grad, needs_weight_grad, needs_bias_grad)
  -> (grad_hidden, grad_weight, grad_bias)``; a gradient that is not needed comes back as an empty
  tensor.
- ``memft::linear_cross_entropy_fused(hidden, weight, bias?, labels, ignore_index, softcap?,
  needs_hidden_grad, needs_weight_grad, needs_bias_grad) -> (loss[] fp32, lse[N] fp32, grad_hidden,
  grad_weight, grad_bias)``: the summed loss with its gradients computed in the forward (chunked
  PyTorch, fp32 inputs: :func:`torch_chunked.forward_backward`).

The autograd formula of the forward op saves only hidden, weight, bias, labels and the [N] log-sum-exp,
and calls the backward op, which recomputes the logits block by block.  That of the fused op scales the
stored gradients in place by the incoming scalar; a second backward through the same graph
(``retain_graph``) falls back to the backward op.  ``impl`` is ``"torch"`` (chunked PyTorch,
any device) or ``"triton"`` (CUDA kernels; triton is imported on first use).  The fake kernels return
outputs of the right shapes; the kernels' internal workspace, invisible to dispatch-mode trackers, is
given by :func:`workspace_bytes`.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any, Optional

import torch
from torch import Tensor

from . import torch_chunked

IMPLS = ("auto", "torch", "triton")


@functools.cache
def triton_available() -> bool:
    """True when ``import triton`` succeeds (checked once)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(impl: str, device: torch.device) -> str:
    """Map ``"auto"`` to ``"triton"`` on CUDA when triton imports, else ``"torch"``; check overrides."""
    if impl not in IMPLS:
        raise ValueError(
            f"impl={impl!r} is not one of {IMPLS}. Use 'auto' (Triton kernels on CUDA, chunked PyTorch "
            "elsewhere), 'torch' (chunked PyTorch on any device) or 'triton' (CUDA kernels)."
        )
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if impl == "triton" and not triton_available():
        raise ValueError(
            "impl='triton' was requested but triton cannot be imported. Install it (pip install "
            "'memft[triton]') or pass impl='torch' for the chunked PyTorch implementation."
        )
    return impl


def _kernels(impl: str) -> ModuleType:
    if impl == "triton":
        from . import triton_kernels

        return triton_kernels
    return torch_chunked


def workspace_bytes(
    num_rows: int,
    vocab_size: int,
    dim: int,
    hidden_dtype: torch.dtype,
    weight_dtype: torch.dtype,
    *,
    impl: str,
    device: torch.device | str = "cuda",
    backward: bool = True,
    softcap: bool = False,
    fused: bool = False,
) -> int:
    """Upper bound of the temporary memory the op needs inside its kernels (bytes), forward or backward.

    Memory trackers built on a dispatch mode see a custom op's outputs but not what its kernels allocate
    and free internally, on real or fake tensors; add this figure to such an estimate.  ``impl`` is the
    resolved implementation (``"torch"`` or ``"triton"``).  ``fused``: the fused op instead (``"torch"``,
    fp32), which ``linear_cross_entropy`` runs for a scalar loss with gradients.
    """
    if impl == "triton":
        from . import triton_kernels

        return triton_kernels.workspace_bytes(
            num_rows, vocab_size, dim, hidden_dtype, weight_dtype, torch.device(device), backward=backward
        )
    return torch_chunked.workspace_bytes(
        num_rows, vocab_size, dim, hidden_dtype, weight_dtype, backward=backward, softcap=softcap, fused=fused
    )


@torch.library.custom_op("memft::linear_cross_entropy_forward", mutates_args=())
def linear_cross_entropy_forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    ignore_index: int,
    softcap: Optional[float],
    filter_eps: Optional[float],
    impl: str,
) -> tuple[Tensor, Tensor]:
    """Per-row loss and log-sum-exp, fp32 [N] each (``filter_eps`` is used by the backward only)."""
    return _kernels(impl).forward(hidden, weight, bias, labels, ignore_index, softcap)


@linear_cross_entropy_forward.register_fake
def _forward_fake(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    ignore_index: int,
    softcap: Optional[float],
    filter_eps: Optional[float],
    impl: str,
) -> tuple[Tensor, Tensor]:
    num_rows = hidden.shape[0]
    loss = hidden.new_empty((num_rows,), dtype=torch.float32)
    lse = hidden.new_empty((num_rows,), dtype=torch.float32)
    return loss, lse


@torch.library.custom_op("memft::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(
    grad_loss: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    lse: Tensor,
    ignore_index: int,
    softcap: Optional[float],
    filter_eps: Optional[float],
    impl: str,
    needs_hidden_grad: bool,
    needs_weight_grad: bool,
    needs_bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for hidden, weight and bias; an unneeded one is an empty tensor."""
    grads = _kernels(impl).backward(
        grad_loss, hidden, weight, bias, labels, lse, ignore_index, softcap, filter_eps,
        needs_hidden_grad, needs_weight_grad, needs_bias_grad,
    )
    return tuple(hidden.new_empty((0,)) if g is None else g for g in grads)  # type: ignore[return-value]


@linear_cross_entropy_backward.register_fake
def _backward_fake(
    grad_loss: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    lse: Tensor,
    ignore_index: int,
    softcap: Optional[float],
    filter_eps: Optional[float],
    impl: str,
    needs_hidden_grad: bool,
    needs_weight_grad: bool,
    needs_bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    grad_hidden = torch.empty_like(hidden) if needs_hidden_grad else hidden.new_empty((0,))
    grad_weight = torch.empty_like(weight) if needs_weight_grad else hidden.new_empty((0,))
    if needs_bias_grad and bias is not None:
        grad_bias = torch.empty_like(bias)
    else:
        grad_bias = hidden.new_empty((0,))
    return grad_hidden, grad_weight, grad_bias


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    hidden, weight, bias, labels, ignore_index, softcap, filter_eps, impl = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[1])
    ctx.options = (ignore_index, softcap, filter_eps, impl)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx: Any, grad_loss: Tensor, grad_lse: Tensor | None) -> tuple[Tensor | None, ...]:
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    ignore_index, softcap, filter_eps, impl = ctx.options
    needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    needs_bias = needs_bias and bias is not None
    grad_hidden, grad_weight, grad_bias = linear_cross_entropy_backward(
        grad_loss, hidden, weight, bias, labels, lse, ignore_index, softcap, filter_eps, impl,
        needs_hidden, needs_weight, needs_bias,
    )
    return (
        grad_hidden if needs_hidden else None,
        grad_weight if needs_weight else None,
        grad_bias if needs_bias else None,
        None, None, None, None, None,
    )


torch.library.register_autograd(
    "memft::linear_cross_entropy_forward", _backward, setup_context=_setup_context
)


@torch.library.custom_op("memft::linear_cross_entropy_fused", mutates_args=())
def linear_cross_entropy_fused(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    ignore_index: int,
    softcap: Optional[float],
    needs_hidden_grad: bool,
    needs_weight_grad: bool,
    needs_bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Summed loss [] and lse [N] (fp32) and its gradients; an unneeded gradient is an empty tensor."""
    loss, lse, *grads = torch_chunked.forward_backward(
        hidden, weight, bias, labels, ignore_index, softcap, needs_hidden_grad, needs_weight_grad,
        needs_bias_grad,
    )
    return (loss, lse, *(hidden.new_empty((0,)) if g is None else g for g in grads))  # type: ignore[return-value]


@linear_cross_entropy_fused.register_fake
def _fused_fake(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    ignore_index: int,
    softcap: Optional[float],
    needs_hidden_grad: bool,
    needs_weight_grad: bool,
    needs_bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    loss = hidden.new_empty((), dtype=torch.float32)
    lse = hidden.new_empty((hidden.shape[0],), dtype=torch.float32)
    grads = _backward_fake(
        lse, hidden, weight, bias, labels, lse, ignore_index, softcap, None, "torch",
        needs_hidden_grad, needs_weight_grad, needs_bias_grad,
    )
    return (loss, lse, *grads)


def _setup_fused_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    hidden, weight, bias, labels, ignore_index, softcap, *_ = inputs
    _, lse, grad_hidden, grad_weight, grad_bias = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse)
    ctx.options = (ignore_index, softcap)
    ctx.grads = (grad_hidden, grad_weight, grad_bias)
    ctx.mark_non_differentiable(lse, grad_hidden, grad_weight, grad_bias)
    ctx.set_materialize_grads(False)  # no zero-filled incoming gradients for the unused outputs


def _fused_backward(ctx: Any, grad_loss: Tensor, *unused: Tensor | None) -> tuple[Tensor | None, ...]:
    needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    grads, ctx.grads = ctx.grads, None
    if grads is None:
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        ignore_index, softcap = ctx.options
        grads = linear_cross_entropy_backward(
            grad_loss.expand(lse.shape), hidden, weight, bias, labels, lse, ignore_index, softcap, None,
            "torch", needs_hidden, needs_weight, needs_bias,
        )
    else:
        grads = tuple(g.mul_(grad_loss) for g in grads)
    return (
        grads[0] if needs_hidden else None,
        grads[1] if needs_weight else None,
        grads[2] if needs_bias else None,
        None, None, None, None, None, None,
    )


torch.library.register_autograd(
    "memft::linear_cross_entropy_fused", _fused_backward, setup_context=_setup_fused_context
)
