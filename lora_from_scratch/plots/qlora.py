"""Figures of notebook 8: QLoRA (Dettmers et al., 2023), section 3 (eq. 5-6) and section 4.

- ``plot_resident_memory``: what LoRA and QLoRA models hold, by kind of array (float W0 or NF4
  codes and constants, biases, adapters, embeddings), for one layer and for the whole model.
- ``plot_qlora_vs_lora``: the ``qlora_vs_lora`` experiment: loss curves of LoRA and QLoRA (same
  r, alpha, lr, batches), exact match on "desc" per seed, and the QLoRA model deployed unmerged,
  merged in float and re-quantized to NF4.

Host-side drawing only: the numbers come from ``experiments.qlora_vs_lora`` and the notebook.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from .init import mean_band
from .style import CODE_COLORS, FROZEN, FROZEN_EDGE, NEUTRAL, TRAINABLE, plain_log_axis, styled

METHOD_COLORS = {"lora": "#4e79a7", "qlora": CODE_COLORS["nf4"]}
METHOD_LABELS = {"lora": "LoRA (float32 W0)", "qlora": "QLoRA (NF4 W0)"}
PART_COLORS = {"float W0": FROZEN, "NF4 codes": CODE_COLORS["nf4"], "NF4 constants": "#f1a6a8",
               "biases of adapted layers": "#bab0ac", "adapters A, B": TRAINABLE,
               "embeddings and layer norms": NEUTRAL}


@styled
def plot_resident_memory(panels: dict, title: str = "What the model holds (memory.resident_bytes)"):
    """One panel of stacked horizontal bars per entry of ``panels``: {panel title: {bar label: {kind: bytes}}}.

    The kinds are those of ``experiments.qlora_vs_lora.resident_breakdown``; each bar is labelled
    with its total and each panel has its own linear scale (one layer, the whole model).
    """
    if not panels or not all(panels.values()):
        raise ValueError("panels must map a title to a non-empty {bar label: {kind: bytes}}")
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 3.6), squeeze=False)
    kinds = list(dict.fromkeys(k for bars in panels.values() for b in bars.values() for k in b))
    for ax, (panel, bars) in zip(axes[0], panels.items()):
        labels = list(bars)
        y = np.arange(len(labels))[::-1]  # (n,) the first label on top
        left = np.zeros(len(labels))  # (n,)
        for kind in kinds:
            widths = np.array([bars[label].get(kind, 0) for label in labels], dtype=np.float64) / 2**10  # (n,) KiB
            ax.barh(y, widths, left=left, color=PART_COLORS.get(kind, "#cccccc"), edgecolor="white", height=0.6,
                    label=kind)
            left += widths
        for yi, total in zip(y, left):
            ax.text(total, yi, f" {total:,.1f} KiB", va="center", fontsize=10.5)
        ax.set_yticks(y, labels)
        ax.set_xlim(0, left.max() * 1.3)
        ax.set_xlabel("KiB held")
        ax.set_title(panel)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(kinds), frameon=False, fontsize=10,
               bbox_to_anchor=(0.5, -0.06))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


@styled
def plot_qlora_vs_lora(result: dict, smooth: int = 10):
    """Three panels from a ``qlora_vs_lora`` result: loss curves, exact match per seed, and the deployment."""
    runs = result["runs"]
    if not runs:
        raise ValueError("the result holds no runs")
    fig, (ax_l, ax_e, ax_d) = plt.subplots(1, 3, figsize=(18, 5.2), gridspec_kw={"width_ratios": [2.0, 1.0, 1.5]})
    methods = list(dict.fromkeys(r["method"] for r in runs))
    for m in methods:
        rows = [r for r in runs if r["method"] == m]
        mean_band(ax_l, [r["loss"] for r in rows], smooth, METHOD_COLORS.get(m, "black"),
                  f"{METHOD_LABELS.get(m, m)}, {len(rows)} seed{'s' if len(rows) > 1 else ''}")
    ax_l.set_yscale("log")
    plain_log_axis(ax_l.yaxis)
    ax_l.set_xlabel("step")
    ax_l.set_ylabel(f"training loss ({smooth}-step average, log scale)")
    ax_l.set_title("Fine-tuning on 'desc': same r, alpha, lr, batches")
    ax_l.grid(alpha=0.3, which="both")
    ax_l.legend(frameon=False)

    for n, m in enumerate(methods):
        scores = [100 * r["exact_match"]["desc"] for r in runs if r["method"] == m]
        ax_e.bar(n, np.mean(scores), color=METHOD_COLORS.get(m, "black"), alpha=0.75, width=0.65)
        ax_e.plot(np.full(len(scores), n), scores, "o", color="black", ms=4)
        ax_e.text(n, np.mean(scores) + 2, f"{np.mean(scores):.1f}%", ha="center", fontsize=10.5)
    ax_e.set_xticks(range(len(methods)), [METHOD_LABELS.get(m, m).split(" (")[0] for m in methods])
    ax_e.set_ylim(0, 105)
    ax_e.set_ylabel("exact match, held-out 'desc' (%)")
    ax_e.set_title("After training (dots: seeds)")
    ax_e.grid(alpha=0.3, axis="y")

    deps = result.get("deployments", [])
    kinds = [("unmerged", "QLoRA\n(adapter unmerged)", METHOD_COLORS["qlora"]),
             ("float", "merged in float\n(float32 Linear)", FROZEN),
             ("requantized", "merged, then\nre-quantized to NF4", FROZEN_EDGE)]
    for n, (key, _label, color) in enumerate(kinds):
        if not deps:
            break
        scores = [100 * d[key]["exact_match"]["desc"] for d in deps]
        ax_d.bar(n, np.mean(scores), color=color, alpha=0.85, width=0.65)
        ax_d.plot(np.full(len(scores), n), scores, "o", color="black", ms=4)
        note = f"{np.mean(scores):.1f}%"
        if key != "unmerged":
            note += f"\nlogits {np.mean([d[key]['logits_rel'] for d in deps]):.0e}"
        ax_d.text(n, np.mean(scores) + 2, note, ha="center", fontsize=10)
    ax_d.set_xticks(range(len(kinds)), [k[1] for k in kinds], fontsize=9.5)
    ax_d.set_ylim(0, 115)
    ax_d.set_ylabel("exact match, held-out 'desc' (%)")
    ax_d.set_title("Deploying the QLoRA model")
    ax_d.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig
