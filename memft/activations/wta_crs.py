"""WTA-CRS: winner-take-all column-row sampling for the weight gradient of Linear layers (arXiv 2305.15265).

For ``y = x W^T + b`` with x flattened to ``n`` rows (``n = batch * seq``), forward, grad-input and grad-bias are
exact; the weight gradient ``dW = sum_i dy_i^T x_i`` is estimated from ``k = ceil(ratio * n)`` rows chosen *in
forward*, so only those k rows of x are kept for backward:

* row probabilities ``p_i ~ ||x_i|| * g_i`` where ``g_i`` estimates ``||dy_i||`` by a per-position EMA of the
  output-gradient row norms seen in earlier backward passes (:class:`~memft.activations.state.GradNormTracker`),
  floored at ``grad_floor * mean`` so no row with ``x_i != 0`` gets probability 0; before any backward, ``g_i = 1``;
* winner-take-all split: the ``c`` most probable rows are kept with weight 1, the other ``k - c`` slots are drawn
  with replacement from the remaining rows with weight ``(1 - sum_C p) / ((k - c) p_j)``; ``c`` in ``0..k-1``
  minimises the variance bound ``(1 - sum_C p) / (k - c)`` (``c = 0`` is plain column-row sampling).

The estimator is unbiased for *any* probabilities: the weights use the exact residual mass, rows of probability 0
contribute nothing, flat probabilities give plain CRS weights ``1/(k p_j)``, and all-zero inputs get weight 0.
Layers fed the same tensor (q/k/v, gate/up, LoRA ``lora_A`` of several projections) share one sample -- still
unbiased for each, since unbiasedness holds for any positive probabilities -- so the rows are stored once.

Attention matmuls (``sample_attention``, the reference deployment's ``score_sampling`` / ``attout_sampling``):
for ``C = A @ B`` with ``A (..., M, K)``, ``B (..., K, N)`` and ``G = dL/dC``, both operand gradients are sums
over a dimension of C: ``dA = sum_j G[:, j] B[:, j]^T`` (over the N columns) and ``dB = sum_i A[i]^T G[i]`` (over
the M rows). Each (batch, head) slice draws its own WTA-CRS plan over that dimension (``p ~ operand norm x EMA of
the matching G norms``), so only ``ceil(ratio * N)`` columns of B and ``ceil(ratio * M)`` rows of A are kept.
Each estimate is unbiased given G, and the draws are made in forward, independently of the gradients flowing
back, so gradients propagated through several sampled ops stay unbiased. Other tensors (softmax output, norms,
activations) are exact: norms keep only their normalised input (:mod:`memft.activations.norms`), ReLU and
dropout 1-bit masks, unless ``others`` compresses them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from memft.kernels.quant import uniform_noise

from .norms import normalized_norm_forward
from .patch import (
    METHODS,
    Compressor,
    Site,
    _describe,
    _needs_grad,
    _refuse_compiling,
    attention_forward,
    relu_forward,
)
from .state import GradNormTracker

__all__ = [
    "row_probabilities",
    "wta_crs_plan",
    "sample_count",
    "WTACRSLinear",
    "WTACRSMatmul",
    "WTACRSCompressor",
    "build_compressor",
]


def sample_count(n: int, ratio: float, min_rows: int) -> int:
    """k = min(n, max(min_rows, ceil(ratio * n)))."""
    return min(n, max(min_rows, math.ceil(ratio * n)))


def row_probabilities(
    x_norms: torch.Tensor, grad_estimate: torch.Tensor | None, grad_floor: float = 0.1
) -> torch.Tensor:
    """Sampling distributions over the last dim (float32, shape of ``x_norms``: ``(..., n)``).

    ``p ~ ||x_i|| * max(g_i, grad_floor * mean(g))`` per distribution. With no estimate, or an all-zero one,
    ``g_i = 1``; a distribution whose scores are all 0 is uniform.
    """
    scores = x_norms.float()
    if grad_estimate is not None:
        g = grad_estimate.float()
        mean = g.mean(-1, keepdim=True)
        floored = torch.maximum(g, grad_floor * mean)
        g = torch.where(mean > 0, floored, torch.ones_like(g))
        scores = scores * g
    total = scores.sum(-1, keepdim=True)
    uniform = torch.full_like(scores, 1.0 / scores.shape[-1])
    return torch.where(total > 0, scores / torch.where(total > 0, total, 1.0), uniform)


def wta_crs_plan(
    p: torch.Tensor, k: int, winner_take_all: bool = True, uniforms: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose k of n rows from each distribution ``p (..., n)``; return ``(index (..., k) int64, weight (..., k) f32)``.

    ``sum_s weight_s * A[index_s]`` is an unbiased estimate of ``A.sum(0)`` for any row-wise A vanishing where
    ``p == 0`` (per distribution). ``winner_take_all=False`` forces ``c = 0`` (plain column-row sampling with
    replacement). Draws invert the residual distribution's CDF at ``uniforms`` (shape ``(..., k)``, values in
    [0, 1); default ``torch.rand``).
    """
    n = p.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must lie in [1, n={n}].")
    lead = p.shape[:-1]
    p2 = p.reshape(-1, n)
    top_p, top_index = torch.topk(p2, k, dim=1)
    slots = torch.arange(k, device=p.device)
    if winner_take_all:
        mass_before = torch.cumsum(top_p, 1) - top_p  # mass of the c most probable rows, c = 0..k-1
        bound = (1.0 - mass_before) / (k - slots).to(p.dtype)
        c = torch.argmin(bound, dim=1, keepdim=True)
    else:
        c = torch.zeros((p2.shape[0], 1), dtype=torch.long, device=p.device)
    deterministic = slots < c
    residual = p2.scatter(1, top_index, torch.where(deterministic, torch.zeros_like(top_p), top_p))
    residual_mass = residual.sum(1, keepdim=True)
    has_mass = residual_mass > 0
    if uniforms is None:
        uniforms = torch.rand(p2.shape[0], k, device=p.device)
    drawable = torch.where(has_mass, residual, torch.ones_like(residual)).double()
    cdf = torch.cumsum(drawable, 1)
    targets = uniforms.reshape(-1, k).double() * cdf[:, -1:]
    draws = torch.searchsorted(cdf, targets, right=True).clamp_(max=n - 1)
    fallback = torch.argmax(drawable, dim=1, keepdim=True)  # cdf plateaus at rows of p == 0
    draws = torch.where(drawable.gather(1, draws) > 0, draws, fallback)
    index = torch.where(deterministic, top_index, draws)
    p_drawn = p2.gather(1, draws)
    stochastic_weight = residual_mass / ((k - c).to(p.dtype) * torch.where(p_drawn > 0, p_drawn, 1.0))
    stochastic_weight = torch.where(has_mass & (p_drawn > 0), stochastic_weight, torch.zeros_like(p_drawn))
    weight = torch.where(deterministic, torch.ones_like(p_drawn), stochastic_weight)
    return index.reshape(*lead, k), weight.float().reshape(*lead, k)


