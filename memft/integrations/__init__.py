"""Integrations with other training stacks: the Hugging Face ``Trainer``.

- :func:`apply_memft`: adapters, loss patches and activation compressors from a recipe-like spec.
- :func:`memft_optimizer` / :func:`memft_optimizer_cls_and_kwargs`: memft optimizers for ``Trainer(optimizers=...)``
  or ``Trainer(optimizer_cls_and_kwargs=...)``.
- :class:`MemftTrainer` / :class:`MemftTrainerMixin`: a Trainer that also drives layer-wise and zeroth-order steps.
- :class:`MemftCallback`: memft's memory breakdown and CUDA peaks in the Trainer's logs.
"""

from memft.integrations.hf_memory import MemftCallback
from memft.integrations.hf_methods import (
    MemftHandle,
    MemftOptimizerFactory,
    apply_memft,
    memft_optimizer,
    memft_optimizer_cls_and_kwargs,
)
from memft.integrations.hf_trainer import ForwardOnlyStep, MemftTrainer, MemftTrainerMixin, optimizer_step_kind

__all__ = [
    "ForwardOnlyStep",
    "MemftCallback",
    "MemftHandle",
    "MemftOptimizerFactory",
    "MemftTrainer",
    "MemftTrainerMixin",
    "apply_memft",
    "memft_optimizer",
    "memft_optimizer_cls_and_kwargs",
    "optimizer_step_kind",
]
