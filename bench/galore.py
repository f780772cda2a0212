"""GaLore benchmark: optimizer-state bytes, step time, randomized vs exact SVD, tiny-Llama losses.

Writes bench/results/galore.md. All ratios are measured side by side in this one process.

    PYTHONPATH=. .venv/bin/python bench/galore.py                # ~15 minutes on a loaded CPU, 1 thread
    PYTHONPATH=. .venv/bin/python bench/galore.py --quick        # smaller SVD matrix and fewer steps
    PYTHONPATH=. .venv/bin/python bench/galore.py --sections 5   # rerun section 5 only, keep the others' figures

1. State bytes: every tensor in ``optimizer.state`` (recursively, projector bases included) after one
   step of a tiny Llama, against the analytic count; GaLore / AdamW ratio.
2. Step time: optimizer step amortised over T = update_proj_gap = 200 steps (one SVD refresh) for
   GaLoreAdamW vs torch AdamW, plus one forward/backward, giving the training-step ratio (paper: ~1.17).
3. Refresh cost: exact vs randomized SVD (rank 128, oversampling 8, 2 power iterations) on a
   4096 x 11008 fp32 matrix U diag(s) Vᵀ with s_i = 1/i; time ratio and captured energy ‖PᵀG‖²/‖G‖².
4. Tiny-Llama 40-step eval loss, AdamW vs GaLore vs Natural GaLore, three seeds.
5. Llama-2-7B peak memory estimated on fake tensors (``memft memory``): torch AdamW vs 8-bit GaLore
   rank 1024 with layer-wise updates, clipping on and off, by category (paper: 7B within 22 GiB).
"""

from __future__ import annotations

import argparse
import math
import platform
import re
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from memft.optimizers import _blockwise8bit as q8
from memft.optimizers.galore import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, galore_param_groups
from memft.optimizers.natural_galore import NaturalGaLoreAdamW
from memft.optimizers.projector import LowRankProjector

RESULTS = Path(__file__).parent / "results" / "galore.md"


def llama(hidden: int, layers: int, intermediate: int, vocab: int, heads: int = 8, kv_heads: int = 4) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=intermediate, vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def tensor_bytes(value: object) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(tensor_bytes(state) for state in optimizer.state.values())


# ---------------------------------------------------------------- 1. state bytes
def analytic_state_bytes(model: nn.Module, galore_ids: set[int], rank: int, kind: str, history: int = 20) -> int:
    """Closed-form optimizer-state bytes (fp32 model, std projection)."""
    total = 0
    for param in model.parameters():
        numel = param.numel()
        if id(param) in galore_ids:
            m, n = param.shape
            r = min(rank, m, n)
            low = m * r if m >= n else r * n
            basis = r * n if m >= n else m * r
            total += 4 * basis
            moment_shape = (m, r) if m >= n else (r, n)
        else:
            low, moment_shape = numel, tuple(param.shape)
        if kind == "adamw":
            total += 2 * 4 * low
        elif kind == "adamw8bit":
            blocks = math.ceil(low / q8.BLOCK_SIZE)
            total += 2 * 4 * low if low < q8.MIN_8BIT_NUMEL else 2 * (blocks * q8.BLOCK_SIZE + 4 * blocks)
        elif kind == "natural":
            total += 2 * 4 * low + (4 * history * low if id(param) in galore_ids else 0)
        elif kind == "adafactor":
            total += 4 * (sum(moment_shape) if len(moment_shape) == 2 else low)
    return total


