"""Figures of notebooks 1 and 2: the measured cost of a training step, and the best rank-r approximation.

- ``plot_training_state``: what one AdamW step holds and needs, per tuning strategy (weights,
  gradients, AdamW moments, activations), from ``memory.step_memory``: LoRA (Hu et al., 2021),
  section 4.2 (training memory: no gradients and no optimizer state for frozen weights).
- ``plot_rank_r_error``: the measured error ||W - W_r||_F of the truncated SVD next to
  sqrt(sum over i > r of sigma_i^2), the Eckart & Young (1936) formula.

Host-side drawing only: the numbers come from ``memory`` and ``rank`` (through the notebooks).
"""

from __future__ import annotations

import numpy as np

from .. import rank
from ..backend import to_numpy
from . import FROZEN, FROZEN_EDGE, NEUTRAL, NEUTRAL_EDGE, TRAINABLE, _fig_ax, _styled

STATE_PARTS = (("weights", "weights (and buffers)", FROZEN, FROZEN_EDGE),
               ("gradients", "gradients", TRAINABLE, "#b35806"),
               ("optimizer", "AdamW moments", "#e15759", "#a12f31"),
               ("activations", "activations of the batch", NEUTRAL, NEUTRAL_EDGE))


@_styled
def plot_training_state(rows: dict, ax=None, unit: float = 2**20, unit_name: str = "MiB"):
    """Stacked bars, one per strategy: ``rows`` maps a label to a ``memory.step_memory`` dict.

    Each bar adds up ``weights``, ``gradients``, ``optimizer`` (held after the step) and
    ``activations`` (what the forward kept for the backward), in ``unit_name``.
    """
    if not isinstance(rows, dict) or not rows:
        raise ValueError("rows must be a non-empty dict: label -> memory.step_memory(...) result")
    for label, row in rows.items():
        missing = [key for key, *_ in STATE_PARTS if key not in row]
        if missing:
            raise ValueError(f"row {label!r} lacks {missing}; pass memory.step_memory results")
    fig, ax = _fig_ax(ax, (10, 1.0 + 0.75 * len(rows)))
    labels = list(rows)
    y = np.arange(len(labels))[::-1]  # (n,): the first row on top
    left = np.zeros(len(labels))  # (n,)
    for key, name, color, edge in STATE_PARTS:
        widths = np.array([rows[label][key] / unit for label in labels], dtype=np.float64)  # (n,)
        ax.barh(y, widths, left=left, color=color, edgecolor=edge, lw=0.8, label=name, height=0.6)
        left += widths  # (n,): where the next part starts
    for yi, total in zip(y, left):
        ax.text(total, yi, f"  {total:.1f} {unit_name}", va="center", fontsize=10.5)
    ax.set_yticks(y, labels)
    ax.set_xlabel(unit_name)
    ax.set_xlim(0, 1.18 * left.max())
    ax.set_title("One AdamW step on the base model: what is held, and what the batch needs")
    ax.legend(loc="upper center", bbox_to_anchor=(0.45, -0.5 if len(rows) < 3 else -0.22), ncol=4, frameon=False)
    ax.grid(alpha=0.3, axis="x")
    return fig


@_styled
def plot_rank_r_error(W, measured, ax=None):
    """The measured Frobenius error of the rank-r approximation (dots) against the formula (line), log scale.

    ``measured[r - 1]`` is ||W - B A||_F for the factors of ``rank.low_rank_approximation(W, r)``.
    """
    s = to_numpy(rank.singular_values(W)).astype(np.float64)  # (m,), descending
    measured = np.asarray(measured, dtype=np.float64)  # (n,)
    if measured.ndim != 1 or not 1 <= measured.size < s.size:
        raise ValueError(f"measured must hold one error per rank r = 1 .. n < min(d, k) = {s.size}; "
                         f"got shape {measured.shape}")
    ranks = np.arange(1, measured.size + 1)  # (n,)
    tail = np.sqrt(np.cumsum((s**2)[::-1])[::-1])  # (m,): tail[i] = sqrt(sum over j >= i of s_j^2)
    fig, ax = _fig_ax(ax, (6.5, 3.8))
    ax.semilogy(ranks, measured, "o", ms=4, color=TRAINABLE, label=r"measured $\|W - B A\|_F$")
    ax.semilogy(ranks, tail[ranks], "-", color=FROZEN_EDGE, label=r"$\sqrt{\sum_{i>r}\sigma_i^2}$")
    ax.set_xlabel("rank r")
    ax.set_ylabel("error (log scale)")
    ax.set_title("The best rank-r approximation (Eckart & Young, 1936)")
    ax.legend(frameon=False)
    ax.grid(alpha=0.3, which="both")
    return fig


__all__ = ["plot_rank_r_error", "plot_training_state"]
