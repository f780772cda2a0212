"""Activation compressors as recipe `activations` sections: Mesa, WTA-CRS, S2A (memft.activations).

Bit widths are the codecs' own (`memft.activations.mesa.MESA_BITS`, `memft.kernels.quant.SUPPORTED_BITS`), so a
recipe accepts exactly what the library stores.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from memft.activations.mesa import MESA_BITS
from memft.errors import RecipeError
from memft.kernels.quant import SUPPORTED_BITS
from memft.methods.registry import Method, Section, register


class NoActivationCompression(Section):
    name: Literal["none"] = Field("none", description="Store activations as autograd does.")


class MesaSection(Section):
    name: Literal["mesa"] = Field(..., description="Mesa (arXiv 2111.11124): tensors saved for backward stored "
                                  "in 8 bits with per-group scale and offset; forward is exact.")
    bits: Literal[MESA_BITS] = Field(8, description="Bits per stored value (8 as in the paper; 2 and 4 for "
                                   "experiments).")
    group_size: int = Field(64, ge=1, description="Channels sharing one scale and offset.")
    rounding: Literal["stochastic", "nearest"] = Field("stochastic", description="Rounding to the grid.")
    momentum: float = Field(0.9, ge=0, lt=1, description="EMA momentum of the tracked ranges.")


class WTACRSSection(Section):
    name: Literal["wta_crs"] = Field(..., description="WTA-CRS (arXiv 2305.15265): Linear weight gradients (and, "
                                     "with sample_attention, eager attention's two matmuls) estimated from k = ratio "
                                     "x rows sampled winner-take-all; unbiased, only sampled rows stored.")
    ratio: float = Field(0.3, gt=0, le=1, description="Fraction of rows kept (paper: 0.3).")
    sample_attention: bool = Field(True, description="Also sample the summed dimension of QK^T and AV per batch "
                                   "and head, as the paper's memory setting does (needs model.attn_implementation "
                                   "eager; SDPA saves no attention matrix).")
    min_rows: int = Field(10, ge=1, description="Never keep fewer rows than this (the reference's minimal_k).")
    others: Literal["none", "mesa", "s2a"] = Field("none", description="Compressor for the tensors WTA-CRS does "
                                                   "not sample (nonlinearities, norms, attention).")


class S2ASection(Section):
    name: Literal["s2a"] = Field(..., description="S2A (arXiv 2503.08154): nonlinearities store a 4-bit index "
                                 "into a fitted piecewise-constant derivative; softmax outputs in 4 bits.")
    bits: Literal[SUPPORTED_BITS] = Field(4, description="Bits for the derivative index of pointwise "
                                         "nonlinearities.")
    softmax_bits: Literal[SUPPORTED_BITS] = Field(4, description="Bits for softmax outputs.")
    norm_bits: Literal[SUPPORTED_BITS] = Field(8, description="Bits for LayerNorm/RMSNorm inputs.")


def _compress_activations(prepared, section, calibration=None) -> None:
    from memft.activations import compress_activations

    options = section.model_dump(exclude={"name"})
    if options.get("others") == "none":
        options["others"] = None
    try:
        handle = compress_activations(prepared.model, section.name, **options)
    except ValueError as exc:
        raise RecipeError(f"activations ({section.name}): {exc}") from exc
    prepared.undo.append(handle.undo)
    prepared.notes.append(f"activations: {section.name} on {len(handle.changes)} modules")


register(Method("activations", NoActivationCompression))
for _schema in (MesaSection, WTACRSSection, S2ASection):
    register(Method("activations", _schema, _compress_activations))
