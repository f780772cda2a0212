"""Exact accounting of tensor storage by category during a training step.

``MemoryTracker`` is a context manager built on a ``TorchDispatchMode``: it sees every tensor an aten op
returns (and every tensor an op reads), counts each untyped storage once (views share their base's storage),
and subtracts a storage when it dies (weak reference callback). Tensors alive before entering (parameters,
buffers, gradients, optimizer state of the given model/optimizer) are counted from the start.

Categories, in order of precedence (a storage takes the first role it is found to play):

- ``parameters``: storages of ``model.parameters()`` (or any ``nn.Parameter`` an op reads).
- ``gradients``: storages of ``param.grad`` (found by post-accumulate-grad hooks, after every
  ``optimizer.step`` and whenever a figure is read), and the gradients an optimizer holds itself until its
  update (its ``held_gradients()``, e.g. layer-wise GaLore's accumulation buffers: read with the optimizer
  state, and by the post-accumulate-grad hook of a parameter whose ``.grad`` the optimizer's own hook consumed).
- ``optimizer_state``: tensors in ``optimizer.state`` (re-scanned after every ``optimizer.step``, since
  optimizers create their state lazily).
- ``activations``: storage written during a forward pass (grad mode on, outside backward and outside
  ``optimizer.step``) that is still alive when the next backward starts, plus anything autograd saves for
  backward (seen by a ``saved_tensors_hooks`` pack hook). This includes checkpoint boundaries and compressed
  activations that other saved-tensor hooks store.
- ``temporaries``: everything else allocated while tracking (transient forward buffers, gradients of
  activations, recomputation, optimizer-step scratch).
- ``other``: buffers, inputs and any other tensor alive before entering or tagged by the caller.

A storage re-categorised later (a temporary found to be saved, a fresh tensor that becomes ``param.grad``)
is re-categorised in the peak snapshots too when it was alive at the peak, so peak breakdowns are exact.

Not seen: memory that kernels allocate internally without returning a tensor (cuBLAS workspace, flash
attention scratch), the CUDA context, allocator fragmentation, and ``UntypedStorage.resize_`` calls made
outside aten ops (FSDP). The gradient seed ``loss.backward()`` creates (one element for a scalar loss) is
allocated just before backward starts and counts as an activation. ``torch.compile`` inside the tracked
region is untested.

    with MemoryTracker(model, optimizer) as mt:
        loss = model(**batch).loss; loss.backward(); optimizer.step(); optimizer.zero_grad()
    mt.peak_bytes, mt.peak_breakdown, mt.summary().print()
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

from memft.memory.report import CATEGORIES, MemoryReport

PARAMETERS, GRADIENTS, OPTIMIZER_STATE, ACTIVATIONS, TEMPORARIES, OTHER = range(len(CATEGORIES))
# Lower rank wins when a storage plays several roles (a parameter saved for backward stays a parameter).
_RANK = {PARAMETERS: 0, GRADIENTS: 1, OPTIMIZER_STATE: 2, ACTIVATIONS: 3, OTHER: 4, TEMPORARIES: 5}
_CUDA_BLOCK_BYTES = 512  # the CUDA caching allocator rounds every request up to a multiple of 512 bytes
_PLAIN_TENSOR_TYPES = (torch.Tensor, nn.Parameter, FakeTensor)
OUTSIDE_MODEL = "<outside>"
MODEL_ROOT = "<root>"


class _StorageRef(weakref.ref):
    __slots__ = ("key",)


class _Record:
    __slots__ = ("ref", "nbytes", "category", "seq", "module", "alive")

    def __init__(self, ref: _StorageRef, nbytes: int, category: int, seq: int, module: str | None) -> None:
        self.ref = ref
        self.nbytes = nbytes
        self.category = category
        self.seq = seq
        self.module = module
        self.alive = True


class _Peak:
    """Largest total seen in an interval, with the per-category bytes live at that moment."""

    __slots__ = ("bytes", "seq", "by_category")

    def __init__(self, total: int, seq: int, by_category: list[int]) -> None:
        self.bytes = total
        self.seq = seq
        self.by_category = list(by_category)

    def observe(self, total: int, seq: int, by_category: list[int]) -> None:
        if total > self.bytes:
            self.bytes = total
            self.seq = seq
            self.by_category = list(by_category)

    def move(self, record: _Record, old: int, new: int) -> None:
        if record.seq <= self.seq:  # alive now and allocated before the peak: it was live at the peak
            self.by_category[old] -= record.nbytes
            self.by_category[new] += record.nbytes


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Tensors in an op's args/outputs: a tensor, or lists/tuples/dicts of them (foreach ops)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            if isinstance(item, torch.Tensor):
                yield item
            elif isinstance(item, (list, tuple)):
                yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _storages(t: torch.Tensor) -> Iterator[torch.UntypedStorage]:
    """Untyped storages behind ``t``: its own, or its inner tensors' for traceable wrapper subclasses."""
    if type(t) not in _PLAIN_TENSOR_TYPES and is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        for name in names:
            inner = getattr(t, name)
            if isinstance(inner, torch.Tensor):
                yield from _storages(inner)
        return
    try:
        yield t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse tensors, tensors without storage
        return


