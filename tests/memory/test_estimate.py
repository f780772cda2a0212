"""Fake-tensor estimation: equal to real tracked runs, exact counts on a model too large to allocate."""

import pytest
import torch
from torch import nn

from memft.memory import (
    estimate_from_config,
    estimate_training_memory,
    hf_training_setup,
    load_config,
    measure_training_memory,
)

TOKENS = {"batch_size": 2, "seq_len": 32}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_estimate_equals_tracked_run_tiny_llama(dtype):
    setup = hf_training_setup("tiny-llama", dtype, optimizer="adamw", **TOKENS)
    estimated = setup.estimate(device="cpu")
    torch.manual_seed(0)
    measured = setup.measure(device="cpu")
    assert abs(estimated.peak_bytes / measured.peak_bytes - 1) <= 0.02  # the accuracy bar
    assert estimated.peak_bytes == measured.peak_bytes  # same ops, same storages: exact in practice
    assert estimated.breakdown == measured.breakdown
    assert estimated.interval_peak_bytes == measured.interval_peak_bytes
    n_params, n_tensors = measured.meta["parameters"], 3 + 2 * 9  # embed, lm_head, norm + 9 per layer
    width = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    assert measured.end_breakdown["parameters"] == n_params * width
    assert measured.end_breakdown["optimizer_state"] == 2 * n_params * width + 4 * n_tensors  # moments in param dtype


def test_gradient_checkpointing_estimate_matches_and_cuts_activations():
    checkpointed = hf_training_setup("tiny-llama", "float32", gradient_checkpointing=True, **TOKENS)
    estimated = checkpointed.estimate(device="cpu", track_modules=True)
    measured = checkpointed.measure(device="cpu", track_modules=True)
    assert estimated.breakdown == measured.breakdown
    assert estimated.module_activations == measured.module_activations
    plain = hf_training_setup("tiny-llama", "float32", **TOKENS).estimate(device="cpu", track_modules=True)
    layer_acts = lambda r: sum(b for name, b in r.module_activations.items() if ".layers." in name)  # noqa: E731
    assert layer_acts(estimated) < layer_acts(plain) / 4


def _zeroth_order_step(model, batch, optimizer, eps=1e-3, lr=1e-6):
    """SPSA step in the MeZO style (arXiv 2305.17333): two forward passes without autograd, perturbations
    drawn per parameter, never a gradient or optimizer state."""
    params = [p for p in model.parameters() if p.requires_grad]
    seed = 1234
    with torch.no_grad():
        losses = []
        for scale in (1.0, -2.0):
            torch.manual_seed(seed)
            for p in params:
                p.add_(torch.randn_like(p), alpha=scale * eps)
            losses.append(model(**batch).loss)
        projected = (losses[0] - losses[1]) / (2 * eps)
        torch.manual_seed(seed)
        for p in params:
            z = torch.randn_like(p)
            p.add_(z, alpha=eps)
            p.sub_(lr * projected * z)


def test_zeroth_order_train_step():
    setup = hf_training_setup("tiny-llama", "float32", optimizer=None, **TOKENS)
    estimated = setup.estimate(train_step=_zeroth_order_step, device="cpu")
    measured = setup.measure(train_step=_zeroth_order_step, device="cpu")
    assert estimated.breakdown == measured.breakdown
    for category in ("gradients", "optimizer_state", "activations"):
        assert estimated.breakdown[category] == 0
    adamw = hf_training_setup("tiny-llama", "float32", **TOKENS).estimate(device="cpu")
    assert estimated.peak_bytes < adamw.peak_bytes / 2


def _llama_one_layer():
    cfg = load_config("llama-2-7b")
    cfg["num_hidden_layers"] = 1
    h, ffn, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    n_params = 2 * vocab * h + 4 * h * h + 3 * h * ffn + 2 * h + h
    return cfg, n_params, 2 * vocab * h * 2  # largest parameter (embedding / lm_head) bytes in bf16 x2


