"""Loss replacements for Hugging Face models.

- :func:`patch_loss` / :func:`unpatch_loss`: a causal LM computes its training loss with cut
  cross-entropy (arXiv 2411.09009), never materialising the [B, T, V] logits.
- :func:`cut_cross_entropy_loss`: the same loss for a custom training loop, from the final hidden
  states and ``lm_head.weight``.
"""

from memft.kernels.cut_cross_entropy import cut_cross_entropy_loss
from memft.losses.patch import (
    LOSSES,
    SUPPORTED_MODEL_TYPES,
    FusedHeadOutput,
    LossPatch,
    patch_loss,
    serve_fused_lm_head,
    unpatch_loss,
)

__all__ = ["LOSSES", "SUPPORTED_MODEL_TYPES", "FusedHeadOutput", "LossPatch", "cut_cross_entropy_loss", "patch_loss",
           "serve_fused_lm_head", "unpatch_loss"]
