"""Activation compressors: shrink what autograd saves for backward, per module, with bit-exact forward outputs.

``compress_activations(model, "mesa" | "wta_crs" | "s2a", **options)`` patches a model in place and returns a
:class:`CompressionHandle` (``.changes``, ``.undo()``). Methods: Mesa 8-bit storage (arXiv 2111.11124), WTA-CRS
sampled weight gradients (arXiv 2305.15265), S2A derivative-index storage and parametric modes (arXiv 2503.08154).
"""

from .patch import KINDS, METHODS, Change, CompressionHandle, compress_activations
from .s2a import ParametricHandle, apply_parametric

__all__ = [
    "KINDS",
    "METHODS",
    "Change",
    "CompressionHandle",
    "compress_activations",
    "ParametricHandle",
    "apply_parametric",
]
