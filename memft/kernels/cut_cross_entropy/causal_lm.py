"""Causal-LM loss from final hidden states and the ``lm_head`` weight (cut cross-entropy, arXiv 2411.09009).

Matches Hugging Face's ``ForCausalLMLoss``: labels are shifted left by one (the last position gets
``ignore_index``), and with ``num_items_in_batch`` (gradient accumulation) the summed loss is divided by
it instead of by the count of non-ignored tokens.  Unlike HF, a batch whose labels are all ignored gives
0, not NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .loss import linear_cross_entropy


def cut_cross_entropy_loss(
    hidden_states: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    shift: bool = True,
    num_items_in_batch: Tensor | int | None = None,
    softcap: float | None = None,
    *,
    ignore_index: int = -100,
    lm_head_bias: Tensor | None = None,
    shift_labels: Tensor | None = None,
    impl: str = "auto",
    filter_eps: float | str | None = "auto",
) -> Tensor:
    """Mean next-token cross-entropy of ``hidden_states @ lm_head_weight.T`` without the logits.

    Args:
        hidden_states: [B, T, D] (or [T, D]) final hidden states, after the final norm.
        lm_head_weight: [V, D].
        labels: [B, T] (or [T]) token ids; position t is predicted from hidden state t - 1 when
            ``shift`` is True (HF convention: pass ``labels = input_ids``).
        shift: shift labels left by one; False when labels are already aligned with hidden states.
        num_items_in_batch: divide the summed loss by this instead of the number of non-ignored
            tokens (HF Trainer passes it under gradient accumulation).
        softcap: final-logit softcap (Gemma 2: ``config.final_logit_softcapping``).
        ignore_index: label value excluded from the loss.
        lm_head_bias: optional [V] bias of the head.
        shift_labels: already-shifted labels [B, T] (HF's ``shift_labels`` kwarg); overrides
            ``labels``/``shift``.
        impl, filter_eps: see :func:`linear_cross_entropy`.

    Returns:
        Scalar float32 loss.
    """
    if shift_labels is not None:
        targets = shift_labels
    elif shift:
        targets = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    else:
        targets = labels
    return linear_cross_entropy(
        hidden_states,
        lm_head_weight,
        targets.to(hidden_states.device),
        bias=lm_head_bias,
        ignore_index=ignore_index,
        reduction="mean",
        softcap=softcap,
        normalizer=num_items_in_batch,
        impl=impl,
        filter_eps=filter_eps,
    )
