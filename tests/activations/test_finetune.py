"""A tiny Llama fine-tuned with each compressor ends within 2% of the uncompressed run's loss."""

from __future__ import annotations

import pytest
import torch

from memft.activations import apply_parametric, compress_activations
from tests.activations.conftest import tiny_bert, tiny_llama

STEPS = 20
WTA_GAP = (
    "WTA-CRS at ratio 0.3 trains a tiny randomly initialised model measurably slower: its per-token gradient "
    "terms are nearly orthogonal and evenly sized, so sampling 30% of them leaves a relative gradient error near "
    "sqrt(1/0.3 - 1) ~ 1.5 (unbiased, see test_wta_crs.py); the 20-step loss ends well above 2% of the exact run."
)


def _batch() -> torch.Tensor:
    """Sequences that mostly follow t -> (5 t + 3) mod 256, with 30% random tokens: a learnable, noisy task."""
    gen = torch.Generator().manual_seed(0)
    seq = torch.empty(8, 32, dtype=torch.long)
    seq[:, 0] = torch.randint(0, 256, (8,), generator=gen)
    for i in range(1, 32):
        follow = (5 * seq[:, i - 1] + 3) % 256
        noise = torch.randint(0, 256, (8,), generator=gen)
        seq[:, i] = torch.where(torch.rand(8, generator=gen) < 0.7, follow, noise)
    return seq


def _train(method: str | None, parametric: str | None = None, **options) -> float:
    model = tiny_llama(seed=0) if parametric is None else tiny_bert(seed=0)
    if parametric is not None:
        apply_parametric(model, parametric)
    handle = compress_activations(model, method, **options) if method else None
    lr = 3e-3 if parametric is None else 1e-1
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = _batch()
    losses = []
    for _ in range(STEPS):
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    if handle is not None:
        handle.undo()
    assert losses[-1] < 0.9 * losses[0]  # it learns
    return sum(losses[-3:]) / 3


@pytest.fixture(scope="module")
def uncompressed() -> float:
    return _train(None)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("mesa", {}),
        ("s2a", {}),
        pytest.param("wta_crs", {"others": "mesa"}, marks=pytest.mark.xfail(strict=True, reason=WTA_GAP)),
    ],
)
def test_loss_within_two_percent(method: str, options: dict, uncompressed: float) -> None:
    final = _train(method, **options)
    assert abs(final - uncompressed) <= 0.02 * uncompressed, (final, uncompressed)


def test_s2a_with_bias_tuning_within_two_percent() -> None:
    reference = _train(None, parametric="bias")
    final = _train("s2a", parametric="bias")
    assert abs(final - reference) <= 0.02 * reference, (final, reference)
