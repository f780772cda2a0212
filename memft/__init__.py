"""memft: memory-efficient fine-tuning for PyTorch and Hugging Face models.

    from memft.optimizers import GaLoreAdamW, MeZO, galore_param_groups   # torch only
    from memft.kernels import linear_cross_entropy
    memft.patch_loss(model, "cut_cross_entropy")
    memft.compress_activations(model, "mesa", bits=8)
    with memft.memory.track(model, optimizer) as mem: ...
    memft.finetune(memft.load_recipe("recipe.yaml"))

Heavier pieces (transformers, peft) are imported on first use, so `memft.optimizers` needs only torch.
"""

__version__ = "0.1.0"

_LAZY = {
    "patch_loss": ("memft.losses", "patch_loss"),
    "compress_activations": ("memft.activations", "compress_activations"),
    "finetune": ("memft.train", "finetune"),
    "load_recipe": ("memft.train", "load_recipe"),
    "memory": ("memft.memory", None),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'memft' has no attribute {name!r}")
    import importlib

    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    return module if attribute is None else getattr(module, attribute)


__all__ = list(_LAZY)
