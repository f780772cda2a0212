"""MeZO's scratch budget (arXiv 2305.17333: training memory = inference memory): a step holds at most
``scratch_bytes`` beyond inference, and drawing z in pieces or applying weights by row blocks keeps it exact."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import memft.optimizers.mezo as mezo
from memft.memory import MemoryTracker, estimate_training_memory, measure_training_memory
from memft.optimizers.mezo import CHUNK_NUMEL, MIN_SCRATCH_BYTES, MeZO, perturbation_seed
from tests.optimizers.test_mezo import reference_z, step_seeds, tiny_llama, tokens


def _held_scalars(n_samples: int) -> int:
    """Bytes of a step's 0-dim fp32 tensors beside its scratch: 2n objective values, n estimates, n coefficients."""
    return 4 * 4 * n_samples


def _excess(model: nn.Module, batch: torch.Tensor, optimizer: MeZO) -> int:
    """Tracked peak of one step minus the tracked peak of one inference forward on the same batch."""
    with torch.no_grad(), MemoryTracker(model=model) as inference:
        model(batch, labels=batch).loss
    with MemoryTracker(model=model, optimizer=optimizer) as step:
        optimizer.step(lambda: model(batch, labels=batch).loss)
    return step.peak_bytes - inference.peak_bytes


@pytest.mark.parametrize("n_samples", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_holds_at_most_the_budget_beyond_inference(dtype: torch.dtype, n_samples: int) -> None:
    """Tracked peak of a step minus the inference peak <= scratch_bytes (plus the step's 0-dim scalars). The tied
    embedding (also lm_head) and the MLP weights are each larger than the budgets, and one token row of 4 keeps the
    activations (under which scratch could hide) small: with the default budget, which builds every perturbed
    weight whole, the step shows more than either budget above inference."""
    batch, budgets = tokens(batch=1)[:, :4], (4096, 16384)
    model = tiny_llama(dtype)
    embedding = model.model.embed_tokens.weight
    assert embedding.numel() * embedding.element_size() > max(budgets) + _held_scalars(n_samples)
    whole = MeZO(model.parameters(), lr=1e-3, n_samples=n_samples)
    assert _excess(model, batch, whole) > max(budgets) + _held_scalars(n_samples)
    for budget in budgets:
        model = tiny_llama(dtype)
        optimizer = MeZO(model.parameters(), lr=1e-3, weight_decay=0.1, n_samples=n_samples, scratch_bytes=budget)
        assert _excess(model, batch, optimizer) <= budget + _held_scalars(n_samples)


@pytest.mark.parametrize("chunk_numel", [CHUNK_NUMEL, 100, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_budget_keeps_z_and_the_update_bitwise(dtype: torch.dtype, chunk_numel: int, monkeypatch) -> None:
    """With 1 KiB of scratch, z is drawn 32 values at a time and the update runs over ranges of about 100 values;
    the perturbed weights are bitwise θ ± ε·z with z from the documented one-draw-per-chunk recipe (1073 values:
    a tail of 1 behind the last 16-value block; chunks of 100 end 4 values past a 16-value block; chunks of 4 are
    below one block), the update is bitwise the documented fp32 accumulation, and both equal the default budget's."""
    monkeypatch.setattr(mezo, "CHUNK_NUMEL", chunk_numel)
    lr, eps, wd, n, seed = 0.05, 1e-2, 0.3, 2, 99
    finals = []
    for budget in (1024, None):
        torch.manual_seed(0)
        weight = nn.Parameter(torch.randn(37, 29).to(dtype))
        frozen = nn.Parameter(torch.randn(5).to(dtype), requires_grad=False)
        bias = nn.Parameter(torch.randn(37).to(dtype))
        inputs, targets = torch.randn(6, 29), torch.randn(6, 37)
        start = [weight.detach().clone(), bias.detach().clone()]
        optimizer = MeZO([weight, frozen, bias], lr=lr, eps=eps, weight_decay=wd, n_samples=n, seed=seed,
                         scratch_bytes=budget)
        seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

        def closure() -> torch.Tensor:
            w, b = weight.clone(), bias.clone()
            loss = ((inputs @ w.float().T + b.float() - targets) ** 2).mean()
            seen.append((w, b, loss))
            return loss

        optimizer.step(closure)
        expected = [theta.to(torch.float32, copy=True).mul_(1 - lr * wd) for theta in start]
        for k, step_seed in enumerate(step_seeds(seed, n)):
            (w_plus, b_plus, loss_plus), (w_minus, b_minus, loss_minus) = seen[2 * k], seen[2 * k + 1]
            coefficient = (loss_plus - loss_minus) / (2 * eps) * (lr / n)
            pairs = [(start[0], 0, w_plus, w_minus), (start[1], 2, b_plus, b_minus)]
            for i, (theta, index, plus, minus) in enumerate(pairs):
                z = reference_z(theta.numel(), step_seed, index, chunk_numel).view(theta.shape).to(dtype)
                assert torch.equal(plus, torch.add(theta, z, alpha=eps))
                assert torch.equal(minus, torch.add(theta, z, alpha=-eps))
                expected[i].addcmul_(z.float(), coefficient, value=-1)
        assert torch.equal(weight, expected[0].to(dtype)) and torch.equal(bias, expected[1].to(dtype))
        finals.append([weight.detach().clone(), bias.detach().clone()])
    assert all(torch.equal(a, b) for a, b in zip(*finals))


def test_weights_above_the_budget_apply_by_row_blocks() -> None:
    """nn.Embedding and nn.Linear (trainable bias) weights larger than the budget: the lookup is bitwise the lookup
    in θ + εz, the linear output matches F.linear at θ + εz to rounding (GEMMs over fewer output features may
    round differently), and ids outside the table still raise."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(300, 24), nn.Linear(24, 200))
    ids = torch.randint(0, 300, (3, 7), generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(model)
    eps, seed, budget = 1e-2, 5, 4096
    assert min(p.numel() * p.element_size() for p in (model[0].weight, model[1].weight)) > budget
    optimizer = MeZO(model.parameters(), lr=0.0, eps=eps, seed=seed, scratch_bytes=budget)
    outputs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda module, args, output: outputs.append(output)) for layer in model]
    optimizer.step(lambda: model(ids).pow(2).mean())
    for hook in hooks:
        hook.remove()
    step_seed = step_seeds(seed, 1)[0]
    perturbed = [
        torch.add(param, reference_z(param.numel(), step_seed, index, CHUNK_NUMEL).view(param.shape), alpha=eps)
        for index, param in enumerate(reference.parameters())
    ]
    embedded = nn.functional.embedding(ids, perturbed[0])
    assert torch.equal(outputs[0], embedded)
    torch.testing.assert_close(outputs[1], nn.functional.linear(embedded, perturbed[1], perturbed[2]))
    assert not torch.equal(outputs[0], reference[0](ids))
    with pytest.raises(IndexError, match="index out of range"):
        optimizer.step(lambda: model(torch.tensor([[3, 300]])).pow(2).mean())


def test_planner_estimate_equals_the_tracked_step_under_a_small_budget() -> None:
    """On fake tensors (the planner) the row blocks, pieces and ranges allocate what a real step allocates."""

    def build_model() -> nn.Module:
        return tiny_llama()

    def make_batch() -> torch.Tensor:
        return torch.randint(0, 256, (1, 4))

    def build_optimizer(model: nn.Module) -> MeZO:
        return MeZO(model.parameters(), lr=1e-3, weight_decay=0.1, scratch_bytes=8192)

    def train_step(model: nn.Module, batch: torch.Tensor, optimizer: MeZO) -> None:
        model.eval()
        optimizer.step(lambda: model(batch, labels=batch).loss)

    arguments = dict(train_step=train_step, steps=1, device="cpu")
    estimated = estimate_training_memory(build_model, make_batch, build_optimizer, **arguments)
    measured = measure_training_memory(build_model, make_batch, build_optimizer, **arguments)
    assert estimated.peak_bytes == measured.peak_bytes


def test_default_budget_and_bad_budgets() -> None:
    assert MeZO([nn.Parameter(torch.zeros(10))], lr=0.0).scratch() == MIN_SCRATCH_BYTES
    large = nn.Parameter(torch.empty(3 << 30, device="meta"))  # 12 GiB of fp32: 1 % is above 64 MiB
    assert MeZO([large], lr=0.0).scratch() == (12 << 30) // 100
    assert MeZO([large], lr=0.0, scratch_bytes=123).scratch() == 123
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="scratch_bytes"):
            MeZO([nn.Parameter(torch.zeros(3))], lr=0.0, scratch_bytes=bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_z_drawn_in_the_parameter_dtype_is_the_rounded_fp32_draw(dtype: torch.dtype) -> None:
    """On CUDA z is drawn a chunk at a time directly in the parameter's dtype (forward passes) or held as such
    (update ranges, here 4M values under the default 64 MiB budget): both equal the documented fp32 draw, cast."""
    torch.manual_seed(0)
    rows = CHUNK_NUMEL // 1024 + 3  # one full chunk and a second of 3072 values
    weight = nn.Parameter(torch.randn(rows, 1024, device="cuda").to(dtype))
    start, lr, eps, seed = weight.detach().clone(), 1e-2, 1e-3, 11
    optimizer = MeZO([weight], lr=lr, eps=eps, seed=seed)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def closure() -> torch.Tensor:
        w = weight.clone()
        loss = w.float().pow(2).mean()
        seen.append((w, loss))
        return loss

    optimizer.step(closure)
    step_seed = step_seeds(seed, 1)[0]
    generator, pieces = torch.Generator(device="cuda"), []
    for chunk_index, begin in enumerate(range(0, weight.numel(), CHUNK_NUMEL)):
        generator.manual_seed(perturbation_seed(step_seed, 0, chunk_index))
        size = min(CHUNK_NUMEL, weight.numel() - begin)
        pieces.append(torch.empty(size, device="cuda").normal_(generator=generator).to(dtype))
    z = torch.cat(pieces).view(weight.shape)
    (plus, loss_plus), (minus, loss_minus) = seen
    assert torch.equal(plus, torch.add(start, z, alpha=eps)) and torch.equal(minus, torch.add(start, z, alpha=-eps))
    coefficient = (loss_plus - loss_minus) / (2 * eps) * lr
    expected = start.to(torch.float32, copy=True).addcmul_(z.float(), coefficient, value=-1)
    assert torch.equal(weight, expected.to(dtype))
