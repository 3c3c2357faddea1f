"""Why adaptation is expensive: the sizes of large language models and LoRA's savings on GPT-3 175B.

- ``plot_llm_sizes``: parameter counts of large language models, each as its paper reports it,
  with our base model for scale (Hu et al., 2021, section 1);
- ``plot_lora_impact``: LoRA on GPT-3 175B (Hu et al., 2021, section 4.2 and Table 4): trainable
  parameters, training memory and the checkpoint per task, the calculator (``memory.paper``)
  next to the paper's figures.

Host-side drawing only: the numbers come from ``memory`` and from the papers (``LLM_SIZES``).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from .. import memory
from .style import FROZEN, FROZEN_EDGE, TRAINABLE, TRAINABLE_EDGE, fig_ax, styled

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


@styled
def plot_llm_sizes(ax=None, include_ours: bool = True):
    """Why adaptation is expensive: parameter counts of large language models (log scale), ours for scale.

    One horizontal bar per model, in order of publication; the values are the
    papers' own (see ``LLM_SIZES``). Our base model's count comes from
    ``memory.full_parameters`` of the ``"lfs-base"`` preset.
    """
    fig, ax = fig_ax(ax, (9, 5.2))
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


@styled
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

