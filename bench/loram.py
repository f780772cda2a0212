"""LoRAM / QLoRAM benchmark (arXiv 2502.13533): parameter-storage reduction of LLaMA-2-70B and the QLoRAM
training peak.

    PYTHONPATH=. .venv/bin/python bench/loram.py [--out bench/results/loram.md] [--skip-cuda]

1. Storage (CPU, exact): the model is built on the meta device, pruned to the plan's shapes and its parameter
   bytes summed (``memft.loram.parameter_storage_bytes``), for pruning ratios 0.65/0.75/0.85/0.95, beside the
   paper's figures. The ratio is LLM-Pruner's structured ratio used by LoRAM: in each pruned layer (layers 4..77
   of 80: the first 4 and the last 2 stay dense, the reference's ``pruned_layer_interval 4 78``) the fraction
   ``r`` of MLP neurons and of KV heads (with their query groups) is removed.
2. Training-peak estimate through ``memft.memory`` (fake tensors), if that estimator can build a QLoRAM model.
3. With a CUDA device: a real QLoRAM LLaMA-2-70B-shaped model (random weights) is built directly in its pruned
   shapes, quantised to NF4 by bitsandbytes, its allocated bytes compared with the exact accounting, and training
   steps at the reference script's setting measured with ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from memft.loram import ModelDims, apply_plan, parameter_storage_bytes, plan_from_counts, quantize_nf4

GIB = 1024**3
RATIOS = (0.65, 0.75, 0.85, 0.95)
PAPER_LLAMA2_70B = {0.65: 9.82, 0.75: 12.84, 0.85: 16.95, 0.95: 28.56}
DENSE_LAYERS = (4, 2)
# Reference training script (loram/2_pruned_low_rank_matrix_training.py): micro batch 4, cutoff_len 512, LoRA r=8,
# alpha 16, dropout 0.05 on q,k,v,o,gate,down,up and lm_head; NF4 with double quantisation, bf16 compute, AdamW.
REFERENCE = {"batch_size": 4, "seq_len": 512, "r": 8, "lora_alpha": 16, "lora_dropout": 0.05}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def llama_70b(vocab_size: int = 32000) -> LlamaConfig:
    """LLaMA-2-70B (vocab 32000) or LLaMA-3.1-70B (vocab 128256) architecture."""
    return LlamaConfig(
        hidden_size=8192,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        intermediate_size=28672,
        vocab_size=vocab_size,
        tie_word_embeddings=False,
    )


def storage_section(config: LlamaConfig) -> list[str]:
    full = parameter_storage_bytes(config)
    dims = ModelDims.from_config(config)
    lines = [
        "## Parameter storage, LLaMA-2-70B (exact bytes on meta tensors)",
        "",
        f"Full model, bf16: {full.parameter_count:,} parameters, {full.total_bytes:,} bytes "
        f"({full.total_bytes / GIB:.2f} GiB).",
        "",
        "| ratio | kept per pruned layer (neurons / KV heads / query heads) | parameters | LoRAM bf16 | "
        "QLoRAM NF4+DQ (exact) | NF4+DQ incl. lm_head | NF4 no DQ | paper accounting (16 bit / 4 bit per param) | "
        "paper |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for ratio in RATIOS:
        plan = plan_from_counts(dims, ratio, DENSE_LAYERS)
        layer = plan.pruned_layers[0]
        bf16 = parameter_storage_bytes(config, plan)
        nf4 = parameter_storage_bytes(config, plan, "nf4")
        nf4_head = parameter_storage_bytes(config, plan, "nf4", include_lm_head=True)
        nf4_plain = parameter_storage_bytes(config, plan, "nf4", double_quant=False)
        paper_accounting = 4 * full.parameter_count / bf16.parameter_count

        def cell(report) -> str:
            return f"{report.total_bytes / GIB:.2f} GiB, **{full.total_bytes / report.total_bytes:.2f}x**"

        lines.append(
            f"| {ratio} | {plan.intermediate_size(layer)} / {plan.num_key_value_heads(layer)} / "
            f"{plan.num_attention_heads(layer)} | {bf16.parameter_count:,} | {cell(bf16)} | {cell(nf4)} | "
            f"{cell(nf4_head)} | {cell(nf4_plain)} | **{paper_accounting:.2f}x** | {PAPER_LLAMA2_70B[ratio]}x |"
        )
    llama3 = llama_70b(vocab_size=128256)
    full3 = parameter_storage_bytes(llama3)
    pruned3 = parameter_storage_bytes(llama3, 0.85, keep_dense_layers=DENSE_LAYERS)
    nf43 = parameter_storage_bytes(llama3, 0.85, "nf4", keep_dense_layers=DENSE_LAYERS)
    lines += [
        "",
        f"LLaMA-3.1-70B (vocab 128256) at 0.85: paper accounting "
        f"**{4 * full3.parameter_count / pruned3.parameter_count:.2f}x** (paper: 15.81x); exact NF4+DQ "
        f"{full3.total_bytes / nf43.total_bytes:.2f}x.",
        "",
        "Columns: *LoRAM bf16* = pruned model in bf16; *QLoRAM NF4+DQ (exact)* = decoder projections in bitsandbytes "
        "NF4 (blocksize 64, double-quantised absmax, per-weight code books) with embeddings, lm_head and norms in "
        "bf16, as `quantize_nf4` and Hugging Face's bitsandbytes integration store them; *incl. lm_head* also "
        "quantises lm_head; *no DQ* keeps float32 absmax. *Paper accounting* = (full parameters x 16 bit) / "
        "(pruned parameters x 4 bit): every parameter, embeddings included, at exactly 4 bits, no quantisation "
        "constants. It reproduces the paper's 9.82/12.84/16.95/28.56x (LLaMA-2-70B) and 15.81x (LLaMA-3.1-70B) "
        "with this ratio definition and these dense layers, which is how they were identified. Real NF4 storage "
        "cannot reach those figures: absmax costs >= 0.127 bit per weight, and the bf16 embeddings + lm_head "
        "(524 M parameters, 1.05 GB) weigh as much as 2.1 B NF4 weights.",
        "",
        "Ratio definition (LLM-Pruner rounding, `memft.loram.kept_count`): an MLP keeps floor((1 - r) x 28672) "
        "neurons, and floor(r x 8) of the 8 KV heads are removed with their 8 query heads each; head_dim stays 128.",
    ]
    return lines


def _qloram_transform(plan):
    def transform(model):
        from peft import LoraConfig, get_peft_model

        apply_plan(model, plan)
        quantize_nf4(model)
        config = LoraConfig(
            r=REFERENCE["r"], lora_alpha=REFERENCE["lora_alpha"], lora_dropout=REFERENCE["lora_dropout"],
            target_modules=TARGETS, task_type="CAUSAL_LM",
        )
        return get_peft_model(model, config)

    return transform


def estimate_section(config: LlamaConfig) -> list[str]:
    lines = ["## QLoRAM training peak, estimated with memft.memory (fake tensors)", ""]
    try:
        from memft.memory import estimate_from_config
    except ImportError as err:
        return lines + [f"Not available: memft.memory could not be imported ({err})."]
    plan = plan_from_counts(ModelDims.from_config(config), 0.85, DENSE_LAYERS)
    config_dict = {"model_type": "llama", **{k: v for k, v in config.to_dict().items() if k != "model_type"}}
    try:
        report = estimate_from_config(
            config_dict, "bfloat16", REFERENCE["batch_size"], REFERENCE["seq_len"], "adamw",
            model_transform=_qloram_transform(plan), device="cuda",
        )
    except Exception as err:  # report why the estimator cannot run this model yet
        reason = str(err).strip().splitlines()[0][:300]
        return lines + [
            f"Not available: the estimator builds models under FakeTensorMode, where building the QLoRAM model "
            f"fails ({type(err).__name__}: {reason}). bitsandbytes' `Params4bit` cannot wrap a fake tensor, and "
            "peft's `get_peft_model` fails to move adapters of a fake model (`Couldn't swap Linear.weight`). See "
            "the CUDA measurement below for the real peak."
        ]
    return lines + [f"Estimated peak: {report.peak_bytes / GIB:.2f} GiB (batch {REFERENCE['batch_size']}, seq "
                    f"{REFERENCE['seq_len']}, LoRA r={REFERENCE['r']}, AdamW)."]


def _build_pruned_on(config: LlamaConfig, plan, device: torch.device):
    """The pruned model allocated directly in its pruned shapes on ``device`` (random weights, N(0, 0.02))."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    apply_plan(model, plan)
    model.to_empty(device=device)
    with device:  # to_empty leaves buffers uninitialised: rebuild the rotary tables
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02) if param.dim() == 2 else param.fill_(1.0)
    return model.eval()


