"""Figures of notebook 4: how a LoRA adapter starts (Hu et al., 2021, section 4.1; PiSSA, Meng et al., 2024, section 3).

- ``plot_init_curves``: the ``init_curves`` experiment, loss curves per initialization (mean over
  init seeds, their range shaded), final exact match per run, and how alike the learned updates
  of two random starts are (the LoRA paper's subspace similarity, section 7.2, eq. 4).
- ``plot_symmetry``: B's columns, equal (zero) at the start, stay equal under identical rows of A
  and grow apart under random rows, and what that does to the spectrum of the update s B A.
- ``plot_gradient_share``: the share of a weight gradient that a random row space of A sees.
- ``mean_band``: a mean loss curve over seeds with their min-max range shaded (here and in ``plots.qlora``).

Host-side drawing only: the numbers come from ``experiments.init_curves`` and the notebook.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from .style import FROZEN_EDGE, TRAINABLE, moving_average, plain_log_axis, styled

INIT_COLORS = {"gaussian": "#4e79a7", "kaiming": TRAINABLE, "uniform-1/r": "#59a14f", "pissa": "#e15759"}


def mean_band(ax, losses, smooth: int, color, label: str) -> None:
    """The mean over seeds of the ``smooth``-step averaged loss curves, with their min-max range shaded (2+ seeds).

    ``losses``: one loss curve per seed, all of the same length; steps are numbered from 1.
    """
    curves = np.array([moving_average(np.asarray(loss, dtype=np.float64), smooth) for loss in losses])  # (seeds, T)
    steps = np.arange(1, curves.shape[1] + 1)  # (T,)
    ax.plot(steps, curves.mean(axis=0), color=color, lw=2, label=label)
    if len(losses) > 1:
        ax.fill_between(steps, curves.min(axis=0), curves.max(axis=0), color=color, alpha=0.2, lw=0)


@styled
def plot_init_curves(result: dict, smooth: int = 10):
    """Three panels from an ``init_curves`` result: loss curves, exact match per run, subspace similarity."""
    runs = result["runs"]
    if not runs:
        raise ValueError("the result holds no runs")
    order = [i for i in result.get("settings", {}).get("inits", []) if i in runs] or list(runs)
    runs = {init: runs[init] for init in order}  # the settings' order (the JSON file sorts its keys)
    fig, (ax_l, ax_e, ax_s) = plt.subplots(1, 3, figsize=(17, 5), gridspec_kw={"width_ratios": [2.0, 1.1, 1.5]})
    for init, rows in runs.items():
        mean_band(ax_l, [row["loss"] for row in rows], smooth, INIT_COLORS.get(init, "#333333"),
                  f"{init} ({len(rows)} init seed{'s' if len(rows) > 1 else ''})")
    ax_l.set_yscale("log")
    plain_log_axis(ax_l.yaxis)
    ax_l.set_xlabel("step")
    ax_l.set_ylabel(f"training loss ({smooth}-step average, log scale)")
    ax_l.set_title("Fine-tuning on 'desc': same r, alpha, lr and batches")
    ax_l.grid(alpha=0.3, which="both")
    ax_l.legend(frameon=False)

    names = list(runs)
    for n, init in enumerate(names):
        scores = [row["exact_match"] for row in runs[init]]
        color = INIT_COLORS.get(init, "#333333")
        ax_e.bar(n, np.mean(scores), color=color, alpha=0.75, width=0.7)
        ax_e.plot(np.full(len(scores), n), scores, "o", color="black", ms=4)  # (seeds,) at x = n
    ax_e.set_xticks(range(len(names)), names, rotation=20)
    ax_e.set_ylim(0, 1)
    ax_e.set_ylabel("exact match, held-out 'desc'")
    ax_e.set_title("After training (dots: init seeds)")
    ax_e.grid(alpha=0.3, axis="y")

    sim = result.get("similarity", {})
    sim = {**{k: v for k, v in sim.items() if k == "random subspaces"},
           **{k: v for init in order for k, v in sim.items() if k.startswith(f"{init}:")},
           **{k: v for k, v in sim.items() if k != "random subspaces" and ":" not in k}}
    top = 0.0
    for name, values in sim.items():
        i = np.arange(1, len(values) + 1)  # (r,)
        top = max(top, max(values))
        if name == "random subspaces":
            ax_s.plot(i, values, "--", color=FROZEN_EDGE, lw=2, label="two random subspaces (i / k)")
        elif ":" in name:  # "<init>: two init seeds"
            ax_s.plot(i, values, "o-", color=INIT_COLORS.get(name.split(":")[0], "#333333"), lw=2, ms=4, label=name)
        else:  # two different inits
            ax_s.plot(i, values, "s:", color="#b07aa1", lw=2, ms=4, label=name)
    ax_s.set_ylim(0, max(0.5, 1.15 * top))
    ax_s.set_xlabel("i (top input directions compared)")
    ax_s.set_ylabel("subspace similarity φ(i, i)")
    ax_s.set_title("Learned updates of two starts: alike?")
    ax_s.grid(alpha=0.3)
    ax_s.legend(frameon=False, fontsize=9)
    fig.tight_layout()
    return fig


@styled
def plot_symmetry(watched: dict, spectra: dict, key: str = "B columns"):
    """Left: how far apart B's columns get over training, per run; right: the normalized singular values of s B A.

    ``watched``: run name -> [(step, {key: spread, ...}), ...] (``init_curves.symmetry_watch``);
    ``spectra``: run name -> singular values of the trained update of one layer (descending).
    """
    if not watched or set(watched) != set(spectra):
        raise ValueError("watched and spectra must name the same runs")
    fig, (ax_w, ax_s) = plt.subplots(1, 2, figsize=(13, 4.6))
    colors = [TRAINABLE, "#4e79a7", "#59a14f", "#e15759"]
    for n, (name, seen) in enumerate(watched.items()):
        steps = [step for step, _ in seen]
        spread = [values[key] for _, values in seen]
        ax_w.plot(steps, spread, "o-", color=colors[n % len(colors)], lw=2, ms=4, label=name)
        s = np.asarray(spectra[name], dtype=np.float64)  # (r,)
        floor = np.finfo(np.float64).tiny
        ax_s.semilogy(np.arange(1, s.size + 1), np.maximum(s / s[0], floor), "o-",  # (r,) against (r,)
                      color=colors[n % len(colors)], lw=2, label=name)
    ax_w.set_xlabel("step")
    ax_w.set_ylabel("max_j ||b_j - b_0|| (largest over the layers)")
    ax_w.set_title("B starts at 0: do its columns grow apart?")
    ax_w.grid(alpha=0.3)
    ax_w.legend(frameon=False, title="rows of A")
    ax_s.set_xlabel("i")
    ax_s.set_ylabel("σ_i / σ_1 of the trained s B A")
    ax_s.set_title("Spectrum of the learned update (one layer)")
    ax_s.grid(alpha=0.3, which="both")
    ax_s.legend(frameon=False, title="rows of A")
    fig.tight_layout()
    return fig


@styled
def plot_gradient_share(shares: dict, expected: float, best: float | None = None, ax=None):
    """Histograms of ``gradient_share`` over many random A per kind, with sqrt(r / k) and the best r-dim subspace."""
    fig, ax = (plt.subplots(figsize=(8.5, 4.4)) if ax is None else (ax.figure, ax))
    colors = ["#4e79a7", TRAINABLE, "#59a14f", "#e15759"]
    hi = max(max(v) for v in shares.values())
    hi = max(hi, best or 0.0, expected)
    bins = np.linspace(0, hi * 1.05, 40)  # (40,)
    for n, (name, values) in enumerate(shares.items()):
        ax.hist(values, bins=bins, alpha=0.6, color=colors[n % len(colors)], label=name)
    ax.axvline(expected, color="black", ls="--", lw=1.5, label=f"sqrt(r / k) = {expected:.3f}")
    if best is not None:
        ax.axvline(best, color="#e15759", lw=2, label=f"best r directions: {best:.3f}")
    ax.set_xlim(0, hi * 1.08)
    ax.set_xlabel("||G Q_A|| / ||G||: the share of the weight gradient A's rows see")
    ax.set_ylabel("random draws of A")
    ax.set_title("Any random A sees part of the gradient, never none")
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
