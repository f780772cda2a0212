"""S2A: activation-light fine-tuning (arXiv 2503.08154) -- non-parametric storage plus parametric options.

Non-parametric side (``compress_activations(model, "s2a", ...)``):

* pointwise nonlinearities (GELU variants, QuickGELU, SiLU) save a ``bits``-bit (default 4) index into a
  piecewise-constant approximation of the derivative ``f'``: the levels are the Lloyd-Max quantiser of ``f'(X)``,
  ``X ~ N(0, input_std^2)`` (the weighted-error criterion of "Few-bit backward", arXiv 2202.00441), and the index
  of x is that of the level nearest to ``f'(x)``. Backward is ``dx = dy * level[index]``; per element
  ``|dx - dy f'(x)| <= |dy| * max_error`` (:func:`derivative_levels`). ReLU saves a 1-bit mask (exact).
* softmax (eager attention) saves its output at ``softmax_bits`` (default 4) bits with one scale and offset per
  row (attention rows differ by orders of magnitude, a per-head range would round most of them to 0) and
  stochastic rounding (unbiased for the stored probabilities).
* LayerNorm/RMSNorm save their input at ``norm_bits`` (default 8) bits, per channel group (memft's choice: the
  paper gives no recipe; 8 bits keep the normalisation Jacobian accurate), backward by VJP at the decoded input.
* Linear layers and attention matmuls are left to autograd: with S2A's parametric modes the Linear weights are
  frozen, and autograd then saves no Linear input at all.

Parametric side (:func:`apply_parametric`): ``mode="bias"`` trains only biases and normalisation weights;
``mode="side"`` freezes the whole backbone and trains a small ladder side network fed by the detached block
outputs, whose output is added to the head's input (so no backbone activation is saved for backward).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily

from memft.kernels.quant import pack_codes, unpack_codes

from .mesa import mesa_codec
from .patch import Compressor, Site, _is_norm, _needs_grad, _refuse_compiling, recompute_forward, relu_forward

__all__ = [
    "DERIVATIVES",
    "DerivativeTable",
    "derivative_levels",
    "DerivativeIndex",
    "S2ACompressor",
    "build_compressor",
    "SideNetwork",
    "ParametricHandle",
    "apply_parametric",
]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_prime(x: torch.Tensor) -> torch.Tensor:
    cdf = 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return cdf + x * pdf


def _gelu_tanh_prime(x: torch.Tensor) -> torch.Tensor:
    t = torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)


def _sigmoid_gate_prime(x: torch.Tensor, beta: float) -> torch.Tensor:
    s = torch.sigmoid(beta * x)
    return s + beta * x * s * (1.0 - s)


DERIVATIVES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": _gelu_prime,
    "gelu_tanh": _gelu_tanh_prime,
    "quick_gelu": functools.partial(_sigmoid_gate_prime, beta=1.702),
    "silu": functools.partial(_sigmoid_gate_prime, beta=1.0),
}


@dataclass(frozen=True)
class DerivativeTable:
    """Levels ``(2**bits,)`` and decision boundaries ``(2**bits - 1,)`` for f' (float32, CPU), and the error bound."""

    function: str
    bits: int
    levels: torch.Tensor
    boundaries: torch.Tensor
    max_error: float
    weighted_rms_error: float


@functools.cache
def derivative_levels(function: str, bits: int = 4, input_std: float = 1.0) -> DerivativeTable:
    """Lloyd-Max quantiser of ``f'(X)``, ``X ~ N(0, input_std^2)``, with ``2**bits`` levels (computed once).

    ``max_error`` bounds ``|f'(x) - level(x)|`` for every real x: the larger of half the widest gap between
    adjacent levels and the distance from the outer levels to the extremes of f'. Computed on real CPU tensors
    even when called under ``FakeTensorMode``.
    """
    with unset_fake_temporarily():
        return _lloyd_max(function, bits, input_std)


