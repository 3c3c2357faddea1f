"""Every figure of the tutorial, as a function (the notebooks and ``python -m lora_from_scratch figures``).

Each function names the paper and section it illustrates. Single-panel functions take an optional
matplotlib ``ax`` and draw into it; multi-panel ones make their own Figure. All return the Figure.
``make_all_figures`` writes the figures that need no trained model into ``figures/`` with fixed seeds.

The figures live in one module per topic; the standalone ones are importable from here:

- ``style``: the colours (frozen blue-grey, trainable orange), the font style (``styled``) and the
  helpers every figure module shares (``fig_ax``, ``plain_log_axis``, ``moving_average``);
- ``sizes``: ``plot_llm_sizes`` (model sizes) and ``plot_lora_impact`` (GPT-3 175B: parameters,
  memory, checkpoints; Hu et al., 2021, section 4.2);
- ``diagrams``: ``plot_transformer_architecture`` (the GPT block and its six LoRA targets),
  ``plot_attention_heads`` (one layer's attention maps), ``plot_lora_diagram`` (h = W0 x + B A x);
- ``rank_and_math``: ``plot_singular_values``, ``plot_subspace_similarity`` (Hu et al., 2021,
  section 7.2), the training state and the rank-r error of notebooks 1 and 2;
- ``quant``: ``plot_quantization_levels`` (continuous values onto 16 levels) and the NF4 figures;
- ``training``: ``plot_training_curves`` (loss and exact match of training runs);
- ``init``, ``scaling``, ``transformer``, ``qlora``, ``qalora``: the figures of notebooks 4, 5, 6,
  8 and 9, each drawing an experiment's result.

Host-side drawing only: the numbers come from the modules that compute them (``memory.paper``,
``rank``, ``quant``, the model's forward) and from the experiments, which hand each figure
function its data (``experiments.NAME.plot``); no figure module imports an experiment.
"""

from __future__ import annotations

import os
import sys

import matplotlib

if (sys.platform.startswith("linux") and not os.environ.get("DISPLAY") and not os.environ.get("MPLBACKEND")
        and "ipykernel" not in sys.modules):
    matplotlib.use("Agg")  # no screen: draw into files (before any figure module imports pyplot)

import matplotlib.pyplot as plt  # noqa: E402

from ..files import atomic_write  # noqa: E402
from .diagrams import plot_attention_heads, plot_lora_diagram, plot_transformer_architecture
from .quant import CODE_TITLES, plot_quantization_levels, quantize_roundtrip
from .rank_and_math import example_low_rank_matrices, plot_singular_values, plot_subspace_similarity
from .sizes import LLM_SIZES, plot_llm_sizes, plot_lora_impact
from .style import (
    CODE_COLORS,
    FROZEN,
    FROZEN_EDGE,
    NEUTRAL,
    NEUTRAL_EDGE,
    STYLE,
    TRAINABLE,
    TRAINABLE_EDGE,
    fig_ax,
    minor_log_label,
    moving_average,
    plain_log_axis,
    styled,
)
from .training import plot_training_curves

__all__ = ["CODE_COLORS", "CODE_TITLES", "FIGURES", "FROZEN", "FROZEN_EDGE", "LLM_SIZES", "NEUTRAL", "NEUTRAL_EDGE",
           "STYLE", "TRAINABLE", "TRAINABLE_EDGE", "example_low_rank_matrices", "fig_ax", "make_all_figures",
           "minor_log_label", "moving_average", "plain_log_axis", "plot_attention_heads", "plot_llm_sizes",
           "plot_lora_diagram", "plot_lora_impact", "plot_quantization_levels", "plot_singular_values",
           "plot_subspace_similarity", "plot_training_curves", "plot_transformer_architecture", "quantize_roundtrip",
           "styled"]

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
