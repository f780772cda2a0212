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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from memft.kernels.quant import uniform_noise

from .patch import METHODS, Compressor, Site, _needs_grad, _refuse_compiling, relu_forward
from .state import GradNormTracker

__all__ = [
    "row_probabilities",
    "wta_crs_plan",
    "sample_count",
    "WTACRSLinear",
    "WTACRSCompressor",
    "build_compressor",
]


def sample_count(n: int, ratio: float, min_rows: int) -> int:
    """k = min(n, max(min_rows, ceil(ratio * n)))."""
    return min(n, max(min_rows, math.ceil(ratio * n)))


def row_probabilities(
    x_norms: torch.Tensor, grad_estimate: torch.Tensor | None, grad_floor: float = 0.1
) -> torch.Tensor:
    """Sampling distribution over rows (float32, shape (n,)): ``p ~ ||x_i|| * max(g_i, grad_floor * mean(g))``.

    With no estimate, or an all-zero one, ``g_i = 1``; if every score is 0 the distribution is uniform.
    """
    scores = x_norms.float()
    if grad_estimate is not None:
        g = grad_estimate.float()
        mean = g.mean()
        floored = torch.maximum(g, grad_floor * mean)
        g = torch.where(mean > 0, floored, torch.ones_like(g))
        scores = scores * g
    total = scores.sum()
    uniform = torch.full_like(scores, 1.0 / scores.numel())
    return torch.where(total > 0, scores / torch.where(total > 0, total, 1.0), uniform)


def wta_crs_plan(
    p: torch.Tensor, k: int, winner_take_all: bool = True, uniforms: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose k rows from distribution p (shape (n,)); return ``(index (k,) int64, weight (k,) float32)``.

    ``sum_s weight_s * A[index_s]`` is an unbiased estimate of ``A.sum(0)`` for any row-wise A vanishing where
    ``p == 0``. ``winner_take_all=False`` forces ``c = 0`` (plain column-row sampling with replacement).
    Draws invert the residual distribution's CDF at ``uniforms`` (k values in [0, 1); default ``torch.rand``).
    """
    n = p.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must lie in [1, n={n}].")
    top_p, top_index = torch.topk(p, k)
    slots = torch.arange(k, device=p.device)
    if winner_take_all:
        mass_before = torch.cumsum(top_p, 0) - top_p  # mass of the c most probable rows, c = 0..k-1
        bound = (1.0 - mass_before) / (k - slots).to(p.dtype)
        c = torch.argmin(bound)
    else:
        c = torch.zeros((), dtype=torch.long, device=p.device)
    deterministic = slots < c
    residual = p.scatter(0, top_index, torch.where(deterministic, torch.zeros_like(top_p), top_p))
    residual_mass = residual.sum()
    has_mass = residual_mass > 0
    if uniforms is None:
        uniforms = torch.rand(k, device=p.device)
    drawable = torch.where(has_mass, residual, torch.ones_like(residual)).double()
    cdf = torch.cumsum(drawable, 0)
    targets = uniforms.double() * cdf[-1]
    draws = torch.searchsorted(cdf, targets, right=True).clamp_(max=n - 1)
    draws = torch.where(drawable[draws] > 0, draws, torch.argmax(drawable))  # cdf plateaus at rows of p == 0
    index = torch.where(deterministic, top_index, draws)
    p_drawn = p[draws]
    stochastic_weight = residual_mass / ((k - c).to(p.dtype) * torch.where(p_drawn > 0, p_drawn, 1.0))
    stochastic_weight = torch.where(has_mass & (p_drawn > 0), stochastic_weight, torch.zeros_like(p_drawn))
    weight = torch.where(deterministic, torch.ones_like(p_drawn), stochastic_weight)
    return index, weight.float()


class WTACRSLinear(torch.autograd.Function):
    """y = original(x) exactly; saves the k sampled rows of x, their indices and weights (or x itself if k == n)."""

    @staticmethod
    def forward(ctx, x, weight, bias, original: Callable, saved: tuple, layout: tuple, tracker):  # type: ignore[override]
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


class WTACRSCompressor(Compressor):
    """WTA-CRS for trainable Linear layers; other kinds go to ``others`` (a Mesa or S2A compressor) or stay as is."""

    name = "wta_crs"

    def __init__(
        self,
        ratio: float,
        min_rows: int,
        momentum: float,
        grad_floor: float,
        sample_head: bool,
        others: Compressor | None,
    ) -> None:
        self.ratio, self.min_rows, self.momentum, self.grad_floor = ratio, min_rows, momentum, grad_floor
        self.sample_head = sample_head
        self.others = others
        if others is not None:
            self.softmax_codec, self.matmul_codec = others.softmax_codec, others.matmul_codec

    def _sample(self, x: torch.Tensor, tracker: GradNormTracker) -> tuple[tuple[torch.Tensor, ...], tuple[int, int]]:
        batch, positions = _layout(x)
        x2d = x.reshape(-1, x.shape[-1])
        n = x2d.shape[0]
        k = sample_count(n, self.ratio, self.min_rows)
        if k >= n:
            return (x2d,), (batch, positions)
        with torch.no_grad():
            estimate = tracker.estimate(batch, positions, x.device)
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
        return None if self.others is None else self.others.norm(site)

    def attention(self, site: Site) -> Any:
        return super().attention(site) if self.others is None else self.others.attention(site)


def build_compressor(
    ratio: float = 0.3,
    min_rows: int = 1,
    momentum: float = 0.9,
    grad_floor: float = 0.1,
    sample_head: bool = False,
    others: str | None = None,
    others_options: dict[str, Any] | None = None,
) -> WTACRSCompressor:
    """Options of ``compress_activations(model, "wta_crs", ...)``.

    ratio: fraction of the ``batch * seq`` rows kept for the weight gradient (0.3 in the paper; 0.1 also).
    min_rows: lower bound on k. momentum: EMA weight of the per-position gradient-norm estimate.
    grad_floor: estimates are floored at ``grad_floor * mean`` (keeps every row's probability positive).
    sample_head: also sample the output layer (``get_output_embeddings()``). Off by default, as in the reference
    deployment: the head's weight gradient sums per-token terms with different targets, the least concentrated
    (highest-variance) case, and its input is a single hidden vector per token.
    others: compressor for the tensors WTA-CRS does not touch (activations, norms, attention): None (stored as
    autograd stores them, except ReLU and dropout masks at 1 bit, exact), 'mesa' or 's2a', built with
    ``others_options``.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio={ratio!r} must lie in (0, 1]: it is the fraction of rows kept (paper: 0.3).")
    if not isinstance(min_rows, int) or min_rows < 1:
        raise ValueError(f"min_rows={min_rows!r} must be a positive int.")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum={momentum!r} must lie in [0, 1).")
    if not 0.0 < grad_floor <= 1.0:
        raise ValueError(f"grad_floor={grad_floor!r} must lie in (0, 1]: a positive floor keeps every row sampleable.")
    other: Compressor | None = None
    if others is not None:
        if others not in ("mesa", "s2a"):
            raise ValueError(f"others={others!r} must be None, 'mesa' or 's2a'.")
        import importlib

        other = importlib.import_module(METHODS[others]).build_compressor(**(others_options or {}))
    elif others_options:
        raise ValueError("others_options given without others: also pass others='mesa' or others='s2a'.")
    return WTACRSCompressor(ratio, min_rows, momentum, grad_floor, sample_head, other)
