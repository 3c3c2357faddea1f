"""Every figure of the tutorial, as a function (the notebooks and ``python -m lora_from_scratch figures``).

Each function names the paper and section it illustrates. Single-panel
functions take an optional matplotlib ``ax`` and draw into it; multi-panel ones
make their own Figure. All return the Figure. ``make_all_figures`` writes the
figures that need no trained model into ``figures/`` with fixed seeds.

Counterparts of the article's figures:

1. ``plot_llm_sizes``                  section 1, model sizes
2. ``plot_transformer_architecture``,  section 3, the GPT block and its six LoRA targets;
   ``plot_attention_heads``            the attention maps of one layer's heads
3. ``plot_lora_diagram``               sections 4-5, h = W0 x + B A x
4. ``plot_lora_impact``                section 6, GPT-3 175B: parameters, memory, checkpoints
5. ``plot_quantization_levels``        section 7, continuous values onto 16 levels
6. ``plot_singular_values``,           section 2, rank and the spectrum;
   ``plot_subspace_similarity``        LoRA paper section 7.2, eq. (4)
7. ``plot_training_curves``            loss and exact match of training runs

A host-side module that draws: the numbers come from the modules that compute them
(``memory.paper``, ``rank``, ``quant``, the model's forward), and arrays are brought to NumPy
(``to_numpy``) before drawing.
"""

from __future__ import annotations

import functools
import os
import sys

import matplotlib

if (sys.platform.startswith("linux") and not os.environ.get("DISPLAY") and not os.environ.get("MPLBACKEND")
        and "ipykernel" not in sys.modules):
    matplotlib.use("Agg")  # no screen: draw into files

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import patches, ticker  # noqa: E402

from .. import memory, rank  # noqa: E402
from ..backend import to_numpy  # noqa: E402
from ..io import atomic_write  # noqa: E402
from ..quant import FP4_CODE, INT4_CODE, NF4_CODE, dequantize_4bit, quantize_4bit  # noqa: E402

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


def _styled(fn):
    """Draw with the projection-friendly style (larger fonts, no top/right spines)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with plt.rc_context(STYLE):
            return fn(*args, **kwargs)

    return wrapper


def _fig_ax(ax, figsize):
    """(figure, axes): the given axes and its figure, or a new figure with one axes."""
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


# ----------------------------------------------------------------------------------------------
# 1. model sizes
# ----------------------------------------------------------------------------------------------

# (name, year, parameters), each as reported by its paper:
# GPT-2: Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (1542M);
# GPT-3: Brown et al. 2020, arXiv 2005.14165 (175B); Gopher: Rae et al. 2021, arXiv 2112.11446 (280B);
# Megatron-Turing NLG: Smith et al. 2022, arXiv 2201.11990 (530B); PaLM: Chowdhery et al. 2022,
# arXiv 2204.02311 (540B); OPT: Zhang et al. 2022, arXiv 2205.01068 (175B); BLOOM: BigScience 2022,
# arXiv 2211.05100 (176B); LLaMA: Touvron et al. 2023, arXiv 2302.13971 (65B).
LLM_SIZES = (
    ("GPT-2", 2019, 1.5e9),
    ("GPT-3", 2020, 175e9),
    ("Gopher", 2021, 280e9),
    ("Megatron-Turing NLG", 2022, 530e9),
    ("PaLM", 2022, 540e9),
    ("OPT", 2022, 175e9),
    ("BLOOM", 2022, 176e9),
    ("LLaMA", 2023, 65e9),
)


def _count_label(n: float, sig: int = 2) -> str:
    """1.5B, 175B, 0.80M: a count with about ``sig`` significant digits (at least the whole part)."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            v = n / div
            return f"{v:.{max(0, sig - len(str(int(v))))}f}{unit}"
    return f"{n:.0f}"


def _bytes_label(n: float) -> str:
    """Decimal units with three significant digits: 349 GB, 37.7 MB."""
    text = memory.format_bytes(n, binary=False, digits=2)
    value, unit = text.split()
    return f"{float(value):.{max(0, 3 - len(str(int(float(value)))))}f} {unit}"


