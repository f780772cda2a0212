"""TIES merging of weight deltas (Yadav et al., arXiv 2306.01708): trim, elect sign, disjoint mean.

For tensors W_1..W_n fine-tuned from a common base W_0, with task vectors d_k = W_k - W_0 and weights
w_k (relative importance; default 1):

    trim        keep the round-down(density * numel) entries of each d_k with the largest |d_k|, zero the rest
    elect       sign s = +1 where sum_k w_k d_k >= 0, else -1                       (elementwise)
    disjoint    merged = sum_k w_k d_k [sign(d_k) = s] / sum_k w_k [sign(d_k) = s]  (0 where no entry agrees)
    result      W_0 + merged

Trimmed (zero) entries have sign 0, so they never count in the mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def trim_to_density(delta: torch.Tensor, density: float) -> torch.Tensor:
    """`delta` with all but its round-down(density * numel) largest-magnitude entries set to 0."""
    if density >= 1.0:
        return delta
    keep = int(density * delta.numel())
    if keep < 1:
        raise ValueError(f"density {density} keeps no entry of a tensor with {delta.numel()} entries; raise it.")
    flat = delta.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[flat.abs().float().topk(keep).indices] = 1
    return (flat * mask).view_as(delta)


def ties_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None,
               density: float = 0.53) -> torch.Tensor:
    """Merge `tensors` (same shape as `base`) into one; see the module docstring."""
    if not tensors:
        raise ValueError("ties_merge needs at least one tensor to merge.")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1] (fraction of entries kept by trimming), got {density}.")
    weights = [1.0] * len(tensors) if weights is None else list(weights)
    if len(weights) != len(tensors) or any(w <= 0 for w in weights):
        raise ValueError(f"weights must give one positive number per tensor ({len(tensors)}), got {weights}.")
    deltas = torch.stack([trim_to_density(t - base, density) for t in tensors])
    w = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device).view(-1, *([1] * base.dim()))
    weighted = deltas * w
    elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    agree = (deltas.sign() == elected).to(deltas.dtype)
    divisor = (w * agree).sum(dim=0)
    merged = (weighted * agree).sum(dim=0) / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return base + merged
