"""Optimizer methods: AdamW, 8-bit AdamW, SGD, MeZO and the GaLore family, as recipe `optimizer` sections.

Each registration holds the section's schema, the builder (`build(model, section, recipe)` returns the
optimizer), the step kind it needs (memft.train.step) and what it cannot compose with.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from memft.errors import RecipeError
from memft.methods.registry import Method, Section, Variant, register

GALORE = ("galore_adamw", "galore_adamw8bit", "galore_adafactor", "natural_galore_adamw")

_LAYERWISE = ("steps each parameter inside backward, before the engine has reduced its gradient across "
              "processes (and FSDP/ZeRO hold only a shard of it); use optimizer.layerwise false")
_GALORE_ZERO = ("projects weight matrices, but ZeRO flattens the parameters of a group into 1-D partitions "
                "before the optimizer sees them; use engine ddp")
_MEZO_FSDP = ("draws one perturbation per whole parameter from a shared seed and needs no gradients, so "
              "sharding buys nothing over its inference-level memory; use engine ddp (one scalar all-reduce "
              "per step)")
_MEZO_ZERO = ("never calls backward, which DeepSpeed's engine is built around; use engine ddp (one scalar "
              "all-reduce per step, no gradient traffic)")
_BNB_FSDP = ("keeps its 8-bit state in bitsandbytes, which updates plain tensors and not FSDP2's DTensor "
             "shards; use optimizer adamw, or engine ddp or deepspeed")


# ------------------------------------------------------------------------------------------- schemas
class _OptimizerCommon(Section):
    lr: float = Field(1e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")


class _AdamKnobs(_OptimizerCommon):
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam moment coefficients.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")


class AdamWSection(_AdamKnobs):
    name: Literal["adamw"] = Field("adamw", description="torch.optim.AdamW.")


class AdamW8bitSection(_AdamKnobs):
    name: Literal["adamw8bit"] = Field(..., description="bitsandbytes block-wise 8-bit AdamW.")


class SGDSection(_OptimizerCommon):
    name: Literal["sgd"] = Field(..., description="torch.optim.SGD.")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum.")


class _GaLoreKnobs(Section):
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (before the update, as torch "
                                "AdamW), on matrices only.")
    rank: int = Field(128, ge=1, description="Rank r of the gradient subspace (paper: 128 for 1B, 1024 for 7B).")
    update_proj_gap: int = Field(200, ge=1, description="Steps between subspace refreshes (T).")
    scale: float = Field(0.25, gt=0, description="Scale α of the projected-back update.")
    proj_type: Literal["std", "reverse_std", "left", "right", "full"] = Field(
        "std", description="Which side is projected: 'std' the smaller one, 'full' both (r x r).")
    svd: Literal["exact", "randomized"] = Field("exact", description="Subspace from an exact SVD, or a "
                                                "randomized range finder (much cheaper on large matrices).")
    moments_on_refresh: Literal["keep", "reproject"] = Field(
        "keep", description="Moments when the subspace changes: kept as is (reference behaviour) or mapped "
        "into the new basis.")
    target_modules: list[str] | None = Field(None, description="Linear layers optimised in low rank: those "
                                             "whose last name component contains one of these strings ('proj' "
                                             "matches q_proj and down_proj); default the attention and MLP "
                                             "projections of common architectures. The rest (embeddings, norms, "
                                             "head) get plain updates.")
    layerwise: bool = Field(False, description="Step each parameter inside backward and free its gradient at "
                            "once (full gradients never coexist); accumulation happens in the low-rank space.")
    module_ranks: dict[str, int] = Field(default_factory=dict, description="Rank per target module, for layers "
                                         "whose last name component contains the key (e.g. {lm_head: 256}); the "
                                         "others use optimizer.rank.")

    @model_validator(mode="after")
    def _ranks_positive(self):
        bad = {k: v for k, v in self.module_ranks.items() if v < 1}
        if bad:
            raise ValueError(f"module_ranks must be >= 1, got {bad}")
        return self


class GaLoreAdamWSection(_GaLoreKnobs):
    name: Literal["galore_adamw"] = Field(..., description="GaLore AdamW (arXiv 2403.03507).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam moment coefficients.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")


class GaLoreAdamW8bitSection(GaLoreAdamWSection):
    name: Literal["galore_adamw8bit"] = Field(..., description="GaLore AdamW with block-wise 8-bit moments.")


class GaLoreAdafactorSection(_GaLoreKnobs):
    name: Literal["galore_adafactor"] = Field(..., description="GaLore with Adafactor's factored second moment "
                                              "(external lr schedule, relative_step off).")
    beta1: float | None = Field(None, ge=0, lt=1, description="First-moment coefficient; null keeps none.")


class NaturalGaLoreAdamWSection(GaLoreAdamWSection):
    name: Literal["natural_galore_adamw"] = Field(..., description="Natural GaLore (arXiv 2410.16029): low-rank "
                                                  "gradients preconditioned by the inverse empirical Fisher.")
    history_size: int = Field(20, ge=1, description="Low-rank gradients kept for the Fisher estimate (s).")
    damping: float = Field(1e-3, gt=0, description="Fisher damping λ.")
    history_on_refresh: Literal["clear", "keep"] = Field("clear", description="Gradient history when the "
                                                         "subspace changes (old gradients live in another basis).")


class MeZOSection(_OptimizerCommon):
    name: Literal["mezo"] = Field(..., description="MeZO zeroth-order SGD (arXiv 2305.17333): two forward "
                                  "passes per step, no backward, training memory = inference memory.")
    lr: float = Field(1e-6, gt=0, description="Learning rate (paper: 1e-6..1e-7 full, 1e-4..5e-5 LoRA).")
    eps: float = Field(1e-3, gt=0, description="Perturbation scale ε (paper: 1e-3 full, 1e-2 LoRA).")
    n_samples: int = Field(1, ge=1, description="SPSA estimates averaged per step (n-SPSA).")
    dropout: bool = Field(False, description="Keep dropout active in the forward passes (the paper uses eval "
                          "mode; with dropout ℓ₊ and ℓ₋ see different masks).")


# ------------------------------------------------------------------------------------------ builders
def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RecipeError("The model has no trainable parameters (check adapter.target_modules).")
    return params


def _decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not biases or norm scales), the usual convention for LMs."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    trainable_parameters(model)
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def _adamw(model, s, recipe) -> torch.optim.Optimizer:
    return torch.optim.AdamW(_decay_groups(model, s.weight_decay), lr=s.lr, betas=s.betas, eps=s.eps)


def _adamw8bit(model, s, recipe) -> torch.optim.Optimizer:
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise RecipeError("optimizer.name adamw8bit needs bitsandbytes: pip install 'memft[bnb]'.") from exc
    return bnb.optim.AdamW8bit(_decay_groups(model, s.weight_decay), lr=s.lr, betas=s.betas, eps=s.eps)


def _sgd(model, s, recipe) -> torch.optim.Optimizer:
    return torch.optim.SGD(_decay_groups(model, s.weight_decay), lr=s.lr, momentum=s.momentum)


def _mezo(model, s, recipe) -> torch.optim.Optimizer:
    from memft.optimizers.mezo import MeZO

    return MeZO(trainable_parameters(model), lr=s.lr, eps=s.eps, weight_decay=s.weight_decay, n_samples=s.n_samples)


def _galore(model, s, recipe) -> torch.optim.Optimizer:
    """GaLore family: low-rank groups for the target projections, plain updates for the rest."""
    from memft.optimizers.galore import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, galore_param_groups
    from memft.optimizers.layerwise import LayerwiseOptimizer
    from memft.optimizers.natural_galore import NaturalGaLoreAdamW

    trainable_parameters(model)
    try:
        groups = galore_param_groups(model, target_modules=s.target_modules, rank=s.rank,
                                     update_proj_gap=s.update_proj_gap, scale=s.scale, proj_type=s.proj_type,
                                     svd=s.svd, weight_decay=s.weight_decay, module_ranks=s.module_ranks)
    except ValueError as exc:
        key = "optimizer.module_ranks" if "module_ranks" in str(exc) else "optimizer.target_modules"
        raise RecipeError(f"{key}: {exc}") from exc
    plain = [p for g in groups if "rank" not in g for p in g["params"]]
    groups = [g for g in groups if "rank" in g] + [  # decay on matrices only, as for the other optimizers
        {"params": [p for p in plain if p.ndim >= 2], "weight_decay": s.weight_decay},
        {"params": [p for p in plain if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if s.name == "galore_adafactor":
        cls, kwargs = GaLoreAdafactor, {"lr": s.lr, "relative_step": False, "scale_parameter": False,
                                        "beta1": s.beta1, "weight_decay": s.weight_decay}
    else:
        cls = {"galore_adamw": GaLoreAdamW, "galore_adamw8bit": GaLoreAdamW8bit,
               "natural_galore_adamw": NaturalGaLoreAdamW}[s.name]
        kwargs = {"lr": s.lr, "betas": s.betas, "eps": s.eps, "weight_decay": s.weight_decay}
        if s.name == "natural_galore_adamw":
            kwargs.update(history_size=s.history_size, damping=s.damping, history_on_refresh=s.history_on_refresh)
    kwargs["moments_on_refresh"] = s.moments_on_refresh
    if s.layerwise:
        optimizer = LayerwiseOptimizer(groups, cls, max_grad_norm=recipe.train.max_grad_norm, **kwargs)
        optimizer.watch_embeddings(model)  # clipping learns the embedding's norm before its full gradient exists
        return optimizer
    return cls(groups, **kwargs)


# ------------------------------------------------------------------------------------- registrations
def _mezo_refuses(recipe) -> list[str]:
    problems = []
    if recipe.train.mixed_precision == "fp16":
        problems.append("optimizer mezo runs no backward, so fp16 gradient scaling has nothing to scale; use "
                        "train.mixed_precision 'no' or 'bf16', or load the model in float16/bfloat16")
    if recipe.model.gradient_checkpointing:
        problems.append("optimizer mezo runs no backward: model.gradient_checkpointing would only slow it down")
    return problems


def _galore_refuses(recipe) -> list[str]:
    if recipe.optimizer.layerwise and recipe.train.mixed_precision == "fp16":
        return ["optimizer.layerwise steps inside backward, before fp16 gradient scaling could unscale and check "
                "the gradients; use bfloat16 or float32"]
    return []


def _bnb_not_estimable(section) -> str:
    return ("optimizer.name adamw8bit cannot be estimated: bitsandbytes' 8-bit AdamW reads its state's values on "
            "the host, which fake tensors do not have. Its state is 2 bytes per parameter and a 4-byte scale per 256 "
            "(8 bytes per parameter for tensors under 4096 elements); estimate optimizer.name=adamw and replace its "
            "8 bytes of state per parameter by that, or train adamw8bit and read its measured peak in the run's "
            "memory.json.")


LAYERWISE = Variant("optimizer.layerwise", ("optimizer.name=galore_adamw", "optimizer.layerwise=true"),
                    lambda s: bool(getattr(s, "layerwise", False)),
                    {engine: _LAYERWISE for engine in ("ddp", "fsdp", "deepspeed")})

register(Method("optimizer", AdamWSection, _adamw))
register(Method("optimizer", AdamW8bitSection, _adamw8bit, engines={"fsdp": _BNB_FSDP},
                not_estimable=_bnb_not_estimable))
register(Method("optimizer", SGDSection, _sgd))
register(Method("optimizer", MeZOSection, _mezo, step_kind=lambda s: "zeroth_order", refuses=_mezo_refuses,
                engines={"fsdp": _MEZO_FSDP, "deepspeed": _MEZO_ZERO}))
for _schema in (GaLoreAdamWSection, GaLoreAdamW8bitSection, GaLoreAdafactorSection, NaturalGaLoreAdamWSection):
    register(Method("optimizer", _schema, _galore, step_kind=lambda s: "in_backward" if s.layerwise else "backprop",
                    refuses=_galore_refuses, engines={"deepspeed": _GALORE_ZERO}, variants=(LAYERWISE,)))