def bench_state_bytes(rank: int) -> tuple[list[list[str]], int]:
    model = llama(hidden=256, layers=4, intermediate=688, vocab=2048)
    tokens = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(0))
    model(input_ids=tokens, labels=tokens).loss.backward()
    groups = galore_param_groups(model, rank=rank)
    galore_ids = {id(p) for p in groups[0]["params"]}
    rows = []
    adamw = torch.optim.AdamW(model.parameters(), lr=0.0)
    adamw.step()
    baseline = state_bytes(adamw) - sum(tensor_bytes(s.get("step")) for s in adamw.state.values())
    analytic_adamw = sum(2 * 4 * p.numel() for p in model.parameters())
    rows.append(["torch AdamW", baseline, analytic_adamw])
    for label, cls, kind, kwargs in [
        (f"GaLoreAdamW r={rank}", GaLoreAdamW, "adamw", {}),
        (f"GaLoreAdamW8bit r={rank}", GaLoreAdamW8bit, "adamw8bit", {}),
        (f"GaLoreAdafactor r={rank}", GaLoreAdafactor, "adafactor", {}),
        (f"NaturalGaLoreAdamW r={rank}, s=20", NaturalGaLoreAdamW, "natural", {}),
    ]:
        opt = cls(galore_param_groups(model, rank=rank), lr=0.0, **kwargs) if cls is not GaLoreAdafactor else cls(
            galore_param_groups(model, rank=rank), lr=1e-9, relative_step=False
        )
        opt.step()
        rows.append([label, state_bytes(opt), analytic_state_bytes(model, galore_ids, rank, kind)])
    table = []
    for label, measured, analytic in rows:
        table.append([
            label, f"{measured / 2**20:.3f}", f"{analytic / 2**20:.3f}", f"{100 * (measured - analytic) / analytic:+.3f}%",
            f"{measured / baseline:.3f}", f"{analytic / analytic_adamw:.3f}",
        ])  # fmt: skip
    return table, sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- 2. step time
def bench_step_time(steps: int, rank: int, rounds: int = 10) -> tuple[list[list[str]], dict[str, float]]:
    """Optimizers and forward/backward are timed round-robin in ``rounds`` chunks, so load drift on a
    shared machine hits all of them alike. Gradients stay fixed (one real backward)."""
    model = llama(hidden=512, layers=2, intermediate=1376, vocab=4096)
    params = sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, 4096, (2, 256), generator=torch.Generator().manual_seed(0))
    model(input_ids=tokens, labels=tokens).loss.backward()
    grads = {p: p.grad.clone() for p in model.parameters()}
    makers = {
        "torch AdamW": lambda: torch.optim.AdamW(model.parameters(), lr=1e-5),
        "memft GaLoreAdamW, no rank (plain AdamW)": lambda: GaLoreAdamW(model.parameters(), lr=1e-5),
        f"memft GaLoreAdamW r={rank}, T={steps}, exact SVD": lambda: GaLoreAdamW(
            galore_param_groups(model, rank=rank, update_proj_gap=steps), lr=1e-5
        ),
        f"memft GaLoreAdamW r={rank}, T={steps}, randomized SVD": lambda: GaLoreAdamW(
            galore_param_groups(model, rank=rank, update_proj_gap=steps, svd="randomized"), lr=1e-5
        ),
    }
    optimizers = {name: make() for name, make in makers.items()}
    spent = dict.fromkeys(optimizers, 0.0)
    forward_backward = []
    chunk = steps // rounds
    for _ in range(rounds):
        model.zero_grad()
        start = time.perf_counter()
        model(input_ids=tokens, labels=tokens).loss.backward()
        forward_backward.append(time.perf_counter() - start)
        for param in model.parameters():
            param.grad = grads[param]
        for name, opt in optimizers.items():
            start = time.perf_counter()
            for _ in range(chunk):
                opt.step()
            spent[name] += time.perf_counter() - start
    fb = statistics.median(forward_backward)
    timings = {name: total / (chunk * rounds) for name, total in spent.items()}
    base = timings["torch AdamW"]
    table = [
        [name, f"{1000 * t:.1f}", f"{t / base:.2f}", f"{1000 * (fb + t):.0f}", f"{(fb + t) / (fb + base):.3f}"]
        for name, t in timings.items()
    ]
    return table, {"params": params, "forward_backward": fb, "rounds": rounds}


