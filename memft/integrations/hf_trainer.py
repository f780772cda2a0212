"""A Hugging Face ``Trainer`` that drives every memft optimizer: backprop, layer-wise and zeroth-order.

How ``transformers.Trainer`` runs one optimizer step (5.x): it fetches the accumulation window's micro-batches
with ``get_batch_samples``, calls ``training_step`` (forward + ``accelerator.backward``) on each, then clips,
calls ``optimizer.step()`` (accelerate's wrapper, which steps only on the window's last micro-batch), steps the
scheduler once and calls ``model.zero_grad()``. :class:`MemftTrainerMixin` hooks that loop per step kind
(see :class:`memft.train.builders.OptimizerPlan`):

- ``backprop``: unchanged.
- ``in_backward`` (:class:`memft.optimizers.layerwise.LayerwiseOptimizer`): ``set_micro_batch(index, total)``
  before every backward, from the window ``get_batch_samples`` fetched (a short last window of an epoch
  included); the Trainer's ``optimizer.step()`` finalises the step. Clipping happens inside the optimizer
  (``LayerwiseOptimizer(max_grad_norm=...)``), which must equal ``TrainingArguments.max_grad_norm`` (or the
  latter must be 0); ``grad_norm`` in the logs is the optimizer's ``last_grad_norm`` of the logging step.
- ``zeroth_order`` (:class:`memft.optimizers.mezo.MeZO`, arXiv 2305.17333): ``training_step`` runs no forward
  and no backward for the first micro-batches of a window; it keeps them, and on the last one runs
  ``MeZO.step(closure)`` once, with a closure summing the window's micro-batch losses (scaled exactly as the
  Trainer scales them for gradient accumulation), so every micro-batch sees the same perturbation z and the
  objective is the window's mean loss. The step itself is :func:`memft.train.step.zeroth_order_step`, the
  one ``memft finetune`` takes: forward passes in eval mode (no dropout) unless the optimizer came from a
  spec with ``optimizer.dropout: true``. The loss of the step (mean of l+ and l-) is
  returned on the last micro-batch and zero before it, so the Trainer's logged loss is the step's loss. The
  optimizer is wrapped in :class:`ForwardOnlyStep` so that the Trainer's own closure-less
  ``optimizer.step()`` after the window is a checked no-op; ``zero_grad`` finds no gradients; the scheduler
  steps once per window; no ``grad_norm`` is logged. With several processes the closure averages the
  objective over them (give every process the same MeZO seed).

Checkpoints need nothing extra: the Trainer saves ``optimizer.state_dict()`` to ``optimizer.pt`` and loads
it with ``torch.load(weights_only=True)``; memft optimizers' states are plain tensors and numbers (GaLore's
projectors, MeZO's seed generator), so ``resume_from_checkpoint`` continues the same trajectory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from accelerate.optimizer import AcceleratedOptimizer
from torch import nn
from transformers import Trainer

from memft.integrations.hf_memory import MemftCallback
from memft.losses.patch import serve_fused_lm_head
from memft.optimizers.mezo import MeZO
from memft.train.step import zeroth_order_step

__all__ = ["ForwardOnlyStep", "MemftTrainer", "MemftTrainerMixin", "optimizer_step_kind"]


def _unwrap(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The memft optimizer inside accelerate's and memft's wrappers."""
    while isinstance(optimizer, (AcceleratedOptimizer, ForwardOnlyStep)):
        optimizer = optimizer.optimizer
    return optimizer


def _forward_only(optimizer: torch.optim.Optimizer) -> ForwardOnlyStep | None:
    """The ForwardOnlyStep inside accelerate's wrapper, if the optimizer has one."""
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer if isinstance(optimizer, ForwardOnlyStep) else None


