"""LayerwiseOptimizer: equal to the ordinary optimizer step for step, accumulation, clipping, LambdaLR, resume."""

import copy
import io

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from memft.optimizers.galore import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, galore_param_groups
from memft.optimizers.layerwise import LayerwiseOptimizer
from tests.optimizers.tiny_model import TinyModel
from memft.optimizers.natural_galore import NaturalGaLoreAdamW

FP32 = {"atol": 1e-6, "rtol": 1e-6}
VOCAB = 192


GALORE_WEIGHTS = ("q_proj.weight", "up_proj.weight", "down_proj.weight")


def _make_model():
    torch.manual_seed(0)
    return TinyModel(VOCAB)  # embedding of 4608 elements: 8-bit moments in GaLoreAdamW8bit


def _micro_loss(model, step, index, total):
    gen = torch.Generator().manual_seed(1000 * step + index)
    tokens = torch.randint(0, VOCAB, (4, 9), generator=gen)
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)) / total


def _lr_lambda(step):
    return 1.0 / (1.0 + step)


def _groups(model, **extra):
    return galore_param_groups(model, rank=4, update_proj_gap=2, scale=0.5, weight_decay=0.01, **extra)


def _run_layerwise(model, opt, sched, steps, total, start=0, zero_grad_each_micro=False):
    for step in range(start, start + steps):
        for index in range(total):
            opt.set_micro_batch(index, total)
            _micro_loss(model, step, index, total).backward()
            assert all(p.grad is None for p in model.parameters())
            if zero_grad_each_micro:
                opt.zero_grad()
        opt.step()
        sched.step()
        opt.zero_grad()
        yield step


def _run_standard(model, opt, sched, steps, total):
    for step in range(steps):
        for index in range(total):
            _micro_loss(model, step, index, total).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        yield step


ALGORITHMS = {
    "adamw": (GaLoreAdamW, {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-6}),
    "adamw8bit": (GaLoreAdamW8bit, {"lr": 1e-2}),
    "adafactor": (GaLoreAdafactor, {"lr": 1e-2, "relative_step": False, "beta1": 0.9}),
    "natural": (NaturalGaLoreAdamW, {"lr": 1e-2, "history_size": 3}),
}


@pytest.mark.parametrize("name", list(ALGORITHMS))
@pytest.mark.parametrize("total", [1, 3])
def test_layerwise_equals_standard_step_for_step_with_lambda_lr(name, total):
    """No accumulation, and 3 micro-batches with refresh_grad="accumulated" (SVD of the summed gradient)."""
    cls, kwargs = ALGORITHMS[name]
    model, twin = _make_model(), _make_model()
    layerwise = LayerwiseOptimizer(_groups(model), cls, refresh_grad="accumulated", **kwargs)
    standard = cls(_groups(twin), **kwargs)
    sched_lw, sched_std = LambdaLR(layerwise, _lr_lambda), LambdaLR(standard, _lr_lambda)
    lw_run = _run_layerwise(model, layerwise, sched_lw, 5, total)
    std_run = _run_standard(twin, standard, sched_std, 5, total)
    for step, _ in zip(lw_run, std_run):
        for (param_name, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, **FP32, msg=f"{param_name} after step {step}")
        assert layerwise.param_groups[0]["lr"] == standard.param_groups[0]["lr"] == kwargs["lr"] * _lr_lambda(step + 1)
    assert sched_lw.last_epoch == 5
    q_state = layerwise.state[model.q_proj.weight]
    assert q_state["step"] == 5 and q_state["projector"]["num_refreshes"] == 3  # steps 0, 2, 4


def _std_basis(grad, rank):
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    return (None, vh[:rank]) if grad.shape[0] >= grad.shape[1] else (u[:, :rank], None)


