"""Per-token statistics of the next-token distribution without the logits: entropy and top-1 agreement.

For ``z = softcap(hidden @ weight.T + bias)`` ([N, V], never materialised) and labels ``y`` ([N]):

- ``entropy_i = lse_i - sum_v softmax(z_i)_v z_iv``, accumulated online over vocabulary chunks with a
  running maximum ``m``, ``l = sum exp(z - m)`` and ``s = sum exp(z - m) z`` (rescaled whenever ``m`` grows),
  so ``entropy = log l + m - s / l``;
- ``is_top1_i = z_{i, y_i} >= max_v z_iv`` (the label is a most likely token).

Metrics only (no gradient): TRL's ``SFTTrainer`` logs them beside the loss. The pass costs one more
product ``hidden @ weight.T`` in blocks of :func:`~.torch_chunked.plan_chunks`'s size, so its memory is
one logit block and a few [N] vectors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .torch_chunked import _logit_block, plan_chunks


@torch.no_grad()
def token_statistics(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None,
                     softcap: float | None = None) -> tuple[Tensor, Tensor]:
    """``(entropy [N] fp32, is_top1 [N] bool)`` of ``softcap(hidden @ weight.T + bias)`` for valid labels
    (``hidden`` [N, D], ``weight`` [V, D], ``labels`` [N] in ``[0, V)``); products in fp32."""
    num_rows, vocab = hidden.shape[0], weight.shape[0]
    entropy = hidden.new_zeros(num_rows, dtype=torch.float32)
    is_top1 = torch.zeros(num_rows, dtype=torch.bool, device=hidden.device)
    if num_rows == 0:
        return entropy, is_top1
    row_chunk, vocab_chunk = plan_chunks(num_rows, vocab)
    for start in range(0, num_rows, row_chunk):
        rows = slice(start, start + row_chunk)
        h, y = hidden[rows].float(), labels[rows]
        n = h.shape[0]
        m = h.new_full((n,), float("-inf"))
        total = h.new_zeros(n)   # sum exp(z - m)
        weighted = h.new_zeros(n)  # sum exp(z - m) * z
        target = h.new_zeros(n)
        for v0 in range(0, vocab, vocab_chunk):
            w = weight[v0:v0 + vocab_chunk].float()
            b = None if bias is None else bias[v0:v0 + vocab_chunk].float()
            z = _logit_block(h, w, b, softcap)
            here = (y >= v0) & (y < v0 + z.shape[1])
            picked = z.gather(1, (y - v0).clamp(0, z.shape[1] - 1).unsqueeze(1)).squeeze(1)
            target = torch.where(here, picked, target)
            new_m = torch.maximum(m, z.amax(dim=1))
            rescale = torch.exp(m - new_m)
            p = z.sub(new_m.unsqueeze(1)).exp_()
            weighted = weighted * rescale + (p * z).sum(dim=1)
            total = total * rescale + p.sum(dim=1)
            m = new_m
        entropy[rows] = total.log() + m - weighted / total
        is_top1[rows] = target >= m
    return entropy, is_top1
