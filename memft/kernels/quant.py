"""Affine quantisation of tensors into packed 1/2/4/8-bit codes with one scale and offset per group.

This is the storage format of memft's activation compressors (Mesa, arXiv 2111.11124; S2A, arXiv 2503.08154).
It depends on torch only and runs on any device and under ``FakeTensorMode``.

Conventions (x has any shape, ``numel`` elements):

* A *group layout* ``(group_dim, group_size)`` splits x into ``G`` groups:
  ``group_dim=None`` -> one group (per tensor);
  ``group_dim=d, group_size=None`` -> one group per index of dim d (e.g. per head of a ``(B, H, N, D)`` tensor, d=1);
  ``group_dim=d, group_size=g`` -> dim d cut into chunks of ``g'`` channels, ``g'`` the largest divisor of
  ``x.shape[d]`` not above g (e.g. per channel group of a ``(B, N, C)`` tensor, d=-1).
* Quantisation is *saturating*: ``code = clamp(round((x - offset) / scale), 0, 2**bits - 1)``; values outside
  ``[lo, hi]`` become the nearest end of the range, never wrap around.
* Rounding is ``"nearest"`` (error <= scale/2 inside the range) or ``"stochastic"`` (``floor(q + u)``,
  ``u ~ U[0, 1)``: unbiased inside the range, error < scale). The noise comes from the global generator of x's
  device, or -- given a ``seed`` -- from :func:`uniform_noise`, a counter-based hash that touches no generator
  (so compressing inside a model changes none of its random draws, and a recomputation reproduces it).
* Packed storage is a flat ``uint8`` tensor of exactly ``ceil(numel * bits / 8)`` bytes; ``scale`` and ``offset``
  are ``float32`` tensors of shape ``(G,)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUPPORTED_BITS = (1, 2, 4, 8)
ROUNDING_MODES = ("nearest", "stochastic")

__all__ = [
    "SUPPORTED_BITS",
    "ROUNDING_MODES",
    "PackedTensor",
    "packed_nbytes",
    "pack_codes",
    "unpack_codes",
    "group_layout",
    "group_min_max",
    "uniform_noise",
    "quantize_codes",
    "quantize_pack",
    "unpack_dequantize",
]


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(
            f"bits={bits!r} is not supported: packing works on whole bytes, so bits must be one of "
            f"{SUPPORTED_BITS}. Pass bits=8 (Mesa), bits=4 (S2A) or bits=2/1."
        )


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDING_MODES:
        raise ValueError(
            f"rounding={rounding!r} is unknown: use 'nearest' (deterministic, error <= scale/2) or "
            "'stochastic' (unbiased inside the range)."
        )


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes of packed codes for ``numel`` values at ``bits`` bits: ``ceil(numel * bits / 8)``."""
    _check_bits(bits)
    return (numel * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (``uint8``, any shape, each < 2**bits) into ``ceil(numel*bits/8)`` bytes, little end first."""
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be torch.uint8, got {codes.dtype}; convert with codes.to(torch.uint8).")
    flat = codes.reshape(-1)
    if bits == 8:
        return flat.contiguous()
    per_byte = 8 // bits
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    columns = flat.view(-1, per_byte)
    packed = columns[:, 0].clone()
    for j in range(1, per_byte):
        packed |= columns[:, j] << (bits * j)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: flat ``uint8`` codes of length ``numel``."""
    _check_bits(bits)
    if bits == 8:
        return packed[:numel]
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    columns = [(packed >> (bits * j)) & mask for j in range(per_byte)]
    return torch.stack(columns, dim=1).reshape(-1)[:numel]


def _largest_divisor_at_most(n: int, cap: int) -> int:
    for d in range(min(n, cap), 0, -1):
        if n % d == 0:
            return d
    return 1


def group_layout(
    shape: tuple[int, ...], group_dim: int | None, group_size: int | None
) -> tuple[tuple[int, ...], int | None, int]:
    """Return ``(view_shape, group_axis, G)``: x viewed as ``view_shape`` has its G groups along ``group_axis``."""
    if group_dim is None:
        return (math.prod(shape),), None, 1
    ndim = len(shape)
    if not -ndim <= group_dim < ndim:
        raise ValueError(f"group_dim={group_dim} is out of range for a tensor of shape {tuple(shape)}.")
    d = group_dim % ndim
    channels = shape[d]
    if group_size is None:
        return tuple(shape), d, channels
    if group_size < 1:
        raise ValueError(f"group_size={group_size} must be a positive number of channels (or None for per-index).")
    size = _largest_divisor_at_most(channels, group_size)
    groups = channels // size
    view = tuple(shape[:d]) + (groups, size) + tuple(shape[d + 1 :])
    return view, d, groups


def _reduce_dims(view_shape: tuple[int, ...], axis: int | None) -> list[int]:
    return [i for i in range(len(view_shape)) if i != axis]


def _broadcast_shape(view_shape: tuple[int, ...], axis: int | None, groups: int) -> list[int]:
    shape = [1] * len(view_shape)
    if axis is not None:
        shape[axis] = groups
    return shape


def group_min_max(
    x: torch.Tensor, group_dim: int | None = None, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group minimum and maximum of x as two ``float32`` tensors of shape ``(G,)``."""
    view_shape, axis, groups = group_layout(tuple(x.shape), group_dim, group_size)
    xv = x.detach().reshape(view_shape)
    dims = _reduce_dims(view_shape, axis)
    lo = xv.amin(dim=dims).float().reshape(groups)
    hi = xv.amax(dim=dims).float().reshape(groups)
    return lo, hi


_HASH_MUL_1 = 0x7FEB352D
_HASH_MUL_2 = 0x846CA68B - (1 << 32)  # as a signed int32


def _mix32(value: int) -> int:
    """lowbias32 on a Python int (mod 2**32)."""
    z = value & 0xFFFFFFFF
    z ^= z >> 16
    z = (z * 0x7FEB352D) & 0xFFFFFFFF
    z ^= z >> 15
    z = (z * 0x846CA68B) & 0xFFFFFFFF
    return z ^ (z >> 16)


def uniform_noise(shape: tuple[int, ...], seed: int, device: torch.device | str) -> torch.Tensor:
    """Uniform noise in ``[0, 1)`` (float32, ``shape``), 24-bit resolution, from a counter-based generator.

    Element i gets ``hash32(a * i + b)`` with an odd stride a and offset b derived from ``seed``, hashed by the
    "lowbias32" integer mixer in int32 arithmetic (wrapping mod 2**32). No torch generator is read or advanced;
    equal seeds give equal noise on any device.
    """
    numel = math.prod(shape)
    stride = (_mix32(seed) | 1) - (1 << 32 if _mix32(seed) | 1 >= 1 << 31 else 0)
    offset = _mix32(seed ^ 0x5BD1E995) & 0x7FFFFFFF
    z = torch.arange(numel, device=device, dtype=torch.int32) * stride + offset
    z = z ^ ((z >> 16) & 0xFFFF)
    z = z * _HASH_MUL_1
    z = z ^ ((z >> 15) & 0x1FFFF)
    z = z * _HASH_MUL_2
    z = z ^ ((z >> 16) & 0xFFFF)
    return ((z >> 8) & 0xFFFFFF).to(torch.float32).mul_(1.0 / (1 << 24)).reshape(shape)


def quantize_codes(
    x: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    bits: int,
    rounding: str = "nearest",
    seed: int | None = None,
) -> torch.Tensor:
    """Saturating affine quantisation: ``uint8`` codes of x's shape; scale/offset broadcast against x (float32).

    Stochastic rounding uses :func:`uniform_noise` with ``seed``, or the global generator when seed is None.
    """
    _check_bits(bits)
    _check_rounding(rounding)
    top = float((1 << bits) - 1)
    q = (x.detach().float() - offset) / scale
    if rounding == "nearest":
        q = torch.round(q)
    else:
        noise = torch.rand_like(q) if seed is None else uniform_noise(tuple(q.shape), seed, q.device)
        q = torch.floor(q + noise)
    q = torch.nan_to_num(q, nan=0.0)
    return q.clamp_(0.0, top).to(torch.uint8)


@dataclass(frozen=True)
class PackedTensor:
    """A tensor stored as packed codes: ``data`` (uint8, ``ceil(numel*bits/8)``), ``scale``/``offset`` (float32, G)."""

    data: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    bits: int
    group_dim: int | None
    group_size: int | None

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes plus scales and offsets."""
        return (
            self.data.numel() * self.data.element_size()
            + self.scale.numel() * self.scale.element_size()
            + self.offset.numel() * self.offset.element_size()
        )


def quantize_pack(
    x: torch.Tensor,
    bits: int,
    lo: torch.Tensor | None = None,
    hi: torch.Tensor | None = None,
    *,
    group_dim: int | None = None,
    group_size: int | None = None,
    rounding: str = "nearest",
    seed: int | None = None,
) -> PackedTensor:
    """Quantise x (fp32/bf16/fp16, any shape) to ``bits`` bits against the range ``[lo, hi]`` (shape ``(G,)``).

    ``lo``/``hi`` default to the per-group minimum and maximum of x. Values outside the range saturate.
    ``seed`` selects counter-based stochastic-rounding noise (see :func:`quantize_codes`).
    """
    if not x.is_floating_point():
        raise TypeError(f"quantize_pack takes a floating-point tensor, got {x.dtype}.")
    view_shape, axis, groups = group_layout(tuple(x.shape), group_dim, group_size)
    if lo is None or hi is None:
        lo, hi = group_min_max(x, group_dim, group_size)
    lo = lo.float().reshape(groups)
    hi = torch.maximum(hi.float().reshape(groups), lo)
    levels = float((1 << bits) - 1)
    scale = ((hi - lo) / levels).clamp_min(torch.finfo(torch.float32).tiny)
    bshape = _broadcast_shape(view_shape, axis, groups)
    codes = quantize_codes(x.reshape(view_shape), scale.view(bshape), lo.view(bshape), bits, rounding, seed)
    return PackedTensor(
        data=pack_codes(codes, bits),
        scale=scale,
        offset=lo,
        shape=tuple(x.shape),
        dtype=x.dtype,
        bits=bits,
        group_dim=group_dim,
        group_size=group_size,
    )


def unpack_dequantize(packed: PackedTensor) -> torch.Tensor:
    """Rebuild the approximate tensor (``packed.shape``, ``packed.dtype``): ``code * scale + offset``."""
    view_shape, axis, groups = group_layout(packed.shape, packed.group_dim, packed.group_size)
    numel = math.prod(packed.shape)
    codes = unpack_codes(packed.data, packed.bits, numel).reshape(view_shape)
    bshape = _broadcast_shape(view_shape, axis, groups)
    values = codes.float() * packed.scale.view(bshape) + packed.offset.view(bshape)
    return values.to(packed.dtype).reshape(packed.shape)
