"""Activation compressors (Mesa arXiv 2111.11124, WTA-CRS arXiv 2305.15265, S2A arXiv 2503.08154): memory.

Measured side by side in one process, uncompressed against compressed, same model, batch and seed:

- saved-for-backward bytes by module kind (linear / activation / norm / dropout / attention / other), counted by
  ``saved_tensors_hooks`` entered around each module (a storage is counted once, parameters never);
- peak tensor storage of one training step (forward, backward, AdamW step) with ``memft.memory.MemoryTracker``;
- the papers' settings computed from the same per-sample accounting: ``parameters + gradients + AdamW state +
  batch x saved bytes per sample`` (the backward-start peak of a step), next to the papers' own figures.

Mesa: ViT-Base/16 (224 px, the DeiT-B shape) and BERT-base (seq 128), baseline bf16 and fp32. WTA-CRS: T5-Base
(ReLU, dropout 0.1, eager attention), source and target length 128, batch 64 at the paper setting, full
fine-tuning and LoRA (r=8 on q and v), ratio 0.3: Linear layers only, the reference deployment's layers (q/k/v
exact), the default (Linear layers and attention matmuls sampled), and with Mesa for what is not sampled.
Dropout that memft leaves to autograd is counted as CUDA stores it (a bool mask, not ATen's CPU float mask). S2A: the nonlinearities' saved tensors of BERT-base (GELU) and a Llama-style model (SiLU) in bf16.

Run: ``python bench/activations.py`` (CPU at batch 1, writes ``bench/results/activations.md``); ``--quick`` for
a smoke run on tiny configs; ``--device cuda --output PATH`` measures the paper settings on a GPU with
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from memft.activations import compress_activations
from memft.activations.patch import classify

GIB = 1 << 30
MIB = 1 << 20
RESULTS = Path(__file__).parent / "results" / "activations.md"
T5_BATCH, T5_SOURCE, T5_TARGET = 64, 128, 128
QKV = (".q", ".k", ".v")  # T5 attention projections (names end in .q/.k/.v; .q.lora_A... under LoRA)
DEIT_BATCH = 128


# --- measurement ---------------------------------------------------------------------------------------------


class CudaDropout(TorchFunctionMode):
    """Route ``F.dropout`` (training, out of place) to ``torch.native_dropout``, which saves a bool keep mask as
    CUDA's fused dropout does; ATen's CPU path saves a float mask (4x the bytes). Outputs are not compared."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is torch.nn.functional.dropout:
            x = args[0]
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            training = kwargs.get("training", args[2] if len(args) > 2 else True)
            inplace = kwargs.get("inplace", args[3] if len(args) > 3 else False)
            if training and not inplace and 0.0 < p < 1.0 and x.requires_grad:
                return torch.native_dropout(x, p, True)[0]
        return func(*args, **kwargs)


def saved_by_kind(model: nn.Module, step: Callable[[], torch.Tensor]) -> dict[str, int]:
    """Saved-for-backward bytes per module kind during ``step()`` (its loss is back-propagated afterwards).

    Dropout that memft leaves to autograd is counted as CUDA stores it (a bool mask, :class:`CudaDropout`).
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    totals: dict[str, int] = defaultdict(int)
    stack: list[Any] = []

    def packer(kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in params and ptr not in seen and not isinstance(t, nn.Parameter):
                seen.add(ptr)
                totals[kind] += storage.nbytes()
            return t

        return pack

    def enter(kind: str) -> Callable:
        def hook(_m: nn.Module, _a: Any) -> None:
            ctx = torch.autograd.graph.saved_tensors_hooks(packer(kind), lambda t: t)
            ctx.__enter__()
            stack.append(ctx)

        return hook

    def leave(_m: nn.Module, _a: Any, _o: Any) -> None:
        stack.pop().__exit__(None, None, None)

    handles = []
    for module in model.modules():
        kind = classify(module)
        if kind is not None:
            handles += [module.register_forward_pre_hook(enter(kind)), module.register_forward_hook(leave)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(packer("other"), lambda t: t), CudaDropout():
            loss = step()
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    return dict(totals)


def tracked_step_peak(model: nn.Module, step: Callable[[], torch.Tensor]) -> tuple[int, dict[str, int]]:
    """Peak tensor storage and its breakdown over one AdamW training step, by ``MemoryTracker``."""
    from memft.memory import MemoryTracker

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    with MemoryTracker(model, optimizer) as tracker:
        with CudaDropout():
            loss = step()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return tracker.peak_bytes, tracker.peak_breakdown


def cuda_step_peak(model: nn.Module, step: Callable[[], torch.Tensor]) -> int:
    """``max_memory_allocated`` over one AdamW step, measured after a warm-up step created the optimizer state."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    for measured in (False, True):
        if measured:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        step().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del optimizer
    return peak


