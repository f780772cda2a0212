"""GPU truth suite: memft's kernels and memory figures measured on one GPU, in one command.

    python bench/gpu_suite.py                          # every section (sized for under 8 minutes on one H100)
    python bench/gpu_suite.py --sections cce,planner   # some sections; the others' figures are kept
    python bench/gpu_suite.py --dry-run                # every section on the CPU at tiny shapes, into a temp dir

Sections:

- cce: cut cross-entropy at Llama-3 (D 4096, V 128256) and Gemma-2 (D 2304, V 256000, softcap 30) loss shapes,
  8192 tokens, bf16: memft's Triton kernels against PyTorch's `F.linear_cross_entropy` (reference and chunked
  paths, where this torch has it), Liger's fused linear cross-entropy, the `cut-cross-entropy` package and eager
  `F.cross_entropy` on materialised logits. Relative errors of the loss and both gradients against an fp32
  reference, forward+backward time (median of CUDA-event-timed runs after a warm-up), peak memory beyond the
  inputs and gradients (`max_memory_allocated`), and memft / best peer.
- planner: a 1.1B Llama (TinyLlama-1.1B architecture, random weights), one row per method: the planner's
  estimate (`memft memory`, fake tensors) against `max_memory_allocated` / `max_memory_reserved` of the same two
  steps run for real (`memft memory --measure`).
- card24: Llama-3-8B, bf16, 2048 tokens, the CARD24 composition under an RTX 4090's usable memory
  (`torch.cuda.set_per_process_memory_fraction`): five training-loop steps, their peaks against the planner,
  tokens/s beside LoRA on the same model.
- speed: tokens/s of each planner method on the 1.1B Llama against bf16 AdamW at the same batch, and the time of
  a GaLore step that refreshes its subspaces against an ordinary one.

Writes bench/results/gpu.md and gpu.json (or --out DIR): every figure, with the device, driver, versions and date.
Peers come from `pip install 'memft[peers]'`; one that is not installed is reported as missing. Nothing is
installed at run time. Each section records its own failure and the suite goes on.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Run as a script, bench/ is first on the path, and its cut_cross_entropy.py would shadow the peer package.
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [str(_BENCH.parent)] + [p for p in sys.path if Path(p or os.curdir).resolve() != _BENCH]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from memft.errors import RecipeError  # noqa: E402
from memft.kernels.cut_cross_entropy import linear_cross_entropy  # noqa: E402
from memft.memory import MemoryTracker, hf_training_setup  # noqa: E402
from memft.memory.gpus import get_gpu  # noqa: E402
from memft.train import builders  # noqa: E402
from memft.train.distributed import Engine  # noqa: E402
from memft.train.memory_estimate import recipe_memory  # noqa: E402
from memft.train.recipe import Recipe, validate_recipe  # noqa: E402
from memft.train.step import StepDriver  # noqa: E402

ROOT = _BENCH.parent
RESULTS = _BENCH / "results"
MIB, GIB = 2**20, 2**30
PEERS = ("liger-kernel", "cut-cross-entropy")
TOLERANCE = 0.05  # planner goal: estimate within +-5% of max_memory_allocated

LLAMA_1B = {  # TinyLlama-1.1B's architecture
    "model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
    "num_attention_heads": 32, "num_key_value_heads": 4, "hidden_act": "silu", "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "vocab_size": 32000, "tie_word_embeddings": False,
}  # fmt: skip

# GaLore's subspace refresh: "exact" runs a cuSOLVER SVD of every projected matrix at each refresh, "randomized"
# a few matmuls per matrix; randomized keeps the refreshes of the 1.1B and 8B models inside the time budget.
GALORE_SVD = "randomized"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CUT_CE = {"loss": {"name": "cut_cross_entropy"}}
CHECKPOINTING = {"model": {"gradient_checkpointing": True}}

# The best full-parameter composition the planner knows for a 24 GB card (recipes/llama3-8b-24gb.yaml,
# bench/moonshot.py): 8-bit GaLore layer-wise at rank 64 with the LM head a GaLore target at rank 256, randomized
# refreshes, gradient checkpointing, cut cross-entropy, clipping.
CARD24 = {
    **CHECKPOINTING, **CUT_CE,
    "optimizer": {"name": "galore_adamw8bit", "rank": 64, "layerwise": True, "svd": GALORE_SVD,
                  "target_modules": [*PROJECTIONS, "lm_head"], "module_ranks": {"lm_head": 256}},
    "train": {"max_grad_norm": 1.0},
}  # fmt: skip
CARD24_LORA = {**CHECKPOINTING, **CUT_CE, "adapter": {"name": "lora"}}
CARD24_GPU = "RTX 4090 24GB"
CARD24_STEPS = 5

GALORE_ROW = "GaLore 8-bit layer-wise"
METHODS = {
    "AdamW (bf16)": {},
    "8-bit AdamW": {"optimizer": {"name": "adamw8bit"}},
    GALORE_ROW: {"optimizer": {"name": "galore_adamw8bit", "layerwise": True, "svd": GALORE_SVD}},
    "MeZO": {"optimizer": {"name": "mezo"}},
    "LoRA": {"adapter": {"name": "lora"}},
    "cut cross-entropy": CUT_CE,
    "Mesa": {"activations": {"name": "mesa"}},
    "gradient checkpointing": CHECKPOINTING,
    "composition (CARD24)": CARD24,
}


@dataclass(frozen=True)
class Scale:
    """Device, shapes and repeats of a run: the GPU run, or the CPU dry run at tiny shapes."""

    device: str
    cce_impl: str
    cce_shapes: tuple[tuple[str, int, int, int, float | None], ...]  # label, tokens, vocab, dim, softcap
    repeats: int
    model: str | dict
    batch: int
    seq: int
    card_model: str
    card_seq: int
    card_memory_fraction: bool
    speed_steps: int


GPU = Scale("cuda", "triton", (("Llama-3", 8192, 128256, 4096, None), ("Gemma-2", 8192, 256000, 2304, 30.0)),
            repeats=10, model=LLAMA_1B, batch=4, seq=1024, card_model="llama-3-8b", card_seq=2048,
            card_memory_fraction=True, speed_steps=8)
DRY = Scale("cpu", "torch", (("Llama-3 (tiny)", 64, 512, 32, None), ("Gemma-2 (tiny)", 64, 1024, 32, 30.0)),
            repeats=10, model="tiny-llama", batch=2, seq=32, card_model="tiny-llama", card_seq=64,
            card_memory_fraction=False, speed_steps=4)


# ------------------------------------------------------------------------------------------- helpers
def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MIB:,.1f}"


def failure(exc: BaseException) -> str:
    return f"failed: {type(exc).__name__}: {str(exc).strip()[:300]}"


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def fresh(device: str) -> tuple[int, int]:
    """Free what earlier work left; return the bytes still allocated and reserved (0, 0 on the CPU)."""
    gc.collect()
    if device != "cuda":
        return 0, 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated(), torch.cuda.memory_reserved()


def time_calls(fn: Callable[[], object], repeats: int, device: str) -> list[float]:
    """Seconds of each of `repeats` calls of `fn`: CUDA events on a GPU, the wall clock on the CPU."""
    times = []
    for _ in range(repeats):
        check_deadline()
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


@contextmanager
def peak_memory(device: str, base: tuple[int, int] | None = None) -> Iterator[dict]:
    """Peak memory of the block, in the yielded dict once it ends. On a GPU: the allocator's `allocated` and
    `reserved` peaks minus `base` (bytes allocated and reserved before; default: at entry). On the CPU (dry run):
    memft's MemoryTracker peak of the tensors the block touches, and no reserved figure."""
    out: dict = {}
    if device == "cuda":
        torch.cuda.synchronize()
        allocated, reserved = base or (torch.cuda.memory_allocated(), torch.cuda.memory_reserved())
        torch.cuda.reset_peak_memory_stats()
        yield out
        torch.cuda.synchronize()
        out.update(allocated=torch.cuda.max_memory_allocated() - allocated,
                   reserved=torch.cuda.max_memory_reserved() - reserved)
    else:
        with MemoryTracker() as tracker:
            yield out
        out.update(allocated=tracker.peak_bytes, reserved=None)


