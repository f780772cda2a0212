"""Bounded optimizer-step temporaries: chunked 8-bit moments, in-place project-back, compact clipping buffers.

The chunked step must equal the whole-tensor computation exactly (block-wise codes are independent and
element-wise arithmetic does not depend on chunking), and its transient memory, counted by
``memft.memory.MemoryTracker``, must be bounded by the chunk size instead of the parameter size.
"""

import math

import pytest
import torch
from torch import nn

from memft.memory import MemoryTracker
from memft.optimizers import _blockwise8bit as q8
from memft.optimizers.galore import GaLoreAdamW, GaLoreAdamW8bit, galore_param_groups
from memft.optimizers.layerwise import LayerwiseOptimizer

FP32 = {"atol": 1e-6, "rtol": 1e-6}
SMALL_CHUNK = 3 * q8.BLOCK_SIZE



# ---------------------------------------------------------------- block ranges
@pytest.mark.parametrize("signed", [True, False])
def test_range_quantisation_equals_whole_tensor_quantisation(signed):
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(5000, generator=gen) * torch.logspace(-4, 1, 5000)
    data = data if signed else data.abs()
    codes, absmax = q8.quantize(data, signed)
    ranged_codes, ranged_absmax = q8.zeros(data.numel(), "cpu")
    for start in range(0, data.numel(), SMALL_CHUNK):  # the last range ends in a partial block
        stop = min(start + SMALL_CHUNK, data.numel())
        q8.quantize_range_(ranged_codes, ranged_absmax, start, data[start:stop], signed)
        assert torch.equal(
            q8.dequantize_range(codes, absmax, start, stop, signed), q8.dequantize(codes, absmax, data.shape, signed)[start:stop]
        )
    assert torch.equal(ranged_codes, codes) and torch.equal(ranged_absmax, absmax)
    zero_codes, zero_absmax = q8.zeros(300, "cpu")
    reference_codes, reference_absmax = q8.quantize(torch.zeros(300), signed)
    assert torch.equal(zero_codes, reference_codes) and torch.equal(zero_absmax, reference_absmax)
    with pytest.raises(ValueError):
        q8.dequantize_range(codes, absmax, 100, 200, signed)


# ---------------------------------------------------------------- chunked == whole tensor
def whole_tensor_8bit_adamw(param, grads, lr, betas, eps, weight_decay):
    """The whole-tensor 8-bit step: dequantise both moments, update in fp32, raise v to m² / K, requantise, apply.

    K = (1 - beta1)² / (1 - beta2) · Σ_{k < step} (beta1² / beta2)^k bounds m² / v of exact Adam moments. Yields codes.
    """
    param = param.detach().clone()
    shape, numel = param.shape, param.numel()
    m_codes, m_absmax = q8.quantize(torch.zeros(numel), signed=True)
    v_codes, v_absmax = q8.quantize(torch.zeros(numel), signed=False)
    beta1, beta2 = betas
    for step, grad in enumerate(grads, start=1):
        m = q8.dequantize(m_codes, m_absmax, shape, signed=True)
        v = q8.dequantize(v_codes, v_absmax, shape, signed=False)
        g = grad.float()
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bound = (1 - beta1) ** 2 / (1 - beta2) * sum((beta1**2 / beta2) ** k for k in range(step))
        v = torch.maximum(v, m * m / bound)
        m_codes, m_absmax = q8.quantize(m, signed=True)
        v_codes, v_absmax = q8.quantize(v, signed=False)
        direction = m / (v.sqrt() / math.sqrt(1 - beta2**step) + eps)
        param.mul_(1 - lr * weight_decay)
        param.add_(direction, alpha=-lr / (1 - beta1**step))
        yield param, (m_codes, m_absmax, v_codes, v_absmax)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_8bit_step_equals_the_whole_tensor_computation(dtype):
    """Plain (full-shape) 8-bit moments in chunks of 768 elements: codes, scales and weights bit-identical."""
    gen = torch.Generator().manual_seed(1)
    init = torch.randn(50, 100, generator=gen).to(dtype)  # 5000 elements: 7 chunks, the last block partial
    grads = [torch.randn(50, 100, generator=gen).to(dtype) for _ in range(4)]
    param = nn.Parameter(init.clone())
    opt = GaLoreAdamW8bit([param], lr=1e-2, weight_decay=0.1, chunk_numel=SMALL_CHUNK)
    reference = whole_tensor_8bit_adamw(init, grads, 1e-2, (0.9, 0.999), 1e-8, 0.1)
    for grad, (expected, codes) in zip(grads, reference):
        param.grad = grad.clone()
        opt.step()
        state = opt.state[param]
        names = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")
        for name, reference_tensor in zip(names, codes):
            assert torch.equal(state[name], reference_tensor), name
        assert torch.equal(param.detach(), expected)


