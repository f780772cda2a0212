"""Benchmark cut cross-entropy (arXiv 2411.09009) against cross-entropy on materialised logits.

Sections (each measured side by side in one process run):

- ``cpu``: chunked PyTorch path (fp32, mean: the fused forward-backward) vs eager
  ``F.cross_entropy(hidden @ weight.T, labels)``, forward + backward, float32: median CPU-time ratio and
  tracked extra memory (beyond inputs and gradients).
- ``fake``: Gemma-2-2B loss shapes (N=8192, V=256000, D=2304, bf16, softcap 30) under
  ``FakeTensorMode``: tracked extra memory of the loss beyond hidden, weight and their gradients,
  plus the kernels' internal workspace (``workspace_bytes``), which dispatch-mode trackers cannot see.
- ``cuda`` (skipped without a GPU): correctness of the Triton path against an fp32 reference, then time
  and peak memory (``torch.cuda.max_memory_allocated`` beyond inputs and gradients) for torch eager,
  memft (Triton), and the ``cut_cross_entropy`` and ``liger_kernel`` packages when importable.  Sized to
  finish in about two minutes on an H100.

Usage::

    python bench/cut_cross_entropy.py                      # every available section
    python bench/cut_cross_entropy.py --sections cuda      # only the GPU section

Results go to ``bench/results/cut_cross_entropy.md``; a run replaces only the sections it measured.
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memft.kernels.cut_cross_entropy import linear_cross_entropy, torch_chunked, workspace_bytes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "cut_cross_entropy.md"
MiB = 2**20
GiB = 2**30


def make_inputs(n, v, d, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g) / d**0.5).to(device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    return hidden, weight, labels


def eager_loss(hidden, weight, labels, softcap=None):
    """The loss as HF computes it: logits in the input dtype, upcast to fp32, cross-entropy."""
    logits = hidden @ weight.t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits.float(), labels)


def fmt_bytes(n: float) -> str:
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.2f} MiB"
    return f"{n / 1024:.1f} KiB"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- CPU
def cpu_section(threads: int, repeats: int) -> str:
    from memft.memory import MemoryTracker

    torch.set_num_threads(threads)
    sizes = [(1024, 32000, 256), (4096, 8192, 512)]
    rows = []
    for n, v, d in sizes:
        hidden, weight, labels = make_inputs(n, v, d, torch.float32, "cpu")

        def ref():
            hidden.grad = weight.grad = None
            eager_loss(hidden, weight, labels).backward()

        def cce():
            hidden.grad = weight.grad = None
            linear_cross_entropy(hidden, weight, labels, impl="torch").backward()

        times = {"ref": [], "cce": []}
        ref(), cce()
        for _ in range(repeats):
            for name, fn in (("ref", ref), ("cce", cce)):
                start = time.process_time()
                fn()
                times[name].append(time.process_time() - start)
        t_ref, t_cce = statistics.median(times["ref"]), statistics.median(times["cce"])

        h, w = hidden.detach(), weight.detach()
        base = h.nbytes + w.nbytes + labels.nbytes
        grads = h.nbytes + w.nbytes
        hidden.grad = weight.grad = None
        with MemoryTracker() as mt:
            eager_loss(hidden, weight, labels).backward()
        ref_extra = mt.peak_bytes - base - grads
        hidden.grad = weight.grad = None
        with MemoryTracker() as mt:
            torch_chunked.forward_backward(h, w, None, labels, -100, None, True, True, False)
        cce_extra = mt.peak_bytes - base - grads
        logits = n * v * 4
        rows.append([
            f"N={n} V={v} D={d}", f"{t_ref:.3f}", f"{t_cce:.3f}", f"**{t_cce / t_ref:.2f}**",
            fmt_bytes(ref_extra), fmt_bytes(cce_extra), f"{100 * cce_extra / logits:.2f}%",
        ])
        print(f"[cpu] N={n} V={v} D={d}: CPU time eager {t_ref:.3f}s, chunked {t_cce:.3f}s, ratio {t_cce / t_ref:.2f}; "
              f"extra {fmt_bytes(ref_extra)} vs {fmt_bytes(cce_extra)}", flush=True)
    header = ["shape (fp32)", "eager F.cross_entropy CPU s", "chunked CPU s", "CPU-time ratio (target <= 1.0)",
              "eager extra memory", "chunked extra memory", "chunked extra / fp32 logits"]
    return (
        f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{threads} thread(s), forward + backward, median process CPU time (`time.process_time`, robust to "
        f"other load on a shared machine) of {repeats} alternating runs.  Extra memory: "
        "peak tracked by `memft.memory.MemoryTracker` minus inputs and gradients (the chunked path is "
        "tracked through `torch_chunked.forward_backward`, the fused forward-backward that fp32 training "
        "runs, since a tracker does not see inside a custom op).\n\n"
        + table(header, rows)
    )


# -------------------------------------------------------------------------------------------- fake
def fake_section() -> str:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memft.memory import MemoryTracker

    n, v, d, cap = 8192, 256000, 2304, 30.0
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        with FakeTensorMode():
            hidden = torch.empty(n, d, dtype=dtype, requires_grad=True)
            weight = torch.empty(v, d, dtype=dtype, requires_grad=True)
            labels = torch.randint(0, v, (n,))
            base = 2 * (hidden.nbytes + weight.nbytes) + labels.nbytes
            with MemoryTracker() as mt:
                eager_loss(hidden, weight, labels, softcap=cap).backward()
            ref_extra = mt.peak_bytes - base
            hidden.grad = weight.grad = None
            with MemoryTracker() as mt:
                linear_cross_entropy(hidden, weight, labels, softcap=cap, impl="torch").backward()
            cce_extra = mt.peak_bytes - base
        fused = dtype == torch.float32
        work = {impl: max(workspace_bytes(n, v, d, dtype, dtype, impl=impl, device=dev, backward=b, softcap=True,
                                          fused=fused and impl == "torch")
                          for b in (False, True))
                for impl, dev in (("torch", "cpu"), ("triton", "cuda"))}
        rows.append([
            str(dtype).replace("torch.", ""), fmt_bytes(ref_extra), fmt_bytes(cce_extra),
            fmt_bytes(work["triton"]), fmt_bytes(work["torch"]),
        ])
        print(f"[fake] {dtype}: eager {fmt_bytes(ref_extra)}, op tracked {fmt_bytes(cce_extra)}, "
              f"workspace triton {fmt_bytes(work['triton'])}, torch {fmt_bytes(work['torch'])}", flush=True)
    header = ["dtype", "eager (HF-style fp32 upcast) extra", "memft op, tracked extra (target <= 1 MB)",
              "+ Triton kernel workspace", "+ chunked-torch workspace"]
    return (
        f"Gemma-2-2B loss: N={n}, V={v}, D={d}, softcap {cap}, under `FakeTensorMode` (no allocation), "
        "forward + backward.  Extra = tracked peak minus hidden, weight and their gradients.  The op's "
        "kernels also use a workspace that dispatch-mode trackers cannot see (`workspace_bytes`): for "
        "bf16/fp16 it is dominated by the fp32 accumulator of the hidden gradient (4·N·D bytes) and one "
        "fp32 slab of the classifier gradient (Triton) or an fp32 copy of the hidden states (chunked "
        "torch); for fp32 inputs the gradients are their own accumulators, and the chunked path runs its "
        "fused forward-backward, whose block holds the softcapped logits and their softmax over the whole "
        "vocabulary for 128 rows (`torch_chunked.plan_fused_rows`).\n\n"
        + table(header, rows)
    )


# -------------------------------------------------------------------------------------------- CUDA
def _cuda_time(fn: Callable[[], None], repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _cuda_peak_extra(fn: Callable[[], None], grads_bytes: int) -> int:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before - grads_bytes


def _peer_methods(softcap):
    methods = {}
    try:
        from cut_cross_entropy import linear_cross_entropy as cce_package

        methods["cut_cross_entropy (pkg)"] = lambda h, w, y: cce_package(h, w, y, softcap=softcap)
    except ImportError:
        print("[cuda] cut_cross_entropy not importable: skipped", flush=True)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(softcap=softcap)
        methods["liger_kernel FLCE"] = lambda h, w, y: liger(w, h, y)
    except ImportError:
        print("[cuda] liger_kernel not importable: skipped", flush=True)
    return methods


def _cuda_correctness(quick: bool) -> list[list[str]]:
    """Triton vs an fp32/float64 reference on the GPU, relative-norm errors."""
    rows = []
    cases = [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, 30.0), (torch.float16, 10.0)]
    if quick:
        cases = [(torch.float32, None), (torch.bfloat16, 30.0)]
    for dtype, cap in cases:
        n, v, d = 2000, 50257, 768
        hidden, weight, labels = make_inputs(n, v, d, dtype, "cuda", seed=1)
        labels[::7] = -100
        bias = torch.randn(v, device="cuda", dtype=dtype, requires_grad=True)
        loss = linear_cross_entropy(hidden, weight, labels, bias=bias, softcap=cap, impl="triton", filter_eps=None)
        grads = torch.autograd.grad(loss, (hidden, weight, bias))
        h, w, b = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
        logits = h @ w.t() + b
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        ref = F.cross_entropy(logits, labels)
        ref_grads = torch.autograd.grad(ref, (h, w, b))

        def rel(a, r):
            return ((a.double() - r).norm() / r.norm()).item()

        errs = [rel(loss, ref)] + [rel(g, r) for g, r in zip(grads, ref_grads)]
        filtered = linear_cross_entropy(hidden, weight, labels, bias=bias, softcap=cap, impl="triton")
        filtered_grads = torch.autograd.grad(filtered, (hidden, weight, bias))
        errs_filtered = [rel(g, r) for g, r in zip(filtered_grads, ref_grads)]
        rows.append([f"{str(dtype).replace('torch.', '')}, softcap {cap}"] + [f"{e:.1e}" for e in errs]
                    + [f"{max(errs_filtered):.1e}"])
        print(f"[cuda] correctness {dtype} softcap={cap}: {errs} filtered {errs_filtered}", flush=True)
        del hidden, weight, bias, grads, h, w, b, logits, ref_grads, filtered_grads
        torch.cuda.empty_cache()
    return rows


def cuda_section(repeats: int, quick: bool) -> str:
    name = torch.cuda.get_device_name()
    correctness = _cuda_correctness(quick)
    sizes = [
        ("Gemma-2-2B", 8192, 256000, 2304, torch.bfloat16, 30.0),
        ("Llama-3-8B", 8192, 128256, 4096, torch.bfloat16, None),
    ]
    if quick:
        sizes = sizes[:1]
    rows = []
    for label, n, v, d, dtype, cap in sizes:
        hidden, weight, labels = make_inputs(n, v, d, dtype, "cuda")
        grads_bytes = hidden.nbytes + weight.nbytes
        methods = {
            "torch eager (logits materialised)": lambda h, w, y: eager_loss(h, w, y, softcap=cap),
            "memft triton": lambda h, w, y: linear_cross_entropy(h, w, y, softcap=cap, impl="triton"),
        }
        if not quick:
            methods.update(_peer_methods(cap))
        for method, loss_fn in methods.items():
            def step(loss_fn=loss_fn):
                hidden.grad = weight.grad = None
                loss_fn(hidden, weight, labels).backward()

            try:
                ms = _cuda_time(step, repeats)
                extra = _cuda_peak_extra(step, grads_bytes)
            except torch.cuda.OutOfMemoryError:
                rows.append([label, method, "OOM", "OOM"])
                torch.cuda.empty_cache()
                continue
            rows.append([label, method, f"{ms:.1f}", fmt_bytes(extra)])
            print(f"[cuda] {label} {method}: {ms:.1f} ms, extra {fmt_bytes(extra)}", flush=True)
            hidden.grad = weight.grad = None
            torch.cuda.empty_cache()
        del hidden, weight, labels
        torch.cuda.empty_cache()
    header_c = ["case (N=2000, V=50257, D=768, bias, 1/7 ignored)", "loss", "d hidden", "d weight", "d bias",
                "max grad err, filtering on"]
    header_t = ["shape (N=8192 tokens)", "method", "forward + backward ms", "peak extra memory"]
    return (
        f"GPU: {name}, torch {torch.__version__}, triton {_triton_version()}.  Correctness: relative-norm error "
        "against float64 logits (filtering off, then on with the dtype's default threshold).\n\n"
        + table(header_c, correctness)
        + f"\n\nTiming: median of {repeats} CUDA-event-timed runs after a warm-up; peak extra = "
        "`max_memory_allocated` during the step minus memory held before it and the gradients.\n\n"
        + table(header_t, rows)
    )


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


# ------------------------------------------------------------------------------------------ output
def write_results(path: Path, sections: dict[str, str]) -> None:
    """Replace the measured sections in ``path``, keeping the others from earlier runs."""
    titles = {"cpu": "CPU: chunked PyTorch path vs eager cross-entropy",
              "fake": "Gemma-2-2B shapes under FakeTensorMode",
              "cuda": "CUDA: Triton kernels"}
    text = path.read_text() if path.exists() else ""
    if not text:
        text = ("# Cut cross-entropy benchmark (arXiv 2411.09009)\n\n"
                "Reproduce: `python bench/cut_cross_entropy.py [--sections cpu,fake,cuda]`.\n")
        for key in titles:
            text += f"\n<!-- section:{key} -->\n<!-- /section:{key} -->\n"
    stamp = time.strftime("%Y-%m-%d")
    for key, body in sections.items():
        block = f"<!-- section:{key} -->\n## {titles[key]}\n\nMeasured {stamp}.  {body}\n<!-- /section:{key} -->"
        pattern = re.compile(rf"<!-- section:{key} -->.*?<!-- /section:{key} -->", re.S)
        text = pattern.sub(lambda _: block, text) if pattern.search(text) else text + "\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")


def mark_unmeasured(path: Path, key: str, note: str) -> None:
    """Put ``note`` in section ``key`` of ``path`` if no run has filled it yet."""
    text = path.read_text()
    empty = f"<!-- section:{key} -->\n<!-- /section:{key} -->"
    if empty in text:
        path.write_text(text.replace(empty, f"<!-- section:{key} -->\n{note}\n<!-- /section:{key} -->"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="cpu,fake,cuda", help="comma-separated: cpu, fake, cuda")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the cpu section (default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method")
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown file to update")
    parser.add_argument("--quick", action="store_true",
                        help="cuda: two correctness cases, Gemma shape only, no peer packages")
    args = parser.parse_args()
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(wanted) - {"cpu", "fake", "cuda"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from cpu, fake, cuda")
    sections = {}
    if "fake" in wanted:
        sections["fake"] = fake_section()
    if "cpu" in wanted:
        sections["cpu"] = cpu_section(args.threads, args.repeats)
    if "cuda" in wanted:
        if torch.cuda.is_available():
            sections["cuda"] = cuda_section(args.repeats, args.quick)
        else:
            print("[cuda] no CUDA device: section skipped", flush=True)
    write_results(args.out, sections)
    if "cuda" in wanted and "cuda" not in sections:
        mark_unmeasured(args.out, "cuda", "Not measured yet: no CUDA device in the runs so far. Run "
                        "`python bench/cut_cross_entropy.py --sections cuda` on a GPU (about two minutes on "
                        "an H100; install `cut-cross-entropy` and `liger-kernel` to include them).")


if __name__ == "__main__":
    main()