def _lloyd_max(function: str, bits: int, input_std: float) -> DerivativeTable:
    if function not in DERIVATIVES:
        raise ValueError(f"function={function!r} has no derivative table; known: {sorted(DERIVATIVES)}.")
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"bits={bits!r} must be 1, 2, 4 or 8 (whole codes per byte).")
    if not input_std > 0:
        raise ValueError(f"input_std={input_std!r} must be positive (standard deviation of the inputs).")
    x = torch.linspace(-9.0, 9.0, 6001, dtype=torch.float64) * input_std
    v = DERIVATIVES[function](x)
    w = torch.exp(-0.5 * (x / input_std) ** 2)
    w = w / w.sum()
    v, order = torch.sort(v)
    w = w[order]
    zero = torch.zeros(1, dtype=torch.float64)
    cum_w, cum_wv = torch.cat([zero, torch.cumsum(w, 0)]), torch.cat([zero, torch.cumsum(w * v, 0)])
    count = 1 << bits
    quantiles = (torch.arange(count, dtype=torch.float64) + 0.5) / count
    levels = v[torch.searchsorted(cum_w[1:], quantiles).clamp(max=v.numel() - 1)]
    last = torch.tensor([v.numel()])
    for _ in range(2000):
        # cells are contiguous runs of the sorted values: v in (b_{j-1}, b_j] belongs to level j
        cuts = torch.searchsorted(v, 0.5 * (levels[1:] + levels[:-1]), right=True)
        edges = torch.cat([torch.zeros(1, dtype=torch.long), cuts, last])
        mass = cum_w[edges[1:]] - cum_w[edges[:-1]]
        total = cum_wv[edges[1:]] - cum_wv[edges[:-1]]
        updated = torch.where(mass > 0, total / mass.clamp_min(1e-300), levels)
        if float((updated - levels).abs().max()) < 1e-7:
            break
        levels = updated
    boundaries = 0.5 * (levels[1:] + levels[:-1])
    fine = DERIVATIVES[function](torch.linspace(-40.0, 40.0, 40001, dtype=torch.float64) * input_std)
    gap = float((levels[1:] - levels[:-1]).max()) / 2 if count > 1 else 0.0
    max_error = max(gap, float(fine.max() - levels[-1]), float(levels[0] - fine.min()))
    rms = float(torch.sqrt((w * (v - levels[torch.bucketize(v, boundaries)]) ** 2).sum()))
    return DerivativeTable(function, bits, levels.float(), boundaries.float(), max_error, rms)


