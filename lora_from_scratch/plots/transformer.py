"""Figures of notebook 6, LoRA on the transformer (Hu et al., 2021, section 7).

- ``plot_which_matrices``: the ``which_matrices`` experiment (section 7.1, Table 5): held-out loss
  and exact match of every configuration at the same parameter budget, best first.
- ``plot_rank_sweep``: the ``rank_sweep`` experiment (section 7.2, Table 6): held-out loss and
  exact match against the rank r for each set of adapted matrices.
- ``plot_update_subspaces``: the ``update_subspaces`` experiment: the subspace similarity
  phi(A_8, A_64, i, j) of Wq and Wv (section 7.2, Figure 3) next to two random subspaces, and
  section 7.3's Table 7 (how much of W lies in dW's directions) with the amplification factor.

Host-side drawing only: the numbers come from the experiments' results (``figures/NAME.json``).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from .style import FROZEN, FROZEN_EDGE, TRAINABLE, TRAINABLE_EDGE, plain_log_axis, styled

ATTENTION = "#4e79a7"
MLP = "#59a14f"
BOTH = TRAINABLE
SET_COLORS = {"q": "#4e79a7", "q+v": TRAINABLE, "q+k+v+o": "#e15759", "q+k+v+o+fc+proj": "#59a14f"}
_MLP_TARGETS = {"fc", "proj"}


def _config_color(targets) -> str:
    mlp = set(targets) & _MLP_TARGETS
    if not mlp:
        return ATTENTION
    return MLP if len(mlp) == len(set(targets)) else BOTH


@styled
def plot_which_matrices(result: dict):
    """Two panels from a ``which_matrices`` result: held-out loss and exact match per configuration, best first."""
    configs = result["configs"]
    ranking = result["ranking"]  # which_matrices.run: the configurations by mean held-out loss, best first
    if not ranking:
        raise ValueError("the result holds no configurations")
    fig, (ax_l, ax_e) = plt.subplots(1, 2, figsize=(15, 0.62 * len(ranking) + 2.4), sharey=True)
    y = np.arange(len(ranking))[::-1]  # (n,), best on top
    for yi, k in zip(y, ranking):
        c = configs[k]
        color = _config_color(c["targets"])
        seeds = result["runs"][k][f"{c['best_lr']:g}"]
        losses = [row["held_out_loss"] if row["held_out_loss"] is not None else np.nan for row in seeds]
        scores = [row["exact_match"] for row in seeds]
        ax_l.barh(yi, c["held_out_loss"]["mean"], color=color, alpha=0.75, height=0.7)
        ax_l.plot(losses, np.full(len(losses), yi), "o", color="black", ms=3.5)  # (seeds,) dots at height yi
        ax_e.barh(yi, c["exact_match"]["mean"], color=color, alpha=0.75, height=0.7)
        ax_e.plot(scores, np.full(len(scores), yi), "o", color="black", ms=3.5)  # (seeds,)
    ax_l.set_yticks(y, [f"{configs[k]['label']} (r = {configs[k]['r']})\n{configs[k]['parameters']:,d} parameters "
                        f"({configs[k]['budget_ratio']:.2f} x), lr {configs[k]['best_lr']:g}" for k in ranking],
                    fontsize=9.5)
    ax_l.set_xlabel("held-out loss on 'desc' (lower is better)")
    ax_l.set_title("Same parameter budget, different matrices (dots: seeds)")
    ax_l.grid(alpha=0.3, axis="x")
    ax_e.set_xlim(0, 1)
    ax_e.set_xlabel("exact match, held-out 'desc'")
    ax_e.set_title("Exact match of the same runs")
    ax_e.grid(alpha=0.3, axis="x")
    handles = [plt.Rectangle((0, 0), 1, 1, color=col, alpha=0.75) for col in (ATTENTION, MLP, BOTH)]
    ax_l.legend(handles, ["attention only (Table 5)", "MLP only", "attention + MLP"], frameon=False,
                loc="upper right")
    fig.tight_layout()
    return fig


@styled
def plot_rank_sweep(curves: dict):
    """Two panels: held-out loss and exact match against r (log scale), one line per set of adapted matrices.

    ``curves``: set of matrices ("q+v") -> {"label", "r": ranks, "held_out_loss": [...], "exact_match": [...]}, the
    means at each rank's best learning rate (``experiments.rank_sweep.curves`` makes it from a result), drawn in order.
    """
    if not curves:
        raise ValueError("no curves to draw")
    fig, (ax_l, ax_e) = plt.subplots(1, 2, figsize=(14, 5))
    for k, c in curves.items():
        color = SET_COLORS.get(k, "#333333")
        ax_l.plot(c["r"], c["held_out_loss"], "o-", lw=2, color=color, label=c["label"])
        ax_e.plot(c["r"], c["exact_match"], "o-", lw=2, color=color, label=c["label"])
    ranks = sorted({r for c in curves.values() for r in c["r"]})
    for ax in (ax_l, ax_e):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("rank r (log scale)")
        ax.grid(alpha=0.3, which="both")
    ax_l.set_yscale("log")
    plain_log_axis(ax_l.yaxis)
    ax_l.set_ylabel("held-out loss on 'desc' (log scale, lower is better)")
    ax_l.set_title("Loss at each rank's best learning rate")
    ax_e.set_ylabel("exact match, held-out 'desc'")
    ax_e.set_ylim(0, 1)
    ax_e.set_title("Exact match")
    ax_l.legend(frameon=False, title="adapted matrices")
    fig.tight_layout()
    return fig


def _heatmap(ax, table, title: str, vmax: float = 1.0):
    t = np.asarray(table, dtype=np.float64)  # (I, J)
    im = ax.imshow(t, cmap="magma", vmin=0.0, vmax=vmax, aspect="auto", origin="lower")
    I, J = t.shape
    ax.set_yticks(range(0, I, max(1, I // 8)), [str(i + 1) for i in range(0, I, max(1, I // 8))])
    step_j = max(1, J // 8)
    ax.set_xticks(range(step_j - 1, J, step_j), [str(j + 1) for j in range(step_j - 1, J, step_j)])
    ax.set_title(title, fontsize=11.5)
    return im


@styled
def plot_update_subspaces(result: dict, paper_amplification: dict):
    """Figure 3 (heat maps of phi, Wq and Wv, and random subspaces) above Table 7 and the amplification factor.

    ``result``: an ``update_subspaces`` result; ``paper_amplification``: rank -> the paper's factor on GPT-3
    (``experiments.update_subspaces.PAPER_AMPLIFICATION``), drawn next to ours.
    """
    sim = result["similarity"]
    r1, r2 = sim["pair"]
    matrices = list(sim["mean"])
    fig = plt.figure(figsize=(17, 10), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.0, 1.2])
    axes = top.subplots(1, 2 * len(matrices) + 1, gridspec_kw={"width_ratios": [2.2] * len(matrices)
                                                               + [1.0] * len(matrices) + [2.2]})
    im = None
    for n, m in enumerate(matrices):
        im = _heatmap(axes[n], sim["mean"][m], f"W{m}: φ(A_{r1}, A_{r2}, i, j)")
        axes[n].set_xlabel(f"j (top directions of A_{r2})")
        zoom = np.asarray(sim["mean"][m])[:, :r1]  # (r1, r1)
        _heatmap(axes[len(matrices) + n], zoom, f"W{m}, j ≤ {r1}")
        axes[len(matrices) + n].set_xlabel("j")
    axes[0].set_ylabel(f"i (top directions of A_{r1})")
    _heatmap(axes[-1], sim["random"], f"two random subspaces: max(i, j) / {sim['k']}")
    axes[-1].set_xlabel("j")
    top.colorbar(im, ax=list(axes), shrink=0.9, label="φ (mean over blocks and seeds)")
    top.suptitle(f"Subspace similarity of the learned A at r = {r1} and r = {r2} (LoRA section 7.2, Figure 3)")

    ax_t, ax_a = bottom.subplots(1, 2, gridspec_kw={"width_ratios": [2.3, 1.0]})
    table = result["table7_mean"]
    ranks = sorted(table, key=int)
    kinds = [("dW", "onto dW's top-r directions", TRAINABLE, TRAINABLE_EDGE),
             ("W", "onto W's own top-r", FROZEN, FROZEN_EDGE),
             ("random", "onto random directions", "#dddddd", "#888888")]
    ticks, x = [], 0.0
    for r in ranks:
        for m in matrices:
            row = table[r][m]
            for n, (name, text, color, edge) in enumerate(kinds):
                ax_t.bar(x + 0.27 * (n - 1), row[name], width=0.26, color=color, edgecolor=edge,
                         label=text if (r, m) == (ranks[0], matrices[0]) else None)
            ticks.append((x, f"W{m}, r = {r}\nfactor {row['amplification']:.1f}"))
            x += 1.0
    ax_t.set_yscale("log")
    plain_log_axis(ax_t.yaxis)
    ax_t.set_xticks([p for p, _ in ticks], [t for _, t in ticks], fontsize=10)
    ax_t.set_ylabel("||U^T W V||_F (log scale)")
    ax_t.set_title("How much of W lies in dW's directions (section 7.3, Table 7)")
    ax_t.legend(frameon=False, ncol=3, loc="upper left")
    ax_t.grid(alpha=0.3, axis="y", which="both")
    ax_t.set_ylim(top=ax_t.get_ylim()[1] * 3)

    for m, color in zip(matrices, (ATTENTION, TRAINABLE)):
        ax_a.plot([int(r) for r in ranks], [table[r][m]["amplification"] for r in ranks], "o-", lw=2, color=color,
                  label=f"W{m}, ours")
    ax_a.plot(list(paper_amplification), list(paper_amplification.values()), "s--", color="#555555",
              label="GPT-3 Wq, layer 48 (paper)")
    ax_a.set_xscale("log", base=2)
    ax_a.set_yscale("log")
    plain_log_axis(ax_a.yaxis)
    ax_a.set_xticks([int(r) for r in ranks], ranks)
    ax_a.set_xlabel("rank r")
    ax_a.set_ylabel("||dW||_F / ||U^T W V||_F")
    ax_a.set_title("The amplification factor")
    ax_a.grid(alpha=0.3, which="both")
    ax_a.legend(frameon=False)
    return fig