class SectionTimeout(BaseException):
    """A section ran past --timeout-per-section (a BaseException: the per-row `except Exception` lets it through)."""


DEADLINE: float | None = None  # perf_counter() at which the running section must stop


def check_deadline() -> None:
    """Stop the section once --timeout-per-section has passed; called between rows and timed calls, so that
    no kernel, allocation or import is interrupted halfway."""
    if DEADLINE is not None and time.perf_counter() > DEADLINE:
        raise SectionTimeout("ran past --timeout-per-section")


def recipe_for(*changes: dict, batch: int, seq: int) -> Recipe:
    """A bf16 recipe of `batch` full-length sequences of `seq` tokens per step, with `changes` merged by section."""
    data: dict = {"model": {"dtype": "bfloat16"}, "data": {"max_seq_len": seq},
                  "train": {"batch_size": batch, "grad_accum": 1}}
    for change in changes:
        for section, values in change.items():
            data[section] = {**data.get(section, {}), **values}
    return validate_recipe(data)


@dataclass
class RealRun:
    """A recipe's model, optimizer and micro-batches on a device; `step()` is the training loop's step."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    driver: StepDriver
    micro: list[dict]
    tokens: int

    def step(self) -> None:
        self.driver.step(self.model, self.optimizer, self.micro, num_items=self.tokens)


def real_run(recipe: Recipe, config: str | dict, device: str) -> RealRun:
    """What `memft memory --measure` runs (memft.train.memory_estimate.recipe_memory), without its tracker: the
    model built from `config` with random weights, the recipe's methods and optimizer, full-length random batches,
    and the training loop's StepDriver."""
    builders.check_compatibility(recipe, against_model=False)
    t = recipe.train
    setup = hf_training_setup(config, recipe.model.dtype, t.batch_size, recipe.data.max_seq_len, None,
                              recipe.model.gradient_checkpointing,
                              model_transform=lambda model: builders.prepare_model(model, recipe).model,
                              attn_implementation=recipe.model.attn_implementation)
    engine = Engine(recipe)
    accelerator = engine.accelerator(on_cpu=True)  # as the planner: no wrapping, the step's backward and clipping
    with torch.device(device):
        model = setup.build_model()
        model.train()
        plan = builders.build_optimizer(model, recipe)
        micro = []
        for _ in range(t.grad_accum):
            batch = setup.make_batch()
            micro.append({"input_ids": batch["input_ids"], "labels": batch["labels"].clone()})
    driver = StepDriver.for_recipe(recipe, plan.step_kind, engine, accelerator)
    return RealRun(model, plan.optimizer, driver, micro, t.grad_accum * t.batch_size * (recipe.data.max_seq_len - 1))


