"""Tests for memft.optimizers.mezo (MeZO, arXiv 2305.17333)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import memft.optimizers.mezo as mezo
from memft.optimizers.mezo import CHUNK_NUMEL, MeZO, perturbation_seed

LLAMA_KWARGS = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=256,
)
BIT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def tiny_llama(dtype: torch.dtype = torch.float32) -> nn.Module:
    """A 2-layer Llama built from config, with the input embedding tied to lm_head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA_KWARGS, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    return model if dtype == torch.float32 else model.to(dtype)


def tokens(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, LLAMA_KWARGS["vocab_size"], (batch, 16), generator=torch.Generator().manual_seed(0))


def bits(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone().view(BIT_VIEW[p.dtype]) for name, p in model.named_parameters()}


def step_seeds(seed: int, count: int) -> list[int]:
    """The documented recipe: step seeds are uniform draws in [0, 2^63 − 1) from a CPU generator seeded with seed."""
    generator = torch.Generator().manual_seed(seed)
    return [int(torch.randint(0, (1 << 63) - 1, (), generator=generator).item()) for _ in range(count)]


def reference_z(numel: int, step_seed: int, param_index: int, chunk_numel: int) -> torch.Tensor:
    """z from the documented recipe: chunk c of chunk_numel values is drawn after seeding perturbation_seed(s, i, c)."""
    chunks = []
    for chunk_index, start in enumerate(range(0, numel, chunk_numel)):
        generator = torch.Generator().manual_seed(perturbation_seed(step_seed, param_index, chunk_index))
        chunks.append(torch.empty(min(chunk_numel, numel - start)).normal_(generator=generator))
    return torch.cat(chunks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lr_zero_leaves_weights_bitwise_unchanged(dtype: torch.dtype) -> None:
    model, batch = tiny_llama(dtype), tokens()
    before = bits(model)
    optimizer = MeZO(model.parameters(), lr=0.0, eps=1e-3, weight_decay=0.1, n_samples=2)
    losses = []

    def closure() -> torch.Tensor:
        losses.append(model(batch, labels=batch).loss)
        return losses[-1]

    for _ in range(3):
        optimizer.step(closure)
    assert len(losses) == 12
    assert all(losses[i] != losses[i + 1] for i in range(0, 12, 2)), "l+ == l-: the forward was not perturbed"
    after = bits(model)
    assert all(torch.equal(before[name], after[name]) for name in before)

    if dtype != torch.float32:  # the reference scheme (+εz, −2εz, +εz in place) fails this very check
        weight = model.model.layers[0].mlp.up_proj.weight.detach().clone()
        z = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
        restored = weight.clone().add_(z, alpha=1e-3).add_(z, alpha=-2e-3).add_(z, alpha=1e-3)
        assert not torch.equal(restored.view(torch.int16), weight.view(torch.int16))


def _capture_perturbed_and_loss(model: nn.Module, optimizer: MeZO, loss_fn) -> tuple[dict, torch.Tensor]:
    """Run one step; return the parameter values and the loss seen by the first (θ + εz) evaluation."""
    captured: dict[str, torch.Tensor] = {}
    first_loss: list[torch.Tensor] = []

    def closure() -> torch.Tensor:
        if not captured:
            captured.update({name: p.clone() for name, p in model.named_parameters()})
        loss = loss_fn(model)
        first_loss.append(loss)
        return loss

    optimizer.step(closure)
    return captured, first_loss[0]


def _mha_model() -> nn.Module:
    torch.manual_seed(0)
    # train mode with dropout 0: deterministic, and the same (non-fused) attention path with or without MeZO
    return nn.Sequential(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), nn.Linear(32, 1))


