"""Figures of notebook 10, at GPT-2 small's size: one training step's memory for each way to adapt
(LoRA, Hu et al., 2021, section 4.2: no gradient and no optimizer state for W0; QLoRA, Dettmers et
al., 2023, section 3: W0 in 4 bits), and generation speed with the adapter apart or merged (LoRA,
section 4.1, "No Additional Inference Latency").

- ``plot_step_memory``: a stacked bar per method: the weights held, the gradients and optimizer
  state, and the rest of the step's traced peak (activations and temporaries);
- ``plot_generation_speed``: tokens per second of the base model, the unmerged and the merged adapter.

Host-side drawing only: the numbers come from ``memory.step_memory`` and the notebook's timings.
"""

from __future__ import annotations

import numpy as np

from .style import FROZEN, NEUTRAL, TRAINABLE, fig_ax, styled

PARTS = (("weights", "weights held (W0 and adapters)", FROZEN),
         ("state", "gradients + AdamW moments", TRAINABLE),
         ("rest", "rest of the peak (activations, temporaries)", NEUTRAL))


def step_memory_parts(measured: dict) -> dict:
    """{weights, state, rest} in bytes from a ``memory.step_memory`` dict; the three add up to its peak."""
    weights = measured["weights"]
    state = measured["gradients"] + measured["optimizer"]
    return {"weights": weights, "state": state, "rest": max(0, measured["peak"] - weights - state)}


@styled
def plot_step_memory(rows: dict, ax=None, title: str = "One training step at GPT-2 small's size (traced peak)"):
    """Stacked horizontal bars, one per method: ``rows`` maps a label to a ``memory.step_memory`` dict."""
    if not rows:
        raise ValueError("rows must map a method label to a memory.step_memory dict")
    fig, ax = fig_ax(ax, (10, 0.9 * len(rows) + 1.6))
    labels = list(rows)
    y = np.arange(len(labels))[::-1]  # (n,) the first method on top
    left = np.zeros(len(labels))  # (n,) MiB so far
    parts = [step_memory_parts(rows[label]) for label in labels]
    for key, name, color in PARTS:
        widths = np.array([p[key] for p in parts], dtype=np.float64) / 2**20  # (n,) MiB
        ax.barh(y, widths, left=left, color=color, edgecolor="white", height=0.6, label=name)
        left += widths
    for yi, label in zip(y, labels):
        ax.text(rows[label]["peak"] / 2**20, yi, f" {rows[label]['peak'] / 2**20:,.0f} MiB", va="center")
    ax.set_yticks(y, labels)
    ax.set_xlabel("MiB")
    ax.set_xlim(0, 1.18 * max(r["peak"] for r in rows.values()) / 2**20)
    ax.set_title(title)
    ax.legend(loc="lower right", frameon=False)
    return fig


@styled
def plot_generation_speed(speeds: dict, ax=None, title: str = "Generation speed (greedy, KV cache)"):
    """Bars of tokens per second: ``speeds`` maps a label (base, unmerged, merged) to tokens/s."""
    if not speeds:
        raise ValueError("speeds must map a label to tokens per second")
    fig, ax = fig_ax(ax, (7, 3.6))
    labels = list(speeds)
    x = np.arange(len(labels))  # (n,)
    values = np.array([speeds[k] for k in labels], dtype=np.float64)  # (n,)
    colors = [(NEUTRAL, TRAINABLE, FROZEN)[i % 3] for i in range(len(labels))]  # base, unmerged, merged
    ax.bar(x, values, color=colors, edgecolor="white", width=0.6)
    for xi, v in zip(x, values):
        ax.text(xi, v, f"{v:.1f}", ha="center", va="bottom")
    ax.set_xticks(x, labels)
    ax.set_ylabel("tokens / s")
    ax.set_ylim(0, 1.2 * values.max())
    ax.set_title(title)
    return fig