# ----------------------------------------------------------------------------------------------- cce
def eager_loss(hidden, weight, labels, softcap):
    """The loss as HF computes it: logits in the inputs' dtype, softcapped, upcast to fp32, cross-entropy."""
    logits = hidden @ weight.t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits.float(), labels)


def cce_methods(softcap: float | None, impl: str) -> dict[str, Callable | str]:
    """Loss functions `(hidden, weight, labels) -> loss` by name, or why one cannot run."""
    methods: dict[str, Callable | str] = {
        "memft": lambda h, w, y: linear_cross_entropy(h, w, y, softcap=softcap, impl=impl)}
    torch_names = ("torch F.linear_cross_entropy", "torch F.linear_cross_entropy (chunked)")
    if not hasattr(F, "linear_cross_entropy"):
        methods.update(dict.fromkeys(torch_names, "missing"))
    elif softcap is not None:
        methods.update(dict.fromkeys(torch_names, "unsupported: no softcap"))
    else:
        methods[torch_names[0]] = lambda h, w, y: F.linear_cross_entropy(h, w, y)
        methods[torch_names[1]] = (
            (lambda h, w, y: F.linear_cross_entropy(h, w, y, options=torch.nn.LinearCrossEntropyOptions()))
            if hasattr(torch.nn, "LinearCrossEntropyOptions") else "missing")
    methods["liger-kernel"] = peer("liger-kernel", lambda: liger_loss(softcap))
    methods["cut-cross-entropy"] = peer("cut-cross-entropy", lambda: cce_package_loss(softcap))
    methods["eager F.cross_entropy"] = lambda h, w, y: eager_loss(h, w, y, softcap)
    return methods


