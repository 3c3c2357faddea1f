"""Matrix rank, the singular value spectrum, and the best rank-r approximation.

Matrix rank and the LoRA paper (Hu et al., 2021):
section 4.1 (the hypothesis that the weight update dW = B A has a low
"intrinsic rank") and section 7.2, equation (4) (the normalized subspace
similarity phi(A1, A2, i, j) used to compare adapters of different ranks).

What rank means
---------------
The rank of a matrix W of shape (d, k) is the number of linearly independent
rows, which always equals the number of linearly independent columns. It is at
most min(d, k). A matrix with rank == min(d, k) is *full rank*; one with a
smaller rank is *low rank*: its columns all lie in an r-dimensional subspace,
so it can be written exactly as a product B @ A with B of shape (d, r) and A
of shape (r, k), storing r * (d + k) numbers instead of d * k.

The singular value decomposition W = U diag(s) V^T (s >= 0, descending) makes
this concrete: the rank is the number of nonzero singular values, and keeping
only the r largest gives the best rank-r approximation in the Frobenius and
spectral norms (Eckart-Young-Mirsky theorem). In floating point no singular
value is exactly zero, so "nonzero" needs a tolerance (see ``matrix_rank``).

LoRA's claim is that adapting a pretrained model to one task needs only a small
change of its weights, and that this change has low intrinsic rank: a small r
captures most of it. The functions here let a student measure that: the
spectrum of an update, how much of its energy the top r directions keep, and
how much the subspaces learned at different ranks overlap.

Every function takes its array module from its input (NumPy or CuPy).
"""

from __future__ import annotations

import math

from lora_from_scratch.backend import xp_of
from lora_from_scratch.checks import check_int


def _as_matrix(W, name: str = "W"):
    """Validate a real, finite, non-empty 2-D matrix; return (xp, W as a float array)."""
    xp = xp_of(W)
    W = xp.asarray(W)  # (d, k), array-likes become arrays
    if W.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix of shape (d, k); got shape {tuple(W.shape)}")
    if W.shape[0] == 0 or W.shape[1] == 0:
        raise ValueError(f"{name} must have at least one row and one column; got shape {tuple(W.shape)}")
    kind = W.dtype.kind
    if kind in "biu":
        W = W.astype(xp.float64)  # (d, k) integers -> float64
    elif kind == "f":
        if W.dtype.itemsize < 4:
            W = W.astype(xp.float32)  # (d, k) float16 -> float32: the SVD routines start at float32
    else:
        raise ValueError(f"{name} must be a real (float or integer) matrix; got dtype {W.dtype}")
    if not bool(xp.isfinite(W).all()):
        raise ValueError(f"{name} contains NaN or inf; its rank and singular values are undefined")
    return xp, W


def singular_values(W):
    """The singular values of W (d, k), descending: an array of shape (min(d, k),).

    They are the lengths of the semi-axes of the ellipsoid that W maps the unit
    sphere to. Their number of nonzero entries is the rank; how fast they decay
    says how well W is approximated by a low-rank matrix.
    """
    xp, W = _as_matrix(W)
    return xp.linalg.svd(W, compute_uv=False)  # (d, k) -> (min(d, k),), descending


def matrix_rank(W, tol=None) -> int:
    """The numerical rank of W (d, k): how many singular values exceed ``tol``.

    Default tolerance: ``tol = sigma_max * max(d, k) * eps``, where sigma_max is
    the largest singular value and eps the machine epsilon of W's dtype (about
    2.2e-16 for float64, 1.2e-7 for float32); the same rule NumPy's and
    PyTorch's ``matrix_rank`` use by default.

    Why this value: a computed SVD is backward stable, i.e. the singular values
    it returns are the exact ones of a nearby matrix W + E with
    ||E||_2 of the order of max(d, k) * eps * ||W||_2. By Weyl's inequality each
    singular value moves by at most ||E||_2, so a singular value below that
    level cannot be told apart from zero: it is rounding noise, not a real
    direction. A matrix built as B @ A with B (d, r), A (r, k) therefore comes
    out with rank r even though its trailing singular values are ~1e-15, not 0.

    Pass ``tol`` (an absolute threshold >= 0 on the singular values) to choose
    another cut-off, e.g. to ask "how many directions carry more than 1e-3?".
    The zero matrix has rank 0.
    """
    xp, W = _as_matrix(W)
    s = xp.linalg.svd(W, compute_uv=False)  # (d, k) -> (min(d, k),), descending
    if tol is None:
        eps = float(xp.finfo(W.dtype).eps)
        tol = float(s[0]) * max(W.shape) * eps
    else:
        try:
            tol = float(tol)
        except (TypeError, ValueError):
            raise ValueError(f"tol must be a number >= 0 or None; got {tol!r}") from None
        if not tol >= 0.0 or math.isinf(tol):
            raise ValueError(f"tol must be a finite number >= 0 or None; got {tol!r}")
    return int((s > tol).sum())  # (min(d, k),) -> scalar count