@pytest.mark.parametrize("case", ["llama_tied_embeddings", "multihead_attention"])
def test_forward_sees_every_parameter_perturbed_once(case: str) -> None:
    """l+ equals the loss of a copy whose weights were set to θ + εz: the tied weight carries one z in both uses,
    and nn.MultiheadAttention's out_proj (read without calling its forward) is perturbed too."""
    if case == "llama_tied_embeddings":
        model, batch = tiny_llama(), tokens()
        assert model.lm_head.weight is model.model.embed_tokens.weight

        def loss_fn(m: nn.Module) -> torch.Tensor:
            return m(batch, labels=batch).loss
    else:
        model, inputs = _mha_model(), torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))

        def loss_fn(m: nn.Module) -> torch.Tensor:
            return m(inputs).pow(2).mean()

    reference = copy.deepcopy(model)
    eps = 1e-2
    captured, loss_plus = _capture_perturbed_and_loss(model, MeZO(model.parameters(), lr=0.0, eps=eps), loss_fn)
    with torch.no_grad():
        deltas = []
        for name, param in reference.named_parameters():
            deltas.append(((captured[name] - param) / eps).flatten())
            assert (deltas[-1] != 0).float().mean() > 0.99, f"{name} was not perturbed"
            param.copy_(captured[name])
        assert 0.9 < torch.cat(deltas).pow(2).mean().sqrt() < 1.1  # z ~ N(0, I)
        assert torch.equal(loss_fn(reference), loss_plus)


