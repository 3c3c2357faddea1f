"""Figures of 4-bit quantization: the NF4 construction, blockwise absmax, and the data types at equal bits.

QLoRA (Dettmers et al., 2023): section 2 "Block-wise k-bit Quantization" (Eq. 1-2:
``plot_blockwise_absmax``), section 3 "4-bit NormalFloat Quantization" (Eq. 4: the levels as
quantiles of N(0, 1), ``plot_nf4_construction``) and the comparison of data types by model quality
at equal bits (Table 2, Figure 3: ``plot_quantized_base``, drawing the result of the experiment
``quantized_base``).

A host-side module that draws: the numbers come from ``quant`` (the code tables, ``quantize_4bit``)
and from the experiment's result; arrays are brought to NumPy before drawing.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np

from ..backend import to_numpy
from ..quant import FP4_CODE, INT4_CODE, NF4_CODE, dequantize_4bit, normal_quantile, quantize_4bit, unpack_nibbles
from ..quant.tables import NF4_OFFSET, float32_linspace
from .style import CODE_COLORS, FROZEN_EDGE, TRAINABLE, styled

GROUPWISE_COLOR = "#b07aa1"  # QA-LoRA's group-wise INT4: purple


def _normal_cdf(z):
    return 0.5 * (1.0 + np.vectorize(math.erf)(np.asarray(z) / math.sqrt(2.0)))  # same shape as z


@styled
def plot_nf4_construction(offset: float = NF4_OFFSET):
    """QLoRA section 3, Eq. 4: the 16 NF4 levels are quantiles of N(0, 1), divided by the largest.

    Left: the normal CDF. Each probability of the two grids (8 evenly spaced from ``offset`` down
    to, but not including, 1/2 for the positive side; 7 for the negative side, mirrored) is read
    across to the curve and down to its quantile: these 15 quantiles and an exact 0 are the
    levels before scaling. Right: the 16 levels after division by the largest quantile, next to
    INT4's evenly spaced ones: NF4 is dense near 0, where normal weights are dense.
    """
    p_pos = float32_linspace(offset, 0.5, 9)[:-1].astype(np.float64)  # (8,) probabilities above 1/2
    p_neg = 1.0 - float32_linspace(offset, 0.5, 8)[:-1].astype(np.float64)  # (7,) below 1/2, mirrored
    z_pos = normal_quantile(p_pos)  # (8,)
    z_neg = normal_quantile(p_neg)  # (7,)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 5.2), gridspec_kw={"width_ratios": [1.35, 1]})
    z = np.linspace(-2.6, 2.6, 400)  # (400,)
    ax.plot(z, _normal_cdf(z), color="black", lw=1.8, label=r"$\Phi(z)$, the N(0, 1) CDF")
    for p, q, color in [(p, q, TRAINABLE) for p, q in zip(p_pos, z_pos)] + [
            (p, q, FROZEN_EDGE) for p, q in zip(p_neg, z_neg)]:
        ax.plot([-2.6, q], [p, p], color=color, lw=0.9, alpha=0.75)
        ax.plot([q, q], [0, p], color=color, lw=0.9, alpha=0.75)
        ax.plot([q], [p], "o", color=color, ms=4.5)
    ax.plot([0], [0.5], "o", color="black", ms=5)
    ax.plot([], [], color=TRAINABLE, label="8 probabilities from offset to 1/2 (positive side)")
    ax.plot([], [], color=FROZEN_EDGE, label="7 probabilities, mirrored (negative side)")
    ax.set_xlim(-2.6, 2.6)
    ax.set_ylim(0, 1)
    ax.set_xlabel("z (standard deviations)")
    ax.set_ylabel("probability")
    ax.set_title(f"Probabilities -> quantiles $\\Phi^{{-1}}(p)$ (offset {offset})")
    ax.legend(loc="upper left", frameon=False, fontsize=9.5)

    for row, (name, levels) in enumerate((("NF4", NF4_CODE), ("INT4", np.unique(INT4_CODE)))):
        color = CODE_COLORS[name.lower()]
        ax2.plot([-1.05, 1.05], [row, row], color="#cccccc", lw=1)
        ax2.plot(np.asarray(levels), np.full(len(levels), row), "|", color=color, ms=26, mew=2.2)
        ax2.text(-1.08, row + 0.28, f"{name}: {len(levels)} levels", color=color, fontsize=11)
    ax2.set_yticks([])
    ax2.set_ylim(-0.6, 1.7)
    ax2.set_xlim(-1.1, 1.1)
    ax2.set_xlabel("level (quantile / largest quantile)")
    ax2.set_title("The code tables in [-1, 1]")
    ax2.spines["left"].set_visible(False)
    fig.tight_layout()
    return fig


@styled
def plot_blockwise_absmax(x, blocksize: int = 8, quant_type: str = "nf4", ax=None):
    """QLoRA section 2, Eq. 1-2: each block of ``blocksize`` values gets its own absmax c and its own grid.

    ``x``: a 1-D array (a few blocks). Per block: the band [-c, c] (dashed), the 16 levels times c
    (faint lines: the values the block can hold), the original values (circles) and their
    dequantized values level[code] * c (diamonds), with the 4-bit code printed under each.
    """
    x = np.asarray(to_numpy(x), dtype=np.float32).reshape(-1)  # (n,)
    q = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    x_hat = to_numpy(dequantize_4bit(q))  # (n,)
    codes = to_numpy(unpack_nibbles(q.packed, x.size))  # (n,)
    absmax = to_numpy(q.absmax)  # (nblocks,)
    from ..quant.tables import CODES

    levels = np.asarray(CODES[quant_type], dtype=np.float64)  # (16,)
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(8.0, 0.42 * x.size), 5.2))
    else:
        fig = ax.figure
    idx = np.arange(x.size)  # (n,)
    lo = float(min(x.min(), -absmax.max())) * 1.25
    for b, c in enumerate(absmax):
        left, right = b * blocksize - 0.5, min(x.size, (b + 1) * blocksize) - 0.5
        ax.axvspan(left, right, color="#f4f4f4" if b % 2 else "white", zorder=0)
        for v in levels * float(c):
            ax.plot([left, right], [v, v], color=CODE_COLORS.get(quant_type, "gray"), lw=0.5, alpha=0.35, zorder=1)
        ax.plot([left, right], [c, c], "--", color="black", lw=1.1, zorder=2)
        ax.plot([left, right], [-c, -c], "--", color="black", lw=1.1, zorder=2)
        ax.text((left + right) / 2, float(c) * 1.04, f"block {b}: c = {float(c):.3f}", ha="center", va="bottom",
                fontsize=10)
    ax.scatter(idx, x, s=60, facecolor="white", edgecolor="black", lw=1.4, zorder=4, label="value x")
    ax.scatter(idx, x_hat, s=34, marker="D", color=CODE_COLORS.get(quant_type, "gray"), zorder=5,
               label=f"dequantized level[code] * c ({quant_type.upper()})")
    for i in idx:
        ax.text(i, lo * 0.93, f"{int(codes[i])}", ha="center", va="bottom", fontsize=9, color="#444444")
    ax.set_ylim(lo, float(absmax.max()) * 1.3)
    ax.set_xlim(-0.9, x.size - 0.5)
    ax.set_xlabel("index (the 4-bit code of each value is printed at the bottom)")
    ax.set_ylabel("value")
    ax.set_title(f"Blockwise absmax quantization: blocks of {blocksize}, one constant c per block, "
                 "16 levels times c")
    ax.legend(loc="upper right", bbox_to_anchor=(1.0, -0.12), ncol=2, frameon=False)
    return fig


def _series(result: dict) -> list[tuple[str, str, str, list]]:
    """(label, color, style, rows sorted by bits): one line per data type with and without DQ, and group-wise."""
    rows = result["formats"]
    out = []
    for qt in ("nf4", "fp4", "int4"):
        for dq in (True, False):
            sel = [r for r in rows if r["format"]["kind"] == "blockwise" and r["format"]["quant_type"] == qt
                   and r["format"]["double_quant"] == dq]
            if sel:
                out.append((f"{qt.upper()}" + (" + DQ" if dq else ""), CODE_COLORS[qt], "-" if dq else "--",
                            sorted(sel, key=lambda r: r["bits"])))
    sel = [r for r in rows if r["format"]["kind"] == "groupwise"]
    if sel:
        out.append(("INT4 group-wise (QA-LoRA)", GROUPWISE_COLOR, ":", sorted(sel, key=lambda r: r["bits"])))
    return out


def _size_label(r: dict) -> str:
    f = r["format"]
    return f"g{f['group_size']}" if f["kind"] == "groupwise" else f"b{f['blocksize']}"


@styled
def plot_quantized_base(result: dict):
    """QLoRA Table 2 / Figure 3 at our scale: the base model with each 4-bit format, against its bits per weight.

    Four panels, x = stored bits per weight (blocksize or group size labelled at the points):
    the weights' relative MSE, the KL divergence of the predictions from float32 (with standard
    errors), the change of the loss per answer token (paired standard errors) and exact match on
    the pre-training tasks (float32 dashed). Solid lines: with double quantization; dashed: without.
    """
    series = _series(result)
    fig, axes = plt.subplots(2, 2, figsize=(14, 9.5), sharex=True)
    (a_mse, a_kl), (a_loss, a_em) = axes
    for name, color, style, rows in series:
        b = [r["bits"] for r in rows]
        marker = "o" if style != "--" else "s"
        face = color if style != "--" else "white"
        kw = {"color": color, "ls": style, "marker": marker, "mfc": face, "mec": color, "ms": 6, "lw": 1.6}
        a_mse.plot(b, [r["weight_rel_mse"] for r in rows], label=name, **kw)
        a_kl.errorbar(b, [r["kl"] for r in rows], yerr=[r["kl_se"] for r in rows], capsize=3, **kw)
        a_loss.errorbar(b, [r["loss_delta"] for r in rows], yerr=[r["loss_delta_se"] for r in rows], capsize=3, **kw)
        a_em.plot(b, [100 * r["exact_match_mean"] for r in rows], **kw)
        if style != "--":
            for r in rows:
                a_mse.annotate(_size_label(r), (r["bits"], r["weight_rel_mse"]), textcoords="offset points",
                               xytext=(4, 5), fontsize=8.5, color=color)
    fl = result["float32"]
    a_loss.axhline(0.0, color="black", lw=1, ls="--", label="float32")
    a_em.axhline(100 * fl["exact_match_mean"], color="black", lw=1, ls="--",
                 label=f"float32 ({100 * fl['exact_match_mean']:.2f}%)")
    a_mse.set_yscale("log")
    a_kl.set_yscale("log")
    a_mse.set_ylabel("weight error: sum (W - W~)^2 / sum W^2")
    a_kl.set_ylabel("KL(float32 || quantized) per answer token")
    a_loss.set_ylabel("loss change per answer token")
    a_em.set_ylabel("exact match, pre-training tasks (%)")
    a_mse.set_title("Weight error")
    a_kl.set_title("How far the predictions move")
    a_loss.set_title(f"Loss (float32: {fl['loss']:.5f})")
    a_em.set_title(f"Exact match ({result['n_rows']} rows)")
    for ax in (a_loss, a_em):
        ax.set_xlabel("stored bits per weight")
    handles, labels = a_mse.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False, fontsize=10)
    a_em.legend(frameon=False, fontsize=9.5, loc="lower right")
    fig.suptitle("The base model's 24 block matrices in 4 bits: NF4 vs FP4 vs INT4 "
                 "(QLoRA Table 2 / Figure 3 at our scale)", fontsize=14)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


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


@styled
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

