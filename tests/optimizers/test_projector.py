"""LowRankProjector: sides, shapes, refresh schedule, randomized SVD (block-wise, no full-size copy), fallbacks,
checkpointing."""

import io

import pytest
import torch

from memft.memory import MemoryTracker
from memft.optimizers.projector import LowRankProjector, map_low_rank, randomized_svd



def _power_law_matrix(m: int, n: int, decay: float = 1.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=gen)).Q
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -decay
    return (u * s) @ v.T


def _svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u, _, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return u, vh


@pytest.mark.parametrize(
    "proj_type, shape, expected_low",
    [
        ("std", (12, 7), (12, 3)),  # tall -> right basis
        ("std", (7, 12), (3, 12)),  # wide -> left basis
        ("std", (9, 9), (9, 3)),  # square -> right basis (m >= n)
        ("reverse_std", (12, 7), (3, 7)),
        ("reverse_std", (7, 12), (7, 3)),
        ("left", (12, 7), (3, 7)),
        ("right", (7, 12), (7, 3)),
        ("full", (12, 7), (3, 3)),
    ],
)
def test_projection_matches_svd_subspace(proj_type, shape, expected_low):
    grad = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    projector = LowRankProjector(rank=3, proj_type=proj_type)
    projector.refresh(grad)
    low = projector.project(grad)
    assert low.shape == expected_low
    u, vh = _svd(grad)
    left_proj = u[:, :3] @ u[:, :3].T
    right_proj = vh[:3].T @ vh[:3]
    uses_left = projector.left is not None
    uses_right = projector.right is not None
    expected = grad.double()
    if uses_left:
        expected = left_proj @ expected
    if uses_right:
        expected = expected @ right_proj
    torch.testing.assert_close(projector.project_back(low).double(), expected, atol=1e-5, rtol=1e-5)


