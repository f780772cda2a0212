"""Block-wise 8-bit storage for optimizer moments, in bitsandbytes' format (Dettmers et al., arXiv 2110.02861).

A flat tensor is split into blocks of ``BLOCK_SIZE``; each block keeps its absolute maximum in fp32 and each
element one uint8 index into a 256-entry *dynamic* code book (bitsandbytes' ``create_dynamic_map``: a sign,
an exponent in unary, then a linear fraction; fine resolution near zero, coarse near the block maximum).
Signed moments (Adam's ``m``) use the signed book, non-negative ones (``v``) the unsigned book, which spends
the sign bit on fraction bits. Shapes: ``codes`` is ``uint8[num_blocks * BLOCK_SIZE]`` (the tail of a partial
last block holds code 0) and ``absmax`` is ``float32[num_blocks]``; an all-zero block is absmax 0, codes 0.
Decoding is ``book[code] * absmax`` everywhere.

Two implementations of the same codec:

* bitsandbytes' ``quantize_blockwise`` / ``dequantize_blockwise`` kernels (``torch.ops.bitsandbytes``), used
  whenever bitsandbytes is installed and the tensor is on a CPU or CUDA device, fake tensors included:
  bitsandbytes registers fake kernels for these ops, so a ``FakeTensorMode`` step (the memory planner)
  allocates exactly the tensors a real step does.
* A pure-torch reference (:func:`reference_quantize`, :func:`reference_dequantize`), used without
  bitsandbytes, on any device and under ``FakeTensorMode``. It gives the bytes of bitsandbytes' CPU kernel
  (>= 0.50): the normalised value ``x / absmax`` is binned into 65536 equal bins of [-1, 1] and each bin takes
  the code nearest to its centre, so rounding is to the nearest code within half a bin (1.5e-5 of the block
  maximum) and codes that no bin centre is nearest to (the zero of the signed book, the six smallest codes of
  the unsigned one) only occur in all-zero blocks. bitsandbytes' CUDA kernel rounds to the nearest code
  without bins; since decoding is the same, state moves between devices.

Every block is encoded independently, so a tensor can be read and rewritten a range of whole blocks at a time
(:func:`dequantize_range`, :func:`quantize_range_`) with exactly the codes the whole-tensor functions produce;
the fp32 temporaries are then bounded by the range, not by the tensor.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import _disable_current_modes

BLOCK_SIZE = 256
MIN_8BIT_NUMEL = 4096
LUT_BINS = 65536  # equal bins of [-1, 1] in bitsandbytes' CPU quantiser
_KERNEL_DEVICES = ("cpu", "cuda")


def dynamic_map(signed: bool) -> Tensor:
    """bitsandbytes' ``create_dynamic_map(signed)`` (7 exponent bits, 8 bits): sorted ``float32[256]``.

    Exponent ``i`` (scale ``10**(i - 6)``) holds the midpoints of ``2**i`` (signed, both signs) or ``2**(i + 1)``
    (unsigned) equal steps of [0.1, 1]; then 0 and 1. The signed book has no -1, its most negative code is -0.993.
    """
    values = [0.0, 1.0]
    for exponent in range(7):
        edges = torch.linspace(0.1, 1, 2 ** (exponent + (0 if signed else 1)) + 1, dtype=torch.float32)
        magnitudes = (10 ** (exponent - 6)) * ((edges[:-1] + edges[1:]) / 2.0)
        values += magnitudes.tolist() + ((-magnitudes).tolist() if signed else [])
    return torch.tensor(sorted(values), dtype=torch.float32)


with _disable_current_modes():  # real values even when first imported under FakeTensorMode (the planner)
    _BOOK_VALUES = {signed: dynamic_map(signed).tolist() for signed in (True, False)}
_BOOK_CACHE: dict[tuple[bool, str], Tensor] = {}


def code_book(signed: bool, device: torch.device | str = "cpu") -> Tensor:
    """The sorted code book (``float32[256]``) on ``device``, a new tensor (fake under ``FakeTensorMode``)."""
    return torch.tensor(_BOOK_VALUES[signed], dtype=torch.float32, device=device)


def _book_like(x: Tensor, signed: bool) -> Tensor:
    """Code book on ``x``'s device, cached per device; rebuilt for fake tensors (memory estimation)."""
    if is_fake(x):
        return code_book(signed, x.device)
    key = (signed, str(x.device))
    if key not in _BOOK_CACHE:
        _BOOK_CACHE[key] = code_book(signed, x.device)
    return _BOOK_CACHE[key]


@functools.cache
def bitsandbytes_ops():
    """``torch.ops.bitsandbytes`` when bitsandbytes with its blockwise ops (>= 0.46) is installed, else None.

    Imported outside any active dispatch mode: a first call under ``FakeTensorMode`` would otherwise leave
    fake tensors in bitsandbytes' module-level tables.
    """
    try:
        with _disable_current_modes():
            import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)

        ops = torch.ops.bitsandbytes
        ops.quantize_blockwise, ops.dequantize_blockwise  # noqa: B018  (older releases lack them)
    except (ImportError, AttributeError, RuntimeError, OSError):
        return None
    return ops


