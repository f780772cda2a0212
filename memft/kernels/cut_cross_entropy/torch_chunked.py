"""Chunked PyTorch implementation of cut cross-entropy (arXiv 2411.09009).

Runs on any device and is the readable reference for the Triton kernels.  Shapes: ``hidden`` [N, D],
``weight`` [V, D], ``bias`` [V] or None, ``labels`` [N] (int).  The logits ``hidden @ weight.T`` are
never materialised: they are produced block by block (a block of rows x a chunk of the vocabulary), each
block holding at most :func:`plan_chunks`'s budget of fp32 values, and reduced on the spot.

Forward returns the per-row loss ``lse_i - z_{i, y_i}`` (0 on ignored rows) and the row log-sum-exp
``lse`` ([N] fp32; what the backward keeps besides the inputs).  Backward recomputes each block,
forms ``dz = g * (softmax - onehot)`` (times the softcap derivative), optionally skips blocks that
gradient filtering deems negligible, and multiplies ``dz`` into the gradients.

Numerics: everything is computed in fp32 from upcast inputs.  Gradients of fp32 inputs accumulate in
place in the returned tensors; for bf16/fp16 inputs the hidden gradient accumulates in an fp32 [N, D]
buffer and the classifier gradient in an fp32 buffer per vocabulary chunk, each cast once.  Rows whose
label is ``ignore_index`` are dropped before any matrix product.

Fused path (:func:`forward_backward`, fp32 inputs, scalar reduction): the forward also produces the
gradients of the summed loss.  A block of 128 rows holds their logits over the whole vocabulary, so the
log-sum-exp, ``softmax - onehot`` and both gradient products come from one logit product: three
N x D x V products in all instead of four (the recompute above).  The caller's backward only scales.

Workspace (bytes beyond inputs and outputs) is bounded by :func:`workspace_bytes`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .filtering import active_counter

_MIN_BLOCK_ELEMENTS = 1 << 16
_MAX_BLOCK_ELEMENTS = 1 << 20
_LOGITS_FRACTION = 512
_MIN_VOCAB_CHUNK = 128
_FUSED_ROWS = 128
_FUSED_LOGITS_FRACTION = 8


def plan_chunks(num_rows: int, vocab_size: int) -> tuple[int, int]:
    """Return ``(rows_per_block, vocab_per_block)`` for a logit block.

    A block holds at most ``clamp(N * V / 512, 2**16, 2**20)`` fp32 values: at most 1/512 of the full
    logits once they exceed 32M entries, and never more than 4 MiB.  The vocabulary chunk is at least 128
    wide so that each matrix product stays efficient; rows fill the rest of the budget.
    """
    rows = max(num_rows, 1)
    budget = min(max(rows * vocab_size // _LOGITS_FRACTION, _MIN_BLOCK_ELEMENTS), _MAX_BLOCK_ELEMENTS)
    vocab_chunk = min(vocab_size, max(_MIN_VOCAB_CHUNK, budget // rows))
    row_chunk = min(rows, max(1, budget // vocab_chunk))
    return row_chunk, vocab_chunk


def plan_fused_rows(num_rows: int, vocab_size: int) -> int | None:
    """Rows per block of :func:`forward_backward`, or None when it must fall back to the recompute.

    A block holds the full-vocabulary logits of ``max(128, 2**20 // V)`` rows: fewer rows would make the
    rank-``rows`` update of the classifier gradient memory-bound.  The fused path is taken only while
    that block is at most 1/8 of the logits (``N >= 8 * rows``).
    """
    rows = max(_FUSED_ROWS, _MAX_BLOCK_ELEMENTS // max(vocab_size, 1))
    return rows if _FUSED_LOGITS_FRACTION * rows <= num_rows else None


def workspace_bytes(
    num_rows: int,
    vocab_size: int,
    dim: int,
    hidden_dtype: torch.dtype,
    weight_dtype: torch.dtype,
    *,
    backward: bool,
    softcap: bool,
    fused: bool = False,
) -> int:
    """Upper bound of the temporary memory of :func:`forward` (or :func:`backward`), in bytes.

    ``fused``: of :func:`forward_backward` instead (fp32 inputs; ``backward`` is then ignored): its
    block of full-vocabulary rows (two with softcap), or the recompute path's bound when it falls back.

    Assumes every row is valid (ignored rows only shrink the work) and counts the largest buffers alive
    at once: the fp32 copy of the hidden states (bf16/fp16 hidden), the fp32 chunk of the classifier
    (bf16/fp16 weight), the logit block (two with softcap in backward), and in backward the fp32 hidden
    gradient accumulator (bf16/fp16 hidden) and the fp32 classifier-gradient chunk (bf16/fp16 weight).
    Row vectors (lse, targets, indices) are counted as 32 bytes per row.
    """
    if fused:
        rows = plan_fused_rows(num_rows, vocab_size)
        if rows is None:
            return workspace_bytes(num_rows, vocab_size, dim, hidden_dtype, weight_dtype, backward=True,
                                   softcap=softcap)
        return 32 * num_rows + (2 if softcap else 1) * rows * vocab_size * 4
    row_chunk, vocab_chunk = plan_chunks(num_rows, vocab_size)
    f32 = 4
    total = 32 * num_rows + row_chunk * vocab_chunk * f32
    if hidden_dtype != torch.float32:
        total += num_rows * dim * f32
    if weight_dtype != torch.float32:
        total += vocab_chunk * dim * f32
    if backward:
        if softcap:
            total += row_chunk * vocab_chunk * f32
        if hidden_dtype != torch.float32:
            total += num_rows * dim * f32
        if weight_dtype != torch.float32:
            total += vocab_chunk * dim * f32
    return total


def check_labels(labels: Tensor, valid: Tensor, vocab_size: int) -> None:
    """Raise ValueError if a non-ignored label lies outside ``[0, vocab_size)`` (one device sync)."""
    bad = valid & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        first = int(labels[bad][0])
        raise ValueError(
            f"labels contain {first}, outside the vocabulary [0, {vocab_size}) and not equal to "
            "ignore_index. Check that labels index rows of the classifier weight, or mark padding with "
            "ignore_index."
        )


def _valid_rows(labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor | None]:
    """Boolean mask of non-ignored rows and their indices (None when every row is valid)."""
    valid = labels != ignore_index
    if bool(valid.all()):
        return valid, None
    return valid, valid.nonzero().squeeze(1)


def _hidden_fp32(hidden: Tensor, rows: Tensor | None) -> Tensor:
    """Valid rows of ``hidden`` in fp32 ([M, D]); a view when nothing needs copying."""
    selected = hidden if rows is None else hidden.index_select(0, rows)
    return selected.float()


def _logit_block(h: Tensor, w: Tensor, b: Tensor | None, softcap: float | None) -> Tensor:
    """fp32 logits of a block: ``softcap(h @ w.T + b)``, shapes [n, D] x [v, D] -> [n, v]."""
    z = torch.mm(h, w.t()) if b is None else torch.addmm(b, h, w.t())
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def _forward_block(
    h: Tensor, w: Tensor, b: Tensor | None, softcap: float | None, label_here: Tensor, label_offset: Tensor,
    row_lse: Tensor, target_logit: Tensor,
) -> None:
    """Fold one logit block into the running row log-sum-exp and target logit (both updated in place).

    A function of its own so that the block is freed before the next one is allocated.
    """
    z = _logit_block(h, w, b, softcap)
    picked = z.gather(1, label_offset.clamp(max=z.shape[1] - 1).unsqueeze(1)).squeeze(1)
    target_logit.add_(torch.where(label_here, picked, 0.0))
    block_max = z.amax(dim=1)
    block_lse = z.sub_(block_max.unsqueeze(1)).exp_().sum(dim=1).log_().add_(block_max)
    torch.logaddexp(row_lse, block_lse, out=row_lse)


def forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    ignore_index: int,
    softcap: float | None,
) -> tuple[Tensor, Tensor]:
    """Per-row loss [N] and log-sum-exp [N] (both fp32, 0 on ignored rows)."""
    num_rows = hidden.shape[0]
    vocab_size = weight.shape[0]
    loss = torch.zeros(num_rows, dtype=torch.float32, device=hidden.device)
    lse = torch.zeros(num_rows, dtype=torch.float32, device=hidden.device)
    valid, rows = _valid_rows(labels, ignore_index)
    check_labels(labels, valid, vocab_size)
    if not bool(valid.any()):
        return loss, lse

    h32 = _hidden_fp32(hidden, rows)
    targets = labels if rows is None else labels.index_select(0, rows)
    num_valid = h32.shape[0]
    row_lse = torch.full((num_valid,), float("-inf"), dtype=torch.float32, device=hidden.device)
    target_logit = torch.zeros(num_valid, dtype=torch.float32, device=hidden.device)
    row_chunk, vocab_chunk = plan_chunks(num_valid, vocab_size)
    label_chunk, label_offset = targets // vocab_chunk, targets % vocab_chunk

    for chunk, v0 in enumerate(range(0, vocab_size, vocab_chunk)):
        v1 = min(v0 + vocab_chunk, vocab_size)
        w = weight[v0:v1].float()
        b = None if bias is None else bias[v0:v1].float()
        for r0 in range(0, num_valid, row_chunk):
            r1 = min(r0 + row_chunk, num_valid)
            _forward_block(
                h32[r0:r1], w, b, softcap, label_chunk[r0:r1] == chunk, label_offset[r0:r1],
                row_lse[r0:r1], target_logit[r0:r1],
            )

    row_loss = row_lse - target_logit
    if rows is None:
        return row_loss, row_lse
    loss.index_copy_(0, rows, row_loss)
    lse.index_copy_(0, rows, row_lse)
    return loss, lse


def _backward_block(
    h: Tensor, w: Tensor, b: Tensor | None, softcap: float | None, filter_eps: float | None,
    label_here: Tensor, label_offset: Tensor, row_lse: Tensor, row_grad: Tensor,
    grad_h: Tensor | None, grad_w: Tensor | None, grad_b: Tensor | None,
) -> bool:
    """Add one block's contribution to the fp32 gradient accumulators; False if filtered out.

    ``dz = g * (softmax - onehot) * softcap'`` for the block, then ``grad_h += dz @ w``,
    ``grad_w += dz.T @ h``, ``grad_b += dz.sum(0)``.
    """
    z = _logit_block(h, w, b, softcap)
    cap_grad = None if softcap is None else torch.div(z, softcap).square_().neg_().add_(1.0)
    dz = z.sub_(row_lse.unsqueeze(1)).exp_()
    hit = label_here.nonzero().squeeze(1)
    dz.index_put_((hit, label_offset.index_select(0, hit)), dz.new_tensor(-1.0), accumulate=True)
    if filter_eps is not None:
        lowest, highest = torch.aminmax(dz)
        if bool(highest < filter_eps) and bool(lowest > -filter_eps):
            return False
    dz.mul_(row_grad.unsqueeze(1))
    if cap_grad is not None:
        dz.mul_(cap_grad)
    if grad_b is not None:
        grad_b.add_(dz.sum(dim=0))
    if grad_h is not None:
        grad_h.addmm_(dz, w)
    if grad_w is not None:
        grad_w.addmm_(dz.t(), h)
    return True


def backward(
    grad_loss: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    lse: Tensor,
    ignore_index: int,
    softcap: float | None,
    filter_eps: float | None,
    needs_hidden_grad: bool,
    needs_weight_grad: bool,
    needs_bias_grad: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``sum_i grad_loss[i] * loss[i]`` w.r.t. hidden [N, D], weight [V, D] and bias [V]."""
    vocab_size = weight.shape[0]
    grad_hidden = torch.zeros_like(hidden) if needs_hidden_grad else None
    grad_weight = torch.zeros_like(weight) if needs_weight_grad else None
    grad_bias = torch.zeros_like(bias) if (needs_bias_grad and bias is not None) else None
    valid, rows = _valid_rows(labels, ignore_index)
    if not bool(valid.any()) or not (needs_hidden_grad or needs_weight_grad or grad_bias is not None):
        return grad_hidden, grad_weight, grad_bias

    h32 = _hidden_fp32(hidden, rows)
    targets = labels if rows is None else labels.index_select(0, rows)
    row_grad = (grad_loss if rows is None else grad_loss.index_select(0, rows)).float()
    row_lse = lse if rows is None else lse.index_select(0, rows)
    num_valid = h32.shape[0]
    row_chunk, vocab_chunk = plan_chunks(num_valid, vocab_size)
    counter = active_counter()

    grad_h32 = None
    if needs_hidden_grad:
        in_place = rows is None and hidden.dtype == torch.float32
        grad_h32 = grad_hidden if in_place else h32.new_zeros(h32.shape)
    grad_b32 = None if grad_bias is None else torch.zeros(vocab_size, dtype=torch.float32, device=hidden.device)

    label_chunk, label_offset = targets // vocab_chunk, targets % vocab_chunk
    for chunk, v0 in enumerate(range(0, vocab_size, vocab_chunk)):
        v1 = min(v0 + vocab_chunk, vocab_size)
        w = weight[v0:v1].float()
        b = None if bias is None else bias[v0:v1].float()
        grad_w32 = None
        if grad_weight is not None:
            grad_w32 = grad_weight[v0:v1] if weight.dtype == torch.float32 else w.new_zeros(w.shape)
        for r0 in range(0, num_valid, row_chunk):
            r1 = min(r0 + row_chunk, num_valid)
            computed = _backward_block(
                h32[r0:r1], w, b, softcap, filter_eps, label_chunk[r0:r1] == chunk, label_offset[r0:r1],
                row_lse[r0:r1], row_grad[r0:r1],
                None if grad_h32 is None else grad_h32[r0:r1],
                grad_w32,
                None if grad_b32 is None else grad_b32[v0:v1],
            )
            if counter is not None:
                counter.computed += int(computed)
                counter.skipped += int(not computed)
        if grad_weight is not None and weight.dtype != torch.float32:
            grad_weight[v0:v1].copy_(grad_w32)

    if grad_hidden is not None and grad_h32 is not grad_hidden:
        if rows is None:
            grad_hidden.copy_(grad_h32)
        else:
            grad_hidden.index_copy_(0, rows, grad_h32.to(hidden.dtype))
    if grad_bias is not None:
        grad_bias.copy_(grad_b32)
    return grad_hidden, grad_weight, grad_bias


def _fused_block(
    h: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None, targets: Tensor,
    loss: Tensor, lse: Tensor, grad_h: Tensor | None, grad_w: Tensor | None, grad_b: Tensor | None,
) -> None:
    """Loss, log-sum-exp and gradient contributions of rows ``h`` [n, D] over the whole vocabulary.

    ``z = softcap(h @ W.T + b)`` [n, V] is formed once; ``dz = (softmax(z) - onehot) * softcap'`` then
    gives ``grad_h = dz @ W`` (written), ``grad_w += dz.T @ h`` and ``grad_b += dz.sum(0)``.
    """
    z = _logit_block(h, weight, bias, softcap)
    target = targets.unsqueeze(1)
    picked = z.gather(1, target).squeeze(1)
    row_max = z.amax(dim=1, keepdim=True)
    dz = torch.sub(z, row_max) if softcap is not None else z.sub_(row_max)
    total = dz.exp_().sum(dim=1, keepdim=True)
    torch.add(total.log().squeeze(1), row_max.squeeze(1), out=lse)
    torch.sub(lse, picked, out=loss)
    dz.div_(total).scatter_add_(1, target, dz.new_full(target.shape, -1.0))
    if softcap is not None:
        dz.mul_(z.div_(softcap).square_().neg_().add_(1.0))
    if grad_b is not None:
        grad_b.add_(dz.sum(dim=0))
    if grad_h is not None:
        torch.mm(dz, weight, out=grad_h)
    if grad_w is not None:
        grad_w.addmm_(dz.t(), h)


def forward_backward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    ignore_index: int,
    softcap: float | None,
    needs_hidden_grad: bool,
    needs_weight_grad: bool,
    needs_bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Summed loss [] and lse [N] (fp32), and the gradients of the summed loss (fp32 inputs only).

    Shapes as in :func:`forward`; gradients are hidden [N, D], weight [V, D], bias [V] or None when not
    needed.  Blocks of :func:`plan_fused_rows` rows; without such a plan (fewer than 8 blocks of rows)
    it runs :func:`forward` then :func:`backward`, whose memory stays bounded.
    """
    num_rows = hidden.shape[0]
    vocab_size = weight.shape[0]
    block_rows = plan_fused_rows(num_rows, vocab_size)
    if block_rows is None:
        loss, lse = forward(hidden, weight, bias, labels, ignore_index, softcap)
        grads = backward(
            torch.ones_like(loss), hidden, weight, bias, labels, lse, ignore_index, softcap, None,
            needs_hidden_grad, needs_weight_grad, needs_bias_grad,
        )
        return (loss.sum(), lse, *grads)

    grad_hidden = torch.zeros_like(hidden) if needs_hidden_grad else None
    grad_weight = torch.zeros_like(weight) if needs_weight_grad else None
    grad_bias = torch.zeros_like(bias) if (needs_bias_grad and bias is not None) else None
    lse = torch.zeros(num_rows, dtype=torch.float32, device=hidden.device)
    valid, rows = _valid_rows(labels, ignore_index)
    check_labels(labels, valid, vocab_size)
    if not bool(valid.any()):
        return lse.new_zeros(()), lse, grad_hidden, grad_weight, grad_bias

    h = hidden if rows is None else hidden.index_select(0, rows)
    targets = labels if rows is None else labels.index_select(0, rows)
    num_valid = h.shape[0]
    row_loss = torch.empty(num_valid, dtype=torch.float32, device=hidden.device)
    row_lse = lse if rows is None else torch.empty_like(row_loss)
    grad_h = grad_hidden if rows is None or grad_hidden is None else torch.empty_like(h)
    for r0 in range(0, num_valid, block_rows):
        r1 = min(r0 + block_rows, num_valid)
        _fused_block(
            h[r0:r1], weight, bias, softcap, targets[r0:r1], row_loss[r0:r1], row_lse[r0:r1],
            None if grad_h is None else grad_h[r0:r1], grad_weight, grad_bias,
        )
    if rows is not None:
        lse.index_copy_(0, rows, row_lse)
        if grad_hidden is not None:
            grad_hidden.index_copy_(0, rows, grad_h)
    return row_loss.sum(), lse, grad_hidden, grad_weight, grad_bias
