"""memft under TRL's ``SFTTrainer`` (the real TRL, on the bundled tiny Llama, CPU): cut cross-entropy serves
TRL's fused LM head (same losses and metrics, less memory), and is refused without memft's mixin; memory
figures leave TRL's metrics on the loss line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from memft.integrations import MemftCallback, MemftTrainerMixin, apply_memft  # noqa: E402
from memft.train.models import resolve_model_path  # noqa: E402

MODEL = resolve_model_path("memft:tiny-llama")
CCE = {"loss": {"name": "cut_cross_entropy"}}


class MemftSFTTrainer(MemftTrainerMixin, trl.SFTTrainer):
    pass


@pytest.fixture(scope="module")
def dataset():
    lines = files("memft.data").joinpath("alpaca.jsonl").read_text().splitlines()[:48]
    rows = [json.loads(line) for line in lines]
    return datasets.Dataset.from_list([{"prompt": r["instruction"] + "\n", "completion": r["output"]} for r in rows])


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL)


def sft(trainer_cls, spec, dataset, tokenizer, tmp_path, callbacks=(), **overrides):
    """Train 3 steps; returns the trainer."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(MODEL)
    if spec:
        model, _ = apply_memft(model, spec)
    settings = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, logging_steps=1,
                    report_to=[], max_length=96, save_strategy="no", learning_rate=1e-3, use_cpu=True, seed=0,
                    bf16=False, disable_tqdm=True)
    args = trl.SFTConfig(**{**settings, **overrides})
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                          callbacks=list(callbacks))
    trainer.train()
    return trainer


def loss_lines(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_cut_cross_entropy_serves_trls_fused_head(dataset, tokenizer, tmp_path, single_thread):
    """Same losses, entropy and token accuracy as TRL's own fused head (fp32), and a lower tracked peak."""
    runs = {}
    for name, spec in (("trl", None), ("cce", CCE)):
        memory = MemftCallback(track_steps=1)
        runs[name] = (sft(MemftSFTTrainer, spec, dataset, tokenizer, tmp_path / name, callbacks=[memory]), memory)
    lines = {name: loss_lines(trainer) for name, (trainer, _) in runs.items()}
    assert len(lines["trl"]) == len(lines["cce"]) == 3
    for key in ("loss", "entropy", "mean_token_accuracy", "num_tokens"):
        ours, theirs = [entry[key] for entry in lines["cce"]], [entry[key] for entry in lines["trl"]]
        assert ours == pytest.approx(theirs, rel=1e-4), key
    peaks = {name: memory.report().peak_bytes for name, (_, memory) in runs.items()}
    temporaries = {name: memory.report().breakdown["temporaries"] for name, (_, memory) in runs.items()}
    print(f"tracked peak under SFTTrainer: TRL's fused head {peaks['trl']:,} B, cut cross-entropy {peaks['cce']:,} B; "
          f"temporaries {temporaries['trl']:,} B vs {temporaries['cce']:,} B")
    assert peaks["cce"] < peaks["trl"]


def test_memory_figures_leave_trls_metrics_on_the_loss_line(dataset, tokenizer, tmp_path, single_thread):
    trainer = sft(MemftSFTTrainer, None, dataset, tokenizer, tmp_path, callbacks=[MemftCallback(track_steps=1)])
    lines = loss_lines(trainer)
    assert all({"entropy", "mean_token_accuracy", "num_tokens"} <= set(entry) for entry in lines), lines
    assert "memory/tracked_peak_bytes" in lines[0] and "memory/run_tracked_peak_bytes" in lines[-1]


def test_cut_cross_entropy_bypassed_by_trl_is_refused(dataset, tokenizer, tmp_path, single_thread):
    with pytest.raises(RuntimeError, match=r"MemftTrainerMixin, SFTTrainer"):
        sft(trl.SFTTrainer, CCE, dataset, tokenizer, tmp_path)


def test_the_example_runs_and_shows_the_saving():
    script = Path(__file__).resolve().parents[2] / "examples" / "trl_sft.py"
    done = subprocess.run([sys.executable, str(script), "--max-steps", "2"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    saving = [line for line in done.stdout.splitlines() if line.startswith("cut cross-entropy under SFTTrainer saves")]
    assert saving and float(saving[0].split()[5]) > 0, done.stdout
