"""Losses as recipe `loss` sections: the model's own cross-entropy, or cut cross-entropy (memft.losses)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from memft.errors import RecipeError
from memft.methods.registry import Method, Section, register


class CrossEntropySection(Section):
    name: Literal["cross_entropy"] = Field("cross_entropy", description="The model's own loss on full logits.")


class CutCrossEntropySection(Section):
    name: Literal["cut_cross_entropy"] = Field(..., description="Cut cross-entropy (arXiv 2411.09009): the loss "
                                               "from hidden states and the LM head block by block, never "
                                               "materialising the logits.")
    impl: Literal["auto", "torch", "triton"] = Field("auto", description="'auto': Triton kernels on CUDA, the "
                                                     "chunked torch path elsewhere.")


def _cut_cross_entropy(prepared, section, calibration=None) -> None:
    from memft.losses import patch_loss

    try:
        handle = patch_loss(prepared.model, "cut_cross_entropy", impl=section.impl)
    except ValueError as exc:
        raise RecipeError(f"loss (cut_cross_entropy): {exc}") from exc
    prepared.undo.append(handle.undo)


register(Method("loss", CrossEntropySection))
register(Method("loss", CutCrossEntropySection, _cut_cross_entropy))
