"""bench/gpu_suite.py's dry run: every section runs on the CPU at tiny shapes and writes its figures."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SUITE = Path(__file__).resolve().parents[2] / "bench" / "gpu_suite.py"
SECTIONS = ["cce", "planner", "card24", "speed"]
TOLERANCE = 0.05


def run_suite(out: Path, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(SUITE), "--dry-run", "--out", str(out), *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    stdout = run_suite(out)
    return out, stdout, json.loads((out / "gpu.json").read_text())


def test_every_section_ran_timed_and_written(dry_run):
    out, stdout, result = dry_run
    env = result["environment"]
    assert env["dry_run"] is True and env["device"] and env["torch"] and env["date"]
    assert list(result["sections"]) == SECTIONS
    markdown = (out / "gpu.md").read_text()
    for name, section in result["sections"].items():
        assert section["status"] == "ok", (name, section["status"])
        assert section["figures"] and section["seconds"] > 0
        assert f"[{name}] ok in " in stdout
        assert f"## {name}\n" in markdown


def test_cut_cross_entropy_agrees_with_the_fp32_reference(dry_run):
    shapes = dry_run[2]["sections"]["cce"]["figures"]
    assert len(shapes) == 2 and {s["softcap"] for s in shapes.values()} == {None, 30.0}
    for shape in shapes.values():
        methods = shape["methods"]
        for name in ("memft", "eager F.cross_entropy"):
            m = methods[name]
            assert m["status"] == "ok", m["status"]
            assert m["errors"]["loss"] < 1e-2
            assert max(m["errors"]["grad_hidden"], m["errors"]["grad_weight"]) < 2e-2
            assert m["time_ms"] > 0 and isinstance(m["peak_extra_bytes"], int)
        for peer in ("liger-kernel", "cut-cross-entropy"):
            assert (methods[peer]["status"] == "missing") == (not installed(peer)), (peer, methods[peer])
        assert shape["memft_vs_best_peer"]["time"]["ratio"] > 0


def test_planner_rows_match_their_measurement(dry_run):
    rows = dry_run[2]["sections"]["planner"]["figures"]
    assert len(rows) == 9
    for label, row in rows.items():
        assert row["status"] == "ok", (label, row["status"])
        assert row["allocated_bytes"] > 0
        if row["estimate_bytes"] is None:
            assert "cannot be estimated" in row["not_estimable"]
        else:
            assert abs(row["ratio"] - 1) <= TOLERANCE, (label, row["ratio"])
    assert rows["8-bit AdamW"]["estimate_bytes"] is None


def test_card24_runs_five_steps_beside_lora(dry_run):
    fig = dry_run[2]["sections"]["card24"]["figures"]
    for key in ("composition", "lora"):
        run = fig[key]
        assert run["status"] == "ok" and len(run["step_seconds"]) == 5 and run["tokens_per_s"] > 0
    assert abs(fig["estimate"]["peak_bytes"] / fig["composition"]["allocated_bytes"] - 1) <= TOLERANCE


def test_speed_has_every_method_and_the_galore_refresh(dry_run):
    rows = dry_run[2]["sections"]["speed"]["figures"]
    assert len(rows) == 9
    for label, row in rows.items():
        assert row["status"] == "ok", (label, row["status"])
        assert row["tokens_per_s"] > 0 and row["vs_adamw"] > 0
    assert rows["AdamW (bf16)"]["vs_adamw"] == 1.0
    refresh = rows["GaLore 8-bit layer-wise"]["refresh"]
    assert refresh["refresh_step_s"] > 0 and refresh["ordinary_step_s"] > 0


def test_sections_rerun_alone_and_keep_the_others(dry_run):
    out, _, before = dry_run
    stdout = run_suite(out, "--sections", "card24")
    after = json.loads((out / "gpu.json").read_text())
    assert "[card24] ok in " in stdout and "[cce]" not in stdout and "[speed]" not in stdout
    assert list(after["sections"]) == SECTIONS
    for name in ("cce", "planner", "speed"):
        assert after["sections"][name] == before["sections"][name]
