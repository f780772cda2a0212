"""Gradient filtering for cut cross-entropy (arXiv 2411.09009, section 4.3).

In the backward pass the gradient of the logits is ``dz = g * (softmax(z) - onehot(y))``.  A block of
``dz`` whose every entry is below the precision of the gradient dtype adds nothing representable to the
gradients of the hidden states and the classifier, so its two matrix products are skipped.  Both
implementations (chunked PyTorch and Triton) apply the same rule: skip a block when ``max |p - y| < eps``,
checked before scaling by the upstream gradient ``g``.

This module resolves the threshold from the dtype and offers a counter of computed / skipped blocks
for tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def compute_dtype(hidden_dtype: torch.dtype, weight_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the matrix-product operands: the lower precision of the two inputs.

    Mirrors autocast: a bf16 hidden state against an fp32 classifier multiplies in bf16.
    """
    if hidden_dtype in _LOW_PRECISION:
        return hidden_dtype
    return weight_dtype


def resolve_filter_eps(filter_eps: float | str | None, dtype: torch.dtype) -> float | None:
    """Threshold below which a block of ``|softmax - onehot|`` is skipped in backward.

    ``"auto"``: ``finfo(dtype).eps / 32`` for bf16 (2**-12) and fp16 (2**-15), the paper's default, and
    no filtering for fp32, so that fp32 gradients are exact.  ``None`` disables filtering; a float is used
    as given.
    """
    if filter_eps is None:
        return None
    if isinstance(filter_eps, str):
        if filter_eps != "auto":
            raise ValueError(
                f"filter_eps={filter_eps!r} is not understood. Pass 'auto' (threshold from the dtype: "
                "finfo(dtype).eps/32 for bf16/fp16, no filtering for fp32), None (never skip a block) or a "
                "non-negative float threshold."
            )
        if dtype in _LOW_PRECISION:
            return torch.finfo(dtype).eps / 32
        return None
    if isinstance(filter_eps, bool) or not isinstance(filter_eps, (int, float)):
        raise TypeError(
            f"filter_eps must be 'auto', None or a float, got {type(filter_eps).__name__}. Pass e.g. "
            "filter_eps=2**-12 to skip backward blocks whose softmax entries are all below 2**-12."
        )
    if filter_eps < 0:
        raise ValueError(
            f"filter_eps={filter_eps} is negative; a block is skipped when max|p - y| < filter_eps, so a "
            "negative threshold is meaningless. Pass 0 or None to disable filtering."
        )
    return float(filter_eps)


@dataclass
class BlockCounter:
    """Number of backward logit blocks that were computed and skipped by gradient filtering."""

    computed: int = 0
    skipped: int = 0

    @property
    def total(self) -> int:
        return self.computed + self.skipped


_ACTIVE_COUNTER: contextvars.ContextVar[BlockCounter | None] = contextvars.ContextVar(
    "memft_cce_block_counter", default=None
)


def active_counter() -> BlockCounter | None:
    """The counter opened by :func:`count_backward_blocks`, or None (counting costs a device sync)."""
    return _ACTIVE_COUNTER.get()


@contextlib.contextmanager
def count_backward_blocks() -> Iterator[BlockCounter]:
    """Count computed and filtered backward blocks of every cut cross-entropy backward run inside.

    Example::

        with count_backward_blocks() as blocks:
            linear_cross_entropy(h, w, y).backward()
        print(blocks.skipped, blocks.total)
    """
    counter = BlockCounter()
    token = _ACTIVE_COUNTER.set(counter)
    try:
        yield counter
    finally:
        _ACTIVE_COUNTER.reset(token)
