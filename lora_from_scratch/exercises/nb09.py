"""Exercises of notebook 9 (QA-LoRA): the merge into the zero points, the pooling's backward, the adapter's size.

QA-LoRA (Xu et al., 2023), section 3.3: W0 is stored group-wise, w~ = scale (q - zero) with one
(scale, zero) per row and group of ``group_size`` input channels; the adapter sees the group means
p (..., L), L = in / group_size, so A is (r, L) and the update s (B A)[o, g] / group_size is the same
for every channel of group g: it folds into the zero point, zero' = zero - s (B A) / (group_size scale).

1. ``09.zero_merge``: a function giving the merged zero points (the reference is the library's
   ``QALoRALinear.merged_zeros``).
2. ``09.pool_backward``: the backward of the group mean, dp (..., L) -> dx (..., L * group_size)
   (the reference is ``functional.group_mean_backward``).
3. ``09.adapter_size``: the trainable parameters of QA-LoRA (r = 8, group size 32) on each of the six
   matrices of a block (asked per matrix: pooled on the output side, fc and proj trade places and the
   total stays the same); the notebook sums them over the four blocks and compares with
   ``lora.count_parameters``.
"""

from __future__ import annotations

import numpy as np

from ..functional import group_mean_backward
from ..qalora import GroupwiseLinear, QALoRALinear
from ..quant.groupwise import GroupwiseQuantized
from . import Exercise, Mistake


# ----------------------------------------------------------------- 09.zero_merge
def _merged_zeros(zeros, scales, A, B, alpha, group_size):
    """The library's merge: a QA-LoRA layer holding these zeros, scales, A and B, asked for its merged zeros."""
    zeros = np.asarray(zeros, dtype=np.float32)  # (out, L)
    scales = np.asarray(scales, dtype=np.float32)  # (out, L)
    out_features, L = zeros.shape
    codes = np.zeros((out_features, L * group_size), dtype=np.uint8)  # (out, in): the codes do not enter the merge
    base = GroupwiseLinear(GroupwiseQuantized(codes, scales, zeros, bits=4, group_size=group_size))
    layer = QALoRALinear(base, r=int(np.shape(A)[0]), alpha=alpha, bits=4, group_size=group_size,
                         rng=np.random.default_rng(0))
    layer.lora_A.data = np.asarray(A, dtype=np.float32)  # (r, L)
    layer.lora_B.data = np.asarray(B, dtype=np.float32)  # (out, r)
    return layer.merged_zeros()  # (out, L)


def _shift(scales, A, B, alpha, group_size):
    A, B = np.asarray(A, dtype=np.float64), np.asarray(B, dtype=np.float64)  # (r, L), (out, r)
    return (alpha / A.shape[0]) * (B @ A) / group_size / np.asarray(scales, dtype=np.float64)  # (out, L)


def _zeros_no_group_size(zeros, scales, A, B, alpha, group_size):
    return np.asarray(zeros) - _shift(scales, A, B, alpha, group_size) * group_size  # (out, L)


def _zeros_added(zeros, scales, A, B, alpha, group_size):
    return np.asarray(zeros) + _shift(scales, A, B, alpha, group_size)  # (out, L)


def _zeros_no_scale(zeros, scales, A, B, alpha, group_size):
    return np.asarray(zeros) - _shift(scales, A, B, alpha, group_size) * np.asarray(scales)  # (out, L)


def _zeros_times_scale(zeros, scales, A, B, alpha, group_size):
    return np.asarray(zeros) - _shift(scales, A, B, alpha, group_size) * np.asarray(scales) ** 2  # (out, L)


def _zeros_alpha_not_over_r(zeros, scales, A, B, alpha, group_size):
    return np.asarray(zeros) - _shift(scales, A, B, alpha, group_size) * np.shape(A)[0]  # (out, L)


def _zero_cases():
    rng = np.random.default_rng(9)
    cases = []
    for out_features, L, r, gs, alpha in ((6, 4, 2, 4, 4.0), (8, 3, 4, 8, 16.0), (5, 2, 3, 2, 6.0)):
        zeros = rng.integers(0, 16, (out_features, L)).astype(np.float32)  # (out, L) integer zero points
        scales = rng.uniform(0.01, 0.05, (out_features, L)).astype(np.float32)  # (out, L) step sizes
        A = rng.standard_normal((r, L)).astype(np.float32)  # (r, L)
        B = (0.05 * rng.standard_normal((out_features, r))).astype(np.float32)  # (out, r), as if trained
        cases.append((zeros, scales, A, B, alpha, gs))
    return cases


# ----------------------------------------------------------------- 09.pool_backward
def _pool_backward(dp, group_size):
    """The library's backward of the group mean."""
    return group_mean_backward(np.asarray(dp), group_size)  # (..., L) -> (..., L * group_size)


def _pool_no_division(dp, group_size):
    return np.repeat(np.asarray(dp), group_size, axis=-1)  # (..., L * gs), every channel gets all of dp


def _pool_tiled(dp, group_size):
    dp = np.asarray(dp)  # (..., L)
    return np.tile(dp, (1,) * (dp.ndim - 1) + (group_size,)) / group_size  # (..., gs * L), groups interleaved


def _pool_over_L(dp, group_size):
    dp = np.asarray(dp)  # (..., L)
    return np.repeat(dp, group_size, axis=-1) / dp.shape[-1]  # (..., L * gs) divided by L


def _pool_cases():
    rng = np.random.default_rng(10)
    return [(rng.standard_normal((2, 3)), 4), (rng.standard_normal((2, 5, 4)), 2), (rng.standard_normal((3, 2)), 8)]


