"""Triton kernels for cut cross-entropy (arXiv 2411.09009).

Shapes: ``hidden`` E [N, D], classifier ``weight`` C [V, D], ``bias`` [V] or None, ``labels`` [N].
Rows whose label is ``ignore_index`` are dropped first: the kernels work on the M valid rows through a
row-index vector, so masked prompt tokens cost nothing.

Forward (:func:`forward`): each program owns a block of rows and a slice ("split") of the vocabulary.
It computes logit tiles ``E_rows @ C_tile.T`` on chip (fp32 accumulation over D), applies bias and
softcap, and keeps a running max / sum-exp per row plus the target logit when the label falls in the
tile.  Only the per-split partial log-sum-exp and target logit ([splits, M] fp32) reach global memory;
they are combined on the host.  The logits never exist in global memory.

Backward (:func:`backward`): each program owns one (row block, vocabulary block) tile.  It recomputes the
logit tile, forms ``p - onehot`` from the saved log-sum-exp, and skips the tile when every entry is below
the filter threshold (gradient filtering, section 4.3 of the paper).  Otherwise it scales by the
upstream gradient and the softcap derivative ``1 - (z / cap)^2``, rounds ``dz`` to the operand dtype
for the tensor cores, and adds ``dz @ C`` into dE and ``dz.T @ E`` into dC with fp32 atomic adds.

Accumulation, a deliberate choice: atomics into fp32 buffers.  dE accumulates in an fp32 [N, D]
buffer (the returned gradient itself for fp32 hidden states); dC accumulates in an fp32 buffer covering
one slab of the vocabulary at a time (one launch per slab, the returned gradient itself for an fp32
classifier), cast to the classifier dtype after each slab.  This keeps fp32 accuracy across tiles at a
cost of ``4 * N * D`` bytes plus one slab for bf16/fp16 inputs; accumulating in bf16 instead (as the
paper's package does by default) would round each element once per tile.  Atomic adds make the
gradients non-deterministic at the level of fp32 rounding.

fp32 inputs use IEEE fp32 dots (no TF32), so fp32 results match PyTorch to fp32 rounding.  Under
``TRITON_INTERPRET=1`` the interpreter cannot multiply bf16/fp16 operands, so operands are rounded to the
low-precision dtype and multiplied in fp32, which is the same arithmetic as the tensor cores.

This module imports triton; import it lazily (see ``op.py``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .filtering import active_counter, compute_dtype
from .torch_chunked import check_labels

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_SLAB_BUFFER_BYTES = 32 << 20
_GROUP_ROWS = 8


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _block_config(operand_dtype: torch.dtype, *, backward: bool) -> dict[str, int]:
    """Tile sizes and launch parameters (small tiles under the interpreter to exercise the masks)."""
    if interpreting():
        return {"BLOCK_N": 32, "BLOCK_V": 128, "BLOCK_D": 32, "num_warps": 4, "num_stages": 1}
    if operand_dtype == torch.float32:
        return {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 32, "num_warps": 4, "num_stages": 2}
    if backward:
        return {"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 64, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 64, "num_warps": 8, "num_stages": 3}


_NOMINAL_MULTIPROCESSORS = 132


def _num_programs_target(device: torch.device) -> int:
    """Programs per launch that fill the device: 4 per multiprocessor (4 in all under the interpreter;
    an H100's 132 multiprocessors when no GPU can be queried, e.g. for fake tensors)."""
    if interpreting():
        return 4
    if device.type == "cuda" and torch.cuda.is_available():
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4 * _NOMINAL_MULTIPROCESSORS


def _operand_dtypes(hidden: Tensor, weight: Tensor) -> tuple[tl.dtype, tl.dtype, str]:
    """(rounding dtype of dot operands, dtype fed to tl.dot, dot precision).

    fp32 products use IEEE precision (no TF32); the precision flag does not apply to bf16/fp16.
    """
    operand = _TL_DTYPES[compute_dtype(hidden.dtype, weight.dtype)]
    if operand == tl.float32 or interpreting():
        return operand, tl.float32, "ieee"
    return operand, operand, "tf32"


@triton.jit
def _softcap(z, cap):
    """``cap * tanh(z / cap)``, written with exp so that it also runs in the interpreter."""
    return cap * (1.0 - 2.0 / (tl.exp(2.0 * (z / cap)) + 1.0))


@triton.jit
def _logit_tile(
    E, C, Bias, rows, offs_v, row_mask, v_mask, D, stride_e0, stride_e1, stride_c0, stride_c1, softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    OPERAND: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    """fp32 tile ``softcap(E[rows] @ C[offs_v].T + bias)`` of shape [BLOCK_N, BLOCK_V]."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_mask = d < D
        e = tl.load(E + rows[:, None] * stride_e0 + d[None, :] * stride_e1,
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        c = tl.load(C + offs_v[None, :] * stride_c0 + d[:, None] * stride_c1,
                    mask=v_mask[None, :] & d_mask[:, None], other=0.0)
        acc = tl.dot(e.to(OPERAND).to(DOT), c.to(OPERAND).to(DOT), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(Bias + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = _softcap(acc, softcap)
    return acc


@triton.jit
def _forward_kernel(
    E, C, Bias, RowIdx, Labels, LsePart, TargetPart,
    M, V, D, vocab_per_split, stride_e0, stride_e1, stride_c0, stride_c1, softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    OPERAND: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_split = tl.program_id(1)
    offs_m = pid_m * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_m < M
    rows = tl.load(RowIdx + offs_m, mask=row_mask, other=0).to(tl.int64)
    labels = tl.load(Labels + offs_m, mask=row_mask, other=-1)
    v_begin = pid_split * vocab_per_split
    v_end = tl.minimum(v_begin + vocab_per_split, V)

    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < v_end
        z = _logit_tile(E, C, Bias, rows, offs_v.to(tl.int64), row_mask, v_mask, D,
                        stride_e0, stride_e1, stride_c0, stride_c1, softcap,
                        BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, HAS_SOFTCAP, OPERAND, DOT, PRECISION)
        z = tl.where(v_mask[None, :], z, float("-inf"))
        target += tl.sum(tl.where(offs_v[None, :] == labels[:, None], z, 0.0), axis=1)
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max

    out = pid_split * M + offs_m
    tl.store(LsePart + out, run_max + tl.log(run_sum), mask=row_mask)
    tl.store(TargetPart + out, target, mask=row_mask)


@triton.jit
def _backward_kernel(
    E, C, Bias, RowIdx, Labels, Lse, Grad, dE, dC, dBias, Counters,
    M, V, D, v_offset, v_count,
    stride_e0, stride_e1, stride_c0, stride_c1, stride_de0, stride_de1, stride_dc0, stride_dc1,
    softcap, filter_eps,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_ROWS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FILTER: tl.constexpr, COUNT: tl.constexpr,
    COMPUTE_DE: tl.constexpr, COMPUTE_DC: tl.constexpr, COMPUTE_DBIAS: tl.constexpr,
    OPERAND: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    # Grouped ordering: consecutive programs share vocabulary tiles of GROUP_ROWS row blocks (L2 reuse).
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_N)
    num_v = tl.cdiv(v_count, BLOCK_V)
    per_group = GROUP_ROWS * num_v
    first_m = (pid // per_group) * GROUP_ROWS
    group_rows = tl.minimum(num_m - first_m, GROUP_ROWS)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_v = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_m < M
    rows = tl.load(RowIdx + offs_m, mask=row_mask, other=0).to(tl.int64)
    labels = tl.load(Labels + offs_m, mask=row_mask, other=-1)
    local_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_mask = local_v < v_count
    offs_v = (v_offset + local_v).to(tl.int64)

    z = _logit_tile(E, C, Bias, rows, offs_v, row_mask, v_mask, D,
                    stride_e0, stride_e1, stride_c0, stride_c1, softcap,
                    BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, HAS_SOFTCAP, OPERAND, DOT, PRECISION)
    lse = tl.load(Lse + offs_m, mask=row_mask, other=0.0)
    p = tl.exp(z - lse[:, None])
    p = tl.where(row_mask[:, None] & v_mask[None, :], p, 0.0)
    dz = tl.where(offs_v[None, :] == labels[:, None], p - 1.0, p)

    if FILTER:
        if tl.max(tl.abs(dz)) < filter_eps:
            if COUNT:
                tl.atomic_add(Counters + 1, 1)
            return
    if COUNT:
        tl.atomic_add(Counters, 1)

    grad = tl.load(Grad + offs_m, mask=row_mask, other=0.0)
    dz = dz * grad[:, None]
    if HAS_SOFTCAP:
        scaled = z / softcap
        dz = dz * (1.0 - scaled * scaled)
    if COMPUTE_DBIAS:
        tl.atomic_add(dBias + offs_v, tl.sum(dz, axis=0), mask=v_mask)
    dz_op = dz.to(OPERAND).to(DOT)

    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_mask = d < D
        if COMPUTE_DE:
            c = tl.load(C + offs_v[:, None] * stride_c0 + d[None, :] * stride_c1,
                        mask=v_mask[:, None] & d_mask[None, :], other=0.0)
            de = tl.dot(dz_op, c.to(OPERAND).to(DOT), input_precision=PRECISION)
            tl.atomic_add(dE + rows[:, None] * stride_de0 + d[None, :] * stride_de1, de,
                          mask=row_mask[:, None] & d_mask[None, :])
        if COMPUTE_DC:
            e = tl.load(E + rows[:, None] * stride_e0 + d[None, :] * stride_e1,
                        mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            dc = tl.dot(tl.trans(dz_op), e.to(OPERAND).to(DOT), input_precision=PRECISION)
            tl.atomic_add(dC + local_v[:, None].to(tl.int64) * stride_dc0 + d[None, :] * stride_dc1, dc,
                          mask=v_mask[:, None] & d_mask[None, :])


def _check_device(*tensors: Tensor) -> None:
    if not interpreting() and any(t.device.type != "cuda" for t in tensors):
        raise ValueError(
            "impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported, for "
            "CPU tensors). Move the tensors to a GPU or pass impl='torch'."
        )


def _valid_rows(labels: Tensor, ignore_index: int, vocab_size: int) -> tuple[Tensor, Tensor]:
    valid = labels != ignore_index
    check_labels(labels, valid, vocab_size)
    rows = valid.nonzero().squeeze(1)
    return rows, labels.index_select(0, rows).contiguous()


def num_vocab_splits(num_rows: int, vocab_size: int, block_n: int, block_v: int, device: torch.device) -> int:
    """Vocabulary splits of the forward launch so that the grid fills the device."""
    row_blocks = triton.cdiv(max(num_rows, 1), block_n)
    return max(1, min(triton.cdiv(vocab_size, block_v), triton.cdiv(_num_programs_target(device), row_blocks)))


def forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    ignore_index: int,
    softcap: float | None,
) -> tuple[Tensor, Tensor]:
    """Per-row loss [N] and log-sum-exp [N] (fp32, 0 on ignored rows)."""
    _check_device(hidden, weight)
    num_rows, dim = hidden.shape
    vocab_size = weight.shape[0]
    loss = torch.zeros(num_rows, dtype=torch.float32, device=hidden.device)
    lse = torch.zeros(num_rows, dtype=torch.float32, device=hidden.device)
    rows, targets = _valid_rows(labels, ignore_index, vocab_size)
    num_valid = rows.numel()
    if num_valid == 0:
        return loss, lse

    operand, dot, precision = _operand_dtypes(hidden, weight)
    cfg = _block_config(compute_dtype(hidden.dtype, weight.dtype), backward=False)
    splits = num_vocab_splits(num_valid, vocab_size, cfg["BLOCK_N"], cfg["BLOCK_V"], hidden.device)
    vocab_per_split = triton.cdiv(triton.cdiv(vocab_size, splits), cfg["BLOCK_V"]) * cfg["BLOCK_V"]
    splits = triton.cdiv(vocab_size, vocab_per_split)
    lse_part = torch.empty((splits, num_valid), dtype=torch.float32, device=hidden.device)
    target_part = torch.empty((splits, num_valid), dtype=torch.float32, device=hidden.device)
    grid = (triton.cdiv(num_valid, cfg["BLOCK_N"]), splits)
    _forward_kernel[grid](
        hidden, weight, bias, rows, targets, lse_part, target_part,
        num_valid, vocab_size, dim, vocab_per_split,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        1.0 if softcap is None else float(softcap),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"],
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        OPERAND=operand, DOT=dot, PRECISION=precision,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    row_lse = torch.logsumexp(lse_part, dim=0) if splits > 1 else lse_part[0]
    row_target = target_part.sum(dim=0)
    loss.index_copy_(0, rows, row_lse - row_target)
    lse.index_copy_(0, rows, row_lse)
    return loss, lse


def vocab_slab_rows(
    num_rows: int, vocab_size: int, dim: int, block_n: int, block_v: int, weight_dtype: torch.dtype,
    device: torch.device,
) -> int:
    """Vocabulary rows per backward launch.

    All of them for an fp32 classifier (its gradient is the accumulator).  Otherwise enough tiles for the
    launch to fill the device together with the row blocks, at most a 32 MiB fp32 buffer, at least
    one tile.
    """
    if weight_dtype == torch.float32:
        return vocab_size
    row_blocks = triton.cdiv(max(num_rows, 1), block_n)
    wanted = block_v * triton.cdiv(_num_programs_target(device), row_blocks)
    cap = (_SLAB_BUFFER_BYTES // (4 * max(dim, 1))) // block_v * block_v
    return min(vocab_size, max(block_v, min(wanted, cap)))


def workspace_bytes(
    num_rows: int,
    vocab_size: int,
    dim: int,
    hidden_dtype: torch.dtype,
    weight_dtype: torch.dtype,
    device: torch.device,
    *,
    backward: bool,
) -> int:
    """Upper bound of the temporary device memory of :func:`forward` (or :func:`backward`), in bytes.

    Forward: per-split partial log-sum-exp and target logit (fp32 [splits, N] each) and the row index and
    target vectors (32 bytes per row).  Backward: the fp32 dE accumulator (bf16/fp16 hidden), one fp32
    dC slab (bf16/fp16 classifier) and the row vectors.
    """
    operand = compute_dtype(hidden_dtype, weight_dtype)
    cfg = _block_config(operand, backward=backward)
    total = 32 * num_rows
    if not backward:
        splits = num_vocab_splits(num_rows, vocab_size, cfg["BLOCK_N"], cfg["BLOCK_V"], device)
        return total + 2 * 4 * num_rows * splits
    if hidden_dtype != torch.float32:
        total += 4 * num_rows * dim
    if weight_dtype != torch.float32:
        total += 4 * dim * vocab_slab_rows(
            num_rows, vocab_size, dim, cfg["BLOCK_N"], cfg["BLOCK_V"], weight_dtype, device
        )
    return total


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
    _check_device(hidden, weight)
    num_rows, dim = hidden.shape
    vocab_size = weight.shape[0]
    needs_bias_grad = needs_bias_grad and bias is not None
    rows, targets = _valid_rows(labels, ignore_index, vocab_size)
    num_valid = rows.numel()

    grad_hidden = torch.zeros((num_rows, dim), dtype=torch.float32, device=hidden.device) if needs_hidden_grad else None
    grad_weight = torch.empty_like(weight) if needs_weight_grad else None
    grad_bias = torch.zeros(vocab_size, dtype=torch.float32, device=hidden.device) if needs_bias_grad else None
    if num_valid == 0 or not (needs_hidden_grad or needs_weight_grad or needs_bias_grad):
        if grad_weight is not None:
            grad_weight.zero_()
        return _finish(grad_hidden, hidden), grad_weight, _finish(grad_bias, bias)

    operand, dot, precision = _operand_dtypes(hidden, weight)
    cfg = _block_config(compute_dtype(hidden.dtype, weight.dtype), backward=True)
    row_grad = grad_loss.index_select(0, rows).float().contiguous()
    row_lse = lse.index_select(0, rows).contiguous()
    counter = active_counter()
    counts = torch.zeros(2, dtype=torch.int32, device=hidden.device) if counter is not None else None
    slab, slab_buffer = vocab_size, None
    if grad_weight is not None and weight.dtype != torch.float32:
        slab = vocab_slab_rows(num_valid, vocab_size, dim, cfg["BLOCK_N"], cfg["BLOCK_V"], weight.dtype, hidden.device)
        slab_buffer = torch.empty((slab, dim), dtype=torch.float32, device=hidden.device)

    for v0 in range(0, vocab_size, slab):
        count = min(slab, vocab_size - v0)
        grad_c = None
        if grad_weight is not None:
            grad_c = grad_weight[v0:v0 + count] if slab_buffer is None else slab_buffer[:count]
            grad_c.zero_()
        grid = (triton.cdiv(num_valid, cfg["BLOCK_N"]) * triton.cdiv(count, cfg["BLOCK_V"]),)
        de_strides = (grad_hidden.stride(0), grad_hidden.stride(1)) if grad_hidden is not None else (0, 0)
        dc_strides = (grad_c.stride(0), grad_c.stride(1)) if grad_c is not None else (0, 0)
        _backward_kernel[grid](
            hidden, weight, bias, rows, targets, row_lse, row_grad,
            grad_hidden, grad_c, grad_bias, counts,
            num_valid, vocab_size, dim, v0, count,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            *de_strides, *dc_strides,
            1.0 if softcap is None else float(softcap),
            0.0 if filter_eps is None else float(filter_eps),
            BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"], GROUP_ROWS=_GROUP_ROWS,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            FILTER=filter_eps is not None, COUNT=counts is not None,
            COMPUTE_DE=grad_hidden is not None, COMPUTE_DC=grad_c is not None, COMPUTE_DBIAS=needs_bias_grad,
            OPERAND=operand, DOT=dot, PRECISION=precision,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        if slab_buffer is not None and grad_weight is not None:
            grad_weight[v0:v0 + count].copy_(slab_buffer[:count])

    if counter is not None and counts is not None:
        computed, skipped = counts.tolist()
        counter.computed += computed
        counter.skipped += skipped
    return _finish(grad_hidden, hidden), grad_weight, _finish(grad_bias, bias)


def _finish(grad: Tensor | None, like: Tensor | None) -> Tensor | None:
    """Cast an fp32 accumulator to the dtype of the tensor it is the gradient of."""
    if grad is None or like is None:
        return None
    return grad if grad.dtype == like.dtype else grad.to(like.dtype)