# ---------------------------------------------------------------- 3. refresh SVD
def orthonormal_columns(rows: int, cols: int, gen: torch.Generator) -> Tensor:
    """Randomly signed, randomly ordered columns of the orthonormal DCT-II basis (cheap to build, exact)."""
    i = torch.arange(rows, dtype=torch.float64).unsqueeze(1)
    j = torch.randperm(rows, generator=gen)[:cols].to(torch.float64).unsqueeze(0)
    basis = torch.cos(math.pi * (i + 0.5) * j / rows) * math.sqrt(2.0 / rows)
    basis[:, j.squeeze(0) == 0] /= math.sqrt(2.0)
    signs = torch.randint(0, 2, (cols,), generator=gen).to(torch.float64) * 2 - 1
    return (basis * signs).float()


def bench_svd(m: int, n: int, rank: int, repeats: int) -> list[list[str]]:
    gen = torch.Generator().manual_seed(0)
    k = min(m, n)
    u, v = orthonormal_columns(m, k, gen), orthonormal_columns(n, k, gen)
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -1.0
    grad = (u * s) @ v.T
    total_energy = grad.square().sum()
    rows, results = [], {}
    for method, runs in (("exact", 1), ("randomized", repeats)):
        times = []
        for _ in range(runs):
            projector = LowRankProjector(rank=rank, svd=method)
            start = time.perf_counter()
            projector.refresh(grad)
            times.append(time.perf_counter() - start)
        basis = projector.left if projector.left is not None else projector.right.T
        energy = (projector.project(grad).square().sum() / total_energy).item()
        results[method] = (statistics.median(times), energy, basis)
    optimal = (s[:rank].square().sum() / s.square().sum()).item()
    overlap = ((results["exact"][2].T @ results["randomized"][2]).square().sum() / rank).item()
    for method, (seconds, energy, _) in results.items():
        rows.append([
            method, f"{seconds:.2f}", f"{results['exact'][0] / seconds:.1f}x", f"{energy:.5f}",
            f"{100 * (energy - results['exact'][1]) / results['exact'][1]:+.3f}%",
        ])  # fmt: skip
    rows.append(["(optimal: Σ_{i≤r} s_i² / Σ s_i²)", "", "", f"{optimal:.5f}", ""])
    rows.append([f"subspace overlap ‖P_exactᵀ P_rand‖²_F / r = {overlap:.4f}", "", "", "", ""])
    return rows


# ---------------------------------------------------------------- 4. tiny-Llama losses
def tiny_llama_losses(seeds: int, max_stride: int) -> list[list[str]]:
    """Sequences ``start + stride * i (mod 64)``, stride uniform in 1..max_stride (1: the test's pattern)."""

    def pattern(batch: int, seed: int) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        start = torch.randint(0, 64, (batch, 1), generator=gen)
        stride = torch.randint(1, max_stride + 1, (batch, 1), generator=gen)
        return (start + stride * torch.arange(24)) % 64 + 16

    def train(make, seed: int) -> float:
        torch.manual_seed(seed)
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=256, max_position_embeddings=64, tie_word_embeddings=False,
        ))  # fmt: skip
        opt = make(model)
        for step in range(40):
            tokens = pattern(16, step)
            opt.zero_grad()
            model(input_ids=tokens, labels=tokens).loss.backward()
            opt.step()
        with torch.no_grad():
            tokens = pattern(64, 10_000)
            return model(input_ids=tokens, labels=tokens).loss.item()

    def galore(cls):
        return lambda m: cls(galore_param_groups(m, rank=16, update_proj_gap=10, scale=0.25, lr=2e-2), lr=5e-3)

    makers = {
        "AdamW lr 5e-3": lambda m: torch.optim.AdamW(m.parameters(), lr=5e-3),
        "GaLoreAdamW r=16": galore(GaLoreAdamW),
        "NaturalGaLoreAdamW r=16": galore(NaturalGaLoreAdamW),
    }
    rows = []
    for seed in range(seeds):
        losses = {name: train(make, seed) for name, make in makers.items()}
        base, gal = losses["AdamW lr 5e-3"], losses["GaLoreAdamW r=16"]
        rows.append([f"1..{max_stride}", str(seed)] + [f"{v:.4f}" for v in losses.values()] + [f"{gal / base:.3f}", f"{losses['NaturalGaLoreAdamW r=16'] / gal:.3f}"])
    return rows


