"""The block-wise 8-bit codec against bitsandbytes, and the per-element step of every 8-bit optimizer.

Code books are bitsandbytes' dynamic maps; its kernels run real steps, the pure-torch reference (used
without it) must give the same bytes, and fake tensors (the memory planner) must allocate what real ones do.
Step bound: after ``t`` Adam steps from zero moments, ``|update| / lr <= √(K_t (1 - β2^t)) / (1 - β1^t)`` per
element, ``K_t = (1 - β1)² / (1 - β2) · Σ_{k<t} (β1² / β2)^k`` (Cauchy-Schwarz; at most 1.016 for t <= 6);
8-bit moments must stay within it on gradients whose elements span six orders of magnitude inside a block.
"""

import math
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from memft.optimizers import _blockwise8bit as q8
from memft.optimizers.galore import GaLoreAdamW8bit, adam_moment_bound
from memft.optimizers.layerwise import LayerwiseOptimizer
from memft.optimizers.projector import LowRankProjector

bnb_functional = pytest.importorskip("bitsandbytes.functional")
BETAS = (0.9, 0.999)
LR, SCALE, RANK = 1e-3, 0.25, 8
SHAPE = (1024, 96)  # blocks of 256 span rows, so zero rows share blocks with non-zero ones
STEPS = 6


def series_bound(t: int, betas=BETAS) -> float:
    beta1, beta2 = betas
    return (1 - beta1) ** 2 / (1 - beta2) * sum((beta1**2 / beta2) ** k for k in range(t))


def adam_step_bound(t: int) -> float:
    beta1, beta2 = BETAS
    return math.sqrt(series_bound(t) * (1 - beta2**t)) / (1 - beta1**t)


# ---------------------------------------------------------------- code books and bytes
@pytest.mark.parametrize("signed", [True, False])
def test_code_books_are_the_bitsandbytes_dynamic_maps(signed):
    book = q8.code_book(signed)
    assert book.dtype == torch.float32 and book.numel() == 256 and torch.all(book.diff() > 0)
    assert torch.equal(book, bnb_functional.create_dynamic_map(signed=signed))
    assert book[-1] == 1 and (0 in book) and (book[0] == 0 if not signed else -1 < book[0] < -0.99)