def peer(distribution: str, load: Callable[[], Callable]) -> Callable | str:
    """The peer's loss function from `load()`; "missing" when the distribution is not installed, or why it failed."""
    if version(distribution) == "missing":
        return "missing"
    try:
        return load()
    except Exception as exc:  # installed but broken (a triton mismatch, an API change): a row, not the section
        return failure(exc)


def liger_loss(softcap: float | None) -> Callable:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    liger = LigerFusedLinearCrossEntropyLoss(softcap=softcap)
    return lambda h, w, y: liger(w, h, y)


def cce_package_loss(softcap: float | None) -> Callable:
    from cut_cross_entropy import linear_cross_entropy as cce_package

    return lambda h, w, y: cce_package(h, w, y, softcap=softcap)


def rel_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.float() - reference).norm() / reference.norm()).item()


def cce_method(loss_fn: Callable, hidden, weight, labels, reference, s: Scale) -> dict:
    """Errors against `reference` (loss, grad hidden, grad weight), median forward+backward time, peak extra."""

    def step():
        hidden.grad = weight.grad = None
        loss_fn(hidden, weight, labels).backward()

    hidden.grad = weight.grad = None
    loss = loss_fn(hidden, weight, labels)  # also the warm-up: kernels compile here
    loss.backward()
    errors = {"loss": rel_error(loss.detach(), reference[0]), "grad_hidden": rel_error(hidden.grad, reference[1]),
              "grad_weight": rel_error(weight.grad, reference[2])}
    del loss
    hidden.grad = weight.grad = None
    grads = hidden.nbytes + weight.nbytes
    inputs = grads + labels.nbytes if s.device != "cuda" else 0  # the tracker counts the inputs it sees
    with peak_memory(s.device) as peak:
        step()
    seconds = time_calls(step, s.repeats, s.device)
    return {"status": "ok", "errors": errors, "time_ms": 1e3 * statistics.median(seconds),
            "peak_extra_bytes": peak["allocated"] - grads - inputs}


def memft_vs_best_peer(methods: dict) -> dict:
    """memft's time and peak extra memory over the best other method's (the fastest, the leanest)."""
    ran = {k: v for k, v in methods.items() if k != "memft" and v["status"] == "ok"}
    out = {}
    if methods["memft"]["status"] != "ok" or not ran:
        return out
    for key, field in (("time", "time_ms"), ("memory", "peak_extra_bytes")):
        peer = min(ran, key=lambda k: ran[k][field])
        if ran[peer][field] > 0:
            out[key] = {"peer": peer, "ratio": methods["memft"][field] / ran[peer][field]}
    return out