def reference_layerwise_adamw(model, steps, total, refresh, max_norm=None, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, wd=0.01):
    """Plain-torch GaLore-AdamW with projected-gradient accumulation, as layerwise.py documents it.

    GaLore weights: on refresh steps (every 2) the basis comes from the first micro-batch's gradient
    (refresh="first") or the summed one ("accumulated"); consumed gradient = Σ_i P(G_i). Others: Σ_i G_i.
    Clipping: global norm over the consumed gradients. LambdaLR: lr_t = lr / (1 + t). Yields each step.
    """
    rank, gap, scale = 4, 2, 0.5
    state = {name: {"m": None, "v": None, "basis": None} for name, _ in model.named_parameters()}
    beta1, beta2 = betas
    for step in range(steps):
        per_micro = []
        for index in range(total):
            model.zero_grad()
            _micro_loss(model, step, index, total).backward()
            per_micro.append({n: p.grad.clone() for n, p in model.named_parameters()})
        consumed = {}
        for name, _ in model.named_parameters():
            grads = [g[name] for g in per_micro]
            if name in GALORE_WEIGHTS:
                if step % gap == 0:
                    source = grads[0] if refresh == "first" else sum(grads[1:], grads[0].clone())
                    state[name]["basis"] = _std_basis(source, rank)
                left, right = state[name]["basis"]
                project = (lambda g: left.T @ g) if left is not None else (lambda g: g @ right.T)
                consumed[name] = sum((project(g) for g in grads[1:]), project(grads[0]))
            else:
                consumed[name] = sum(grads[1:], grads[0].clone())
        if max_norm is not None:
            norm = torch.sqrt(sum((c.double() ** 2).sum() for c in consumed.values())).float()
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            consumed = {n: c * coef for n, c in consumed.items()}
        lr_t = lr * _lr_lambda(step)
        with torch.no_grad():
            for name, p in model.named_parameters():
                st, r = state[name], consumed[name]
                st["m"] = (1 - beta1) * r if st["m"] is None else beta1 * st["m"] + (1 - beta1) * r
                st["v"] = (1 - beta2) * r * r if st["v"] is None else beta2 * st["v"] + (1 - beta2) * r * r
                n = (st["m"] / (1 - beta1 ** (step + 1))) / ((st["v"] / (1 - beta2 ** (step + 1))).sqrt() + eps)
                p.mul_(1 - lr_t * wd)
                if name in GALORE_WEIGHTS:
                    left, right = st["basis"]
                    p.sub_(lr_t * scale * (left @ n if left is not None else n @ right))
                else:
                    p.sub_(lr_t * n)
        model.zero_grad()
        yield step


@pytest.mark.parametrize(
    "total, refresh_grad, max_grad_norm",
    [(3, "first_micro_batch", None), (3, "accumulated", None), (1, "first_micro_batch", 0.5), (2, "first_micro_batch", 0.5)],
)
def test_layerwise_matches_reference_with_accumulation_and_clipping(total, refresh_grad, max_grad_norm):
    model, ref_model = _make_model(), _make_model()
    opt = LayerwiseOptimizer(
        _groups(model), GaLoreAdamW, max_grad_norm=max_grad_norm, refresh_grad=refresh_grad,
        lr=1e-2, betas=(0.8, 0.95), eps=1e-6,
    )  # fmt: skip
    sched = LambdaLR(opt, _lr_lambda)
    refresh = "first" if refresh_grad == "first_micro_batch" else "accumulated"
    reference = reference_layerwise_adamw(ref_model, 5, total, refresh, max_norm=max_grad_norm)
    for step, _ in zip(_run_layerwise(model, opt, sched, 5, total), reference):
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, **FP32, msg=f"{name} after step {step}")
        if max_grad_norm is not None:
            assert opt.last_grad_norm > max_grad_norm  # clipping was active


def test_first_micro_batch_refresh_differs_from_accumulated_refresh():
    """The two refresh policies are distinguishable, so the test above checks which one ran."""
    finals = []
    for refresh in ("first", "accumulated"):
        model = _make_model()
        for _ in reference_layerwise_adamw(model, 1, 3, refresh):
            pass
        finals.append(model.q_proj.weight.detach().clone())
    assert (finals[0] - finals[1]).abs().max() > 1e-4


def test_zero_grad_between_micro_batches_is_harmless():
    results = []
    for zero_each in (False, True):
        model = _make_model()
        opt = LayerwiseOptimizer(_groups(model), GaLoreAdamW, lr=1e-2)
        for _ in _run_layerwise(model, opt, LambdaLR(opt, _lr_lambda), 3, 2, zero_grad_each_micro=zero_each):
            pass
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_accumulation_holds_only_low_rank_buffers_for_galore_weights():
    model = _make_model()
    opt = LayerwiseOptimizer(_groups(model), GaLoreAdamW, lr=1e-2)
    opt.set_micro_batch(0, 2)
    _micro_loss(model, 0, 0, 2).backward()
    assert all(p.grad is None for p in model.parameters())
    galore_ids = {id(getattr(model, n.split(".")[0]).weight) for n in GALORE_WEIGHTS}
    plain_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in galore_ids)
    # std projection, rank 4: q_proj 40x24 -> 40x4, up_proj 72x40 -> 72x4, down_proj 24x72 -> 4x72; fp32 buffers.
    low_rank_bytes = 4 * 4 * (40 + 72 + 72)
    assert opt.accumulated_gradient_bytes() == plain_bytes + low_rank_bytes


