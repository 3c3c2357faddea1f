"""The experiment command: every experiment declares what it reproduces, its scales, and a committed result.

Each experiment's own finding is asserted at its "test" scale in the test file of its notebook's
topic; here: the registry, the command line, and the committed JSON and figure of every experiment.
"""

import os
import subprocess
import sys

import pytest

from lora_from_scratch import experiments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = experiments.names()


def test_there_are_experiments():
    assert len(NAMES) >= 5, NAMES


@pytest.mark.parametrize("name", NAMES)
def test_each_experiment_declares_itself(name):
    mod = experiments.get(name)
    assert isinstance(mod.TITLE, str) and mod.TITLE
    assert isinstance(mod.PAPER, str) and any(w in mod.PAPER for w in ("LoRA", "QLoRA", "QA-LoRA", "rsLoRA", "PiSSA"))
    assert {"full", "slice", "test"} <= set(mod.SCALES), sorted(mod.SCALES)
    assert callable(mod.run) and callable(mod.plot)


@pytest.mark.parametrize("name", NAMES)
def test_each_experiment_has_a_committed_result_and_figure(name):
    json_path, png_path = experiments.result_paths(name)
    assert os.path.exists(json_path) and os.path.exists(png_path), f"run python -m lora_from_scratch experiment {name}"
    result = experiments.load_result(name)
    assert result["experiment"] == name and result["scale"] == "full"
    assert result["settings"] == experiments.get(name).SCALES["full"], "the committed result is from other settings"
    assert result["findings"] and all(isinstance(line, str) for line in result["findings"])
    with open(png_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_command_lists_the_experiments_and_refuses_an_unknown_one():
    env = {**os.environ, "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-m", "lora_from_scratch", "experiment"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0 and all(name in r.stdout for name in NAMES), r.stderr
    r = subprocess.run([sys.executable, "-m", "lora_from_scratch", "experiment", "nope"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 2 and "unknown experiment 'nope'" in r.stderr and "Traceback" not in r.stderr


def test_an_unknown_experiment_or_scale_is_refused():
    with pytest.raises(ValueError, match="unknown experiment 'nope'"):
        experiments.run("nope")
    with pytest.raises(ValueError, match="has no scale 'huge'"):
        experiments.run(NAMES[0], scale="huge")


@pytest.mark.parametrize("name", NAMES)
def test_each_committed_result_draws(name):
    """``plot`` turns the committed result into the data its figure function takes, and the figure draws it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = experiments.get(name).plot(experiments.load_result(name))
    try:
        assert fig.axes and any(ax.has_data() for ax in fig.axes)
    finally:
        plt.close(fig)


def test_figure_data_of_qalora_bits_holds_the_findings_numbers():
    """The bars of the QA-LoRA figure are the means over seeds that the findings quote (both from the result rows)."""
    import numpy as np

    from lora_from_scratch.experiments import qalora_bits

    result = experiments.load_result("qalora_bits")
    data = qalora_bits.figure_data(result)
    assert data["bits"] == sorted(result["settings"]["bits"], reverse=True)
    for i, b in enumerate(data["bits"]):
        for method in ("qlora", "qalora"):
            for stage in ("trained", "deployed"):
                expected = 100 * qalora_bits.mean_over_seeds(result["rows"], method, stage, bits=b)
                assert np.mean(data["desc"][method][stage][i]) == pytest.approx(expected, rel=1e-12)
            assert len(data["logits_rel"][method][i]) == len(result["settings"]["seeds"])
