"""Patch an HF / PyTorch model in place so that what autograd saves for backward is compressed, per module.

``compress_activations(model, method, **options)`` finds the modules a method handles and replaces their
``forward`` (an instance attribute; the class is untouched) by one that runs the original forward inside a custom
autograd Function saving compressed tensors:

* ``linear``     -- ``nn.Linear`` (also peft LoRA's ``base_layer``/``lora_A``/``lora_B``); the saved input
  (only saved when the weight is trainable, as in plain autograd).
* ``activation`` -- GELU variants (``nn.GELU``, transformers' ``GELUActivation``, ``NewGELUActivation``,
  ``GELUTanh``, ``FastGELUActivation``, ``AccurateGELUActivation``, ``QuickGELUActivation``), SiLU
  (``nn.SiLU``, ``SiLUActivation``) and ``nn.ReLU`` (1-bit exact mask).
* ``norm``       -- ``nn.LayerNorm``, ``nn.RMSNorm`` and leaf classes named ``*RMSNorm`` / ``*LayerNorm``
  (Llama, Gemma, T5, ...): saved input.
* ``dropout``    -- ``nn.Dropout``: a 1-bit keep mask instead of a bool (CUDA) or float (CPU) one; exact.
* ``attention``  -- the innermost ``*Attention`` modules: while they run, a ``TorchFunctionMode`` routes
  ``softmax``, batched ``matmul`` and ``dropout`` calls (eager attention) to compressed Functions. SDPA/flash
  attention call none of them (and save no softmax), so nothing is changed there.

Forward outputs are bit-exact: every Function computes its output with the original op. The returned
:class:`CompressionHandle` lists each change (module name, kind, storage) and :meth:`CompressionHandle.undo`
restores the model exactly.

Gradient checkpointing (reentrant and non-reentrant) is supported: compressed tensors go through
``ctx.save_for_backward``, state changes wait until backward ends (see :mod:`memft.activations.state`) and random
draws use the global generator, which checkpointing restores, so recomputation rebuilds the same compressed
tensors. ``torch.compile`` is refused: the compressors keep Python-side state updated from backward and make
data-dependent choices (ranges, sampled rows) that a compiled graph would freeze or break on.
"""

from __future__ import annotations

import importlib
import weakref
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .codecs import Encoded, RangeCodec
from .functions import (
    CompressedLinear,
    CompressedMatmul,
    CompressedRecompute,
    CompressedSoftmax,
    DropoutMask,
    ReluMask,
)
from .state import EncodeCache

__all__ = [
    "KINDS",
    "METHODS",
    "Change",
    "Site",
    "Compressor",
    "CompressionHandle",
    "compress_activations",
    "activation_function",
    "classify",
]

KINDS = ("linear", "activation", "norm", "dropout", "attention")
METHODS = {"mesa": "memft.activations.mesa", "wta_crs": "memft.activations.wta_crs", "s2a": "memft.activations.s2a"}

_ACTIVATION_CLASSES = {
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
    "AccurateGELUActivation": "gelu_tanh",
    "QuickGELUActivation": "quick_gelu",
    "SiLUActivation": "silu",
}
_SOFTMAX_FUNCS = {torch.nn.functional.softmax, torch.softmax, torch.Tensor.softmax}
_DROPOUT_FUNCS = {torch.nn.functional.dropout}
_MATMUL_FUNCS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm}
_PATCHED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def activation_function(module: nn.Module) -> str | None:
    """Name of the pointwise function a module computes ('gelu', 'gelu_tanh', 'quick_gelu', 'silu', 'relu'), or None."""
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else "gelu_tanh"
    if isinstance(module, nn.SiLU):
        return "silu"
    return _ACTIVATION_CLASSES.get(type(module).__name__)


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return True
    name = type(module).__name__
    return next(module.children(), None) is None and (name.endswith("RMSNorm") or name.endswith("LayerNorm"))


def _is_attention(module: nn.Module) -> bool:
    if not type(module).__name__.endswith("Attention"):
        return False
    return not any(type(m).__name__.endswith("Attention") for m in module.modules() if m is not module)


