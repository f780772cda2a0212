"""TRL's SFTTrainer with memft: layer-wise GaLore, cut cross-entropy and memft's memory figures, offline, on the
bundled tiny Llama, in seconds on a CPU.

    python examples/trl_sft.py                 # the run with cut cross-entropy, then the same run without it
    python examples/trl_sft.py --max-steps 20

memft goes in through two lines: `apply_memft` patches the model (cut cross-entropy) and `memft_optimizer` builds
the optimizer; `MemftTrainerMixin` mixed into SFTTrainer drives the layer-wise optimizer and makes TRL's fused
LM head use cut cross-entropy. The script trains twice, with and without cut cross-entropy, and prints both
tracked memory peaks: the difference is what cut cross-entropy saves under TRL.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from importlib.resources import files

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_callback import PrinterCallback
from trl import SFTConfig, SFTTrainer

from memft.integrations import MemftCallback, MemftTrainerMixin, apply_memft, memft_optimizer
from memft.train.models import resolve_model_path

MODEL = resolve_model_path("memft:tiny-llama")
SPEC = {
    "optimizer": {"name": "galore_adamw", "lr": 3e-3, "rank": 8, "update_proj_gap": 10, "layerwise": True},
    "loss": {"name": "cut_cross_entropy"},
}


class MemftSFTTrainer(MemftTrainerMixin, SFTTrainer):
    """TRL's SFTTrainer that also drives memft's layer-wise and zeroth-order optimizers."""


def alpaca_rows(count: int) -> datasets.Dataset:
    lines = files("memft.data").joinpath("alpaca.jsonl").read_text().splitlines()[:count]
    rows = [json.loads(line) for line in lines]
    return datasets.Dataset.from_list([{"prompt": f"{r['instruction']}\n{r.get('input', '')}\n",
                                        "completion": r["output"]} for r in rows])


def train(spec: dict, steps: int, output_dir: str) -> tuple[list[dict], MemftCallback]:
    torch.manual_seed(0)
    model, _ = apply_memft(AutoModelForCausalLM.from_pretrained(MODEL), spec)
    optimizer, scheduler = memft_optimizer(model, spec, num_training_steps=steps)
    memory = MemftCallback(track_steps=2)
    args = SFTConfig(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=8, max_length=256,
                     logging_steps=max(steps // 5, 1), save_strategy="no", report_to=[], use_cpu=True,
                     bf16=False, seed=0, disable_tqdm=True)
    trainer = MemftSFTTrainer(model=model, args=args, train_dataset=alpaca_rows(400),
                              processing_class=AutoTokenizer.from_pretrained(MODEL),
                              optimizers=(optimizer, scheduler), callbacks=[memory])
    trainer.remove_callback(PrinterCallback)  # this script prints its own lines
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry], memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=10, help="optimizer steps of each run")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    peaks = {}
    with tempfile.TemporaryDirectory() as out:
        for name, spec in (("cut cross-entropy", SPEC), ("TRL's own fused head", {"optimizer": SPEC["optimizer"]})):
            lines, memory = train(spec, cli.max_steps, out)
            print(f"\n{name}:")
            for entry in lines:
                print(f"  step {entry['step']:3d}  loss {entry['loss']:.4f}  entropy {entry['entropy']:.3f}  "
                      f"token accuracy {entry['mean_token_accuracy']:.3f}")
            report = memory.report()
            peaks[name] = report.peak_bytes
            print(f"  tracked peak {report.peak_bytes / 2**20:.2f} MiB (temporaries "
                  f"{report.breakdown['temporaries'] / 2**20:.2f} MiB)")
    theirs, ours = peaks["TRL's own fused head"], peaks["cut cross-entropy"]
    print(f"\ncut cross-entropy under SFTTrainer saves {(theirs - ours) / 2**20:.2f} MiB of "
          f"{theirs / 2**20:.2f} MiB on this model and batch.")


if __name__ == "__main__":
    main()