def section_cce(s: Scale, fig: dict) -> str:
    parts = []
    for label, n, v, d, softcap in s.cce_shapes:
        g = torch.Generator(device=s.device).manual_seed(0)
        hidden = torch.randn(n, d, generator=g, device=s.device).to(torch.bfloat16).requires_grad_()
        weight = (torch.randn(v, d, generator=g, device=s.device) / d**0.5).to(torch.bfloat16).requires_grad_()
        labels = torch.randint(0, v, (n,), generator=g, device=s.device)
        h32, w32 = (t.detach().float().requires_grad_() for t in (hidden, weight))
        ref_loss = eager_loss(h32, w32, labels, softcap)
        ref_loss.backward()
        reference = (ref_loss.detach(), h32.grad, w32.grad)
        del h32, w32, ref_loss
        fresh(s.device)
        methods = {}
        for name, loss_fn in cce_methods(softcap, s.cce_impl).items():
            check_deadline()
            if isinstance(loss_fn, str):
                methods[name] = {"status": loss_fn}
                continue
            try:
                methods[name] = cce_method(loss_fn, hidden, weight, labels, reference, s)
            except Exception as exc:  # one method's failure (an OOM, a peer's bug) must not hide the others
                methods[name] = {"status": failure(exc)}
            hidden.grad = weight.grad = None
            fresh(s.device)
        ratios = memft_vs_best_peer(methods)
        fig[label] = {"tokens": n, "vocab": v, "dim": d, "softcap": softcap, "dtype": "bfloat16",
                      "methods": methods, "memft_vs_best_peer": ratios}
        rows = []
        for name, m in methods.items():
            if m["status"] == "ok":
                e = m["errors"]
                rows.append([name, "ok", f"{e['loss']:.1e}", f"{e['grad_hidden']:.1e}", f"{e['grad_weight']:.1e}",
                             f"{m['time_ms']:.2f}", mib(m["peak_extra_bytes"])])
            else:
                rows.append([name, m["status"], "", "", "", "", ""])
        header = [f"{label}: N {n}, V {v}, D {d}, softcap {softcap}, bf16", "status", "loss rel. err",
                  "grad hidden rel. err", "grad weight rel. err", "fwd+bwd ms", "peak extra MiB"]
        summary = "; ".join(f"{key} memft / {r['peer']} = {r['ratio']:.2f}" for key, r in ratios.items())
        summary = summary or "no ratio (memft or every peer did not run)"
        parts.append(table(header, rows) + f"\n\nmemft / best peer: {summary}.")
        del hidden, weight, labels, reference
        fresh(s.device)
    return (f"Errors: relative norm against an fp32 reference on the same bf16 inputs. Time: median of {s.repeats} "
            "forward+backward runs after a warm-up. Peak extra: peak allocated during one forward+backward minus "
            "the inputs and the gradients. memft impl: " + s.cce_impl + ".\n\n" + "\n\n".join(parts))


# ------------------------------------------------------------------------------------------- planner
def planner_row(recipe: Recipe, config: str | dict, device: str) -> dict:
    """The planner's estimate and the same two steps measured, as `memft memory` and `memft memory --measure`.
    A method the planner refuses to estimate is measured all the same, with the planner's reason."""
    try:
        estimate, refused = recipe_memory(recipe, config=config, device=device).peak_bytes, None
    except RecipeError as exc:
        estimate, refused = None, str(exc)
    base_allocated, base_reserved = fresh(device)
    report = recipe_memory(recipe, config=config, device=device, measure=True)
    if report.cuda is not None:
        allocated = report.cuda["run_allocated"] - base_allocated
        reserved = report.cuda["run_reserved"] - base_reserved
    else:  # CPU (dry run): the tracked peak stands in for the allocator's
        allocated, reserved = report.peak_bytes, None
    ratio = None if estimate is None else estimate / allocated
    return {"status": "ok", "estimate_bytes": estimate, "not_estimable": refused, "tracked_bytes": report.peak_bytes,
            "allocated_bytes": allocated, "reserved_bytes": reserved, "ratio": ratio,
            "reserved_gap_bytes": None if reserved is None else reserved - allocated,
            "within_tolerance": None if ratio is None else abs(ratio - 1) <= TOLERANCE}