@_styled
def plot_llm_sizes(ax=None, include_ours: bool = True):
    """Why adaptation is expensive: parameter counts of large language models (log scale), ours for scale.

    One horizontal bar per model, in order of publication; the values are the
    papers' own (see ``LLM_SIZES``). Our base model's count comes from
    ``memory.full_parameters`` of the ``"lfs-base"`` preset.
    """
    fig, ax = _fig_ax(ax, (9, 5.2))
    rows = [(f"{name} ({year})", n, False) for name, year, n in LLM_SIZES]
    if include_ours:
        ours = memory.full_parameters(memory.PRESETS["lfs-base"])
        rows.append(("our base model", float(ours), True))
    names = [r[0] for r in rows]
    values = np.array([r[1] for r in rows], dtype=np.float64)  # (n_models,)
    colors = [TRAINABLE if r[2] else FROZEN for r in rows]
    y = np.arange(len(rows))[::-1]  # (n_models,) first model at the top
    ax.barh(y, values, color=colors, edgecolor=[TRAINABLE_EDGE if r[2] else FROZEN_EDGE for r in rows])
    ax.set_xscale("log")
    ax.set_yticks(y, names)
    ax.set_xlim(1e5, 1e13)
    for yi, v in zip(y, values):
        label = f"{v / 1e6:.2f}M" if v < 1e7 else _count_label(v)
        ax.text(v * 1.3, yi, label, va="center", fontsize=11)
    ax.set_xlabel("parameters (log scale)")
    ax.set_title("Parameter counts of large language models")
    ax.grid(axis="x", which="major", alpha=0.3)
    if include_ours:
        ax.text(0.99, 0.02, "each step of the axis is 10x", transform=ax.transAxes, ha="right",
                va="bottom", fontsize=10, color="#555555")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# 2. the transformer and its attention heads
# ----------------------------------------------------------------------------------------------


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


@_styled
def plot_transformer_architecture(ax=None):
    """LoRA section 4.2: the GPT-2 block with the six matrices LoRA adapts highlighted.

    Bottom to top: token + position embeddings, N pre-LN blocks (LayerNorm,
    multi-head causal attention with Wq, Wk, Wv, Wo, residual; LayerNorm,
    MLP fc -> GELU -> proj, residual), a final LayerNorm and the LM head tied
    to the token embedding. Wq, Wk, Wv, Wo, fc, proj are the LoRA targets
    (model.py names them q, k, v, o, fc, proj).
    """
    fig, ax = _fig_ax(ax, (10.5, 14))
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
    _plus(ax, cx, 10.12)
    # residual around attention
    ax.plot([cx, skip_x, skip_x], [2.95, 2.95, 10.12], color="#333333", lw=1.2)
    _arrow(ax, skip_x, 10.12, cx - 0.22, 10.12)
    ax.text(skip_x - 0.12, 6.5, "residual", rotation=90, ha="right", va="center", fontsize=10.5, color="#555555")

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
    _plus(ax, cx, 15.0)
    ax.plot([cx, skip_x, skip_x], [10.5, 10.5, 15.0], color="#333333", lw=1.2)
    _arrow(ax, skip_x, 15.0, cx - 0.22, 15.0)
    ax.text(skip_x - 0.12, 12.75, "residual", rotation=90, ha="right", va="center", fontsize=10.5,
            color="#555555")
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


@_styled
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


# ----------------------------------------------------------------------------------------------
# 3. the LoRA picture
# ----------------------------------------------------------------------------------------------


def _trapezoid(ax, xc, y0, y1, w_bottom, w_top, color, edge):
    pts = [(xc - w_bottom / 2, y0), (xc + w_bottom / 2, y0), (xc + w_top / 2, y1), (xc - w_top / 2, y1)]
    ax.add_patch(patches.Polygon(pts, closed=True, facecolor=color, edgecolor=edge, lw=1.6))


def _bar(ax, xc, y, width, label, color="white"):
    """A vector drawn as a thin bar of the given width, labelled at its left."""
    ax.add_patch(patches.Rectangle((xc - width / 2, y - 0.17), width, 0.34, facecolor=color,
                                   edgecolor="#333333", lw=1.2))
    ax.text(xc - width / 2 - 0.15, y, label, ha="right", va="center", fontsize=13)


@_styled
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


# ----------------------------------------------------------------------------------------------
# 4. the impact on GPT-3
# ----------------------------------------------------------------------------------------------


def _pair_bars(ax, labels, ours, paper, colors, log: bool, fmt):
    x = np.arange(len(labels), dtype=np.float64)  # (n,)
    w = 0.36
    ax.bar(x - w / 2, ours, w, color=colors, edgecolor="#333333", label="our calculator (memory.paper)")
    ax.bar(x + w / 2, paper, w, color=colors, edgecolor="#333333", hatch="//", alpha=0.55,
           label="reported by the LoRA paper")
    if log:
        ax.set_yscale("log")
    for xi, a, b in zip(x, ours, paper):
        for xx, v in ((xi - w / 2, a), (xi + w / 2, b)):
            ax.text(xx, v * (1.25 if log else 1.0) + (0 if log else 0.01 * max(ours + paper)), fmt(v),
                    ha="center", va="bottom", fontsize=10)
    ax.set_xticks(x, labels)


