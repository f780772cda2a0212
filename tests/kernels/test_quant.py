"""memft.kernels.quant: packing sizes, round trips, saturation, rounding error and unbiasedness."""

from __future__ import annotations

import math

import pytest
import torch

from memft.kernels.quant import (
    group_layout,
    group_min_max,
    pack_codes,
    packed_nbytes,
    quantize_pack,
    uniform_noise,
    unpack_codes,
    unpack_dequantize,
)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("numel", [1, 7, 1001])
def test_pack_round_trip_and_exact_size(bits: int, numel: int) -> None:
    codes = torch.randint(0, 1 << bits, (numel,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(numel * bits / 8) == packed_nbytes(numel, bits)
    assert torch.equal(unpack_codes(packed, bits, numel), codes)


def test_group_layouts() -> None:
    assert group_layout((2, 3, 5, 8), 1, None) == ((2, 3, 5, 8), 1, 3)  # per head of (B, H, N, D)
    assert group_layout((2, 5, 128), -1, 64) == ((2, 5, 2, 64), 2, 2)  # channel groups of (B, N, C)
    assert group_layout((2, 5, 96), -1, 64) == ((2, 5, 2, 48), 2, 2)  # largest divisor of 96 not above 64
    assert group_layout((4, 4), None, None) == ((16,), None, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_nearest_rounding_error_is_half_a_step(dtype: torch.dtype, bits: int) -> None:
    x = (torch.randn(3, 10, 96, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
    packed = quantize_pack(x, bits, group_dim=-1, group_size=32, rounding="nearest")
    assert packed.scale.shape == packed.offset.shape == (3,)
    assert packed.data.numel() == packed_nbytes(x.numel(), bits)
    assert packed.nbytes == packed_nbytes(x.numel(), bits) + 2 * 3 * 4
    restored = unpack_dequantize(packed)
    assert restored.dtype == dtype and restored.shape == x.shape
    step = packed.scale.repeat_interleave(32).view(1, 1, 96)
    dtype_slack = torch.finfo(dtype).eps * x.float().abs().amax()
    assert ((restored.float() - x.float()).abs() <= step / 2 * (1 + 1e-5) + 2 * dtype_slack).all()


def test_per_head_ranges_are_per_head() -> None:
    x = torch.randn(2, 3, 4, 5)
    x[:, 1] *= 100
    lo, hi = group_min_max(x, 1)
    assert torch.equal(lo, x.transpose(0, 1).reshape(3, -1).amin(1))
    assert torch.equal(hi, x.transpose(0, 1).reshape(3, -1).amax(1))


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_saturation_no_wrap_around(rounding: str) -> None:
    x = torch.tensor([-50.0, -1.0, 0.0, 0.5, 1.0, 1.004, 2.0, 300.0])
    packed = quantize_pack(x, 8, torch.tensor([-1.0]), torch.tensor([1.0]), rounding=rounding)
    restored = unpack_dequantize(packed)
    # values above the range come back as the top of the range, below it as the bottom: never wrapped mod 256
    assert restored[0] == -1.0 and restored[1] == -1.0
    assert restored[-1] == pytest.approx(1.0) and restored[-2] == pytest.approx(1.0)
    assert restored[-3] == pytest.approx(1.0)
    assert (restored <= 1.0 + 1e-6).all() and (restored >= -1.0).all()


@pytest.mark.parametrize("noise", ["global generator", "counter-based seeds"])
def test_stochastic_rounding_is_unbiased_and_error_shrinks_like_inverse_sqrt(noise: str) -> None:
    torch.manual_seed(3)
    x = torch.rand(64) * 2 - 1
    lo, hi = torch.tensor([-1.0]), torch.tensor([1.0])
    step = 2.0 / 15
    seeds = iter(range(10**6))

    def mean_of(draws: int) -> torch.Tensor:
        total = torch.zeros_like(x)
        for _ in range(draws):
            seed = next(seeds) * 7919 if noise == "counter-based seeds" else None
            total += unpack_dequantize(quantize_pack(x, 4, lo, hi, rounding="stochastic", seed=seed))
        return total / draws

    small, large = 50, 800
    err_small = (mean_of(small) - x).pow(2).mean().sqrt()
    mean_large = mean_of(large)
    err_large = (mean_large - x).pow(2).mean().sqrt()
    # per element the draw is Bernoulli on a grid of width `step`: std <= step/2, so z-scores are bounded
    assert ((mean_large - x).abs() <= 4.5 * (step / 2) / math.sqrt(large)).all()
    # 16x more draws: error ~4x smaller (allow 2.5x..6.5x for sampling noise)
    assert 2.5 < float(err_small / err_large) < 6.5


def test_uniform_noise_is_uniform_and_reproducible() -> None:
    u = uniform_noise((200_000,), 123, "cpu")
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    counts = torch.histc(u, bins=10, min=0.0, max=1.0)
    assert float((counts - 20_000).abs().max()) < 800  # about 5.7 sigma of a binomial count
    assert torch.equal(u, uniform_noise((200_000,), 123, "cpu"))
    other = uniform_noise((200_000,), 124, "cpu")
    assert abs(float(torch.corrcoef(torch.stack([u, other]))[0, 1])) < 0.01


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="bits"):
        quantize_pack(torch.randn(4), 3)
    with pytest.raises(ValueError, match="rounding"):
        quantize_pack(torch.randn(4), 8, rounding="up")
    with pytest.raises(TypeError):
        quantize_pack(torch.arange(4), 8)
    with pytest.raises(TypeError):
        pack_codes(torch.zeros(4, dtype=torch.int32), 4)


def test_runs_under_fake_tensor_mode() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.randn(2, 4, 8, 16)
        packed = quantize_pack(x, 4, group_dim=1, rounding="stochastic")
        assert packed.data.shape == (packed_nbytes(x.numel(), 4),)
        assert unpack_dequantize(packed).shape == x.shape
