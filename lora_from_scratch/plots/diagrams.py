"""Diagrams of the model and of LoRA: the GPT-2 block, the attention of its heads, h = W0 x + B A x.

- ``plot_transformer_architecture``: the GPT-2 block with the six matrices LoRA adapts (Hu et al.,
  2021, section 4.2);
- ``plot_attention_heads``: the attention probabilities of each head of one layer (Vaswani et al.,
  2017, section 3.2), from the model's own forward;
- ``plot_lora_diagram``: LoRA's Figure 1 (Hu et al., 2021, section 4.1), widths to scale.

Host-side drawing only: the attention maps come from ``GPT.attention_probabilities``.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import patches

from ..backend import to_numpy
from .style import FROZEN, FROZEN_EDGE, NEUTRAL, NEUTRAL_EDGE, TRAINABLE, TRAINABLE_EDGE, fig_ax, styled


def _box(ax, x, y, w, h, text, color=NEUTRAL, edge=NEUTRAL_EDGE, fontsize=11, lw=1.2, **kw):
    """A rounded box centred at (x, y) with a label; returns the patch."""
    patch = patches.FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.12",
                                   facecolor=color, edgecolor=edge, linewidth=lw, **kw)
    ax.add_patch(patch)
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize)
    return patch


def _arrow(ax, x0, y0, x1, y1, color="#333333", lw=1.3, style="-|>"):
    ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                arrowprops=dict(arrowstyle=style, color=color, lw=lw, shrinkA=0, shrinkB=0))


def _plus(ax, x, y, r=0.22):
    ax.add_patch(patches.Circle((x, y), r, facecolor="white", edgecolor="#333333", lw=1.3))
    ax.text(x, y, "+", ha="center", va="center", fontsize=13)


def _residual(ax, cx, skip_x, y_from, y_to, label_y):
    """The residual path: from the main column at ``y_from`` out to ``skip_x``, up, and into a + at ``y_to``."""
    _plus(ax, cx, y_to)
    ax.plot([cx, skip_x, skip_x], [y_from, y_from, y_to], color="#333333", lw=1.2)
    _arrow(ax, skip_x, y_to, cx - 0.22, y_to)
    ax.text(skip_x - 0.12, label_y, "residual", rotation=90, ha="right", va="center", fontsize=10.5, color="#555555")


@styled
def plot_transformer_architecture(ax=None):
    """LoRA section 4.2: the GPT-2 block with the six matrices LoRA adapts highlighted.

    Bottom to top: token + position embeddings, N pre-LN blocks (LayerNorm,
    multi-head causal attention with Wq, Wk, Wv, Wo, residual; LayerNorm,
    MLP fc -> GELU -> proj, residual), a final LayerNorm and the LM head tied
    to the token embedding. Wq, Wk, Wv, Wo, fc, proj are the LoRA targets
    (model.py names them q, k, v, o, fc, proj).
    """
    fig, ax = fig_ax(ax, (10.5, 14))
    ax.set_xlim(0, 14.2)
    ax.set_ylim(-0.5, 20.2)
    ax.set_aspect("equal")
    ax.axis("off")
    cx, w = 5.6, 6.6  # centre line and width of the main column
    lora = dict(color=TRAINABLE, edge=TRAINABLE_EDGE, lw=1.8, fontsize=12)
    left = cx - w / 2 - 1.3  # left edge of the block frame
    skip_x = left + 0.75  # x of the residual paths

    ax.text(cx, 0.0, "token ids (B, T)", ha="center", va="center", fontsize=12)
    _arrow(ax, cx, 0.25, cx, 0.75)
    _box(ax, cx, 1.3, w, 1.0, "token embedding wte (V x C)\n+ position embedding wpe (T x C)")
    _arrow(ax, cx, 1.8, cx, 3.2)

    # the repeated block
    frame = patches.FancyBboxPatch((left, 2.5), cx + w / 2 + 0.5 - left, 13.15,
                                   boxstyle="round,pad=0.02,rounding_size=0.3",
                                   facecolor="#f7f7f7", edgecolor="#999999", lw=1.2, ls="--")
    ax.add_patch(frame)
    ax.text(cx + w / 2 + 0.7, 15.3, "x N blocks", ha="left", va="center", fontsize=13, fontweight="bold")

    # attention sub-layer
    _box(ax, cx, 3.5, 3.0, 0.6, "LayerNorm ln_1")
    _arrow(ax, cx, 3.8, cx, 4.45)
    att = patches.FancyBboxPatch((cx - w / 2, 4.45), w, 5.0, boxstyle="round,pad=0.02,rounding_size=0.2",
                                 facecolor="#eef3f8", edgecolor=FROZEN_EDGE, lw=1.0)
    ax.add_patch(att)
    ax.text(cx - w / 2 + 0.2, 9.15, "multi-head causal self-attention", ha="left", va="center", fontsize=11,
            style="italic", color=FROZEN_EDGE)
    for dx, name in ((-2.1, "Wq"), (0.0, "Wk"), (2.1, "Wv")):
        _arrow(ax, cx, 4.45, cx + dx, 4.85, lw=1.0)
        _box(ax, cx + dx, 5.2, 1.4, 0.7, name, **lora)
        _arrow(ax, cx + dx, 5.55, cx + 0.45 * dx, 6.15, lw=1.0)
    _box(ax, cx, 6.85, w - 0.5, 1.3, "for each head h = 1..H:\nsoftmax(Q Kᵀ / √d_h + causal mask) V,\n"
         "then concatenate the heads", color="white", fontsize=11)
    _arrow(ax, cx, 7.5, cx, 7.85)
    _box(ax, cx, 8.2, 1.4, 0.7, "Wo", **lora)
    _arrow(ax, cx, 8.55, cx, 9.9)
    _residual(ax, cx, skip_x, 2.95, 10.12, 6.5)  # around attention

    # MLP sub-layer
    _arrow(ax, cx, 10.34, cx, 10.75)
    _box(ax, cx, 11.05, 3.0, 0.6, "LayerNorm ln_2")
    _arrow(ax, cx, 11.35, cx, 11.75)
    _box(ax, cx, 12.1, 3.0, 0.7, "fc  (C → 4C)", **lora)
    _arrow(ax, cx, 12.45, cx, 12.75)
    _box(ax, cx, 13.0, 1.8, 0.5, "GELU")
    _arrow(ax, cx, 13.25, cx, 13.55)
    _box(ax, cx, 13.9, 3.0, 0.7, "proj  (4C → C)", **lora)
    _arrow(ax, cx, 14.25, cx, 14.78)
    _residual(ax, cx, skip_x, 10.5, 15.0, 12.75)  # around the MLP
    ax.text(cx + 1.75, 13.0, "MLP", ha="left", va="center", fontsize=11, style="italic", color=FROZEN_EDGE)

    # head
    _arrow(ax, cx, 15.22, cx, 16.3)
    _box(ax, cx, 16.65, 3.0, 0.6, "LayerNorm ln_f")
    _arrow(ax, cx, 16.95, cx, 17.5)
    _box(ax, cx, 17.95, w, 0.9, "LM head: x wteᵀ\n(tied to the token embedding)")
    _arrow(ax, cx, 18.4, cx, 18.95)
    ax.text(cx, 19.25, "logits (B, T, V) → next-token probabilities", ha="center", va="center", fontsize=12)

    # legend and shapes, in the right-hand column
    handles = [patches.Patch(facecolor=TRAINABLE, edgecolor=TRAINABLE_EDGE,
                             label="LoRA target:\nW0 frozen, B A trained"),
               patches.Patch(facecolor=NEUTRAL, edgecolor=NEUTRAL_EDGE, label="other layers")]
    ax.legend(handles=handles, loc="center", bbox_to_anchor=(12.0, 11.6), bbox_transform=ax.transData,
              frameon=False, fontsize=11)
    ax.text(12.0, 7.0, "shapes (out x in)\n\nWq, Wk, Wv, Wo:\nC x C\n\nfc: 4C x C\nproj: C x 4C",
            ha="center", va="center", fontsize=11,
            bbox=dict(boxstyle="round,pad=0.5", facecolor="white", edgecolor="#bbbbbb"))
    ax.set_title("GPT-2 architecture: where LoRA goes", fontsize=15)
    fig.tight_layout()
    return fig


@styled
def plot_attention_heads(model, idx, layer: int = 0, tokens=None, max_cols: int = 4):
    """Vaswani et al. (2017), section 3.2: the attention map of each head of one layer, for one input.

    ``idx`` (B, T) token ids (the first row is shown). ``tokens``: labels for
    the T positions; by default the characters of ``data.decode`` when the
    model uses the package's vocabulary, else the ids. Row = the position that
    attends (query), column = the position attended to (key); the causal mask
    leaves the upper triangle empty.
    """
    from .. import data

    if getattr(idx, "ndim", None) != 2:
        raise ValueError(f"idx must have shape (B, T); got shape {tuple(getattr(idx, 'shape', ()))}")
    maps = to_numpy(model.attention_probabilities(idx, layer)[0]).astype(np.float64)  # (H, T, T)
    H, T, _ = maps.shape
    if tokens is None:
        ids = to_numpy(idx[0]).astype(np.int64)  # (T,)
        if model.config.vocab_size == data.VOCAB_SIZE:
            tokens = list(data.decode(ids))
        else:
            tokens = [str(i) for i in ids.tolist()]
    tokens = list(tokens)
    if len(tokens) != T:
        raise ValueError(f"tokens has {len(tokens)} labels for {T} positions")
    cols = min(H, max_cols)
    rows = -(-H // cols)
    size = 1.4 + 0.16 * T
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size + 1.0, rows * size + 0.9), squeeze=False,
                             layout="constrained")
    im = None
    for h in range(rows * cols):
        ax = axes[h // cols][h % cols]
        if h >= H:
            ax.axis("off")
            continue
        masked = np.ma.masked_where(np.triu(np.ones((T, T), bool), k=1), maps[h])  # (T, T), future hidden
        im = ax.imshow(masked, cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"head {h}")
        ax.set_xticks(range(T), tokens, fontsize=9)
        ax.set_yticks(range(T), tokens, fontsize=9)
        ax.tick_params(length=0)
        for s in ax.spines.values():
            s.set_visible(False)
        if h % cols == 0:
            ax.set_ylabel("query position")
        if h // cols == rows - 1:
            ax.set_xlabel("key position")
    fig.suptitle(f"Attention probabilities of block {layer % len(model.blocks)} "
                 f"(row t: how position t spreads its attention)")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.85, label="probability")
    return fig


def _trapezoid(ax, xc, y0, y1, w_bottom, w_top, color, edge):
    pts = [(xc - w_bottom / 2, y0), (xc + w_bottom / 2, y0), (xc + w_top / 2, y1), (xc - w_top / 2, y1)]
    ax.add_patch(patches.Polygon(pts, closed=True, facecolor=color, edgecolor=edge, lw=1.6))


def _bar(ax, xc, y, width, label, color="white"):
    """A vector drawn as a thin bar of the given width, labelled at its left."""
    ax.add_patch(patches.Rectangle((xc - width / 2, y - 0.17), width, 0.34, facecolor=color,
                                   edgecolor="#333333", lw=1.2))
    ax.text(xc - width / 2 - 0.15, y, label, ha="right", va="center", fontsize=13)


@styled
def plot_lora_diagram(d: int = 64, k: int = 48, r: int = 4):
    """LoRA section 4.1, Figure 1: h = W0 x + B A x with W0 (d x k) frozen, B (d x r) and A (r x k) trained.

    Left: the forward pass in the style of the LoRA paper's Figure 1, widths
    proportional to the dimensions (x has k entries, h has d, the bottleneck
    r). Right: the three matrices drawn to scale, with their parameter counts:
    the adapter stores r (d + k) numbers instead of d k. B starts at zero, so
    B A = 0 and the adapted model is the pretrained one at step 0; A starts
    random (Gaussian), so the r directions differ.
    """
    for name, v in (("d", d), ("k", k), ("r", r)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive integer; got {v!r}")
    if r > min(d, k):
        raise ValueError(f"r={r} must not exceed min(d, k)={min(d, k)}")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 6.6), gridspec_kw={"width_ratios": [1.05, 1]})

    # ---- left: the forward pass
    ax.set_xlim(-0.6, 11.6)
    ax.set_ylim(-0.7, 9.3)
    ax.set_aspect("equal")
    ax.axis("off")
    unit = 3.6 / max(d, k)  # data units per dimension (widths to scale)
    wk, wd, wr = k * unit, d * unit, max(r * unit, 0.12)
    xw, xa, xm = 2.4, 6.9, 4.65  # centres of the frozen path, the trainable path, and x / h
    # input and output
    _bar(ax, xm, 0.0, wk, "$x$")
    ax.text(xm + wk / 2 + 0.15, 0.0, f"k = {k}", ha="left", va="center", fontsize=11, color="#555555")
    _bar(ax, xm, 8.7, wd, "$h$")
    ax.text(xm + wd / 2 + 0.15, 8.7, f"d = {d}", ha="left", va="center", fontsize=11, color="#555555")
    # frozen path
    _arrow(ax, xm, 0.2, xw, 1.05)
    _trapezoid(ax, xw, 1.1, 5.9, wk, wd, FROZEN, FROZEN_EDGE)
    ax.text(xw, 3.9, "pretrained\nweights", ha="center", va="center", fontsize=13)
    ax.text(xw, 2.95, r"$W_0 \in \mathbb{R}^{d \times k}$", ha="center", va="center", fontsize=15)
    ax.text(xw, 2.0, "frozen", ha="center", va="center", fontsize=13, fontweight="bold", color=FROZEN_EDGE)
    _arrow(ax, xw, 5.95, xm - 0.2, 7.52)
    # trainable path
    _arrow(ax, xm, 0.2, xa, 1.05)
    _trapezoid(ax, xa, 1.1, 3.3, wk, wr, TRAINABLE, TRAINABLE_EDGE)
    ax.text(xa + wk / 2 + 0.1, 1.75, r"$A \in \mathbb{R}^{r \times k}$" + "\nA ~ random\nN(0, σ²)",
            ha="left", va="center", fontsize=12.5)
    _trapezoid(ax, xa, 3.8, 5.9, wr, wd, TRAINABLE, TRAINABLE_EDGE)
    ax.text(xa + wd / 2 + 0.1, 5.15, r"$B \in \mathbb{R}^{d \times r}$" + "\nB = 0 at init",
            ha="left", va="center", fontsize=12.5)
    ax.text(xa + 0.3, 3.55, f"r = {r}", ha="left", va="center", fontsize=11, color="#555555")
    ax.text(xa - 0.45, 3.55, "trainable", ha="right", va="center", fontsize=13, color=TRAINABLE_EDGE,
            fontweight="bold")
    _arrow(ax, xa, 5.95, xm + 0.2, 7.52)
    ax.text(xa - 0.55, 6.9, r"$\times\ \alpha / r$", ha="left", va="center", fontsize=13)
    _plus(ax, xm, 7.75, r=0.25)
    _arrow(ax, xm, 8.0, xm, 8.5)
    ax.set_title(r"$h = W_0\,x + \frac{\alpha}{r}\,B A\,x$", fontsize=17)

    # ---- right: the matrices to scale
    ax2.axis("off")
    ax2.set_aspect("equal")
    gap = 0.35 * max(d, k)
    x0 = 0.0
    ax2.add_patch(patches.Rectangle((x0, 0), k, d, facecolor=FROZEN, edgecolor=FROZEN_EDGE, lw=1.6))
    ax2.text(x0 + k / 2, d / 2, f"$W_0$\n{d} × {k}", ha="center", va="center", fontsize=14)
    ax2.text(x0 + k / 2, -0.08 * d, f"frozen\n{d * k:,} numbers", ha="center", va="top", fontsize=12)
    xp = x0 + k + gap / 2
    ax2.text(xp, d / 2, "+", ha="center", va="center", fontsize=24)
    xb = x0 + k + gap
    ax2.add_patch(patches.Rectangle((xb, 0), r, d, facecolor=TRAINABLE, edgecolor=TRAINABLE_EDGE, lw=1.6))
    ax2.text(xb + r / 2, -0.08 * d, f"$B$\n{d} × {r}", ha="center", va="top", fontsize=12)
    xa2 = xb + r + 0.12 * max(d, k)
    ax2.text((xb + r + xa2) / 2, d - r / 2, "×", ha="center", va="center", fontsize=18)
    ax2.add_patch(patches.Rectangle((xa2, d - r), k, r, facecolor=TRAINABLE, edgecolor=TRAINABLE_EDGE, lw=1.6))
    ax2.text(xa2 + k / 2, d - r - 0.04 * d, f"$A$   {r} × {k}", ha="center", va="top", fontsize=12)
    n_adapter = r * (d + k)
    ax2.text(xa2 + k / 2, d / 2 - 0.08 * d,
             f"trainable\nr (d + k) = {n_adapter:,}\nnumbers\n= {n_adapter / (d * k):.1%} of W0\n\n"
             f"their product B A:\n{d} × {k}, rank ≤ {r}",
             ha="center", va="center", fontsize=12, color=TRAINABLE_EDGE)
    ax2.set_xlim(-0.05 * k, xa2 + k * 1.05)
    ax2.set_ylim(-0.4 * d, 1.08 * d)
    ax2.set_title(f"the same matrices to scale (d = {d}, k = {k}, r = {r})", fontsize=13)
    fig.tight_layout()
    return fig