def classify(module: nn.Module) -> str | None:
    """The kind ('linear', 'activation', 'norm', 'dropout', 'attention') memft compresses in this module, or None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module) is nn.Dropout:
        return "dropout"
    if activation_function(module) is not None:
        return "activation"
    if _is_norm(module):
        return "norm"
    if _is_attention(module):
        return "attention"
    return None


def _refuse_compiling() -> None:
    if torch.compiler.is_compiling():
        raise ValueError(
            "memft activation compression cannot run under torch.compile: it keeps Python-side state updated "
            "from backward (ranges, gradient-norm estimates) and makes data-dependent choices per batch. "
            "Compile the model without compress_activations, or call handle.undo() before torch.compile."
        )


def _needs_grad(x: torch.Tensor, params: Sequence[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))


@dataclass(frozen=True)
class Change:
    """One patched module: its qualified name, kind, class and how its saved tensors are stored."""

    name: str
    kind: str
    module_class: str
    storage: str


class Site:
    """A module being patched: its name, the module, its original ``forward`` and the handle's shared services.

    ``is_head`` marks the model's output layer (``get_output_embeddings()``).
    """

    def __init__(
        self, name: str, module: nn.Module, original: Callable, handle: CompressionHandle, is_head: bool = False
    ) -> None:
        self.name, self.module, self.original, self._handle = name, module, original, handle
        self.is_head = is_head

    def tracker(self, key: str, factory: Callable[[], Any]) -> Any:
        return self._handle._tracker(f"{self.name}{key}", factory)

    @property
    def cache(self) -> EncodeCache:
        return self._handle._cache


class Compressor:
    """Base of a method: returns the replacement forward per kind, or None to leave a module as it is.

    Subclasses override the hooks they support and set ``softmax_codec`` / ``matmul_codec`` for attention.
    Dropout masks are stored at 1 bit by every method (exact), inside attention modules too.
    """

    name = "base"
    softmax_codec: Any = None
    matmul_codec: Any = None
    pack_dropout = True

    def linear(self, site: Site) -> tuple[Callable, str] | None:
        return None

    def activation(self, site: Site, function: str) -> tuple[Callable, str] | None:
        return None

    def norm(self, site: Site) -> tuple[Callable, str] | None:
        return None

    def dropout(self, site: Site) -> tuple[Callable, str] | None:
        return (dropout_forward(site), "1-bit mask (exact)") if self.pack_dropout else None

    def attention(self, site: Site) -> tuple[Callable, str] | None:
        if self.softmax_codec is None and self.matmul_codec is None and not self.pack_dropout:
            return None
        dropout = "1-bit mask" if self.pack_dropout else "unchanged"
        return attention_forward(site, self.softmax_codec, self.matmul_codec, self.pack_dropout), (
            f"softmax: {_describe(self.softmax_codec)}; matmul operands: {_describe(self.matmul_codec)}; "
            f"dropout: {dropout}"
        )


def _describe(codec: Any) -> str:
    if codec is None:
        return "unchanged"
    return getattr(codec, "description", None) or f"{codec.bits}-bit {type(codec).__name__}"


# --- replacement forwards shared by the methods -------------------------------------------------------------


def linear_forward(site: Site, codec: RangeCodec) -> Callable:
    """Linear forward saving ``codec``-encoded input for the weight gradient (shared among same-input layers)."""
    module, original = site.module, site.original
    tracker = site.tracker("", codec.make_tracker)
    cache, key = site.cache, ("linear", codec)

    def forward(x: torch.Tensor) -> torch.Tensor:
        _refuse_compiling()
        weight = module.weight
        if not weight.requires_grad or not _needs_grad(x, (weight,)):
            return original(x)
        tensors, meta = cache.get_or_encode(x, key, lambda: codec.encode(x, tracker))
        return CompressedLinear.apply(x, weight, module.bias, original, Encoded(tensors, meta, codec, tracker))

    return forward


def recompute_forward(site: Site, codec: RangeCodec) -> Callable:
    """Pointwise/norm forward saving the ``codec``-encoded input; backward is the VJP at the decoded input."""
    module, original = site.module, site.original
    tracker = site.tracker("", codec.make_tracker)
    cache, key = site.cache, ("input", codec)

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        _refuse_compiling()
        params = tuple(module.parameters(recurse=False))
        if args or kwargs or not _needs_grad(x, params):
            return original(x, *args, **kwargs)
        tensors, meta = cache.get_or_encode(x, key, lambda: codec.encode(x, tracker))
        return CompressedRecompute.apply(x, original, Encoded(tensors, meta, codec, tracker), *params)

    return forward


def relu_forward(site: Site) -> Callable:
    """ReLU forward saving a 1-bit mask (exact gradient)."""
    original = site.original

    def forward(x: torch.Tensor) -> torch.Tensor:
        _refuse_compiling()
        if not _needs_grad(x, ()):
            return original(x)
        return ReluMask.apply(x, original)

    return forward


def dropout_forward(site: Site) -> Callable:
    """Dropout forward saving a 1-bit keep mask (exact; same random draws as ``F.dropout``)."""
    module, original = site.module, site.original

    def forward(x: torch.Tensor) -> torch.Tensor:
        _refuse_compiling()
        p = module.p
        if not module.training or p <= 0.0 or p >= 1.0 or not _needs_grad(x, ()):
            return original(x)
        return DropoutMask.apply(x, p)

    return forward


class _AttentionOps(TorchFunctionMode):
    """Routes softmax, batched matmul and dropout calls inside one attention forward to compressed Functions."""

    def __init__(
        self, site: Site, softmax_codec: Any, matmul_codec: Any, pack_dropout: bool, matmul_sampler: Any = None
    ) -> None:
        super().__init__()
        self.site, self.softmax_codec, self.matmul_codec = site, softmax_codec, matmul_codec
        self.pack_dropout, self.matmul_sampler = pack_dropout, matmul_sampler
        self.count = 0

    def tracker(self, label: str, factory: Callable[[], Any]) -> Any:
        """The state of the next saving op of this attention forward (keys are stable across steps)."""
        self.count += 1
        return self.site.tracker(f".{label}{self.count}", factory)

    def _tracker(self, label: str, codec: Any) -> Any:
        return self.tracker(label, codec.make_tracker)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if torch.is_grad_enabled():
            if func in _SOFTMAX_FUNCS and self.softmax_codec is not None:
                x = args[0]
                dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
                if isinstance(x, torch.Tensor) and x.requires_grad and isinstance(dim, int):
                    tracker = self._tracker("softmax", self.softmax_codec)
                    return CompressedSoftmax.apply(x, func, args, kwargs, dim, self.softmax_codec, tracker)
            if func in _DROPOUT_FUNCS and self.pack_dropout:
                x = args[0]
                p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
                training = kwargs.get("training", args[2] if len(args) > 2 else True)
                inplace = kwargs.get("inplace", args[3] if len(args) > 3 else False)
                if isinstance(x, torch.Tensor) and x.requires_grad and training and not inplace and 0.0 < p < 1.0:
                    return DropoutMask.apply(x, float(p))
            sampled = self.matmul_sampler is not None
            if func in _MATMUL_FUNCS and (sampled or self.matmul_codec is not None) and len(args) >= 2 and not kwargs:
                a, b = args[0], args[1]
                if (
                    isinstance(a, torch.Tensor)
                    and isinstance(b, torch.Tensor)
                    and a.dim() >= 3
                    and b.dim() >= 3
                    and (a.requires_grad or b.requires_grad)
                    and not isinstance(a, nn.Parameter)
                    and not isinstance(b, nn.Parameter)
                ):
                    if sampled:
                        out = self.matmul_sampler(self, a, b, func)
                        if out is not None:
                            return out
                    if self.matmul_codec is None:
                        return func(*args)
                    ta = self._tracker("matmul_a", self.matmul_codec)
                    tb = self._tracker("matmul_b", self.matmul_codec)
                    return CompressedMatmul.apply(a, b, func, self.matmul_codec, ta, tb)
        return func(*args, **kwargs)


def attention_forward(
    site: Site, softmax_codec: Any, matmul_codec: Any, pack_dropout: bool, matmul_sampler: Any = None
) -> Callable:
    """Attention forward run under :class:`_AttentionOps` when gradients are recorded.

    ``matmul_sampler(ops, a, b, func)``, if given, handles batched matmuls first (returning None declines: the
    matmul then goes to ``matmul_codec``, or to autograd if there is none).
    """
    original = site.original

    def forward(*args: Any, **kwargs: Any) -> Any:
        _refuse_compiling()
        if not torch.is_grad_enabled():
            return original(*args, **kwargs)
        with _AttentionOps(site, softmax_codec, matmul_codec, pack_dropout, matmul_sampler):
            return original(*args, **kwargs)

    return forward


# --- the handle and the entry point ---------------------------------------------------------------------------


class CompressionHandle:
    """Result of :func:`compress_activations`: what changed, tracker state, and :meth:`undo`."""

    def __init__(self, model: nn.Module, method: str, options: dict[str, Any]) -> None:
        self.method, self.options = method, dict(options)
        self.changes: list[Change] = []
        self.skipped: list[tuple[str, str]] = []
        self._model = weakref.ref(model)
        self._restore: list[tuple[nn.Module, bool, Any]] = []
        self._trackers: dict[str, Any] = {}
        self._cache = EncodeCache()
        self.active = True

    def _tracker(self, key: str, factory: Callable[[], Any]) -> Any:
        if key not in self._trackers:
            tracker = factory()
            tracker.seed_base = zlib.crc32(key.encode())
            self._trackers[key] = tracker
        return self._trackers[key]

    def _install(self, name: str, kind: str, module: nn.Module, forward: Callable, storage: str) -> None:
        had_instance_forward = "forward" in module.__dict__
        self._restore.append((module, had_instance_forward, module.__dict__.get("forward")))
        module.forward = forward
        _PATCHED.add(module)
        self.changes.append(Change(name, kind, type(module).__name__, storage))

    def undo(self) -> None:
        """Restore every patched module's original ``forward`` and drop all compressor state."""
        for module, had_instance_forward, previous in reversed(self._restore):
            if had_instance_forward:
                module.forward = previous
            else:
                module.__dict__.pop("forward", None)
            _PATCHED.discard(module)
        self._restore.clear()
        self._trackers.clear()
        self._cache.clear()
        self.active = False

    def names(self, kind: str | None = None) -> list[str]:
        """Qualified names of the patched modules (of one kind if given)."""
        return [c.name for c in self.changes if kind is None or c.kind == kind]

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """Tracker state (EMA ranges, gradient-norm estimates) as plain tensors, for checkpoints."""
        return {key: t.state_dict() for key, t in self._trackers.items() if t.state_dict()}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        unknown = sorted(set(state) - set(self._trackers))
        if unknown:
            raise ValueError(
                f"state has entries for sites this handle does not have: {unknown[:5]}. Load the state into a "
                "handle made by the same method, options and model (run one forward pass first for attention sites)."
            )
        for key, value in state.items():
            self._trackers[key].load_state_dict(value)

    def summary(self) -> str:
        lines = [f"{self.method}: {len(self.changes)} modules changed, {len(self.skipped)} skipped"]
        lines += [f"  {c.kind:<10} {c.name} ({c.module_class}): {c.storage}" for c in self.changes]
        lines += [f"  skipped    {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"CompressionHandle(method={self.method!r}, changes={len(self.changes)}, active={self.active})"


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None) is not None:
        raise ValueError(
            "compress_activations got a torch.compile'd model. Compression is refused under torch.compile: the "
            "compressors keep Python-side state updated from backward and make data-dependent choices per batch. "
            "Pass the uncompiled module (model._orig_mod) and do not compile it."
        )
    already = [n for n, m in model.named_modules() if m in _PATCHED]
    if already:
        raise ValueError(
            f"modules {already[:3]} are already compressed by memft. Call .undo() on the earlier handle first; "
            "one handle per model (a method's options choose what it does for each kind of module)."
        )


