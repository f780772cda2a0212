"""memft against peer packages, side by side in one process: ratios memft / peer.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/peers.py           # about 2 minutes on one CPU thread
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/peers.py --quick   # tiny shapes, 2 repetitions

Peers come from the ``peers`` extra (``pip install -e .[peers]``) plus bitsandbytes; one that does not import
is reported as missing, one that imports but cannot run here as unavailable, each with the reason.
Every timing is the median of repetitions taken round-robin over all implementations of a path.

1. galore: GaLoreAdamW (fp32) and GaLoreAdamW8bit steps without and with a subspace refresh (exact SVD),
   memft vs ``galore_torch``.
2. adamw8bit: one 8-bit AdamW step on a plain weight, memft GaLoreAdamW8bit vs ``bitsandbytes.optim.AdamW8bit``.
3. cce: fp32 linear cross-entropy forward + backward, time and extra memory, memft (chunked PyTorch path) vs
   ``cut_cross_entropy`` (``impl="torch_compile"``; its Triton ``impl="cce"`` where it runs),
   ``torch.nn.functional.linear_cross_entropy`` (reference and chunked) and eager ``F.cross_entropy``.
4. mezo: a MeZO step against two inference forwards (time) and against one inference forward (peak).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import importlib.metadata
import importlib.util
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

BENCH = Path(__file__).resolve().parent
sys.path[:] = [str(BENCH.parent)] + [p for p in sys.path if Path(p or ".").resolve() != BENCH]  # bench/ shadows peers

from memft.kernels.cut_cross_entropy import linear_cross_entropy  # noqa: E402
from memft.optimizers.galore import GaLoreAdamW, GaLoreAdamW8bit, galore_param_groups  # noqa: E402

RESULTS = BENCH / "results" / "peers.md"
HEADER = ["section", "path", "memft", "peer", "peer value", "memft / peer"]


def load_bench(name: str):
    """A sibling bench script as a module (named ``bench_<name>``: bench/cut_cross_entropy.py shadows the peer)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def try_import(module: str):
    """(module, None) or (None, why it is missing)."""
    try:
        return importlib.import_module(module), None
    except Exception as error:  # a peer that fails to import for any reason is missing
        return None, f"missing ({type(error).__name__}: {str(error).splitlines()[0][:120]})"


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def unavailable(error: Exception) -> str:
    return f"unavailable ({type(error).__name__}: {str(error).splitlines()[0][:120]})"


