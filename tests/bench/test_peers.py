"""bench/peers.py's quick run: every section prints rows, each a measurement or a missing/unavailable peer."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = {
    "galore": {"fp32 step", "fp32 refresh", "8-bit step", "8-bit refresh"},
    "adamw8bit": {"512x256 step"},
    "cce": {"time"},
    "mezo": {"step time", "step peak"},
}
MEASURED = re.compile(r"^-?\d+(\.\d+)? (ms|KiB|MiB|GiB)$")


def test_quick_run_reports_every_section(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    out = tmp_path / "peers.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "peers.py"), "--quick", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in proc.stdout.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip() in SECTIONS]  # fmt: skip
    paths = {section: {row[1] for row in rows if row[0] == section} for section in SECTIONS}
    for section, expected in SECTIONS.items():
        assert expected <= paths[section], (section, paths[section])
    for section, path, ours, peer, value, ratio in rows:
        assert ours == "-" or MEASURED.match(ours), (section, path, ours)
        if value.startswith(("missing", "unavailable")):
            assert ratio == "-"
        else:
            assert MEASURED.match(value), (section, path, peer, value)
            assert ratio == "-" or float(ratio) > 0, (section, path, peer, ratio)
    cce_peers = {row[3] for row in rows if row[0] == "cce"}
    assert {"eager F.cross_entropy", "cut_cross_entropy torch_compile"} <= cce_peers
    assert "| section | path | memft |" in out.read_text()
