"""Exercises of notebook 2 (matrix rank): Eckart & Young (1936); LoRA (Hu et al., 2021), sections 4.1 and 7.2.

1. ``02.update_rank``: predict the rank of a LoRA update B A, and of W0 + B A (section 4.1: the
   update has rank at most r; the merged weight keeps the rank of a full-rank W0).
2. ``02.approx_error``: the Frobenius error of the best rank-r approximation from the singular
   values alone (Eckart & Young, 1936): sqrt(sum over i > r of sigma_i^2).
3. ``02.subspace_similarity``: the LoRA paper's normalized subspace similarity phi(A1, A2, i, j)
   (section 7.2, eq. 4), from the right-singular vectors of the two A matrices.
"""

from __future__ import annotations

import numpy as np

from .. import rank
from . import Exercise, Mistake

# ---------------------------------------------------------------- 1. the rank of an update and of a merged weight
D_FC, K_FC, R_FC = 512, 128, 8  # the MLP up-projection fc of the base model: W0 (d, k) = (4C, C), C = 128

# ---------------------------------------------------------------- 2. the rank-r approximation error


def approx_error(W, r: int) -> float:
    """||W - W_r||_F for the best rank-r approximation W_r: the root of the discarded squared singular values."""
    s = np.linalg.svd(W, compute_uv=False)  # (d, k) -> (min(d, k),), descending
    return float(np.sqrt(np.sum(s[r:] ** 2)))


def _error_kept(W, r):
    s = np.linalg.svd(W, compute_uv=False)  # (min(d, k),)
    return float(np.sum(s[:r]))  # the kept singular values, summed


def _error_not_squared(W, r):
    s = np.linalg.svd(W, compute_uv=False)  # (min(d, k),)
    return float(np.sum(s[r:]))  # the discarded ones, not squared


def _error_no_root(W, r):
    s = np.linalg.svd(W, compute_uv=False)  # (min(d, k),)
    return float(np.sum(s[r:] ** 2))  # the squared error, not the error


def _error_spectral(W, r):
    s = np.linalg.svd(W, compute_uv=False)  # (min(d, k),)
    return float(s[r])  # sigma_{r+1}: the spectral-norm error


def _error_cases():
    rng = np.random.default_rng(20)
    return [(rng.standard_normal((30, 20)), 3), (rng.standard_normal((12, 16)), 5), (rng.standard_normal((9, 9)), 1)]


# ---------------------------------------------------------------- 3. the subspace similarity phi


def subspace_similarity(A1, A2, i: int, j: int) -> float:
    """phi(A1, A2, i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j), U the right-singular vectors of A (r, k)."""
    return rank.subspace_similarity(A1, A2, i, j)


def _right_vectors(A):
    _, _, Vt = np.linalg.svd(A, full_matrices=False)  # (r, k) -> (r, k): rows are right-singular vectors
    return Vt.T  # (k, r)


def _phi_left(A1, A2, i, j):
    U1, _, _ = np.linalg.svd(A1, full_matrices=False)  # (r1, r1): the left-singular vectors
    U2, _, _ = np.linalg.svd(A2, full_matrices=False)  # (r2, r2)
    return float(np.sum((U1[:, :i].T @ U2[:, :j]) ** 2) / min(i, j))  # (i, r) @ (r, j) -> (i, j)


def _phi_not_squared(A1, A2, i, j):
    U1, U2 = _right_vectors(A1), _right_vectors(A2)  # (k, r1), (k, r2)
    return float(np.linalg.norm(U1[:, :i].T @ U2[:, :j]) / min(i, j))  # (i, j): the norm, not its square


def _phi_max(A1, A2, i, j):
    U1, U2 = _right_vectors(A1), _right_vectors(A2)  # (k, r1), (k, r2)
    return float(np.sum((U1[:, :i].T @ U2[:, :j]) ** 2) / max(i, j))  # (i, j), divided by max(i, j)


def _phi_unnormalized(A1, A2, i, j):
    U1, U2 = _right_vectors(A1), _right_vectors(A2)  # (k, r1), (k, r2)
    return float(np.sum((U1[:, :i].T @ U2[:, :j]) ** 2))  # (i, j), not divided at all


def _phi_vt_columns(A1, A2, i, j):
    _, _, V1t = np.linalg.svd(A1, full_matrices=False)  # (r, k)
    _, _, V2t = np.linalg.svd(A2, full_matrices=False)  # (r, k)
    return float(np.sum((V1t[:, :i].T @ V2t[:, :j]) ** 2) / min(i, j))  # columns of Vt: (i, r) @ (r, j)


