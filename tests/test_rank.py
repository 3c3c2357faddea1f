"""Tests for lora_from_scratch.rank: rank, spectrum, Eckart-Young, LoRA eq. (4) subspace similarity (one value
and the whole table of Figure 3).

References: numpy.linalg and torch.linalg (matrix_rank, svd); the theorems quoted in rank.py.
"""

import math
import pathlib

import numpy as np
import pytest
import torch

from lora_from_scratch import rank
from lora_from_scratch.backend import asarray, to_numpy


def low_rank(rng, d, k, r, dtype=np.float64):
    """A random (d, k) matrix of rank exactly r (with probability 1), on the default backend."""
    B = rng.standard_normal((d, r))  # (d, r)
    A = rng.standard_normal((r, k))  # (r, k)
    return asarray((B @ A).astype(dtype))  # (d, r) @ (r, k) -> (d, k)


def rel(a, b):
    a, b = to_numpy(a), to_numpy(b)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


SHAPES = [(5, 7, 1), (20, 20, 3), (64, 16, 8), (16, 64, 15), (40, 30, 30), (100, 80, 12)]


def test_no_numpy_import_in_computational_module():
    src = pathlib.Path(rank.__file__).read_text()
    assert "import numpy" not in src
    assert "from numpy" not in src


@pytest.mark.parametrize("d,k,r", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_of_product_is_inner_dimension(d, k, r, seed):
    rng = np.random.default_rng(seed)
    W = low_rank(rng, d, k, r)  # (d, k)
    assert rank.matrix_rank(W) == r
    # the same for float32, where the tolerance scales with float32's eps
    W32 = low_rank(rng, d, k, r, np.float32)  # (d, k)
    assert rank.matrix_rank(W32) == r


@pytest.mark.parametrize("d,k,r", SHAPES)
def test_matrix_rank_matches_numpy_and_torch(d, k, r):
    rng = np.random.default_rng(10 + d + k + r)
    for dtype in (np.float64, np.float32):
        W = low_rank(rng, d, k, r, dtype)  # (d, k)
        Wn = to_numpy(W)  # (d, k)
        ours = rank.matrix_rank(W)
        assert ours == int(np.linalg.matrix_rank(Wn))
        assert ours == int(torch.linalg.matrix_rank(torch.from_numpy(Wn)))


def test_matrix_rank_tolerance_and_special_matrices():
    # diag(1, 1e-3, 1e-9): the explicit tolerance decides which directions count
    W = asarray(np.diag([1.0, 1e-3, 1e-9]))  # (3, 3)
    assert rank.matrix_rank(W) == 3  # 1e-9 is far above 3 * eps
    assert rank.matrix_rank(W, tol=1e-6) == 2
    assert rank.matrix_rank(W, tol=1e-2) == 1
    assert rank.matrix_rank(W, tol=0) == 3
    assert rank.matrix_rank(asarray(np.zeros((4, 6)))) == 0
    assert rank.matrix_rank(asarray(np.eye(7))) == 7
    # integer input is accepted (converted to float64)
    assert rank.matrix_rank(asarray(np.array([[1, 2], [2, 4]]))) == 1
    # full rank: min(d, k)
    rng = np.random.default_rng(3)
    assert rank.matrix_rank(asarray(rng.standard_normal((9, 4)))) == 4


def test_singular_values_match_numpy_and_descend():
    rng = np.random.default_rng(4)
    W = asarray(rng.standard_normal((12, 7)))  # (12, 7)
    s = rank.singular_values(W)  # (7,)
    assert s.shape == (7,)
    ref = np.linalg.svd(to_numpy(W), compute_uv=False)  # (7,)
    assert rel(s, ref) < 1e-13
    assert np.all(np.diff(to_numpy(s)) <= 0)


@pytest.mark.parametrize("d,k", [(30, 20), (20, 30), (25, 25)])
@pytest.mark.parametrize("r", [1, 4, 10])
def test_eckart_young_error_and_factor_shapes(d, k, r):
    rng = np.random.default_rng(100 + d + r)
    W = asarray(rng.standard_normal((d, k)))  # (d, k)
    B, A = rank.low_rank_approximation(W, r)  # (d, r), (r, k)
    assert B.shape == (d, r) and A.shape == (r, k)
    assert B.dtype == np.float64 and A.dtype == np.float64
    s = np.linalg.svd(to_numpy(W), compute_uv=False)  # (min(d, k),)
    err = np.linalg.norm(to_numpy(W) - to_numpy(B @ A))  # Frobenius norm of (d, k)
    expected = math.sqrt(float(np.sum(s[r:] ** 2)))
    assert abs(err - expected) / expected < 1e-10
    # B A is the truncated SVD: compare with numpy's, term by term
    U, s_full, Vt = np.linalg.svd(to_numpy(W), full_matrices=False)
    W_r = (U[:, :r] * s_full[:r]) @ Vt[:r]  # (d, r) @ (r, k) -> (d, k)
    assert rel(B @ A, W_r) < 1e-12
    # the documented split: B^T B = A A^T = diag(s[:r])
    Bn, An = to_numpy(B), to_numpy(A)
    assert rel(Bn.T @ Bn, np.diag(s[:r])) < 1e-12
    assert rel(An @ An.T, np.diag(s[:r])) < 1e-12
    # spectral-norm error is the first discarded singular value
    assert abs(np.linalg.norm(to_numpy(W) - Bn @ An, 2) - s[r]) / s[r] < 1e-10


def test_eckart_young_beats_random_and_perturbed_factorizations():
    rng = np.random.default_rng(7)
    d, k, r = 24, 18, 5
    W = asarray(rng.standard_normal((d, k)))  # (d, k)
    B, A = rank.low_rank_approximation(W, r)  # (d, r), (r, k)
    Wn = to_numpy(W)
    best = np.linalg.norm(Wn - to_numpy(B @ A))
    for _ in range(50):
        # random rank-r factors, optimally scaled (least squares in the scale) to be fair
        P = rng.standard_normal((d, r)) @ rng.standard_normal((r, k))  # (d, k)
        c = np.sum(P * Wn) / np.sum(P * P)
        assert np.linalg.norm(Wn - c * P) >= best
        # small perturbations of the optimal factors never help
        Bp = to_numpy(B) + 1e-3 * rng.standard_normal((d, r))  # (d, r)
        Ap = to_numpy(A) + 1e-3 * rng.standard_normal((r, k))  # (r, k)
        assert np.linalg.norm(Wn - Bp @ Ap) >= best


def test_low_rank_approximation_is_exact_on_low_rank_input():
    rng = np.random.default_rng(8)
    W = low_rank(rng, 30, 20, 4)  # (30, 20) of rank 4
    B, A = rank.low_rank_approximation(W, 4)  # (30, 4), (4, 20)
    assert rel(B @ A, W) < 1e-12


def test_energy_kept_consistent_with_reconstruction_error():
    rng = np.random.default_rng(9)
    W = asarray(rng.standard_normal((15, 11)))  # (15, 11)
    Wn = to_numpy(W)
    total = np.sum(Wn**2)
    previous = 0.0
    for r in range(1, 12):
        B, A = rank.low_rank_approximation(W, r)  # (15, r), (r, 11)
        residual = np.sum((Wn - to_numpy(B @ A)) ** 2)
        e = rank.energy_kept(W, r)
        assert abs(e - (1.0 - residual / total)) < 1e-12
        assert previous < e <= 1.0 + 1e-15
        previous = e
    assert abs(rank.energy_kept(W, 11) - 1.0) < 1e-14
    # a rank-3 matrix keeps everything at r = 3
    L = low_rank(rng, 15, 11, 3)  # (15, 11)
    assert abs(rank.energy_kept(L, 3) - 1.0) < 1e-12
    assert rank.energy_kept(asarray(np.zeros((3, 3))), 1) == 1.0


def test_effective_rank():
    for n in (1, 2, 5, 16):
        assert abs(rank.effective_rank(asarray(np.eye(n))) - n) < 1e-12 * n
    rng = np.random.default_rng(11)
    u = rng.standard_normal((20, 1))  # (20, 1)
    v = rng.standard_normal((1, 13))  # (1, 13)
    assert abs(rank.effective_rank(asarray(u @ v)) - 1.0) < 1e-12
    # a spectrum (1, 1, 0): two equal directions -> exactly 2
    assert abs(rank.effective_rank(asarray(np.diag([3.0, 3.0, 0.0]))) - 2.0) < 1e-12
    # definition check against a direct computation, and bounds 1 <= erank <= rank
    W = low_rank(rng, 25, 19, 6)  # (25, 19)
    s = np.linalg.svd(to_numpy(W), compute_uv=False)[:6]
    p = s / s.sum()
    assert abs(rank.effective_rank(W) - math.exp(-np.sum(p * np.log(p)))) < 1e-9
    assert 1.0 <= rank.effective_rank(W) <= 6.0


@pytest.mark.parametrize("seed", range(5))
def test_stable_rank_bounds(seed):
    rng = np.random.default_rng(200 + seed)
    r = 1 + seed * 2
    W = low_rank(rng, 20, 16, r)  # (20, 16)
    sr = rank.stable_rank(W)
    assert 1.0 - 1e-12 <= sr <= rank.matrix_rank(W) + 1e-12
    Wn = to_numpy(W)
    assert abs(sr - np.sum(Wn**2) / np.linalg.norm(Wn, 2) ** 2) < 1e-10 * sr
    # equal singular values reach the upper bound, a single direction the lower one
    assert abs(rank.stable_rank(asarray(np.eye(6))) - 6.0) < 1e-12
    assert abs(rank.stable_rank(asarray(np.outer(np.arange(1.0, 5.0), np.ones(3)))) - 1.0) < 1e-12


def test_subspace_similarity_self_and_properties():
    rng = np.random.default_rng(12)
    k = 40
    A = asarray(rng.standard_normal((8, k)))  # (8, k)
    for i in (1, 3, 8):
        assert abs(rank.subspace_similarity(A, A, i, i) - 1.0) < 1e-12
    # nested subspaces: top-i of A lies inside top-j of A for i <= j
    assert abs(rank.subspace_similarity(A, A, 2, 6) - 1.0) < 1e-12
    # same row space, different basis (A2 = M A with M invertible): phi = 1 at full rank
    M = rng.standard_normal((8, 8)) + 8 * np.eye(8)  # (8, 8)
    assert abs(rank.subspace_similarity(A, asarray(M @ to_numpy(A)), 8, 8) - 1.0) < 1e-10
    A2 = asarray(rng.standard_normal((16, k)))  # (16, k)
    for i, j in [(1, 1), (3, 5), (8, 16), (8, 2)]:
        phi = rank.subspace_similarity(A, A2, i, j)
        assert 0.0 <= phi <= 1.0
        assert abs(phi - rank.subspace_similarity(A2, A, j, i)) < 1e-12
    # orthogonal row spaces: phi = 0
    E = np.eye(k)
    assert rank.subspace_similarity(asarray(E[:4]), asarray(E[4:10]), 4, 6) < 1e-28


def test_subspace_similarity_matches_definition_with_torch_svd():
    rng = np.random.default_rng(13)
    A1 = rng.standard_normal((8, 30))  # (8, 30)
    A2 = rng.standard_normal((12, 30))  # (12, 30)
    _, _, V1 = torch.linalg.svd(torch.from_numpy(A1), full_matrices=False)  # (8, 30)
    _, _, V2 = torch.linalg.svd(torch.from_numpy(A2), full_matrices=False)  # (12, 30)
    for i, j in [(1, 1), (2, 7), (8, 12), (5, 3)]:
        ref = float((V1[:i] @ V2[:j].T).pow(2).sum()) / min(i, j)  # (i, 30) @ (30, j) -> (i, j)
        ours = rank.subspace_similarity(asarray(A1), asarray(A2), i, j)
        assert abs(ours - ref) < 1e-12


def test_subspace_similarity_of_independent_random_subspaces_is_small():
    # For uniformly random subspaces of dimensions i and j in R^k, E||P^T Q||_F^2 = i j / k exactly
    # (E[Q Q^T] = (j/k) I), so E[phi] = max(i, j) / k. Gaussian A has a uniformly random row space and
    # its top singular subspaces are rotation-equivariant, hence uniform too.
    # Here k = 256, i = j = 8: E[phi] = 1/32 = 0.03125. Entries of P^T Q are ~N(0, 1/k), so
    # ||P^T Q||_F^2 has std ~ sqrt(2 i j) / k and phi has std ~ sqrt(2 * 64) / 256 / 8 = 0.0055.
    k, i, j = 256, 8, 8
    expected = max(i, j) / k
    rng = np.random.default_rng(14)
    values = []
    for _ in range(40):
        A1 = asarray(rng.standard_normal((16, k)))  # (16, k)
        A2 = asarray(rng.standard_normal((64, k)))  # (64, k)
        phi = rank.subspace_similarity(A1, A2, i, j)
        # single draw: below 4x the mean, i.e. about 17 standard deviations above it
        assert phi < 4 * expected
        values.append(phi)
    # mean of 40 draws: standard error ~0.0055 / sqrt(40) = 0.00087; 15% of the mean is ~5.4 s.e.
    assert abs(np.mean(values) - expected) < 0.15 * expected


def test_subspace_similarity_matrix_matches_definition_with_torch_svd():
    # every entry against ||V1[:i] V2[:j]^T||_F^2 / min(i, j) from torch's SVD, written out per (i, j)
    rng = np.random.default_rng(16)
    A1 = rng.standard_normal((6, 25))  # (6, 25)
    A2 = rng.standard_normal((9, 25))  # (9, 25)
    _, _, V1 = torch.linalg.svd(torch.from_numpy(A1), full_matrices=False)  # (6, 25)
    _, _, V2 = torch.linalg.svd(torch.from_numpy(A2), full_matrices=False)  # (9, 25)
    phi = to_numpy(rank.subspace_similarity_matrix(asarray(A1), asarray(A2)))  # (6, 9)
    assert phi.shape == (6, 9) and phi.dtype == np.float64
    for i in range(1, 7):
        for j in range(1, 10):
            ref = float((V1[:i] @ V2[:j].T).pow(2).sum()) / min(i, j)  # (i, 25) @ (25, j) -> (i, j)
            assert abs(phi[i - 1, j - 1] - ref) < 1e-12
            assert abs(rank.subspace_similarity(asarray(A1), asarray(A2), i, j) - phi[i - 1, j - 1]) < 1e-15
    # a corner of the table is the table of the smaller sizes; transposing swaps the arguments
    corner = to_numpy(rank.subspace_similarity_matrix(asarray(A1), asarray(A2), max_i=3, max_j=4))  # (3, 4)
    assert np.max(np.abs(corner - phi[:3, :4])) < 1e-15
    swapped = to_numpy(rank.subspace_similarity_matrix(asarray(A2), asarray(A1)))  # (9, 6)
    assert np.max(np.abs(swapped - phi.T)) < 1e-12
    assert np.all((phi >= 0) & (phi <= 1 + 1e-12))


def test_subspace_similarity_matrix_known_values():
    rng = np.random.default_rng(17)
    A = asarray(rng.standard_normal((5, 20)))  # (5, 20)
    # with itself: the top-i directions lie inside the top-j ones (or contain them): 1 everywhere
    assert np.max(np.abs(to_numpy(rank.subspace_similarity_matrix(A, A)) - 1.0)) < 1e-12
    # orthogonal row spaces: 0 everywhere
    E = np.eye(20)
    zero = to_numpy(rank.subspace_similarity_matrix(asarray(E[:3]), asarray(E[3:9])))  # (3, 6)
    assert zero.shape == (3, 6) and np.max(zero) < 1e-28
    # one direction shared, the rest orthogonal: A1 = e0, e1; A2 = 2 e0 (its top direction), e5
    A1 = asarray(E[[0, 1]])  # (2, 20)
    A2 = asarray(np.vstack([2 * E[0], E[5]]))  # (2, 20)
    phi = to_numpy(rank.subspace_similarity_matrix(A1, A2))  # (2, 2)
    # phi(2, 1) = 1 (e0 lies in span(e0, e1)); phi(2, 2) = 1 / 2 (one of two directions shared)
    assert abs(phi[1, 0] - 1.0) < 1e-12 and abs(phi[1, 1] - 0.5) < 1e-12
    with pytest.raises(ValueError, match="max_i must be an integer between"):
        rank.subspace_similarity_matrix(A1, A2, max_i=3)
    with pytest.raises(ValueError, match="max_j must be an integer between"):
        rank.subspace_similarity_matrix(A1, A2, max_j=0)
    with pytest.raises(ValueError, match="same number of columns"):
        rank.subspace_similarity_matrix(A1, asarray(np.ones((2, 19))))


def test_cumulative_energy_is_energy_kept_at_every_rank():
    rng = np.random.default_rng(18)
    W = asarray(rng.standard_normal((14, 9)))  # (14, 9)
    curve = to_numpy(rank.cumulative_energy(W))  # (9,)
    assert curve.shape == (9,)
    s2 = np.linalg.svd(to_numpy(W), compute_uv=False) ** 2  # (9,)
    assert np.max(np.abs(curve - np.cumsum(s2) / s2.sum())) < 1e-14
    for r in range(1, 10):
        assert rank.energy_kept(W, r) == float(curve[r - 1])
    assert np.all(np.diff(curve) > 0) and abs(curve[-1] - 1.0) < 1e-14
    assert np.array_equal(to_numpy(rank.cumulative_energy(asarray(np.zeros((3, 4))))), np.ones(3))
    # rank 2: two directions keep everything
    L = low_rank(rng, 14, 9, 2)  # (14, 9)
    assert abs(float(to_numpy(rank.cumulative_energy(L))[1]) - 1.0) < 1e-12


@pytest.mark.parametrize(
    "func",
    [rank.matrix_rank, rank.singular_values, rank.effective_rank, rank.stable_rank, rank.cumulative_energy],
)
def test_bad_matrices_raise(func):
    with pytest.raises(ValueError, match="2-D"):
        func(asarray(np.ones(5)))
    with pytest.raises(ValueError, match="2-D"):
        func(asarray(np.ones((2, 3, 4))))
    with pytest.raises(ValueError, match="NaN"):
        func(asarray(np.array([[1.0, np.nan], [0.0, 1.0]])))
    with pytest.raises(ValueError, match="NaN or inf"):
        func(asarray(np.array([[1.0, np.inf], [0.0, 1.0]])))
    with pytest.raises(ValueError, match="at least one row"):
        func(asarray(np.ones((0, 3))))
    with pytest.raises(ValueError, match="real"):
        func(asarray(np.ones((2, 2), dtype=np.complex128)))


def test_bad_ranks_and_indices_raise():
    rng = np.random.default_rng(15)
    W = asarray(rng.standard_normal((6, 4)))  # (6, 4)
    for bad in (0, -1, 5):
        with pytest.raises(ValueError, match="r"):
            rank.low_rank_approximation(W, bad)
        with pytest.raises(ValueError, match="r"):
            rank.energy_kept(W, bad)
    for bad in (2.0, True, "2"):
        with pytest.raises(ValueError, match="integer"):
            rank.low_rank_approximation(W, bad)
    with pytest.raises(ValueError, match="NaN"):
        rank.low_rank_approximation(asarray(np.full((3, 3), np.nan)), 1)
    with pytest.raises(ValueError, match="tol"):
        rank.matrix_rank(W, tol=-1.0)
    with pytest.raises(ValueError, match="tol"):
        rank.matrix_rank(W, tol=float("nan"))
    with pytest.raises(ValueError, match="zero matrix"):
        rank.effective_rank(asarray(np.zeros((3, 2))))
    with pytest.raises(ValueError, match="zero matrix"):
        rank.stable_rank(asarray(np.zeros((3, 2))))

    A1 = asarray(rng.standard_normal((4, 10)))  # (4, 10)
    A2 = asarray(rng.standard_normal((6, 10)))  # (6, 10)
    for i, j, name in [(0, 1, "i"), (5, 1, "i"), (1, 0, "j"), (1, 7, "j")]:
        with pytest.raises(ValueError, match=f"{name} must be an integer between"):
            rank.subspace_similarity(A1, A2, i, j)
    with pytest.raises(ValueError, match="same input size"):
        rank.subspace_similarity(A1, asarray(rng.standard_normal((4, 9))), 1, 1)
    with pytest.raises(ValueError, match="A2 must be a 2-D"):
        rank.subspace_similarity(A1, asarray(np.ones(10)), 1, 1)
