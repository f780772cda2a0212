"""Fused forward-backward of cut cross-entropy (arXiv 2411.09009): fp32, scalar reduction.

The gradients come out of the forward, from one logit product per block of full-vocabulary rows.
Checked against float64 logits (relative norm 1e-5, as the recompute path) and against the recompute
path itself (1e-6), for its product count, its memory and a second backward through the same graph.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from memft.kernels.cut_cross_entropy import linear_cross_entropy, torch_chunked, workspace_bytes
from memft.kernels.cut_cross_entropy.op import linear_cross_entropy_fused

from .test_cut_cross_entropy import _peak_extra_bytes, make_inputs, reference, rel


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 7 rows (the last one partial) on small problems; records every plan it hands out."""
    plans = []

    def plan(num_rows, vocab_size):
        plans.append((num_rows, vocab_size))
        return 7

    monkeypatch.setattr(torch_chunked, "plan_fused_rows", plan)
    return plans


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("ignore_every", [0, 5])
def test_matches_float64_logits(small_blocks, reduction, softcap, bias, ignore_every):
    hidden, weight, b, labels = make_inputs(40, 50, 8, torch.float32, bias=bias, ignore_every=ignore_every)
    loss = linear_cross_entropy(hidden, weight, labels, bias=b, reduction=reduction, softcap=softcap)
    inputs = [t for t in (hidden, weight, b) if t is not None]
    grads = torch.autograd.grad(loss * 3.0, inputs)
    ref_loss, ref_grads = reference(hidden, weight, b, labels, reduction=reduction, softcap=softcap)
    assert small_blocks == [(40, 50)]
    assert rel(loss, ref_loss) < 1e-5
    for grad, ref_grad in zip(grads, [g for g in ref_grads if g is not None]):
        assert rel(grad, 3.0 * ref_grad) < 1e-5


def test_normalizer_and_frozen_weight(small_blocks):
    hidden, weight, bias, labels = make_inputs(30, 50, 8, torch.float32, bias=True, ignore_every=4)
    weight.requires_grad_(False)
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, normalizer=torch.tensor(17.0))
    loss.backward()
    _, (ref_h, _, ref_b) = reference(hidden, weight, bias, labels, normalizer=17.0)
    assert small_blocks and weight.grad is None
    assert rel(hidden.grad, ref_h) < 1e-5 and rel(bias.grad, ref_b) < 1e-5


def test_same_loss_and_gradients_as_the_recompute_path():
    n, v, d = 1100, 8192, 16
    assert torch_chunked.plan_fused_rows(n, v) is not None
    hidden, weight, bias, labels = make_inputs(n, v, d, torch.float32, bias=True, ignore_every=9)
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, softcap=20.0)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    row_loss = linear_cross_entropy(hidden, weight, labels, bias=bias, softcap=20.0, reduction="none")
    recompute = row_loss.sum() / (labels != -100).sum()
    recompute_grads = torch.autograd.grad(recompute, (hidden, weight, bias))
    assert rel(loss, recompute) < 1e-6
    for grad, expected in zip(grads, recompute_grads):
        assert rel(grad, expected) < 1e-6


