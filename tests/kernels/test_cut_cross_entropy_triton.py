"""Cut cross-entropy (arXiv 2411.09009) Triton kernels, run by Triton's CPU interpreter.

TRITON_INTERPRET=1 is set before triton is imported (the kernels module is imported lazily, on the first
impl="triton" call).  The interpreter tiles are 32 rows x 128 vocabulary x 32 features, so the shapes
below have partial tiles on every axis, several row blocks and several forward vocabulary splits.

Reference: F.cross_entropy on float64 logits.  Relative-norm tolerances: float32 1e-5 (loss and
gradients); bfloat16/float16 1e-5 for the loss and 1e-2 for the gradients (the kernels round
softmax - onehot to the operand dtype before the tensor-core products, as on the GPU).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from memft.kernels.cut_cross_entropy import count_backward_blocks, linear_cross_entropy  # noqa: E402

GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    scale = expected.norm().item()
    err = (actual.double() - expected).norm().item()
    return err / scale if scale > 0 else err


def make_inputs(n, v, d, dtype, *, bias=False, ignore_every=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g) / d**0.25).to(dtype).requires_grad_()
    b = torch.randn(v, generator=g).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    return hidden, weight, b, labels


def check(hidden, weight, bias, labels, *, reduction="mean", softcap=None, normalizer=None, filter_eps=None):
    """Triton loss and gradients against float64 full logits."""
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, reduction=reduction, softcap=softcap,
                                normalizer=normalizer, impl="triton", filter_eps=filter_eps)
    grad_out = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1)) if reduction == "none" else None
    inputs = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(loss, inputs, grad_out)

    leaves = {id(t): t.detach().double().requires_grad_(t.requires_grad) for t in (hidden, weight, bias) if t is not None}
    h, w = leaves[id(hidden)], leaves[id(weight)]
    logits = h @ w.t() + (0 if bias is None else leaves[id(bias)])
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if normalizer is not None:
        ref = F.cross_entropy(logits, labels, reduction="sum") / normalizer
    else:
        ref = F.cross_entropy(logits, labels, reduction=reduction)
    ref_grads = torch.autograd.grad(ref, [leaves[id(t)] for t in inputs], grad_out.double() if grad_out is not None else None)

    assert rel(loss, ref) < 1e-5, (rel(loss, ref), loss, ref)
    for grad, ref_grad, inp in zip(grads, ref_grads, inputs):
        assert grad.dtype == inp.dtype and grad.shape == inp.shape
        assert rel(grad, ref_grad) < GRAD_TOL[hidden.dtype], rel(grad, ref_grad)


def test_fp32_bias_softcap_ignore_mean():
    check(*make_inputs(40, 600, 40, torch.float32, bias=True, ignore_every=3), softcap=4.0)


def test_fp32_reduction_none():
    check(*make_inputs(40, 600, 40, torch.float32, seed=1), reduction="none")


def test_fp32_normalizer():
    check(*make_inputs(40, 300, 24, torch.float32, ignore_every=4, seed=2), normalizer=torch.tensor(50))


def test_bf16_softcap_bias_several_vocab_slabs():
    from memft.kernels.cut_cross_entropy import triton_kernels

    hidden, weight, bias, labels = make_inputs(40, 600, 40, torch.bfloat16, bias=True, ignore_every=5, seed=3)
    valid_rows = int((labels != -100).sum())
    slab = triton_kernels.vocab_slab_rows(valid_rows, 600, 40, 32, 128, torch.bfloat16, torch.device("cpu"))
    assert slab < 600 and 600 % slab != 0, "the classifier gradient must be accumulated over several slabs"
    check(hidden, weight, bias, labels, softcap=3.0)


def test_fp16_sum_with_frozen_weight():
    hidden, weight, _, labels = make_inputs(33, 400, 16, torch.float16, seed=4)
    weight.requires_grad_(False)
    check(hidden, weight, None, labels, reduction="sum")


def test_single_row_odd_dim():
    check(*make_inputs(1, 130, 7, torch.float32, seed=5))


def test_all_rows_ignored():
    hidden, weight, bias, labels = make_inputs(5, 130, 8, torch.float32, bias=True)
    labels[:] = -100
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, impl="triton")
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    assert loss.item() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_gradient_filtering_skips_tiles():
    n, v, active = 40, 512, 128
    hidden, weight, _, _ = make_inputs(n, v, 16, torch.bfloat16, seed=6)
    bias = torch.where(torch.arange(v) < active, 0.0, -30.0).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, active, (n,), generator=torch.Generator().manual_seed(7))
    with count_backward_blocks() as tiles:
        check(hidden, weight, bias, labels, filter_eps="auto")
    row_tiles, vocab_tiles = 2, v // 128
    assert tiles.total == row_tiles * vocab_tiles
    assert tiles.skipped == row_tiles * (vocab_tiles - 1), tiles


def test_matches_torch_path():
    hidden, weight, bias, labels = make_inputs(40, 300, 24, torch.float32, bias=True, ignore_every=6, seed=8)
    losses = [linear_cross_entropy(hidden, weight, labels, bias=bias, softcap=2.0, reduction="none", impl=impl)
              for impl in ("torch", "triton")]
    assert rel(losses[1], losses[0]) < 1e-6


def test_triton_needs_cuda_or_interpreter(monkeypatch):
    hidden, weight, _, labels = make_inputs(4, 10, 8, torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="CUDA"):
        linear_cross_entropy(hidden, weight, labels, impl="triton")
