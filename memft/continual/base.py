"""The lifecycle a continual-learning method follows inside `memft.continual.harness.run_task_sequence`.

    model = method.attach(model)            wrap the model once (adapters, experts)
    for each task t:
        method.begin_task(t)                e.g. MoRA freezes the last task's experts and adds new ones
        repeat steps:
            loss = method.training_loss(batch); loss.backward(); optimizer.step(); method.after_step()
        method.end_task(t)
        with method.evaluating(): ...       e.g. I-LoRA evaluates its slow adapter

`state_dict()` holds everything needed to continue the sequence (plain tensors, numbers, strings, lists,
dicts: it round-trips through torch.save / torch.load(weights_only=True) and through
memft.continual.serialization); `parameter_bytes()` reports the method's memory so reports show growth.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

# Linear layers of Llama-family decoder blocks (also Mistral, Qwen2, Gemma).
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ContinualMethod:
    """Base class: plain training of whatever `attach` leaves trainable."""

    name = "base"

    def __init__(self):
        self.model: nn.Module | None = None

    def attach(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def begin_task(self, index: int) -> None:
        """Called before training task `index` (0-based)."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self._attached().parameters() if p.requires_grad]

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss of one batch (input_ids, attention_mask, labels with -100 off the answer)."""
        return self._attached()(**batch).loss

    def after_step(self) -> None:
        """Called after each optimizer step."""

    def end_task(self, index: int) -> None:
        """Called after the last step of task `index`."""

    @contextmanager
    def evaluating(self) -> Iterator[nn.Module]:
        """The model to evaluate, in eval mode; training mode is restored afterwards."""
        model = self._attached()
        was_training = model.training
        model.eval()
        try:
            yield model
        finally:
            model.train(was_training)

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def parameter_bytes(self) -> dict[str, int]:
        raise NotImplementedError

    def _attached(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError(f"{type(self).__name__}: call attach(model) first.")
        return self.model