# ---------------------------------------------------------------- 5. Llama-2-7B memory estimate
LLAMA_7B = [
    "model.dtype=bfloat16", "data.max_seq_len=256", "train.batch_size=1", "train.grad_accum=1",
    "model.gradient_checkpointing=false",
]  # fmt: skip
MEMORY_RUNS = {
    "torch AdamW (bf16 moments), clipping on": ["optimizer={name: adamw}"],
    "GaLoreAdamW8bit r=1024, layer-wise, clipping on (max_grad_norm 1.0)": [
        "optimizer.name=galore_adamw8bit", "optimizer.rank=1024", "optimizer.layerwise=true",
    ],
    "GaLoreAdamW8bit r=1024, layer-wise, clipping off": [
        "optimizer.name=galore_adamw8bit", "optimizer.rank=1024", "optimizer.layerwise=true", "train.max_grad_norm=null",
    ],
    "GaLoreAdamW8bit r=1024, layer-wise, clipping on, exact-SVD refresh in step 2 (update_proj_gap 1)": [
        "optimizer.name=galore_adamw8bit", "optimizer.rank=1024", "optimizer.layerwise=true", "optimizer.update_proj_gap=1",
    ],
}  # fmt: skip
MEMORY_BAR_GIB = 22.0


def held_gradient_gib(rank: int) -> tuple[float, float]:
    """Bytes (GiB) of bf16 gradients layer-wise clipping holds for Llama-2-7B: std-projected low-rank, and plain."""
    from memft.memory import load_config

    config = load_config("llama-2-7b")
    hidden, inner, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = hidden // config["num_attention_heads"] * config.get("num_key_value_heads", config["num_attention_heads"])
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inner, hidden), (inner, hidden), (hidden, inner)]
    low_rank = layers * sum(min(rank, m, n) * max(m, n) for m, n in shapes)
    plain = 2 * config["vocab_size"] * hidden + (2 * layers + 1) * hidden  # embedding, LM head, RMSNorm weights
    return 2 * low_rank / 2**30, 2 * plain / 2**30


def bench_llama_7b_memory() -> list[list[str]]:
    """Estimated peak (fake tensors, two training steps, the recipe's own builders) and its breakdown."""
    from memft.memory.report import CATEGORIES
    from memft.recipe_files import RECIPES_DIR
    from memft.train.memory_estimate import recipe_memory
    from memft.train.recipe import load_recipe

    recipe_path = RECIPES_DIR / "galore.yaml"
    rows = []
    for label, overrides in MEMORY_RUNS.items():
        started = time.perf_counter()
        report = recipe_memory(load_recipe(recipe_path, LLAMA_7B + overrides), config="llama-2-7b", device="cuda")
        peak = report.peak_bytes / 2**30
        parts = [f"{report.breakdown[c] / 2**30:.2f}" for c in CATEGORIES]
        verdict = "yes" if peak <= MEMORY_BAR_GIB else "no"
        rows.append([label, f"{peak:.2f}", *parts, verdict, f"{time.perf_counter() - started:.0f}"])
        print(rows[-1], flush=True)
    return rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def section_state_bytes(args: argparse.Namespace) -> str:
    header = ["optimizer", "measured MiB", "analytic MiB", "measured - analytic", "measured / AdamW", "analytic / AdamW"]
    table, params = bench_state_bytes(rank=64)
    print(markdown_table(header, table), flush=True)
    return (
        "## 1. Optimizer-state bytes\n\nTiny Llama (hidden 256, 4 layers, intermediate 688, vocab 2048, fp32, "
        f"{params / 1e6:.2f}M params); GaLore on q/k/v/o/gate/up/down with rank 64, std projection; embeddings, norms and LM head plain. "
        "Measured = bytes of every tensor in `optimizer.state` after one step (AdamW's `step` tensors excluded; "
        "GaLore's steps are Python ints); analytic = closed form.\n\n" + markdown_table(header, table)
    )