def _phi_cases():
    rng = np.random.default_rng(21)
    shared = rng.standard_normal((2, 24))  # (2, k): two directions both adapters contain
    A1 = np.vstack([shared, rng.standard_normal((4, 24))])  # (6, 24)
    A2 = np.vstack([shared + 0.3 * rng.standard_normal((2, 24)), rng.standard_normal((4, 24))])  # (6, 24)
    return [(A1, A2, 1, 1), (A1, A2, 2, 4), (A1, A2, 6, 3), (A2, A1, 5, 6)]


SUBSPACE_MISTAKES = (
    Mistake("left-singular vectors", _phi_left,
            "the left-singular vectors of A: they live in R^r (the adapter's r latent channels), not in the input "
            "space R^k; A's input directions are its right-singular vectors."),
    Mistake("not squared", _phi_not_squared,
            "the Frobenius norm is not squared: phi adds up squared cosines."),
    Mistake("max instead of min", _phi_max,
            "divided by max(i, j): with that normalization phi stays below 1 even when the smaller subspace lies "
            "inside the larger one."),
    Mistake("not normalized", _phi_unnormalized,
            "not normalized: phi must lie in [0, 1] (1: one subspace contains the other)."),
    Mistake("columns of Vt", _phi_vt_columns,
            "the columns of Vt: np.linalg.svd returns V transposed, so the right-singular vectors are Vt's rows."),
)

EXERCISES = [
    Exercise(
        id="02.update_rank",
        title="the rank of an update, and of the merged weight",
        task=(f"B ({D_FC}, {R_FC}) and A ({R_FC}, {K_FC}) are random, W0 ({D_FC}, {K_FC}) is the pretrained "
              "(full-rank) MLP up-projection fc: give the pair (rank of B A, rank of W0 + B A) as two integers"),
        reference=(R_FC, K_FC),
        parts=("rank of B A", "rank of W0 + B A"),
        mistakes=(
            Mistake("min(d, k) for B A", (K_FC, K_FC),
                    "the rank of B A is not min(d, k): every column of B A is a combination of the columns of B, "
                    "so the product can have no more independent columns than B has."),
            Mistake("r for the merged weight", (R_FC, R_FC),
                    "the merged weight is not low rank: adding a low-rank matrix to a full-rank W0 moves at most a "
                    "few of its directions; it does not remove the others."),
            Mistake("ranks added", (R_FC, K_FC + R_FC),
                    "rank(W0) + r is only an upper bound: no matrix has more independent columns than it has "
                    "columns (or rows)."),
            Mistake("d instead of min(d, k)", (R_FC, D_FC),
                    "that rank is larger than one side of the matrix: no matrix has more independent rows than it has "
                    "columns."),
        ),
    ),
    Exercise(
        id="02.approx_error",
        title="the rank-r approximation error from the singular values",
        task=("write approx_error(W, r) returning ||W - W_r||_F of the best rank-r approximation (a float), from the "
              "singular values of W alone (np.linalg.svd(W, compute_uv=False))"),
        reference=approx_error,
        cases=_error_cases,
        mistakes=(
            Mistake("sum of the kept singular values", _error_kept,
                    "the kept singular values: the error is what the approximation leaves out, not what it keeps "
                    "(and they are not simply summed)."),
            Mistake("not squared", _error_not_squared,
                    "the singular values summed but not squared: the Frobenius norm adds squares (it is the root "
                    "of a sum of squares, like a Euclidean length)."),
            Mistake("no square root", _error_no_root,
                    "that is the squared error ||W - W_r||_F^2: take its square root."),
            Mistake("spectral norm", _error_spectral,
                    "one singular value: that is the error in the spectral norm ||.||_2; the Frobenius error takes "
                    "every discarded singular value into account."),
        ),
    ),
    Exercise(
        id="02.subspace_similarity",
        title="the LoRA paper's subspace similarity phi",
        task=("write phi(A1, A2, i, j) for A1 (r1, k), A2 (r2, k): ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j) with U "
              "the right-singular vectors of A (the rows of Vt from np.linalg.svd), a float in [0, 1]"),
        reference=subspace_similarity,
        cases=_phi_cases,
        factors=lambda A1, A2, i, j: {"min(i, j)": min(i, j), "max(i, j)": max(i, j)},
        mistakes=(
            *SUBSPACE_MISTAKES,
        ),
    ),
]