def test_project_back_side_comes_from_stored_basis_for_square_low_rank():
    # Tall 12x4 with a left basis of rank 4: the low-rank tensor is 4x4, so a shape rule cannot tell the side.
    grad = torch.randn(12, 4, generator=torch.Generator().manual_seed(2))
    projector = LowRankProjector(rank=4, proj_type="left")
    projector.refresh(grad)
    low = projector.project(grad)
    assert low.shape == (4, 4) and projector.right is None
    torch.testing.assert_close(projector.project_back(low), projector.left @ low)
    torch.testing.assert_close(projector.project_back(low), grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("proj_type", ["left", "right", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_project_back_adds_the_projected_update(proj_type, dtype):
    """``W += α · project_back(R)`` by addmm_ equals the fp64 sum to one rounding of W's dtype, in W's storage."""
    gen = torch.Generator().manual_seed(4)
    projector = LowRankProjector(rank=3, proj_type=proj_type)
    projector.refresh(torch.randn(12, 7, generator=gen).to(dtype))
    low = projector.project(torch.randn(12, 7, generator=gen).to(dtype))
    weight = torch.randn(12, 7, generator=gen).to(dtype)
    up = low.double()  # fp64 products of the stored (dtype) bases and low-rank tensor
    up = projector.left.double() @ up if projector.left is not None else up
    up = up @ projector.right.double() if projector.right is not None else up
    expected = weight.double() - 0.3 * up
    storage = weight.untyped_storage().data_ptr()
    projector.add_project_back_(weight, low, alpha=-0.3)
    assert weight.untyped_storage().data_ptr() == storage and weight.dtype == dtype
    tolerance = {"atol": 1e-6, "rtol": 1e-6} if dtype == torch.float32 else {"atol": 2**-8, "rtol": 2**-8}
    torch.testing.assert_close(weight.double(), expected, **tolerance)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_rank_at_least_min_dim_is_lossless(proj_type):
    grad = torch.randn(12, 7, generator=torch.Generator().manual_seed(3))
    projector = LowRankProjector(rank=100, proj_type=proj_type, svd="randomized")
    projector.refresh(grad)
    for basis in (projector.left, projector.right):
        if basis is not None:
            assert min(basis.shape) == 7
    torch.testing.assert_close(projector.project_back(projector.project(grad)), grad, atol=1e-5, rtol=1e-5)


def test_refresh_schedule_counts_steps_before_increment():
    projector = LowRankProjector(rank=2, update_proj_gap=3)
    assert projector.needs_refresh(5)  # never refreshed yet
    projector.refresh(torch.randn(6, 5))
    assert [s for s in range(10) if projector.needs_refresh(s)] == [0, 3, 6, 9]


def test_randomized_svd_captures_the_exact_energy():
    grad = _power_law_matrix(300, 500, decay=1.0) + 1e-4 * torch.randn(300, 500, generator=torch.Generator().manual_seed(4))
    exact = LowRankProjector(rank=16, svd="exact")
    randomized = LowRankProjector(rank=16, svd="randomized", oversampling=8, power_iters=2)
    exact.refresh(grad)
    randomized.refresh(grad)

    def energy(p):
        return (p.project(grad).norm() ** 2 / grad.norm() ** 2).item()

    assert energy(exact) > 0.9
    assert abs(energy(randomized) - energy(exact)) < 0.01 * energy(exact)
    # Leading directions agree (well-separated singular values 1, 1/2, 1/3, ...).
    overlap = (exact.left[:, :4].T @ randomized.left[:, :4]).abs().diagonal()
    assert torch.all(overlap > 0.99)


def test_randomized_svd_is_reproducible_from_seed_and_refresh_count():
    grad = torch.randn(200, 300, generator=torch.Generator().manual_seed(5))
    a = LowRankProjector(rank=8, svd="randomized", seed=7)
    b = LowRankProjector(rank=8, svd="randomized", seed=7)
    a.refresh(grad)
    b.refresh(grad)
    assert torch.equal(a.left, b.left)
    resumed = LowRankProjector.from_state_dict(a.state_dict())
    a.refresh(grad)
    resumed.refresh(grad)
    assert torch.equal(a.left, resumed.left) and a.num_refreshes == resumed.num_refreshes == 2


def _low_rank_plus_noise(m: int, n: int, rank: int, noise: float, seed: int = 0) -> torch.Tensor:
    """Rank-``rank`` signal (singular values 1 down to 0.1) plus Gaussian noise of ``noise`` times its norm."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, rank, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, rank, generator=gen)).Q
    signal = (u * torch.linspace(1.0, 0.1, rank)) @ v.T
    gaussian = torch.randn(m, n, generator=gen)
    return signal + gaussian * (noise * signal.norm() / gaussian.norm())


def _whole_matrix_range_finder(matrix, k, oversampling, power_iters, seed):
    """Halko et al. 2011 on the whole fp32 matrix, with the test matrix ``randomized_svd`` draws."""
    a = matrix.float() if matrix.shape[0] >= matrix.shape[1] else matrix.float().T
    omega = torch.randn((a.shape[1], k + oversampling), generator=torch.Generator().manual_seed(seed))
    q = torch.linalg.qr(a @ omega).Q
    for _ in range(power_iters):
        q = torch.linalg.qr(a @ torch.linalg.qr(a.T @ q).Q).Q
    u, _, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    u, vh = q @ u[:, :k], vh[:k]
    return (u, vh) if matrix.shape[0] >= matrix.shape[1] else (vh.T, u.T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2048, 96), (96, 2048)])  # tall: 43 row blocks; wide: read as its transpose
def test_block_wise_range_finder_equals_the_whole_matrix_algorithm(shape, dtype):
    grad = _low_rank_plus_noise(*shape, rank=16, noise=0.1).to(dtype)
    u, vh = randomized_svd(grad, 16, 8, 2, torch.Generator().manual_seed(3))
    ref_u, ref_vh = _whole_matrix_range_finder(grad, 16, 8, 2, seed=3)
    assert u.shape == (shape[0], 16) and vh.shape == (16, shape[1]) and u.dtype == vh.dtype == torch.float32
    torch.testing.assert_close(u @ u.T, ref_u @ ref_u.T, atol=1e-5, rtol=0)
    torch.testing.assert_close(vh.T @ vh, ref_vh.T @ ref_vh, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(2048, 256), (256, 2048)])
def test_randomized_refresh_of_a_bf16_gradient_captures_the_exact_energy(shape):
    """Captured energy ``‖Pᵀ G‖_F / ‖G‖_F`` of the bf16 bases, noise as large as half the signal."""
    grad = _low_rank_plus_noise(*shape, rank=64, noise=0.5).to(torch.bfloat16)
    energies = []
    for svd in ("exact", "randomized"):
        projector = LowRankProjector(rank=32, svd=svd)
        projector.refresh(grad)
        basis = (projector.left if projector.left is not None else projector.right).double()
        reference = grad.double()
        captured = basis.T @ reference if projector.left is not None else reference @ basis.T
        energies.append((captured.norm() / reference.norm()).item())
    exact, randomized = energies
    assert 0.5 < exact < 0.95  # the noise leaves energy outside the top-32 subspace
    assert randomized / exact > 0.995, energies


def _refresh_transient_bytes(svd: str, shape: tuple[int, int], fake: bool) -> int:
    def run() -> int:
        grad = torch.randn(*shape).to(torch.bfloat16)
        projector = LowRankProjector(rank=8, svd=svd)
        with MemoryTracker(None, None, device="cpu") as tracker:
            tracker.register([grad], "gradients")
            baseline = tracker.current_bytes
            projector.refresh(grad)
        return tracker.peak_bytes - baseline

    if not fake:
        return run()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return run()


@pytest.mark.parametrize("shape", [(8192, 256), (256, 8192)])
def test_randomized_refresh_holds_no_full_size_copy_of_the_gradient(shape):
    """Block-wise: the fp32 sketch, its QR and one fp32 block, each ``(m + n) w`` elements (``w = 8 + 8``),
    well under the fp32 copy (``4 m n`` bytes) an exact SVD makes; fake tensors (the planner) count the same."""
    sketch_bytes = 4 * sum(shape) * 16
    transient = _refresh_transient_bytes("randomized", shape, fake=False)
    assert transient <= 4 * sketch_bytes < 4 * shape[0] * shape[1], (transient, sketch_bytes)
    assert _refresh_transient_bytes("exact", shape, fake=False) > 4 * shape[0] * shape[1]
    assert _refresh_transient_bytes("randomized", shape, fake=True) == transient


def _failing_svd(monkeypatch, fail_shape, failures):
    real_svd = torch.linalg.svd
    calls = {"failed": 0}

    def svd(matrix, *args, **kwargs):
        if tuple(matrix.shape) == fail_shape and calls["failed"] < failures:
            calls["failed"] += 1
            raise torch.linalg.LinAlgError("simulated: SVD did not converge")
        return real_svd(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", svd)
    return calls


@pytest.mark.parametrize("failures", [1, 2])  # 1: jitter retry succeeds; 2: falls back to torch.svd_lowrank
def test_exact_svd_falls_back_when_it_does_not_converge(monkeypatch, failures):
    grad = _power_law_matrix(40, 60, decay=2.0)
    u, _ = _svd(grad)
    calls = _failing_svd(monkeypatch, (40, 60), failures)
    projector = LowRankProjector(rank=4)
    projector.refresh(grad)
    assert calls["failed"] == failures
    overlap = (u[:, :4].float().T @ projector.left).abs().diagonal()
    assert torch.all(overlap > 0.999)


def test_non_finite_gradient_raises_a_clear_error(monkeypatch):
    grad = torch.randn(10, 20)
    grad[0, 0] = float("nan")
    _failing_svd(monkeypatch, (10, 20), failures=5)
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        LowRankProjector(rank=2).refresh(grad)


def test_state_round_trips_through_weights_only_load():
    projector = LowRankProjector(rank=3, update_proj_gap=7, proj_type="full", svd="randomized", seed=3)
    projector.refresh(torch.randn(9, 11))
    buffer = io.BytesIO()
    torch.save(projector.state_dict(), buffer)
    buffer.seek(0)
    loaded = LowRankProjector.from_state_dict(torch.load(buffer, weights_only=True))
    assert loaded.state_dict().keys() == projector.state_dict().keys()
    assert torch.equal(loaded.left, projector.left) and torch.equal(loaded.right, projector.right)
    assert (loaded.proj_type, loaded.svd, loaded.update_proj_gap, loaded.num_refreshes) == ("full", "randomized", 7, 1)


@pytest.mark.parametrize("proj_type", ["left", "right", "full"])
def test_transitions_reproject_low_rank_tensors(proj_type):
    gen = torch.Generator().manual_seed(6)
    old = LowRankProjector(rank=3, proj_type=proj_type)
    old.refresh(torch.randn(10, 8, generator=gen))
    new = LowRankProjector.from_state_dict(old.state_dict())
    new.refresh(torch.randn(10, 8, generator=gen))
    moment = old.project(torch.randn(10, 8, generator=gen))
    t_left, t_right = new.transitions(old.left, old.right)
    expected = new.project(old.project_back(moment))
    torch.testing.assert_close(map_low_rank(moment, t_left, t_right), expected, atol=1e-6, rtol=1e-5)
    squared = map_low_rank(moment.abs(), t_left, t_right, squared=True)
    assert torch.all(squared >= 0)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"rank": 0}, ValueError),
        ({"rank": 2.5}, TypeError),
        ({"rank": 2, "proj_type": "diagonal"}, ValueError),
        ({"rank": 2, "svd": "lanczos"}, ValueError),
        ({"rank": 2, "update_proj_gap": 0}, ValueError),
    ],
)
def test_bad_configuration_is_rejected(kwargs, error):
    with pytest.raises(error):
        LowRankProjector(**kwargs)
