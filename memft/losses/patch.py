"""Hugging Face causal-LM integration of cut cross-entropy (arXiv 2411.09009).

``patch_loss(model, "cut_cross_entropy")`` wraps the model's ``forward``.  When ``labels`` are given the
wrapper runs the decoder (``model.get_decoder()``, else the ``base_model_prefix`` attribute), takes the
final hidden states and computes the loss from them and ``lm_head.weight`` (and bias) with
:func:`memft.kernels.cut_cross_entropy.cut_cross_entropy_loss`: labels shifted as HF does,
``ignore_index``, ``num_items_in_batch`` (gradient accumulation) and ``shift_labels`` honoured, the final
logit softcap read from ``config.final_logit_softcapping``.  The [B, T, V] logits are never computed and
the output's ``logits`` is None.  Without labels the original forward runs unchanged.

The wrapper also serves TRL's fused-LM-head contract (``model(..., labels=..., fused_lm_head=True)``, which
``trl.SFTTrainer`` calls): it returns per-token ``log_probs`` (minus cut cross-entropy's per-token loss, with
gradient), ``entropy`` and ``is_top1`` (metrics, from one more block-by-block pass without gradient,
:func:`~memft.kernels.cut_cross_entropy.token_statistics`) and ``label_mask``. ``SFTTrainer`` replaces the
model's forward with its own fused head when it is built; :func:`serve_fused_lm_head` (called by
:class:`memft.integrations.MemftTrainerMixin`) puts memft's forward back on top. The decoder of a patched
model refuses to run for training (train mode, gradients on) outside the patched forward, so a loss path
that bypasses cut cross-entropy fails at its first step with the fix, instead of silently using memory
the run was not planned for.

The wrapper is generic over the families whose causal-LM forward is "decoder, lm_head, optional
softcap, loss"; the families verified against their unpatched forward are listed in
``SUPPORTED_MODEL_TYPES``.  A peft-wrapped model is patched on its underlying HF model (peft's tuner
calls that model's ``forward``).  A LoRA (or any peft tuner) layer on ``lm_head`` is refused, since the
loss reads ``lm_head.weight`` directly and would miss the adapter; ``modules_to_save=["lm_head"]`` works.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers.utils import ModelOutput

from memft.kernels.cut_cross_entropy import (
    cut_cross_entropy_loss,
    linear_cross_entropy,
    resolve_filter_eps,
    token_statistics,
)

LOSSES = ("cut_cross_entropy",)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt2")
_LOSS_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")
_PATCH_ATTR = "_memft_loss_patch"
_IN_PATCHED_FORWARD: contextvars.ContextVar[bool] = contextvars.ContextVar("memft_in_patched_forward", default=False)


@dataclass
class FusedHeadOutput(ModelOutput):
    """What a ``fused_lm_head=True`` call returns (TRL's fused-LM-head fields): per-token tensors of the
    shifted labels' shape [B, T-1] (or [B, T] with ``shift_labels``), zero where the label is ignored.
    ``loss``: summed token loss / ``num_items_in_batch`` (or the valid count)."""

    loss: Tensor | None = None
    log_probs: Tensor | None = None
    entropy: Tensor | None = None
    log_sum_sq_probs: Tensor | None = None
    mean_logits: Tensor | None = None
    is_top1: Tensor | None = None
    label_mask: Tensor | None = None
    aux_loss: Tensor | None = None


class LossPatch:
    """Handle returned by :func:`patch_loss`; ``undo()`` restores the original forward."""

    def __init__(self, model: nn.Module, loss: str, impl: str, filter_eps: float | str | None,
                 previous_forward: Callable[..., Any] | None) -> None:
        self.model = model
        self.loss = loss
        self.impl = impl
        self.filter_eps = filter_eps
        self.forward: Callable[..., Any] | None = None  # memft's forward, once installed
        self._previous_forward = previous_forward
        self._guard: Any = None
        self.active = True

    def undo(self) -> None:
        """Restore the forward the model had before patching (idempotent)."""
        if not self.active:
            return
        if self._previous_forward is None:
            del self.model.forward
        else:
            self.model.forward = self._previous_forward
        if self._guard is not None:
            self._guard.remove()
        delattr(self.model, _PATCH_ATTR)
        self.active = False

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return f"LossPatch({type(self.model).__name__}, loss={self.loss!r}, impl={self.impl!r}, {state})"


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside ``model`` (unwraps peft's PeftModel / tuner wrappers)."""
    inner = model
    while hasattr(inner, "get_base_model") and callable(inner.get_base_model):
        base = inner.get_base_model()
        if base is inner:
            break
        inner = base
    return inner


def _decoder(model: nn.Module) -> nn.Module:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(decoder, nn.Module) or decoder is model:
        raise ValueError(
            f"Cannot find the decoder of {type(model).__name__}: neither get_decoder() nor base_model_prefix "
            "gives a submodule. patch_loss supports causal LMs built as decoder + lm_head."
        )
    return decoder


def _is_peft_tuner_layer(module: nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return hasattr(module, "lora_A")
    return isinstance(module, BaseTunerLayer) or hasattr(module, "lora_A")


def _lm_head(model: nn.Module) -> nn.Module:
    """The output projection, checked: plain weight [V, D], no peft tuner layer."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head); patch_loss needs one.")
    if _is_peft_tuner_layer(head):
        raise ValueError(
            f"lm_head of {type(model).__name__} is a peft tuner layer ({type(head).__name__}, e.g. LoRA). Cut "
            "cross-entropy reads lm_head.weight directly and would ignore the adapter. Exclude lm_head from "
            "target_modules (train it fully with modules_to_save=['lm_head'] if needed) or do not patch the loss."
        )
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError(
            f"lm_head of {type(model).__name__} ({type(head).__name__}) must hold a floating-point [V, D] weight; "
            "quantized or sharded heads are not supported by cut cross-entropy. Keep lm_head in bf16/fp32."
        )
    return head


def _output_class(forward: Callable[..., Any]) -> type:
    """The ModelOutput class the causal-LM forward returns (from its annotation)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.utils import ModelOutput

    try:
        annotation = typing.get_type_hints(forward).get("return")
    except Exception:  # unresolvable forward references: fall back to the common output class
        annotation = None
    if isinstance(annotation, type) and issubclass(annotation, ModelOutput):
        return annotation
    return CausalLMOutputWithPast


def _slice_positions(hidden: Tensor, logits_to_keep: int | Tensor) -> Tensor:
    """Keep the positions the original forward would project (HF's ``logits_to_keep``)."""
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:, :]
    return hidden[:, logits_to_keep, :]


def _make_forward(
    model: nn.Module, original: Callable[..., Any], impl: str, filter_eps: float | str | None
) -> Callable[..., Any]:
    signature = inspect.signature(original)
    var_keyword = next((n for n, p in signature.parameters.items() if p.kind is p.VAR_KEYWORD), None)
    output_class = _output_class(original)
    output_fields = set(output_class.__dataclass_fields__) - {"loss", "logits"}

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        token = _IN_PATCHED_FORWARD.set(True)
        try:
            return patched(*args, **kwargs)
        finally:
            _IN_PATCHED_FORWARD.reset(token)

    def patched(*args: Any, fused_lm_head: bool = False, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        arguments = dict(bound.arguments)
        extra = dict(arguments.pop(var_keyword, {})) if var_keyword else {}
        labels = arguments.pop("labels", None)
        if labels is None:
            if fused_lm_head:
                raise ValueError("fused_lm_head=True needs labels: the fused LM head scores the next-token labels.")
            return original(*args, **kwargs)

        logits_to_keep = arguments.pop("logits_to_keep", 0)
        return_dict = arguments.pop("return_dict", extra.pop("return_dict", None))
        loss_kwargs = {name: extra.pop(name) for name in _LOSS_KWARGS if name in extra}
        decoder = _decoder(model)
        decoder_kwargs = _decoder_kwargs(decoder, {**arguments, **extra})
        if fused_lm_head:
            decoder_kwargs["use_cache"] = False
        outputs = decoder(**decoder_kwargs, return_dict=True)
        head = _lm_head(model)
        if fused_lm_head:
            return _fused_head(model, outputs[0], head, labels, loss_kwargs, impl, filter_eps)
        hidden = _slice_positions(outputs[0], logits_to_keep)
        loss = cut_cross_entropy_loss(
            hidden,
            head.weight,
            labels,
            num_items_in_batch=loss_kwargs.get("num_items_in_batch"),
            softcap=getattr(model.config, "final_logit_softcapping", None),
            ignore_index=loss_kwargs.get("ignore_index", -100),
            lm_head_bias=getattr(head, "bias", None),
            shift_labels=loss_kwargs.get("shift_labels"),
            impl=impl,
            filter_eps=filter_eps,
        )
        result = output_class(loss=loss, logits=None, **{k: v for k, v in outputs.items() if k in output_fields})
        if return_dict is None:
            return_dict = getattr(model.config, "return_dict", True)
        return result if return_dict else result.to_tuple()

    return forward


def _fused_head(model: nn.Module, hidden: Tensor, head: nn.Module, labels: Tensor, loss_kwargs: dict[str, Any],
                impl: str, filter_eps: float | str | None) -> FusedHeadOutput:
    """TRL's fused-LM-head outputs from the decoder's last hidden state [B, T, D], by cut cross-entropy."""
    ignore_index = loss_kwargs.get("ignore_index", -100)
    shift_labels = loss_kwargs.get("shift_labels")
    if shift_labels is None:
        hidden, targets = hidden[:, :-1], labels[:, 1:]
    else:
        targets = shift_labels
    targets = targets.to(hidden.device)
    mask = targets != ignore_index
    softcap = getattr(model.config, "final_logit_softcapping", None)
    bias = getattr(head, "bias", None)
    token_loss = linear_cross_entropy(hidden, head.weight, targets, bias=bias, ignore_index=ignore_index,
                                      reduction="none", softcap=softcap, impl=impl, filter_eps=filter_eps)
    entropy = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    is_top1 = torch.zeros(mask.shape, dtype=torch.bool, device=hidden.device)
    entropy[mask], is_top1[mask] = token_statistics(hidden[mask], head.weight, targets[mask], bias, softcap)
    num_items = loss_kwargs.get("num_items_in_batch")
    normaliser = mask.sum().clamp(min=1) if num_items is None else num_items
    return FusedHeadOutput(loss=token_loss.sum() / normaliser, log_probs=-token_loss, entropy=entropy,
                           is_top1=is_top1, label_mask=mask)


def _decoder_kwargs(decoder: nn.Module, arguments: dict[str, Any]) -> dict[str, Any]:
    """Arguments the decoder accepts; None-valued ones it does not know are dropped, others refused."""
    parameters = inspect.signature(decoder.forward).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    kwargs = {}
    for name, value in arguments.items():
        if name in parameters or takes_any:
            kwargs[name] = value
        elif value is not None:
            raise TypeError(
                f"{type(decoder).__name__}.forward does not take {name!r}, which the patched causal-LM forward "
                "received. Call unpatch_loss(model) for this model or drop the argument."
            )
    return kwargs


def patch_loss(
    model: nn.Module,
    loss: str = "cut_cross_entropy",
    impl: str = "auto",
    *,
    filter_eps: float | str | None = "auto",
) -> LossPatch:
    """Make a HF causal LM (optionally peft-wrapped) compute its training loss without logits.

    Args:
        model: a transformers causal LM of a family in ``SUPPORTED_MODEL_TYPES``, or a peft model
            wrapping one.
        loss: ``"cut_cross_entropy"``.
        impl: ``"auto"``, ``"torch"`` or ``"triton"`` (see ``linear_cross_entropy``).
        filter_eps: gradient filtering threshold (see ``linear_cross_entropy``).

    Returns:
        A :class:`LossPatch`; ``handle.undo()`` or :func:`unpatch_loss` restores the model.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r} is not one of {LOSSES}.")
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl={impl!r} is not one of ('auto', 'torch', 'triton').")
    resolve_filter_eps(filter_eps, torch.bfloat16)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers causal LM), got {type(model).__name__}.")
    hf_model = _hf_model(model)
    model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"patch_loss supports model types {SUPPORTED_MODEL_TYPES}; {type(hf_model).__name__} has model_type "
            f"{model_type!r}. For another causal LM compute the loss yourself with cut_cross_entropy_loss("
            "hidden_states, lm_head.weight, labels) from the decoder's last hidden state."
        )
    if getattr(hf_model, _PATCH_ATTR, None) is not None:
        raise ValueError(f"{type(hf_model).__name__} is already patched; call unpatch_loss(model) before patching again.")
    decoder = _decoder(hf_model)
    _lm_head(hf_model)
    previous = hf_model.__dict__.get("forward")
    handle = LossPatch(hf_model, loss, impl, filter_eps, previous)
    hf_model.forward = handle.forward = _make_forward(hf_model, hf_model.forward, impl, filter_eps)
    handle._guard = decoder.register_forward_pre_hook(_refuse_bypass)
    setattr(hf_model, _PATCH_ATTR, handle)
    return handle


def _refuse_bypass(decoder: nn.Module, args: Any) -> None:
    """Forward pre-hook on a patched model's decoder: training through another loss path is refused."""
    if decoder.training and torch.is_grad_enabled() and not _IN_PATCHED_FORWARD.get():
        raise RuntimeError(
            "Cut cross-entropy is patched on this model, but its decoder is being trained through another loss "
            "path that skips the patched forward: the full logits would be materialised and the memory plan "
            "would not hold. This is what trl.SFTTrainer does with its own fused LM head. Train with memft's "
            "mixin, which makes TRL's fused head use cut cross-entropy: class MySFTTrainer(MemftTrainerMixin, "
            "SFTTrainer) from memft.integrations; or drop loss: {name: cut_cross_entropy} from the spec "
            "(memft.losses.unpatch_loss(model)).")


def serve_fused_lm_head(model: nn.Module) -> bool:
    """Put memft's patched forward back on top when another library (TRL's ``add_fused_lm_head``) replaced it
    after :func:`patch_loss`; the replaced forward is still called for what memft leaves to it (no labels).
    Returns True when the model has a loss patch (whether or not it had to be restored)."""
    hf_model = _hf_model(model)
    handle = getattr(hf_model, _PATCH_ATTR, None)
    if handle is None or not handle.active:
        return False
    if hf_model.__dict__.get("forward") is not handle.forward:
        hf_model.forward = handle.forward = _make_forward(hf_model, hf_model.forward, handle.impl, handle.filter_eps)
    return True


def unpatch_loss(model: nn.Module) -> None:
    """Undo :func:`patch_loss` on ``model`` (or the HF model inside a peft model)."""
    handle = getattr(_hf_model(model), _PATCH_ATTR, None)
    if handle is None:
        raise ValueError(f"{type(model).__name__} has no loss patch to undo.")
    handle.undo()