def section_planner(s: Scale, fig: dict) -> str:
    rows = []
    for label, changes in METHODS.items():
        check_deadline()
        try:
            row = planner_row(recipe_for(changes, batch=s.batch, seq=s.seq), s.model, s.device)
        except Exception as exc:  # one method's failure must not hide the others
            row = {"status": failure(exc)}
        fresh(s.device)
        fig[label] = row
        if row["status"] != "ok":
            rows.append([label, row["status"], "", "", "", "", ""])
            continue
        ratio = ("not estimable" if row["ratio"] is None
                 else f"{row['ratio']:.3f}" + ("" if row["within_tolerance"] else " (out)"))
        rows.append([label, mib(row["estimate_bytes"]), mib(row["tracked_bytes"]), mib(row["allocated_bytes"]), ratio,
                     mib(row["reserved_bytes"]), mib(row["reserved_gap_bytes"])])
        print(" | ".join(rows[-1]), flush=True)
    name = "TinyLlama-1.1B architecture" if isinstance(s.model, dict) else s.model
    header = [f"{name}, bf16, batch {s.batch} x {s.seq}", "estimate MiB", "tracked MiB", "allocated MiB",
              f"estimate / allocated (goal 1 +- {TOLERANCE:g})", "reserved MiB", "reserved - allocated MiB"]
    return ("Two training steps: the planner on fake tensors (`memft memory`) and the same steps for real "
            "(`memft memory --measure`): memft's tracked peak and the allocator's `max_memory_allocated` / "
            "`max_memory_reserved` minus what was allocated before (on the CPU the tracked peak stands in for "
            "allocated). Not estimable: the planner refuses the method (its reason is in gpu.json).\n\n"
            + table(header, rows))


# -------------------------------------------------------------------------------------------- card24
def timed_steps(recipe: Recipe, config: str | dict, s: Scale, steps: int) -> dict:
    """Build the recipe's model, run `steps` training steps, return their times, peaks and tokens/s."""
    base = fresh(s.device)
    run = None
    try:
        run = real_run(recipe, config, s.device)
        with peak_memory(s.device, base) as peak:
            seconds = time_calls(run.step, steps, s.device)
    except torch.cuda.OutOfMemoryError as exc:  # a result under a memory budget, not a failure of the suite
        return {"status": "OOM", "message": str(exc).strip()[:300]}
    finally:
        del run
        fresh(s.device)
    step = statistics.median(seconds[1:])
    return {"status": "ok", "step_seconds": seconds, "allocated_bytes": peak["allocated"],
            "reserved_bytes": peak["reserved"], "step_s": step,
            "tokens_per_s": recipe.train.batch_size * recipe.data.max_seq_len / step}


def section_card24(s: Scale, fig: dict) -> str:
    recipe = recipe_for(CARD24, batch=1, seq=s.card_seq)
    estimate = recipe_memory(recipe, config=s.card_model, device=s.device)
    fig["estimate"] = {"peak_bytes": estimate.peak_bytes, "step_peak_bytes": estimate.interval_peak_bytes}
    gpu = get_gpu(CARD24_GPU)
    fig["budget"] = {"gpu": gpu.name, "usable_bytes": gpu.usable_bytes() if s.card_memory_fraction else None}
    if s.card_memory_fraction:
        fresh(s.device)
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(gpu.usable_bytes() / total)
    try:
        fig["composition"] = timed_steps(recipe, s.card_model, s, CARD24_STEPS)
        fig["lora"] = timed_steps(recipe_for(CARD24_LORA, batch=1, seq=s.card_seq), s.card_model, s, CARD24_STEPS)
    finally:
        if s.card_memory_fraction:
            torch.cuda.set_per_process_memory_fraction(1.0)
    rows = []
    for label, key in (("composition (CARD24)", "composition"), ("LoRA, checkpointing, cut CE", "lora")):
        r = fig[key]
        if r["status"] != "ok":
            rows.append([label, r["status"], "", "", "", "", ""])
            continue
        est = estimate.peak_bytes if key == "composition" else None
        ratio = "-" if est is None else f"{est / r['allocated_bytes']:.3f}"
        rows.append([label, mib(est), mib(r["allocated_bytes"]), ratio, mib(r["reserved_bytes"]),
                     f"{r['step_seconds'][0]:.2f}", f"{r['tokens_per_s']:,.0f}"])
    budget = (f"under `set_per_process_memory_fraction` at {gpu.name}'s usable {gpu.usable_bytes() / GIB:.2f} GiB"
              if s.card_memory_fraction else "no memory fraction (dry run)")
    header = [f"{s.card_model}, bf16, batch 1 x {s.card_seq}, {CARD24_STEPS} steps", "planner MiB", "allocated MiB",
              "planner / allocated", "reserved MiB", "first step s", "tokens/s (steps 2..)"]
    return (f"CARD24 = `{json.dumps(CARD24)}`, {budget}. Peaks over the {CARD24_STEPS} steps minus what was allocated "
            "before the model was built; the planner's figure is its two-step estimate of the same recipe.\n\n"
            + table(header, rows))