def static_bytes(model: nn.Module) -> int:
    """Parameters + gradients + AdamW state (two fp32 moments) of the trainable parameters."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trainable)
    adam = sum(2 * p.numel() * 4 for p in trainable)
    return params + grads + adam


@contextlib.contextmanager
def compressed(model: nn.Module, method: str | None, **options: Any):
    handle = compress_activations(model, method, **options) if method else None
    try:
        yield handle
    finally:
        if handle is not None:
            handle.undo()


# --- models --------------------------------------------------------------------------------------------------


def build_vit(quick: bool) -> tuple[nn.Module, Callable[[nn.Module, int, torch.device], Callable]]:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(attn_implementation="eager", num_labels=1000)
    if quick:
        config = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           image_size=32, patch_size=8, num_labels=10, attn_implementation="eager")
    torch.manual_seed(0)
    model = ViTForImageClassification(config)

    def make(m: nn.Module, batch: int, device: torch.device) -> Callable:
        pixels = torch.randn(batch, 3, config.image_size, config.image_size, device=device)
        labels = torch.randint(0, config.num_labels, (batch,), device=device)
        dtype = next(m.parameters()).dtype
        return lambda: m(pixel_values=pixels.to(dtype), labels=labels).loss

    return model, make


def build_bert(quick: bool) -> tuple[nn.Module, Callable]:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(attn_implementation="eager", num_labels=2)
    seq = 128
    if quick:
        config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                            vocab_size=512, attn_implementation="eager", num_labels=2)
        seq = 32
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)

    def make(m: nn.Module, batch: int, device: torch.device) -> Callable:
        ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
        labels = torch.randint(0, 2, (batch,), device=device)
        return lambda: m(input_ids=ids, labels=labels).loss

    return model, make


def build_t5(quick: bool) -> tuple[nn.Module, Callable]:
    from transformers import T5Config, T5ForConditionalGeneration

    dims = dict(d_model=768, d_ff=3072, num_layers=12, num_decoder_layers=12, num_heads=12, d_kv=64,
                vocab_size=32128)
    source, target = T5_SOURCE, T5_TARGET
    if quick:
        dims = dict(d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=16, vocab_size=512)
        source, target = 32, 32
    config = T5Config(**dims, feed_forward_proj="relu", dropout_rate=0.1, attn_implementation="eager",
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config)

    def make(m: nn.Module, batch: int, device: torch.device) -> Callable:
        src = torch.randint(2, config.vocab_size, (batch, source), device=device)
        tgt = torch.randint(2, config.vocab_size, (batch, target), device=device)
        return lambda: m(input_ids=src, labels=tgt).loss

    return model, make


def build_llama(quick: bool) -> tuple[nn.Module, Callable]:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, seq = (512, 4, 256) if not quick else (64, 2, 32)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                         intermediate_size=round(hidden * 8 / 3), vocab_size=4096, attn_implementation="eager")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)

    def make(m: nn.Module, batch: int, device: torch.device) -> Callable:
        ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
        return lambda: m(input_ids=ids, labels=ids).loss

    return model, make


def lora(model: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v"], lora_dropout=0.0))


# --- sections ------------------------------------------------------------------------------------------------


def fmt(nbytes: float, unit: int = MIB) -> str:
    return f"{nbytes / unit:,.1f}"


def mesa_section(quick: bool, out: list[str]) -> None:
    out += ["## Mesa (8-bit activations)", "",
            "Saved-for-backward bytes of one sample (batch 1), CPU; dropout left to autograd counted as CUDA "
            "stores it (bool mask). Paper: DeiT-B, batch 128, AMP: 17.7 GB -> 8.6 GB total GPU memory (-51%) at "
            "equal accuracy.", "",
            "| model | dtype | baseline MiB | Mesa MiB | Mesa / baseline | Mesa / bf16 baseline "
            "| at batch 128: baseline GiB | Mesa GiB |",
            "|---|---|---|---|---|---|---|---|"]
    for label, builder in (("ViT-B/16 (224 px)", build_vit), ("BERT-base (seq 128)", build_bert)):
        model, make = builder(quick)
        bf16_base = None
        for dtype in (torch.bfloat16, torch.float32):
            model = model.to(dtype)
            step = make(model, 1, torch.device("cpu"))
            base = sum(saved_by_kind(model, step).values())
            with compressed(model, "mesa"):
                mesa = sum(saved_by_kind(model, step).values())
            bf16_base = base if dtype == torch.bfloat16 else bf16_base
            out.append(f"| {label} | {str(dtype)[6:]} | {fmt(base)} | {fmt(mesa)} | {mesa / base:.3f} | "
                       f"{mesa / bf16_base:.3f} | {base * DEIT_BATCH / GIB:.2f} | {mesa * DEIT_BATCH / GIB:.2f} |")
            print(out[-1], flush=True)
        del model
        gc.collect()
    out.append("")


T5_CONFIGS = (
    ("full fine-tuning", False, None, {}),
    ("WTA-CRS 0.3, Linear layers only", False, "wta_crs", {"ratio": 0.3, "sample_attention": False,
                                                          "targets": ("linear", "activation", "dropout", "attention")}),
    ("WTA-CRS 0.3, paper's layers (q/k/v exact)", False, "wta_crs", {"ratio": 0.3, "exclude": QKV}),
    ("WTA-CRS 0.3", False, "wta_crs", {"ratio": 0.3}),
    ("WTA-CRS 0.3 + Mesa rest", False, "wta_crs", {"ratio": 0.3, "others": "mesa"}),
    ("LoRA", True, None, {}),
    ("LoRA + WTA-CRS 0.3", True, "wta_crs", {"ratio": 0.3}),
    ("LoRA + WTA-CRS 0.3 + Mesa rest", True, "wta_crs", {"ratio": 0.3, "others": "mesa"}),
)


def wta_section(quick: bool, out: list[str], track: bool) -> None:
    out += ["## WTA-CRS (sampled Linear inputs and attention matmul operands)", "",
            f"T5-Base (ReLU, dropout 0.1, eager attention), fp32, source/target length {T5_SOURCE}/{T5_TARGET}, one "
            f"sample on CPU; the paper setting (batch {T5_BATCH}) is computed as parameters + gradients + AdamW "
            f"state + {T5_BATCH} x saved bytes per sample. Paper: full 17.66 GB -> 8.44 GB at ratio 0.3 (2.1x), "
            "2.7x with LoRA. Dropout left to autograd is counted as CUDA stores it (bool mask; ATen's CPU path "
            "keeps a float mask, 4x). Rows: 'Linear layers only' samples every trainable Linear but the LM head "
            "and keeps norms and attention as autograd does (dropout/ReLU masks 1-bit); 'paper's layers' is the "
            "reference deployment's memory setting (o, wi, wo and both attention matmuls sampled, q/k/v exact, "
            "norms keeping one tensor, 1-bit ReLU/dropout masks); 'WTA-CRS 0.3' (the default) also samples q/k/v. "
            "The softmax output stays exact (fp32) in all WTA-CRS rows but the Mesa ones.", "",
            "| configuration | linear | activation | norm | dropout | attention | other | saved MiB/sample | "
            f"batch {T5_BATCH} peak GiB (computed) | full / this | tracked step peak MiB (batch 1) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    base_model, make = build_t5(quick)
    full_peak = None
    for label, use_lora, method, options in T5_CONFIGS:
        model = lora(base_model) if use_lora else base_model
        step = make(model, 1, torch.device("cpu"))
        with compressed(model, method, **options):
            kinds = saved_by_kind(model, step)
            tracked = tracked_step_peak(model, step)[0] if track else None
        per_sample = sum(kinds.values())
        peak = static_bytes(model) + T5_BATCH * per_sample
        full_peak = peak if full_peak is None else full_peak
        kinds_order = ("linear", "activation", "norm", "dropout", "attention", "other")
        cols = " | ".join(fmt(kinds.get(k, 0)) for k in kinds_order)
        tracked_text = fmt(tracked) if tracked is not None else "-"
        out.append(
            f"| {label} | {cols} | {fmt(per_sample)} | {peak / GIB:.2f} | {full_peak / peak:.2f}x | {tracked_text} |"
        )
        print(out[-1], flush=True)
        if use_lora:
            base_model = model.unload()
        gc.collect()
    out.append("")


def s2a_section(quick: bool, out: list[str]) -> None:
    out += ["## S2A (4-bit derivative indices)", "",
            "bf16 models, one sample on CPU. 'nonlinearity' counts what GELU/SiLU modules save (bf16 input in "
            "the baseline, a 4-bit index with S2A); 'attention' counts softmax/matmul/dropout inside attention "
            "(softmax output 4-bit per row with S2A).", "",
            "| model | nonlinearity baseline KiB | S2A KiB | bf16 / S2A | attention baseline KiB | S2A KiB | ratio "
            "| total baseline MiB | S2A MiB |",
            "|---|---|---|---|---|---|---|---|---|"]
    models = (("BERT-base GELU (seq 128)", build_bert), ("Llama-style SiLU (h512, seq 256)", build_llama))
    for label, builder in models:
        model, make = builder(quick)
        model = model.to(torch.bfloat16)
        step = make(model, 1, torch.device("cpu"))
        base = saved_by_kind(model, step)
        with compressed(model, "s2a"):
            s2a = saved_by_kind(model, step)
        kib = 1 << 10
        act_base, act_s2a = base.get("activation", 0), s2a.get("activation", 0)
        att_base, att_s2a = base.get("attention", 0), s2a.get("attention", 0)
        out.append(
            f"| {label} | {fmt(act_base, kib)} | {fmt(act_s2a, kib)} | {act_base / max(act_s2a, 1):.2f}x | "
            f"{fmt(att_base, kib)} | {fmt(att_s2a, kib)} | {att_base / max(att_s2a, 1):.2f}x | "
            f"{fmt(sum(base.values()))} | {fmt(sum(s2a.values()))} |"
        )
        print(out[-1], flush=True)
        del model
        gc.collect()
    out.append("")


def cuda_section(out: list[str], quick: bool, device: torch.device = torch.device("cuda")) -> None:
    out += [f"## Paper settings measured on {torch.cuda.get_device_name()}", "",
            f"`torch.cuda.max_memory_allocated` over one AdamW step (after a warm-up step). T5-Base fp32, batch "
            f"{T5_BATCH}, source/target {T5_SOURCE}/{T5_TARGET}; ViT-B/16 batch {DEIT_BATCH} under bf16 autocast.", "",
            "| configuration | peak GiB | baseline / this |", "|---|---|---|"]
    base_model, make = build_t5(quick)
    base_model = base_model.to(device)
    full = None
    for label, use_lora, method, options in T5_CONFIGS:
        model = lora(base_model) if use_lora else base_model
        step = make(model, T5_BATCH, device)
        with compressed(model, method, **options):
            peak = cuda_step_peak(model, step)
        full = peak if full is None else full
        out.append(f"| T5-Base {label} | {peak / GIB:.2f} | {full / peak:.2f}x |")
        print(out[-1], flush=True)
        if use_lora:
            base_model = model.unload()
        torch.cuda.empty_cache()
    del base_model
    model, make = build_vit(quick)
    model = model.to(device)
    step = make(model, DEIT_BATCH, device)

    def amp_step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return step()

    base = None
    for label, method in (("ViT-B/16 AMP baseline", None), ("ViT-B/16 AMP Mesa", "mesa")):
        with compressed(model, method):
            peak = cuda_step_peak(model, amp_step)
        base = peak if base is None else base
        out.append(f"| {label} | {peak / GIB:.2f} | {base / peak:.2f}x |")
        print(out[-1], flush=True)
    out.append("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny configs, smoke run")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--no-track", action="store_true", help="skip the MemoryTracker step peaks (faster)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 is fastest on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lines = ["# Activation compressors: memory", "",
             "Produced by `python bench/activations.py" + (" --quick" if args.quick else "")
             + (f" --device {args.device}" if args.device != "cpu" else "") + "`.", ""]
    if args.device == "cuda":
        cuda_section(lines, args.quick)
    else:
        mesa_section(args.quick, lines)
        wta_section(args.quick, lines, track=not args.no_track)
        s2a_section(args.quick, lines)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
