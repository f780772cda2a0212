"""Per-site state of the activation compressors, and the rule that keeps it consistent with recomputation.

A *site* is one place where a tensor is saved for backward (a patched module, or the n-th softmax/matmul inside
an attention module). Its state (Mesa's EMA ranges, WTA-CRS's gradient-norm estimate, and a step count that
seeds its random draws) changes only through *pending* observations recorded in backward and committed when the
whole backward pass ends (an autograd engine callback). So every forward, and every recomputation of a forward
during backward (non-reentrant gradient checkpointing), sees the same state and the same noise: recomputation
rebuilds exactly the tensors the first forward compressed. No torch generator is used, so compression leaves
the model's own random draws (dropout) untouched.

:class:`EncodeCache` lets several modules that save the *same* tensor (q/k/v projections of one input) share one
compressed copy, as autograd shares one saved tensor in the uncompressed model.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

import torch

__all__ = ["RangeTracker", "GradNormTracker", "schedule_commit", "EncodeCache"]


_lock = threading.Lock()
_pending_trackers: dict[int, _Tracker] = {}
_callback_queued = False
_backward_passes = 0  # backward passes that ended with observations (the "step" an encoding belongs to)


def _commit_all() -> None:
    global _callback_queued, _backward_passes
    with _lock:
        trackers = list(_pending_trackers.values())
        _pending_trackers.clear()
        _callback_queued = False
        _backward_passes += 1
    for tracker in trackers:
        tracker.commit()


def schedule_commit(tracker: _Tracker) -> None:
    """Called from backward: commit ``tracker``'s pending observations when the running backward pass ends."""
    global _callback_queued
    with _lock:
        _pending_trackers[id(tracker)] = tracker
        if _callback_queued:
            return
        _callback_queued = True
    torch.autograd.Variable._execution_engine.queue_callback(_commit_all)


class _Tracker:
    """Base: observations wait in ``pending`` until :meth:`commit`."""

    def __init__(self, momentum: float) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(
                f"momentum={momentum!r} must lie in [0, 1): it is the weight of the old value in the EMA "
                "(0.9 keeps 90% of the history each step)."
            )
        self.momentum = momentum
        self.pending: list[Any] = []
        self.seed_base = 0
        self.updates = 0

    @property
    def seed(self) -> int:
        """Seed of this site's counter-based noise: fixed within a step, new after every backward."""
        return (self.seed_base * 1_000_003 + self.updates * 7_919) & 0x7FFFFFFF

    def observe(self, observation: Any) -> None:
        """Record an observation (None: only count the step); applied when the backward pass ends."""
        self.pending.append(observation)
        schedule_commit(self)

    def commit(self) -> None:
        observations, self.pending = self.pending, []
        self.updates += 1
        for obs in observations:
            if obs is not None:
                self._apply(obs)

    def _apply(self, observation: Any) -> None:
        raise NotImplementedError


class RangeTracker(_Tracker):
    """EMA of per-group minimum and maximum (Mesa, arXiv 2111.11124): ``lo``/``hi`` float32 tensors of shape (G,).

    The first batch uses its own range; later batches use ``m * ema + (1 - m) * batch`` (the EMA updated with the
    batch, as in Mesa), and the EMA itself is updated with the batch range once backward has run.
    """

    def __init__(self, momentum: float = 0.9) -> None:
        super().__init__(momentum)
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def _usable(self, like: torch.Tensor) -> bool:
        return self.lo is not None and self.lo.shape == like.shape and self.lo.device == like.device

    def ranges(self, batch_lo: torch.Tensor, batch_hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._usable(batch_lo):
            return batch_lo, batch_hi
        m = self.momentum
        return m * self.lo + (1 - m) * batch_lo, m * self.hi + (1 - m) * batch_hi

    def _apply(self, observation: tuple[torch.Tensor, torch.Tensor]) -> None:
        lo, hi = observation
        if not self._usable(lo):
            self.lo, self.hi = lo.clone(), hi.clone()
        else:
            m = self.momentum
            self.lo = m * self.lo + (1 - m) * lo
            self.hi = m * self.hi + (1 - m) * hi

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"updates": torch.tensor(self.updates)}
        if self.lo is not None:
            state.update(lo=self.lo, hi=self.hi)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lo, self.hi = state.get("lo"), state.get("hi")
        self.updates = int(state.get("updates", 0))