@_styled
def plot_lora_impact(r: int = 4, targets=("q", "v")):
    """LoRA section 4.2 and Table 4: GPT-3 175B, full fine-tuning vs LoRA (r = 4 on Wq and Wv).

    Three panels: trainable parameters (log scale), training memory (weights,
    gradients and Adam moments in fp16, linear scale) and the per-task
    checkpoint (log scale). Solid bars: ``memory.paper``'s calculator; hatched
    bars: the numbers the LoRA paper reports (section 4.2, section 7.1 and
    the abstract). Activations are not in the calculator (see
    ``memory.training_memory``).
    """
    comp = memory.gpt3_comparison(r=r, targets=targets)
    colors = [FROZEN, TRAINABLE]
    labels = ["full\nfine-tuning", f"LoRA\nr={r}, {'+'.join(targets)}"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.4))

    ax = axes[0]
    ours = [comp["full_parameters"][0], comp["lora_parameters"][0]]
    paper = [comp["full_parameters"][1], comp["lora_parameters"][1]]
    _pair_bars(ax, labels, ours, paper, colors, True, lambda v: _count_label(v, 3))
    ax.set_ylim(1e6, 3e13)
    ax.set_ylabel("trainable parameters (log scale)")
    red, red_p = comp["trainable_reduction"]
    ax.set_title(f"Trainable parameters: ÷{red:,.0f}\n(paper: \"10,000 times\")")

    ax = axes[1]
    ours = [comp["vram_full"][0] / 1e9, comp["vram_lora"][0] / 1e9]
    paper = [comp["vram_full"][1] / 1e9, comp["vram_lora"][1] / 1e9]
    _pair_bars(ax, labels, ours, paper, colors, False, lambda v: f"{v:,.0f} GB")
    ax.set_ylim(0, max(ours + paper) * 1.18)
    ax.set_ylabel("training memory (GB)")
    vr, vr_p = comp["vram_reduction"]
    ax.set_title(f"Training memory: ÷{vr:.1f}\n(paper: 1.2 TB → 350 GB, ÷{vr_p:.1f})")
    ax.text(0.5, -0.2, "ours: weights + gradients + 2 Adam moments, fp16; no activations",
            transform=ax.transAxes, ha="center", va="top", fontsize=9.5, color="#555555")

    ax = axes[2]
    ours = [comp["checkpoint_full"][0], comp["checkpoint_lora"][0]]
    paper = [comp["checkpoint_full"][1], comp["checkpoint_lora"][1]]
    _pair_bars(ax, labels, ours, paper, colors, True, _bytes_label)
    ax.set_ylim(1e7, 3e13)
    ax.set_ylabel("checkpoint size, fp16 (bytes, log scale)")
    ratio = comp["checkpoint_full"][0] / comp["checkpoint_lora"][0]
    ax.set_title(f"Checkpoint per task: ÷{ratio:,.0f}\n(paper: 350 GB → 35 MB)")

    axes[0].legend(loc="upper right", frameon=False)
    fig.suptitle("LoRA on GPT-3 175B (Hu et al., 2021)", fontsize=15)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# 5. quantization
# ----------------------------------------------------------------------------------------------

CODE_TITLES = {
    "int4": "INT4: evenly spaced",
    "nf4": "NF4: quantiles of N(0, 1)",
    "fp4": "FP4: 1 sign, 2 exponent, 1 mantissa bit",
}


def _code_tables() -> dict:
    """{"int4", "nf4", "fp4"} -> (16,) float32 levels in [-1, 1], from ``quant``."""
    return {"int4": np.asarray(INT4_CODE), "nf4": np.asarray(NF4_CODE), "fp4": np.asarray(FP4_CODE)}


def quantize_roundtrip(x, quant_type: str, blocksize: int = 64):
    """``x`` quantized to 4 bits block by block and back (absmax scaling, nearest level): NumPy.

    The data of ``plot_quantization_levels``: ``quant.dequantize_4bit(quant.quantize_4bit(x))``
    on float32, without double quantization.
    """
    q = quantize_4bit(np.asarray(x, dtype=np.float32), blocksize=blocksize, quant_type=quant_type)
    return to_numpy(dequantize_4bit(q))  # same shape as x