def test_parameter_without_gradient_in_last_micro_batch_is_stepped_by_step():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(6, 6, bias=False)
            self.extra = nn.Linear(6, 6, bias=False)

        def forward(self, x, use_extra):
            h = self.q_proj(x)
            return self.extra(h) if use_extra else h

    def loss(model, index):
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(index))
        return model(x, use_extra=index == 0).pow(2).mean() / 2

    torch.manual_seed(0)
    model = Branchy()
    twin = copy.deepcopy(model)
    initial = copy.deepcopy(model)
    groups = [{"params": [model.q_proj.weight], "rank": 2}, {"params": [model.extra.weight]}]
    twin_groups = [{"params": [twin.q_proj.weight], "rank": 2}, {"params": [twin.extra.weight]}]
    layerwise = LayerwiseOptimizer(groups, GaLoreAdamW, refresh_grad="accumulated", lr=0.1)
    standard = GaLoreAdamW(twin_groups, lr=0.1)
    for index in range(2):
        layerwise.set_micro_batch(index, 2)
        loss(model, index).backward()
        loss(twin, index).backward()
    assert torch.equal(model.extra.weight, twin.extra.weight)  # not yet updated: it got no gradient in micro-batch 1
    layerwise.step()
    standard.step()
    for p, q, p0 in zip(model.parameters(), twin.parameters(), initial.parameters()):
        torch.testing.assert_close(p, q, **FP32)
        assert not torch.equal(p, p0)


def _round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("cls, kwargs", [(GaLoreAdamW, {"lr": 1e-2}), (GaLoreAdamW8bit, {"lr": 1e-2})])
def test_resume_from_checkpoint_equals_uninterrupted_run(cls, kwargs):
    def build():
        model = _make_model()
        opt = LayerwiseOptimizer(_groups(model, svd="randomized", svd_oversampling=1), cls, max_grad_norm=1.0, **kwargs)
        return model, opt, LambdaLR(opt, _lr_lambda)

    model, opt, sched = build()
    for _ in _run_layerwise(model, opt, sched, 6, 2):
        pass
    first, first_opt, first_sched = build()
    for _ in _run_layerwise(first, first_opt, first_sched, 3, 2):
        pass
    saved = _round_trip({"model": first.state_dict(), "opt": first_opt.state_dict(), "sched": first_sched.state_dict()})
    resumed, resumed_opt, resumed_sched = build()
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    resumed_sched.load_state_dict(saved["sched"])
    for _ in _run_layerwise(resumed, resumed_opt, resumed_sched, 3, 2, start=3):
        pass
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    assert resumed_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_contract_violations_raise():
    model = _make_model()
    opt = LayerwiseOptimizer(_groups(model), GaLoreAdamW, lr=1e-2)
    _micro_loss(model, 0, 0, 1).backward()  # total = 1 by default: parameters are updated in here
    with pytest.raises(RuntimeError, match="after its update"):
        _micro_loss(model, 0, 1, 1).backward()  # a second backward without opt.step()
    with pytest.raises(RuntimeError, match="between optimizer steps"):
        opt.state_dict()
    with pytest.raises(RuntimeError, match="not finalised"):
        opt.set_micro_batch(0, 2)
    opt.step()
    with pytest.raises(ValueError, match="out of order"):
        opt.set_micro_batch(1, 2)
    with pytest.raises(ValueError):
        opt.set_micro_batch(2, 2)
    with pytest.raises(TypeError):
        LayerwiseOptimizer(_groups(_make_model()), torch.optim.AdamW, lr=1e-2)
    with pytest.raises(ValueError):
        LayerwiseOptimizer(_groups(_make_model()), GaLoreAdamW, refresh_grad="last")
    with pytest.raises(ValueError):
        LayerwiseOptimizer(_groups(_make_model()), GaLoreAdamW, max_grad_norm=0.0)


def test_layerwise_runs_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
        vocab_size=256, max_position_embeddings=64,
    )  # fmt: skip
    with FakeTensorMode():
        model = LlamaForCausalLM(config)
        opt = LayerwiseOptimizer(
            galore_param_groups(model, rank=16, update_proj_gap=1), GaLoreAdamW8bit, max_grad_norm=1.0, lr=1e-3
        )
        tokens = torch.randint(0, 256, (2, 16))
        for _ in range(2):
            for index in range(2):
                opt.set_micro_batch(index, 2)
                (model(input_ids=tokens, labels=tokens).loss / 2).backward()
            opt.step()
        state = opt.state[model.model.layers[0].mlp.up_proj.weight]
        assert state["step"] == 2 and state["projector"]["num_refreshes"] == 2
        assert state["moment_shape"] == [256, 16]
