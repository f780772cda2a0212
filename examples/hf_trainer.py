"""Fine-tune the bundled tiny Llama with a Hugging Face Trainer and memft methods, offline, in seconds on a CPU.

The methods come from a recipe-like spec: dotted overrides (as for `memft finetune`) and/or a recipe YAML.

    python examples/hf_trainer.py                                            # AdamW
    python examples/hf_trainer.py optimizer.name=galore_adamw optimizer.rank=8 optimizer.layerwise=true
    python examples/hf_trainer.py optimizer.name=mezo optimizer.lr=2e-3 --max-grad-norm 0
    python examples/hf_trainer.py loss.name=cut_cross_entropy activations.name=mesa --grad-accum 2
    python examples/hf_trainer.py --recipe my_recipe.yaml --max-steps 50

It prints the loss of every step and memft's memory figures, which reach TensorBoard or W&B the same way
(`--report-to tensorboard`).
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from memft.integrations import MemftCallback, MemftTrainer, apply_memft, memft_optimizer
from memft.train.data import build_splits, collate, model_inputs
from memft.train.models import resolve_model_path
from memft.train.recipe import DataSection, apply_overrides, load_recipe_data

DEFAULT_SPEC = {"optimizer": {"name": "adamw", "lr": 3e-3}}


class PrintLogs(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            print(f"step {state.global_step:4d}  loss {logs['loss']:.4f}  lr {logs['learning_rate']:.2e}"
                  + (f"  grad_norm {logs['grad_norm']:.3f}" if "grad_norm" in logs else ""))
        memory = {k.removeprefix("memory/"): v for k, v in logs.items() if k.startswith("memory/")}
        if memory:
            print(f"step {state.global_step:4d}  memory " + "  ".join(
                f"{k} {v / 2**20:.2f} MiB" if k.endswith("bytes") else f"{k} {v}" for k, v in memory.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="dotted spec keys, e.g. optimizer.name=galore_adamw")
    parser.add_argument("--recipe", help="a memft recipe YAML whose method sections form the spec")
    parser.add_argument("--max-steps", type=int, default=None, help="default: the recipe's train.max_steps, else 20")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    parser.add_argument("--track-steps", type=int, default=2, help="steps with exact memory accounting")
    parser.add_argument("--report-to", default="none", help="tensorboard, wandb, ... (none: only this terminal)")
    parser.add_argument("--output-dir", default=None, help="checkpoints and reports (default: a temporary one)")
    cli = parser.parse_args()

    spec = load_recipe_data(cli.recipe) if cli.recipe else dict(DEFAULT_SPEC)
    spec = {key: value for key, value in apply_overrides(spec, cli.overrides).items()
            if key not in ("model", "data")}  # the model and data are this script's
    train = spec.get("train", {})
    max_steps = cli.max_steps or train.get("max_steps", 20)
    # memft's own clipping (layer-wise optimizers clip inside backward) follows the Trainer's setting
    spec["train"] = {**train, "max_steps": max_steps, "max_grad_norm": cli.max_grad_norm or None}

    path = resolve_model_path("memft:tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    data = DataSection.model_validate({"train": {"path": "memft:alpaca", "format": "alpaca"}, "max_seq_len": 128,
                                       "eval_fraction": 0})
    rows = build_splits(data, tokenizer, seed=0).train

    torch.manual_seed(0)
    model, handle = apply_memft(AutoModelForCausalLM.from_pretrained(path), spec)
    optimizer, scheduler = memft_optimizer(model, spec, num_training_steps=max_steps)
    print(f"spec: {spec}\noptimizer: {type(optimizer).__name__}, step kind {optimizer.memft_step_kind}")

    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=cli.output_dir or scratch, max_steps=max_steps, per_device_train_batch_size=cli.batch_size,
            gradient_accumulation_steps=cli.grad_accum, max_grad_norm=cli.max_grad_norm, logging_steps=1,
            save_strategy="no", report_to=cli.report_to, use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
            seed=0)
        trainer = MemftTrainer(model=model, args=args, train_dataset=rows, optimizers=(optimizer, scheduler),
                               data_collator=lambda examples: model_inputs(collate(examples, tokenizer.pad_token_id)),
                               callbacks=[PrintLogs(), MemftCallback(track_steps=cli.track_steps)])
        trainer.remove_callback(PrinterCallback)  # PrintLogs prints instead
        trainer.train()
    handle.undo()


if __name__ == "__main__":
    main()
