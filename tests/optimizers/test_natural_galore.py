"""NaturalGaLoreAdamW: Woodbury solve vs the direct inverse, and the optimizer vs a plain-torch reference."""

import io

import pytest
import torch
from torch import nn

from memft.optimizers.natural_galore import NaturalGaLoreAdamW, natural_gradient_of_row, woodbury_natural_gradient



def _direct(history: torch.Tensor, grad: torch.Tensor, damping: float) -> torch.Tensor:
    """(λI + GGᵀ)⁻¹ g with G = historyᵀ (k × s), by a dense fp64 solve."""
    g_matrix = history.double().T
    fisher = damping * torch.eye(g_matrix.shape[0], dtype=torch.float64) + g_matrix @ g_matrix.T
    return torch.linalg.solve(fisher, grad.double())


SHAPES = [(1, 6), (5, 12), (12, 12), (9, 4), (20, 512)]  # s > k: GGᵀ is singular, λI keeps it invertible


@pytest.mark.parametrize("s, k", SHAPES)
@pytest.mark.parametrize("damping", [1e-3, 1.0])
def test_woodbury_equals_direct_inverse(s, k, damping):
    """General form g/λ − G z/λ²: exact up to fp32 rounding of the cancelling terms of size ‖g‖/λ."""
    gen = torch.Generator().manual_seed(s * 100 + k)
    history = torch.randn(s, k, generator=gen)
    grad = history[0] + 0.5 * torch.randn(k, generator=gen)
    expected = _direct(history, grad, damping)
    got = woodbury_natural_gradient(history, grad, damping)
    assert got.dtype == torch.float32
    cancelling_scale = grad.abs().max().item() / damping
    torch.testing.assert_close(got.double(), expected, atol=1e-5 * cancelling_scale, rtol=0)


@pytest.mark.parametrize("s, k", SHAPES)
@pytest.mark.parametrize("damping", [1e-3, 1.0])
def test_push_through_form_equals_direct_inverse_to_fp32_precision(s, k, damping):
    """The optimizer's form for a gradient stored in the history has no cancellation: its fp32 error is
    bounded by the condition number κ = (σ_max² + λ) / (σ_min² + λ) of the solved system times the unit
    roundoff (σ: the min(s, k) singular values of the history)."""
    gen = torch.Generator().manual_seed(s * 100 + k + 1)
    history = torch.randn(s, k, generator=gen)
    row = s // 2
    expected = _direct(history, history[row], damping)
    got = natural_gradient_of_row(history, row, damping)
    sigma = torch.linalg.svdvals(history.double())
    kappa = ((sigma[0] ** 2 + damping) / (sigma[-1] ** 2 + damping)).item()
    tolerance = max(1e-6, 4 * kappa * 2**-24)
    torch.testing.assert_close(got.double(), expected, atol=tolerance * expected.abs().max().item(), rtol=0)
    # Same value as the general Woodbury form within that form's accuracy.
    general = woodbury_natural_gradient(history, history[row], damping)
    torch.testing.assert_close(general, got, atol=1e-5 * history[row].abs().max().item() / damping, rtol=0)


def reference_natural_galore(w0, grads, rank, gap, history_size, damping, clear, proj_type, lr, betas, eps, wd, scale):
    """Natural GaLore as documented: FIFO history of low-rank grads, dense inverse-Fisher solve, AdamW."""
    w = w0.clone()
    left = right = None
    history: list[torch.Tensor] = []
    m = v = None
    beta1, beta2 = betas
    for t, g in enumerate(grads):
        if t % gap == 0:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            tall = g.shape[0] >= g.shape[1]
            left = u[:, :rank] if proj_type == "full" or not tall else None
            right = vh[:rank] if proj_type == "full" or tall else None
            if t > 0 and clear:
                history = []
        r = g
        if left is not None:
            r = left.T @ r
        if right is not None:
            r = r @ right.T
        history = (history + [r.reshape(-1)])[-history_size:]
        natural = _direct(torch.stack(history), r.reshape(-1), damping).float().view(r.shape)
        if m is None:
            m, v = torch.zeros_like(r), torch.zeros_like(r)
        m = beta1 * m + (1 - beta1) * natural
        v = beta2 * v + (1 - beta2) * natural * natural
        n = (m / (1 - beta1 ** (t + 1))) / ((v / (1 - beta2 ** (t + 1))).sqrt() + eps)
        if left is not None:
            n = left @ n
        if right is not None:
            n = n @ right
        w = w * (1 - lr * wd) - lr * scale * n
        yield w, m, len(history)


