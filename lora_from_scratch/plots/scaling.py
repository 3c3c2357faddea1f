"""Figures of notebook 5: the scaling s of the update s B A (LoRA, Hu et al., 2021, section 4.1: alpha / r;
rsLoRA, Kalajdzievski, 2023: alpha / sqrt(r)).

- ``plot_update_sizes``: ||s B A||_F against r early and later in training, for alpha/r,
  alpha/sqrt(r) and no scaling, with the slopes r^(-1/2), r^0 and r^(1/2) for reference.
- ``plot_loss_curves``: a few loss curves on one axis (equal runs drawn so that both stay visible).
- ``plot_lr_rank_grid``: the ``lr_rank_grid`` experiment, one heat map of held-out loss per
  scaling (learning rate across, rank down) with each rank's best learning rate marked; below, the
  best learning rate against r and the held-out loss at that learning rate against r, for both.

Host-side drawing only: the numbers come from ``experiments.lr_rank_grid``.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colors as mcolors

from .style import TRAINABLE, plain_log_axis, styled

SCALING_COLORS = {"alpha/r": TRAINABLE, "alpha/sqrt(r)": "#4e79a7", "none (s = 1)": "#59a14f"}


@styled
def plot_update_sizes(sizes: dict, steps=None):
    """One panel per chosen step: ||s B A||_F against r (log-log) for each scaling.

    ``sizes``: {scaling: {r: [(step, norm), ...]}} from ``lr_rank_grid.update_sizes``; ``steps``:
    which measured steps to show (default: the first after step 0 and the last).
    """
    if not sizes:
        raise ValueError("sizes is empty")
    first = next(iter(next(iter(sizes.values())).values()))
    measured = [s for s, _ in first if s > 0]
    steps = [measured[0], measured[-1]] if steps is None else list(steps)
    fig, axes = plt.subplots(1, len(steps), figsize=(6.2 * len(steps), 4.6), sharey=True, squeeze=False)
    for ax, step in zip(axes[0], steps):
        for scaling, per_rank in sizes.items():
            ranks = np.array(sorted(per_rank), dtype=np.float64)  # (n_ranks,)
            norms = np.array([dict(per_rank[int(r)])[step] for r in ranks])  # (n_ranks,)
            ax.loglog(ranks, norms, "o-", lw=2, color=SCALING_COLORS.get(scaling, "#333333"), label=scaling, base=2)
            anchor = norms[len(norms) // 2]
            mid = ranks[len(ranks) // 2]
            slope = {"alpha/r": -0.5, "alpha/sqrt(r)": 0.0, "none (s = 1)": 0.5}.get(scaling)
            if slope is not None:
                ax.loglog(ranks, anchor * (ranks / mid) ** slope, ":", color="#777777", lw=1.2, base=2)
        ax.set_xlabel("rank r")
        ax.set_title(f"after {step} step{'s' if step > 1 else ''}")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("||s B A||_F, all adapted matrices")
    axes[0][0].legend(frameon=False, title="scaling s (dotted: r^-1/2, r^0, r^1/2)")
    fig.tight_layout()
    return fig


@styled
def plot_loss_curves(losses: dict, title: str = "Training loss", ax=None):
    """Loss per step for a few runs on one axis; later runs dashed and thinner, so that equal curves stay visible."""
    if not losses:
        raise ValueError("losses is empty")
    fig, ax = (plt.subplots(figsize=(8.5, 4.4)) if ax is None else (ax.figure, ax))
    palette = [TRAINABLE, "#4e79a7", "#59a14f", "#e15759"]
    styles = ["-", "--", ":", "-."]
    for n, (name, loss) in enumerate(losses.items()):
        loss = np.asarray(loss, dtype=np.float64)  # (steps,)
        ax.plot(np.arange(1, loss.size + 1), loss, styles[n % len(styles)], color=palette[n % len(palette)],
                lw=3.0 - 0.8 * min(n, 2), label=name)
    ax.set_yscale("log")
    plain_log_axis(ax.yaxis)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (log scale)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def _grid_array(grid: dict, ranks, lrs, key: str):
    """(n_ranks, n_lrs) array of ``key`` from cells "r,lr"; NaN where a run diverged."""
    out = np.full((len(ranks), len(lrs)), np.nan)  # (n_ranks, n_lrs)
    for i, r in enumerate(ranks):
        for j, lr in enumerate(lrs):
            v = grid[f"{r},{lr:g}"].get(key)
            if v is not None:
                out[i, j] = v
    return out


@styled
def plot_lr_rank_grid(result: dict, key: str = "held_out_loss"):
    """Top: heat maps of ``key`` (learning rate x rank) per scaling, each rank's best lr boxed. Bottom: the best lr
    against r, and ``key`` at that best lr against r, for every scaling."""
    settings, grids, best = result["settings"], result["grids"], result["best_lr"]
    ranks, lrs = settings["ranks"], settings["lrs"]
    label = key.replace("_", " ")
    arrays = {name: _grid_array(grid, ranks, lrs, key) for name, grid in grids.items()}
    finite = np.concatenate([a[np.isfinite(a)] for a in arrays.values()])  # (n_finite,)
    norm = mcolors.LogNorm(vmin=finite.min(), vmax=finite.max())
    n = len(grids)
    fig, axes = plt.subplots(2, n, figsize=(7.0 * n, 11.0), layout="constrained", squeeze=False,
                             gridspec_kw={"height_ratios": [1.25, 1.0]})
    cmap = plt.get_cmap("viridis_r").with_extremes(bad="#dddddd")  # diverged runs in grey
    image = None
    for ax, (name, arr) in zip(axes[0], arrays.items()):
        image = ax.imshow(np.ma.masked_invalid(arr), cmap=cmap, norm=norm, aspect="auto")  # (n_ranks, n_lrs)
        for i in range(len(ranks)):
            for j in range(len(lrs)):
                text = "div." if not np.isfinite(arr[i, j]) else f"{arr[i, j]:.2f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8.5,
                        color="white" if np.isfinite(arr[i, j]) and norm(arr[i, j]) > 0.55 else "black")
            j_best = lrs.index(best[name][i])
            ax.add_patch(plt.Rectangle((j_best - 0.5, i - 0.5), 1, 1, fill=False, ec="#e15759", lw=2.5))
        ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs], rotation=45)
        ax.set_yticks(range(len(ranks)), [str(r) for r in ranks])
        ax.set_xlabel("learning rate")
        ax.set_ylabel("rank r")
        ax.set_title(f"s = {name}: {label}")
    bar = fig.colorbar(image, ax=list(axes[0]), label=f"{label} (red box: the rank's best lr)", fraction=0.04,
                       pad=0.02)
    plain_log_axis(bar.ax.yaxis)  # 0.1, not 10^-1

    ax_lr, ax_v = axes[1][0], axes[1][min(1, n - 1)]
    for name, b in best.items():
        color = SCALING_COLORS.get(name, "#333333")
        ax_lr.semilogy(ranks, b, "o-", lw=2, ms=6, color=color, label=name)
        at_best = [grids[name][f"{r},{lr:g}"][key] for r, lr in zip(ranks, b)]
        ax_v.semilogy(ranks, at_best, "o-", lw=2, ms=6, color=color, label=name)
    for ax in (ax_lr, ax_v):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.minorticks_off()
        ax.set_xlabel("rank r")
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
    ax_lr.set_yticks(lrs, [f"{lr:g}" for lr in lrs])
    ax_lr.set_ylim(min(lrs) / 1.5, max(lrs) * 1.5)
    ax_lr.set_ylabel("best learning rate")
    ax_lr.set_title("Does the best lr stay put as r grows?")
    plain_log_axis(ax_v.yaxis)
    ax_v.set_ylabel(f"{label} at the rank's best lr")
    ax_v.set_title("Which ranks learn best (each at its best lr)?")
    return fig
