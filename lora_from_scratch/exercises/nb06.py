"""Exercises of notebook 6 (LoRA on the transformer): LoRA (Hu et al., 2021), sections 7.1, 7.2 and 7.3.

1. ``06.budget_rank``: the rank that a fixed parameter budget allows when it is spread over
   several matrices of every block (section 7.1, Table 5: 18M parameters on GPT-3 are r = 8 on
   one matrix, r = 4 on two, r = 2 on four).
2. ``06.subspace_similarity``: the normalized subspace similarity phi(A1, A2, i, j) of section
   7.2, eq. (4), from two adapters' A matrices.
3. ``06.amplification``: the amplification factor ||dW||_F / ||U^T W V||_F of section 7.3 (Table 7),
   with U, V the top-r singular vectors of the update dW.
"""

from __future__ import annotations

import numpy as np

from .. import rank  # the solution of 06.subspace_similarity: rank.subspace_similarity
from ..experiments.update_subspaces import amplification_factor  # the solution of 06.amplification
from . import Exercise, Mistake, Prediction
from .nb02 import SUBSPACE_MISTAKES  # the same mistakes as in 02.subspace_similarity


# ---------------------------------------------------------------- 1. the rank a budget allows
def budget_rank(budget, shapes, n_layer):
    """r such that r * n_layer * sum over the matrices (d_out, d_in) of (d_out + d_in) equals ``budget``."""
    return budget / (n_layer * sum(d_out + d_in for d_out, d_in in shapes))


def _rank_over_d(budget, shapes, n_layer):
    return budget / shapes[0][1]  # the budget divided by the width d


def _rank_only_A(budget, shapes, n_layer):
    return budget / (n_layer * sum(d_in for _, d_in in shapes))  # only A's r * d_in counted


def _rank_one_matrix(budget, shapes, n_layer):
    d_out, d_in = shapes[0]
    return budget / (n_layer * (d_out + d_in))  # as if the whole budget went to the first matrix


def _budget_cases():
    gpt3 = (12288, 12288)  # GPT-3 175B's attention matrices, 96 blocks
    return [(18_874_368, [gpt3], 96), (18_874_368, [gpt3, gpt3], 96), (18_874_368, [gpt3] * 4, 96),
            (8192, [(128, 128), (128, 128)], 4), (10_240, [(512, 128), (128, 512)], 4),
            (4608, [(128, 128), (512, 128)], 4)]


# ---------------------------------------------------------------- 2. the subspace similarity
def _similarity_cases():
    rng = np.random.default_rng(6)
    cases = []
    for (r, k), (i, j) in zip([(4, 10), (4, 10), (6, 12), (5, 9)], [(1, 1), (2, 3), (3, 6), (4, 2)]):
        A1 = rng.standard_normal((r, k))  # (r, k)
        A2 = A1 + 0.8 * rng.standard_normal((r, k))  # (r, k): a second adapter, partly aligned with the first
        cases.append((A1, A2, i, j))
    return cases


# ---------------------------------------------------------------- 3. the amplification factor
def _amp_over_W(W, dW, r):
    return float(np.linalg.norm(dW) / np.linalg.norm(W))  # the whole of W, not its part in dW's directions


def _amp_own_directions(W, dW, r):
    U, _, Vt = np.linalg.svd(W, full_matrices=False)  # (d, m), (m,), (m, k): W's own directions
    return float(np.linalg.norm(dW) / np.linalg.norm(U[:, :r].T @ W @ Vt[:r].T))  # (r, r)


def _amp_vt_columns(W, dW, r):
    U, _, Vt = np.linalg.svd(dW, full_matrices=False)  # (d, m), (m,), (m, k)
    return float(np.linalg.norm(dW) / np.linalg.norm(U[:, :r].T @ W @ Vt[:, :r]))  # columns of Vt: (r, r)


def _amplification_cases():
    rng = np.random.default_rng(7)
    cases = []
    for d, r in [(8, 2), (10, 1), (12, 3)]:
        W = rng.standard_normal((d, d))  # (d, d): a frozen square weight
        dW = 0.3 * rng.standard_normal((d, r)) @ rng.standard_normal((r, d))  # (d, r) @ (r, d): a rank-r update
        cases.append((W, dW, r))
    return cases


EXERCISES = [
    Exercise(
        id="06.budget_rank",
        title="the rank a fixed budget allows",
        task=("write budget_rank(budget, shapes, n_layer): the rank r (a number, not necessarily whole) at which "
              "LoRA on the matrices of `shapes` (a list of (d_out, d_in), one per adapted matrix of a block) in "
              "all n_layer blocks has exactly `budget` trainable parameters"),
        reference=budget_rank,
        cases=_budget_cases,
        factors=lambda budget, shapes, n_layer: {"n_layer": n_layer, "the number of matrices": len(shapes)},
        mistakes=(
            Mistake("budget / d", _rank_over_d,
                    "divided by one width only: a rank costs numbers in B and in A, in every adapted matrix of "
                    "every block."),
            Mistake("only A", _rank_only_A,
                    "only A's numbers are counted: B costs numbers for every rank too."),
            Mistake("one matrix", _rank_one_matrix,
                    "the whole budget given to the first matrix: it is shared by all the adapted matrices of a "
                    "block (Table 5: the more matrices, the lower the rank)."),
        ),
    ),
    Exercise(
        id="06.subspace_similarity",
        title="the subspace similarity of two adapters",
        task=("write phi(A1, A2, i, j) for two A matrices of shape (r, k): with np.linalg.svd, take the top-i "
              "right-singular vectors of A1 and the top-j of A2 (directions in the input space R^k) and return "
              "the squared Frobenius norm of their overlap divided by min(i, j)"),
        reference=rank.subspace_similarity,
        cases=_similarity_cases,
        mistakes=(
            *SUBSPACE_MISTAKES,
        ),
    ),
    Exercise(
        id="06.amplification",
        title="the amplification factor",
        task=("write amplification(W, dW, r): project W onto the top-r left (U) and right (V) singular vectors "
              "of the update dW, U^T W V of shape (r, r), and return ||dW||_F divided by the Frobenius norm of "
              "that projection"),
        reference=amplification_factor,
        cases=_amplification_cases,
        factors=lambda W, dW, r: {"r": r, "sqrt(r)": r ** 0.5},
        mistakes=(
            Mistake("divided by ||W||_F", _amp_over_W,
                    "divided by the norm of all of W: the factor compares dW with only a part of W (the paper's "
                    "section 7.3)."),
            Mistake("W's own directions", _amp_own_directions,
                    "U and V from W's own SVD: that is the comparison in the second column of the paper's Table 7 "
                    "(W's top directions), not the amplification factor."),
            Mistake("columns of Vt", _amp_vt_columns,
                    "the columns of Vt: np.linalg.svd returns V transposed, so V's columns are Vt's rows."),
        ),
    ),
]

PREDICTIONS = [
    Prediction(
        id="06.amplification_side",
        question="is the amplification factor of the desc adapter's Wq update (block 0, r = 8) above or below 1?",
        choices=("above", "below"),
        explanation=("A factor below 1 would mean that the update is smaller than the part of W already in its "
                     "directions, so that it merely re-weights directions W uses strongly. The paper's Table 7 "
                     "finds the opposite: the update amplifies directions that W holds only weakly."),
    ),
]
