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
        title="the scaling factor: alpha / r, or alpha / sqrt(r) with rsLoRA",
        task="write scale(r, alpha, rslora=False) returning the factor s that multiplies B A",
        reference=lora_scaling,
        cases=_scaling_cases,
        mistakes=(
            Mistake("alpha", _scaling_alpha,
                    "alpha instead of alpha / r: the factor divides alpha by the rank (by its square root with "
                    "rsLoRA)."),
            Mistake("always sqrt", _scaling_always_sqrt,
                    "alpha / sqrt(r) when asked for LoRA's: plain LoRA divides by r; only rsLoRA divides by "
                    "sqrt(r)."),
            Mistake("never sqrt", _scaling_never_sqrt,
                    "alpha / r also for rsLoRA: rsLoRA's factor is alpha / sqrt(r)."),
            Mistake("inverted", _scaling_inverted,
                    "r / alpha: the factor is alpha over the rank (or its square root), not the other way round."),
        ),
    ),
    Exercise(
        id="05.doubling",
        title="early in training ||B A|| grows like sqrt(r): factors 1/sqrt(2), 1, sqrt(2)",
        task=("early in training (Adam moves each entry of B by about the learning rate; B starts at zero, A at "
              "its random start), by what factor does ||s B A||_F change when r doubles? Give a tuple (factor "
              "with s = alpha / r, with s = alpha / sqrt(r), with s = 1)"),
        reference=DOUBLING,
        rtol=2e-3,
        mistakes=(
            Mistake("raw grows like r", (1.0, 2 ** 0.5, 2.0),
                    "the raw ||B A|| grows like sqrt(r), not r: at the start the r terms of an entry of B A "
                    "(products with random rows of A) point in unrelated directions and add like random numbers."),
            Mistake("raw constant", (0.5, 2 ** -0.5, 1.0),
                    "the raw ||B A|| is not constant in r: with Adam each entry of B moves by about the learning "
                    "rate whatever r is, so B has r columns of that size and ||B A|| grows like sqrt(r)."),
        ),
    ),
    Exercise(
        id="05.rslora_alpha",
        title="the same s at a new rank under rsLoRA: alpha = s sqrt(r)",
        task=(f"a LoRA run was tuned at r = {TUNED_R}, alpha = {TUNED_ALPHA} with s = alpha / r. Which alpha gives "
              f"rsLoRA (s = alpha / sqrt(r)) at r = {NEW_R} the same s? (a number)"),
        reference=TUNED_S * math.sqrt(NEW_R),
        rtol=1e-4,
        mistakes=(
            Mistake("alpha / r kept", TUNED_S * NEW_R,
                    "alpha = s r keeps alpha / r constant, but rsLoRA divides by sqrt(r): alpha = s sqrt(r)."),
            Mistake("same alpha", float(TUNED_ALPHA),
                    f"the same alpha gives rsLoRA at r = {NEW_R} the factor {TUNED_ALPHA} / sqrt({NEW_R}) = "
                    f"{TUNED_ALPHA / math.sqrt(NEW_R):.2f}, not {TUNED_S:g}: solve s = alpha / sqrt(r) for alpha."),
            Mistake("divided by sqrt(r)", TUNED_S / math.sqrt(NEW_R),
                    "s / sqrt(r) is upside down: from s = alpha / sqrt(r) it follows alpha = s sqrt(r)."),
        ),
    ),
]
