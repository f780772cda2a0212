"""Block-wise 8-bit storage for optimizer moments (Dettmers et al., arXiv 2110.02861).

A tensor is flattened, padded to a multiple of ``BLOCK_SIZE`` and split into blocks; each block keeps
its absolute maximum in fp32 and each element one uint8 index into a *dynamic* code book
(a sign, an exponent in unary, then a linear fraction: fine resolution near zero, coarse near the
block maximum). Signed moments (Adam's ``m``) use the symmetric signed book (255 codes), non-negative
ones (``v``) the unsigned book (256 codes), which spends the sign bit on one more exponent. Rounding
is to the nearest code, so the error is at most half a code gap times the block maximum.

Pure torch, so it runs on any device and under ``FakeTensorMode``. Shapes: ``codes`` is
``uint8[num_blocks * BLOCK_SIZE]`` and ``absmax`` is ``float32[num_blocks]``.

Every block is encoded independently, so a tensor can be read and rewritten a range of whole blocks at
a time (:func:`dequantize_range`, :func:`quantize_range_`) with exactly the codes the whole-tensor
functions produce; the fp32 temporaries are then bounded by the range, not by the tensor.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

BLOCK_SIZE = 256
MIN_8BIT_NUMEL = 4096


def _dynamic_magnitudes(value_bits: int) -> list[float]:
    """Magnitudes in (0, 1] with ``value_bits`` bits: exponent ``e`` leaves ``value_bits - 1 - e`` fraction bits.

    Band ``e`` holds the right edges of ``2**(value_bits - 1 - e)`` equal steps of ``[0.1, 1] * 10**-e``,
    so 1.0 (the block maximum) is a code and the bands do not overlap.
    """
    values = []
    for exponent in range(value_bits):
        count = 2 ** (value_bits - 1 - exponent)
        values += [(0.1 + (i + 1) * 0.9 / count) * 10.0 ** (-exponent) for i in range(count)]
    return values


def _code_book(signed: bool) -> list[float]:
    """Sorted code book: signed has 255 symmetric entries (0, ±127 magnitudes), unsigned 256 (0, 255 magnitudes)."""
    if signed:
        magnitudes = _dynamic_magnitudes(7)
        return sorted([0.0] + magnitudes + [-v for v in magnitudes])
    return sorted([0.0] + _dynamic_magnitudes(8))


_SIGNED_BOOK = _code_book(signed=True)
_UNSIGNED_BOOK = _code_book(signed=False)


_BOOK_CACHE: dict[tuple[bool, str], Tensor] = {}


def code_book(signed: bool, device: torch.device | str = "cpu") -> Tensor:
    """The sorted code book as an fp32 tensor (at most 256 entries, so indices fit in uint8)."""
    return torch.tensor(_SIGNED_BOOK if signed else _UNSIGNED_BOOK, dtype=torch.float32, device=device)


def _book_like(x: Tensor, signed: bool) -> Tensor:
    """Code book on ``x``'s device, cached per device; rebuilt for fake tensors (memory estimation)."""
    if is_fake(x):
        return code_book(signed, x.device)
    key = (signed, str(x.device))
    if key not in _BOOK_CACHE:
        _BOOK_CACHE[key] = code_book(signed, x.device)
    return _BOOK_CACHE[key]


def num_blocks(numel: int) -> int:
    return math.ceil(numel / BLOCK_SIZE)


def quantize(x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """fp tensor of any shape -> ``(codes uint8[num_blocks * BLOCK_SIZE], absmax float32[num_blocks])``.

    Each element takes the nearest code of its block-normalised value (ties to the lower code).
    """
    flat = x.detach().reshape(-1).float()
    padding = num_blocks(flat.numel()) * BLOCK_SIZE - flat.numel()
    blocks = (torch.nn.functional.pad(flat, (0, padding)) if padding else flat).view(-1, BLOCK_SIZE)
    absmax = blocks.abs().amax(dim=1)
    normalised = (blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)).view(-1)
    book = _book_like(x, signed)
    lower = torch.searchsorted(book, normalised, out_int32=True).clamp_(1, book.numel() - 1).sub_(1)
    above = book[lower + 1].sub_(normalised)  # distance to the upper neighbour
    below = book[lower]
    torch.sub(normalised, below, out=below)  # distance to the lower neighbour
    codes = lower.add_(above < below).to(torch.uint8)
    return codes, absmax


def dequantize(codes: Tensor, absmax: Tensor, shape: torch.Size | tuple[int, ...], signed: bool) -> Tensor:
    """Inverse of :func:`quantize`: returns an fp32 tensor of ``shape``."""
    book = _book_like(codes, signed)
    values = book[codes.int()]
    values.view(-1, BLOCK_SIZE).mul_(absmax.unsqueeze(1))
    return values[: math.prod(shape)].view(shape)


def zeros(numel: int, signed: bool, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Codes and scales of ``numel`` zeros, equal to ``quantize(torch.zeros(numel), signed)`` without the fp32 tensor."""
    zero_code = (_SIGNED_BOOK if signed else _UNSIGNED_BOOK).index(0.0)
    blocks = num_blocks(numel)
    codes = torch.full((blocks * BLOCK_SIZE,), zero_code, dtype=torch.uint8, device=device)
    return codes, torch.zeros(blocks, dtype=torch.float32, device=device)


def _check_start(start: int) -> None:
    if start % BLOCK_SIZE:
        raise ValueError(f"a range of 8-bit codes must start on a block boundary (a multiple of {BLOCK_SIZE}), got {start}.")


def dequantize_range(codes: Tensor, absmax: Tensor, start: int, stop: int, signed: bool) -> Tensor:
    """fp32 values of flat elements ``[start, stop)`` of a quantised tensor; ``start`` is a multiple of ``BLOCK_SIZE``."""
    _check_start(start)
    first, last = start // BLOCK_SIZE, num_blocks(stop)
    return dequantize(codes[first * BLOCK_SIZE : last * BLOCK_SIZE], absmax[first:last], (stop - start,), signed)


def quantize_range_(codes: Tensor, absmax: Tensor, start: int, values: Tensor, signed: bool) -> None:
    """Store ``values`` (1-D) as flat elements ``[start, start + len(values))`` in place; ``start`` is block-aligned.

    A partial last block is padded with zeros, as :func:`quantize` pads the tensor's last block, so writing
    a tensor range by range gives exactly ``quantize(tensor)``.
    """
    _check_start(start)
    new_codes, new_absmax = quantize(values, signed)
    first = start // BLOCK_SIZE
    codes[start : start + new_codes.numel()].copy_(new_codes)
    absmax[first : first + new_absmax.numel()].copy_(new_absmax)
