"""Low-rank gradient projector for GaLore (arXiv 2403.03507).

A 2-D gradient ``G`` of shape ``(m, n)`` is projected onto the top singular subspace of a
gradient seen at the last refresh:

* ``left``  basis ``A`` of shape ``(m, r)``:   ``R = Aᵀ G``      (``r × n``),  back: ``A R``
* ``right`` basis ``B`` of shape ``(r, n)``:   ``R = G Bᵀ``      (``m × r``),  back: ``R B``
* ``full``  both:                              ``R = Aᵀ G Bᵀ``   (``r × r``),  back: ``A R B``

``proj_type`` picks the side at each refresh: ``std`` projects the smaller side (``right`` when
``m >= n``, else ``left``), ``reverse_std`` the larger one, ``left``/``right``/``full`` are fixed.
The effective rank is ``min(rank, m, n)``: with ``rank >= min(m, n)`` the basis is a complete
orthogonal matrix and the projection is lossless.

The project-back side is read from which bases are stored, never inferred from tensor shapes
(a square low-rank tensor would make shape inference ambiguous). Optimizers apply the update with
:meth:`LowRankProjector.add_project_back_`, an in-place ``addmm_`` into the weight, so the full-size
``(m, n)`` update is never materialised.

``svd="exact"`` runs ``torch.linalg.svd`` on an fp32 copy of the whole gradient; if it fails to converge
the matrix is retried with a tiny deterministic jitter, then with ``torch.svd_lowrank``.
``svd="randomized"`` is a randomized range finder (Halko, Martinsson & Tropp, arXiv 0909.4061) with
``w = rank + oversampling`` columns and ``power_iters`` QR-stabilised power iterations. It never copies
the gradient: it reads it in its own dtype, one block of rows at a time (at most ``(m + n) w`` elements,
cast to fp32), and accumulates the ``(m, w)`` and ``(n, w)`` products in fp32, so its extra memory is
``O((m + n) w)``. Its Gaussian test matrix is drawn from a CPU generator seeded by ``seed`` and the
refresh count, so a resumed run draws the same matrices.

The whole state (config, bases, refresh count) is plain tensors, ints and strings, so it round-trips
through ``torch.save`` and ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SVD_METHODS = ("exact", "randomized")
_JITTER_SEED = 0x5EED


def _check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}; pass e.g. {name}=128.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}; pass a value of at least {minimum}.")
    return value


def validate_projection_config(
    rank: object, update_proj_gap: object, proj_type: object, svd: object, oversampling: object, power_iters: object
) -> None:
    """Raise ``ValueError``/``TypeError`` for a bad projector configuration."""
    _check_positive_int("rank", rank)
    _check_positive_int("update_proj_gap", update_proj_gap)
    _check_positive_int("svd_oversampling", oversampling, minimum=0)
    _check_positive_int("svd_power_iters", power_iters, minimum=0)
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"`proj_type` must be one of {PROJ_TYPES}, got {proj_type!r}; 'std' projects the smaller side.")
    if svd not in SVD_METHODS:
        raise ValueError(f"`svd` must be one of {SVD_METHODS}, got {svd!r}; 'randomized' is cheaper on large matrices.")


def _sides(proj_type: str, m: int, n: int) -> tuple[bool, bool]:
    """Which bases (left, right) a ``proj_type`` uses for an ``m × n`` gradient."""
    if proj_type == "std":
        return (m < n, m >= n)
    if proj_type == "reverse_std":
        return (m >= n, m < n)
    if proj_type == "left":
        return (True, False)
    if proj_type == "right":
        return (False, True)
    return (True, True)


def _exact_svd(matrix: Tensor, k: int, oversampling: int, power_iters: int) -> tuple[Tensor, Tensor]:
    """Thin SVD ``(U, Vh)`` of an fp32 matrix with fallbacks when LAPACK fails to converge."""
    try:
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u, vh
    except torch.linalg.LinAlgError:
        pass
    if not bool(torch.isfinite(matrix).all()):
        raise FloatingPointError(
            "GaLore projector: the gradient contains NaN or Inf, so its SVD is undefined. "
            "Lower the learning rate, enable gradient clipping or check the loss for overflow."
        )
    generator = torch.Generator().manual_seed(_JITTER_SEED)
    noise = torch.randn(matrix.shape, generator=generator, dtype=matrix.dtype).to(matrix.device)
    jitter = 1e-6 * torch.linalg.vector_norm(matrix) / matrix.numel() ** 0.5
    try:
        u, _, vh = torch.linalg.svd(matrix + jitter * noise, full_matrices=False)
        return u, vh
    except torch.linalg.LinAlgError:
        q = min(k + oversampling, *matrix.shape)
        u, _, v = torch.svd_lowrank(matrix, q=q, niter=max(power_iters, 2))
        return u, v.mT


def _block_rows(a: Tensor, width: int) -> int:
    """Rows of ``a`` (``m × n``) read at once: a block holds at most ``(m + n) · width`` elements."""
    m, n = a.shape
    return max(1, (m + n) * width // n)


def _times(a: Tensor, x: Tensor, rows: int) -> Tensor:
    """``a @ x`` in fp32 (``(m, w)``), ``a`` (``m × n``, any float dtype) read ``rows`` rows at a time."""
    out = x.new_empty((a.shape[0], x.shape[1]))
    for start in range(0, a.shape[0], rows):
        torch.mm(a[start : start + rows].float(), x, out=out[start : start + rows])
    return out


def _transpose_times(a: Tensor, y: Tensor, rows: int) -> Tensor:
    """``aᵀ @ y`` in fp32 (``(n, w)``), summed over blocks of ``rows`` rows of ``a`` (``m × n``)."""
    out = y.new_zeros((a.shape[1], y.shape[1]))
    for start in range(0, a.shape[0], rows):
        out.addmm_(a[start : start + rows].float().mT, y[start : start + rows])
    return out


def randomized_svd(matrix: Tensor, k: int, oversampling: int, power_iters: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Top-``k`` singular vectors ``(U[m, k], Vh[k, n])``, fp32, of an ``(m, n)`` matrix: a randomized range finder.

    Halko et al. 2011, algorithms 4.4 and 5.1, on ``A`` = the matrix with its longer side first: sketch
    ``Y = A Ω`` with ``Ω ~ N(0, 1)`` of shape ``(cols, w)``, ``w = k + oversampling``, orthonormalise, run
    ``power_iters`` subspace iterations, then take the SVD of the small ``(w, cols)`` matrix ``Qᵀ A``.
    ``A`` is read in fp32 row blocks (:func:`_block_rows`) and never copied whole.
    """
    transposed = matrix.shape[0] < matrix.shape[1]
    a = matrix.mT if transposed else matrix
    m, n = a.shape
    width = min(k + oversampling, n)
    rows = _block_rows(a, width)
    omega = torch.randn((n, width), generator=generator, dtype=torch.float32).to(a.device)
    q = torch.linalg.qr(_times(a, omega, rows)).Q
    for _ in range(power_iters):
        z = torch.linalg.qr(_transpose_times(a, q, rows)).Q
        q = torch.linalg.qr(_times(a, z, rows)).Q
    u_small, _, vh = torch.linalg.svd(_transpose_times(a, q, rows).mT, full_matrices=False)
    u, vh = q @ u_small[:, :k], vh[:k]
    return (vh.mT, u.mT) if transposed else (u, vh)