def _codec_inputs(signed: bool) -> torch.Tensor:
    """Six orders of magnitude inside blocks, an all-zero block, values one ulp around the 65535 bin edges
    and the code midpoints, random block maxima, and a partial last block."""
    gen = torch.Generator().manual_seed(0)
    spread = torch.randn(200_000, generator=gen) * 10 ** (-6 * torch.rand(200_000, generator=gen))
    spread[:256] = 0
    edges = ((torch.arange(1, q8.LUT_BINS, dtype=torch.float64) - 0.5) / (q8.LUT_BINS - 1) * 2 - 1).float()
    book = q8.code_book(signed)
    marks = torch.cat([edges, (book[:-1] + book[1:]) / 2])
    marks = torch.cat([marks, torch.nextafter(marks, torch.tensor(2.0)), torch.nextafter(marks, torch.tensor(-2.0))])
    rows = -(-marks.numel() // 255)
    blocks = torch.cat([torch.ones(rows, 1), torch.cat([marks, torch.zeros(rows * 255 - marks.numel())]).view(rows, 255)], 1)
    blocks = blocks * 10 ** (4 * torch.rand(rows, 1, generator=gen) - 2)
    data = torch.cat([spread, blocks.view(-1)])[:-77]
    return data if signed else data.abs()


@pytest.mark.parametrize("signed", [True, False])
def test_reference_codec_gives_the_bytes_of_the_bitsandbytes_kernels(signed):
    assert q8.bitsandbytes_ops() is not None  # so q8.quantize / dequantize below run bitsandbytes' kernels
    data = _codec_inputs(signed)
    codes, absmax = q8.reference_quantize(data, signed)
    bnb_codes, state = bnb_functional.quantize_blockwise(data, code=q8.code_book(signed), blocksize=q8.BLOCK_SIZE)
    assert torch.equal(codes, bnb_codes) and torch.equal(absmax, state.absmax)
    real_codes, real_absmax = q8.quantize(data, signed)  # padded to whole blocks with code 0
    assert torch.equal(real_codes[: data.numel()], codes) and torch.equal(real_absmax, absmax)
    assert not real_codes[data.numel() :].any()
    values = q8.reference_dequantize(codes, absmax, signed)
    assert torch.equal(values, bnb_functional.dequantize_blockwise(bnb_codes, state, blocksize=q8.BLOCK_SIZE))
    assert torch.equal(values, q8.dequantize(real_codes, real_absmax, data.shape, signed))


def test_a_first_import_under_fake_tensor_mode_leaves_real_tables():
    """The planner may import the codec, and through it bitsandbytes, inside FakeTensorMode (fresh process)."""
    script = """
import torch
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake
with FakeTensorMode(allow_non_fake_inputs=True):
    from memft.optimizers import _blockwise8bit as q8
    assert is_fake(q8.quantize(torch.randn(300), signed=True)[0])
from bitsandbytes.backends import utils
assert not is_fake(utils._NF4_QUANT_TABLE)
codes, absmax = q8.quantize(torch.ones(300), signed=True)
assert torch.equal(q8.dequantize(codes, absmax, (300,), signed=True), torch.ones(300))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


# ---------------------------------------------------------------- fake tensors allocate what real ones do
class _Calls(TorchDispatchMode):
    """Every op that returns tensors, with their shapes and dtypes (fake tensors also dispatch metadata queries)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        tensors = tuple((tuple(t.shape), t.dtype) for t in outs if isinstance(t, torch.Tensor))
        if tensors:
            self.calls.append((str(func), tensors))
        return out


def _recorded_steps(monkeypatch) -> list:
    """Two GaLoreAdamW8bit steps (subspace refresh, then none) of a GaLore and a plain weight, in chunks with a
    partial last block. Code books are built before recording: real tensors reuse a cached one."""
    books = {signed: q8.code_book(signed) for signed in (True, False)}
    monkeypatch.setattr(q8, "_book_like", lambda x, signed: books[signed])
    gen = torch.Generator().manual_seed(0)
    grads = [(torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)) for _ in range(2)]
    low_rank, plain = nn.Parameter(torch.zeros(SHAPE)), nn.Parameter(torch.zeros(SHAPE))
    opt = GaLoreAdamW8bit([{"params": [low_rank], "rank": RANK}, {"params": [plain]}], lr=LR, chunk_numel=40 * 256)
    with _Calls() as recorder:
        for low_rank.grad, plain.grad in grads:
            opt.step()
    return recorder.calls


@pytest.mark.parametrize("kernels", ["bitsandbytes", "reference"])
def test_fake_tensors_allocate_the_shapes_and_dtypes_real_tensors_do(monkeypatch, kernels):
    if kernels == "reference":
        monkeypatch.setattr(q8, "_kernels", lambda x: None)
    real = _recorded_steps(monkeypatch)
    with FakeTensorMode():
        fake = _recorded_steps(monkeypatch)
    assert fake == real
    names = {name for name, _ in real}
    assert ("bitsandbytes.quantize_blockwise.default" in names) == (kernels == "bitsandbytes")
    assert ("bitsandbytes.dequantize_blockwise.default" in names) == (kernels == "bitsandbytes")


# ---------------------------------------------------------------- per-element step bound
def test_adam_moment_bound_is_the_cauchy_schwarz_bound_of_exact_moments():
    for betas in (BETAS, (0.95, 0.98), (0.0, 0.99), (0.99, 0.95)):
        for n in (1, 2, 7, 50):
            assert adam_moment_bound(betas, n) == pytest.approx(series_bound(n, betas), rel=1e-12)
    assert adam_moment_bound(BETAS, 0) == 0 and adam_moment_bound((0.9, 0.0), 3) == math.inf
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(50, 10_000, generator=gen, dtype=torch.float64) * 10 ** (3 * torch.rand(50, 1, generator=gen))
    m = v = torch.zeros(10_000, dtype=torch.float64)
    for n, g in enumerate(grads, start=1):
        m, v = BETAS[0] * m + (1 - BETAS[0]) * g, BETAS[1] * v + (1 - BETAS[1]) * g * g
        ratio = (m * m / v).max().item()
        assert ratio <= adam_moment_bound(BETAS, n) * (1 + 1e-9)
        assert n > 1 or ratio == pytest.approx(adam_moment_bound(BETAS, 1))  # equality after one step


