"""The figures' shared style: colours, fonts, and the few helpers every figure module uses.

Frozen weights are blue-grey, trainable adapters orange, in every figure of the tutorial; the
4-bit code tables have one colour each. ``styled`` draws a figure function with larger fonts and
no top or right spines (readable on a projector); ``fig_ax`` gives a function its axes;
``minor_log_label`` writes a log axis' 2, 3 and 5 ticks in plain numbers; ``moving_average``
smooths a loss curve for display.
"""

from __future__ import annotations

import functools

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import ticker

FROZEN = "#9fb3c8"  # frozen weights: blue-grey
FROZEN_EDGE = "#4a6785"
TRAINABLE = "#f28e2b"  # trainable adapters: orange
TRAINABLE_EDGE = "#b35806"
NEUTRAL = "#e8e8e8"
NEUTRAL_EDGE = "#777777"
CODE_COLORS = {"int4": "#59a14f", "nf4": "#e15759", "fp4": "#4e79a7"}

STYLE = {
    "font.size": 12,
    "axes.titlesize": 13,
    "axes.labelsize": 12,
    "legend.fontsize": 10.5,
    "xtick.labelsize": 10.5,
    "ytick.labelsize": 10.5,
    "figure.dpi": 100,
    "savefig.bbox": "tight",
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def styled(fn):
    """Draw with the projection-friendly style (larger fonts, no top/right spines)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with plt.rc_context(STYLE):
            return fn(*args, **kwargs)

    return wrapper


def fig_ax(ax, figsize):
    """(figure, axes): the given axes and its figure, or a new figure with one axes."""
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def moving_average(y, window: int) -> np.ndarray:
    """Trailing moving average of ``y`` over ``window`` steps (shorter windows at the start)."""
    y = np.asarray(y, dtype=np.float64)  # (n,)
    if window <= 1 or y.size == 0:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))  # (n + 1,)
    n = np.arange(1, y.size + 1)  # (n,)
    lo = np.maximum(0, n - window)  # (n,)
    return (c[n] - c[lo]) / (n - lo)  # (n,)


def minor_log_label(v, _pos=None) -> str:
    """Label the minor ticks 2, 3 and 5 (x a power of ten) of a log axis in plain numbers."""
    if v <= 0:
        return ""
    mantissa = round(v / 10 ** np.floor(np.log10(v)), 6)
    return f"{v:g}" if mantissa in (2.0, 3.0, 5.0) else ""


def plain_log_axis(axis) -> None:
    """Write the ticks of a log-scaled ``axis`` (``ax.xaxis`` or ``ax.yaxis``) as 0.3, 2, 50, not 3 x 10^-1."""
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.FuncFormatter(minor_log_label))
