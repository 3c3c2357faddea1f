"""Exercises of notebook 3 (LoRA's math): LoRA (Hu et al., 2021), section 4.1 (eq. 3, the merge) and section 4.2.

1. ``03.adapter_backward``: the adapter's backward by hand, (dA, dB) of y = s (x A^T) B^T for an
   upstream gradient dy; the reference is the library's ``functional.lowrank_backward``.
2. ``03.trainable_parameters``: how many numbers LoRA trains for given targets and r on the
   base model, per adapted matrix of a block and in all (``memory.lora_trainable_parameters``);
   asked per matrix, so that mistakes giving the same total (B only; fc taken as square) differ.
3. ``03.merged_weight``: the merged weight W0 + (alpha / r) B A that makes the adapted layer one
   ordinary matrix again ("No Additional Inference Latency", section 4.1); the reference is what
   ``LoRALinear.merge`` does (``adapter.merged_copy`` of ``LowRankAdapter.delta_weight``).
"""

from __future__ import annotations

import numpy as np

from .. import functional as F
from .. import memory
from ..adapter import LowRankAdapter, merged_copy
from ..nn import Linear
from . import Exercise, Mistake

# ---------------------------------------------------------------- 1. the adapter's backward


def adapter_backward(x, dy, A, B, s: float):
    """(dA, dB) of y = s (x A^T) B^T for x (N, k), dy (N, d), A (r, k), B (d, r): the library's own backward."""
    _, cache = F.lowrank_forward(x, A, B, s)  # (N, k) -> (N, d); the cache holds x and s u
    _, dA, dB = F.lowrank_backward(dy, cache)  # (r, k), (d, r)
    return dA, dB


def _backward_dA_transposed(x, dy, A, B, s):
    g = s * (dy @ B)  # (N, d) @ (d, r) -> (N, r)
    return x.T @ g, s * dy.T @ (x @ A.T)  # (k, r): dA transposed; (d, r)


def _backward_no_s(x, dy, A, B, s):
    return (dy @ B).T @ x, dy.T @ (x @ A.T)  # (r, k), (d, r): both without s


def _backward_dB_no_s(x, dy, A, B, s):
    return (s * (dy @ B)).T @ x, dy.T @ x @ A.T  # (r, k); (d, N) @ (N, k) @ (k, r) -> (d, r) without s


def _backward_cases():
    rng = np.random.default_rng(30)
    cases = []
    for N, k, d, r, s in ((5, 6, 4, 3, 2.0), (7, 8, 10, 2, 0.5), (4, 12, 9, 5, 1.5)):
        cases.append((rng.standard_normal((N, k)), rng.standard_normal((N, d)), rng.standard_normal((r, k)),
                      rng.standard_normal((d, r)), s))  # x (N, k), dy (N, d), A (r, k), B (d, r), s
    return cases


# ---------------------------------------------------------------- 2. trainable parameters on the base model
BASE = memory.PRESETS["lfs-base"]  # our base model: 4 blocks, width 128, MLP width 512
R_COUNT, TARGETS_COUNT = 4, ("q", "v", "fc")
_SHAPES = {t: memory.target_shapes(BASE)[t] for t in TARGETS_COUNT}  # (d, k) of each target, per block
_L = BASE.n_layer


def _count(per_matrix) -> tuple:
    """(count of q, of v, of fc, all blocks together) for ``per_matrix(d, k)``, the count of one (d, k) matrix."""
    each = tuple(per_matrix(d, k) for d, k in _SHAPES.values())
    return (*each, _L * sum(each))


COUNT = _count(lambda d, k: R_COUNT * (d + k))
assert COUNT[-1] == memory.lora_trainable_parameters(BASE, R_COUNT, TARGETS_COUNT)

# ---------------------------------------------------------------- 3. the merged weight


def merged_weight(W0, A, B, alpha: float):
    """W0 + (alpha / r) B A with r = A.shape[0]: the weight a merged LoRALinear holds."""
    adapter = LowRankAdapter(A, B, alpha)  # A (r, k), B (d, r), s = alpha / r
    return merged_copy(Linear.from_weight(W0, trainable=False), adapter.delta_weight()).weight.data  # (d, k)


def _merge_alpha(W0, A, B, alpha):
    return W0 + alpha * (B @ A)  # (d, k): alpha instead of alpha / r


def _merge_unscaled(W0, A, B, alpha):
    return W0 + B @ A  # (d, k): no scaling at all


def _merge_transposed(W0, A, B, alpha):
    return W0 + (alpha / A.shape[0]) * (A.T @ B.T)  # (k, r) @ (r, d) -> (k, d): the order swapped


