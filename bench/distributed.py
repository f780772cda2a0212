"""The support matrix, run: every method under every engine it is declared to support.

For each row of `memft.train.support.rows()` this runs `memft finetune quickstart` with the row's method
on one process (batch 8) and, for every engine the row is not refused on, with 2 processes (batch 4 each:
the same global batch; gloo on CPU). A cell passes when the run finishes, its loss falls, and its
per-step losses equal the single-process run's (relative difference ≤ 1e-4; stochastic methods, whose
random draws differ per process, and DeepSpeed's fp32 flat buffers are reported, not required to match).
Refused cells are checked to be refused with exit code 2.

Engine options (FSDP without resharding, FSDP with CPU offload, ZeRO-1, ZeRO-2 with the optimizer on the
CPU) are run for AdamW.

Run: `python bench/distributed.py [--steps 3] [--rows LABEL ...] [--engines ddp fsdp deepspeed]`; writes
bench/results/distributed.md (with --rows, replaces those rows' lines in it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memft.train.support import ENGINES, rows

RESULTS = Path(__file__).parent / "results" / "distributed.md"
# Settings a row needs on the tiny model beyond its method name.
EXTRA = {
    "optimizer mezo": ("optimizer.lr=1e-3", "optimizer.eps=1e-2", "train.max_grad_norm=null"),
    "optimizer sgd": ("optimizer.lr=0.2",),
    "optimizer galore_adamw": ("optimizer.rank=16", "optimizer.update_proj_gap=2"),
    "optimizer galore_adamw8bit": ("optimizer.rank=16", "optimizer.update_proj_gap=2"),
    "optimizer galore_adafactor": ("optimizer.rank=16", "optimizer.update_proj_gap=2"),
    "optimizer natural_galore_adamw": ("optimizer.rank=16", "optimizer.update_proj_gap=2"),
    "optimizer.layerwise": ("optimizer.rank=16",),
    "adapter loram": ("optimizer.lr=3e-2", "adapter.dropout=0"),
    "adapter loram (quantize nf4)": ("optimizer.lr=3e-2", "adapter.dropout=0"),
    "activations mesa": ("model.attn_implementation=eager",),
    "activations s2a": ("model.attn_implementation=eager",),
}
# Methods whose updates use random draws that differ between 1 and 2 processes (WTA-CRS samples rows of
# each process's own batch; Mesa/S2A round stochastically): their losses are not expected to match.
STOCHASTIC = {"activations wta_crs", "activations mesa", "activations s2a"}
OPTIONS = {
    "fsdp reshard_after_forward=false": ("distributed.engine=fsdp", "distributed.fsdp.reshard_after_forward=false"),
    "fsdp cpu_offload=true": ("distributed.engine=fsdp", "distributed.fsdp.cpu_offload=true"),
    "deepspeed stage=1": ("distributed.engine=deepspeed", "distributed.deepspeed.stage=1"),
    "deepspeed offload_optimizer=cpu": ("distributed.engine=deepspeed", "distributed.deepspeed.offload_optimizer=cpu"),
}


def run(overrides: tuple[str, ...], out: Path, steps: int) -> dict:
    common = (f"train.max_steps={steps}", "train.log_every=1", "memory.track_steps=0", "train.eval_batches=1",
              "data.train.max_examples=200", "train.warmup_steps=0")
    args = [*common, *overrides, f"train.output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "memft.cli", "finetune", "quickstart", *args], capture_output=True,
                          text=True, env=env, timeout=1200)
    record: dict = {"rc": proc.returncode, "seconds": time.perf_counter() - start}
    if proc.returncode == 0:
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        record["losses"] = [x["loss"] for x in lines if "loss" in x]
    else:
        errors = [x for x in (proc.stderr + proc.stdout).splitlines() if "rror" in x]
        record["error"] = (errors[-1] if errors else proc.stderr.strip().splitlines()[-1:] or [""])[0][:300]
    return record


def compare(single: dict, multi: dict, label: str) -> tuple[str, str]:
    """(verdict, losses) for one cell."""
    if multi["rc"] != 0:
        return "FAILED", multi.get("error", "")
    losses = multi["losses"]
    falls = losses[-1] < losses[0]
    text = f"{losses[0]:.4f} → {losses[-1]:.4f}"
    if single.get("rc") != 0:
        return ("ok" if falls else "loss did not fall"), text + " (no single-process reference)"
    diff = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(single["losses"], losses))
    text += f", max rel. diff vs 1 process {diff:.1e}"
    if not falls:
        return "loss did not fall", text
    if diff <= 1e-4 or label in STOCHASTIC:
        return "ok", text
    return "differs", text


def _key(line: str) -> str:
    """A results line's identity: the row label, plus the engine for per-cell lines."""
    cells = line.split(" | ")
    return " | ".join(cells[:2]) if len(cells) > 1 and cells[1] in ENGINES else cells[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", nargs="*", help="only these row labels")
    parser.add_argument("--engines", nargs="*", default=list(ENGINES))
    parser.add_argument("--no-options", action="store_true", help="skip the engine-options section")
    args = parser.parse_args()
    steps = args.steps
    selected = [r for r in rows() if not args.rows or r.label in args.rows]
    started = time.perf_counter()
    table = ["| method | " + " | ".join(args.engines) + " |", "|---|" + "---|" * len(args.engines)]
    details = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i, row in enumerate(selected):
            overrides = row.overrides + EXTRA.get(row.label, ())
            single = run(overrides + ("train.batch_size=8",), root / f"{i}-single", steps)
            cells = []
            for engine in args.engines:
                out = root / f"{i}-{engine}"
                multi = run(overrides + ("train.batch_size=4", f"distributed.engine={engine}",
                                         "distributed.nproc_per_node=2"), out, steps)
                if engine in row.refused:
                    verdict = "refused" if multi["rc"] == 2 else f"NOT REFUSED (rc {multi['rc']})"
                    text = ""
                else:
                    verdict, text = compare(single, multi, row.label)
                cells.append(verdict)
                details.append(f"| {row.label} | {engine} | {verdict} | {text} | {multi['seconds']:.0f} |")
                print(details[-1], flush=True)
            table.append(f"| {row.label} | " + " | ".join(cells) + " |")
        options = []
        if not args.no_options:
            reference = run(("train.batch_size=8",), root / "opt-single", steps)
            for name, overrides in OPTIONS.items():
                multi = run(overrides + ("train.batch_size=4", "distributed.nproc_per_node=2"), root / name, steps)
                verdict, text = compare(reference, multi, "optimizer adamw")
                options.append(f"| {name} | {verdict} | {text} | {multi['seconds']:.0f} |")
                print(options[-1], flush=True)
    import torch

    lines = ["# Distributed support matrix, run", "",
             f"`python bench/distributed.py --steps {steps}` — torch {torch.__version__}, 2 processes with gloo on "
             f"CPU, tiny Llama (`memft finetune quickstart`), {steps} steps, global batch 8; total "
             f"{time.perf_counter() - started:.0f} s on a shared 2-core machine.", "",
             "A cell is `ok` when the 2-process run finishes, its loss falls and its per-step losses match the "
             "single-process run on the same global batch (relative difference ≤ 1e-4; compressors with "
             "stochastic rounding or sampling draw per process and are exempt). `refused`: stopped up front with "
             "exit code 2 and the reason from `memft support`.", "", *table, "",
             "## Every cell", "", "| method | engine | verdict | loss | s |", "|---|---|---|---|---|", *details]
    if options:
        lines += ["", "## Engine options (AdamW)", "", "| option | verdict | loss | s |", "|---|---|---|---|",
                  *options]
    if not args.rows:
        RESULTS.write_text("\n".join(lines) + "\n")
    else:  # replace the re-run rows (and options) in the saved results
        fresh = {_key(line): line for line in table[2:] + details + options}
        kept = [fresh.get(_key(old), old) for old in RESULTS.read_text().splitlines()]
        RESULTS.write_text("\n".join(kept) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