@_styled
def plot_quantization_levels(n_blocks: int = 512, blocksize: int = 64, n_show: int = 14, seed: int = 0):
    """QLoRA section 2-3: quantization maps continuous values onto 16 levels (INT4, NF4, FP4).

    Top row: normally distributed weights, divided block by block (blocks of
    ``blocksize``) by their largest magnitude so that they lie in [-1, 1], as
    a histogram; each vertical line is one of the 16 entries of the code table
    (INT4 and FP4 hold 0 twice: +0 and -0). NF4 puts its levels where the
    weights are dense, so each level is used about equally often. Bottom:
    ``n_show`` weights of one block and what each 4-bit type stores for them
    (after dequantization), with the mean absolute error over all the weights.
    """
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_blocks, blocksize)).astype(np.float32)  # (n_blocks, blocksize)
    normalized = w / np.abs(w).max(axis=1, keepdims=True)  # (n_blocks, blocksize), in [-1, 1]
    codes = _code_tables()
    fig = plt.figure(figsize=(15, 9.4))
    grid = fig.add_gridspec(2, 3, height_ratios=[1, 1.05], hspace=0.42, wspace=0.18, bottom=0.17)
    errors = {}
    deq = {}
    for col, name in enumerate(("int4", "nf4", "fp4")):
        ax = fig.add_subplot(grid[0, col])
        levels = codes[name]  # (16,)
        ax.hist(normalized.ravel(), bins=121, range=(-1, 1), density=True, color="#cfcfcf",
                edgecolor="none", label="weights / block absmax")
        for v in levels:
            ax.axvline(float(v), color=CODE_COLORS[name], lw=1.4, alpha=0.9)
        deq[name] = quantize_roundtrip(w, name, blocksize)  # (n_blocks, blocksize)
        errors[name] = float(np.abs(deq[name] - w).mean())
        n_distinct = len(np.unique(levels))
        ax.set_title(f"{CODE_TITLES[name]}\n16 codes, {n_distinct} distinct levels", fontsize=12)
        ax.set_xlim(-1.08, 1.08)
        ax.set_yticks([])
        ax.set_xlabel("normalized value")
        if col == 0:
            ax.set_ylabel("density")
    ax = fig.add_subplot(grid[1, :])
    idx = np.arange(n_show)  # (n_show,)
    ax.axhline(0.0, color="#bbbbbb", lw=0.8)
    ax.scatter(idx, w[0, :n_show], s=120, facecolor="white", edgecolor="black", lw=1.6, zorder=3,
               label="original (float32)")
    offsets = {"int4": -0.2, "nf4": 0.0, "fp4": 0.2}
    markers = {"int4": "s", "nf4": "D", "fp4": "^"}
    for name in ("int4", "nf4", "fp4"):
        q = deq[name][0, :n_show]  # (n_show,)
        ax.vlines(idx + offsets[name], w[0, :n_show], q, color=CODE_COLORS[name], lw=1.2, alpha=0.8)
        ax.scatter(idx + offsets[name], q, s=45, marker=markers[name], color=CODE_COLORS[name], zorder=4,
                   label=f"{name.upper()} (mean |error| over all weights {errors[name]:.3f})")
    ax.set_xticks(idx, [str(i) for i in idx])
    ax.set_xlabel(f"weight index within the first block of {blocksize}")
    ax.set_ylabel("value")
    ax.set_title("A few weights and the value their 4-bit code stands for (absmax scaling per block)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.suptitle(f"4-bit quantization: {w.size:,} normally distributed weights onto 16 levels", fontsize=15)
    return fig


# ----------------------------------------------------------------------------------------------
# 6. rank
# ----------------------------------------------------------------------------------------------


@_styled
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


@_styled
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
    fig, ax = _fig_ax(ax, (min(3 + 0.28 * phi.shape[1], 14), min(2.4 + 0.45 * phi.shape[0], 9)))
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


# ----------------------------------------------------------------------------------------------
# 7. training curves
# ----------------------------------------------------------------------------------------------


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (shorter windows at the start)."""
    if window <= 1 or y.size == 0:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))  # (n + 1,)
    n = np.arange(1, y.size + 1)  # (n,)
    lo = np.maximum(0, n - window)  # (n,)
    return (c[n] - c[lo]) / (n - lo)  # (n,)


def _minor_log_label(v, _pos=None) -> str:
    """Label the minor ticks 2, 3 and 5 (x a power of ten) of a log axis in plain numbers."""
    if v <= 0:
        return ""
    mantissa = round(v / 10 ** np.floor(np.log10(v)), 6)
    return f"{v:g}" if mantissa in (2.0, 3.0, 5.0) else ""


@_styled
def plot_training_curves(histories: dict, smooth: int = 25, tasks=None):
    """Training runs side by side: loss (left) and exact match per task (right).

    ``histories``: name -> the dict returned by ``train.train`` (keys "step",
    "loss", "eval" = list of (step, {task: exact_match})). Each run has one
    colour; on the right each task has its own line style. The raw loss is
    drawn faintly, its ``smooth``-step moving average solidly.
    """
    if not isinstance(histories, dict) or not histories:
        raise ValueError("histories must be a non-empty dict: name -> history from train.train")
    fig, (ax_l, ax_e) = plt.subplots(1, 2, figsize=(14, 5.2))
    styles = ["-", "--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 1))]
    prop = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    all_tasks = []
    for h in histories.values():
        for _, scores in h.get("eval", []):
            all_tasks += [t for t in scores if t not in all_tasks]
    tasks = all_tasks if tasks is None else list(tasks)
    for n, (name, h) in enumerate(histories.items()):
        for key in ("step", "loss"):
            if key not in h:
                raise ValueError(f"history {name!r} has no {key!r} entry")
        color = prop[n % len(prop)]
        step = np.asarray(h["step"], dtype=np.float64) + 1  # (n_steps,) 1-based
        loss = np.asarray(h["loss"], dtype=np.float64)  # (n_steps,)
        ax_l.plot(step, loss, color=color, alpha=0.25, lw=0.8)
        ax_l.plot(step, _smooth(loss, smooth), color=color, lw=2.0, label=name)
        ev = h.get("eval", [])
        for t_i, task in enumerate(tasks):
            pts = [(s, sc[task]) for s, sc in ev if task in sc]
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax_e.plot(xs, ys, color=color, ls=styles[t_i % len(styles)], marker="o", ms=4, lw=1.6)
    ax_l.set_yscale("log")
    ax_l.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))  # 0.3, not 3 x 10^-1
    ax_l.yaxis.set_minor_formatter(ticker.FuncFormatter(_minor_log_label))
    ax_l.set_xlabel("step")
    ax_l.set_ylabel("training loss (log scale)")
    ax_l.set_title(f"Loss (faint: per step; solid: {smooth}-step average)")
    ax_l.grid(alpha=0.3)
    ax_l.legend(frameon=False)
    ax_e.set_xlabel("step")
    ax_e.set_ylabel("exact match")
    ax_e.set_ylim(-0.03, 1.03)
    ax_e.set_title("Exact match per task (held-out set)")
    ax_e.grid(alpha=0.3)
    run_handles = [plt.Line2D([], [], color=prop[n % len(prop)], lw=2, label=name)
                   for n, name in enumerate(histories)]
    task_handles = [plt.Line2D([], [], color="#444444", ls=styles[t % len(styles)], lw=1.6, label=task)
                    for t, task in enumerate(tasks)]
    ax_e.legend(handles=run_handles + task_handles, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# 8. all standalone figures
# ----------------------------------------------------------------------------------------------


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


FIGURES = (
    "llm_sizes.png",
    "transformer_architecture.png",
    "lora_diagram.png",
    "lora_impact_gpt3.png",
    "quantization_levels.png",
    "singular_values_example.png",
)


def make_all_figures(out_dir: str = "figures", dpi: int = 130) -> list[str]:
    """Write every figure that needs no trained model into ``out_dir`` (PNG, fixed seeds); return the paths."""
    os.makedirs(out_dir, exist_ok=True)
    mats, labels = example_low_rank_matrices()
    makers = {
        "llm_sizes.png": plot_llm_sizes,
        "transformer_architecture.png": plot_transformer_architecture,
        "lora_diagram.png": plot_lora_diagram,
        "lora_impact_gpt3.png": plot_lora_impact,
        "quantization_levels.png": plot_quantization_levels,
        "singular_values_example.png": lambda: plot_singular_values(mats, labels),
    }
    paths = []
    for name in FIGURES:
        fig = makers[name]()
        path = os.path.join(out_dir, name)
        try:
            with plt.rc_context(STYLE):  # written atomically: the temporary keeps the name's extension (format)
                atomic_write(path, lambda tmp, f=fig: f.savefig(tmp, dpi=dpi, facecolor="white"))
        finally:
            plt.close(fig)
        paths.append(path)
    return paths
