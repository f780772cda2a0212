"""DDP over 2 CPU processes (gloo) reproduces the single-process run on the same global batch."""

import json
import os
import subprocess
import sys

import pytest


def _metrics(path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _memft(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "memft.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[:6000]


@pytest.mark.parametrize("optimizer", ["adamw", "mezo"])
def test_ddp_matches_single_process(tmp_path, optimizer):
    common = ["finetune", "quickstart", "train.max_steps=4", "train.log_every=1", "memory.track_steps=0", "train.eval_batches=1",
              f"optimizer.name={optimizer}", "data.train.max_examples=300"]
    if optimizer == "mezo":
        common += ["optimizer.lr=1e-3", "optimizer.eps=1e-2", "train.max_grad_norm=null"]
    _memft(*common, "train.batch_size=8", f"train.output_dir={tmp_path / 'one'}", cwd=tmp_path)
    _memft(*common, "train.batch_size=4", "distributed.engine=ddp", "distributed.nproc_per_node=2",
           f"train.output_dir={tmp_path / 'two'}", cwd=tmp_path)
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "eval_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (key, a, b)
        assert a.get("tokens") == b.get("tokens")
