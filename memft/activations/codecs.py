"""Codecs: how one saved tensor is stored for backward (``encode``) and rebuilt (``decode``).

:class:`RangeCodec` is Mesa's storage (arXiv 2111.11124): ``bits``-bit saturating affine codes with one scale and
offset per group -- per head for a ``(B, H, N, D)`` tensor, per chunk of ``group_size`` channels (last dim)
otherwise -- against EMA-tracked ranges, with nearest or stochastic rounding. Works for fp32, bf16 and fp16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from memft.kernels.quant import PackedTensor, group_min_max, quantize_pack, unpack_dequantize

from .state import RangeTracker

__all__ = ["Encoded", "RangeCodec"]


@dataclass
class Encoded:
    """What a compressing site hands to its autograd Function: tensors to save, metadata, and its tracker."""

    tensors: tuple[torch.Tensor, ...]
    meta: Any
    codec: RangeCodec
    tracker: RangeTracker | None


@dataclass(frozen=True)
class _RangeMeta:
    shape: tuple[int, ...]
    packed_shape: tuple[int, ...]
    dtype: torch.dtype
    bits: int
    group_dim: int | None
    group_size: int | None
    observation: tuple[torch.Tensor, torch.Tensor] | None


@dataclass(frozen=True)
class RangeCodec:
    """``bits``-bit group-wise affine storage, EMA ranges (``momentum``), ``rounding`` 'nearest' or 'stochastic'."""

    bits: int = 8
    group_size: int = 64
    rounding: str = "stochastic"
    momentum: float = 0.9
    per_row: bool = False

    def layout(self, x: torch.Tensor) -> tuple[int | None, int | None]:
        """(group_dim, group_size): per head for 4-D ``(B, H, N, D)``, channel chunks of the last dim otherwise.

        With ``per_row`` every row of the last dim is its own group (x is viewed as ``(rows, N)``), ranges are the
        row's own (no EMA: rows are different samples every step).
        """
        if self.per_row:
            return 0, None
        if x.dim() == 4:
            return 1, None
        if x.dim() == 0:
            return None, None
        return -1, self.group_size

    def make_tracker(self) -> RangeTracker:
        return RangeTracker(self.momentum)

    def encode(self, x: torch.Tensor, tracker: RangeTracker | None) -> tuple[tuple[torch.Tensor, ...], _RangeMeta]:
        """Encode x; the tracker gives the EMA ranges and the seed of the stochastic-rounding noise."""
        shape = tuple(x.shape)
        if self.per_row:
            x = x.reshape(-1, x.shape[-1])
        group_dim, group_size = self.layout(x)
        batch_lo, batch_hi = group_min_max(x, group_dim, group_size)
        track_ranges = tracker is not None and not self.per_row
        lo, hi = tracker.ranges(batch_lo, batch_hi) if track_ranges else (batch_lo, batch_hi)
        seed = tracker.seed if tracker is not None else None
        packed = quantize_pack(
            x,
            self.bits,
            lo,
            hi,
            group_dim=group_dim,
            group_size=group_size,
            rounding=self.rounding,
            seed=seed,
        )
        observation = (batch_lo, batch_hi) if track_ranges else None
        meta = _RangeMeta(shape, packed.shape, packed.dtype, packed.bits, group_dim, group_size, observation)
        return (packed.data, packed.scale, packed.offset), meta

    def decode(self, tensors: tuple[torch.Tensor, ...], meta: _RangeMeta) -> torch.Tensor:
        data, scale, offset = tensors
        packed = PackedTensor(
            data, scale, offset, meta.packed_shape, meta.dtype, meta.bits, meta.group_dim, meta.group_size
        )
        return unpack_dequantize(packed).reshape(meta.shape)

    @staticmethod
    def observe(tracker: RangeTracker | None, meta: _RangeMeta) -> None:
        if tracker is not None:
            tracker.observe(meta.observation)

    def encoded(self, x: torch.Tensor, tracker: RangeTracker | None) -> Encoded:
        tensors, meta = self.encode(x, tracker)
        return Encoded(tensors, meta, self, tracker)
