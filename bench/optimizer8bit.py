"""8-bit optimizer benchmark: memft's GaLoreAdamW8bit against bitsandbytes' AdamW8bit.

Writes bench/results/optimizer8bit.md. Everything is measured side by side in this one process, one thread.

    .venv/bin/python bench/optimizer8bit.py              # under a minute on a loaded CPU
    .venv/bin/python bench/optimizer8bit.py --no-write   # print only (e.g. another checkout on PYTHONPATH)

1. Step time: an 8-bit AdamW step (no subspace refresh: plain parameters) of a dense fp32 4096 x 1024 and a
   4096 x 256 parameter, medians of interleaved repetitions.
2. Per-element step bound: max |ΔW| / lr over six steps on 4096 x 256 gradients with a quarter of the rows
   zero and magnitudes spread over six orders inside each block (per element for a plain weight, per row for
   a GaLore weight, whose low-rank step N = P(ΔW) / (-lr · scale) is reported). Adam's own bound after t steps
   is √(K_t (1 - β2^t)) / (1 - β1^t), K_t = (1 - β1)² / (1 - β2) · Σ_{k<t} (β1² / β2)^k.
3. The embedding of a tiny Llama trained with GaLore on the attention/MLP projections: max |ΔW| / lr of the
   (plain) embedding per step, on random tokens (rows of tokens absent from a batch get no gradient).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch and bitsandbytes start their thread pools

import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import bitsandbytes as bnb
from memft.optimizers.galore import GaLoreAdamW, GaLoreAdamW8bit, galore_param_groups
from memft.optimizers.projector import LowRankProjector

RESULTS = Path(__file__).parent / "results" / "optimizer8bit.md"
BETAS = (0.9, 0.999)
LR = 1e-3
REPEATS = 25
BOUND_STEPS = 6


# ---------------------------------------------------------------- 1. step time
def step_timer(kind: str, shape: tuple[int, int]):
    """A parameter with a fixed gradient and an optimizer that has taken its first step; returns one timed step."""
    gen = torch.Generator().manual_seed(0)
    param = nn.Parameter(torch.randn(shape, generator=gen))
    param.grad = torch.randn(shape, generator=gen) * 1e-2
    if kind == "memft":
        opt = GaLoreAdamW8bit([param], lr=LR, betas=BETAS)
    else:
        opt = bnb.optim.AdamW8bit([param], lr=LR, betas=BETAS, weight_decay=0.0)
    opt.step()

    def timed() -> float:
        start = time.perf_counter()
        opt.step()
        return time.perf_counter() - start

    return timed


def step_times() -> list[str]:
    shapes = [(4096, 1024), (4096, 256)]
    timers = {(kind, shape): step_timer(kind, shape) for shape in shapes for kind in ("memft", "bitsandbytes")}
    samples: dict[tuple, list[float]] = {key: [] for key in timers}
    for _ in range(REPEATS):  # round-robin, so load changes hit every configuration alike
        for key, timed in timers.items():
            samples[key].append(timed())
    rows = ["| parameter | memft GaLoreAdamW8bit ms | bitsandbytes AdamW8bit ms | memft / bitsandbytes |", "|---|---|---|---|"]
    for shape in shapes:
        ours, theirs = (statistics.median(samples[(kind, shape)]) * 1e3 for kind in ("memft", "bitsandbytes"))
        rows.append(f"| {shape[0]} x {shape[1]} fp32, plain | {ours:.2f} | {theirs:.2f} | {ours / theirs:.2f} |")
    return rows


# ---------------------------------------------------------------- 2. per-element step bound
def adam_step_bound(t: int) -> float:
    beta1, beta2 = BETAS
    moment_bound = (1 - beta1) ** 2 / (1 - beta2) * sum((beta1**2 / beta2) ** k for k in range(t))
    return math.sqrt(moment_bound * (1 - beta2**t)) / (1 - beta1**t)


def spread_gradients(shape: tuple[int, int], seed: int, per: str) -> list[torch.Tensor]:
    """A quarter of the rows zero, random signs, magnitudes 1e-2 · 10^(-6u), u uniform per element or per row."""
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(BOUND_STEPS):
        u = torch.rand(shape[0], 1 if per == "row" else shape[1], generator=gen)
        grad = torch.randn(shape, generator=gen).sign() * 1e-2 * 10 ** (-6 * u)
        grad[torch.rand(shape[0], generator=gen) < 0.25] = 0
        grads.append(grad)
    return grads


def step_ratios(make, per: str, low_rank: bool, scale: float = 0.25) -> list[float]:
    """max |step| / lr per step; for a GaLore weight the low-rank step recovered through the projector."""
    param = nn.Parameter(torch.zeros(4096, 256))
    groups = [{"params": [param], "rank": 8, "update_proj_gap": 1000, "scale": scale}] if low_rank else [param]
    opt = make(groups)
    ratios = []
    for grad in spread_gradients(tuple(param.shape), 0, per):
        before = param.detach().clone()
        param.grad = grad
        opt.step()
        step = param.detach() - before
        if low_rank:
            step = LowRankProjector.from_state_dict(opt.state[param]["projector"]).project(step) / scale
        ratios.append((step.abs().max() / LR).item())
    return ratios


def bounds() -> list[str]:
    cases = [
        ("memft GaLoreAdamW8bit", "plain, per-element spread", lambda g: GaLoreAdamW8bit(g, lr=LR, betas=BETAS), "element", False),
        ("memft GaLoreAdamW8bit", "GaLore r=8, per-row spread", lambda g: GaLoreAdamW8bit(g, lr=LR, betas=BETAS), "row", True),
        ("bitsandbytes AdamW8bit", "plain, per-element spread",
         lambda g: bnb.optim.AdamW8bit(g, lr=LR, betas=BETAS, weight_decay=0.0), "element", False),
        ("bitsandbytes AdamW8bit", "plain, per-row spread",
         lambda g: bnb.optim.AdamW8bit(g, lr=LR, betas=BETAS, weight_decay=0.0), "row", False),
        ("memft GaLoreAdamW (fp32 moments)", "plain, per-element spread", lambda g: GaLoreAdamW(g, lr=LR, betas=BETAS), "element", False),
        ("memft GaLoreAdamW (fp32 moments)", "GaLore r=8, per-row spread", lambda g: GaLoreAdamW(g, lr=LR, betas=BETAS), "row", True),
    ]  # fmt: skip
    steps = " | ".join(f"t={t}" for t in range(1, BOUND_STEPS + 1))
    rows = [f"| optimizer | 4096 x 256 weight | max over steps | {steps} |", "|---" * (BOUND_STEPS + 3) + "|"]
    for name, weight, make, per, low_rank in cases:
        ratios = step_ratios(make, per, low_rank)
        rows.append(f"| {name} | {weight} | **{max(ratios):.3f}** | " + " | ".join(f"{r:.3f}" for r in ratios) + " |")
    rows.append("| Adam's bound | | | " + " | ".join(f"{adam_step_bound(t):.4f}" for t in range(1, BOUND_STEPS + 1)) + " |")
    return rows


# ---------------------------------------------------------------- 3. tiny-Llama embedding
def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=172, vocab_size=2048, max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def embedding_ratios(kind: str, steps: int = 3) -> list[float]:
    model = tiny_llama()
    if kind == "memft":
        opt = GaLoreAdamW8bit(galore_param_groups(model, rank=16, update_proj_gap=200), lr=LR, betas=BETAS)
    else:
        opt = bnb.optim.AdamW8bit(model.parameters(), lr=LR, betas=BETAS, weight_decay=0.0)
    embedding = model.model.embed_tokens.weight
    gen = torch.Generator().manual_seed(1)
    ratios = []
    for _ in range(steps):
        tokens = torch.randint(0, 2048, (4, 64), generator=gen)
        before = embedding.detach().clone()
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad()
        ratios.append(((embedding.detach() - before).abs().max() / LR).item())
    return ratios


def embedding_rows() -> list[str]:
    rows = ["| optimizer | max over steps | t=1 | t=2 | t=3 |", "|---|---|---|---|---|"]
    for kind, name in (("memft", "memft GaLoreAdamW8bit (embedding plain, projections GaLore r=16)"),
                       ("bitsandbytes", "bitsandbytes AdamW8bit")):
        ratios = embedding_ratios(kind)
        rows.append(f"| {name} | **{max(ratios):.3f}** | " + " | ".join(f"{r:.3f}" for r in ratios) + " |")
    return rows


def main() -> None:
    started = time.perf_counter()
    sections = [
        "## 1. Step time (no subspace refresh)",
        "",
        f"One AdamW step after the first (lr {LR}, betas {BETAS}), fixed fp32 gradient; median of {REPEATS} "
        "repetitions taken round-robin over the four configurations. memft runs bitsandbytes' blockwise "
        "quantise/dequantise kernels on real tensors, with its own Adam arithmetic and chunking around them.",
        "",
        *step_times(),
        "",
        "## 2. Per-element step bound, |ΔW| / lr",
        "",
        f"Six steps on 4096 x 256 gradients, a quarter of the rows zero, magnitudes 1e-2 · 10^(-6u) (u uniform per "
        "element, or per row so that a GaLore weight's projected gradient G Q keeps the spread). For the GaLore "
        "weight the element-wise Adam step is the low-rank N = P(ΔW) / (-lr · scale).",
        "",
        *bounds(),
        "",
        "## 3. Tiny-Llama embedding, |ΔW| / lr",
        "",
        "Llama, hidden 64, 2 layers, vocab 2048, fp32; 4 x 64 random tokens per step, so most embedding rows get a "
        "gradient on one step and none on the next; blocks of 256 span four rows.",
        "",
        *embedding_rows(),
    ]
    header = [
        "# 8-bit optimizers: memft GaLoreAdamW8bit vs bitsandbytes AdamW8bit",
        "",
        f"`.venv/bin/python bench/optimizer8bit.py` — torch {torch.__version__}, bitsandbytes {bnb.__version__}, "
        f"{platform.machine()}, {torch.get_num_threads()} intra-op thread(s) (OMP_NUM_THREADS="
        f"{os.environ['OMP_NUM_THREADS']}), total {time.perf_counter() - started:.0f} s. CPU timings are from a "
        "shared machine: compare ratios, not absolute times.",
        "",
    ]
    text = "\n".join(header + sections) + "\n"
    if "--no-write" not in sys.argv:
        RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