@pytest.mark.parametrize("chunk_numel", [CHUNK_NUMEL, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_matches_hand_computation(dtype: torch.dtype, chunk_numel: int, monkeypatch) -> None:
    """θ' = θ(1 − lr·wd) − Σ_k (lr·g_k/n) z_k with g_k = (l+ − l-)/(2ε), z_k from the documented seed recipe
    (one chunk, or chunks of 4 values with a short tail); a frozen parameter between the two trainable ones still
    counts in the parameter index; the weight is a non-contiguous (transposed) tensor."""
    monkeypatch.setattr(mezo, "CHUNK_NUMEL", chunk_numel)
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(5, 3).to(dtype).T)
    assert not weight.is_contiguous()
    frozen = nn.Parameter(torch.randn(4).to(dtype), requires_grad=False)
    bias = nn.Parameter(torch.randn(3).to(dtype))
    inputs, targets = torch.randn(7, 5), torch.randn(7, 3)
    lr, eps, wd, n, seed = 0.05, 1e-2, 0.3, 2, 1234
    optimizer = MeZO([weight, frozen, bias], lr=lr, eps=eps, weight_decay=wd, n_samples=n, seed=seed)
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def closure() -> torch.Tensor:
        w, b = weight.clone(), bias.clone()
        assert torch.equal(weight.T, w.T)  # value getters (.T, .data, ...) see the perturbed tensor too
        loss = ((inputs @ w.float().T + b.float() - targets) ** 2).mean()
        seen.append((w, b, loss))
        return loss

    start, frozen_start = [weight.detach().clone(), bias.detach().clone()], frozen.detach().clone()
    optimizer.step(closure)

    expected = [t.double() * (1 - lr * wd) for t in start]
    for k, step_seed in enumerate(step_seeds(seed, n)):
        (w_plus, b_plus, loss_plus), (w_minus, b_minus, loss_minus) = seen[2 * k], seen[2 * k + 1]
        g = (loss_plus - loss_minus) / (2 * eps)
        for i, (theta, index, plus, minus) in enumerate(
            [(start[0], 0, w_plus, w_minus), (start[1], 2, b_plus, b_minus)]
        ):
            z = reference_z(theta.numel(), step_seed, index, chunk_numel).view(theta.shape).to(dtype)
            assert torch.equal(plus, torch.add(theta, z, alpha=eps))
            assert torch.equal(minus, torch.add(theta, z, alpha=-eps))
            expected[i] -= (lr * g.double() / n) * z.double()
    assert torch.equal(frozen, frozen_start)
    ulps = 4 if dtype == torch.float32 else 1  # fp32: a few roundings in fp32; bf16: one final rounding
    for actual, want in zip([weight, bias], expected):
        assert ((actual.double() - want).abs() <= ulps * torch.finfo(dtype).eps * want.abs()).all()


def test_spsa_estimate_is_unbiased_with_error_shrinking_like_inverse_sqrt_n() -> None:
    """On f(θ) = ½θᵀAθ + bᵀθ the estimate per sample is D⁻¹ z zᵀ D ∇f (D: each group's ε on its entries), with
    covariance C = D⁻¹(‖D∇f‖² I + D∇f ∇fᵀD)D⁻¹, so the mean of N samples has squared error tr(C)/N on average.

    A step with lr = 1 and n_samples = N moves θ by minus the mean of N samples. 16·R such steps give 16·R means
    of N samples and, averaged by 16, R means of 16N samples; tolerances are 4 standard errors of the observed
    squared errors."""
    dims, eps_groups, n, repeats = (8, 4), (1e-3, 2e-3), 8, 12
    generator = torch.Generator().manual_seed(0)
    d = sum(dims)
    root = torch.randn(d, d, generator=generator, dtype=torch.float64)
    a = root @ root.T / d + torch.eye(d, dtype=torch.float64)
    b, theta0 = torch.randn(2, d, generator=generator, dtype=torch.float64)
    gradient = a @ theta0 + b
    params = [nn.Parameter(part.clone()) for part in theta0.split(dims)]

    def closure() -> torch.Tensor:
        theta = torch.cat(params)
        return theta @ (0.5 * a @ theta + b)

    scale = torch.cat([torch.full((k,), e, dtype=torch.float64) for k, e in zip(dims, eps_groups)])
    w = scale * gradient
    cov = (w.dot(w) * torch.eye(d, dtype=torch.float64) + torch.outer(w, w)) / torch.outer(scale, scale)

    optimizer = MeZO([{"params": [p], "eps": e} for p, e in zip(params, eps_groups)], lr=1.0, n_samples=n)
    means = []
    for _ in range(16 * repeats):
        with torch.no_grad():
            for p, part in zip(params, theta0.split(dims)):
                p.copy_(part)
        optimizer.step(closure)
        means.append(theta0 - torch.cat([p.detach() for p in params]))
    small = torch.stack(means)
    large = small.view(repeats, 16, d).mean(1)

    squared_errors = {}
    for size, block_means in ((n, small), (16 * n, large)):
        errors = (block_means - gradient).pow(2).sum(1)
        mse, standard_error = errors.mean().item(), errors.std().item() / math.sqrt(len(errors))
        expected = cov.trace().item() / size
        assert abs(mse - expected) < 4 * standard_error, f"N={size}: squared error {mse} vs {expected}"
        squared_errors[size] = (mse, standard_error)
    (mse_small, se_small), (mse_large, se_large) = squared_errors[n], squared_errors[16 * n]
    ratio = math.sqrt(mse_small / mse_large)
    ratio_sd = 0.5 * ratio * math.hypot(se_small / mse_small, se_large / mse_large)
    assert abs(ratio - 4) < 4 * ratio_sd, f"error ratio {ratio} ± {ratio_sd}, expected 4 (1/sqrt(N))"

    pooled_error = (small.mean(0) - gradient).pow(2).sum().item()
    samples = 16 * repeats * n
    pooled_sd = math.sqrt(2 * (cov @ cov).trace().item()) / samples
    assert pooled_error < cov.trace().item() / samples + 5 * pooled_sd, "the estimate is biased"


def test_resume_continues_the_identical_trajectory() -> None:
    batch, total, saved_at = tokens(), 6, 3

    def make(model: nn.Module, seed: int) -> tuple[MeZO, torch.optim.lr_scheduler.LRScheduler]:
        optimizer = MeZO(model.parameters(), lr=1e-3, eps=1e-3, weight_decay=0.01, n_samples=2, seed=seed)
        return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)

    def train(model, optimizer, scheduler, steps):
        for _ in range(steps):
            optimizer.step(lambda: model(batch, labels=batch).loss)
            scheduler.step()

    straight = tiny_llama(torch.bfloat16)
    initial = copy.deepcopy(straight)
    train(straight, *make(straight, seed=7), total)

    first = copy.deepcopy(initial)
    optimizer, scheduler = make(first, seed=7)
    train(first, optimizer, scheduler, saved_at)
    buffer = io.BytesIO()
    state = {"model": first.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    torch.save(state, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed = copy.deepcopy(initial)
    resumed.load_state_dict(checkpoint["model"])
    optimizer, scheduler = make(resumed, seed=999)
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    assert optimizer.steps_taken == saved_at
    train(resumed, optimizer, scheduler, total - saved_at)
    assert optimizer.steps_taken == total
    expected, actual = bits(straight), bits(resumed)
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    assert not all(torch.equal(expected[name], bits(initial)[name]) for name in expected)


def test_peft_lora_trains_only_adapters() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    batch = tokens()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = MeZO(model.parameters(), lr=1e-2, eps=1e-2)
    for _ in range(3):
        optimizer.step(lambda: model(batch, labels=batch).loss)
    lora = [name for name, p in model.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in name for name in lora)
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == (name in lora), name


def test_micro_batches_of_one_closure_share_the_perturbation() -> None:
    """Gradient accumulation contract: a closure averaging micro-batches sees one z; with equal micro-batch sizes
    it estimates the same objective as the full batch."""
    batch = tokens(batch=4)
    losses = {}
    for mode in ("full", "accumulated"):
        model = tiny_llama()
        optimizer, seen = MeZO(model.parameters(), lr=0.0, eps=1e-2, seed=3), []

        def closure() -> torch.Tensor:
            if mode == "full":
                return model(batch, labels=batch).loss
            parts = []
            for micro in batch.split(2):
                seen.append(model.lm_head.weight.clone())
                parts.append(model(micro, labels=micro).loss)
            return torch.stack(parts).mean()

        losses[mode] = optimizer.step(closure)
    assert len(seen) == 4 and torch.equal(seen[0], seen[1]) and torch.equal(seen[2], seen[3])
    assert not torch.equal(seen[0], seen[2])  # θ + εz, then θ − εz
    torch.testing.assert_close(losses["accumulated"], losses["full"], rtol=1e-5, atol=0)


def test_linear_regression_converges() -> None:
    """Least squares in 8 dimensions: 100 steps cut the loss by at least 10^3 (about 10^4 is typical)."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(256, 8, generator=generator)
    targets = inputs @ torch.randn(8, 1, generator=generator)
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    optimizer = MeZO(model.parameters(), lr=0.05, eps=1e-3, seed=1)

    def closure() -> torch.Tensor:
        return nn.functional.mse_loss(model(inputs), targets)

    initial = optimizer.step(closure)
    for _ in range(99):
        final = optimizer.step(closure)
    assert final < 1e-3 * initial


def test_non_differentiable_objective_accuracy_improves() -> None:
    """The closure returns −accuracy (a Python float): 150 steps take a linear classifier from below 60 % to at
    least 95 % on separable data (400 points, 8 features)."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(400, 8, generator=generator)
    labels = (inputs @ torch.randn(8, generator=generator) > 0).long()
    model = nn.Linear(8, 2)
    with torch.no_grad():
        model.weight.copy_(0.1 * torch.randn(2, 8, generator=generator))

    def accuracy() -> float:
        return (model(inputs).argmax(-1) == labels).float().mean().item()

    initial = accuracy()
    optimizer = MeZO(model.parameters(), lr=0.02, eps=0.05, seed=2)
    for _ in range(150):
        returned = optimizer.step(lambda: -accuracy())
    assert isinstance(returned, float)
    assert initial < 0.6 and accuracy() >= 0.95, (initial, accuracy())


def test_step_runs_under_fake_tensor_mode() -> None:
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode():
        model = tiny_llama()
        batch = tokens()
        optimizer = MeZO(model.parameters(), lr=1e-3, weight_decay=0.1, n_samples=2)
        loss = optimizer.step(lambda: model(batch, labels=batch).loss)
        assert isinstance(loss, FakeTensor) and loss.shape == ()
        assert isinstance(model.lm_head.weight, FakeTensor)
    assert optimizer.steps_taken == 1


def test_bad_arguments_are_refused() -> None:
    params = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="lr"):
        MeZO(params, lr=-1.0)
    with pytest.raises(ValueError, match="eps"):
        MeZO(params, lr=1e-3, eps=0.0)
    with pytest.raises(ValueError, match="n_samples"):
        MeZO(params, lr=1e-3, n_samples=0)
    with pytest.raises(TypeError, match="floating-point"):
        MeZO([torch.zeros(3, dtype=torch.long)], lr=1e-3)
    optimizer = MeZO(params, lr=1e-3)
    with pytest.raises(TypeError, match="closure"):
        optimizer.step(None)
    with pytest.raises(ValueError, match="scalar"):
        optimizer.step(lambda: params[0] * 2)
    with pytest.raises(ValueError, match="mezo"):
        optimizer.load_state_dict(torch.optim.SGD(params, lr=1e-3).state_dict())
