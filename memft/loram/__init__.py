"""LoRAM (arXiv 2502.13533): train LoRA on a structurally pruned (optionally NF4-quantised) model, recover the
adapter to the full model's shapes, merge it for inference.

    peft_model, plan = prepare_loram(model, prune_ratio=0.85, prune_method="magnitude", quantize="nf4")
    ...train peft_model...
    save_loram_adapter(peft_model, plan, "runs/x/adapter")
    export_recovered("path/to/full-model", "runs/x/adapter", None, "runs/x/export")
"""

from .export import RecoveredExport, export_recovered
from .plan import ModelDims, PruningPlan, kept_count, plan_from_counts, resolve_dense_layers
from .prepare import DEFAULT_TARGET_MODULES, prepare_loram, save_loram_adapter
from .prune import apply_plan, prune, select_plan
from .quantize import quantize_nf4
from .recovery import recover, save_recovered_adapter
from .scores import PRUNE_METHODS, unit_scores
from .storage import StorageReport, nf4_bytes, parameter_storage_bytes

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "ModelDims",
    "PRUNE_METHODS",
    "PruningPlan",
    "RecoveredExport",
    "StorageReport",
    "apply_plan",
    "export_recovered",
    "kept_count",
    "nf4_bytes",
    "parameter_storage_bytes",
    "plan_from_counts",
    "prepare_loram",
    "prune",
    "quantize_nf4",
    "recover",
    "resolve_dense_layers",
    "save_loram_adapter",
    "save_recovered_adapter",
    "select_plan",
    "unit_scores",
]