def _spread_gradients(seed: int, per: str) -> list[torch.Tensor]:
    """Per step: a quarter of the rows zero, random signs, magnitudes 1e-2 * 10**(-6u) with u uniform per
    element (``per="element"``) or per row (``"row"``: the projected gradient G Q of a GaLore weight keeps
    the rows' six orders of magnitude)."""
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(STEPS):
        u = torch.rand(SHAPE[0], 1 if per == "row" else SHAPE[1], generator=gen)
        grad = torch.randn(SHAPE, generator=gen).sign() * 1e-2 * 10 ** (-6 * u)
        grad[torch.rand(SHAPE[0], generator=gen) < 0.25] = 0
        grads.append(grad)
    return grads


class _Prescribed(nn.Module):
    """``loss = Σ W ⊙ G`` for a GaLore weight and a plain weight: backward gives each the gradient G of the step."""

    def __init__(self):
        super().__init__()
        self.low_rank = nn.Parameter(torch.zeros(SHAPE))
        self.plain = nn.Parameter(torch.zeros(SHAPE))

    def forward(self, low_rank_grad, plain_grad):
        return (self.low_rank * low_rank_grad).sum() + (self.plain * plain_grad).sum()


def _adamw8bit_recipe_optimizer(model):
    from memft.methods.optimizers import AdamW8bitSection, _adamw8bit

    return _adamw8bit(model, AdamW8bitSection(name="adamw8bit", lr=LR, betas=BETAS, weight_decay=0.0), None)


OPTIMIZERS = {
    "galore_adamw8bit": lambda model, groups: GaLoreAdamW8bit(groups, lr=LR, betas=BETAS),
    "galore_adamw8bit layerwise": lambda model, groups: LayerwiseOptimizer(groups, GaLoreAdamW8bit, lr=LR, betas=BETAS),
    "adamw8bit (bitsandbytes)": lambda model, groups: _adamw8bit_recipe_optimizer(model),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_8bit_steps_stay_within_adams_per_element_bound(name):
    """|update| <= 1.5 lr per element; memft's own 8-bit optimizers within Adam's bound. A GaLore weight's
    element-wise Adam step is its low-rank direction N = P(ΔW) / (-lr · scale) (orthonormal basis)."""
    model = _Prescribed()
    groups = [{"params": [model.low_rank], "rank": RANK, "update_proj_gap": 1000, "scale": SCALE},
              {"params": [model.plain]}]  # fmt: skip
    opt = OPTIMIZERS[name](model, groups)
    layerwise, ours = isinstance(opt, LayerwiseOptimizer), name.startswith("galore")
    for t, grads in enumerate(zip(_spread_gradients(0, "row"), _spread_gradients(1, "element")), start=1):
        before = [p.detach().clone() for p in (model.low_rank, model.plain)]
        if layerwise:
            opt.set_micro_batch(0, 1)
        model(*grads).backward()
        opt.step()
        opt.zero_grad()
        low_rank_step = model.low_rank.detach() - before[0]
        if ours:
            projector = LowRankProjector.from_state_dict(opt.state[model.low_rank]["projector"])
            low_rank_step = projector.project(low_rank_step) / SCALE
        worst = max((low_rank_step.abs().max() / LR).item(), ((model.plain.detach() - before[1]).abs().max() / LR).item())
        assert worst <= 1.5, (t, worst)
        if ours:
            assert worst <= adam_step_bound(t) * (1 + 1e-4), (t, worst, adam_step_bound(t))


def test_a_second_moment_quantised_to_zero_under_a_non_zero_first_moment_is_raised():
    """A rounding that maps v to zero but keeps m (bitsandbytes' CUDA kernel rounds to the nearest code, and
    zero is the unsigned book's first): with a zero gradient next, m / eps alone would be ~1e5 lr."""
    param = nn.Parameter(torch.zeros(64, 128))
    opt = GaLoreAdamW8bit([param], lr=LR, betas=BETAS)
    param.grad = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 1e-3
    opt.step()
    state = opt.state[param]
    state["exp_avg_sq_codes"].zero_()
    state["exp_avg_sq_absmax"].zero_()
    before = param.detach().clone()
    param.grad = torch.zeros_like(param)
    opt.step()
    worst = ((param.detach() - before).abs().max() / LR).item()
    assert 0 < worst <= adam_step_bound(2) * (1 + 1e-4)
