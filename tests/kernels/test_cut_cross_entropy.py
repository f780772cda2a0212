"""Cut cross-entropy (arXiv 2411.09009), chunked PyTorch path and custom-op machinery.

Reference: F.cross_entropy on fully materialised float64 logits of the same (upcast) inputs.
Tolerances, as relative norms ||x - ref|| / ||ref||: float32 1e-5 for the loss and every gradient;
bfloat16/float16 inputs 1e-5 for the loss (computed in fp32 from exactly representable inputs) and
1e-2 for the gradients (rounded once to the input dtype).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from memft.kernels.cut_cross_entropy import (
    count_backward_blocks,
    linear_cross_entropy,
    torch_chunked,
    workspace_bytes,
)
from memft.kernels.cut_cross_entropy.op import linear_cross_entropy_backward, linear_cross_entropy_forward

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
    b = (torch.randn(v, generator=g)).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    return hidden, weight, b, labels


def reference(hidden, weight, bias, labels, *, reduction="mean", softcap=None, normalizer=None, grad_out=None):
    """Loss and gradients from float64 logits and F.cross_entropy."""
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    leaves.append(None if bias is None else bias.detach().double().requires_grad_())
    h, w, b = leaves
    logits = h @ w.t() + (0 if b is None else b)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if normalizer is not None:
        loss = F.cross_entropy(logits, labels, reduction="sum") / normalizer
    else:
        loss = F.cross_entropy(logits, labels, reduction=reduction)
    loss.backward(grad_out.double() if grad_out is not None else None)
    return loss.detach(), [None if t is None else t.grad for t in leaves]


def check_against_reference(hidden, weight, bias, labels, *, impl="torch", reduction="mean", softcap=None,
                            normalizer=None, filter_eps="auto"):
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, reduction=reduction, softcap=softcap,
                                normalizer=normalizer, impl=impl, filter_eps=filter_eps)
    grad_out = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1)) if reduction == "none" else None
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    grads = torch.autograd.grad(loss, inputs, grad_out)
    ref_loss, ref_grads = reference(hidden, weight, bias, labels, reduction=reduction, softcap=softcap,
                                    normalizer=normalizer, grad_out=grad_out)
    assert loss.dtype == torch.float32
    assert rel(loss, ref_loss) < 1e-5, (rel(loss, ref_loss), loss, ref_loss)
    tol = GRAD_TOL[hidden.dtype]
    for name, grad, ref_grad, inp in zip(("hidden", "weight", "bias"), grads, [g for g in ref_grads if g is not None], inputs):
        assert grad.dtype == inp.dtype and grad.shape == inp.shape
        assert rel(grad, ref_grad) < tol, (name, rel(grad, ref_grad))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_matches_full_logits(dtype, reduction, softcap):
    hidden, weight, bias, labels = make_inputs(37, 1000, 33, dtype, bias=True, ignore_every=5)
    check_against_reference(hidden, weight, bias, labels, reduction=reduction, softcap=softcap, filter_eps=None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multiple_chunks_on_both_axes(dtype):
    hidden, weight, bias, labels = make_inputs(1000, 700, 17, dtype, bias=True, ignore_every=7)
    valid_rows = int((labels != -100).sum())
    rows, vocab = torch_chunked.plan_chunks(valid_rows, 700)
    assert valid_rows % rows != 0 and 700 % vocab != 0, "must span several row and vocabulary chunks with tails"
    check_against_reference(hidden, weight, bias, labels, softcap=3.0, filter_eps=None)


def test_single_row_and_odd_dim():
    hidden, weight, _, labels = make_inputs(1, 257, 7, torch.float32)
    check_against_reference(hidden, weight, None, labels)


@pytest.mark.parametrize("normalizer", [13, torch.tensor(29)])
def test_normalizer_divides_the_sum(normalizer):
    hidden, weight, _, labels = make_inputs(24, 300, 16, torch.float32, ignore_every=3)
    check_against_reference(hidden, weight, None, labels, normalizer=normalizer)


def test_mixed_dtypes_follow_lower_precision():
    hidden, weight, _, labels = make_inputs(20, 300, 16, torch.bfloat16)
    weight32 = weight.detach().float().requires_grad_()
    loss = linear_cross_entropy(hidden, weight32, labels)
    gh, gw = torch.autograd.grad(loss, (hidden, weight32))
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.float32
    ref_loss, (ref_gh, ref_gw, _) = reference(hidden, weight32, None, labels)
    assert rel(loss, ref_loss) < 1e-5 and rel(gh, ref_gh) < 1e-2 and rel(gw, ref_gw) < 1e-5


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_gives_zero_loss_and_zero_grads(reduction):
    hidden, weight, bias, labels = make_inputs(9, 100, 8, torch.float32, bias=True)
    labels[:] = -100
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, reduction=reduction)
    assert torch.equal(loss, torch.zeros_like(loss)) and not torch.isnan(loss).any()
    grads = torch.autograd.grad(loss.sum(), (hidden, weight, bias))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_custom_ignore_index_and_leading_dims():
    hidden, weight, _, labels = make_inputs(24, 200, 16, torch.float32)
    labels[::4] = 7
    h3, y3 = hidden.view(2, 12, 16), labels.view(2, 12)
    loss = linear_cross_entropy(h3, weight, y3, ignore_index=7, reduction="none")
    assert loss.shape == (2, 12) and torch.all(loss.view(-1)[::4] == 0)
    ref = F.cross_entropy((hidden @ weight.t()).double(), labels, ignore_index=7, reduction="none")
    assert rel(loss.view(-1), ref) < 1e-5


def test_frozen_weight_gets_no_gradient():
    hidden, weight, _, labels = make_inputs(16, 100, 8, torch.float32)
    weight.requires_grad_(False)
    linear_cross_entropy(hidden, weight, labels).backward()
    assert weight.grad is None and hidden.grad is not None


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"reduction": "avg"}, ValueError),
        ({"softcap": -1.0}, ValueError),
        ({"normalizer": 0}, ValueError),
        ({"normalizer": 4, "reduction": "sum"}, ValueError),
        ({"impl": "cuda"}, ValueError),
        ({"filter_eps": "fast"}, ValueError),
    ],
)
def test_bad_arguments_raise(kwargs, error):
    hidden, weight, _, labels = make_inputs(4, 10, 8, torch.float32)
    with pytest.raises(error):
        linear_cross_entropy(hidden, weight, labels, **kwargs)


def test_bad_shapes_and_labels_raise():
    hidden, weight, _, labels = make_inputs(4, 10, 8, torch.float32)
    with pytest.raises(ValueError, match="leading shape"):
        linear_cross_entropy(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match="last dimension"):
        linear_cross_entropy(hidden, weight.t(), labels)
    with pytest.raises(TypeError, match="integer"):
        linear_cross_entropy(hidden, weight, labels.float())
    labels[1] = 10
    with pytest.raises(ValueError, match="outside the vocabulary"):
        linear_cross_entropy(hidden, weight, labels)


def peaked_problem(n, v, d, active, dtype, seed=0):
    """Labels in the first ``active`` vocabulary entries; the rest sit ~30 nats lower (softmax ~1e-13)."""
    hidden, weight, _, _ = make_inputs(n, v, d, dtype, seed=seed)
    bias = torch.where(torch.arange(v) < active, 0.0, -30.0).to(dtype).requires_grad_()
    labels = torch.randint(0, active, (n,), generator=torch.Generator().manual_seed(seed + 1))
    return hidden, weight, bias, labels


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gradient_filtering_skips_negligible_blocks(dtype):
    n, v = 600, 2048
    rows, vocab = torch_chunked.plan_chunks(n, v)
    row_blocks, vocab_blocks = -(-n // rows), -(-v // vocab)
    hidden, weight, bias, labels = peaked_problem(n, v, 16, vocab, dtype)
    eps = "auto" if dtype == torch.bfloat16 else 1e-6
    with count_backward_blocks() as blocks:
        loss = linear_cross_entropy(hidden, weight, labels, bias=bias, filter_eps=eps)
        grads = torch.autograd.grad(loss, (hidden, weight, bias))
    assert blocks.total == row_blocks * vocab_blocks
    assert blocks.skipped == row_blocks * (vocab_blocks - 1), blocks
    exact = torch.autograd.grad(linear_cross_entropy(hidden, weight, labels, bias=bias, filter_eps=None),
                                (hidden, weight, bias))
    _, ref_grads = reference(hidden, weight, bias, labels)
    for grad, exact_grad, ref_grad in zip(grads, exact, ref_grads):
        assert rel(grad, ref_grad) < GRAD_TOL[dtype]
        assert rel(grad, exact_grad) < GRAD_TOL[dtype]


def test_no_filtering_for_fp32_by_default():
    hidden, weight, bias, labels = peaked_problem(64, 512, 8, 128, torch.float32)
    with count_backward_blocks() as blocks:
        linear_cross_entropy(hidden, weight, labels, bias=bias).backward()
    assert blocks.skipped == 0 and blocks.computed > 0


def test_fake_tensor_forward_and_backward():
    with FakeTensorMode():
        hidden = torch.randn(8192, 2304, dtype=torch.bfloat16, requires_grad=True)
        weight = torch.randn(256000, 2304, dtype=torch.bfloat16, requires_grad=True)
        labels = torch.randint(0, 256000, (8192,))
        loss = linear_cross_entropy(hidden, weight, labels, softcap=30.0, normalizer=torch.tensor(5000))
        loss.backward()
        assert loss.shape == () and loss.dtype == torch.float32
        assert hidden.grad.shape == hidden.shape and hidden.grad.dtype == torch.bfloat16
        assert weight.grad.shape == weight.shape and weight.grad.dtype == torch.bfloat16


def test_opcheck_forward_and_backward():
    hidden, weight, bias, labels = make_inputs(12, 50, 8, torch.float32, bias=True, ignore_every=4)
    fwd_args = (hidden, weight, bias, labels, -100, 2.0, None, "torch")
    torch.library.opcheck(linear_cross_entropy_forward, fwd_args)
    _, lse = linear_cross_entropy_forward(*fwd_args)
    bwd_args = (torch.randn(12), hidden.detach(), weight.detach(), bias.detach(), labels, lse, -100, 2.0, None,
                "torch", True, True, True)
    torch.library.opcheck(linear_cross_entropy_backward, bwd_args)


def test_torch_compile_matches_eager():
    hidden, weight, _, labels = make_inputs(16, 64, 8, torch.float32, ignore_every=3)

    def loss_fn(h, w, y):
        return linear_cross_entropy(h, w, y, softcap=5.0, impl="torch") * 2.0

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    loss = compiled(hidden, weight, labels)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    ref_loss = loss_fn(hidden, weight, labels)
    ref_gh, ref_gw = torch.autograd.grad(ref_loss, (hidden, weight))
    assert rel(loss, ref_loss) < 1e-6 and rel(gh, ref_gh) < 1e-6 and rel(gw, ref_gw) < 1e-6


def _peak_extra_bytes(fn, baseline_tensors) -> int:
    """Peak tracked storage while ``fn`` runs, minus the inputs it reads and the outputs it returns."""
    from memft.memory import MemoryTracker

    with MemoryTracker() as tracker:
        outputs = fn()
        kept = sum(t.untyped_storage().nbytes() for t in outputs if t is not None)
    inputs = sum(t.untyped_storage().nbytes() for t in baseline_tensors)
    return tracker.peak_bytes - inputs - kept


def test_memory_is_a_small_fraction_of_the_logits():
    n, v, d = 1024, 16384, 8
    hidden, weight, _, labels = make_inputs(n, v, d, torch.float32)
    hidden, weight = hidden.detach(), weight.detach()
    logits_bytes = n * v * 4
    loss, lse = torch_chunked.forward(hidden, weight, None, labels, -100, None)
    fwd_extra = _peak_extra_bytes(
        lambda: torch_chunked.forward(hidden, weight, None, labels, -100, None), (hidden, weight, labels))
    grad_loss = torch.ones(n)
    bwd_extra = _peak_extra_bytes(
        lambda: torch_chunked.backward(grad_loss, hidden, weight, None, labels, lse, -100, None, None, True, True, False),
        (grad_loss, hidden, weight, labels, lse))
    assert max(fwd_extra, bwd_extra) <= 0.01 * logits_bytes, (fwd_extra, bwd_extra, logits_bytes)
    bound = workspace_bytes(n, v, d, torch.float32, torch.float32, impl="torch", device="cpu")
    assert max(fwd_extra, bwd_extra) <= bound, (fwd_extra, bwd_extra, bound)
