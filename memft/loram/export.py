"""Export a LoRAM adapter for the full model (arXiv 2502.13533, "infer large"): recovered adapter and merged model."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from .plan import PLAN_JSON, PruningPlan
from .recovery import ADAPTER_WEIGHTS, recover, save_recovered_adapter

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)


@dataclass(frozen=True)
class RecoveredExport:
    """Where :func:`export_recovered` wrote: a PEFT adapter for the full model, and the merged model (if asked)."""

    adapter_dir: Path
    merged_dir: Path | None


def _load_lora_config(adapter_dir: Path):
    from peft import LoraConfig, PeftType

    if not (adapter_dir / "adapter_config.json").is_file() or not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise ValueError(
            f"{adapter_dir} is not a PEFT adapter directory with adapter_config.json and {ADAPTER_WEIGHTS}; pass the "
            "directory written by PeftModel.save_pretrained (or memft.loram.save_loram_adapter) after training."
        )
    config = LoraConfig.from_pretrained(str(adapter_dir))
    if config.peft_type != PeftType.LORA:
        raise ValueError(f"{adapter_dir} holds a {config.peft_type} adapter; LoRAM recovery needs a LoRA adapter.")
    return config


def _resolve_plan(plan: PruningPlan | str | Path | None, adapter_dir: Path) -> PruningPlan:
    if isinstance(plan, PruningPlan):
        return plan
    if plan is None:
        if not (adapter_dir / PLAN_JSON).is_file():
            raise ValueError(
                f"plan=None but {adapter_dir} holds no {PLAN_JSON}; pass the PruningPlan (or its directory) that the "
                "adapter was trained with."
            )
        return PruningPlan.load(adapter_dir)
    return PruningPlan.load(plan)


def export_recovered(
    full_model_path: str | Path,
    adapter_dir: str | Path,
    plan: PruningPlan | str | Path | None,
    out_dir: str | Path,
    merge: bool = True,
    dtype: torch.dtype | str = "auto",
) -> RecoveredExport:
    """Recover the pruned-model adapter in ``adapter_dir`` for the full model at ``full_model_path``.

    Writes ``out_dir/adapter`` (PEFT adapter loadable with ``PeftModel.from_pretrained(full_model, ...)``) and, when
    ``merge``, ``out_dir/merged``: the full model with ``ΔW`` merged, loadable with
    ``AutoModelForCausalLM.from_pretrained`` (tokenizer files next to the full checkpoint are copied along).
    ``plan``: a PruningPlan, a directory holding one, or None to read it from ``adapter_dir``. ``dtype``: the
    dtype the full model is loaded and merged in.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    adapter_dir, out_dir, full_model_path = Path(adapter_dir), Path(out_dir), Path(full_model_path)
    lora_config = _load_lora_config(adapter_dir)
    plan = _resolve_plan(plan, adapter_dir)
    state = recover(load_file(str(adapter_dir / ADAPTER_WEIGHTS)), plan, AutoConfig.from_pretrained(full_model_path))
    recovered_dir = save_recovered_adapter(state, lora_config, out_dir / "adapter", str(full_model_path))
    if not merge:
        return RecoveredExport(recovered_dir, None)

    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(full_model_path, dtype=dtype)
    merged = PeftModel.from_pretrained(model, str(recovered_dir)).merge_and_unload()
    merged_dir = out_dir / "merged"
    merged.save_pretrained(merged_dir)
    for name in TOKENIZER_FILES:
        if (full_model_path / name).is_file():
            shutil.copy2(full_model_path / name, merged_dir / name)
    return RecoveredExport(recovered_dir, merged_dir)