class GradNormTracker(_Tracker):
    """Per-position EMA of output-gradient norms (WTA-CRS, arXiv 2305.15265), averaged over the batch.

    For a Linear layer on a ``(B, N, C)`` input the EMA has shape ``(N,)``: the gradient-row norms ``||dL/dy_i||``
    by position. For an attention matmul it has shape ``(*lead, N)`` (e.g. ``(H, N)`` per head), the norms of the
    output-gradient rows or columns along the sampled dimension. A row's estimate is the EMA at its position
    (positions beyond the tracked length get the mean). ``estimate`` is None until a backward has run.
    """

    def __init__(self, momentum: float = 0.9) -> None:
        super().__init__(momentum)
        self.ema: torch.Tensor | None = None

    def estimate(
        self, batch: int, positions: int, device: torch.device, lead: tuple[int, ...] = ()
    ) -> torch.Tensor | None:
        """Estimated gradient norms, float32 of shape ``(batch, *lead, positions)``, or None."""
        ema = self.ema
        if ema is None or ema.device != device or tuple(ema.shape[:-1]) != tuple(lead):
            return None
        tracked = ema.shape[-1]
        if tracked >= positions:
            per_position = ema[..., :positions]
        else:
            fill = ema.mean(-1, keepdim=True).expand(*lead, positions - tracked)
            per_position = torch.cat([ema, fill], -1)
        return per_position.unsqueeze(0).expand(batch, *per_position.shape)

    def _apply(self, obs: torch.Tensor) -> None:
        ema = self.ema
        if ema is None or ema.device != obs.device or ema.shape[:-1] != obs.shape[:-1]:
            self.ema = obs.clone()
            return
        m = self.momentum
        n = min(ema.shape[-1], obs.shape[-1])
        head = m * ema[..., :n] + (1 - m) * obs[..., :n]
        tail = ema[..., n:] if ema.shape[-1] > n else obs[..., n:]
        self.ema = torch.cat([head, tail], -1)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"updates": torch.tensor(self.updates)}
        if self.ema is not None:
            state["ema"] = self.ema
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema = state.get("ema")
        self.updates = int(state.get("updates", 0))


class EncodeCache:
    """Share one encoding of a tensor among the sites that save that same tensor (same object, same version,
    no backward pass in between: after one, ranges, estimates and noise seeds have moved on).

    Entries hold weak references to the source tensor and its encoding, plus strong references to the
    ``keep_recent`` latest encodings: under gradient checkpointing the first consumer's saved encoding is dropped
    at once, and the strong reference keeps it available to the next consumers (k/v after q), so checkpointed
    and plain runs encode, and draw random numbers, identically. At most ``keep_recent`` encodings are held.
    """

    def __init__(self, keep_recent: int = 4) -> None:
        self._entries: dict[tuple[int, Hashable], tuple[weakref.ref, int, int, list[weakref.ref], Any]] = {}
        self._recent: deque[tuple[torch.Tensor, ...]] = deque(maxlen=keep_recent)

    def get_or_encode(
        self,
        x: torch.Tensor,
        key: Hashable,
        encode: Callable[[], tuple[tuple[torch.Tensor, ...], Any]],
    ) -> tuple[tuple[torch.Tensor, ...], Any]:
        """Return ``(tensors, meta)`` for x under ``key``, calling ``encode()`` only on a miss."""
        slot = (id(x), key)
        entry = self._entries.get(slot)
        if entry is not None:
            source, version, step, refs, meta = entry
            tensors = tuple(r() for r in refs)
            fresh = step == _backward_passes and all(t is not None for t in tensors)
            if fresh and source() is x and version == x._version:
                return tensors, meta  # type: ignore[return-value]
        tensors, meta = encode()
        entries = self._entries

        def _drop(dead: weakref.ref, slot: tuple[int, Hashable] = slot) -> None:
            current = entries.get(slot)
            if current is not None and current[0] is dead:
                del entries[slot]

        refs = [weakref.ref(t) for t in tensors]
        self._entries[slot] = (weakref.ref(x, _drop), x._version, _backward_passes, refs, meta)
        self._recent.append(tensors)
        return tensors, meta

    def clear(self) -> None:
        self._entries.clear()
        self._recent.clear()