def compress_activations(
    model: nn.Module,
    method: str,
    *,
    targets: Sequence[str] = KINDS,
    exclude: Sequence[str] = (),
    **options: Any,
) -> CompressionHandle:
    """Compress what ``model`` saves for backward with ``method`` ('mesa', 'wta_crs' or 's2a'), in place.

    ``targets`` limits the kinds patched (subset of ``KINDS``); modules whose qualified name contains any string in
    ``exclude`` are left alone; other ``options`` go to the method (see its ``build_compressor``).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown: choose one of {sorted(METHODS)}.")
    bad = [t for t in targets if t not in KINDS]
    if bad or isinstance(targets, str):
        raise ValueError(f"targets={targets!r} must be a sequence drawn from {KINDS}, e.g. targets=('linear',).")
    if isinstance(exclude, str):
        raise TypeError(f"exclude must be a sequence of strings, e.g. exclude=('lm_head',), got {exclude!r}.")
    _check_model(model)
    compressor: Compressor = importlib.import_module(METHODS[method]).build_compressor(**options)
    handle = CompressionHandle(model, method, options)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    for name, module in model.named_modules():
        kind = classify(module)
        if kind is None or kind not in targets or any(s in name for s in exclude):
            continue
        site = Site(name, module, module.forward, handle, is_head=module is head)
        if kind == "linear" and type(module).forward is not nn.Linear.forward:
            handle.skipped.append((name, f"{type(module).__name__} overrides Linear.forward"))
            continue
        if kind in ("activation", "dropout") and getattr(module, "inplace", False):
            handle.skipped.append((name, f"in-place {kind}"))
            continue
        if kind == "activation":
            result = compressor.activation(site, activation_function(module))  # type: ignore[arg-type]
        else:
            result = getattr(compressor, kind)(site)
        if result is None:
            if site.is_head and kind == "linear":
                handle.skipped.append((name, f"output layer left exact by {method}"))
            continue
        forward, storage = result
        handle._install(name, kind, module, forward, storage)
    return handle
