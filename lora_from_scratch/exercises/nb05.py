"""Exercises of notebook 5 (the scaling): LoRA (Hu et al., 2021), section 4.1, s = alpha / r, and rsLoRA
(Kalajdzievski, 2023), s = alpha / sqrt(r).

1. ``05.scaling``: the scaling factor for r and alpha, LoRA's or rsLoRA's.
2. ``05.doubling``: predict by what factor ||s B A|| changes early in training when r doubles,
   under alpha / r, alpha / sqrt(r) and no scaling.
3. ``05.rslora_alpha``: the alpha that gives rsLoRA at a new rank the scaling a tuned LoRA run had.
"""

from __future__ import annotations

import math

from ..adapter import lora_scaling  # the solution of 05.scaling: s = alpha / r, or alpha / sqrt(r) with rsLoRA
from . import Exercise, Mistake


def _scaling_alpha(r, alpha, rslora=False):
    return float(alpha)


def _scaling_always_sqrt(r, alpha, rslora=False):
    return alpha / math.sqrt(r)


def _scaling_never_sqrt(r, alpha, rslora=False):
    return alpha / r


def _scaling_inverted(r, alpha, rslora=False):
    return math.sqrt(r) / alpha if rslora else r / alpha


def _scaling_half_r(r, alpha, rslora=False):
    return alpha / (r ** 1 / 2) if rslora else alpha / r  # r**1/2 is (r**1) / 2


def _scaling_half_r_left(r, alpha, rslora=False):
    return alpha / r ** 1 / 2 if rslora else alpha / r  # (alpha / r) / 2


def _scaling_cases():
    return [(8, 16, False), (8, 16, True), (64, 16, False), (64, 16, True), (2, 4, True), (32, 8, False)]


# 05.doubling: early in training (Adam, B from zero, A at its random start) ||B A|| grows like sqrt(r)
DOUBLING = (2 ** -0.5, 1.0, 2 ** 0.5)  # factors for s = alpha / r, alpha / sqrt(r), 1

# 05.rslora_alpha: a LoRA run tuned at r = 8, alpha = 16 (s = 2); rsLoRA at r = 32 with the same s
TUNED_R, TUNED_ALPHA, NEW_R = 8, 16, 32
TUNED_S = TUNED_ALPHA / TUNED_R

EXERCISES = [
    Exercise(
        id="05.scaling",
        title="the scaling factor, LoRA's and rsLoRA's",
        task="write scale(r, alpha, rslora=False) returning the factor s that multiplies B A",
        reference=lora_scaling,
        cases=_scaling_cases,
        factors=lambda r, alpha, rslora=False: {"r": r, "sqrt(r)": r ** 0.5, "alpha": alpha},
        mistakes=(
            Mistake("alpha", _scaling_alpha,
                    "alpha alone: the factor depends on the rank too."),
            Mistake("always sqrt", _scaling_always_sqrt,
                    "rsLoRA's factor also for plain LoRA: the two differ when rslora=False."),
            Mistake("never sqrt", _scaling_never_sqrt,
                    "LoRA's factor also for rsLoRA: rsLoRA's differs (that is its point)."),
            Mistake("r**1/2", _scaling_half_r,
                    "r**1/2 is (r**1) / 2, half of r, because ** binds tighter than /: a square root needs "
                    "r**0.5 (or np.sqrt)."),
            Mistake("alpha / r**1/2", _scaling_half_r_left,
                    "r**1/2 is (r**1) / 2, half of r, because ** binds tighter than /: a square root needs "
                    "r**0.5 (or np.sqrt)."),
            Mistake("inverted", _scaling_inverted,
                    "upside down: the factor grows with alpha, not with the rank."),
        ),
    ),
    Exercise(
        id="05.doubling",
        title="the update's size when r doubles",
        task=("early in training (Adam moves each entry of B by about the learning rate; B starts at zero, A at "
              "its random start), by what factor does ||s B A||_F change when r doubles? Give a tuple (factor "
              "with s = alpha / r, with s = alpha / sqrt(r), with s = 1)"),
        reference=DOUBLING,
        rtol=1e-6,
        min_decimals=2,
        parts=("with alpha / r", "with alpha / sqrt(r)", "with s = 1"),
        factors={"sqrt(2)": 2 ** 0.5, "2": 2.0},
        mistakes=(
            Mistake("raw grows like r", (1.0, 2 ** 0.5, 2.0),
                    "you assumed the raw ||B A|| grows like r: at the start the r terms of an entry of B A "
                    "(products with random rows of A) point in unrelated directions and do not add like equal "
                    "numbers."),
            Mistake("raw constant", (0.5, 2 ** -0.5, 1.0),
                    "you assumed the raw ||B A|| does not change with r: with Adam each entry of B moves by about "
                    "the learning rate whatever r is, and more columns of B means more such entries."),
        ),
    ),
    Exercise(
        id="05.rslora_alpha",
        title="alpha for rsLoRA at a new rank",
        task=(f"a LoRA run was tuned at r = {TUNED_R}, alpha = {TUNED_ALPHA} with s = alpha / r. Which alpha gives "
              f"rsLoRA (s = alpha / sqrt(r)) at r = {NEW_R} the same s? (a number)"),
        reference=TUNED_S * math.sqrt(NEW_R),
        rtol=1e-9,
        min_decimals=3,
        factors={"sqrt(r)": math.sqrt(NEW_R), "r": float(NEW_R), "2": 2.0},
        mistakes=(
            Mistake("alpha / r kept", TUNED_S * NEW_R,
                    "that alpha keeps alpha / r constant, LoRA's factor; the new run uses rsLoRA's factor."),
            Mistake("same alpha", float(TUNED_ALPHA),
                    f"the same alpha gives rsLoRA at r = {NEW_R} another factor s: {TUNED_ALPHA} / sqrt({NEW_R}) = "
                    f"{TUNED_ALPHA / math.sqrt(NEW_R):.2f}, not {TUNED_S:g}."),
            Mistake("r**1/2", TUNED_S * NEW_R / 2,
                    "r**1/2 is (r**1) / 2, half of r, because ** binds tighter than /: a square root needs "
                    "r**0.5 (or np.sqrt)."),
            Mistake("divided by sqrt(r)", TUNED_S / math.sqrt(NEW_R),
                    "upside down: a larger alpha gives a larger s, so solving for alpha multiplies, it does not "
                    "divide."),
        ),
    ),
]