def _train_peak(model, optimizer, batch_size: int, seq_len: int, steps: int = 2) -> tuple[int, int, float]:
    """(max allocated, max reserved) bytes over ``steps`` bf16-autocast training steps, and the last loss."""
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), device="cuda")
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # so that reserved memory starts from this row's own needs
    torch.cuda.reset_peak_memory_stats()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved(), loss.item()


def cuda_section(config: LlamaConfig, ratio: float = 0.85) -> list[str]:
    from peft import LoraConfig, get_peft_model

    device = torch.device("cuda")
    plan = plan_from_counts(ModelDims.from_config(config), ratio, DENSE_LAYERS)
    start = time.perf_counter()
    model = _build_pruned_on(config, plan, device)
    torch.cuda.synchronize()
    bf16_alloc = torch.cuda.memory_allocated()
    quantize_nf4(model, compute_dtype=torch.bfloat16, double_quant=True)
    gc.collect()
    torch.cuda.synchronize()
    nf4_alloc = torch.cuda.memory_allocated()
    bf16_pred = parameter_storage_bytes(config, plan).total_bytes
    nf4_pred = parameter_storage_bytes(config, plan, "nf4").total_bytes
    lora = LoraConfig(
        r=REFERENCE["r"], lora_alpha=REFERENCE["lora_alpha"], lora_dropout=REFERENCE["lora_dropout"],
        target_modules=TARGETS, task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-5)
    rows = []
    for checkpointing in (False, True):
        if checkpointing:
            base = peft_model.get_base_model()
            enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
            kwargs = {"use_reentrant": False}
            try:
                enable(activation_checkpointing_kwargs=kwargs)
            except TypeError:
                enable(gradient_checkpointing_kwargs=kwargs)
        for batch_size in (REFERENCE["batch_size"], 1):
            peak, reserved, loss = _train_peak(peft_model, optimizer, batch_size, REFERENCE["seq_len"])
            rows.append(
                f"| {batch_size} x {REFERENCE['seq_len']} | {'yes' if checkpointing else 'no'} | "
                f"{peak / GIB:.2f} GiB ({peak / 1e9:.2f} GB) | {reserved / GIB:.2f} GiB | "
                f"{'yes' if peak <= 20e9 else 'no'} | {loss:.3f} |"
            )
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return [
        f"## QLoRAM on CUDA: measured ({torch.cuda.get_device_name()}, torch {torch.__version__})",
        "",
        f"LLaMA-2-70B shapes at ratio {ratio} (random weights), built directly in pruned shapes. Allocated after "
        f"building in bf16: {bf16_alloc:,} bytes vs exact accounting {bf16_pred:,} (diff {bf16_alloc - bf16_pred:+,}); "
        f"after NF4 quantisation: {nf4_alloc:,} bytes vs {nf4_pred:,} (diff {nf4_alloc - nf4_pred:+,}). The "
        "differences are attributed to the CUDA caching allocator's block granularity (allocated memory counts "
        "whole blocks: multiples of 512 bytes, and a cached block is not split when the remainder is small) and "
        "the rotary buffer, which is not a parameter.",
        "",
        f"Training steps (2 per row, bf16 autocast, AdamW on {trainable:,} LoRA parameters: r={REFERENCE['r']}, "
        f"alpha={REFERENCE['lora_alpha']}, on {', '.join(TARGETS)}); peak = `torch.cuda.max_memory_allocated` "
        "(what decides an out-of-memory error is reserved memory, also shown):",
        "",
        "| micro-batch x seq | activation checkpointing | peak allocated | peak reserved | <= 20 GB | loss |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Setting: the reference training script's micro-batch 4 and cutoff length 512 (it does not enable "
        f"checkpointing); rows with batch 1 and with checkpointing for comparison. Wall time of this section: "
        f"{time.perf_counter() - start:.0f} s.",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "loram.md")
    parser.add_argument("--skip-cuda", action="store_true", help="skip the CUDA measurement even if a GPU is present")
    args = parser.parse_args(argv)
    config = llama_70b()
    lines = ["# LoRAM / QLoRAM (arXiv 2502.13533)", "", "Produced by `PYTHONPATH=. python bench/loram.py`.", ""]
    sections = [storage_section, estimate_section]
    if torch.cuda.is_available() and not args.skip_cuda:
        sections.append(cuda_section)
    for section in sections:
        part = section(config) + [""]
        print("\n".join(part), flush=True)
        lines += part
    if len(sections) == 2:
        lines += ["## QLoRAM on CUDA", "", "Not measured in this run: no CUDA device (or --skip-cuda).", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