class _TrackingMode(TorchDispatchMode):
    def __init__(self, tracker: MemoryTracker) -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        self.tracker._after_op(args, kwargs, out)
        return out


class MemoryTracker:
    """Context manager counting live tensor storage by category; see the module docstring.

    Args:
        model: module whose parameters, buffers and ``.grad`` are categorised (and, with
            ``track_modules``, whose submodule names activations are attributed to).
        optimizer: optimizer whose existing state is counted on entry (and whose held gradients are found
            as backward produces them). Any ``torch.optim.Optimizer`` stepped while tracking is scanned
            after its step, given here or not.
        device: only storage on this device is counted (``"cuda"`` matches every CUDA device). Default:
            the device of the model's first parameter, or every device without a model.
        track_modules: attribute activation bytes to the innermost submodule of ``model`` that was running
            when they were allocated (see ``module_activations``).
        granularity: bytes each storage is rounded up to. Default 512 on CUDA (caching allocator block),
            1 elsewhere (exact ``nbytes``).

    Use ``with MemoryTracker(model, opt) as mt: step()`` then read ``mt.peak_bytes``,
    ``mt.peak_breakdown``, ``mt.summary()``. The same tracker may be entered again (one step at a time);
    peaks carry over until ``reset_peak()``.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        device: str | torch.device | None = None,
        track_modules: bool = False,
        granularity: int | None = None,
    ) -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}.")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}; "
                "state kept elsewhere can be counted with tracker.register(tensors, 'optimizer_state')."
            )
        if track_modules and model is None:
            raise ValueError("track_modules=True needs a model: pass model=... to attribute activations.")
        if granularity is not None and (not isinstance(granularity, int) or granularity < 1):
            raise ValueError(f"granularity must be a positive int (bytes) or None, got {granularity!r}.")
        self.model = model
        self.optimizer = optimizer
        self.track_modules = track_modules
        self._device = self._resolve_device(device, model)
        if granularity is None:
            granularity = _CUDA_BLOCK_BYTES if self._device is not None and self._device.type == "cuda" else 1
        self.granularity = granularity
        self._lock = threading.RLock()
        self._seq = 0
        self._records: dict[int, _Record] = {}
        self._by_category = [0] * len(CATEGORIES)
        self._current = 0
        self._peak: _Peak | None = None
        self._run_peak: _Peak | None = None
        self.interval_peaks: list[int] = []
        self._forward_records: list[_Record] = []
        self._params: dict[int, weakref.ref] = {}
        self._optimizers: dict[int, weakref.ref] = {}
        self._module_names: dict[int, str] = {}
        self._module_stack: list[str] = []
        self._tag_stack: list[int] = []
        self._optimizer_depth = 0
        self._handles: list[Any] = []
        self._mode: _TrackingMode | None = None
        self._saved_hooks: Any = None
        self._active = False
        self._fake = False
        self._cuda_run_allocated = 0
        self._cuda_run_reserved = 0
        self._cuda_started = False
        self.module_activations: dict[str, int] = {}

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _resolve_device(device: str | torch.device | None, model: nn.Module | None) -> torch.device | None:
        if device is not None:
            try:
                return torch.device(device)
            except (RuntimeError, TypeError) as exc:
                raise ValueError(f"device={device!r} is not a torch device string such as 'cuda' or 'cpu'.") from exc
        if model is not None:
            for p in model.parameters():
                return p.device
        return None

    def __enter__(self) -> MemoryTracker:
        if self._active:
            raise RuntimeError("This MemoryTracker is already active; trackers of the same object do not nest.")
        self._fake = detect_fake_mode() is not None
        self._records = {}
        self._by_category = [0] * len(CATEGORIES)
        self._current = 0
        self._forward_records = []
        self._module_stack = []
        self._optimizer_depth = 0
        self._active = True
        if self.model is not None:
            for p in self.model.parameters():
                self._add_param(p)
            for b in self.model.buffers():
                self._classify(b, OTHER)
            if self.track_modules:
                self._module_names = {id(m): name for name, m in self.model.named_modules()}
        if self.optimizer is not None:
            self._add_optimizer(self.optimizer)
        self._rescan()
        if self._peak is None:
            self._peak = _Peak(self._current, self._seq, self._by_category)
            self._run_peak = _Peak(self._current, self._seq, self._by_category)
        else:
            self._observe_peaks()
        self._start_cuda()
        self._install_hooks()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._remove_hooks()
        with self._lock:
            self._rescan()
            self._active = False  # figures stay frozen at their values at exit
            self._records = {}  # dropping the weak references detaches their callbacks
            self._forward_records = []

    def _install_hooks(self) -> None:
        self._handles.append(register_optimizer_step_pre_hook(self._before_optimizer_step))
        self._handles.append(register_optimizer_step_post_hook(self._after_optimizer_step))
        for ref in self._params.values():
            p = ref()
            if p is not None and p.requires_grad and p.is_leaf:
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
        if self.track_modules:
            mod = torch.nn.modules.module
            self._handles.append(mod.register_module_forward_pre_hook(self._enter_module))
            self._handles.append(mod.register_module_forward_hook(self._leave_module, always_call=True))
        self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._saved_hooks.__enter__()
        self._mode = _TrackingMode(self)
        self._mode.__enter__()

    def _remove_hooks(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        if self._saved_hooks is not None:
            self._saved_hooks.__exit__(None, None, None)
            self._saved_hooks = None
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ bookkeeping
    def _matches(self, t: torch.Tensor) -> bool:
        d = self._device
        if d is None:
            return True
        td = t.device
        return td.type == d.type and (d.index is None or td.index == d.index)

    def _rounded(self, nbytes: int) -> int:
        g = self.granularity
        return nbytes if g == 1 else -(-nbytes // g) * g

    def _observe_peaks(self) -> None:
        assert self._peak is not None and self._run_peak is not None
        self._peak.observe(self._current, self._seq, self._by_category)
        self._run_peak.observe(self._current, self._seq, self._by_category)

    def _new_record(self, st: torch.UntypedStorage, category: int, forward: bool) -> None:
        nbytes = self._rounded(st.nbytes())
        if nbytes == 0:
            return
        ref = _StorageRef(st, self._on_free)
        ref.key = id(st)
        self._seq += 1
        module = None
        if forward and self.track_modules:
            module = self._module_stack[-1] if self._module_stack else OUTSIDE_MODEL
        record = _Record(ref, nbytes, category, self._seq, module)
        self._records[ref.key] = record
        self._current += nbytes
        self._by_category[category] += nbytes
        if forward and category == TEMPORARIES:
            self._forward_records.append(record)
        if self._peak is not None:
            self._observe_peaks()

    def _on_free(self, ref: _StorageRef) -> None:
        with self._lock:
            record = self._records.get(ref.key)
            if record is None or record.ref is not ref:
                return
            del self._records[ref.key]
            record.alive = False
            self._current -= record.nbytes
            self._by_category[record.category] -= record.nbytes

    def _recategorize(self, record: _Record, category: int) -> None:
        old = record.category
        if _RANK[category] >= _RANK[old]:
            return
        record.category = category
        self._by_category[old] -= record.nbytes
        self._by_category[category] += record.nbytes
        assert self._peak is not None and self._run_peak is not None
        self._peak.move(record, old, category)
        self._run_peak.move(record, old, category)

    def _resize(self, record: _Record, st: torch.UntypedStorage) -> None:
        nbytes = self._rounded(st.nbytes())
        delta = nbytes - record.nbytes
        if delta == 0:
            return
        self._current += delta
        self._by_category[record.category] += delta
        record.nbytes = nbytes
        self._seq += 1
        record.seq = self._seq  # treated as a new allocation for peak re-categorisation
        self._observe_peaks()

    def _classify(self, t: torch.Tensor, category: int) -> None:
        """Give every storage of ``t`` the role ``category`` (registering storages not seen yet)."""
        if not self._matches(t):
            return
        for st in _storages(t):
            record = self._records.get(id(st))
            if record is None:
                self._new_record(st, category, forward=False)
            else:
                self._recategorize(record, category)

    def _add_param(self, p: torch.Tensor) -> None:
        self._params.setdefault(id(p), weakref.ref(p))
        self._classify(p, PARAMETERS)

    def _add_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizers.setdefault(id(optimizer), weakref.ref(optimizer))
        for group in optimizer.param_groups:
            for p in group["params"]:
                self._add_param(p)

    def _rescan(self) -> None:
        """Re-read ``param.grad``, optimizer state and the gradients optimizers hold (all appear lazily)."""
        with self._lock:
            for ref in list(self._params.values()):
                p = ref()
                if p is not None and p.grad is not None:
                    self._classify(p.grad, GRADIENTS)
            for ref in list(self._optimizers.values()):
                opt = ref()
                if opt is not None:
                    for state in opt.state.values():
                        for t in _tensors(state):
                            self._classify(t, OPTIMIZER_STATE)
                    self._add_held_gradients(opt)

    def _add_held_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradients ``optimizer`` holds itself between backward and its update (``held_gradients()``)."""
        held = getattr(optimizer, "held_gradients", None)
        if held is not None:
            for t in held():
                self._classify(t, GRADIENTS)

    def _promote_forward_survivors(self) -> None:
        """Backward is starting: forward allocations still alive are activations."""
        per_module: dict[str, int] = {}
        for record in self._forward_records:
            if record.alive:
                self._recategorize(record, ACTIVATIONS)
                if record.category == ACTIVATIONS and record.module is not None:
                    per_module[record.module] = per_module.get(record.module, 0) + record.nbytes
        self._forward_records = []
        self._module_stack = []
        if self.track_modules:
            self.module_activations = per_module

    # ------------------------------------------------------------------ hooks
    def _after_op(self, args: Any, kwargs: Any, out: Any) -> None:
        with self._lock:
            if not self._active:
                return
            in_backward = torch._C._current_autograd_node() is not None
            if in_backward and self._forward_records:
                self._promote_forward_survivors()
            records = self._records
            for t in _tensors(args):
                for st in _storages(t):
                    if id(st) not in records:
                        self._see_input(t, st)
            if kwargs:
                for t in _tensors(kwargs):
                    for st in _storages(t):
                        if id(st) not in records:
                            self._see_input(t, st)
            if self._tag_stack:
                category, forward = self._tag_stack[-1], False
            else:
                category = TEMPORARIES
                forward = not in_backward and self._optimizer_depth == 0 and torch.is_grad_enabled()
            for t in _tensors(out):
                for st in _storages(t):
                    record = records.get(id(st))
                    if record is None:
                        if self._matches(t):
                            self._new_record(st, category, forward)
                    elif record.nbytes != self._rounded(st.nbytes()):
                        self._resize(record, st)

    def _see_input(self, t: torch.Tensor, st: torch.UntypedStorage) -> None:
        """An op reads storage not seen yet: it existed before entering (parameters, inputs, buffers)."""
        if not self._matches(t):
            return
        if isinstance(t, nn.Parameter):
            self._params.setdefault(id(t), weakref.ref(t))
            self._new_record(st, PARAMETERS, forward=False)
        else:
            self._new_record(st, OTHER, forward=False)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        with self._lock:
            if self._active and self._matches(t):
                for st in _storages(t):
                    record = self._records.get(id(st))
                    if record is not None and record.category == TEMPORARIES:
                        self._recategorize(record, ACTIVATIONS)
        return t

    def _on_grad(self, p: torch.Tensor) -> None:
        with self._lock:
            if not self._active:
                return
            if p.grad is not None:
                self._classify(p.grad, GRADIENTS)
                return
            for ref in list(self._optimizers.values()):  # an optimizer's earlier hook consumed it and may hold it
                opt = ref()
                if opt is not None:
                    self._add_held_gradients(opt)

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        with self._lock:
            self._optimizer_depth += 1
            if self._active:
                self._add_optimizer(optimizer)
                self._rescan()

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        with self._lock:
            self._optimizer_depth = max(0, self._optimizer_depth - 1)
            if self._active:
                self._rescan()

    def _enter_module(self, module: nn.Module, args: Any) -> None:
        name = self._module_names.get(id(module))
        if name is not None:
            self._module_stack.append(name or MODEL_ROOT)

    def _leave_module(self, module: nn.Module, args: Any, output: Any) -> None:
        name = self._module_names.get(id(module))
        if name is not None and self._module_stack and self._module_stack[-1] == (name or MODEL_ROOT):
            self._module_stack.pop()

    # ------------------------------------------------------------------ public API
    def register(self, tensors: torch.Tensor | Iterable[torch.Tensor], category: str = "other") -> None:
        """Count ``tensors`` (alive now, possibly created before entering) under ``category``."""
        index = _category_index(category)
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        with self._lock:
            if not self._active:
                raise RuntimeError("register() needs an active tracker: call it inside `with tracker:`.")
            for t in tensors:
                self._classify(t, index)
            self._observe_peaks()

    @contextmanager
    def tagging(self, category: str) -> Iterator[None]:
        """Allocations made inside this block are counted under ``category`` (e.g. batches as ``other``)."""
        index = _category_index(category)
        self._tag_stack.append(index)
        try:
            yield
        finally:
            self._tag_stack.pop()

    @property
    def current_bytes(self) -> int:
        """Bytes of live tracked storage now (at exit if the tracker is not active)."""
        return self._current

    def current_breakdown(self) -> dict[str, int]:
        """Live bytes per category now (re-reads gradients and optimizer state first)."""
        if self._active:
            self._rescan()
        return dict(zip(CATEGORIES, self._by_category))

    @property
    def peak_bytes(self) -> int:
        """Peak of the current logging interval (since entry or the last ``reset_peak``)."""
        return self._peak.bytes if self._peak is not None else 0

    @property
    def peak_breakdown(self) -> dict[str, int]:
        """Bytes per category live at the interval peak."""
        if self._peak is None:
            return dict.fromkeys(CATEGORIES, 0)
        if self._active:
            self._rescan()
        return dict(zip(CATEGORIES, self._peak.by_category))

    @property
    def run_peak_bytes(self) -> int:
        """Peak over every interval since the tracker was first entered."""
        return self._run_peak.bytes if self._run_peak is not None else 0

    @property
    def run_peak_breakdown(self) -> dict[str, int]:
        if self._run_peak is None:
            return dict.fromkeys(CATEGORIES, 0)
        if self._active:
            self._rescan()
        return dict(zip(CATEGORIES, self._run_peak.by_category))

    def reset_peak(self) -> None:
        """Close the current logging interval (its peak goes to ``interval_peaks``) and start a new one."""
        with self._lock:
            if self._peak is None:
                raise RuntimeError("reset_peak() before the tracker was entered: nothing to reset.")
            if self._active:
                self._rescan()
            self.interval_peaks.append(self._peak.bytes)
            self._peak = _Peak(self._current, self._seq, self._by_category)
        if self._cuda_device() is not None:
            dev = self._cuda_device()
            self._cuda_run_allocated = max(self._cuda_run_allocated, torch.cuda.max_memory_allocated(dev))
            self._cuda_run_reserved = max(self._cuda_run_reserved, torch.cuda.max_memory_reserved(dev))
            torch.cuda.reset_peak_memory_stats(dev)

    def _cuda_device(self) -> torch.device | None:
        d = self._device
        if d is None or d.type != "cuda" or self._fake or not torch.cuda.is_available():
            return None
        return torch.device("cuda", d.index if d.index is not None else torch.cuda.current_device())

    def _start_cuda(self) -> None:
        dev = self._cuda_device()
        if dev is not None and not self._cuda_started:
            torch.cuda.reset_peak_memory_stats(dev)
            self._cuda_started = True

    def cuda_peaks(self) -> dict[str, int] | None:
        """CUDA allocator peaks (bytes) for the interval and the run; ``None`` off CUDA or on fake tensors.

        ``allocated`` is what tensors occupied (comparable to ``peak_bytes``, plus workspaces); ``reserved``
        is what the caching allocator holds from the driver: the number that decides an out-of-memory error.
        The tracker resets CUDA peak statistics when first entered and at every ``reset_peak()``.
        """
        dev = self._cuda_device()
        if dev is None or not self._cuda_started:
            return None
        allocated = torch.cuda.max_memory_allocated(dev)
        reserved = torch.cuda.max_memory_reserved(dev)
        return {
            "allocated": allocated,
            "reserved": reserved,
            "run_allocated": max(allocated, self._cuda_run_allocated),
            "run_reserved": max(reserved, self._cuda_run_reserved),
        }

    def module_activation_bytes(self, depth: int | None = None) -> dict[str, int]:
        """Activation bytes of the last forward per submodule name, summed to ``depth`` name components."""
        if not self.track_modules:
            raise ValueError("module_activation_bytes() needs MemoryTracker(..., track_modules=True).")
        if depth is None:
            return dict(self.module_activations)
        if depth < 1:
            raise ValueError(f"depth must be >= 1 or None, got {depth}.")
        out: dict[str, int] = {}
        for name, nbytes in self.module_activations.items():
            key = name if name in (OUTSIDE_MODEL, MODEL_ROOT) else ".".join(name.split(".")[:depth])
            out[key] = out.get(key, 0) + nbytes
        return out

    def summary(self, name: str = "run", source: str = "tracked", target_device: str | None = None) -> MemoryReport:
        """Run-level report: run peak and its breakdown, per-interval peaks, state now, CUDA peaks."""
        end = self.current_breakdown()
        intervals = [*self.interval_peaks, self.peak_bytes]
        device = target_device or (str(self._device) if self._device is not None else "all")
        notes = []
        if self.granularity > 1:
            notes.append(f"storage sizes rounded up to {self.granularity}-byte blocks")
        return MemoryReport(
            name=name,
            source=source,
            device=device,
            peak_bytes=self.run_peak_bytes,
            breakdown=self.run_peak_breakdown,
            end_bytes=sum(end.values()),
            end_breakdown=end,
            interval_peak_bytes=intervals,
            cuda=self.cuda_peaks(),
            module_activations=dict(self.module_activations) if self.track_modules else None,
            meta=self._model_meta(),
            notes=notes,
        )

    def _model_meta(self) -> dict:
        """The tracked model's architecture (the Hugging Face class inside adapters and engine wrappers) and
        its parameter count."""
        if self.model is None:
            return {}
        inner = self.model
        while True:
            if callable(getattr(inner, "get_base_model", None)) and inner.get_base_model() is not inner:
                inner = inner.get_base_model()  # PEFT
            elif isinstance(getattr(inner, "module", None), nn.Module):
                inner = inner.module  # DDP, DeepSpeed
            else:
                break
        return {"architecture": type(inner).__name__,
                "parameters": sum(p.numel() for p in self.model.parameters())}


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


def _category_index(category: str) -> int:
    if category not in CATEGORIES:
        raise ValueError(f"category must be one of {', '.join(CATEGORIES)}; got {category!r}.")
    return CATEGORIES.index(category)


def track(
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    **kwargs: Any,
) -> MemoryTracker:
    """``with memft.memory.track(model, opt) as mt: step()`` — a ``MemoryTracker`` (same arguments)."""
    return MemoryTracker(model=model, optimizer=optimizer, **kwargs)
