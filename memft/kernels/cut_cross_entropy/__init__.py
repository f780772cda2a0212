"""Cut cross-entropy (arXiv 2411.09009): linear classifier + cross-entropy without materialised logits.

- :func:`linear_cross_entropy` — ``(hidden[N, D], weight[V, D], labels[N]) -> loss``.
- :func:`cut_cross_entropy_loss` — causal-LM form (label shift, HF ``num_items_in_batch``).
- :func:`count_backward_blocks` — count computed / filtered backward blocks (gradient filtering).
- :func:`workspace_bytes` — temporary memory inside the kernels, for memory estimates.
- :func:`token_statistics` — per-token entropy and top-1 agreement (metrics), block by block.

Implementations: chunked PyTorch (``torch_chunked``, any device) and Triton kernels
(``triton_kernels``, CUDA, imported lazily), both behind the ``torch.library`` ops of ``op``.
"""

from .causal_lm import cut_cross_entropy_loss
from .filtering import BlockCounter, count_backward_blocks, resolve_filter_eps
from .loss import linear_cross_entropy
from .op import resolve_impl, triton_available, workspace_bytes
from .statistics import token_statistics

__all__ = [
    "BlockCounter",
    "count_backward_blocks",
    "cut_cross_entropy_loss",
    "linear_cross_entropy",
    "resolve_filter_eps",
    "resolve_impl",
    "token_statistics",
    "triton_available",
    "workspace_bytes",
]
