"""Layer-wise optimizer step inside backward (GaLore, arXiv 2403.03507, Sec. 4.3).

Each trainable parameter gets a ``register_post_accumulate_grad_hook``. As soon as autograd has a
parameter's gradient the hook consumes it and frees ``param.grad``: a GaLore parameter's gradient is
projected to its low-rank shape, any other gradient is kept as is; on the last micro-batch of an
optimizer step the update is applied right there, inside backward. Full-size gradients of different
GaLore parameters therefore never coexist.

Training-loop contract
----------------------
::

    opt = LayerwiseOptimizer(galore_param_groups(model, rank=128), GaLoreAdamW, lr=1e-3, max_grad_norm=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    for step in range(max_steps):
        for index, batch in enumerate(micro_batches):          # grad_accum micro-batches
            opt.set_micro_batch(index, grad_accum)             # before every backward
            (model(**batch).loss / grad_accum).backward()      # updates may happen in here
        opt.step()                                             # exactly once per optimizer step
        sched.step()                                           # exactly once per optimizer step
        opt.zero_grad()                                        # optional; safe at any point

1. ``set_micro_batch(index, total)`` is called before each backward with ``index = 0 .. total-1`` in
   order. If it is never called, every backward is a whole optimizer step (``total = 1``).
2. ``step()`` is called once after the last micro-batch. It finalises the optimizer step: it applies
   every update still pending (parameters that got no gradient in the last micro-batch and, with
   clipping, every held one when backward could not finalise the step) and never updates a parameter
   twice. A gradient that reaches a parameter already updated in this optimizer step (a backward after
   the last micro-batch without ``step()``) raises ``RuntimeError``: accumulation never turns silently
   into extra optimizer steps.
   ``set_micro_batch(0, ...)`` before ``step()`` finalised the previous step also raises.
3. Learning rate: ``param_groups`` *are* the inner optimizer's groups, so an LR scheduler built on
   this object changes the lr every update uses. Updates of step ``k`` happen during step ``k``'s
   last backward, after the scheduler step of ``k - 1``, so they use the same lr as the ordinary
   ``backward(); opt.step(); sched.step()`` loop.
4. ``zero_grad()`` only clears ``param.grad`` (already ``None`` for hooked parameters); it never
   touches the accumulation buffers, so calling it between micro-batches is harmless.
5. ``state_dict()`` / ``load_state_dict()`` work between optimizer steps (after ``step()``), return
   the inner optimizer's state (plain tensors, loadable with ``torch.load(weights_only=True)``) and
   raise ``RuntimeError`` mid-step.
6. The loss is scaled by ``1 / total`` by the loop, as usual; buffers sum gradients like ``.grad``.

Gradient accumulation (``total > 1``) keeps, per parameter, one buffer across micro-batches: the
projected low-rank gradient in fp32 for GaLore parameters, the full gradient (parameter dtype) for
plain parameters only (norms, biases, and embeddings / LM head in the default groups). Without
accumulation nothing is summed, so a low-rank gradient held for clipping stays in the dtype the
projection produced (the gradient dtype, e.g. bf16) and is converted to fp32 only when it is consumed,
one parameter at a time: the same values at half the bytes for bf16 models. On a subspace
refresh step the basis is computed, by default (``refresh_grad="first_micro_batch"``), from the first
micro-batch's gradient of that step, and the later micro-batches are projected onto it (the summed
full gradient never exists). ``refresh_grad="accumulated"`` instead accumulates the full gradient of
GaLore parameters on refresh steps only, so the SVD sees exactly what the ordinary optimizer sees;
that costs full-size gradient buffers every ``update_proj_gap`` steps.

Clipping (``max_grad_norm``) is global, over the gradients the optimizer consumes: the projected
gradients of GaLore parameters and the full gradients of the others, with ``torch.nn.utils.clip_grad_norm_``'s
formula: per-parameter fp32 norms, ``norm = ‖(‖g_1‖, ..., ‖g_k‖)‖`` in parameter-group order,
``coef = min(1, max_norm / (norm + 1e-6))``. Without GaLore parameters this is exactly ``clip_grad_norm_``
on ``.grad``; a GaLore parameter contributes its projected norm ``‖P(G)‖`` (at most its full norm
``‖G‖``), the only one available under accumulation (``‖Σ P(G_i)‖`` is known, ``‖Σ G_i‖`` is not) and the
norm of the update the optimizer actually takes. ``last_grad_norm`` holds the norm.

Exact clipping must hold every gradient that is complete before the global norm is: an Adam update
depends on ``coef · g`` through ``m`` and on ``coef² · g²`` through ``v``, so for a ``coef`` not known yet
it needs ``g`` itself or the old moments, which are as large (8-bit ``m`` and ``v``: two bytes per
element, as a bf16 ``g``), and rebuilding requantised moments would not be exact. So each parameter's
norm is taken in its hook on the last micro-batch (a device scalar: no synchronisation), its gradient is
held (projected for GaLore parameters, full for the others), and the step is finalised, largest held
gradient first, as soon as every hooked parameter has its norm: inside backward, in the hook of the last
gradient to arrive (the input embedding, in a language model), or in ``step()`` when some parameter got
no gradient in the last micro-batch. The held low-rank gradients stay in the dtype the projection
produced (bf16 models: half the bytes) and are scaled in fp32 as they are consumed; plain ones are
scaled in place in their dtype, as ``clip_grad_norm_`` scales ``.grad``.

The input embedding's ``(num_embeddings, dim)`` gradient is the last to arrive, and the held ones (a plain
LM head among them) would coexist with it. :meth:`watch_embeddings` (automatic when ``params`` is the
model) removes that: the norm of an ``nn.Embedding``'s weight gradient is computed from the gradient of
its output (``T`` rows for ``T`` tokens, summed per token id), before its backward allocates the full
gradient, so the step is finalised and the held gradients freed first, and the embedding is then updated
in its own hook as without clipping. This needs the weight to reach the loss only through one call of
that module per backward: tied weights are left out, a module called twice or with accumulation
(``total > 1``, where every buffer is held anyway) falls back to the hold above, and the first prediction
of each weight is checked against the real gradient (one synchronisation) and kept only if they agree
within ``rtol = 1e-2``; otherwise that weight always falls back. The prediction is the norm of the per-id
row sums rounded to the weight dtype (as the dense gradient is), so it equals the dense gradient's norm
up to fp32 summation order. What clipping still holds is inherent to exactness with one backward: each
gradient from its arrival to the end of backward, e.g. a plain LM head's full gradient, the first to
arrive, beside the activations of the whole backward. ``held_gradients()`` lists the gradients held
until their update (memory trackers count them as gradients), ``accumulated_gradient_bytes()`` their bytes.

A wrapper (rather than a ``layerwise=True`` flag) keeps the hook, accumulation and clipping logic
in one place for all GaLore-family algorithms, which only expose ``project_grad`` and
``apply_update``. Not supported: DDP/FSDP (their reducers need the gradient after these hooks run),
sparse gradients, closures that run several backwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

from memft.optimizers.galore import GaLoreOptimizer

REFRESH_GRAD = ("first_micro_batch", "accumulated")
EMBEDDING_NORM_RTOL = 1e-2
EMBEDDING_CHUNK_NUMEL = 2**22


@dataclass
class _Pending:
    grad: Tensor
    projected: bool


def embedding_grad_norm(module: nn.Embedding, ids: Tensor, grad_out: Tensor) -> Tensor:
    """fp32 ``‖∂L/∂W‖`` of ``nn.Embedding`` ``module`` from the gradient of its output, ``grad_out`` of shape
    ``ids.shape + (dim,)``, without the ``(num_embeddings, dim)`` gradient: the ``T = ids.numel()`` rows are
    summed per id (``index_add_`` into the first occurrence, in fp32 column blocks of ``T × c ≤ 2**22``
    elements), padding rows dropped and ``scale_grad_by_freq`` applied as the module's backward does, and
    each sum rounded to the weight dtype, as the dense gradient is."""
    ids = ids.reshape(-1)
    count = ids.numel()
    rows = grad_out.reshape(count, grad_out.shape[-1])
    sorted_ids, order = torch.sort(ids, stable=True)
    starts = torch.ones(count, dtype=torch.bool, device=ids.device)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    first = torch.where(starts, torch.arange(count, device=ids.device), 0).cummax(0).values
    target = torch.empty_like(order).scatter_(0, order, order[first])  # each row's first occurrence
    factor = None
    if module.scale_grad_by_freq:
        ones = torch.ones(count, device=ids.device)
        factor = 1.0 / torch.zeros(count, device=ids.device).index_add_(0, target, ones)[target]
    if module.padding_idx is not None:
        keep = (ids != module.padding_idx).float()
        factor = keep if factor is None else factor * keep
    columns = max(1, EMBEDDING_CHUNK_NUMEL // max(count, 1))
    norms = []
    for start in range(0, rows.shape[1], columns):
        block = rows[:, start : start + columns].float()
        if factor is not None:
            block = block * factor[:, None]
        summed = block.new_zeros(block.shape).index_add_(0, target, block)
        norms.append(torch.linalg.vector_norm(summed.to(module.weight.dtype), dtype=torch.float32))
    return torch.linalg.vector_norm(torch.stack(norms))


class LayerwiseOptimizer(torch.optim.Optimizer):
    """Run a GaLore-family optimizer inside backward; see the module docstring for the loop contract.

    ``params``: an ``nn.Module`` (its trainable parameters; with clipping its embeddings are watched, see
    :meth:`watch_embeddings`), an iterable of parameters or of param groups (e.g.
    :func:`memft.optimizers.galore.galore_param_groups`). ``optimizer_cls``: a subclass of
    :class:`~memft.optimizers.galore.GaLoreOptimizer` (``GaLoreAdamW``, ``GaLoreAdamW8bit``,
    ``GaLoreAdafactor``, ``NaturalGaLoreAdamW``), built with ``optimizer_kwargs``.
    """

    def __init__(
        self,
        params: nn.Module | Iterable,
        optimizer_cls: type[GaLoreOptimizer],
        *,
        max_grad_norm: float | None = None,
        refresh_grad: str = "first_micro_batch",
        **optimizer_kwargs: Any,
    ) -> None:
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, GaLoreOptimizer)):
            raise TypeError(
                f"`optimizer_cls` must be a GaLoreOptimizer subclass (GaLoreAdamW, GaLoreAdamW8bit, GaLoreAdafactor, "
                f"NaturalGaLoreAdamW), got {optimizer_cls!r}; for plain AdamW use GaLoreAdamW with groups without `rank`."
            )
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"`max_grad_norm` must be a positive number or None, got {max_grad_norm!r}.")
        if refresh_grad not in REFRESH_GRAD:
            raise ValueError(f"`refresh_grad` must be one of {REFRESH_GRAD}, got {refresh_grad!r}.")
        model = params if isinstance(params, nn.Module) else None
        if model is not None:
            params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = optimizer_cls(params, **optimizer_kwargs)
        self.max_grad_norm = max_grad_norm
        self.refresh_grad = refresh_grad
        self.last_grad_norm: Tensor | None = None
        self._clip_coef: Tensor | None = None
        self._ready = False
        super().__init__(self.optimizer.param_groups, self.optimizer.defaults)
        self._share_inner_state()
        self._pending: dict[Tensor, _Pending] = {}
        self._stepped: set[int] = set()
        self._micro_index, self._micro_total = 0, 1
        self._announced = False  # set_micro_batch was called in this optimizer step
        # When set, a backward that set_micro_batch did not announce raises this (optimizers built for a
        # training loop that announces every micro-batch, e.g. a Hugging Face Trainer through memft's mixin).
        self.unannounced_backward_message: str | None = None
        self._group_index: dict[int, int] = {}
        self._hooked: list[Tensor] = []
        self._hooks: list[Any] = []
        self._norms: dict[Tensor, Tensor] = {}  # this step's final per-parameter norms
        self._watched: set[int] = set()
        self._embedding_calls: dict[Tensor, int] = {}
        self._predicted: dict[Tensor, Tensor] = {}
        self._prediction_ok: dict[Tensor, bool] = {}
        for index, group in enumerate(self.optimizer.param_groups):
            self._hook_group(index, group)
        self._ready = True
        if model is not None:
            self.watch_embeddings(model)

    def _share_inner_state(self) -> None:
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state

    def _hook_group(self, index: int, group: dict[str, Any]) -> None:
        for param in group["params"]:
            if param.requires_grad:
                self._group_index[id(param)] = index
                self._hooked.append(param)
                self._hooks.append(param.register_post_accumulate_grad_hook(self._on_grad))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not self._ready:  # called by Optimizer.__init__ with the inner optimizer's own groups
            super().add_param_group(param_group)
            return
        self.optimizer.add_param_group(param_group)
        self._hook_group(len(self.optimizer.param_groups) - 1, self.optimizer.param_groups[-1])

    def watch_embeddings(self, model: nn.Module) -> None:
        """With clipping, finalise the step before the embeddings' full gradients exist (module docstring).

        Watches every ``nn.Embedding`` of ``model`` (subclasses that keep its ``forward``) whose weight is a
        plain (not low-rank) parameter of this optimizer and of no other module of ``model`` (not tied)."""
        if self.max_grad_norm is None:
            return
        owners: dict[int, int] = {}
        for _, param in model.named_parameters(remove_duplicate=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
        for module in model.modules():
            if not isinstance(module, nn.Embedding) or type(module).forward is not nn.Embedding.forward:
                continue
            weight = module.weight
            index = self._group_index.get(id(weight))
            if module.sparse or index is None or owners[id(weight)] > 1 or id(module) in self._watched:
                continue
            if self.optimizer.is_low_rank(weight, self.optimizer.param_groups[index]):
                continue
            self._watched.add(id(module))
            hook = partial(self._on_embedding_forward, weight)
            self._hooks.append(module.register_forward_hook(hook, with_kwargs=True))

    def remove_hooks(self) -> None:
        """Detach from the parameters and modules; the optimizer can no longer step."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._watched.clear()

    def held_gradients(self) -> list[Tensor]:
        """The gradients held right now until their update: accumulation buffers across micro-batches and,
        with clipping, those that arrived before the global norm was known (memory trackers count them as gradients)."""
        return [entry.grad for entry in self._pending.values()]

    def accumulated_gradient_bytes(self) -> int:
        """Bytes of :meth:`held_gradients` (for memory reports)."""
        return sum(grad.numel() * grad.element_size() for grad in self.held_gradients())

    # ----------------------------------------------------------------- loop contract
    def set_micro_batch(self, index: int, total: int) -> None:
        """Declare that the next backward is micro-batch ``index`` of ``total`` in this optimizer step."""
        if isinstance(index, bool) or isinstance(total, bool) or not isinstance(index, int) or not isinstance(total, int):
            raise TypeError(f"set_micro_batch(index, total) takes ints, got {index!r}, {total!r}.")
        if total < 1 or not 0 <= index < total:
            raise ValueError(f"set_micro_batch needs 0 <= index < total, got index={index}, total={total}.")
        if index == 0:
            if self._pending or self._stepped:
                raise RuntimeError(
                    "set_micro_batch(0, ...) started a new optimizer step but the previous one was not finalised; "
                    "call opt.step() once after the last micro-batch's backward."
                )
        elif (index, total) != (self._micro_index + 1, self._micro_total):
            raise ValueError(
                f"set_micro_batch({index}, {total}) out of order: expected ({self._micro_index + 1}, {self._micro_total}); "
                "call it before every backward with index = 0 .. total-1."
            )
        self._micro_index, self._micro_total = index, total
        self._announced = True

    def _on_embedding_forward(
        self, weight: Tensor, module: nn.Embedding, args: tuple, kwargs: dict[str, Any], output: Tensor
    ) -> None:
        """Forward hook of a watched embedding: count the call, hook its output gradient. Skips calls
        without grad and recomputations inside backward (activation checkpointing)."""
        if not (torch.is_grad_enabled() and output.requires_grad) or torch._C._current_autograd_node() is not None:
            return
        self._embedding_calls[weight] = self._embedding_calls.get(weight, 0) + 1
        ids = args[0] if args else kwargs["input"]
        output.register_hook(partial(self._on_embedding_grad, weight, module, ids))

    @torch.no_grad()
    def _on_embedding_grad(self, weight: Tensor, module: nn.Embedding, ids: Tensor, grad_out: Tensor) -> None:
        if self._micro_total != 1 or self._embedding_calls.get(weight) != 1 or self.max_grad_norm is None:
            return
        norm = embedding_grad_norm(module, ids, grad_out)
        self._predicted[weight] = norm
        if self._prediction_ok.get(weight):
            self._norms[weight] = norm
            self._finalise_if_complete()

    @torch.no_grad()
    def _on_grad(self, param: Tensor) -> None:
        grad = param.grad
        if grad is None:
            return
        param.grad = None
        if self.unannounced_backward_message is not None and not self._announced:
            raise RuntimeError(self.unannounced_backward_message)
        if id(param) in self._stepped:
            raise RuntimeError(
                "a parameter received a gradient after its update in this optimizer step; call opt.step() after the last "
                "micro-batch, and opt.set_micro_batch(index, total) before each backward when accumulating gradients."
            )
        group = self.optimizer.param_groups[self._group_index[id(param)]]
        entry = self._pending.get(param)
        if not self.optimizer.is_low_rank(param, group):
            if entry is None:
                entry = _Pending(grad, projected=True)
            else:
                entry.grad.add_(grad)
        elif entry is None:
            accumulate_full = (
                self.refresh_grad == "accumulated" and self._micro_total > 1 and self.optimizer.needs_refresh(param, group)
            )
            if accumulate_full:
                entry = _Pending(grad, projected=False)
            else:
                low_grad = self.optimizer.project_grad(param, grad, group)
                entry = _Pending(low_grad.float() if self._micro_total > 1 else low_grad, projected=True)
        elif entry.projected:
            entry.grad.add_(self.optimizer.project_grad(param, grad, group, allow_refresh=False))
        else:
            entry.grad.add_(grad)
        self._pending[param] = entry
        if self._micro_index < self._micro_total - 1:
            return
        if self.max_grad_norm is None or self._clip_coef is not None:  # no clipping, or the norm is already known
            self._apply(param)
            return
        if param not in self._norms:
            self._norms[param] = self._final_norm(param)
        self._finalise_if_complete()

    def _consumed_grad(self, param: Tensor) -> Tensor:
        """The pending gradient in the form the algorithm consumes (projects an accumulated full gradient)."""
        entry = self._pending[param]
        if not entry.projected:
            group = self.optimizer.param_groups[self._group_index[id(param)]]
            entry.grad = self.optimizer.project_grad(param, entry.grad, group).float()
            entry.projected = True
        return entry.grad

    def _final_norm(self, param: Tensor) -> Tensor:
        """fp32 norm of ``param``'s consumed gradient; the first time an embedding's prediction is available,
        checks it against this and keeps using predictions for it only if they agree."""
        norm = torch.linalg.vector_norm(self._consumed_grad(param), dtype=torch.float32)
        predicted = self._predicted.get(param)
        if predicted is None or param in self._prediction_ok:
            return norm
        agrees = is_fake(norm) or bool(torch.isclose(predicted, norm, rtol=EMBEDDING_NORM_RTOL, atol=0.0))
        self._prediction_ok[param] = agrees
        return predicted if agrees else norm

    def _finalise_if_complete(self) -> None:
        if len(self._norms) == len(self._hooked):
            self._finalise_clipped()

    def _finalise_clipped(self) -> None:
        """Global norm and coefficient (``clip_grad_norm_``'s formula), then every held update, largest first."""
        for param in self._pending:
            if param not in self._norms:  # no gradient in the last micro-batch: its buffer is final now
                self._norms[param] = self._final_norm(param)
        total = torch.linalg.vector_norm(torch.stack([self._norms[p] for p in self._hooked if p in self._norms]))
        self.last_grad_norm = total
        self._clip_coef = (self.max_grad_norm / (total + 1e-6)).clamp(max=1.0)
        held = {p: e.grad.numel() * e.grad.element_size() for p, e in self._pending.items()}
        for param in sorted(held, key=held.__getitem__, reverse=True):
            self._apply(param)

    def _apply(self, param: Tensor) -> None:
        grad = self._consumed_grad(param)
        group = self.optimizer.param_groups[self._group_index[id(param)]]
        del self._pending[param]
        if self._clip_coef is not None:
            if self.optimizer.is_low_rank(param, group):
                grad = grad.float().mul_(self._clip_coef)  # in place for fp32 accumulation buffers
            else:
                grad.mul_(self._clip_coef.to(grad.dtype))
        self.optimizer.apply_update(param, grad, group)
        self._stepped.add(id(param))

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Finalise the optimizer step (see the contract); ``closure`` may run one forward/backward first."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._pending and self.max_grad_norm is not None:
            self._finalise_clipped()
        for param in list(self._pending):
            self._apply(param)
        self._clip_coef = None
        self._norms.clear()
        self._predicted.clear()
        self._embedding_calls.clear()
        self._stepped.clear()
        self._micro_index, self._micro_total = 0, 1
        self._announced = False
        return loss

    # ----------------------------------------------------------------- checkpointing
    def _require_boundary(self, what: str) -> None:
        if self._pending or self._stepped:
            raise RuntimeError(f"{what} is only valid between optimizer steps; call opt.step() first.")

    def state_dict(self) -> dict[str, Any]:
        self._require_boundary("state_dict()")
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._require_boundary("load_state_dict()")
        self.optimizer.load_state_dict(state_dict)
        self._share_inner_state()
