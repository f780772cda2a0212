"""Helpers for the reliability tests: small, fast runs of the bundled tiny Llama and memft as a process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import tiny_recipe


def small_recipe(output_dir, **sections) -> dict:
    """A tiny recipe whose steps take milliseconds: few rows, short sequences, no memory tracking."""
    base = tiny_recipe(output_dir, data={"train": {"path": "memft:alpaca", "format": "alpaca", "max_examples": 48},
                                         "max_seq_len": 32},
                       memory={"track_steps": 0}, train={"eval_batches": 1, "batch_size": 4})
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return base


def memft_process(*args, cwd=None, **kwargs) -> subprocess.Popen:
    """`memft ARGS` as a separate process (stdout and stderr piped, text)."""
    return subprocess.Popen([sys.executable, "-m", "memft.cli", *map(str, args)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def step_lines(run: Path) -> list[dict]:
    """metrics.jsonl's per-step records without the timing fields (those differ between runs)."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in lines]
