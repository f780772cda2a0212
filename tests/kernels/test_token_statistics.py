"""Per-token entropy and top-1 agreement without the logits, against the full logits."""

from __future__ import annotations

import pytest
import torch

from memft.kernels.cut_cross_entropy import token_statistics
from memft.kernels.cut_cross_entropy.torch_chunked import plan_chunks


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_the_full_logits(softcap, bias):
    torch.manual_seed(0)
    n, d, v = 300, 16, 5000
    assert plan_chunks(n, v)[1] < v  # several vocabulary chunks, so the online rescaling is exercised
    hidden, weight = torch.randn(n, d) * 3, torch.randn(v, d)
    b = torch.randn(v) if bias else None
    logits = hidden @ weight.T + (b if bias else 0)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    labels = torch.randint(0, v, (n,))
    labels[::7] = logits[::7].argmax(dim=1)  # some labels are the most likely token
    entropy, is_top1 = token_statistics(hidden, weight, labels, b, softcap)
    reference = torch.distributions.Categorical(logits=logits.double()).entropy().float()
    # entropy = lse - E[z] cancels two fp32 numbers of the logits' size (about 50 here): a few ulps of them
    torch.testing.assert_close(entropy, reference, rtol=0, atol=8 * torch.finfo(torch.float32).eps * logits.abs().max())
    assert torch.equal(is_top1, logits.argmax(dim=1) == labels) and is_top1.sum() >= n // 7


def test_low_precision_inputs_are_computed_in_fp32():
    torch.manual_seed(1)
    hidden, weight, labels = torch.randn(40, 8), torch.randn(700, 8), torch.randint(0, 700, (40,))
    ours, _ = token_statistics(hidden.bfloat16(), weight.bfloat16(), labels)
    reference = torch.distributions.Categorical(logits=hidden.bfloat16().float() @ weight.bfloat16().float().T).entropy()
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_no_rows():
    entropy, is_top1 = token_statistics(torch.zeros(0, 4), torch.randn(10, 4), torch.zeros(0, dtype=torch.long))
    assert entropy.shape == is_top1.shape == (0,)