def section_step_time(args: argparse.Namespace) -> str:
    steps = 50 if args.quick else 200
    table, info = bench_step_time(steps, rank=128)
    header = ["optimizer", "opt step ms (amortised)", "opt / torch AdamW", "fwd+bwd+opt ms", "train step / AdamW"]
    print(markdown_table(header, table), flush=True)
    return (
        f"## 2. Step time (CPU, {args.threads} threads)\n\nLlama with the paper's 60M layer shapes (hidden 512, "
        f"intermediate 1376, rank 128) but 2 layers and vocab 4096: {info['params'] / 1e6:.1f}M params, token batch "
        f"2x256. Optimizer step averaged over {steps} steps = one `update_proj_gap` (one SVD refresh at step 0) with "
        f"fixed gradients; forward+backward {1000 * info['forward_backward']:.0f} ms (median of {info['rounds']}). "
        f"All timed round-robin in {info['rounds']} chunks. Training step = forward+backward + optimizer step. "
        "Paper: ~17% throughput overhead. GaLore adds two r-rank matmuls per weight (project, project back), "
        "~4r/(6·tokens) of that weight's forward+backward FLOPs, plus the amortised SVD.\n\n"
        + markdown_table(header, table)
    )


def section_svd(args: argparse.Namespace) -> str:
    svd_shape = (1024, 2752) if args.quick else (4096, 11008)
    table = bench_svd(*svd_shape, rank=128, repeats=2)
    header = ["SVD", "seconds", "speed-up vs exact", "captured energy ‖PᵀG‖²/‖G‖²", "vs exact"]
    print(markdown_table(header, table), flush=True)
    return (
        f"## 3. Subspace refresh: exact vs randomized SVD\n\n{svd_shape[0]}x{svd_shape[1]} fp32, G = U diag(s) Vᵀ "
        "with s_i = 1/i (U, V: randomly signed DCT columns), rank 128, P = top-128 left singular vectors (std "
        "projection of a wide matrix). Randomized: oversampling 8, 2 power iterations, median of 2 runs.\n\n"
        + markdown_table(header, table)
    )


def section_losses(args: argparse.Namespace) -> str:
    seeds = 1 if args.quick else 3
    table = tiny_llama_losses(seeds, max_stride=1) + tiny_llama_losses(seeds, max_stride=3)
    header = ["stride", "seed", "AdamW lr 5e-3", "GaLoreAdamW r=16", "NaturalGaLoreAdamW r=16", "GaLore / AdamW", "Natural / GaLore"]
    print(markdown_table(header, table), flush=True)
    return (
        "## 4. Tiny Llama, 40 steps\n\nhidden 64, 2 layers, vocab 256; sequences start + stride·i (mod 64) from "
        "random starts: stride 1 is the test's pattern (loss floor 0), strides 1..3 must also be inferred from the "
        "context (floor ≈ ln(3)/23 ≈ 0.05 plus the unlearned part); eval loss on 64 fresh sequences (start: ln 256 = 5.55). GaLore groups: lr 2e-2 x scale 0.25 "
        "(effective 5e-3, same as everything else), update_proj_gap 10; Natural GaLore: same plus history 20, "
        "λ = 1e-3.\n\n" + markdown_table(header, table)
    )