@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit])
def test_chunk_size_does_not_change_the_result(cls):
    """Small chunks vs one chunk per tensor, GaLore and plain parameters, bf16, with a subspace refresh."""
    runs = []
    for chunk in (SMALL_CHUNK, 2**22):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(300, 24), nn.Linear(24, 256, bias=False)).to(torch.bfloat16)
        model[1].weight.data[:] = torch.randn(256, 24, generator=torch.Generator().manual_seed(2))
        groups = [{"params": [model[1].weight], "rank": 20, "update_proj_gap": 2}, {"params": [model[0].weight]}]
        opt = cls(groups, lr=1e-2, weight_decay=0.01, chunk_numel=chunk)
        gen = torch.Generator().manual_seed(3)
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            opt.step()
        runs.append((model, opt))
    (small, opt_small), (whole, opt_whole) = runs
    for p, q in zip(small.parameters(), whole.parameters()):
        assert torch.equal(p, q)
        for key, value in opt_small.state[p].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, opt_whole.state[q][key]), key


def test_chunk_numel_must_be_a_multiple_of_the_block_size():
    for bad in (0, 1000, 2.0**20, True):
        with pytest.raises(ValueError, match="chunk_numel"):
            GaLoreAdamW8bit([nn.Parameter(torch.zeros(4))], chunk_numel=bad)


# ---------------------------------------------------------------- transient memory of a step
def _step_transient_bytes(chunk: int, fake: bool) -> tuple[int, dict]:
    """Peak minus baseline of the second step (no refresh) of GaLoreAdamW8bit on a bf16 embedding + GaLore weight."""

    def run() -> tuple[int, dict]:
        torch.manual_seed(0)
        embed = nn.Parameter(torch.randn(512, 128).to(torch.bfloat16))  # plain, 65536 elements
        weight = nn.Parameter(torch.randn(512, 256).to(torch.bfloat16))  # GaLore, low-rank 512 x 8 (8-bit)
        opt = GaLoreAdamW8bit(
            [{"params": [weight], "rank": 8, "update_proj_gap": 100}, {"params": [embed]}], lr=1e-3, chunk_numel=chunk
        )
        sizes = {"plain": embed.numel(), "full": weight.numel() * weight.element_size(), "low_rank": weight.shape[0] * 8}
        for step in range(2):
            embed.grad, weight.grad = torch.randn_like(embed), torch.randn_like(weight)
            if step == 0:
                opt.step()
                continue
            with MemoryTracker(None, opt, device="cpu") as tracker:
                tracker.register([embed, weight], "parameters")
                tracker.register([embed.grad, weight.grad], "gradients")
                baseline = tracker.current_bytes
                opt.step()
        return tracker.peak_bytes - baseline, sizes

    if not fake:
        return run()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return run()


