"""One optimizer step, written once: the training loop and the planner (`memft memory`, on fake tensors
and with --measure) both run `StepDriver.step`, so the estimate is of the very step a run takes.

A step consumes `train.grad_accum` micro-batches. The loss of a micro-batch is its token-loss sum divided by
the trainable tokens of the whole step on all processes (`num_items_in_batch`, as HF does), so the
accumulated gradient is exactly the gradient of the step's mean token loss. Forward passes run under
`torch.autocast` for `train.mixed_precision` bf16/fp16 when the engine leaves precision to the step (one
process, DDP); fp16 scales the loss with a `torch.amp.GradScaler`. How the optimizer is driven is the plan's
step kind (memft.train.builders.OptimizerPlan):

    backprop      forward + engine backward per micro-batch, then the engine clips and steps
    in_backward   layer-wise optimizers step each parameter inside backward (`set_micro_batch(i, n)` before
                  each backward tells them where the accumulation window stands); `step()` finishes
    zeroth_order  MeZO: no backward; one `step(closure)` on the step's loss, forward passes in eval mode
                  (no dropout) unless the optimizer section says `dropout: true`

The loss of a micro-batch is `loss_fn(model, batch, num_items)`, by default `model_loss`: the model's own
loss (`num_items_in_batch`, no KV cache). Another loss function (the continual harness passes a method's
`training_loss`) returns that micro-batch's share of the step's loss in the same way; it runs under the
step's autocast and, for zeroth_order, under no_grad in the closure.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch._subclasses.fake_tensor import is_fake

from memft.train.distributed import Engine, Processes

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def count_items(micro_batches: list[dict]) -> int:
    """Trainable tokens after the causal shift (labels[:, 1:] != -100)."""
    return int(sum((b["labels"][:, 1:] != -100).sum() for b in micro_batches))


def model_loss(model, batch: dict, num_items: int) -> torch.Tensor:
    """The model's own loss of `batch`: its token-loss sum divided by `num_items`."""
    # no KV cache: training never reads it, and it would keep every layer's K and V alive
    return model(**batch, num_items_in_batch=num_items, use_cache=False).loss


LossFn = Callable[[torch.nn.Module, dict, int], torch.Tensor]


def zeroth_order_step(model, optimizer, objective: Callable[[], torch.Tensor | float], forward_dropout: bool):
    """One zeroth-order step (MeZO, arXiv 2305.17333): `optimizer.step(closure)` with `objective()` (the step's
    loss over all its micro-batches) evaluated without gradients. Both perturbed evaluations must see the same
    function, so dropout is off unless `forward_dropout`; the model is back in train mode afterwards. The
    training loop and the Hugging Face mixin both step through here."""

    def closure():
        with torch.no_grad():
            return objective()

    model.train(forward_dropout)
    try:
        return optimizer.step(closure)
    finally:
        model.train()


class StepDriver:
    """Runs optimizer steps of one recipe: `driver.step(model, optimizer, micro_batches)`.

    `engine` (memft.train.distributed) does the backward and the step; `forward_dropout` keeps dropout on in
    zeroth-order forward passes; `loss_fn(model, batch, num_items)` is a micro-batch's loss (default
    `model_loss`). `skipped` tells whether the last step was skipped (fp16 overflow).
    """

    def __init__(self, kind: str, engine: Engine, accelerator, processes: Processes = Processes(), *,
                 mixed_precision: str = "no", max_grad_norm: float | None = None, forward_dropout: bool = False,
                 loss_fn: LossFn | None = None):
        self.kind, self.engine, self.accelerator, self.processes = kind, engine, accelerator, processes
        self.max_grad_norm, self.forward_dropout = max_grad_norm, forward_dropout
        self.loss_fn = model_loss if loss_fn is None else loss_fn
        self.autocast_dtype = AUTOCAST_DTYPES.get(mixed_precision) if engine.step_owns_precision else None
        self.scaler = None
        if mixed_precision == "fp16" and engine.step_owns_precision and kind != "zeroth_order":
            self.scaler = torch.amp.GradScaler(accelerator.device.type)
        self.skipped = False

    @classmethod
    def for_recipe(cls, recipe, kind: str, engine: Engine, accelerator, processes: Processes = Processes()):
        t = recipe.train
        return cls(kind, engine, accelerator, processes, mixed_precision=t.mixed_precision,
                   max_grad_norm=t.max_grad_norm, forward_dropout=bool(getattr(recipe.optimizer, "dropout", False)))

    def loss(self, model, batch: dict, num_items: int) -> torch.Tensor:
        """The micro-batch's token-loss sum divided by `num_items` (`loss_fn`), under the step's autocast."""
        device = batch["input_ids"].device.type
        autocast = (torch.autocast(device, dtype=self.autocast_dtype) if self.autocast_dtype is not None
                    else nullcontext())
        with autocast:
            return self.loss_fn(model, batch, num_items)

    def step(self, model, optimizer, micro: list[dict], num_items: int | None = None):
        """One optimizer step over `micro` (already on the model's device). Returns the step's mean token
        loss summed over processes: a 0-dim tensor in one process (fake under FakeTensorMode), else a float.
        `num_items`: the step's trainable tokens on all processes, when known (fake labels cannot be counted)."""
        procs = self.processes
        n_items = num_items if num_items is not None else int(procs.sum(count_items(micro)))
        if self.kind == "zeroth_order":
            return self._zeroth_order(model, optimizer, micro, n_items)
        total = None
        for i, batch in enumerate(micro):
            if self.kind == "in_backward":
                optimizer.set_micro_batch(i, len(micro))
            with self.engine.micro_batch(self.accelerator, model, i == len(micro) - 1, procs):
                loss = self.loss(model, batch, n_items)
                self.engine.backward(self.accelerator, model, self.scaler.scale(loss) if self.scaler else loss,
                                     procs)
            total = loss.detach().float() if total is None else total + loss.detach().float()
            del loss
        if self.kind == "backprop":
            scale = self.scaler.get_scale() if self.scaler is not None and not is_fake(self.scaler._scale) else None
            self.engine.step(self.accelerator, model, optimizer, self.max_grad_norm, self.scaler)
            if scale is not None:
                self.scaler.update()
                self.skipped = self.scaler.get_scale() < scale  # an overflow halves the scale; the step was skipped
        else:  # in_backward: parameters were stepped (and clipped) inside backward; this finishes the step
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return total if procs.world == 1 else procs.sum(float(total))

    def _zeroth_order(self, model, optimizer, micro: list[dict], n_items: int):
        procs = self.processes

        def objective():
            local = sum(self.loss(model, batch, n_items) for batch in micro)
            return local if procs.world == 1 else procs.sum(float(local))

        return zeroth_order_step(model, optimizer, objective, self.forward_dropout)

    # checkpoints -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The fp16 loss scale and its growth tracker (plain numbers), so a resumed run scales alike."""
        return {"grad_scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
