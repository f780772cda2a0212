"""Gradients an optimizer holds between backward and its update are counted as gradients: layer-wise GaLore
consumes ``param.grad`` in a hook and keeps low-rank accumulation buffers (and, with clipping, every gradient
until the global norm is known) until its update."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memft.memory import MemoryTracker
from memft.optimizers.galore import GaLoreAdamW, galore_param_groups
from memft.optimizers.layerwise import LayerwiseOptimizer
from tests.optimizers.tiny_model import TinyModel

VOCAB, RANK, GRAD_ACCUM = 64, 4, 2


def _step(model, opt, step):
    for index in range(GRAD_ACCUM):
        opt.set_micro_batch(index, GRAD_ACCUM)
        tokens = torch.randint(0, VOCAB, (8, 33), generator=torch.Generator().manual_seed(10 * step + index))
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)) / GRAD_ACCUM
        loss.backward()
    opt.step()
    opt.zero_grad()


def _held_bytes(groups) -> int:
    """What layer-wise GaLore holds once every parameter got its first micro-batch's gradient: GaLore weights'
    projected gradients (rank x the longer side, fp32 under accumulation), the others' full gradients."""
    total = 0
    for group in groups:
        for p in group["params"]:
            total += 4 * RANK * max(p.shape) if "rank" in group else p.numel() * p.element_size()
    return total


def _tracked_second_step(max_grad_norm):
    """Peak breakdown of a tracked optimizer step (the optimizer state exists: the peak lies in the second
    micro-batch, while every parameter's gradient is held), and the bytes held at that moment."""
    torch.manual_seed(0)
    model = TinyModel(VOCAB)
    groups = galore_param_groups(model, rank=RANK, update_proj_gap=100)
    opt = LayerwiseOptimizer(groups, GaLoreAdamW, lr=1e-2, max_grad_norm=max_grad_norm)
    _step(model, opt, 0)
    with MemoryTracker(model, opt) as tracker:
        _step(model, opt, 1)
    return tracker.peak_bytes, tracker.peak_breakdown, _held_bytes(groups)


@pytest.mark.parametrize("max_grad_norm", [1e-3, None], ids=["clipping", "no clipping"])
def test_layerwise_galore_held_gradients_are_gradients(monkeypatch, max_grad_norm):
    peak, breakdown, held = _tracked_second_step(max_grad_norm)
    assert breakdown["gradients"] == held > 0
    monkeypatch.setattr(LayerwiseOptimizer, "held_gradients", lambda self: [])  # the tracker cannot see them
    unseen_peak, unseen, _ = _tracked_second_step(max_grad_norm)
    assert unseen_peak == peak and unseen["gradients"] == 0
    assert unseen["temporaries"] - breakdown["temporaries"] == held
    assert all(unseen[c] == breakdown[c] for c in breakdown if c not in ("gradients", "temporaries"))
