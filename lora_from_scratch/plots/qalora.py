"""Figures of notebook 9: QA-LoRA (Xu et al., 2023), section 3.3, Table 1 and the group-size ablation of section 4.

- ``plot_groupwise_row``: one row of a weight quantized group-wise: per group its range, its
  2^N levels scale * (q - zero) and each weight's code.
- ``plot_pooled_update``: LoRA's update s B A next to QA-LoRA's, constant on each (row, group) block.
- ``plot_qalora_bits``: the ``qalora_bits`` experiment: exact match trained vs deployed at 4/3/2 bits,
  the logits' change at deployment, the pre-training tasks and the loss curves.
- ``plot_qalora_group_size``: the ``qalora_group_size`` experiment: deployed exact match against the
  group size (and the stored bits per weight), per bit width.

Host-side drawing only: the numbers come from ``experiments.qalora_bits``, ``experiments.qalora_group_size``,
``quant.groupwise`` and the notebook.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from ..backend import to_numpy
from ..methods import NAMES
from ..quant.groupwise import dequantize_groupwise, quantize_groupwise
from .style import CODE_COLORS, FROZEN_EDGE, moving_average, plain_log_axis, styled

METHOD_COLORS = {"qlora": CODE_COLORS["nf4"], "qalora": "#76b7b2"}
METHOD_LABELS = {m: NAMES[m] for m in ("qlora", "qalora")}
BITS_COLORS = {4: "#4e79a7", 3: "#f28e2b", 2: "#b07aa1"}


@styled
def plot_groupwise_row(w, bits: int = 2, group_size: int = 8, ax=None):
    """QA-LoRA section 3.3: one row ``w`` (n,) quantized with one (scale, zero) per group of ``group_size`` values.

    Per group: the 2^bits levels scale * (q - zero) (faint lines), the weights (circles), their
    dequantized values (diamonds) and the code of each weight; scale and zero are written on top.
    """
    w = np.asarray(to_numpy(w), dtype=np.float32).reshape(1, -1)  # (1, n)
    q = quantize_groupwise(w, bits=bits, group_size=group_size)
    w_hat = to_numpy(dequantize_groupwise(q))[0]  # (n,)
    codes, scales, zeros = to_numpy(q.codes)[0], to_numpy(q.scales)[0], to_numpy(q.zeros)[0]  # (n,), (G,), (G,)
    n = w.shape[1]
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(9.0, 0.38 * n), 5.0))
    else:
        fig = ax.figure
    color = BITS_COLORS.get(bits, "#4e79a7")
    lo = min(float(w.min()), float(w_hat.min()))
    hi = max(float(w.max()), float(w_hat.max()))
    pad = 0.25 * (hi - lo)
    for g, (sc, z) in enumerate(zip(scales, zeros)):
        left, right = g * group_size - 0.5, (g + 1) * group_size - 0.5
        ax.axvspan(left, right, color="#f4f4f4" if g % 2 else "white", zorder=0)
        for level in sc * (np.arange(2**bits) - z):  # (2^bits,) what this group can hold
            ax.plot([left, right], [level, level], color=color, lw=0.8, alpha=0.45, zorder=1)
        ax.text((left + right) / 2, hi + 0.55 * pad, f"scale {sc:.4f}\nzero {z:g}", ha="center", va="bottom",
                fontsize=9)
    idx = np.arange(n)  # (n,)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.scatter(idx, w[0], s=55, facecolor="white", edgecolor="black", lw=1.3, zorder=4, label="weight w")
    ax.scatter(idx, w_hat, s=30, marker="D", color=color, zorder=5, label="dequantized scale * (q - zero)")
    for i in idx:
        ax.text(i, lo - 0.75 * pad, f"{int(codes[i])}", ha="center", va="bottom", fontsize=9, color="#444444")
    ax.text(-0.7, lo - 0.75 * pad, "q:", ha="right", va="bottom", fontsize=9, color="#444444")
    ax.set_ylim(lo - pad, hi + 1.6 * pad)
    ax.set_xlim(-1.0, n - 0.5)
    ax.set_xlabel("input channel")
    ax.set_ylabel("weight")
    ax.set_title(f"Group-wise INT{bits}: groups of {group_size} channels, each its own scale and zero "
                 f"({2**bits} levels)")
    ax.legend(loc="upper right", bbox_to_anchor=(1.0, -0.13), ncol=2, frameon=False)
    return fig


@styled
def plot_pooled_update(lora_update, qalora_update, group_size: int, rows: int = 16, cols: int = 64):
    """Side by side, the top-left ``rows`` x ``cols`` corner of LoRA's s B A and of QA-LoRA's pooled update.

    Both (out, in) arrays come from ``layer.delta_weight()``; QA-LoRA's is constant on each block of
    one row and ``group_size`` channels, which the dashed lines mark.
    """
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.4))
    for ax, (title, u) in zip(axes, (("LoRA: s B A, A of shape (r, in)", lora_update),
                                     (f"QA-LoRA: A of shape (r, in / {group_size}) on the group means",
                                      qalora_update))):
        u = to_numpy(u)[:rows, :cols]  # (rows, cols)
        v = float(np.abs(u).max()) or 1.0
        im = ax.imshow(u, cmap="RdBu_r", vmin=-v, vmax=v, aspect="auto", interpolation="nearest")
        for x in np.arange(group_size, cols, group_size) - 0.5:
            ax.axvline(x, color="black", lw=1.0, ls="--")
        ax.set_title(title)
        ax.set_xlabel(f"input channel (dashed: groups of {group_size})")
        ax.set_ylabel("output row")
        fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    return fig


@styled
def plot_qalora_bits(data: dict, smooth: int = 20):
    """Four panels (QA-LoRA Table 1 at our scale) from ``experiments.qalora_bits.figure_data(result)``.

    ``data``: ``bits`` (widest first); per method, ``desc[method][stage]`` and ``pretrain[method]`` (deployed) the
    per-seed exact match in % at each width, ``logits_rel[method]`` the per-seed logits' change at deployment;
    ``pretrain_base`` (the base model quantized so, %) and ``pretrain_float`` (float32, %); ``curves`` (loss curves,
    one every ``curve_stride`` steps). Bars are the means over seeds, dots the seeds.
    """
    bits = data["bits"]
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    (ax_d, ax_r), (ax_p, ax_c) = axes
    width = 0.2
    bars = [("qlora", "trained", "QLoRA trained (NF4, adapter unmerged)", 0.45, None),
            ("qlora", "deployed", "QLoRA deployed (merged, re-quantized INT-N)", 1.0, None),
            ("qalora", "trained", "QA-LoRA trained (INT-N, adapter unmerged)", 0.45, None),
            ("qalora", "deployed", "QA-LoRA deployed (merged into the zeros)", 1.0, "//")]
    for n in range(len(bits)):
        for k, (method, stage, label, alpha, hatch) in enumerate(bars):
            vals = data["desc"][method][stage][n]
            x = n + (k - 1.5) * width
            ax_d.bar(x, np.mean(vals), width * 0.92, color=METHOD_COLORS[method], alpha=alpha, hatch=hatch,
                     edgecolor="white", label=label if n == 0 else None)
            ax_d.plot(np.full(len(vals), x), vals, "o", color="black", ms=3)
            ax_d.text(x, np.mean(vals) + 1.5, f"{np.mean(vals):.0f}", ha="center", fontsize=9)
    ax_d.set_xticks(range(len(bits)), [f"INT{b}" for b in bits])
    ax_d.set_ylim(0, 132)
    ax_d.set_yticks(range(0, 101, 20))
    ax_d.set_ylabel("exact match, held-out 'desc' (%)")
    ax_d.set_title("Trained vs deployed (dots: seeds)")
    ax_d.legend(frameon=False, fontsize=8.5, loc="upper center", ncol=2)
    ax_d.grid(alpha=0.3, axis="y")

    for method in ("qlora", "qalora"):
        vals = [np.mean(v) for v in data["logits_rel"][method]]
        ax_r.plot(range(len(bits)), vals, "o-", color=METHOD_COLORS[method], lw=2, ms=7,
                  label=f"{METHOD_LABELS[method]}: deployed vs trained")
    ax_r.set_yscale("log")
    ax_r.set_xticks(range(len(bits)), [f"INT{b}" for b in bits])
    ax_r.set_ylabel("||logits deployed - trained|| / ||logits trained||")
    ax_r.set_title("What the deployment changes")
    ax_r.legend(frameon=False)
    ax_r.grid(alpha=0.3, which="both")

    for k, method in enumerate(("qlora", "qalora")):
        vals = [np.mean(v) for v in data["pretrain"][method]]
        ax_p.bar(np.arange(len(bits)) + (k - 1) * 0.27, vals, 0.25, color=METHOD_COLORS[method],
                 label=f"{METHOD_LABELS[method]} deployed, after fine-tuning on 'desc'")
    ax_p.bar(np.arange(len(bits)) + 0.27, data["pretrain_base"], 0.25, color=FROZEN_EDGE, alpha=0.6,
             label="the base model quantized so, before fine-tuning")
    ax_p.axhline(data["pretrain_float"], color="black", ls="--", lw=1, label="float32 base")
    ax_p.set_xticks(range(len(bits)), [f"INT{b}" for b in bits])
    ax_p.set_ylim(0, 140)
    ax_p.set_yticks(range(0, 101, 20))
    ax_p.set_ylabel("exact match, pre-training tasks (%)")
    ax_p.set_title("The four pre-training tasks")
    ax_p.legend(frameon=False, fontsize=9, loc="upper left", ncol=2)
    ax_p.grid(alpha=0.3, axis="y")

    stride = data["curve_stride"]
    curves = data["curves"]
    for c in curves:
        loss = moving_average(np.asarray(c["loss"], dtype=np.float64), max(1, smooth // stride))  # (T,) recorded steps
        steps = np.arange(loss.size) * stride + 1  # (T,) the recorded steps
        if c["method"] == "qlora":
            ax_c.plot(steps, loss, color=METHOD_COLORS["qlora"], lw=1.6, alpha=0.8,
                      label="QLoRA (NF4)" if c["seed"] == curves[0]["seed"] else None)
        else:
            ax_c.plot(steps, loss, color=BITS_COLORS.get(c["bits"], "gray"), lw=1.6, alpha=0.8,
                      label=f"QA-LoRA INT{c['bits']}" if c["seed"] == curves[0]["seed"] else None)
    ax_c.set_yscale("log")
    plain_log_axis(ax_c.yaxis)
    ax_c.set_xlabel("step")
    ax_c.set_ylabel(f"training loss ({smooth}-step average)")
    ax_c.set_title("Training curves (all seeds)")
    ax_c.legend(frameon=False, fontsize=9)
    ax_c.grid(alpha=0.3, which="both")
    fig.suptitle("QLoRA re-quantized vs QA-LoRA merged at INT4 / INT3 / INT2 (QA-LoRA Table 1 at our scale)",
                 fontsize=14)
    fig.tight_layout()
    return fig


@styled
def plot_qalora_group_size(data: dict):
    """Per bit width, deployed exact match on "desc" against the group size, and the stored bits per weight.

    ``data`` (``experiments.qalora_group_size.figure_data(result)``): ``bits``, ``group_sizes``, ``qlora_trained``
    (QLoRA's trained exact match, %), ``deployed[method][bits]`` (the mean deployed exact match in % at each group
    size), ``lr_checks`` (single runs at another learning rate: bits, group_size, lr, desc in %) and
    ``deployed_bits[bits]`` (stored bits per weight at each group size).
    """
    bits, sizes = data["bits"], data["group_sizes"]
    fig, axes = plt.subplots(1, len(bits) + 1, figsize=(6.2 * (len(bits) + 1), 5.0), squeeze=False)
    axes = axes[0]
    x = np.arange(len(sizes))  # (G,)
    for ax, b in zip(axes, bits):
        q_tr = data["qlora_trained"]
        ax.axhline(q_tr, color=METHOD_COLORS["qlora"], ls="--", lw=1.3, label="QLoRA trained (NF4, unmerged)")
        lowest = q_tr
        for method, label, dy in (("qlora", "QLoRA deployed (re-quantized)", -15),
                                  ("qalora", "QA-LoRA deployed (= trained)", 7)):
            vals = data["deployed"][method][b]
            lowest = min(lowest, *vals)
            ax.plot(x, vals, "o-", color=METHOD_COLORS[method], lw=2.2, ms=7, label=label)
            for xi, v in zip(x, vals):
                ax.annotate(f"{v:.0f}", (xi, v), textcoords="offset points", xytext=(0, dy), ha="center", fontsize=9.5,
                            color=METHOD_COLORS[method])
        for c in data["lr_checks"]:
            if c["bits"] == b:
                v = c["desc"]
                ax.plot(sizes.index(c["group_size"]), v, "*", ms=15, mfc="white", mec=METHOD_COLORS["qalora"],
                        mew=2, label=f"QA-LoRA at lr {c['lr']:g}")
                ax.annotate(f"{v:.0f}", (sizes.index(c["group_size"]), v), textcoords="offset points", xytext=(12, -3),
                            fontsize=9.5, color=METHOD_COLORS["qalora"])
                lowest = min(lowest, v)
        ax.set_xticks(x, [str(g) for g in sizes])
        ax.set_xlabel("group size (input channels per scale and zero)")
        ax.set_ylim(max(0.0, lowest - 25), 104)
        ax.set_ylabel("exact match, held-out 'desc' (%)")
        ax.set_title(f"INT{b}")
        ax.grid(alpha=0.3)
        ax.legend(frameon=False, fontsize=9, loc="lower left")
    ax = axes[-1]
    for b in bits:
        ax.plot(x, data["deployed_bits"][b], "s-", color=BITS_COLORS.get(b, "gray"), lw=2, label=f"INT{b}")
    ax.set_xticks(x, [str(g) for g in sizes])
    ax.set_xlabel("group size")
    ax.set_ylabel("stored bits per weight (float16 scale and zero)")
    ax.set_title("The cost of small groups")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    fig.suptitle("The group size at low bit widths (QA-LoRA section 4, the group-size ablation, at our scale)",
                 fontsize=14)
    fig.tight_layout()
    return fig