def round_robin(timers: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median seconds per timer, repetitions interleaved so that load drift hits every timer alike."""
    samples = {key: [] for key in timers}
    for _ in range(repeats):
        for key, timed in timers.items():
            samples[key].append(timed())
    return {key: statistics.median(values) for key, values in samples.items()}


def wall(fn: Callable[[], object]) -> Callable[[], float]:
    def timed() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return timed


def ms(seconds: float) -> str:
    return f"{1e3 * seconds:.2f} ms"


# ---------------------------------------------------------------- 1. GaLore vs galore_torch
def projections(hidden: int, inner: int) -> nn.Module:
    """Three Llama projection weights (square, up, down) with fixed random gradients."""
    torch.manual_seed(0)
    model = nn.ModuleDict({
        "q_proj": nn.Linear(hidden, hidden, bias=False), "up_proj": nn.Linear(hidden, inner, bias=False),
        "down_proj": nn.Linear(inner, hidden, bias=False),
    })  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=gen) * 1e-2
    return model


def galore_section(args: argparse.Namespace) -> tuple[list[list[str]], str]:
    hidden, inner, rank = (64, 172, 16) if args.quick else (512, 1376, 128)
    peer, missing = try_import("galore_torch")
    timers, notes = {}, {}
    for bits, ours_cls, peer_name in (("fp32", GaLoreAdamW, "GaLoreAdamW"), ("8-bit", GaLoreAdamW8bit, "GaLoreAdamW8bit")):
        for path, gap in (("step", 10**9), ("refresh", 1)):
            ours_model, peer_model = projections(hidden, inner), projections(hidden, inner)
            ours = ours_cls(galore_param_groups(ours_model, rank=rank, update_proj_gap=gap, scale=0.25), lr=1e-5)
            ours.step()  # the first step refreshes; later ones refresh only with gap 1
            timers[(bits, path, "memft")] = wall(ours.step)
            if peer is None:
                notes[(bits, path)] = missing
                continue
            group = {"params": list(peer_model.parameters()), "rank": rank, "update_proj_gap": gap, "scale": 0.25,
                     "proj_type": "std"}  # fmt: skip
            try:
                theirs = getattr(peer, peer_name)([group], lr=1e-5, weight_decay=0.0)
                theirs.step()
            except Exception as error:  # a peer that cannot run on this machine is reported, not fatal
                notes[(bits, path)] = unavailable(error)
                continue
            timers[(bits, path, "peer")] = wall(theirs.step)
    medians = round_robin(timers, args.repeats)
    rows = []
    for bits, peer_name in (("fp32", "GaLoreAdamW"), ("8-bit", "GaLoreAdamW8bit")):
        for path in ("step", "refresh"):
            ours = medians[(bits, path, "memft")]
            label = f"{bits} {path}"
            if (bits, path) in notes:
                rows.append(["galore", label, ms(ours), f"galore_torch.{peer_name}", notes[(bits, path)], "-"])
            else:
                theirs = medians[(bits, path, "peer")]
                rows.append(["galore", label, ms(ours), f"galore_torch.{peer_name}", ms(theirs), f"{ours / theirs:.2f}"])
    shapes = f"{hidden}x{hidden}, {inner}x{hidden}, {hidden}x{inner}"
    note = (f"GaLore: three fp32 weights ({shapes}), rank {rank}, std projection, scale 0.25, exact SVD, fixed "
            "gradients; 'step' = a step without refresh (update_proj_gap 10^9, after the first step), "
            "'refresh' = update_proj_gap 1 (every step recomputes the three SVDs). galore_torch's 8-bit step calls "
            "torch.cuda.synchronize(), so it needs CUDA.")  # fmt: skip
    return rows, note


# ---------------------------------------------------------------- 2. 8-bit AdamW vs bitsandbytes
def adamw8bit_section(args: argparse.Namespace) -> tuple[list[list[str]], str]:
    shapes = [(512, 256)] if args.quick else [(4096, 1024), (4096, 256)]
    note = (f"8-bit AdamW: one step after the first on a plain fp32 weight ({', '.join(f'{m}x{n}' for m, n in shapes)}), "
            "fixed gradient, `bench/optimizer8bit.py`'s timers (lr 1e-3, no weight decay).")  # fmt: skip
    _, missing = try_import("bitsandbytes")
    if missing:
        return [["adamw8bit", f"{m}x{n} step", "-", "bitsandbytes AdamW8bit", missing, "-"] for m, n in shapes], note
    bench = load_bench("optimizer8bit")
    timers = {(kind, shape): bench.step_timer(kind, shape) for shape in shapes for kind in ("memft", "bitsandbytes")}
    medians = round_robin(timers, args.repeats)
    rows = []
    for shape in shapes:
        ours, theirs = medians[("memft", shape)], medians[("bitsandbytes", shape)]
        rows.append(["adamw8bit", f"{shape[0]}x{shape[1]} step", ms(ours), "bitsandbytes AdamW8bit", ms(theirs),
                     f"{ours / theirs:.2f}"])  # fmt: skip
    return rows, note


# ---------------------------------------------------------------- 4. MeZO vs inference
def mezo_section(args: argparse.Namespace) -> tuple[list[list[str]], str]:
    bench = load_bench("mezo")
    preset = "quick" if args.quick else "cpu"
    hidden, layers, vocab, batch, sequence, _ = bench.PRESETS[preset]
    cpu = torch.device("cpu")
    memory = bench.memory_row(preset, torch.float32, cpu)
    timing = bench.time_row(preset, torch.float32, cpu, args.repeats, sequence)
    rows = [
        ["mezo", "step time", f"{timing['step_ms']:.1f} ms", "2 x inference forward", f"{2 * timing['forward_ms']:.1f} ms",
         f"{timing['ratio']:.2f}"],
        ["mezo", "step peak", f"{memory['mezo']:.2f} MiB", "inference forward peak", f"{memory['inference']:.2f} MiB",
         f"{memory['mezo'] / memory['inference']:.2f}"],
    ]  # fmt: skip
    note = (f"MeZO: `bench/mezo.py`'s '{preset}' Llama (hidden {hidden}, {layers} layers, vocab {vocab}), fp32, batch "
            f"{batch}x{sequence}; peak = tracked tensor storage (MemoryTracker), time = wall medians of interleaved "
            "repetitions.")  # fmt: skip
    return rows, note


# ---------------------------------------------------------------- 3. cut cross-entropy
def extra_bytes(run: Callable[[], object]) -> int:
    """Peak CPU bytes allocated during ``run`` above those held before it.

    Read from the profiler's allocator records, which also see buffers of torch.compile'd code (tensor-level
    trackers such as MemoryTracker do not, and break Dynamo)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    records, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == torch._C._profiler._EventType.Allocation and event.extra_fields.device.type == "cpu":
            records.append((event.start_time_ns, event.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(records):
        live += size
        peak = max(peak, live)
    return peak


def cce_section(args: argparse.Namespace) -> tuple[list[list[str]], str]:
    bench = load_bench("cut_cross_entropy")
    n, v, d = (256, 2048, 64) if args.quick else (2048, 32000, 256)
    hidden, weight, labels = bench.make_inputs(n, v, d, torch.float32, "cpu")
    grads = hidden.nbytes + weight.nbytes

    def backward(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            hidden.grad = weight.grad = None
            loss_fn().backward()

        return run

    impls = {
        "memft": backward(lambda: linear_cross_entropy(hidden, weight, labels, impl="torch")),
        "eager F.cross_entropy": backward(lambda: bench.eager_loss(hidden, weight, labels)),
    }
    notes = {}
    peer, missing = try_import("cut_cross_entropy")
    if peer is None:
        notes["cut_cross_entropy torch_compile"] = notes["cut_cross_entropy cce (Triton)"] = missing
    else:
        impls["cut_cross_entropy torch_compile"] = backward(
            lambda: peer.linear_cross_entropy(hidden, weight, labels, impl="torch_compile")
        )
        impls["cut_cross_entropy cce (Triton)"] = backward(lambda: peer.linear_cross_entropy(hidden, weight, labels))
    if hasattr(F, "linear_cross_entropy"):
        impls["torch F.linear_cross_entropy"] = backward(lambda: F.linear_cross_entropy(hidden, weight, labels))
        options = getattr(nn, "LinearCrossEntropyOptions", None)
        if options is not None:
            impls["torch F.linear_cross_entropy chunked"] = backward(
                lambda: F.linear_cross_entropy(hidden, weight, labels, options=options())
            )
    else:
        notes["torch F.linear_cross_entropy"] = f"missing (not in torch {torch.__version__})"
    for name in list(impls):  # warm-up (and compile); drop what cannot run here
        try:
            impls[name]()
        except Exception as error:  # a peer that cannot run on this machine is reported, not fatal
            notes[name] = unavailable(error)
            del impls[name]
    medians = round_robin({name: wall(run) for name, run in impls.items()}, args.repeats)
    extra = {}
    for name, run in impls.items():
        hidden.grad = weight.grad = None
        extra[name] = extra_bytes(run) - grads
    rows = []
    ours_t, ours_m = medians["memft"], extra["memft"]
    for name in [*impls, *notes]:
        if name == "memft":
            continue
        if name in notes:
            rows.append(["cce", "time", ms(ours_t), name, notes[name], "-"])
            continue
        rows.append(["cce", "time", ms(ours_t), name, ms(medians[name]), f"{ours_t / medians[name]:.2f}"])
        rows.append(["cce", "extra memory", bench.fmt_bytes(ours_m), name, bench.fmt_bytes(extra[name]),
                     f"{ours_m / extra[name]:.3f}" if extra[name] > 0 else "-"])  # fmt: skip
    note = (f"Cut cross-entropy: fp32 forward + backward (mean loss), N={n} tokens, V={v}, D={d} (logits "
            f"{bench.fmt_bytes(n * v * 4)}); memft = `linear_cross_entropy(impl='torch')`. Extra memory = peak CPU "
            "bytes allocated during one forward + backward (torch profiler allocation records, which include "
            "torch.compile'd buffers) minus the gradients of hidden and weight. cut_cross_entropy's default "
            "impl='cce' is a Triton kernel: it needs a GPU driver.")
    return rows, note


SECTIONS = {"galore": galore_section, "adamw8bit": adamw8bit_section, "cce": cce_section, "mezo": mezo_section}


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 repetitions")
    parser.add_argument("--repeats", type=int, help="repetitions per implementation (default 7, quick 2)")
    parser.add_argument("--sections", nargs="+", choices=sorted(SECTIONS), default=list(SECTIONS),
                        help="sections to run (default: all, in the order galore adamw8bit cce mezo)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"markdown file (default {RESULTS})")
    args = parser.parse_args()
    args.repeats = args.repeats or (2 if args.quick else 7)
    torch.set_num_threads(1)
    started = time.perf_counter()
    rows, notes = [], []
    for name in [name for name in SECTIONS if name in args.sections]:
        section_rows, note = SECTIONS[name](args)
        print(markdown_table(HEADER, section_rows), flush=True)
        rows += section_rows
        notes.append(note)
    elapsed = time.perf_counter() - started
    command = "OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/peers.py" + (" --quick" if args.quick else "")
    if args.sections != list(SECTIONS):
        command += " --sections " + " ".join(args.sections)
    if os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] not in ("", "."):
        command = f"PYTHONPATH={os.environ['PYTHONPATH']} " + command.replace("PYTHONPATH=. ", "")
    versions = ", ".join(
        f"{dist} {version(dist)}"
        for dist in ("torch", "transformers", "bitsandbytes", "galore-torch", "cut-cross-entropy")
    )
    text = "\n\n".join([
        "# memft vs peer packages",
        f"`{command}` ({time.strftime('%Y-%m-%d', time.gmtime())}, {elapsed:.0f} s): {platform.machine()} "
        f"{platform.processor() or 'CPU'}, {os.cpu_count()} cores, 1 torch thread, Python {platform.python_version()}; "
        f"{versions}. Medians of {args.repeats} round-robin repetitions; memft / peer < 1 means memft is faster "
        "or smaller. CPU timings come from a shared machine: compare ratios, not absolute times.",
        markdown_table(HEADER, rows),
        *notes,
    ]) + "\n"  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