@pytest.mark.parametrize(
    "shape, proj_type, policy",
    [((16, 10), "std", "clear"), ((10, 16), "std", "clear"), ((16, 10), "std", "keep"), ((12, 12), "full", "clear")],
)
def test_natural_galore_matches_reference(shape, proj_type, policy):
    steps, gap, size = 9, 4, 3  # refreshes at 0, 4, 8; FIFO evicts from step 3 on
    # Two-sided: the refresh gradient's projection is diagonal up to rounding noise, which Adam's
    # first step would normalise; a larger eps keeps the comparison about the algorithm.
    eps = 1e-3 if proj_type == "full" else 1e-8
    hyper = {"lr": 0.01, "betas": (0.9, 0.99), "eps": eps, "wd": 0.05, "scale": 0.25}
    gen = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.randn(*shape, generator=gen))
    w0 = w.detach().clone()
    grads = [torch.randn(*shape, generator=gen) @ torch.diag(torch.linspace(2, 0.1, shape[1])) for _ in range(steps)]
    opt = NaturalGaLoreAdamW(
        [{"params": [w], "rank": 3, "update_proj_gap": gap, "scale": hyper["scale"], "proj_type": proj_type}],
        lr=hyper["lr"], betas=hyper["betas"], eps=hyper["eps"], weight_decay=hyper["wd"],
        history_size=size, damping=1e-2, history_on_refresh=policy,
    )  # fmt: skip
    ref = reference_natural_galore(w0, grads, 3, gap, size, 1e-2, policy == "clear", proj_type, **hyper)
    for grad in grads:
        w.grad = grad.clone()
        opt.step()
        w_ref, m_ref, history_len = next(ref)
        torch.testing.assert_close(w.detach(), w_ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(opt.state[w]["exp_avg"], m_ref, atol=1e-5, rtol=1e-4)
        assert opt.state[w]["history_len"] == history_len


def test_preconditioner_differs_from_plain_galore():
    """With a history, the natural gradient is not a rescaled GaLore gradient (the test above can fail)."""
    gen = torch.Generator().manual_seed(1)
    history = torch.randn(4, 10, generator=gen)
    grad = torch.randn(10, generator=gen)
    natural = woodbury_natural_gradient(history, grad, 1e-3)
    cosine = torch.nn.functional.cosine_similarity(natural, grad, dim=0)
    assert cosine < 0.99


def test_state_round_trips_and_resumes_identically():
    def build():
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(20, 12))
        return w, NaturalGaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 3}], lr=0.01, history_size=4)

    grads = [torch.randn(20, 12, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    w, opt = build()
    for grad in grads:
        w.grad = grad.clone()
        opt.step()
    w2, opt2 = build()
    for grad in grads[:5]:
        w2.grad = grad.clone()
        opt2.step()
    buffer = io.BytesIO()
    torch.save({"w": w2.detach(), "opt": opt2.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    w3, opt3 = build()
    with torch.no_grad():
        w3.copy_(saved["w"])
    opt3.load_state_dict(saved["opt"])
    for grad in grads[5:]:
        w3.grad = grad.clone()
        opt3.step()
    assert torch.equal(w, w3)


@pytest.mark.parametrize(
    "kwargs", [{"history_size": 0}, {"damping": 0.0}, {"damping": -1e-3}, {"history_on_refresh": "reproject"}]
)
def test_bad_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        NaturalGaLoreAdamW([{"params": [nn.Parameter(torch.randn(4, 4))], "rank": 2}], **kwargs)