class WTACRSLinear(torch.autograd.Function):
    """y = original(x) exactly; saves the k sampled rows of x, their indices and weights (or x itself if k == n)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x, weight, bias, original: Callable, saved: tuple, layout: tuple, tracker
    ):
        y = original(x)
        ctx.has_bias, ctx.x_shape, ctx.layout, ctx.tracker = bias is not None, x.shape, layout, tracker
        ctx.save_for_backward(weight, *saved)
        return y

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        weight, *saved = ctx.saved_tensors
        g2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g2d @ weight.to(g2d.dtype)).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            if len(saved) == 1:
                (rows,) = saved
                scaled = g2d
            else:
                rows, index, row_weight = saved
                scaled = (g2d[index].float() * row_weight[:, None]).to(g2d.dtype)
            grad_w = (scaled.t() @ rows.to(g2d.dtype)).to(weight.dtype)
            batch, positions = ctx.layout
            norms = g2d.detach().float().norm(dim=1).reshape(batch, positions).mean(0)
            ctx.tracker.observe(norms)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2d.sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


def _layout(x: torch.Tensor) -> tuple[int, int]:
    rows = x.numel() // x.shape[-1]
    positions = x.shape[-2] if x.dim() >= 3 else rows
    return rows // positions, positions


@dataclass(frozen=True)
class _MatmulSide:
    """What one operand side of a sampled matmul saved: ``count`` tensors (operand or sampled part [+ index,
    weight]), ``sampled``, the codec metadata if ``codec`` re-encoded the kept part, and its trackers."""

    count: int
    sampled: bool
    codec: Any
    meta: Any
    codec_tracker: Any
    tracker: GradNormTracker


class WTACRSMatmul(torch.autograd.Function):
    """``func(a, b)`` exactly for ``a (*batch, M, K)``, ``b (*batch, K, N)``; saves sampled rows of a (for grad b)
    and sampled columns of b (for grad a), or the full operand where the sample would keep everything."""

    @staticmethod
    def forward(ctx, a, b, func: Callable, tensors: tuple, sides: tuple):  # type: ignore[override]
        y = func(a, b)
        ctx.sides, ctx.a_meta, ctx.b_meta = sides, (a.shape, a.dtype), (b.shape, b.dtype)
        ctx.save_for_backward(*tensors)
        return y

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        saved = ctx.saved_tensors
        rows_side, cols_side = ctx.sides
        split = 0 if rows_side is None else rows_side.count
        rows_saved, cols_saved = saved[:split], saved[split:]
        (a_shape, a_dtype), (b_shape, b_dtype) = ctx.a_meta, ctx.b_meta
        m, n = grad_out.shape[-2], grad_out.shape[-1]
        g3 = grad_out.reshape(-1, m, n)
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            kept = _decode(cols_side, cols_saved).to(grad_out.dtype)
            if cols_side.sampled:
                index, weight = cols_saved[-2], cols_saved[-1]
                picked = g3.gather(2, index[:, None, :].expand(-1, m, -1))
                scaled = (picked.float() * weight[:, None, :]).to(grad_out.dtype)
                grad_a = scaled.reshape(*b_shape[:-2], m, -1) @ kept.transpose(-1, -2)
            else:
                grad_a = grad_out @ kept.transpose(-1, -2)
            grad_a = grad_a.to(a_dtype)
            cols_side.tracker.observe(grad_out.detach().float().norm(dim=-2).mean(0))
        if ctx.needs_input_grad[1]:
            kept = _decode(rows_side, rows_saved).to(grad_out.dtype)
            if rows_side.sampled:
                index, weight = rows_saved[-2], rows_saved[-1]
                picked = g3.gather(1, index[:, :, None].expand(-1, -1, n))
                scaled = (picked.float() * weight[:, :, None]).to(grad_out.dtype)
                grad_b = kept.transpose(-1, -2) @ scaled.reshape(*a_shape[:-2], -1, n)
            else:
                grad_b = kept.transpose(-1, -2) @ grad_out
            grad_b = grad_b.to(b_dtype)
            rows_side.tracker.observe(grad_out.detach().float().norm(dim=-1).mean(0))
        for side in (rows_side, cols_side):
            if side is not None and side.codec is not None:
                side.codec.observe(side.codec_tracker, side.meta)
        return grad_a, grad_b, None, None, None


def _decode(side: _MatmulSide, saved: tuple[torch.Tensor, ...]) -> torch.Tensor:
    kept = saved[:-2] if side.sampled else saved
    return kept[0] if side.codec is None else side.codec.decode(kept, side.meta)


class WTACRSCompressor(Compressor):
    """WTA-CRS for trainable Linear layers and eager-attention matmuls; RMSNorms keep their normalised input;
    activations, softmax and the kept matmul parts go to ``others`` (a Mesa or S2A compressor) if given."""

    name = "wta_crs"

    def __init__(
        self,
        ratio: float,
        min_rows: int,
        momentum: float,
        grad_floor: float,
        sample_head: bool,
        sample_attention: bool,
        others: Compressor | None,
    ) -> None:
        self.ratio, self.min_rows, self.momentum, self.grad_floor = ratio, min_rows, momentum, grad_floor
        self.sample_head, self.sample_attention = sample_head, sample_attention
        self.others = others
        if others is not None:
            self.softmax_codec, self.matmul_codec = others.softmax_codec, others.matmul_codec

    def _plan(self, norms: torch.Tensor, tracker: GradNormTracker, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """WTA-CRS plans over the last dim of ``norms (B, *lead, n)``: ``(index, weight)`` of shape ``(S, k)``."""
        batch, *lead, n = norms.shape
        estimate = tracker.estimate(batch, n, norms.device, tuple(lead))
        p = row_probabilities(norms.reshape(-1, n), None if estimate is None else estimate.reshape(-1, n),
                              self.grad_floor)
        return wta_crs_plan(p, k, uniforms=uniform_noise((p.shape[0], k), tracker.seed, norms.device))

    def _keep(
        self, ops: Any, label: str, part: torch.Tensor, sampled: bool, extra: tuple, tracker: GradNormTracker
    ) -> tuple[tuple[torch.Tensor, ...], _MatmulSide]:
        """Saved tensors of one matmul side -- ``part`` (re-encoded by ``others``' codec if any) + ``extra`` --
        and its :class:`_MatmulSide`."""
        codec = self.matmul_codec
        codec_tracker = None if codec is None else ops.tracker(f"{label}_codes", codec.make_tracker)
        if codec is None:
            tensors, meta = (part,), None
        else:
            tensors, meta = codec.encode(part, codec_tracker)
        side = _MatmulSide(len(tensors) + len(extra), sampled, codec, meta, codec_tracker, tracker)
        return (*tensors, *extra), side

    def _attention_matmul(self, ops: Any, a: torch.Tensor, b: torch.Tensor, func: Callable) -> torch.Tensor | None:
        """Sampled ``func(a, b)`` for same-batch operands (declines broadcast ones: None)."""
        if a.shape[:-2] != b.shape[:-2] or a.dim() < 3:
            return None
        rows_tracker = ops.tracker("wta_rows", lambda: GradNormTracker(self.momentum))
        cols_tracker = ops.tracker("wta_cols", lambda: GradNormTracker(self.momentum))
        (m, inner), n = a.shape[-2:], b.shape[-1]
        tensors: tuple = ()
        rows_side = cols_side = None
        with torch.no_grad():
            if b.requires_grad:  # grad b = sum over the M rows of a^T g
                k = sample_count(m, self.ratio, self.min_rows)
                if k >= m:
                    kept, side = self._keep(ops, "rows", a, False, (), rows_tracker)
                else:
                    norms = torch.linalg.vector_norm(a, dim=-1, dtype=torch.float32)
                    index, weight = self._plan(norms, rows_tracker, k)
                    part = a.reshape(-1, m, inner).gather(1, index[:, :, None].expand(-1, -1, inner))
                    part = part.reshape(*a.shape[:-2], k, inner)
                    kept, side = self._keep(ops, "rows", part, True, (index, weight), rows_tracker)
                tensors, rows_side = kept, side
            if a.requires_grad:  # grad a = sum over the N columns of g b^T
                k = sample_count(n, self.ratio, self.min_rows)
                if k >= n:
                    kept, side = self._keep(ops, "cols", b, False, (), cols_tracker)
                else:
                    norms = torch.linalg.vector_norm(b, dim=-2, dtype=torch.float32)
                    index, weight = self._plan(norms, cols_tracker, k)
                    part = b.reshape(-1, inner, n).gather(2, index[:, None, :].expand(-1, inner, -1))
                    part = part.reshape(*b.shape[:-2], inner, k)
                    kept, side = self._keep(ops, "cols", part, True, (index, weight), cols_tracker)
                tensors, cols_side = (*tensors, *kept), side
        return WTACRSMatmul.apply(a, b, func, tensors, (rows_side, cols_side))

    def _sample(self, x: torch.Tensor, tracker: GradNormTracker) -> tuple[tuple[torch.Tensor, ...], tuple[int, int]]:
        batch, positions = _layout(x)
        x2d = x.reshape(-1, x.shape[-1])
        n = x2d.shape[0]
        k = sample_count(n, self.ratio, self.min_rows)
        if k >= n:
            return (x2d,), (batch, positions)
        with torch.no_grad():
            estimate = tracker.estimate(batch, positions, x.device)
            estimate = None if estimate is None else estimate.reshape(-1)
            p = row_probabilities(x2d.float().norm(dim=1), estimate, self.grad_floor)
            index, weight = wta_crs_plan(p, k, uniforms=uniform_noise((k,), tracker.seed, x.device))
            rows = x2d.index_select(0, index)
        return (rows, index, weight), (batch, positions)

    def linear(self, site: Site) -> tuple[Callable, str] | None:
        if site.is_head and not self.sample_head:
            return None
        module, original = site.module, site.original
        tracker = site.tracker("", lambda: GradNormTracker(self.momentum))
        cache, key = site.cache, ("wta_crs", self.ratio, self.min_rows, self.grad_floor)

        def forward(x: torch.Tensor) -> torch.Tensor:
            _refuse_compiling()
            weight = module.weight
            if not weight.requires_grad or not _needs_grad(x, (weight,)):
                return original(x)
            saved, layout = cache.get_or_encode(x, key, lambda: self._sample(x, tracker))
            return WTACRSLinear.apply(x, weight, module.bias, original, saved, layout, tracker)

        return forward, f"k = max({self.min_rows}, ceil({self.ratio} n)) sampled input rows (WTA-CRS)"

    def activation(self, site: Site, function: str) -> Any:
        if self.others is not None:
            return self.others.activation(site, function)
        return (relu_forward(site), "1-bit mask (exact)") if function == "relu" else None

    def norm(self, site: Site) -> Any:
        return normalized_norm_forward(site) if self.others is None else self.others.norm(site)

    def attention(self, site: Site) -> Any:
        if not self.sample_attention:
            return super().attention(site) if self.others is None else self.others.attention(site)
        then = "" if self.matmul_codec is None else f", kept part {_describe(self.matmul_codec)}"
        storage = (
            f"softmax: {_describe(self.softmax_codec)}; matmul operands: k = max({self.min_rows}, "
            f"ceil({self.ratio} n)) sampled rows/columns per head (WTA-CRS){then}; dropout: 1-bit mask"
        )
        forward = attention_forward(site, self.softmax_codec, self.matmul_codec, True, self._attention_matmul)
        return forward, storage


def build_compressor(
    ratio: float = 0.3,
    min_rows: int = 10,
    momentum: float = 0.9,
    grad_floor: float = 0.1,
    sample_head: bool = False,
    sample_attention: bool = True,
    others: str | None = None,
    others_options: dict[str, Any] | None = None,
) -> WTACRSCompressor:
    """Options of ``compress_activations(model, "wta_crs", ...)``.

    ratio: fraction of the ``batch * seq`` rows kept for the weight gradient (0.3 in the paper; 0.1 also).
    min_rows: lower bound on k (10, the reference's ``minimal_k``: it matters for short dimensions such as a
    small head size). momentum: EMA weight of the per-position gradient-norm estimate.
    grad_floor: estimates are floored at ``grad_floor * mean`` (keeps every row's probability positive).
    sample_head: also sample the output layer (``get_output_embeddings()``). Off by default, as in the reference
    deployment: the head's weight gradient sums per-token terms with different targets, the least concentrated
    (highest-variance) case, and its input is a single hidden vector per token.
    sample_attention: also sample the operands of eager attention's two matmuls (``Q K^T`` and ``P V``), as the
    reference deployment's setting for its memory results does (``score_sampling`` / ``attout_sampling``). Their
    operand gradients then carry sampling noise too (unbiased); ``False`` keeps them exact.
    others: compressor for the tensors WTA-CRS does not sample (activations, norms, softmax; and the kept parts
    of attention matmul operands): None (norms keep their normalised input, ReLU and dropout 1-bit masks, all
    exact; the rest as autograd stores it), 'mesa' or 's2a', built with ``others_options``.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio={ratio!r} must lie in (0, 1]: it is the fraction of rows kept (paper: 0.3).")
    if not isinstance(min_rows, int) or min_rows < 1:
        raise ValueError(f"min_rows={min_rows!r} must be a positive int.")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum={momentum!r} must lie in [0, 1).")
    if not 0.0 < grad_floor <= 1.0:
        raise ValueError(f"grad_floor={grad_floor!r} must lie in (0, 1]: a positive floor keeps every row sampleable.")
    if not isinstance(sample_attention, bool):
        raise TypeError(f"sample_attention must be True or False, got {sample_attention!r}.")
    other: Compressor | None = None
    if others is not None:
        if others not in ("mesa", "s2a"):
            raise ValueError(f"others={others!r} must be None, 'mesa' or 's2a'.")
        import importlib

        other = importlib.import_module(METHODS[others]).build_compressor(**(others_options or {}))
    elif others_options:
        raise ValueError("others_options given without others: also pass others='mesa' or others='s2a'.")
    return WTACRSCompressor(ratio, min_rows, momentum, grad_floor, sample_head, sample_attention, other)