def low_rank_approximation(W, r):
    """The best rank-r approximation of W (d, k), as factors ``(B, A)`` with B (d, r), A (r, k).

    Eckart-Young-Mirsky: among all matrices of rank <= r, the truncated SVD
    W_r = U[:, :r] diag(s[:r]) V[:, :r]^T minimizes both ||W - W_r||_F and
    ||W - W_r||_2; the errors are sqrt(s[r]^2 + s[r+1]^2 + ...) and s[r].

    Choice of split: the singular values are shared evenly, sqrt(s) into each
    factor: B = U[:, :r] diag(sqrt(s[:r])), A = diag(sqrt(s[:r])) V[:, :r]^T.
    Then B^T B = A A^T = diag(s[:r]): both factors have the same scale, which is
    the balanced form one would use to start a LoRA pair (B of shape (d, r),
    A of shape (r, k), as in the paper) from an existing matrix. Any other
    split B M, M^{-1} A gives the same product.
    """
    xp, W = _as_matrix(W)
    d, k = W.shape
    r = check_int("r", r, 1, min(d, k))
    U, s, Vt = xp.linalg.svd(W, full_matrices=False)  # (d, k) -> (d, m), (m,), (m, k); m = min(d, k)
    root = xp.sqrt(s[:r])  # (r,)
    B = U[:, :r] * root[None, :]  # (d, r) * (1, r) -> (d, r)
    A = root[:, None] * Vt[:r, :]  # (r, 1) * (r, k) -> (r, k)
    return B, A


def cumulative_energy(W):
    """The energy kept by the best rank-r approximation of W (d, k) for every r: shape (min(d, k),).

    Entry r - 1 is (s[0]^2 + ... + s[r-1]^2) / (s[0]^2 + s[1]^2 + ...), the fraction of
    ||W||_F^2 that the top r singular directions carry; it grows to 1 at r = min(d, k).
    The zero matrix keeps all of its (zero) energy at every rank: all ones.
    """
    xp, W = _as_matrix(W)
    s2 = xp.linalg.svd(W, compute_uv=False) ** 2  # (d, k) -> (m,), m = min(d, k)
    total = float(s2.sum())
    if total == 0.0:
        return xp.ones_like(s2)  # (m,)
    return xp.cumsum(s2) / total  # (m,)


def energy_kept(W, r) -> float:
    """Fraction of the squared Frobenius norm of W (d, k) kept by its best rank-r approximation.

    ||W||_F^2 is the sum of the squared singular values, so the best rank-r
    approximation keeps (s[0]^2 + ... + s[r-1]^2) / (s[0]^2 + ... ), a number in
    [0, 1]; equivalently 1 - ||W - B A||_F^2 / ||W||_F^2. A value near 1 for a
    small r is what "low intrinsic rank" looks like. The zero matrix keeps all
    of its (zero) energy: 1.0. (Entry r - 1 of ``cumulative_energy``.)
    """
    _, W = _as_matrix(W)
    r = check_int("r", r, 1, min(W.shape))
    return float(cumulative_energy(W)[r - 1])


def effective_rank(W) -> float:
    """The effective rank of W (d, k) (Roy & Vetterli, 2007): exp of the entropy of its spectrum.

    With p_i = s_i / sum(s) (the singular values normalized to a probability
    distribution), erank = exp(-sum_i p_i log p_i), where 0 log 0 = 0. It is a
    real number between 1 (a single direction: rank 1) and rank(W) (all nonzero
    singular values equal, e.g. the identity of size n gives n): a smooth
    count of how many directions really matter. Undefined for the zero matrix.
    """
    xp, W = _as_matrix(W)
    s = xp.linalg.svd(W, compute_uv=False)  # (d, k) -> (min(d, k),)
    total = float(s.sum())
    if total == 0.0:
        raise ValueError("effective_rank is undefined for the zero matrix (no nonzero singular values)")
    p = s / total  # (m,), sums to 1
    p = p[p > 0]  # (m,) -> (n_nonzero,), drops the 0 log 0 = 0 terms
    entropy = -float((p * xp.log(p)).sum())  # (n_nonzero,) -> scalar
    return math.exp(entropy)