# --------------------------------------------------------------------------------------------- speed
def section_speed(s: Scale, fig: dict) -> str:
    gap = s.speed_steps // 2  # GaLore refreshes at steps 0 (warm-up), gap and 2 * gap
    rows = []
    for label, changes in METHODS.items():
        check_deadline()
        galore = label == GALORE_ROW
        extra = {"optimizer": {**changes["optimizer"], "update_proj_gap": gap}} if galore else {}
        recipe = recipe_for(changes, extra, batch=s.batch, seq=s.seq)
        try:
            r = timed_steps(recipe, s.model, s, s.speed_steps + 1)
        except Exception as exc:  # one method's failure must not hide the others
            r = {"status": failure(exc)}
        fig[label] = r
        if galore and r["status"] == "ok":
            refresh = [t for i, t in enumerate(r["step_seconds"]) if i and i % gap == 0]
            ordinary = [t for i, t in enumerate(r["step_seconds"]) if i % gap]
            default_gap = recipe_for(changes, batch=s.batch, seq=s.seq).optimizer.update_proj_gap
            step, refresh_step = statistics.median(ordinary), statistics.median(refresh)
            r["refresh"] = {"update_proj_gap": gap, "ordinary_step_s": step, "refresh_step_s": refresh_step,
                            "ratio": refresh_step / step, "default_update_proj_gap": default_gap,
                            "amortised_tokens_per_s": s.batch * s.seq * default_gap
                            / (refresh_step + (default_gap - 1) * step)}
            r["step_s"], r["tokens_per_s"] = step, s.batch * s.seq / step
    base = fig["AdamW (bf16)"].get("tokens_per_s")
    for label, r in fig.items():
        if r["status"] == "ok":
            r["vs_adamw"] = r["tokens_per_s"] / base if base else None
            rows.append([label, f"{r['step_s']:.3f}", f"{r['tokens_per_s']:,.0f}",
                         "-" if r["vs_adamw"] is None else f"{r['vs_adamw']:.2f}"])
        else:
            rows.append([label, r["status"], "", ""])
    text = (f"Tokens/s = batch x sequence ({s.batch} x {s.seq}) / median step time after a warm-up step, "
            f"{s.speed_steps} timed steps per method.\n\n"
            + table(["method", "step s", "tokens/s", "vs AdamW (bf16)"], rows))
    refresh = fig[GALORE_ROW].get("refresh")
    if refresh:
        text += (f"\n\nGaLore refresh (update_proj_gap {gap} here, svd {GALORE_SVD}): refresh step "
                 f"{refresh['refresh_step_s']:.3f} s vs ordinary {refresh['ordinary_step_s']:.3f} s "
                 f"({refresh['ratio']:.2f}x); amortised over the default gap {refresh['default_update_proj_gap']}: "
                 f"{refresh['amortised_tokens_per_s']:,.0f} tokens/s (the table's GaLore row is between refreshes).")
    return text


