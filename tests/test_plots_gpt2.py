"""The figures of notebook 10 (``plots.gpt2``): the bars add up to what was measured."""

import matplotlib
import pytest

from lora_from_scratch.plots.gpt2 import plot_generation_speed, plot_step_memory, step_memory_parts

matplotlib.use("Agg")
MiB = 2**20


def measured(weights, gradients, optimizer, peak):
    return {"weights": weights * MiB, "gradients": gradients * MiB, "optimizer": optimizer * MiB, "peak": peak * MiB}


def test_step_memory_bars_stack_to_each_peak():
    rows = {"full fine-tuning": measured(475, 475, 950, 1931), "LoRA": measured(480, 5, 10, 523)}
    assert step_memory_parts(rows["LoRA"]) == {"weights": 480 * MiB, "state": 15 * MiB, "rest": 28 * MiB}
    fig = plot_step_memory(rows)
    bars = fig.axes[0].patches
    assert len(bars) == 3 * len(rows)  # weights, state, rest for each method
    for i, row in enumerate(rows.values()):
        widths = [bars[i + k * len(rows)].get_width() for k in range(3)]
        assert sum(widths) == pytest.approx(row["peak"] / MiB, rel=1e-12)
    with pytest.raises(ValueError, match="rows must map"):
        plot_step_memory({})


def test_generation_speed_bars():
    fig = plot_generation_speed({"base": 20.0, "LoRA unmerged": 15.0, "LoRA merged": 19.5})
    assert [round(b.get_height(), 6) for b in fig.axes[0].patches] == [20.0, 15.0, 19.5]
    with pytest.raises(ValueError, match="speeds must map"):
        plot_generation_speed({})