def stable_rank(W) -> float:
    """The stable rank of W (d, k): ||W||_F^2 / ||W||_2^2 = sum(s^2) / s_max^2.

    Always 1 <= stable_rank <= rank(W); unlike the rank it does not jump when a
    tiny singular value crosses the tolerance, so it is a robust measure of how
    many directions carry the matrix's energy. Undefined for the zero matrix.
    """
    xp, W = _as_matrix(W)
    s = xp.linalg.svd(W, compute_uv=False)  # (d, k) -> (min(d, k),), descending
    top = float(s[0])
    if top == 0.0:
        raise ValueError("stable_rank is undefined for the zero matrix (its spectral norm is 0)")
    return float((s**2).sum()) / (top * top)


def _similarity_table(A1, A2, max_i: int, max_j: int):
    """phi(A1, A2, i, j) for 1 <= i <= max_i, 1 <= j <= max_j, from checked matrices: (max_i, max_j).

    With V1 (m1, k) and V2 (m2, k) the right-singular vectors of A1 and A2 as rows, O = V1[:max_i]
    V2[:max_j]^T holds the cosines between them, and ||U1[:, :i]^T U2[:, :j]||_F^2 is the sum of
    O[:i, :j]^2: a cumulative sum over both axes gives every (i, j) at once.
    """
    xp = xp_of(A1)
    _, _, V1t = xp.linalg.svd(A1, full_matrices=False)  # (r1, k) -> (m1, k); rows: right-singular vectors
    _, _, V2t = xp.linalg.svd(A2, full_matrices=False)  # (r2, k) -> (m2, k)
    overlap = V1t[:max_i, :] @ V2t[:max_j, :].T  # (max_i, k) @ (k, max_j) -> (max_i, max_j)
    squared_norms = xp.cumsum(xp.cumsum(overlap**2, axis=0), axis=1)  # (max_i, max_j): sums over O[:i, :j]
    i = xp.arange(1, max_i + 1)[:, None]  # (max_i, 1)
    j = xp.arange(1, max_j + 1)[None, :]  # (1, max_j)
    return squared_norms / xp.minimum(i, j)  # (max_i, max_j)


def _check_pair(A1, A2):
    _, A1 = _as_matrix(A1, "A1")
    _, A2 = _as_matrix(A2, "A2")
    if A1.shape[1] != A2.shape[1]:
        raise ValueError(
            f"A1 and A2 must act on the same input size k (same number of columns); "
            f"got A1 {tuple(A1.shape)} and A2 {tuple(A2.shape)}"
        )
    return A1, A2


def subspace_similarity(A1, A2, i, j) -> float:
    """The LoRA paper's normalized subspace similarity phi(A1, A2, i, j) (section 7.2, eq. 4).

    A1 (r1, k) and A2 (r2, k) are two LoRA down-projections acting on the same
    k-dimensional input (for example adapters trained with r = 8 and r = 64).
    Let U1 (k, r1) and U2 (k, r2) hold their right-singular vectors as columns,
    in order of decreasing singular value. Then

        phi = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j),

    with 1 <= i <= min(r1, k) and 1 <= j <= min(r2, k) (there are only that many
    right-singular vectors).

    The numerator is the sum of squared cosines of the principal angles between
    the span of the top-i directions of A1 and the top-j directions of A2, so
    phi lies in [0, 1]: 1 when one subspace contains the other, 0 when they are
    orthogonal. It is symmetric: phi(A1, A2, i, j) = phi(A2, A1, j, i). For two
    independent random subspaces its expected value is max(i, j) / k, small
    when k is large; the paper finds the top directions of r = 8 and r = 64
    adapters overlap far more than that, evidence that a few directions carry
    the update.

    If A1 has rank below i, its trailing singular vectors are an arbitrary
    orthonormal completion and phi depends on that choice. The last entry of
    ``subspace_similarity_matrix(A1, A2, i, j)``.
    """
    A1, A2 = _check_pair(A1, A2)
    i = check_int("i", i, 1, min(A1.shape))
    j = check_int("j", j, 1, min(A2.shape))
    return float(_similarity_table(A1, A2, i, j)[i - 1, j - 1])


def subspace_similarity_matrix(A1, A2, max_i=None, max_j=None):
    """phi(A1, A2, i, j) of ``subspace_similarity`` for every i <= max_i and j <= max_j: shape (max_i, max_j).

    Entry [i - 1, j - 1] is phi(A1, A2, i, j), all from one SVD of each matrix: the LoRA paper's
    Figure 3 is this table as a heatmap. ``max_i`` defaults to min(r1, k), ``max_j`` to
    min(r2, k), the most there are. An array on the inputs' backend.
    """
    A1, A2 = _check_pair(A1, A2)
    max_i = min(A1.shape) if max_i is None else check_int("max_i", max_i, 1, min(A1.shape))
    max_j = min(A2.shape) if max_j is None else check_int("max_j", max_j, 1, min(A2.shape))
    return _similarity_table(A1, A2, max_i, max_j)