SECTIONS = {"cce": section_cce, "planner": section_planner, "card24": section_card24, "speed": section_speed}


# -------------------------------------------------------------------------------------------- output
def command_output(*args: str) -> str | None:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=30, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(s: Scale) -> dict:
    cuda = s.device == "cuda"
    env = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dry_run": not cuda,
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()}), dry run",
        "driver": (command_output("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
                   or "unknown") if cuda else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": version("triton"),
        "transformers": version("transformers"),
        "python": platform.python_version(),
        "commit": command_output("git", "-C", str(ROOT), "describe", "--always", "--dirty"),
        "peers": {name: version(name) for name in PEERS},
    }
    if cuda:
        env["device_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return env


def write_results(out: Path, env: dict, records: dict) -> None:
    """Write gpu.json and gpu.md in `out`, keeping the sections of an earlier run that this one did not run."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu.json"
    sections = json.loads(path.read_text())["sections"] if path.exists() else {}
    sections.update(records)
    sections = {name: sections[name] for name in SECTIONS if name in sections}
    path.write_text(json.dumps({"environment": env, "sections": sections}, indent=1) + "\n")
    peers = ", ".join(f"{k} {v}" for k, v in env["peers"].items())
    lines = ["# GPU truth suite", "",
             f"`python bench/gpu_suite.py`: {env['device']}, driver {env['driver']}, CUDA {env['cuda']}, "
             f"torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, peers: {peers}; "
             f"commit {env['commit']}, {env['date']}. Every figure is in gpu.json. MiB = 2^20 bytes."]
    for name, r in sections.items():
        e = r["environment"]
        lines += ["", f"## {name}", "", f"_{r['status']}; {r['seconds']:.0f} s on {e['device']}, {e['date']}_"]
        if r["markdown"]:
            lines += ["", r["markdown"]]
        elif r["figures"]:
            lines += ["", "The figures measured before it stopped are in gpu.json."]
    (out / "gpu.md").write_text("\n".join(lines) + "\n")


def run_section(name: str, s: Scale, timeout: float | None) -> dict:
    global DEADLINE
    print(f"[{name}] start", flush=True)
    fig: dict = {}
    start = time.perf_counter()
    DEADLINE = None if timeout is None else start + timeout
    try:
        markdown, status = SECTIONS[name](s, fig), "ok"
    except (Exception, SectionTimeout) as exc:  # recorded; the suite goes on
        traceback.print_exc()
        markdown, status = "", failure(exc)
    fresh(s.device)
    seconds = time.perf_counter() - start
    if markdown:
        print(markdown, flush=True)
    print(f"[{name}] {status} in {seconds:.1f} s", flush=True)
    return {"status": status, "seconds": seconds, "environment": environment(s), "figures": fig,
            "markdown": markdown}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--dry-run", action="store_true", help="every section on the CPU at tiny shapes")
    parser.add_argument("--out", type=Path, help="output folder (default bench/results; a temp dir for --dry-run)")
    parser.add_argument("--timeout-per-section", type=float, help="seconds after which a section stops at its "
                        "next row or timed call and is recorded as failed")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown or not chosen:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported: kernels on the CPU
        s = DRY
    elif os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("TRITON_INTERPRET is set: Triton kernels would run in the CPU interpreter; unset it")
    elif torch.cuda.is_available():
        s = GPU
    else:
        parser.error("no CUDA device: run on a GPU, or pass --dry-run")
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu_suite_")) if args.dry_run else RESULTS)
    start = time.perf_counter()
    records, times = {}, {}
    for name in chosen:
        records[name] = run_section(name, s, args.timeout_per_section)
        times[name] = records[name]["seconds"]
        write_results(out, environment(s), records)  # after every section: a later crash keeps these
    print("section times: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items())
          + f"; total {time.perf_counter() - start:.1f} s")
    print(f"written {out / 'gpu.md'} and {out / 'gpu.json'}")


if __name__ == "__main__":
    main()