class _ProductFlops(TorchDispatchMode):
    """Flops of every matrix product (mm / addmm, in place or not) dispatched while active."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_"):
            a, b = args[-2:]
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


def _mm_flops(fn) -> int:
    with _ProductFlops() as counter:
        fn()
    return counter.flops


def test_three_logit_products_instead_of_four():
    n, v, d = 1024, 8192, 4
    hidden, weight, _, labels = make_inputs(n, v, d, torch.float32)
    hidden, weight = hidden.detach(), weight.detach()
    product = 2 * n * v * d

    def recompute():
        loss, lse = torch_chunked.forward(hidden, weight, None, labels, -100, None)
        torch_chunked.backward(torch.ones(n), hidden, weight, None, labels, lse, -100, None, None, True, True, False)

    assert _mm_flops(recompute) == 4 * product
    assert _mm_flops(lambda: torch_chunked.forward_backward(
        hidden, weight, None, labels, -100, None, True, True, False)) == 3 * product


@pytest.mark.parametrize("softcap", [None, 10.0])
def test_memory_is_one_eighth_of_the_logits_at_most(softcap):
    n, v, d = 1024, 8192, 8
    hidden, weight, _, labels = make_inputs(n, v, d, torch.float32)
    hidden, weight = hidden.detach(), weight.detach()
    extra = _peak_extra_bytes(
        lambda: torch_chunked.forward_backward(hidden, weight, None, labels, -100, softcap, True, True, False),
        (hidden, weight, labels))
    blocks = 1 if softcap is None else 2
    assert extra <= blocks * n * v * 4 / 8 + 32 * n, extra
    bound = workspace_bytes(n, v, d, torch.float32, torch.float32, impl="torch", device="cpu",
                            softcap=softcap is not None, fused=True)
    assert extra <= bound, (extra, bound)


def test_falls_back_to_the_recompute_bound_on_few_rows():
    n, v, d = 512, 8192, 8
    assert torch_chunked.plan_fused_rows(n, v) is None
    fused = workspace_bytes(n, v, d, torch.float32, torch.float32, impl="torch", device="cpu", fused=True)
    assert fused == workspace_bytes(n, v, d, torch.float32, torch.float32, impl="torch", device="cpu")


@pytest.mark.parametrize("rows", [1100, 40])
def test_second_backward_through_the_graph(small_blocks, rows):
    hidden, weight, _, labels = make_inputs(rows, 50, 8, torch.float32, ignore_every=6)
    loss = linear_cross_entropy(hidden, weight, labels)
    first = torch.autograd.grad(loss * 2.0, (hidden, weight), retain_graph=True)
    second = torch.autograd.grad(loss, (hidden, weight))
    for a, b in zip(first, second):
        assert rel(a, 2.0 * b) < 1e-6


def test_fake_tensors_give_the_real_outputs():
    hidden, weight, bias, labels = make_inputs(12, 50, 8, torch.float32, bias=True, ignore_every=4)
    args = (hidden.detach(), weight.detach(), bias.detach(), labels, -100, 2.0, True, False, True)
    real = linear_cross_entropy_fused(*args)
    with FakeTensorMode() as mode:
        fake = linear_cross_entropy_fused(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]


def test_opcheck():
    """Without ``test_aot_dispatch_dynamic``: it returns every output of the op from the traced graph, and
    the backward scales the gradient outputs in place, which aot_autograd forbids for graph outputs.
    ``linear_cross_entropy`` keeps them internal; :func:`test_torch_compile_matches_eager` covers it."""
    hidden, weight, bias, labels = make_inputs(12, 50, 8, torch.float32, bias=True, ignore_every=4)
    torch.library.opcheck(linear_cross_entropy_fused, (hidden, weight, bias, labels, -100, 2.0, True, True, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_torch_compile_matches_eager(small_blocks):
    hidden, weight, bias, labels = make_inputs(40, 50, 8, torch.float32, bias=True, ignore_every=3)

    def loss_fn(h, w, b, y):
        return linear_cross_entropy(h, w, y, bias=b, softcap=5.0) * 2.0

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    loss = compiled(hidden, weight, bias, labels)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    ref_loss = loss_fn(hidden, weight, bias, labels)
    ref_grads = torch.autograd.grad(ref_loss, (hidden, weight, bias))
    assert small_blocks
    assert rel(loss, ref_loss) < 1e-6
    for grad, ref_grad in zip(grads, ref_grads):
        assert rel(grad, ref_grad) < 1e-6


def test_backward_adds_no_copy_of_the_gradients():
    """Tracked through autograd: the gradients made in the forward become ``.grad`` as they are."""
    from memft.memory import MemoryTracker

    n, v, d = 1024, 8192, 8
    hidden, weight, _, labels = make_inputs(n, v, d, torch.float32)
    with MemoryTracker() as tracker:
        linear_cross_entropy(hidden, weight, labels).backward()
    extra = tracker.peak_bytes - 2 * (hidden.nbytes + weight.nbytes) - labels.nbytes
    assert extra <= 32 * n, extra