def section_llama_7b_memory(args: argparse.Namespace) -> str:
    table = bench_llama_7b_memory()
    low_rank, plain = held_gradient_gib(rank=1024)
    header = ["Llama-2-7B, bf16 weights, batch 1 x 256 tokens", "peak GiB", "parameters", "gradients", "optimizer state",
              "activations", "temporaries", "other", f"≤ {MEMORY_BAR_GIB} GiB", "estimate s"]  # fmt: skip
    print(markdown_table(header, table), flush=True)
    return (
        "## 5. Llama-2-7B memory (estimated)\n\n`memft memory galore --config llama-2-7b` with `model.dtype=bfloat16 "
        "data.max_seq_len=256 train.batch_size=1 train.grad_accum=1`, no gradient checkpointing, CUDA target: the "
        "recipe's builders and two training steps on fake tensors, every tensor allocation counted (GiB = 2^30 bytes; "
        "categories at the peak). Paper (arXiv 2403.03507): 8-bit GaLore with layer-wise updates trains 7B within "
        "22 GiB. Layer-wise clipping is global over the consumed gradients, so it holds the rank-1024 projected "
        f"gradients (bf16, {low_rank:.2f} GiB) and the plain ones (embedding, LM head, norms: {plain:.2f} GiB) until "
        "the norm is known; "
        "its peak is at the start of `step()`, after the activations are freed. These held buffers are not `.grad`, "
        "so they count as temporaries. Without clipping the peak is at the start of backward (all activations, the "
        "LM-head gradient, one 8-bit chunk). The last row refreshes every subspace in the second step too, with "
        "the full state in place: the worst step of a run (one in `update_proj_gap`; LAPACK/cuSOLVER workspace is "
        "not a tensor and not counted). AdamW's temporaries are the full-size buffers of torch's foreach step "
        "(`foreach=True`, as on CUDA). The optimizer step's "
        "temporaries are bounded by `chunk_numel` (2^22 elements: about 100 MiB for 8-bit moments) and by one "
        "low-rank direction; the project-back is an in-place `addmm_`. Before this bound (commit 17648f0, "
        "whole-tensor fp32 dequantisation, full-size project-back, fp32 clipping buffers) the same estimates "
        "were 30.24 GiB with clipping and 25.40 GiB without.\n\n" + markdown_table(header, table)
    )


SECTIONS = {1: section_state_bytes, 2: section_step_time, 3: section_svd, 4: section_losses, 5: section_llama_7b_memory}


def _existing_sections() -> tuple[str, dict[int, str]]:
    """The results file's header (title and run line) and its sections by number; empty when absent."""
    if not RESULTS.is_file():
        return "", {}
    chunks = re.split(r"\n(?=## \d+\. )", RESULTS.read_text().rstrip("\n") + "\n")
    sections = {int(re.match(r"## (\d+)\.", c).group(1)): c.rstrip("\n") for c in chunks[1:]}
    return chunks[0].rstrip("\n"), sections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1024x2752 SVD matrix, 50 steps, 1 seed")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable timings on a shared CPU)")
    parser.add_argument("--sections", type=int, nargs="+", choices=sorted(SECTIONS), default=sorted(SECTIONS),
                        help="sections to run; the others keep their figures from the existing results file")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    header, sections = _existing_sections()
    for number in args.sections:
        sections[number] = SECTIONS[number](args)
    elapsed = time.perf_counter() - started

    command = "PYTHONPATH=. .venv/bin/python bench/galore.py" + (" --quick" if args.quick else "")
    if args.threads != 1:
        command += f" --threads {args.threads}"
    partial = sorted(args.sections) != sorted(SECTIONS)
    if partial:
        command += " --sections " + " ".join(str(n) for n in sorted(args.sections))
        numbers = ", ".join(str(n) for n in sorted(args.sections))
        rerun = f"Section(s) {numbers} rerun with `{command}` ({elapsed:.0f} s); the others are from the run above."
        header = "\n\n".join(part for part in header.split("\n\n") if not part.startswith("Section")) + "\n\n" + rerun
    else:
        header = (
            "# GaLore benchmark\n\n"
            f"`{command}` — torch {torch.__version__}, {platform.machine()}, {args.threads} intra-op threads, "
            f"total {elapsed:.0f} s. CPU timings are from a shared machine: compare ratios, not absolute times."
        )
    text = header + "\n\n" + "\n\n".join(sections[n] for n in sorted(sections)) + "\n"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(f"wrote {RESULTS}")

if __name__ == "__main__":
    main()
