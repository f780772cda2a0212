"""MeZO (arXiv 2305.17333) on a tiny Llama: peak memory against inference, step time against two forwards.

Measured side by side in one process, same model, batch and sequence:

- peak tensor storage (``memft.memory.MemoryTracker``) of one ``MeZO.step`` against one forward pass under
  ``torch.no_grad`` (inference), their difference (the step's scratch) against the parameters' bytes and the
  optimizer's scratch budget, and, for context, one backprop step with plain SGD; on CUDA also the allocator's
  ``max_memory_allocated`` for each. Rows at the preset's batch, at one sequence of 32 tokens (activations too
  small to hide the scratch), and for a bf16 model of 84.5 MiB whose tied embedding (62.5 MiB) exceeds the
  64 MiB budget once its z is drawn;
- wall time of ``MeZO.step`` against twice the inference forward time (medians over interleaved repeats).

Run: ``python bench/mezo.py`` (CPU, writes ``bench/results/mezo.md``), ``--quick`` for a smoke run,
``--device cuda --output PATH`` for a larger model on a GPU (``--preset cuda-large``: 0.87B parameters).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from memft.memory import MemoryTracker
from memft.optimizers.mezo import MeZO

MIB = 1 << 20
RESULTS = Path(__file__).parent / "results" / "mezo.md"
# name: (hidden, layers, vocab, batch, sequence, tied embeddings)
PRESETS = {
    "quick": (128, 2, 4096, 4, 128, False),
    "cpu": (256, 4, 4096, 8, 128, False),
    "cuda": (1024, 8, 32000, 8, 512, False),
    "cuda-large": (2048, 16, 32000, 8, 1024, False),
    "scratch": (1024, 1, 32000, 1, 32, True),
}
SHORT = (1, 32)  # batch × sequence at which the scratch is not hidden under activations


def build(
    preset: str, dtype: torch.dtype, device: torch.device, sequence: int | None = None, batch: int | None = None
) -> tuple[LlamaForCausalLM, torch.Tensor]:
    """The preset's model and a (batch, sequence) tensor of random tokens (arguments override the preset's)."""
    hidden, layers, vocab, preset_batch, preset_sequence, tied = PRESETS[preset]
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=round(hidden * 8 / 3),
        vocab_size=vocab,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    tokens = torch.randint(0, vocab, (batch or preset_batch, sequence or preset_sequence), device=device)
    return model, tokens


def peaks(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, run: Callable[[], object]
) -> tuple[int, int]:
    """(tracked peak bytes, CUDA allocator peak bytes or 0) of one call of ``run``."""
    cuda = next(model.parameters()).device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with MemoryTracker(model=model, optimizer=optimizer) as tracker:
        run()
    allocated = torch.cuda.max_memory_allocated() if cuda else 0
    return tracker.peak_bytes, allocated


def memory_row(
    preset: str, dtype: torch.dtype, device: torch.device, shape: tuple[int, int] | None = None
) -> dict[str, float]:
    """Peaks (MiB) of inference, a MeZO step and a backprop SGD step; the step's scratch against the parameters'
    bytes and MeZO's budget. ``shape`` (batch, sequence) overrides the preset's."""
    batch_size, sequence = shape or (None, None)
    model, batch = build(preset, dtype, device, sequence, batch_size)

    def loss() -> torch.Tensor:
        return model(batch, labels=batch).loss

    with torch.no_grad():
        inference = peaks(model, None, loss)
    mezo = MeZO(model.parameters(), lr=1e-6, eps=1e-3)
    mezo_peak = peaks(model, mezo, lambda: mezo.step(loss))
    sgd = torch.optim.SGD(model.parameters(), lr=1e-6)

    def backprop_step() -> None:
        loss().backward()
        sgd.step()
        sgd.zero_grad(set_to_none=True)

    backprop = peaks(model, sgd, backprop_step)
    return {
        "param_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / MIB,
        "budget": mezo.scratch() / MIB,
        "tokens": batch.numel(),
        "inference": inference[0] / MIB,
        "mezo": mezo_peak[0] / MIB,
        "backprop": backprop[0] / MIB,
        "inference_alloc": inference[1] / MIB,
        "mezo_alloc": mezo_peak[1] / MIB,
        "backprop_alloc": backprop[1] / MIB,
    }


def time_row(
    preset: str, dtype: torch.dtype, device: torch.device, repeats: int, sequence: int
) -> dict[str, float]:
    """Medians of wall time (and, on CPU, process CPU time, which other processes' load does not inflate)."""
    model, batch = build(preset, dtype, device, sequence)

    def loss() -> torch.Tensor:
        return model(batch, labels=batch).loss

    def timed(run: Callable[[], object]) -> tuple[float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu

    optimizer = MeZO(model.parameters(), lr=1e-6, eps=1e-3)
    forward_times, step_times = [], []
    with torch.no_grad():
        loss()
    optimizer.step(loss)
    for _ in range(repeats):  # interleaved so that load changes on a shared machine hit both alike
        with torch.no_grad():
            forward_times.append(timed(loss))
        step_times.append(timed(lambda: optimizer.step(loss)))
    forward_wall, forward_cpu = (statistics.median(column) for column in zip(*forward_times))
    step_wall, step_cpu = (statistics.median(column) for column in zip(*step_times))
    return {
        "tokens": batch.numel(),
        "forward_ms": forward_wall * 1e3,
        "step_ms": step_wall * 1e3,
        "ratio": step_wall / (2 * forward_wall),
        "cpu_ratio": step_cpu / (2 * forward_cpu),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller model and batch, fewer repeats")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="model size (default: cpu, or cuda on a GPU)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu); cuda uses a larger model")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: stable timings)")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"markdown file (default {RESULTS})")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    preset = args.preset or ("quick" if args.quick else ("cuda" if device.type == "cuda" else "cpu"))
    hidden, layers, vocab, batch, sequence, _ = PRESETS[preset]
    scratch_hidden, scratch_layers, scratch_vocab, *_ = PRESETS["scratch"]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    command = "python bench/mezo.py" + (" --quick" if args.quick else "") + (
        f" --device {args.device}" if device.type != "cpu" else ""
    ) + (f" --preset {args.preset}" if args.preset else "")
    cuda = device.type == "cuda"

    lines = [
        f"# MeZO: memory and time ({where})",
        "",
        f"Llama from config: hidden {hidden}, {layers} layers, vocab {vocab}, untied embeddings; batch "
        f"{batch}×{sequence} tokens. Command: `{command}`.",
        "",
        "## Peak tensor storage (MemoryTracker" + (", and CUDA max_memory_allocated" if cuda else "") + ")",
        "",
        "Scratch: the MeZO step's peak minus the inference peak; MeZO keeps it within its budget (1 % of the "
        "parameters' bytes, at least 64 MiB). The last row is a model of "
        f"hidden {scratch_hidden}, {scratch_layers} layer, vocab {scratch_vocab} with tied embeddings.",
        "",
        "| model | dtype | tokens | params (MiB) | inference peak (MiB) | MeZO step peak (MiB) | MeZO / inference "
        "| scratch (MiB) | scratch / params | MeZO budget (MiB) | backprop SGD step peak (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [(preset, dtype, shape) for dtype in (torch.float32, torch.bfloat16) for shape in (None, SHORT)]
    for name, dtype, shape in rows + [("scratch", torch.bfloat16, None)]:
        row = memory_row(name, dtype, device, shape)
        dtype_name = str(dtype).removeprefix("torch.")
        sources = [("", row["inference"], row["mezo"], row["backprop"])]
        if cuda:
            sources.append((" (allocator)", row["inference_alloc"], row["mezo_alloc"], row["backprop_alloc"]))
        for label, inference, mezo, backprop in sources:
            scratch = mezo - inference
            lines.append(
                f"| {name} | {dtype_name}{label} | {row['tokens']} | {row['param_mib']:.2f} | {inference:.2f} "
                f"| {mezo:.2f} | {mezo / inference:.3f} | {scratch:.2f} | {scratch / row['param_mib']:.4f} "
                f"| {row['budget']:.2f} | {backprop:.2f} |"
            )
            print(lines[-1], flush=True)
    timing_dtype = torch.bfloat16 if cuda else torch.float32
    lines += [
        "",
        f"## Step time ({str(timing_dtype).removeprefix('torch.')}, medians of interleaved repeats)",
        "",
        "| tokens per step | forward (ms) | MeZO step (ms) | step / (2 × forward), wall (target ≤ 1.3) "
        + ("|" if cuda else "| same, process CPU time |"),
        "|---|---|---|---|" + ("" if cuda else "---|"),
    ]
    lengths = [sequence] if cuda or args.quick else [sequence // 2, sequence, 2 * sequence]
    for length in lengths:
        timing = time_row(preset, timing_dtype, device, 3 if args.quick else 7, length)
        lines.append(
            f"| {timing['tokens']} | {timing['forward_ms']:.1f} | {timing['step_ms']:.1f} | {timing['ratio']:.3f} |"
            + ("" if cuda else f" {timing['cpu_ratio']:.3f} |")
        )
        print(lines[-1], flush=True)
    lines += [
        "",
        "A step is two forward passes plus drawing z three times per parameter (once per pass, once for the",
        "update; the reference draws it four times) and the update: a fixed cost per parameter, so the ratio falls",
        "as tokens per step grow.",
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