_tables_on_device: dict[tuple[str, int, float, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _table_on(function: str, bits: int, input_std: float, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Levels and boundaries on ``like``'s device (cached for real tensors, rebuilt under FakeTensorMode)."""
    table = derivative_levels(function, bits, input_std)
    if is_fake(like):
        mode = like.fake_mode
        return mode.from_tensor(table.levels).to(like.device), mode.from_tensor(table.boundaries).to(like.device)
    key = (function, bits, input_std, like.device)
    if key not in _tables_on_device:
        _tables_on_device[key] = (table.levels.to(like.device), table.boundaries.to(like.device))
    return _tables_on_device[key]


class DerivativeIndex(torch.autograd.Function):
    """y = original(x) exactly; saves ``bits``-bit indices of the level nearest to f'(x); dx = dy * level[index]."""

    @staticmethod
    def forward(ctx, x, original: Callable, function: str, bits: int, input_std: float):  # type: ignore[override]
        y = original(x)
        levels, boundaries = _table_on(function, bits, input_std, x)
        codes = torch.bucketize(DERIVATIVES[function](x.detach().float()), boundaries).to(torch.uint8)
        ctx.levels, ctx.bits, ctx.shape, ctx.numel = levels, bits, x.shape, x.numel()
        ctx.save_for_backward(pack_codes(codes, bits))
        return y

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (packed,) = ctx.saved_tensors
        codes = unpack_codes(packed, ctx.bits, ctx.numel).reshape(ctx.shape)
        slope = ctx.levels[codes.long()]
        return (grad_out.float() * slope).to(grad_out.dtype), None, None, None, None


class S2ACompressor(Compressor):
    """S2A's non-parametric storage: derivative indices, low-bit softmax outputs, 8-bit norm inputs."""

    name = "s2a"

    def __init__(self, bits: int, softmax_bits: int, norm_bits: int, input_std: float, momentum: float) -> None:
        self.bits, self.input_std = bits, input_std
        self.norm_codec = mesa_codec(norm_bits, rounding="nearest", momentum=momentum)
        self.softmax_codec = replace(mesa_codec(softmax_bits, rounding="stochastic", momentum=momentum), per_row=True)
        self.matmul_codec = None

    def activation(self, site: Site, function: str) -> tuple[Callable, str]:
        if function == "relu":
            return relu_forward(site), "1-bit mask (exact)"
        derivative_levels(function, self.bits, self.input_std)
        original, bits, input_std = site.original, self.bits, self.input_std

        def forward(x: torch.Tensor) -> torch.Tensor:
            _refuse_compiling()
            if not _needs_grad(x, ()):
                return original(x)
            return DerivativeIndex.apply(x, original, function, bits, input_std)

        return forward, f"{bits}-bit index of f' level ({function})"

    def norm(self, site: Site) -> tuple[Callable, str]:
        return recompute_forward(site, self.norm_codec), f"{self.norm_codec.bits}-bit input"


def build_compressor(
    bits: int = 4, softmax_bits: int = 4, norm_bits: int = 8, input_std: float = 1.0, momentum: float = 0.9
) -> S2ACompressor:
    """Options of ``compress_activations(model, "s2a", ...)``.

    bits: index width for nonlinearities' derivative levels (4 in the paper). softmax_bits: width of the stored
    softmax output (4). norm_bits: width of stored norm inputs (8). input_std: standard deviation of the Gaussian
    input density the levels are fitted to. momentum: EMA weight of softmax/norm ranges.
    """
    for label, value in (("bits", bits), ("softmax_bits", softmax_bits), ("norm_bits", norm_bits)):
        if value not in (2, 4, 8):
            raise ValueError(f"{label}={value!r} must be 2, 4 or 8.")
    if not input_std > 0:
        raise ValueError(f"input_std={input_std!r} must be positive.")
    return S2ACompressor(bits, softmax_bits, norm_bits, input_std, momentum)


# --- parametric side -----------------------------------------------------------------------------------------


class SideNetwork(nn.Module):
    """Ladder side network: ``s_l = s_{l-1} + gelu(mix_l(s_{l-1}) + down_l(h_l))``, output ``up(s_L)``.

    ``h_l`` are the detached block outputs ``(B, N, hidden)``; the state has ``width`` channels; ``up`` starts at
    zero, so the patched model starts exactly as the backbone.
    """

    def __init__(self, hidden: int, num_layers: int, width: int) -> None:
        super().__init__()
        self.down = nn.ModuleList(nn.Linear(hidden, width) for _ in range(num_layers))
        self.mix = nn.ModuleList(nn.Linear(width, width) for _ in range(num_layers))
        self.up = nn.Linear(width, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hiddens: Sequence[torch.Tensor]) -> torch.Tensor:
        state = None
        for down, mix, h in zip(self.down, self.mix, hiddens):
            update = down(h.detach())
            if state is not None:
                update = update + mix(state)
            state = nn.functional.gelu(update) if state is None else state + nn.functional.gelu(update)
        if state is None:
            raise ValueError("the side network saw no block output: call the model before its head.")
        return self.up(state)


class ParametricHandle:
    """Result of :func:`apply_parametric`: trainable parameter names, the side network (mode 'side'), undo()."""

    def __init__(self, model: nn.Module, mode: str) -> None:
        self.mode = mode
        self.side: SideNetwork | None = None
        self._model = model
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self._hooks: list[Any] = []
        self.trainable: list[str] = []

    def undo(self) -> None:
        """Remove hooks and the side network, restore every parameter's ``requires_grad``."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self.side is not None and getattr(self._model, "memft_side", None) is self.side:
            del self._model.memft_side
        self.side = None
        for name, p in self._model.named_parameters():
            if name in self._requires_grad:
                p.requires_grad_(self._requires_grad[name])


def _blocks(model: nn.Module) -> nn.ModuleList:
    candidates = [
        m
        for m in model.modules()
        if isinstance(m, nn.ModuleList)
        and len(m) > 0
        and len({type(b) for b in m}) == 1
        and any(isinstance(sub, nn.Linear) for sub in m[0].modules())
    ]
    if not candidates:
        raise ValueError("apply_parametric(mode='side') found no list of transformer blocks in this model.")
    return candidates[-1]


def _head(model: nn.Module, head: str | None) -> nn.Module:
    if head is not None:
        try:
            return model.get_submodule(head)
        except AttributeError as err:
            raise ValueError(
                f"head={head!r} is not a submodule of the model; pass a name from model.named_modules()."
            ) from err
    getter = getattr(model, "get_output_embeddings", None)
    found = getter() if callable(getter) else None
    if isinstance(found, nn.Module):
        return found
    for name in ("classifier", "score", "head"):
        if isinstance(getattr(model, name, None), nn.Module):
            return getattr(model, name)
    raise ValueError("apply_parametric(mode='side') could not find the model's head; pass head='<module name>'.")


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for attr in ("hidden_size", "d_model", "n_embd"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(
        "apply_parametric(mode='side') needs model.config.hidden_size (or d_model) to size the side network."
    )


def apply_parametric(
    model: nn.Module,
    mode: str = "bias",
    *,
    reduction: int = 8,
    head: str | None = None,
    train_head: bool = False,
    extra_trainable: Sequence[str] = (),
) -> ParametricHandle:
    """Make ``model`` activation-light to train (S2A parametric side); returns a handle with ``undo()``.

    mode='bias': only biases, normalisation weights and parameters whose name contains a string of
    ``extra_trainable`` stay trainable. mode='side': every model parameter is frozen (the head too unless
    ``train_head``) and a :class:`SideNetwork` of width ``hidden // reduction`` is attached as
    ``model.memft_side``; its output is added to the input of ``head`` (default: the output embeddings, or a
    ``classifier``/``score`` module). A head input of shape ``(B, hidden)`` receives the side output of token 0.
    """
    if mode not in ("bias", "side"):
        raise ValueError(f"mode={mode!r} must be 'bias' (train biases and norm weights) or 'side' (side network).")
    if isinstance(extra_trainable, str):
        raise TypeError("extra_trainable must be a sequence of name fragments, e.g. ('classifier',).")
    handle = ParametricHandle(model, mode)
    norm_params = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    head_module = _head(model, head) if mode == "side" or train_head else None
    head_params = {id(p) for p in head_module.parameters()} if head_module is not None else set()
    for name, p in model.named_parameters():
        keep = any(s in name for s in extra_trainable) or (train_head and id(p) in head_params)
        if mode == "bias":
            keep = keep or name.endswith("bias") or id(p) in norm_params
        p.requires_grad_(keep)
    if mode == "side":
        if not isinstance(reduction, int) or reduction < 1:
            raise ValueError(f"reduction={reduction!r} must be a positive int (side width = hidden // reduction).")
        blocks = _blocks(model)
        hidden = _hidden_size(model)
        reference = next(model.parameters())
        side = SideNetwork(hidden, len(blocks), max(1, hidden // reduction)).to(reference.device, reference.dtype)
        model.add_module("memft_side", side)
        handle.side = side
        captured: list[torch.Tensor] = []

        def capture(index: int) -> Callable:
            def hook(_module: nn.Module, _args: Any, output: Any) -> None:
                if index == 0:
                    captured.clear()
                captured.append((output[0] if isinstance(output, tuple) else output).detach())

            return hook

        def add_side(_module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            side_out = side(captured)
            if side_out.dim() != x.dim():
                side_out = side_out[:, 0]
            return (x + side_out.to(x.dtype), *args[1:])

        handle._hooks += [b.register_forward_hook(capture(i)) for i, b in enumerate(blocks)]
        handle._hooks.append(head_module.register_forward_pre_hook(add_side))
    handle.trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    return handle
