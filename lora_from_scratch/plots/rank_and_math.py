"""Figures of notebooks 1 and 2: the measured cost of a training step, and the best rank-r approximation.

- ``plot_training_state``: what one AdamW step holds and needs, per tuning strategy (weights,
  gradients, AdamW moments, activations), from ``memory.step_memory``: LoRA (Hu et al., 2021),
  section 4.2 (training memory: no gradients and no optimizer state for frozen weights).
- ``plot_rank_r_error``: the measured error ||W - W_r||_F of the truncated SVD next to
  sqrt(sum over i > r of sigma_i^2), the Eckart & Young (1936) formula.

Host-side drawing only: the numbers come from ``memory`` and ``rank`` (through the notebooks).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from .. import rank
from ..backend import to_numpy
from .style import FROZEN, FROZEN_EDGE, NEUTRAL, NEUTRAL_EDGE, TRAINABLE, fig_ax, styled

STATE_PARTS = (("weights", "weights (and buffers)", FROZEN, FROZEN_EDGE),
               ("gradients", "gradients", TRAINABLE, "#b35806"),
               ("optimizer", "AdamW moments", "#e15759", "#a12f31"),
               ("activations", "activations of the batch", NEUTRAL, NEUTRAL_EDGE))


@styled
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
    fig, ax = fig_ax(ax, (10, 1.0 + 0.75 * len(rows)))
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


@styled
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
    fig, ax = fig_ax(ax, (6.5, 3.8))
    ax.semilogy(ranks, measured, "o", ms=4, color=TRAINABLE, label=r"measured $\|W - B A\|_F$")
    ax.semilogy(ranks, tail[ranks], "-", color=FROZEN_EDGE, label=r"$\sqrt{\sum_{i>r}\sigma_i^2}$")
    ax.set_xlabel("rank r")
    ax.set_ylabel("error (log scale)")
    ax.set_title("The best rank-r approximation (Eckart & Young, 1936)")
    ax.legend(frameon=False)
    ax.grid(alpha=0.3, which="both")
    return fig


__all__ = ["plot_rank_r_error", "plot_training_state"]


@styled
def plot_singular_values(W_list, labels=None, energy: bool = True, normalize: bool = True, axes=None):
    """Matrix rank (LoRA section 7): the singular value spectra of matrices, and the energy a rank-r cut keeps.

    Left: s_i (divided by s_1 when ``normalize``) against i, log scale: a
    low-rank matrix shows a cliff after its rank, noise a slow decay. Right
    (``energy=True``): the fraction of ||W||_F^2 kept by the best rank-r
    approximation, (s_1^2 + ... + s_r^2) / sum s_i^2 (``rank.cumulative_energy``).
    ``axes``: one Axes (``energy=False``) or two, to draw into.
    """
    if not isinstance(W_list, (list, tuple)) or not W_list:
        raise ValueError("W_list must be a non-empty list of 2-D matrices")
    labels = [f"W{i}" for i in range(len(W_list))] if labels is None else list(labels)
    if len(labels) != len(W_list):
        raise ValueError(f"{len(labels)} labels for {len(W_list)} matrices")
    n_axes = 2 if energy else 1
    if axes is None:
        fig, axes = plt.subplots(1, n_axes, figsize=(6.2 * n_axes, 4.8), squeeze=False)
        axes = list(axes[0])
    else:
        axes = [axes] if not isinstance(axes, (list, tuple, np.ndarray)) else list(np.ravel(axes))
        if len(axes) != n_axes:
            raise ValueError(f"need {n_axes} axes, got {len(axes)}")
        fig = axes[0].figure
    for W, label in zip(W_list, labels):
        s = to_numpy(rank.singular_values(W)).astype(np.float64)  # (min(d, k),) descending
        i = np.arange(1, s.size + 1)  # (m,)
        y = s / s[0] if normalize and s[0] > 0 else s  # (m,)
        y = np.maximum(y, 1e-17)  # (m,) exact zeros cannot be drawn on a log axis
        axes[0].semilogy(i, y, marker="o", ms=3, lw=1.5, label=label)
        if energy:
            kept = to_numpy(rank.cumulative_energy(W)).astype(np.float64)  # (m,)
            axes[1].plot(i, kept, marker="o", ms=3, lw=1.5, label=label)
    axes[0].set_ylabel(r"$s_i\,/\,s_1$ (log scale)" if normalize else r"$s_i$ (log scale)")
    axes[0].set_xlabel(r"index $i$")
    axes[0].set_title("Singular values")
    axes[0].legend(frameon=False)
    axes[0].grid(alpha=0.3)
    if energy:
        axes[1].set_xlabel(r"rank $r$ of the approximation")
        axes[1].set_ylabel(r"fraction of $\|W\|_F^2$ kept")
        axes[1].set_ylim(0, 1.03)
        axes[1].set_title("Energy kept by the best rank-r approximation")
        axes[1].grid(alpha=0.3)
        axes[1].legend(frameon=False, loc="lower right")
    fig.tight_layout()
    return fig


@styled
def plot_subspace_similarity(A1, A2, ax=None, labels=("A1", "A2"), max_i=None, max_j=None):
    """LoRA paper section 7.2, Figure 3: heatmap of phi(A1, A2, i, j).

    A1 (r1, k) and A2 (r2, k) are two adapters' A matrices for the same
    layer (e.g. trained with r = 8 and r = 64). Cell (i, j) is the overlap of
    the top-i right-singular directions of A1 with the top-j of A2, from 0
    (orthogonal) to 1 (one subspace contains the other): ``rank.subspace_similarity_matrix``,
    computed in float64.
    """
    A1 = to_numpy(A1).astype(np.float64)  # (r1, k)
    A2 = to_numpy(A2).astype(np.float64)  # (r2, k)
    phi = to_numpy(rank.subspace_similarity_matrix(A1, A2, max_i, max_j))  # (I, J)
    fig, ax = fig_ax(ax, (min(3 + 0.28 * phi.shape[1], 14), min(2.4 + 0.45 * phi.shape[0], 9)))
    im = ax.imshow(phi, cmap="magma", vmin=0.0, vmax=1.0, aspect="auto")
    I, J = phi.shape
    step_i = max(1, I // 8)
    step_j = max(1, J // 12)
    ax.set_yticks(range(0, I, step_i), [str(i + 1) for i in range(0, I, step_i)])
    ax.set_xticks(range(0, J, step_j), [str(j + 1) for j in range(0, J, step_j)])
    ax.set_ylabel(f"i (top directions of {labels[0]})")
    ax.set_xlabel(f"j (top directions of {labels[1]})")
    ax.set_title(f"Subspace similarity φ({labels[0]}, {labels[1]}, i, j)")
    fig.colorbar(im, ax=ax, label="φ")
    return fig



def example_low_rank_matrices(d: int = 64, k: int = 48, rank: int = 6, seed: int = 0):
    """Example matrices for the spectrum figure: (list of matrices, labels), NumPy float64.

    A matrix of exact rank ``rank`` (B A), the same plus small and larger
    Gaussian noise ("low rank + noise", what a learned update looks like),
    and a full-rank Gaussian matrix for contrast.
    """
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((d, rank))  # (d, rank)
    A = rng.standard_normal((rank, k))  # (rank, k)
    low = B @ A / np.sqrt(rank)  # (d, k), rank `rank`
    noise = rng.standard_normal((d, k))  # (d, k)
    full = rng.standard_normal((d, k))  # (d, k)
    mats = [low, low + 0.05 * noise, low + 0.3 * noise, full]  # 4 x (d, k)
    labels = [f"rank {rank} (B A)", f"rank {rank} + noise 0.05", f"rank {rank} + noise 0.3", "random Gaussian"]
    return mats, labels
