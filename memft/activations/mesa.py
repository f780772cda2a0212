"""Mesa: 8-bit storage of every activation saved for backward (arXiv 2111.11124).

Saved tensors -- Linear inputs, GELU/SiLU inputs, softmax outputs, attention matmul operands and LayerNorm/RMSNorm
inputs -- are stored as ``bits``-bit codes with one scale and offset per group: per head for ``(B, H, N, D)``
tensors, per chunk of ``group_size`` channels for ``(B, N, C)`` tensors. Ranges are the batch's own on the first
step and an EMA (``momentum``, default 0.9) afterwards. Differences from the reference implementation:

* quantisation *saturates* at the range ends (the reference wraps values above the range modulo 256);
* bf16 is supported besides fp32/fp16 (codes are computed in fp32 and decoded to the input dtype);
* ReLU keeps a 1-bit mask instead of an 8-bit input: its gradient only needs the sign, and this is exact.

Gradient error: for a saved tensor x with per-group scale ``s = (hi - lo) / (2**bits - 1)``, the decoded x~ obeys
``|x~ - x| <= s / 2`` (nearest) or ``< s`` (stochastic, unbiased) inside the range; so a Linear weight gradient
differs from the exact one by ``||dY^T (x~ - x)||_F <= ||dY||_F * ||x~ - x||_F``.
"""

from __future__ import annotations

from collections.abc import Callable

from memft.kernels.quant import ROUNDING_MODES

from .codecs import RangeCodec
from .patch import Compressor, Site, linear_forward, recompute_forward, relu_forward

__all__ = ["MesaCompressor", "build_compressor"]


class MesaCompressor(Compressor):
    """Mesa storage for every kind: ``codec`` for Linear/activation/norm inputs and attention softmax/matmul."""

    name = "mesa"

    def __init__(self, codec: RangeCodec) -> None:
        self.codec = codec
        self.softmax_codec = codec
        self.matmul_codec = codec

    def _label(self) -> str:
        return f"{self.codec.bits}-bit input, {self.codec.rounding} rounding"

    def linear(self, site: Site) -> tuple[Callable, str]:
        return linear_forward(site, self.codec), self._label()

    def activation(self, site: Site, function: str) -> tuple[Callable, str]:
        if function == "relu":
            return relu_forward(site), "1-bit mask (exact)"
        return recompute_forward(site, self.codec), self._label()

    def norm(self, site: Site) -> tuple[Callable, str]:
        return recompute_forward(site, self.codec), self._label()


MESA_BITS = (2, 4, 8)  # code widths Mesa stores (8 in the paper; 2 and 4 for experiments)


def mesa_codec(bits: int = 8, group_size: int = 64, rounding: str = "stochastic", momentum: float = 0.9) -> RangeCodec:
    """Validated :class:`RangeCodec` with Mesa's defaults."""
    if bits not in MESA_BITS:
        raise ValueError(f"bits={bits!r}: Mesa stores 8-bit codes (2 and 4 are allowed for experiments); use bits=8.")
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding={rounding!r} must be one of {ROUNDING_MODES}.")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be a positive int (channels per scale/offset group).")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum={momentum!r} must lie in [0, 1) (weight of the old range in the EMA).")
    return RangeCodec(bits=bits, group_size=group_size, rounding=rounding, momentum=momentum)


def build_compressor(
    bits: int = 8, group_size: int = 64, rounding: str = "stochastic", momentum: float = 0.9
) -> MesaCompressor:
    """Options of ``compress_activations(model, "mesa", ...)``.

    bits: code width (8 as in the paper). group_size: channels per scale/offset group of ``(B, N, C)`` tensors
    (4-D ``(B, H, N, D)`` tensors use one group per head). rounding: 'stochastic' (unbiased) or 'nearest'.
    momentum: EMA weight of the previous range (0.9 as in the paper).
    """
    return MesaCompressor(mesa_codec(bits, group_size, rounding, momentum))
