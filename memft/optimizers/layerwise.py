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
   every update still pending (all of them when clipping is on; parameters that got no gradient in
   the last micro-batch) and never updates a parameter twice. A gradient that reaches a parameter
   already updated in this optimizer step (a backward after the last micro-batch without ``step()``)
   raises ``RuntimeError``: accumulation never turns silently into extra optimizer steps.
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
accumulation nothing is summed, so a low-rank gradient held until ``step()`` (clipping) stays in the
dtype the projection produced (the gradient dtype, e.g. bf16) and is converted to fp32 only when it
is consumed, one parameter at a time: the same values at half the bytes for bf16 models. On a subspace
refresh step the basis is computed, by default (``refresh_grad="first_micro_batch"``), from the first
micro-batch's gradient of that step, and the later micro-batches are projected onto it (the summed
full gradient never exists). ``refresh_grad="accumulated"`` instead accumulates the full gradient of
GaLore parameters on refresh steps only, so the SVD sees exactly what the ordinary optimizer sees;
that costs full-size gradient buffers every ``update_proj_gap`` steps.

Clipping (``max_grad_norm``) is global, over the gradients the optimizer consumes: the projected
gradients of GaLore parameters and the full gradients of the others, with ``torch.nn.utils.clip_grad_norm_``'s
formula ``coef = min(1, max_norm / (norm + 1e-6))``. The global norm is only known after the last
hook, so with clipping every update is deferred to ``step()``; the buffers held until then are the
low-rank and plain-parameter gradients (held anyway under accumulation), never full GaLore
gradients. Plain parameters are held too rather than stepped with a per-parameter clip, so the
clipping stays global and exact (for Llama-2-7B that is the bf16 embedding and LM head, 0.49 GiB,
beside 3.0 GiB of rank-1024 projected gradients). Low-rank gradients are scaled in fp32 as they are
consumed; plain ones in place in their dtype, as ``clip_grad_norm_`` scales ``.grad``. Without GaLore
parameters this is exactly ``clip_grad_norm_`` on ``.grad``; a GaLore parameter contributes its
projected norm ``‖P(G)‖`` (at most its full norm ``‖G‖``), so clipping is slightly weaker than
clipping full gradients. The projected norm is chosen because it is the only one available under
accumulation (``‖Σ P(G_i)‖`` is known, ``‖Σ G_i‖`` is not) and it measures the update the optimizer
actually takes. ``last_grad_norm`` holds the norm; ``held_gradients()`` lists the gradients held
until their update (memory trackers count them as gradients), ``accumulated_gradient_bytes()`` their bytes.

A wrapper (rather than a ``layerwise=True`` flag) keeps the hook, accumulation and clipping logic
in one place for all GaLore-family algorithms, which only expose ``project_grad`` and
``apply_update``. Not supported: DDP/FSDP (their reducers need the gradient after these hooks run),
sparse gradients, closures that run several backwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from memft.optimizers.galore import GaLoreOptimizer

REFRESH_GRAD = ("first_micro_batch", "accumulated")


@dataclass
class _Pending:
    grad: Tensor
    projected: bool


class LayerwiseOptimizer(torch.optim.Optimizer):
    """Run a GaLore-family optimizer inside backward; see the module docstring for the loop contract.

    ``params``: an ``nn.Module`` (its trainable parameters), an iterable of parameters or of param
    groups (e.g. :func:`memft.optimizers.galore.galore_param_groups`). ``optimizer_cls``: a subclass of
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
        if isinstance(params, nn.Module):
            params = [p for p in params.parameters() if p.requires_grad]
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
        self._group_index: dict[int, int] = {}
        self._hooks: list[Any] = []
        for index, group in enumerate(self.optimizer.param_groups):
            self._hook_group(index, group)
        self._ready = True

    def _share_inner_state(self) -> None:
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state

    def _hook_group(self, index: int, group: dict[str, Any]) -> None:
        for param in group["params"]:
            if param.requires_grad:
                self._group_index[id(param)] = index
                self._hooks.append(param.register_post_accumulate_grad_hook(self._on_grad))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not self._ready:  # called by Optimizer.__init__ with the inner optimizer's own groups
            super().add_param_group(param_group)
            return
        self.optimizer.add_param_group(param_group)
        self._hook_group(len(self.optimizer.param_groups) - 1, self.optimizer.param_groups[-1])

    def remove_hooks(self) -> None:
        """Detach from the parameters; the optimizer can no longer step."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def held_gradients(self) -> list[Tensor]:
        """The gradients held right now until their update: accumulation buffers across micro-batches and,
        with clipping, every gradient until the global norm is known (memory trackers count them as gradients)."""
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

    @torch.no_grad()
    def _on_grad(self, param: Tensor) -> None:
        grad = param.grad
        if grad is None:
            return
        param.grad = None
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
        if self._micro_index == self._micro_total - 1 and self.max_grad_norm is None:
            self._apply(param)

    def _consumed_grad(self, param: Tensor) -> Tensor:
        """The pending gradient in the form the algorithm consumes (projects an accumulated full gradient)."""
        entry = self._pending[param]
        if not entry.projected:
            group = self.optimizer.param_groups[self._group_index[id(param)]]
            entry.grad = self.optimizer.project_grad(param, entry.grad, group).float()
            entry.projected = True
        return entry.grad

    def _apply(self, param: Tensor) -> None:
        grad = self._consumed_grad(param)
        group = self.optimizer.param_groups[self._group_index[id(param)]]
        del self._pending[param]
        if self._clip_coef is not None and self.optimizer.is_low_rank(param, group):
            grad = grad.float().mul_(self._clip_coef)  # in place for fp32 accumulation buffers
        self.optimizer.apply_update(param, grad, group)
        self._stepped.add(id(param))

    @torch.no_grad()
    def _clip_pending(self) -> None:
        """Global norm of the pending gradients; scales plain ones now, low-rank ones in :meth:`_apply`."""
        grads = {param: self._consumed_grad(param) for param in self._pending}
        if not grads:
            return
        norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads.values()])
        total = torch.linalg.vector_norm(norms)
        self._clip_coef = (self.max_grad_norm / (total + 1e-6)).clamp(max=1.0)
        for param, grad in grads.items():
            if not self.optimizer.is_low_rank(param, self.optimizer.param_groups[self._group_index[id(param)]]):
                grad.mul_(self._clip_coef.to(grad.dtype))
        self.last_grad_norm = total

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Finalise the optimizer step (see the contract); ``closure`` may run one forward/backward first."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.max_grad_norm is not None:
            self._clip_pending()
        for param in list(self._pending):
            self._apply(param)
        self._clip_coef = None
        self._stepped.clear()
        self._micro_index, self._micro_total = 0, 1
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