def optimizer_step_kind(optimizer: torch.optim.Optimizer) -> str:
    """``backprop``, ``zeroth_order`` or ``in_backward``: how a training loop must drive ``optimizer``.

    Read from ``memft_step_kind`` (set by :func:`memft.integrations.memft_optimizer`), else from the type:
    :class:`~memft.optimizers.mezo.MeZO` is zeroth-order, an optimizer with ``set_micro_batch`` steps in backward.
    """
    inner = _unwrap(optimizer)
    kind = getattr(inner, "memft_step_kind", None)
    if kind is not None:
        return kind
    if isinstance(inner, MeZO):
        return "zeroth_order"
    if callable(getattr(inner, "set_micro_batch", None)):
        return "in_backward"
    return "backprop"


class ForwardOnlyStep(torch.optim.Optimizer):
    """A zeroth-order optimizer as the Trainer sees it.

    ``run(closure)`` performs the real step (called by :class:`MemftTrainerMixin` at the end of an accumulation
    window); the closure-less ``step()`` the Trainer calls right after it does nothing, and raises if no step
    ran since the last one (the optimizer is then being driven by a loop that does not know it needs a
    closure). ``param_groups``, ``state``, ``state_dict`` and ``load_state_dict`` are the wrapped optimizer's,
    so schedulers, checkpoints and memory tracking see it unchanged.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:  # no super().__init__: a view, like accelerate's
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"ForwardOnlyStep wraps a torch.optim.Optimizer (e.g. MeZO), got "
                            f"{type(optimizer).__name__}.")
        self.optimizer = optimizer
        self._step_ran = False

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, state: Any) -> None:
        self.optimizer.state = state

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, defaults: dict[str, Any]) -> None:
        self.optimizer.defaults = defaults

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def run(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One zeroth-order step on ``closure`` (the forward-only objective); returns its loss."""
        loss = self.optimizer.step(closure)
        self._step_ran = True
        return loss

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        if closure is not None:
            return self.run(closure)
        if not self._step_ran:
            raise RuntimeError(
                f"{type(self.optimizer).__name__} is zeroth-order: its step needs a forward-only closure, and no step "
                "ran in this accumulation window. Train with memft.integrations.MemftTrainer (or MemftTrainerMixin), "
                "whose training_step runs the step; the Trainer's step() afterwards only confirms it.")
        self._step_ran = False
        return None


class MemftTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass (before it) so that it drives memft optimizers; see the
    module docstring. ``class MySFTTrainer(MemftTrainerMixin, SFTTrainer): ...``

    :class:`~memft.integrations.MemftCallback` instances among the callbacks are given the trainer, and their
    trackers are closed when ``train()`` ends, also by an exception.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        serve_fused_lm_head(self.model)  # TRL's SFTTrainer replaced the forward; cut cross-entropy serves its head
        self._window_size: int | None = None  # micro-batches in the current accumulation window
        self._window_index = 0
        self._window_batches: list[dict[str, Any]] = []

    # ----------------------------------------------------------------------------------- the loop
    def train(self, *args: Any, **kwargs: Any) -> Any:
        callbacks = [cb for cb in self.callback_handler.callbacks if isinstance(cb, MemftCallback)]
        for callback in callbacks:
            if callback.trainer is None:
                callback.attach(self)
        try:
            return super().train(*args, **kwargs)
        finally:
            for callback in callbacks:
                callback.close()

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._window_size = len(batch_samples) or None
        self._window_index = 0
        self._window_batches = []
        return batch_samples, num_items_in_batch

    def _next_micro_batch(self) -> tuple[int, int]:
        """(index, total) of the micro-batch about to run; (0, 1) outside a window the loop fetched."""
        if self._window_size is None:
            return 0, 1
        index, total = self._window_index, self._window_size
        self._window_index += 1
        if self._window_index == total:
            self._window_size = None
        return index, total

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        kind = optimizer_step_kind(self.optimizer)
        index, total = self._next_micro_batch()
        if kind == "zeroth_order":
            return self._forward_only_step(model, inputs, num_items_in_batch, index, total)
        if kind == "in_backward":
            _unwrap(self.optimizer).set_micro_batch(index, total)
        return super().training_step(model, inputs, num_items_in_batch)

    def _forward_only_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any,
                           index: int, total: int) -> torch.Tensor:
        self._window_batches.append(self._prepare_inputs(inputs))
        if index < total - 1:
            return torch.zeros((), device=self.args.device)
        batches, self._window_batches = self._window_batches, []

        def objective() -> torch.Tensor:
            total = sum(self._micro_batch_objective(model, batch, num_items_in_batch) for batch in batches)
            if self.accelerator.num_processes > 1:
                total = self.accelerator.reduce(total, "mean")
            return total

        optimizer = _forward_only(self.optimizer)
        if optimizer is None:
            raise RuntimeError("The zeroth-order optimizer is not wrapped in ForwardOnlyStep: it was set after "
                               "create_optimizer ran. Pass it through Trainer(optimizers=...) or "
                               "optimizer_cls_and_kwargs so that create_optimizer sees it.")
        dropout = bool(getattr(optimizer.optimizer, "memft_forward_dropout", False))
        loss = zeroth_order_step(model, optimizer, objective, dropout)
        return torch.as_tensor(loss, dtype=torch.float32).detach().to(self.args.device)

    def _micro_batch_objective(self, model: nn.Module, batch: dict[str, Any], num_items_in_batch: Any) -> torch.Tensor:
        """The micro-batch's loss, scaled for gradient accumulation as ``Trainer.training_step`` scales it."""
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, dict(batch), num_items_in_batch=num_items_in_batch)  # it may pop labels
        if self.args.n_gpu > 1:
            loss = loss.mean()
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
                self.compute_loss_func is not None
        return loss if scaled else loss / self.current_gradient_accumulation_steps

    # ------------------------------------------------------------------------------ optimizer
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        kind = optimizer_step_kind(optimizer)
        if kind == "zeroth_order" and _forward_only(optimizer) is None:
            if self.args.fp16:
                raise ValueError("A zeroth-order optimizer runs no backward, so TrainingArguments(fp16=True) has no "
                                 "gradients to scale; use bf16=True, or load the model in float16 without fp16.")
            optimizer = self.optimizer = ForwardOnlyStep(optimizer)
        elif kind == "in_backward":
            self._check_in_backward(_unwrap(optimizer))
        return optimizer

    def _check_in_backward(self, optimizer: torch.optim.Optimizer) -> None:
        if self.args.world_size > 1:
            raise ValueError(f"{type(optimizer).__name__} updates parameters inside backward, before DDP/FSDP could "
                             "reduce their gradients; train it in one process, or use the optimizer without layerwise.")
        trainer_norm = self.args.max_grad_norm or 0.0
        own_norm = getattr(optimizer, "max_grad_norm", None)
        if trainer_norm > 0 and own_norm != trainer_norm:
            raise ValueError(
                f"TrainingArguments.max_grad_norm={trainer_norm} cannot clip gradients that {type(optimizer).__name__} "
                f"consumes inside backward, and the optimizer clips with max_grad_norm={own_norm}. Build it with "
                f"max_grad_norm={trainer_norm} (LayerwiseOptimizer(..., max_grad_norm={trainer_norm})), or set "
                "TrainingArguments(max_grad_norm=0) to keep the optimizer's own setting.")

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        """The Trainer's gradient norm, measured on ``.grad`` before ``optimizer.step()``: none for zeroth-order
        and in-backward steps (no ``.grad`` exists; :meth:`log` reports the layer-wise optimizer's own norm)."""
        if optimizer_step_kind(self.optimizer) != "backprop":
            return None
        return super()._get_grad_norm(model, grad_norm)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Training logs of a layer-wise optimizer that clips get its norm of the last step as ``grad_norm``."""
        if "loss" in logs and self.optimizer is not None and optimizer_step_kind(self.optimizer) == "in_backward":
            norm = getattr(_unwrap(self.optimizer), "last_grad_norm", None)
            if norm is not None:
                logs["grad_norm"] = float(norm)
        super().log(logs, *args, **kwargs)


class MemftTrainer(MemftTrainerMixin, Trainer):
    """``transformers.Trainer`` that also drives layer-wise (GaLore in backward) and zeroth-order (MeZO)
    optimizers; for backprop optimizers it is the plain Trainer. See the module docstring."""