class LowRankProjector:
    """GaLore subspace for one 2-D parameter; see the module docstring for shapes and options."""

    def __init__(
        self,
        rank: int,
        update_proj_gap: int = 200,
        proj_type: str = "std",
        svd: str = "exact",
        oversampling: int = 8,
        power_iters: int = 2,
        seed: int = 0,
    ) -> None:
        validate_projection_config(rank, update_proj_gap, proj_type, svd, oversampling, power_iters)
        self.rank = rank
        self.update_proj_gap = update_proj_gap
        self.proj_type = proj_type
        self.svd = svd
        self.oversampling = oversampling
        self.power_iters = power_iters
        self.seed = int(seed)
        self.left: Tensor | None = None
        self.right: Tensor | None = None
        self.num_refreshes = 0

    @property
    def initialised(self) -> bool:
        return self.left is not None or self.right is not None

    def needs_refresh(self, step: int) -> bool:
        """True when ``step`` (optimizer steps taken so far, before incrementing) starts a new subspace."""
        return not self.initialised or step % self.update_proj_gap == 0

    def refresh(self, grad: Tensor) -> None:
        """Recompute the bases from ``grad`` (``m × n``); bases are stored in ``grad.dtype``."""
        if grad.dim() != 2:
            raise ValueError(f"LowRankProjector.refresh expects a 2-D gradient, got shape {tuple(grad.shape)}.")
        m, n = grad.shape
        use_left, use_right = _sides(self.proj_type, m, n)
        k = min(self.rank, m, n)
        if self.svd == "randomized" and k + self.oversampling < min(m, n):
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.num_refreshes)
            u, vh = randomized_svd(grad.detach(), k, self.oversampling, self.power_iters, generator)
        else:
            u, vh = _exact_svd(grad.detach().float(), k, self.oversampling, self.power_iters)
        self.left = u[:, :k].to(grad.dtype).contiguous() if use_left else None
        self.right = vh[:k].to(grad.dtype).contiguous() if use_right else None
        self.num_refreshes += 1

    def project(self, grad: Tensor) -> Tensor:
        """``(m, n)`` gradient -> low-rank ``(r, n)``, ``(m, r)`` or ``(r, r)`` tensor."""
        if not self.initialised:
            raise RuntimeError("LowRankProjector.project called before refresh(); refresh it with a gradient first.")
        out = grad
        if self.left is not None:
            out = self.left.mT @ out
        if self.right is not None:
            out = out @ self.right.mT
        return out

    def project_back(self, low_rank: Tensor) -> Tensor:
        """Low-rank tensor -> ``(m, n)``; the side comes from the stored bases."""
        if not self.initialised:
            raise RuntimeError("LowRankProjector.project_back called before refresh(); refresh it with a gradient first.")
        out = low_rank
        if self.left is not None:
            out = self.left @ out
        if self.right is not None:
            out = out @ self.right
        return out

    def add_project_back_(self, target: Tensor, low_rank: Tensor, alpha: float) -> None:
        """``target += alpha * project_back(low_rank)`` in place, with no ``(m, n)`` temporary.

        One ``addmm_`` into ``target`` (``(m, n)``): ``A R``, ``R B`` or ``A (R B)`` with ``R B`` of shape
        ``(r, n)``. The product is accumulated and added before a single rounding to ``target.dtype``.
        """
        if not self.initialised:
            raise RuntimeError("LowRankProjector.add_project_back_ called before refresh(); refresh it with a gradient first.")
        low_rank = low_rank.to(target.dtype)
        left = self.left.to(target.dtype) if self.left is not None else None
        right = self.right.to(target.dtype) if self.right is not None else None
        if left is not None and right is not None:
            target.addmm_(left, low_rank @ right, alpha=alpha)
        elif left is not None:
            target.addmm_(left, low_rank, alpha=alpha)
        else:
            target.addmm_(low_rank, right, alpha=alpha)

    def transitions(self, old_left: Tensor | None, old_right: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """Matrices mapping a tensor in the old low-rank coordinates to the new ones.

        Returns ``(T_left, T_right)`` with ``T_left = A_newᵀ A_old`` (applied as ``T_left @ X``) and
        ``T_right = B_old B_newᵀ`` (applied as ``X @ T_right``); ``None`` for an unused side.
        """
        t_left = self.left.mT @ old_left if self.left is not None and old_left is not None else None
        t_right = old_right @ self.right.mT if self.right is not None and old_right is not None else None
        return t_left, t_right

    def state_dict(self) -> dict:
        return {
            "rank": self.rank,
            "update_proj_gap": self.update_proj_gap,
            "proj_type": self.proj_type,
            "svd": self.svd,
            "oversampling": self.oversampling,
            "power_iters": self.power_iters,
            "seed": self.seed,
            "num_refreshes": self.num_refreshes,
            "left": self.left,
            "right": self.right,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "LowRankProjector":
        projector = cls(
            rank=state["rank"],
            update_proj_gap=state["update_proj_gap"],
            proj_type=state["proj_type"],
            svd=state["svd"],
            oversampling=state["oversampling"],
            power_iters=state["power_iters"],
            seed=state["seed"],
        )
        projector.num_refreshes = int(state["num_refreshes"])
        projector.left = state["left"]
        projector.right = state["right"]
        return projector


def map_low_rank(x: Tensor, t_left: Tensor | None, t_right: Tensor | None, squared: bool = False) -> Tensor:
    """Apply subspace transitions to a low-rank tensor ``x``; ``squared`` uses ``T ⊙ T`` (for second moments)."""
    out = x
    if t_left is not None:
        out = (t_left * t_left if squared else t_left).to(out.dtype) @ out
    if t_right is not None:
        out = out @ (t_right * t_right if squared else t_right).to(out.dtype)
    return out
