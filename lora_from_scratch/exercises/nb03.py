"""Exercises of notebook 3 (LoRA's math): LoRA (Hu et al., 2021), section 4.1 (eq. 3, the merge) and section 4.2.

1. ``03.adapter_backward``: the adapter's backward by hand, (dA, dB) of y = s (x A^T) B^T for an
   upstream gradient dy; the reference is the library's ``functional.lowrank_backward``.
2. ``03.trainable_parameters``: how many numbers LoRA trains for given targets and r on the
   base model: r (d + k) per adapted matrix, in every block (``memory.lora_trainable_parameters``).
3. ``03.merged_weight``: the merged weight W0 + (alpha / r) B A that makes the adapted layer one
   ordinary matrix again ("No Additional Inference Latency", section 4.1); the reference is what
   ``LoRALinear.merge`` does (``Linear.merged_copy`` of ``LowRankAdapter.delta_weight``).
"""

from __future__ import annotations

import numpy as np

from .. import functional as F
from .. import memory
from ..adapter import LowRankAdapter
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

# ---------------------------------------------------------------- 3. the merged weight


def merged_weight(W0, A, B, alpha: float):
    """W0 + (alpha / r) B A with r = A.shape[0]: the weight a merged LoRALinear holds."""
    adapter = LowRankAdapter(A, B, alpha)  # A (r, k), B (d, r), s = alpha / r
    return Linear.from_weight(W0, trainable=False).merged_copy(adapter.delta_weight()).weight.data  # (d, k)


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
        title="the adapter's backward by hand: dA = (s dy B)^T x, dB = s dy^T (x A^T)",
        task=("write backward(x, dy, A, B, s) returning (dA, dB) for y = s (x A^T) B^T, with x (N, k), dy = dL/dy "
              "(N, d), A (r, k), B (d, r); dA has A's shape and dB has B's"),
        reference=adapter_backward,
        cases=_backward_cases,
        mistakes=(
            Mistake("dA transposed", _backward_dA_transposed,
                    "dA transposed: A is (r, k), so its gradient is (s dy B)^T x of shape (r, k), not x^T (s dy B)."),
            Mistake("no s", _backward_no_s,
                    "forgetting s: the adapter's output is multiplied by s = alpha / r, so both dA and dB carry the "
                    "factor s."),
            Mistake("dB without s", _backward_dB_no_s,
                    "dB = dy^T x A^T without the scaling: it is dB = s dy^T (x A^T); dA has its s, dB needs it too."),
        ),
    ),
    Exercise(
        id="03.trainable_parameters",
        title="LoRA's trainable parameters: r (d + k) per adapted matrix, in every block",
        task=(f"LoRA with r = {R_COUNT} on {', '.join(TARGETS_COUNT)} in each of the {_L} blocks of the base model "
              f"(W0 shapes (d, k): {', '.join(f'{t} {_SHAPES[t]}' for t in TARGETS_COUNT)}): how many numbers are "
              "trained? (an integer)"),
        reference=memory.lora_trainable_parameters(BASE, R_COUNT, TARGETS_COUNT),
        mistakes=(
            Mistake("r d k", _L * sum(R_COUNT * d * k for d, k in _SHAPES.values()),
                    "r * d * k: the adapter is not r copies of W0; A (r, k) and B (d, r) hold r k + d r = r (d + k)."),
            Mistake("A only", _L * sum(R_COUNT * k for _, k in _SHAPES.values()),
                    "counting A only (r k): B (d, r) is trained too, r (d + k) per matrix."),
            Mistake("B only", _L * sum(R_COUNT * d for d, _ in _SHAPES.values()),
                    "counting B only (d r): A (r, k) is trained too, r (d + k) per matrix."),
            Mistake("one block", sum(R_COUNT * (d + k) for d, k in _SHAPES.values()),
                    f"that is one block: every one of the {_L} blocks has its own adapters."),
            Mistake("d k", _L * sum(d * k for d, k in _SHAPES.values()),
                    "d * k is the size of W0 (what full fine-tuning of these matrices trains), not of A and B."),
        ),
    ),
    Exercise(
        id="03.merged_weight",
        title="the merged weight W0 + (alpha / r) B A",
        task=("write merge(W0, A, B, alpha) returning the (d, k) weight of the merged layer for W0 (d, k), A (r, k), "
              "B (d, r) and LoRA's scaling s = alpha / r (r = A.shape[0])"),
        reference=merged_weight,
        cases=_merge_cases,
        mistakes=(
            Mistake("alpha instead of alpha / r", _merge_alpha,
                    "alpha instead of alpha / r: the layer adds s B A with s = alpha / r, and the merge must add the "
                    "same."),
            Mistake("no scaling", _merge_unscaled,
                    "W0 + B A without the scaling: the adapted layer computes s (x A^T) B^T, so the merge adds "
                    "s B A, s = alpha / r."),
            Mistake("B A order swapped", _merge_transposed,
                    "B A order swapped (A^T B^T): the update of a (d, k) weight is B (d, r) @ A (r, k); A^T B^T is "
                    "its transpose, what the row-vector form x A^T B^T multiplies x by."),
            Mistake("minus", _merge_minus,
                    "W0 - s B A is the unmerge (it takes the update out again); the merge adds it."),
        ),
    ),
]