def test_step_transient_memory_is_bounded_by_the_chunk_not_the_tensor():
    """Temporaries of an 8-bit step: about 24 bytes per chunk element plus a few low-rank buffers.

    Bound: 40 bytes x chunk_numel + 16 bytes x low-rank elements (projected gradient, direction, their
    conversions). A full-size (512 x 256 bf16, 256 KiB) update or a whole-tensor dequantisation of the
    embedding (65536 elements x 8 bytes of fp32 moments) would exceed it. Fake tensors (the memory
    estimator) count what real tensors do, up to the 1 KiB code books (cached for real tensors, rebuilt for fake).
    """
    chunk = 8 * q8.BLOCK_SIZE
    transient, sizes = _step_transient_bytes(chunk, fake=False)
    bound = 40 * chunk + 16 * sizes["low_rank"]
    assert bound < sizes["full"] and bound < 8 * sizes["plain"]
    assert transient <= bound, (transient, bound)
    whole, _ = _step_transient_bytes(2**22, fake=False)
    assert whole > 8 * sizes["plain"] > bound  # the measurement sees a whole-tensor dequantisation
    assert abs(_step_transient_bytes(chunk, fake=True)[0] - transient) <= 2 * 4 * 256


# ---------------------------------------------------------------- layer-wise clipping buffers
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.up_proj = nn.Linear(32, 96, bias=False)
        self.down_proj = nn.Linear(96, 32, bias=False)
        self.lm_head = nn.Linear(32, 64, bias=False)

    def forward(self, tokens):
        h = self.embed(tokens)
        return self.lm_head(h + self.down_proj(torch.relu(self.up_proj(h))))


def _tiny(dtype=torch.float32):
    torch.manual_seed(0)
    return _Tiny().to(dtype)


def _loss(model, step):
    tokens = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(step))
    logits = model(tokens[:, :-1]).float()
    return nn.functional.cross_entropy(logits.reshape(-1, 64), tokens[:, 1:].reshape(-1))


def test_clipping_holds_low_rank_gradients_in_the_gradient_dtype():
    """bf16, no accumulation: buffers held for clipping are bf16 low-rank + plain gradients, and the
    deferred path with an inactive clip equals the immediate in-backward path bit for bit."""
    results = []
    for max_grad_norm in (None, 1e9):
        model = _tiny(torch.bfloat16)
        opt = LayerwiseOptimizer(galore_param_groups(model, rank=4, update_proj_gap=2), GaLoreAdamW8bit,
                                 max_grad_norm=max_grad_norm, lr=1e-2)  # fmt: skip
        held = []  # when the embedding's gradient, the last, arrives (the step then finishes inside backward)
        model.embed.weight.register_hook(lambda grad: held.append(opt.accumulated_gradient_bytes()))
        for step in range(3):
            opt.set_micro_batch(0, 1)
            _loss(model, step).backward()
            if max_grad_norm is not None:
                # up_proj 96x32 -> 96x4, down_proj 32x96 -> 4x96 (std projection); lm_head full; bf16.
                assert held[-1] == 2 * (96 * 4 + 4 * 96 + 64 * 32)
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for immediate, deferred in zip(*results):
        assert torch.equal(immediate, deferred)


def test_layerwise_clipping_uses_the_norm_of_the_consumed_gradients():
    """Global norm = sqrt(Σ‖P(G)‖² over GaLore weights + Σ‖G‖² over the rest): below the full-gradient norm."""
    model = _tiny()
    groups = galore_param_groups(model, rank=4, update_proj_gap=2)
    _loss(model, 0).backward()
    expected_sq, full_sq = 0.0, 0.0
    for group in groups:
        for p in group["params"]:
            grad = p.grad.double()
            full_sq += grad.square().sum().item()
            if "rank" in group:
                u, _, vh = torch.linalg.svd(grad, full_matrices=False)
                grad = grad @ vh[:4].T if grad.shape[0] >= grad.shape[1] else u[:, :4].T @ grad
            expected_sq += grad.square().sum().item()
    model.zero_grad()
    opt = LayerwiseOptimizer(groups, GaLoreAdamW, max_grad_norm=1e-3, lr=1e-2)
    opt.set_micro_batch(0, 1)
    _loss(model, 0).backward()
    opt.step()
    assert opt.last_grad_norm.item() == pytest.approx(math.sqrt(expected_sq), rel=1e-5)
    assert math.sqrt(expected_sq) < 0.99 * math.sqrt(full_sq)