def _merge_minus(W0, A, B, alpha):
    return W0 - (alpha / A.shape[0]) * (B @ A)  # (d, k): the update taken out


def _merge_cases():
    rng = np.random.default_rng(31)
    return [(rng.standard_normal((d, d)), rng.standard_normal((r, d)), rng.standard_normal((d, r)), alpha)
            for d, r, alpha in ((6, 2, 8.0), (5, 3, 4.0), (8, 4, 16.0))]  # W0 (d, d), A (r, d), B (d, r), alpha


EXERCISES = [
    Exercise(
        id="03.adapter_backward",
        title="the adapter's backward by hand",
        task=("write backward(x, dy, A, B, s) returning (dA, dB) for y = s (x A^T) B^T, with x (N, k), dy = dL/dy "
              "(N, d), A (r, k), B (d, r); dA has A's shape and dB has B's"),
        reference=adapter_backward,
        cases=_backward_cases,
        parts=("dA", "dB"),
        factors=lambda x, dy, A, B, s: {"s": s, "r": A.shape[0], "N (the number of rows of x)": x.shape[0]},
        mistakes=(
            Mistake("dA transposed", _backward_dA_transposed,
                    "dA is transposed: a gradient has the shape of its parameter, and A is (r, k)."),
            Mistake("no s", _backward_no_s,
                    "both gradients miss the scaling s: the adapter's output is multiplied by s, and so is every "
                    "gradient that flows back through it."),
            Mistake("dB without s", _backward_dB_no_s,
                    "dB misses the scaling: the adapter's output is multiplied by s, and that factor reaches dB as it "
                    "reaches dA."),
        ),
    ),
    Exercise(
        id="03.trainable_parameters",
        title="how many parameters LoRA trains",
        task=(f"LoRA with r = {R_COUNT} on {', '.join(TARGETS_COUNT)} in each of the {_L} blocks of the base model "
              f"(W0 shapes (d, k): {', '.join(f'{t} {_SHAPES[t]}' for t in TARGETS_COUNT)}): how many numbers are "
              "trained? Give a tuple (per block: the count of q, of v, of fc; then the total over all blocks)"),
        reference=COUNT,
        parts=("q", "v", "fc", "the total"),
        factors={"r": R_COUNT, f"the {_L} blocks": _L},
        mistakes=(
            Mistake("r d k", _count(lambda d, k: R_COUNT * d * k),
                    "r * d * k: the adapter is not r copies of W0; count the entries of A and of B, each from its "
                    "own shape."),
            Mistake("A only", _count(lambda d, k: R_COUNT * k),
                    "counting A only: B is trained too."),
            Mistake("B only", _count(lambda d, k: R_COUNT * d),
                    "counting B only: A is trained too."),
            Mistake("one block", (*COUNT[:3], sum(COUNT[:3])),
                    f"the total is that of one block: every one of the {_L} blocks has its own adapters."),
            Mistake("d k", _count(lambda d, k: d * k),
                    "d * k is the size of W0 (what full fine-tuning of these matrices trains), not of A and B."),
            Mistake("fc as square", _count(lambda d, k: R_COUNT * 2 * k),
                    "fc counted as a square 128 x 128 matrix: the MLP's up-projection maps 128 inputs to 512 "
                    "outputs, so its B is taller than q's."),
        ),
    ),
    Exercise(
        id="03.merged_weight",
        title="the merged weight",
        task=("write merge(W0, A, B, alpha) returning the (d, k) weight of the merged layer for W0 (d, k), A (r, k), "
              "B (d, r) and LoRA's scaling s = alpha / r (r = A.shape[0])"),
        reference=merged_weight,
        cases=_merge_cases,
        offset=("W0", lambda W0, A, B, alpha: W0),
        factors=lambda W0, A, B, alpha: {"r": A.shape[0], "alpha": alpha, "sqrt(r)": A.shape[0] ** 0.5,
                                         "alpha / r": alpha / A.shape[0]},
        mistakes=(
            Mistake("alpha instead of alpha / r", _merge_alpha,
                    "the update is scaled by alpha alone: LoRA's scaling divides alpha by the rank, and the merge "
                    "must add what the layer adds."),
            Mistake("no scaling", _merge_unscaled,
                    "the update is not scaled: the adapted layer multiplies its second path by s, and the merged "
                    "weight must add what that path adds."),
            Mistake("B A order swapped", _merge_transposed,
                    "the update is transposed (A^T B^T): the weight is (d, k), and the product must have that shape; "
                    "A^T B^T is what the row-vector form multiplies x by."),
            Mistake("minus", _merge_minus,
                    "the update is subtracted: that is the unmerge, which takes the update out again."),
        ),
    ),
]
