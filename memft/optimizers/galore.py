"""GaLore optimizers: gradient low-rank projection (Zhao et al., arXiv 2403.03507).

For a 2-D weight ``W`` (``m × n``) in a parameter group that has a ``rank`` key, the gradient ``G``
is projected to a low-rank ``R`` (see :mod:`memft.optimizers.projector`), the optimizer keeps its
moments in that low-rank shape, and the normalised update ``N`` is projected back and scaled::

    W <- W * (1 - lr * weight_decay)            # decoupled decay, before the update (torch AdamW style)
    W <- W - lr * scale * project_back(N)

Parameter-group keys for GaLore groups: ``rank`` (required), ``update_proj_gap`` (200), ``scale``
(0.25), ``proj_type`` (``"std"``), ``svd`` (``"exact"``), ``svd_oversampling`` (8),
``svd_power_iters`` (2), ``svd_seed`` (0). Groups without ``rank``, and non-2-D tensors in any
group, get the plain algorithm (AdamW / Adafactor). ``lr``, ``betas``, ``eps`` and ``weight_decay``
are honoured in every group.

Deliberate choices (documented here, tested in ``tests/optimizers/test_galore.py``):

* Weight decay is decoupled and applied *before* the update with the unscaled ``lr``, as in
  ``torch.optim.AdamW``; the reference decays after the update (a difference of order
  ``lr² · weight_decay``). Plain groups of :class:`GaLoreAdamW` therefore equal ``torch.optim.AdamW``.
* Adam uses ``N = m̂ / (√v̂ + eps)`` with bias-corrected moments (torch convention), the reference
  puts ``eps`` outside the bias correction.
* ``moments_on_refresh="keep"`` (default) leaves the moments untouched when the subspace changes,
  exactly as the reference and the paper's experiments do. ``"reproject"`` maps them into the new
  subspace: ``m <- T m`` (exact for the part of ``m`` inside both subspaces) and ``v <- (T ⊙ T) v``
  (a non-negative approximation; exact when the new basis is a signed permutation of the old).
* Moments are stored, and updated in place, in the parameter dtype (like ``torch.optim.AdamW``
  and the reference), so no full-size fp32 temporaries appear for bf16 embeddings; bases are stored
  in the gradient dtype, SVDs run in fp32. The 8-bit variant dequantises to fp32 one chunk at a time.
* Bounded temporaries (the AdamW variants): moments are updated ``chunk_numel`` elements at a time
  and a plain parameter's update is added chunk by chunk; a low-rank update is projected back by one
  in-place ``addmm_`` into the weight (the reference materialises the ``(m, n)`` update, rounds it to
  the parameter dtype, then adds it: two roundings where memft has one). So a step never holds a
  full-size temporary of a parameter, apart from the fp32 gradient copy an exact-SVD refresh makes
  (``svd="randomized"`` reads the gradient in blocks, see :mod:`memft.optimizers.projector`).
* The step counter is a Python ``int`` per parameter and is counted once, by this code.

Everything in ``state_dict()`` is plain tensors, numbers, strings and dicts (the projector is stored
as ``state["projector"]``), so it round-trips through ``torch.load(weights_only=True)``; loading keeps
each state tensor's dtype (uint8 codes, fp32 scales) and only moves it to the parameter's device.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from memft.optimizers import _blockwise8bit as q8
from memft.optimizers.projector import LowRankProjector, map_low_rank, validate_projection_config

DEFAULT_CHUNK_NUMEL = 2**22
GALORE_DEFAULTS: dict[str, Any] = {
    "update_proj_gap": 200,
    "scale": 0.25,
    "proj_type": "std",
    "svd": "exact",
    "svd_oversampling": 8,
    "svd_power_iters": 2,
    "svd_seed": 0,
}
MOMENTS_ON_REFRESH = ("keep", "reproject")
DEFAULT_TARGET_MODULES = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    "c_attn", "c_proj", "c_fc", "fc1", "fc2", "query", "key", "value", "dense",
    "qkv_proj", "gate_up_proj", "out_proj", "wq", "wk", "wv", "wo", "w1", "w2", "w3",
)  # fmt: skip


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device=device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    return value


class GaLoreOptimizer(torch.optim.Optimizer):
    """Base class: projection, refresh, decay and checkpointing shared by the GaLore algorithms.

    A subclass implements :meth:`_direction` (one algorithm step in the low-rank space) and
    :meth:`_reproject_state` (moments into a new subspace). :meth:`project_grad` and
    :meth:`apply_update` are the two halves of a step; :class:`memft.optimizers.layerwise.LayerwiseOptimizer`
    calls them separately to accumulate low-rank gradients.
    """

    def __init__(self, params: Iterable, defaults: dict[str, Any], moments_on_refresh: str = "keep") -> None:
        if moments_on_refresh not in MOMENTS_ON_REFRESH:
            raise ValueError(
                f"`moments_on_refresh` must be one of {MOMENTS_ON_REFRESH}, got {moments_on_refresh!r}; "
                "'keep' matches the GaLore paper, 'reproject' maps the moments into the new subspace."
            )
        super().__init__(params, {**defaults, "moments_on_refresh": moments_on_refresh})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "rank" in param_group:
            for key, value in GALORE_DEFAULTS.items():
                param_group.setdefault(key, value)
            validate_projection_config(
                param_group["rank"], param_group["update_proj_gap"], param_group["proj_type"], param_group["svd"],
                param_group["svd_oversampling"], param_group["svd_power_iters"],
            )  # fmt: skip
            if not isinstance(param_group["scale"], (int, float)) or param_group["scale"] <= 0:
                raise ValueError(f"`scale` must be a positive number, got {param_group['scale']!r}; the paper uses 0.25.")
        moments = param_group.get("moments_on_refresh", self.defaults.get("moments_on_refresh", "keep"))
        if moments not in MOMENTS_ON_REFRESH:
            raise ValueError(f"`moments_on_refresh` must be one of {MOMENTS_ON_REFRESH}, got {moments!r}.")
        super().add_param_group(param_group)

    # ----------------------------------------------------------------- projection half
    @staticmethod
    def is_low_rank(param: Tensor, group: dict[str, Any]) -> bool:
        return "rank" in group and param.dim() == 2

    def _projector(self, param: Tensor, group: dict[str, Any]) -> LowRankProjector:
        saved = self.state[param].get("projector")
        if saved is not None:
            return LowRankProjector.from_state_dict(saved)
        return LowRankProjector(
            rank=group["rank"], update_proj_gap=group["update_proj_gap"], proj_type=group["proj_type"], svd=group["svd"],
            oversampling=group["svd_oversampling"], power_iters=group["svd_power_iters"], seed=group["svd_seed"],
        )  # fmt: skip

    def needs_refresh(self, param: Tensor, group: dict[str, Any]) -> bool:
        """Whether the next :meth:`project_grad` of ``param`` will recompute its subspace."""
        if not self.is_low_rank(param, group):
            return False
        return self._projector(param, group).needs_refresh(self.state[param].get("step", 0))

    def project_grad(self, param: Tensor, grad: Tensor, group: dict[str, Any], allow_refresh: bool = True) -> Tensor:
        """Refresh the subspace if due (and ``allow_refresh``), return the gradient the algorithm consumes."""
        if not self.is_low_rank(param, group):
            return grad
        state = self.state[param]
        projector = self._projector(param, group)
        if not projector.initialised or (allow_refresh and projector.needs_refresh(state.get("step", 0))):
            old_left, old_right = projector.left, projector.right
            had_basis = projector.initialised
            projector.refresh(grad)
            state["projector"] = projector.state_dict()
            if had_basis:
                self._on_refresh(state, group, projector, old_left, old_right)
        return projector.project(grad)

    def _on_refresh(
        self, state: dict, group: dict[str, Any], projector: LowRankProjector, old_left: Tensor | None, old_right: Tensor | None
    ) -> None:
        if group["moments_on_refresh"] == "reproject" and state.get("step", 0) > 0:
            t_left, t_right = projector.transitions(old_left, old_right)
            self._reproject_state(state, t_left, t_right)

    # ----------------------------------------------------------------- update half
    def apply_update(self, param: Tensor, low_grad: Tensor, group: dict[str, Any]) -> None:
        """One algorithm step for ``param`` given the (projected) gradient from :meth:`project_grad`."""
        state = self.state[param]
        low_rank = self.is_low_rank(param, group)
        direction, step_size, decay_lr = self._direction(param, low_grad, group, state, low_rank)
        self._decay(param, group, decay_lr)
        if low_rank:
            projector = LowRankProjector.from_state_dict(state["projector"])
            projector.add_project_back_(param, direction, alpha=-step_size * group["scale"])
        else:
            param.add_(direction, alpha=-step_size)

    @staticmethod
    def _decay(param: Tensor, group: dict[str, Any], decay_lr: float | Tensor) -> None:
        """Decoupled weight decay, in place: ``W <- W * (1 - decay_lr * weight_decay)``."""
        if group["weight_decay"] != 0:
            param.mul_(1 - decay_lr * group["weight_decay"])

    def _direction(
        self, param: Tensor, grad: Tensor, group: dict[str, Any], state: dict, low_rank: bool
    ) -> tuple[Tensor, float, float | Tensor]:
        """Return ``(direction, step_size, decay_lr)``: the update is ``-step_size * direction``."""
        raise NotImplementedError

    def _reproject_state(self, state: dict, t_left: Tensor | None, t_right: Tensor | None) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise TypeError(f"{type(self).__name__} does not support sparse gradients; use dense embeddings.")
                if _is_row_sharded(param):
                    self._step_gathered(param, group)
                else:
                    self.apply_update(param, self.project_grad(param, param.grad, group), group)
        return loss

    def _step_gathered(self, param: Tensor, group: dict[str, Any]) -> None:
        """Step a parameter that FSDP2 shards by rows (a DTensor): gather the parameter and its (already
        averaged) gradient, update the whole matrix on every process exactly as one process would, and
        keep this process's rows. The SVD needs the whole gradient, so gathering is the price of
        sharding: per step one all-gather of each gradient and parameter (the same volume as FSDP's own
        forward gather), with one full parameter and gradient alive at a time. The optimizer state
        (low-rank moments, projector) is computed identically everywhere and held by every process."""
        full = param.full_tensor()
        self.state[full] = self.state.pop(param, {})
        try:
            self.apply_update(full, self.project_grad(full, param.grad.full_tensor(), group), group)
        finally:
            self.state[param] = self.state.pop(full)
        local = param.to_local()
        rows = -(-full.shape[0] // param.device_mesh.size())  # torch.chunk's split, as FSDP2 uses
        start = param.device_mesh.get_local_rank() * rows
        local.copy_(full[start : start + local.shape[0]])

    # ----------------------------------------------------------------- checkpointing
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``; keeps every state tensor's dtype and moves it to its parameter's device."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} parameter groups, the optimizer {len(self.param_groups)}; "
                "build the optimizer with the same param groups as the one that was saved."
            )
        id_to_param: dict[int, Tensor] = {}
        new_groups = []
        for saved, group in zip(saved_groups, self.param_groups):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError("state_dict param group sizes differ from the optimizer's; build it from the same model.")
            id_to_param.update(zip(saved["params"], group["params"]))
            new_groups.append({**saved, "params": group["params"]})
        state: defaultdict[Tensor, dict] = defaultdict(dict)
        for key, value in state_dict["state"].items():
            param = id_to_param[key]
            state[param] = _to_device(value, param.device)
        self.__setstate__({"state": state, "param_groups": new_groups})


def _is_row_sharded(param: Tensor) -> bool:
    """A DTensor sharded along dim 0 on a 1-D mesh (FSDP2's layout); other DTensor layouts are refused."""
    if type(param) in (Tensor, nn.Parameter):  # the usual case, without importing torch.distributed
        return False
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return False
    if tuple(param.placements) != (Shard(0),):
        raise ValueError(f"GaLore optimizers step DTensors sharded by rows on one mesh dimension (FSDP2's "
                         f"fully_shard); got placements {param.placements}. Use FSDP2 or DDP.")
    return True


def _fp32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float32 else x.float()


class GaLoreAdamW(GaLoreOptimizer):
    """AdamW with GaLore projection for groups that have ``rank`` (arXiv 2403.03507, 1711.05101).

    State per parameter: ``step`` (int), ``exp_avg``/``exp_avg_sq`` in the low-rank shape
    (``(m, r)``, ``(r, n)`` or ``(r, r)``; the full shape for plain parameters) and ``projector``.

    The moments are updated ``chunk_numel`` flat elements at a time (a multiple of 256, the 8-bit
    block size; default 2**22), so an optimizer step's temporaries are a few chunk-sized buffers
    (about 24 bytes per chunk element in the 8-bit variant for bf16 parameters, 4 here) plus one
    low-rank direction in the parameter dtype: a plain parameter's update is added to it chunk by
    chunk, a low-rank one is projected back by ``addmm_`` into the weight. Element-wise arithmetic does not
    depend on the chunking, so the result equals the whole-tensor computation exactly.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        moments_on_refresh: str = "keep",
        chunk_numel: int = DEFAULT_CHUNK_NUMEL,
    ) -> None:
        if lr < 0:
            raise ValueError(f"`lr` must be >= 0, got {lr}.")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"`betas` must lie in [0, 1), got {betas}; the usual choice is (0.9, 0.999).")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"`eps` and `weight_decay` must be >= 0, got eps={eps}, weight_decay={weight_decay}.")
        if isinstance(chunk_numel, bool) or not isinstance(chunk_numel, int) or chunk_numel < 1 or chunk_numel % q8.BLOCK_SIZE:
            raise ValueError(
                f"`chunk_numel` must be a positive multiple of {q8.BLOCK_SIZE} (the 8-bit block size), got {chunk_numel!r}; "
                "the default 2**22 keeps an 8-bit step's temporaries near 100 MiB (about 24 bytes per chunk element)."
            )
        self.chunk_numel = chunk_numel
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}, moments_on_refresh)

    # ----------------------------------------------------------------- moment storage
    def _init_moments(self, state: dict, like: Tensor, param: Tensor) -> None:
        """Zero ``exp_avg`` and ``exp_avg_sq`` shaped like ``like``, in the parameter dtype."""
        state["exp_avg"] = torch.zeros(like.shape, dtype=param.dtype, device=like.device)
        state["exp_avg_sq"] = torch.zeros(like.shape, dtype=param.dtype, device=like.device)

    def _has_moments(self, state: dict) -> bool:
        return "exp_avg" in state

    def _load_moments(self, state: dict, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Flat elements ``[start, stop)`` of both moments, as tensors updated in place then passed to :meth:`_save_moments`."""
        return state["exp_avg"].view(-1)[start:stop], state["exp_avg_sq"].view(-1)[start:stop]

    def _save_moments(self, state: dict, group: dict[str, Any], start: int, exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
        """Moments loaded as views were updated in place; the 8-bit variant requantises here."""

    # ----------------------------------------------------------------- Adam
    def _count_step(self, state: dict, group: dict[str, Any], grad: Tensor, param: Tensor) -> float:
        """Create the moments on first use, count the step, return the step size ``lr / (1 - beta1^t)``."""
        if not self._has_moments(state):
            self._init_moments(state, grad, param)
        state["step"] = state.get("step", 0) + 1
        return group["lr"] / (1 - group["betas"][0] ** state["step"])

    def _adam_chunks(self, grad: Tensor, group: dict[str, Any], state: dict) -> Iterator[tuple[int, Tensor]]:
        """Update the moments chunk by chunk; yield ``(start, m / (√v / √(1 - beta2^t) + eps))`` per flat chunk."""
        beta1, beta2 = group["betas"]
        root_correction2 = math.sqrt(1 - beta2 ** state["step"])
        flat_grad = grad.reshape(-1)
        numel = flat_grad.numel()
        for start in range(0, numel, self.chunk_numel):
            stop = min(start + self.chunk_numel, numel)
            exp_avg, exp_avg_sq = self._load_moments(state, start, stop)
            chunk = flat_grad[start:stop].to(exp_avg.dtype)
            exp_avg.lerp_(chunk, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(chunk, chunk, value=1 - beta2)
            self._save_moments(state, group, start, exp_avg, exp_avg_sq)
            direction = exp_avg_sq.sqrt().div_(root_correction2).add_(group["eps"])
            yield start, torch.div(exp_avg, direction, out=direction)  # one temporary, reused in place

    def _adam(self, grad: Tensor, group: dict[str, Any], state: dict, param: Tensor) -> tuple[Tensor, float, float]:
        """Adam on a (low-rank) gradient: ``(direction in the parameter dtype, lr / bc1, lr)``."""
        step_size = self._count_step(state, group, grad, param)
        direction = torch.empty(grad.shape, dtype=param.dtype, device=grad.device)
        flat = direction.view(-1)
        for start, chunk in self._adam_chunks(grad, group, state):
            flat[start : start + chunk.numel()].copy_(chunk)
        return direction, step_size, group["lr"]

    def _direction(self, param, grad, group, state, low_rank):
        return self._adam(grad, group, state, param)

    def apply_update(self, param: Tensor, low_grad: Tensor, group: dict[str, Any]) -> None:
        """Low-rank parameters as in the base class; plain ones get their update added chunk by chunk."""
        if self.is_low_rank(param, group):
            super().apply_update(param, low_grad, group)
            return
        state = self.state[param]
        step_size = self._count_step(state, group, low_grad, param)
        self._decay(param, group, group["lr"])
        target = param.contiguous()  # `param` itself unless it is a non-contiguous view
        flat = target.view(-1)
        for start, chunk in self._adam_chunks(low_grad, group, state):
            flat[start : start + chunk.numel()].add_(chunk, alpha=-step_size)
        if target is not param:
            param.copy_(target)

    def _reproject_state(self, state: dict, t_left: Tensor | None, t_right: Tensor | None) -> None:
        state["exp_avg"] = map_low_rank(state["exp_avg"], t_left, t_right)
        state["exp_avg_sq"] = map_low_rank(state["exp_avg_sq"], t_left, t_right, squared=True)


def adam_moment_bound(betas: tuple[float, float], steps: int) -> float:
    """``K_n = (1 - β1)² / (1 - β2) · Σ_{k<n} (β1² / β2)^k``: after ``n`` Adam steps from zero moments, ``m² <= K_n v``.

    By Cauchy-Schwarz on ``m_n = Σ (1 - β1) β1^(n-i) g_i`` and ``v_n = Σ (1 - β2) β2^(n-i) g_i²``; equality at
    ``n = 1``. Hence Adam's step ``|m̂ / √v̂| <= √(K_n (1 - β2^n)) / (1 - β1^n)`` (1.00 at n = 1, 1.04 at n = 10 for
    betas (0.9, 0.999)). 0 for ``n = 0``, infinite for ``β2 = 0`` (no bound).
    """
    beta1, beta2 = betas
    if steps <= 0:
        return 0.0
    if beta2 == 0:
        return math.inf
    ratio = beta1 * beta1 / beta2
    series = steps if ratio == 1 else (1 - ratio**steps) / (1 - ratio)
    return (1 - beta1) ** 2 / (1 - beta2) * series


class GaLoreAdamW8bit(GaLoreAdamW):
    """:class:`GaLoreAdamW` with block-wise 8-bit moments (arXiv 2110.02861) in bitsandbytes' format.

    Moments with at least 4096 elements are stored as uint8 codes with one fp32 scale per block of 256
    (``exp_avg_codes``, ``exp_avg_absmax``, ``exp_avg_sq_codes``, ``exp_avg_sq_absmax``, plus
    ``moment_shape``): ``m`` in bitsandbytes' signed dynamic map, ``v`` in its unsigned one. Smaller moments
    stay fp32 (``exp_avg``, ``exp_avg_sq``). Each step dequantises one chunk of ``chunk_numel`` elements
    (whole blocks) to fp32, updates it, computes that chunk of the update from the fp32 moments and
    requantises it in place; since blocks are encoded independently the codes equal those of the
    whole-tensor computation. The codec (:mod:`memft.optimizers._blockwise8bit`) runs bitsandbytes' kernels
    when it is installed (fake tensors included) and an equivalent pure-torch codec otherwise; ``step`` is
    counted exactly once, here.

    Consistent moments: ``v`` scales as the square of the gradient, so inside a block it spans twice the
    orders of magnitude ``m`` does. An element far below its block's largest gradient (``v / absmax`` under
    the unsigned book's smallest codes, ~1e-7, while ``m / absmax`` ~1e-4 still has a fine code) can lose
    ``v`` to rounding and keep ``m``; once its own gradients are small, ``m / (√v + eps)`` exceeds Adam's
    step by orders of magnitude. Every exact Adam state satisfies ``m² <= K_t v`` (:func:`adam_moment_bound`),
    so after updating the dequantised moments with the step-``t`` gradient, ``v`` is raised to ``m² / K_t``
    where it is below, before it is stored and used. Exact moments are unchanged (up to rounding), and every
    element's step is within Adam's own bound ``√(K_t (1 - β2^t)) / (1 - β1^t)`` whatever the rounding
    (bitsandbytes' CPU and CUDA kernels round differently near zero).
    """

    def _init_moments(self, state: dict, like: Tensor, param: Tensor) -> None:
        if like.numel() < q8.MIN_8BIT_NUMEL:
            state["exp_avg"] = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
            state["exp_avg_sq"] = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
            return
        state["moment_shape"] = list(like.shape)
        state["exp_avg_codes"], state["exp_avg_absmax"] = q8.zeros(like.numel(), like.device)
        state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"] = q8.zeros(like.numel(), like.device)

    def _has_moments(self, state: dict) -> bool:
        return "exp_avg" in state or "exp_avg_codes" in state

    def _load_moments(self, state: dict, start: int, stop: int) -> tuple[Tensor, Tensor]:
        if "exp_avg" in state:
            return super()._load_moments(state, start, stop)
        exp_avg = q8.dequantize_range(state["exp_avg_codes"], state["exp_avg_absmax"], start, stop, signed=True)
        exp_avg_sq = q8.dequantize_range(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], start, stop, signed=False)
        return exp_avg, exp_avg_sq

    def _save_moments(self, state: dict, group: dict[str, Any], start: int, exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
        """Raise ``v`` to ``m² / K_t`` where the quantised history left it below (class docstring), then requantise."""
        if "exp_avg" in state:
            return
        bound = adam_moment_bound(group["betas"], state["step"])
        if bound < math.inf:
            exp_avg_sq.clamp_min_(torch.mul(exp_avg, exp_avg).div_(bound))
        q8.quantize_range_(state["exp_avg_codes"], state["exp_avg_absmax"], start, exp_avg, signed=True)
        q8.quantize_range_(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], start, exp_avg_sq, signed=False)

    def _reproject_state(self, state: dict, t_left: Tensor | None, t_right: Tensor | None) -> None:
        if "exp_avg" in state:
            super()._reproject_state(state, t_left, t_right)
            return
        shape = tuple(state["moment_shape"])
        exp_avg = q8.dequantize(state["exp_avg_codes"], state["exp_avg_absmax"], shape, signed=True)
        exp_avg_sq = q8.dequantize(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], shape, signed=False)
        exp_avg = map_low_rank(exp_avg, t_left, t_right)
        exp_avg_sq = map_low_rank(exp_avg_sq, t_left, t_right, squared=True)
        state["moment_shape"] = list(exp_avg.shape)
        state["exp_avg_codes"], state["exp_avg_absmax"] = q8.quantize(exp_avg, signed=True)
        state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"] = q8.quantize(exp_avg_sq, signed=False)


class GaLoreAdafactor(GaLoreOptimizer):
    """Adafactor (Shazeer & Stern, arXiv 1804.04235) with GaLore projection, following the
    ``transformers.Adafactor`` update rule.

    Second moments of 2-D (low-rank) gradients are factored into ``exp_avg_sq_row`` (rows) and
    ``exp_avg_sq_col`` (columns); optional first moment ``exp_avg`` when ``beta1`` is set. With
    ``relative_step=True`` (and ``lr=None``) the step size is ``min(1e-2, 1/√t)`` (``1e-6·t`` with
    ``warmup_init``), times ``max(eps[1], RMS(W))`` when ``scale_parameter``. Pass an ``lr`` and
    ``relative_step=False`` to use an external schedule. Weight decay is decoupled, before the update.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        moments_on_refresh: str = "keep",
    ) -> None:
        if lr is not None and relative_step:
            raise ValueError("`lr` was given with `relative_step=True`; pass relative_step=False to use a fixed or scheduled lr.")
        if lr is None and not relative_step:
            raise ValueError("`relative_step=False` needs an `lr`; pass e.g. lr=1e-3.")
        if warmup_init and not relative_step:
            raise ValueError("`warmup_init=True` requires `relative_step=True`.")
        defaults = {
            "lr": lr, "eps": eps, "clip_threshold": clip_threshold, "decay_rate": decay_rate, "beta1": beta1,
            "weight_decay": weight_decay, "scale_parameter": scale_parameter, "relative_step": relative_step,
            "warmup_init": warmup_init,
        }  # fmt: skip
        super().__init__(params, defaults, moments_on_refresh)

    @staticmethod
    def _rms(x: Tensor) -> Tensor:
        return torch.linalg.vector_norm(x, dtype=torch.float32) / x.numel() ** 0.5

    def _step_size(self, group: dict[str, Any], step: int, param: Tensor) -> float | Tensor:
        size: float | Tensor = group["lr"]
        if group["relative_step"]:
            min_step = 1e-6 * step if group["warmup_init"] else 1e-2
            size = min(min_step, 1.0 / math.sqrt(step))
        if group["scale_parameter"]:
            size = self._rms(param).clamp(min=group["eps"][1]) * size
        return size

    def _direction(self, param, grad, group, state, low_rank):
        grad32 = _fp32(grad)
        factored = grad32.dim() >= 2
        if "exp_avg_sq_row" not in state and "exp_avg_sq" not in state:
            if factored:
                state["exp_avg_sq_row"] = grad32.new_zeros(grad32.shape[:-1])
                state["exp_avg_sq_col"] = grad32.new_zeros(grad32.shape[:-2] + grad32.shape[-1:])
            else:
                state["exp_avg_sq"] = torch.zeros_like(grad32)
            if group["beta1"] is not None:
                state["exp_avg"] = torch.zeros_like(grad32)
        state["step"] = state.get("step", 0) + 1
        lr = self._step_size(group, state["step"], param)
        beta2t = 1.0 - state["step"] ** group["decay_rate"]
        squared = grad32 * grad32 + group["eps"][0]
        if factored:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(squared.mean(dim=-1), alpha=1 - beta2t)
            col.mul_(beta2t).add_(squared.mean(dim=-2), alpha=1 - beta2t)
            row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
            update = row_factor * col.unsqueeze(-2).rsqrt() * grad32
        else:
            state["exp_avg_sq"].mul_(beta2t).add_(squared, alpha=1 - beta2t)
            update = state["exp_avg_sq"].rsqrt() * grad32
        update.div_((self._rms(update) / group["clip_threshold"]).clamp(min=1.0))
        update.mul_(lr)
        if group["beta1"] is not None:
            state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
            update = state["exp_avg"]
        return update, 1.0, lr

    def _reproject_state(self, state: dict, t_left: Tensor | None, t_right: Tensor | None) -> None:
        if "exp_avg" in state:
            state["exp_avg"] = map_low_rank(state["exp_avg"], t_left, t_right)
        if t_left is not None:
            state["exp_avg_sq_row"] = (t_left * t_left) @ state["exp_avg_sq_row"]
        if t_right is not None:
            state["exp_avg_sq_col"] = state["exp_avg_sq_col"] @ (t_right * t_right)


def _is_linear_like(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and weight.dim() == 2 and (
        isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
    )


def galore_param_groups(
    model: nn.Module,
    target_modules: Iterable[str] | None = None,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    svd: str = "exact",
    weight_decay: float = 0.0,
    module_ranks: Mapping[str, int] | None = None,
    **extra: Any,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into GaLore groups and a plain group.

    A weight goes to a GaLore group when it is the 2-D ``weight`` of an ``nn.Linear`` (or HF
    ``Conv1D``) whose last name component contains one of ``target_modules`` (default: the
    attention and MLP projections in :data:`DEFAULT_TARGET_MODULES`). Everything else that
    requires grad (embeddings, norms, biases, the LM head) goes to the plain group. ``module_ranks``
    (e.g. ``{"lm_head": 256}``) gives the weights whose last name component contains a key that rank,
    in a GaLore group of their own; the others take ``rank``. ``extra`` keys (e.g. ``svd_oversampling``,
    ``svd_power_iters``, ``lr``) are added to the GaLore groups only.
    """
    module_ranks = dict(module_ranks or {})
    for r in (rank, *module_ranks.values()):
        validate_projection_config(r, update_proj_gap, proj_type, svd, extra.get("svd_oversampling", 8),
                                   extra.get("svd_power_iters", 2))
    user_targets = target_modules is not None
    if isinstance(target_modules, str):
        raise TypeError("`target_modules` must be a list of names, not a string; pass e.g. ['q_proj', 'v_proj'].")
    targets = tuple(target_modules) if user_targets else DEFAULT_TARGET_MODULES
    galore_rank: dict[int, int] = {}  # id(weight) -> its rank
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if _is_linear_like(module) and module.weight.requires_grad and any(t in last for t in targets):
            galore_rank[id(module.weight)] = next((r for key, r in module_ranks.items() if key in last), rank)
    if not galore_rank:
        raise ValueError(
            f"galore_param_groups found no trainable 2-D linear weight whose module name contains one of {targets}; "
            "pass `target_modules` with the names of your model's linear layers (see model.named_modules())."
        )
    unused = [key for key in module_ranks if not any(key in name.rsplit(".", 1)[-1] and id(getattr(m, "weight", None))
                                                     in galore_rank for name, m in model.named_modules())]
    if unused:
        raise ValueError(f"module_ranks names {unused}, which match no GaLore target weight; name modules that "
                         f"target_modules selects ({targets}).")
    by_rank: dict[int, list[nn.Parameter]] = {}
    plain_params = []
    for _, param in model.named_parameters():
        if param.requires_grad:
            if id(param) in galore_rank:
                by_rank.setdefault(galore_rank[id(param)], []).append(param)
            else:
                plain_params.append(param)
    groups = [{
        "params": params, "rank": r, "update_proj_gap": update_proj_gap, "scale": scale,
        "proj_type": proj_type, "svd": svd, "weight_decay": weight_decay, **extra,
    } for r, params in by_rank.items()]  # fmt: skip
    if plain_params:
        groups.append({"params": plain_params, "weight_decay": weight_decay})
    return groups