# ----------------------------------------------------------------- 09.adapter_size
R, GROUP_SIZE, N_BLOCKS, WIDTH = 8, 32, 4, 128
# per block: q, k, v, o are (128, 128), fc is (512, 128), proj is (128, 512): (out, in)
SHAPES = [(WIDTH, WIDTH)] * 4 + [(4 * WIDTH, WIDTH), (WIDTH, 4 * WIDTH)]


NAMES = ("q", "k", "v", "o", "fc", "proj")


def _count(a_columns, b_rows=lambda o: o) -> tuple:
    """Per matrix of one block: r * (A's columns + B's rows) for ``a_columns(in)``, ``b_rows(out)``."""
    return tuple(R * (a_columns(i) + b_rows(o)) for o, i in SHAPES)


ADAPTER_SIZE = _count(lambda i: i // GROUP_SIZE)  # A (r, in / group_size) and B (out, r) per matrix


EXERCISES = [
    Exercise(
        id="09.zero_merge",
        title="the merge into the zero points",
        task=("write merged_zeros(zeros, scales, A, B, alpha, group_size): zeros and scales (out, L), A (r, L), "
              "B (out, r), s = alpha / r; return the zero points (out, L) that make scale * (q - zero') equal "
              "scale * (q - zero) plus the pooled adapter's update s (B A)[o, g] / group_size"),
        reference=_merged_zeros,
        cases=_zero_cases,
        rtol=1e-5,
        atol=1e-6,
        offset=("the zero points", lambda zeros, scales, A, B, alpha, group_size: zeros),
        factors=lambda zeros, scales, A, B, alpha, group_size: {
            "group_size": group_size, "r": A.shape[0], "alpha": alpha, "alpha / r": alpha / A.shape[0]},
        mistakes=(
            Mistake("no 1 / group_size", _zeros_no_group_size,
                    "the shift is group_size times too large: the adapter sees the group MEAN, so its update is "
                    "shared by the group_size channels of a group"),
            Mistake("added", _zeros_added,
                    "the shift was added to the zero point; w~ = scale (q - zero), so adding c to the weights "
                    "means subtracting c / scale from the zero"),
            Mistake("scale forgotten", _zeros_no_scale,
                    "the scale was forgotten: the zero point counts quantization steps, so the update (a weight "
                    "value) must be divided by the group's scale"),
            Mistake("times the scale", _zeros_times_scale,
                    "the update was multiplied by the scale: the zero point counts steps of size scale, so a weight "
                    "value becomes a number of steps the other way round"),
            Mistake("alpha instead of alpha / r", _zeros_alpha_not_over_r,
                    "the update is scaled by alpha alone: the adapter's scaling depends on the rank too"),
        ),
    ),
    Exercise(
        id="09.pool_backward",
        title="the backward of the group mean",
        task=("write pool_backward(dp, group_size): dp (..., L) is the gradient of the group means p "
              "(p[..., g] = mean of x[..., g * group_size : (g + 1) * group_size]); return dx (..., L * group_size)"),
        reference=_pool_backward,
        cases=_pool_cases,
        factors=lambda dp, group_size: {"group_size": group_size, "L": np.shape(dp)[-1]},
        mistakes=(
            Mistake("no division", _pool_no_division,
                    "not divided by group_size: a mean gives each of its group_size inputs 1 / group_size of "
                    "the gradient"),
            Mistake("tiled", _pool_tiled,
                    "the groups are interleaved (np.tile repeats the whole row): the channels of a group are "
                    "neighbours, group g holds channels g * group_size up to (g + 1) * group_size"),
            Mistake("divided by L", _pool_over_L,
                    "divided by the number of groups L; the mean is over the group_size channels of one group"),
        ),
    ),
    Exercise(
        id="09.adapter_size",
        title="the size of QA-LoRA's adapters",
        task=(f"how many trainable parameters has QA-LoRA with r = {R}, group size {GROUP_SIZE} on all six matrices "
              f"(q, k, v, o: (128, 128); fc: (512, 128); proj: (128, 512), as (out, in)) of the {N_BLOCKS} "
              "blocks? Give a tuple: the count of each matrix of one block, (q, k, v, o, fc, proj)"),
        reference=ADAPTER_SIZE,
        parts=NAMES,
        factors={"group_size": float(GROUP_SIZE), "r": float(R), f"the {N_BLOCKS} blocks": float(N_BLOCKS)},
        mistakes=(
            Mistake("LoRA's count", _count(lambda i: i),
                    "that is LoRA's count, with a full-width A: QA-LoRA's A sees the group means, not the channels"),
            Mistake("A (r, group_size)", _count(lambda i: GROUP_SIZE),
                    "A was given group_size columns: A has one column per group, and the number of groups is not the "
                    "size of a group"),
            Mistake("B forgotten", _count(lambda i: i // GROUP_SIZE, lambda o: 0),
                    "B is missing: it trains too, and it is the larger of the two"),
            Mistake("output side pooled", _count(lambda i: i, lambda o: o // GROUP_SIZE),
                    "the pooling is on the output side: QA-LoRA pools the INPUT channels in groups (the groups of "
                    "the quantization run along a row of W0), so A shrinks and B keeps one row per output"),
            Mistake("all blocks", tuple(N_BLOCKS * c for c in ADAPTER_SIZE),
                    f"each count is for the {N_BLOCKS} blocks together: the tuple asks for one block's matrices"),
        ),
    ),
]