def _kernels(x: Tensor):
    ops = bitsandbytes_ops()
    return ops if ops is not None and x.device.type in _KERNEL_DEVICES else None


def num_blocks(numel: int) -> int:
    return math.ceil(numel / BLOCK_SIZE)


def reference_quantize(flat: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """Pure torch: fp32 ``flat[n]`` -> ``(codes uint8[n], absmax float32[num_blocks(n)])``, bitsandbytes' CPU bytes.

    In fp32, as bitsandbytes: ``bin = trunc((clamp(x * (1 / absmax), -1, 1) + 1) * 0.5 * 65535 + 0.5)``, then the
    code nearest to the bin's centre ``-1 + 2 * bin / 65535`` (ties to the lower code).
    """
    n = flat.numel()
    padding = num_blocks(n) * BLOCK_SIZE - n
    blocks = (torch.nn.functional.pad(flat, (0, padding)) if padding else flat).view(-1, BLOCK_SIZE)
    absmax = blocks.abs().amax(dim=1)
    inverse = torch.where(absmax > 0, absmax.reciprocal(), torch.zeros_like(absmax))
    centres = (blocks * inverse.unsqueeze(1)).clamp_(-1, 1).add_(1).mul_(0.5).mul_(LUT_BINS - 1).add_(0.5).trunc_()
    centres.mul_(2).div_(LUT_BINS - 1).add_(-1)
    book = _book_like(flat, signed)
    midpoints = (book[:-1] + book[1:]) * 0.5
    codes = torch.searchsorted(midpoints, centres, out_int32=True).to(torch.uint8)
    codes.masked_fill_((absmax == 0).unsqueeze(1), 0)
    return codes.view(-1)[:n], absmax


def reference_dequantize(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    """Pure torch: ``codes uint8[n]``, ``absmax float32[num_blocks(n)]`` -> fp32 ``[n]``."""
    n = codes.numel()
    scale = absmax.repeat_interleave(BLOCK_SIZE)[:n]
    return _book_like(codes, signed)[codes.int()].mul_(scale)


def _encode(flat: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    ops = _kernels(flat)
    if ops is None:
        return reference_quantize(flat, signed)
    return ops.quantize_blockwise(flat, _book_like(flat, signed), BLOCK_SIZE)


def _decode(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    ops = _kernels(codes)
    if ops is None:
        return reference_dequantize(codes, absmax, signed)
    return ops.dequantize_blockwise(codes, absmax, _book_like(codes, signed), BLOCK_SIZE, torch.float32)


def zeros(numel: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Codes and scales of ``numel`` zeros (either book), equal to :func:`quantize` of zeros without the fp32 tensor."""
    blocks = num_blocks(numel)
    codes = torch.zeros(blocks * BLOCK_SIZE, dtype=torch.uint8, device=device)
    return codes, torch.zeros(blocks, dtype=torch.float32, device=device)


def quantize(x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """fp tensor of any shape -> ``(codes uint8[num_blocks * BLOCK_SIZE], absmax float32[num_blocks])``."""
    flat = x.detach().reshape(-1).float()
    codes, absmax = zeros(flat.numel(), flat.device)
    quantize_range_(codes, absmax, 0, flat, signed)
    return codes, absmax


def dequantize(codes: Tensor, absmax: Tensor, shape: torch.Size | tuple[int, ...], signed: bool) -> Tensor:
    """Inverse of :func:`quantize`: returns an fp32 tensor of ``shape``."""
    return dequantize_range(codes, absmax, 0, math.prod(shape), signed).view(shape)


def _check_start(start: int) -> None:
    if start % BLOCK_SIZE:
        raise ValueError(f"a range of 8-bit codes must start on a block boundary (a multiple of {BLOCK_SIZE}), got {start}.")


def dequantize_range(codes: Tensor, absmax: Tensor, start: int, stop: int, signed: bool) -> Tensor:
    """fp32 values of flat elements ``[start, stop)`` of a quantised tensor; ``start`` is a multiple of ``BLOCK_SIZE``."""
    _check_start(start)
    return _decode(codes[start:stop], absmax[start // BLOCK_SIZE : num_blocks(stop)], signed)


def quantize_range_(codes: Tensor, absmax: Tensor, start: int, values: Tensor, signed: bool) -> None:
    """Store fp32 ``values`` (1-D) as flat elements ``[start, start + len(values))`` in place; ``start`` is block-aligned.

    A partial last block is encoded from its own elements, as :func:`quantize` encodes the tensor's last
    block, so writing a tensor range by range gives exactly ``quantize(tensor)``.
    """
    _check_start(start)
    new_codes, new_absmax = _encode(values, signed)
    first = start // BLOCK_SIZE
    codes[start : start + new_codes.numel()].copy_(new_codes)
    absmax[first : first + new_absmax.numel()].copy_(new_absmax)
