"""Exercises of notebook 4 (initialization): LoRA (Hu et al., 2021), section 4.1; PiSSA (Meng et al., 2024), section 3.

1. ``04.nonzero_gradients``: count the adapter numbers that get a gradient at step 0 (B = 0).
2. ``04.gaussian_init``: initialize A and B as the paper says (A Gaussian, B zero), with PEFT's
   standard deviation 1/r.
3. ``04.pissa_factors``: PiSSA's start: A and B from the top-r singular triplets of W0, and the
   residual that stays frozen.
"""

from __future__ import annotations

import numpy as np

from . import Exercise, Mistake, Relation

# ---------------------------------------------------------------- 1. which numbers get a gradient at step 0
D_PROJ, K_PROJ, R_PROJ = 128, 512, 8  # the MLP down-projection proj of the base model: (out, in) = (C, 4C), C = 128


# ---------------------------------------------------------------- 2. the paper's initialization
def gaussian_init(d: int, k: int, r: int, rng):
    """A (r, k) with entries N(0, 1/r^2) (one draw ``rng.standard_normal((r, k))``), B (d, r) zero."""
    A = rng.standard_normal((r, k)) / r  # (r, k), std 1/r
    B = np.zeros((d, r))  # (d, r): B A = 0 at step 0
    return A, B


def _init_b_random(d, k, r, rng):
    A = rng.standard_normal((r, k)) / r  # (r, k)
    return A, rng.standard_normal((d, r)) / r  # (d, r), wrongly random


def _init_a_zero(d, k, r, rng):
    return np.zeros((r, k)), np.zeros((d, r))  # (r, k), (d, r)


def _init_std_sqrt(d, k, r, rng):
    return rng.standard_normal((r, k)) / np.sqrt(r), np.zeros((d, r))  # (r, k) with std 1/sqrt(r), (d, r)


def _init_transposed(d, k, r, rng):
    return rng.standard_normal((k, r)) / r, np.zeros((d, r))  # (k, r): A transposed, (d, r)


def _init_cases():
    return [(6, 5, 2, np.random.default_rng(0)), (16, 12, 4, np.random.default_rng(1)),
            (3, 8, 3, np.random.default_rng(2))]


# ---------------------------------------------------------------- 3. PiSSA's factors
def pissa_factors(W, r: int, s: float):
    """PiSSA's start for W (d, k): A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s), and the residual W - s B A."""
    U, S, Vt = np.linalg.svd(W, full_matrices=False)  # (d, m), (m,), (m, k)
    root = np.sqrt(S[:r] / s)  # (r,)
    A = root[:, None] * Vt[:r]  # (r, 1) * (r, k) -> (r, k)
    B = U[:, :r] * root[None, :]  # (d, r) * (1, r) -> (d, r)
    return A, B, W - s * (B @ A)  # (r, k), (d, r), (d, k)


def _pissa_no_s(W, r, s):
    U, S, Vt = np.linalg.svd(W, full_matrices=False)  # (d, m), (m,), (m, k)
    A = np.sqrt(S[:r])[:, None] * Vt[:r]  # (r, k): S not divided by s
    B = U[:, :r] * np.sqrt(S[:r])[None, :]  # (d, r)
    return A, B, W - s * (B @ A)  # (d, k)


def _pissa_bottom(W, r, s):
    U, S, Vt = np.linalg.svd(W, full_matrices=False)  # (d, m), (m,), (m, k)
    root = np.sqrt(S[-r:] / s)  # (r,): the smallest singular values
    A = root[:, None] * Vt[-r:]  # (r, k)
    B = U[:, -r:] * root[None, :]  # (d, r)
    return A, B, W - s * (B @ A)  # (d, k)


def _pissa_one_factor(W, r, s):
    U, S, Vt = np.linalg.svd(W, full_matrices=False)  # (d, m), (m,), (m, k)
    A = Vt[:r]  # (r, k): no singular values in A
    B = U[:, :r] * (S[:r] / s)[None, :]  # (d, r): all of them in B
    return A, B, W - s * (B @ A)  # (d, k)


def _pissa_no_residual(W, r, s):
    A, B, _ = pissa_factors(W, r, s)
    return A, B, W  # (r, k), (d, r), W itself kept frozen


def _pissa_cases():
    rng = np.random.default_rng(4)
    return [(rng.standard_normal((6, 5)), 2, 2.0), (rng.standard_normal((8, 8)), 3, 0.5)]  # W (6, 5) and (8, 8)


EXERCISES = [
    Exercise(
        id="04.nonzero_gradients",
        title="which numbers get a gradient at step 0",
        task=(f"an adapter with r = {R_PROJ} on the MLP down-projection proj (d = {D_PROJ} outputs, k = {K_PROJ} "
              "inputs) starts with B = 0 and a random A: how many of its trainable numbers get a nonzero gradient "
              "from the first backward pass? (an integer)"),
        reference=D_PROJ * R_PROJ,
        factors={"r": R_PROJ, "k": K_PROJ, "d": D_PROJ},
        mistakes=(
            Mistake("both A and B", R_PROJ * (D_PROJ + K_PROJ),
                    "not every adapter number gets a gradient at step 0: look at what dA is multiplied by while "
                    "B = 0."),
            Mistake("A instead of B", R_PROJ * K_PROJ,
                    "the other factor: dA is a product with B, dB a product with A; which of the two is zero at "
                    "step 0?"),
            Mistake("none", 0,
                    "not none: a gradient that is a product with the random A is not zero."),
            Mistake("W0's d k", D_PROJ * K_PROJ,
                    "W0 is frozen: its (d, k) gradient is never formed. Count the adapter's numbers that get one."),
        ),
    ),
    Exercise(
        id="04.gaussian_init",
        title="the paper's initialization of A and B",
        task=("write init(d, k, r, rng) returning (A, B): A of shape (r, k) drawn as rng.standard_normal((r, k)) "
              "scaled to standard deviation 1/r, and B of shape (d, r) as the paper says"),
        reference=gaussian_init,
        cases=_init_cases,
        parts=("A", "B"),
        factors=lambda d, k, r, rng: {"r": r, "sqrt(r)": r ** 0.5},
        relations=(
            Relation("B nonzero", None,
                     "B is not zero at init: then B A is not zero at step 0, and the adapted model starts away "
                     "from the pretrained one.",
                     test=lambda got, want, args: np.shape(got[1]) == want[1].shape and np.any(got[1] != 0)),
        ),
        mistakes=(
            Mistake("B random", _init_b_random,
                    "B random at init: then B A is not zero at step 0, and the adapted model starts away from the "
                    "pretrained one."),
            Mistake("A zero", _init_a_zero,
                    "A zero (and B zero): then every gradient is zero and nothing ever learns."),
            Mistake("std 1/sqrt(r)", _init_std_sqrt,
                    "A's standard deviation is 1/sqrt(r): a factor sqrt(r) too large for the standard "
                    "deviation the task asks for."),
            Mistake("A transposed", _init_transposed,
                    "A is transposed: A maps the k inputs down to r numbers."),
        ),
    ),
    Exercise(
        id="04.pissa_factors",
        title="PiSSA's start from the SVD",
        task=("write pissa(W, r, s) returning (A, B, W_res) from np.linalg.svd(W, full_matrices=False): A = "
              "sqrt(S_r / s) V_r^T (r, k), B = U_r sqrt(S_r / s) (d, r), and the frozen residual W_res = W - s B A"),
        reference=pissa_factors,
        cases=_pissa_cases,
        parts=("A", "B", "W_res"),
        factors=lambda W, r, s: {"s": s, "sqrt(s)": s ** 0.5},
        mistakes=(
            Mistake("no s", _pissa_no_s,
                    "the split forgets s: the layer adds s B A, so A and B without s make the adapter's start s "
                    "times too large."),
            Mistake("bottom r", _pissa_bottom,
                    "the bottom r singular triplets: PiSSA takes the top (principal) r, np.linalg.svd sorts them "
                    "in descending order."),
            Mistake("one factor", _pissa_one_factor,
                    "all singular values in one factor: PiSSA (and PEFT) share them between A and B, so both start "
                    "at the same scale."),
            Mistake("no residual", _pissa_no_residual,
                    "W itself kept frozen: then the adapted layer computes W plus the adapter's start at step 0, "
                    "not W."),
        ),
    ),
]