def test_bf16_adamw_keeps_bf16_states_and_foreach_temporaries():
    """Llama-2-7B width, one layer, bf16: states are bf16; the for-loop step peaks with two temporaries the
    size of the last (largest) parameter, the foreach step (PyTorch's CUDA default) with one full copy."""
    cfg, n_params, two_largest = _llama_one_layer()
    n_tensors = 2 + 9 + 1
    loop = estimate_from_config(cfg, "bfloat16", 1, 8, optimizer_kwargs={"foreach": False}, device="cpu")
    assert loop.meta["parameters"] == n_params
    assert loop.breakdown["parameters"] == 2 * n_params
    assert loop.breakdown["gradients"] == 2 * n_params
    assert loop.breakdown["optimizer_state"] == 4 * n_params + 4 * n_tensors
    # sqrt and division for lm_head, plus the final norm's denominator still bound to the loop variable
    assert loop.breakdown["temporaries"] == two_largest + 2 * cfg["hidden_size"]
    foreach = estimate_from_config(cfg, "bfloat16", 1, 8, device="cuda")  # simulated on CPU for CUDA
    assert foreach.breakdown["temporaries"] == 2 * n_params  # one bf16 sqrt per parameter, all alive
    assert any("foreach=True" in note for note in foreach.notes)


def test_estimation_allocates_nothing_real():
    """A 160 GB fp32 layer: impossible to allocate here, exact on fake tensors."""
    n = 200_000
    x_bytes = 2 * n * 4

    report = estimate_training_memory(
        lambda: nn.Linear(n, n, bias=False),
        lambda: torch.randn(2, n),
        lambda m: torch.optim.AdamW(m.parameters(), foreach=False),
        loss_fn=lambda m, x: m(x).square().mean(),
        device="cpu",
    )
    P = n * n * 4
    assert report.breakdown == {
        "parameters": P,
        "gradients": P,
        "optimizer_state": 2 * P + 4,
        "activations": 0,
        "temporaries": 2 * P,
        "other": x_bytes,
    }


def test_plain_module_estimate_equals_measure():
    torch.manual_seed(0)

    def build():
        return nn.Sequential(nn.Linear(24, 96), nn.GELU(), nn.Linear(96, 24), nn.LayerNorm(24))

    kwargs = dict(
        make_batch=lambda: torch.randn(6, 24),
        build_optimizer=lambda m: torch.optim.Adam(m.parameters(), foreach=False),
        loss_fn=lambda m, x: (m(x) - x).pow(2).mean(),
    )
    estimated = estimate_training_memory(build, device="cpu", **kwargs)
    measured = measure_training_memory(build, device="cpu", **kwargs)
    assert estimated.breakdown == measured.breakdown
    assert estimated.source == "estimated" and measured.source == "tracked"


def test_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        estimate_training_memory(lambda: nn.Linear(2, 2), lambda: torch.randn(1, 2), steps=0)
    with pytest.raises(ValueError, match="loss_fn"):
        estimate_training_memory(
            lambda: nn.Linear(2, 2), lambda: torch.randn(1, 2), loss_fn=lambda m, b: 0, train_step=lambda m, b, o: 0
        )
    with pytest.raises(TypeError, match="build_model"):
        estimate_training_memory("model", lambda: torch.randn(1, 2))
    with pytest.raises(ValueError, match="optimizer"):
        hf_training_setup("tiny-llama", optimizer="lion")
    with pytest.raises(ValueError, match="dtype"):
        hf_training_setup("tiny-llama", dtype="int8")
    with pytest.raises(ValueError, match="seq_len"):
        hf_training_setup("tiny-llama", seq_len=0)
    with pytest.raises(ValueError, match="scalar loss"):
        estimate_training_memory(lambda: nn.Linear(2, 2), lambda: torch.randn(1, 2), device="cpu")
