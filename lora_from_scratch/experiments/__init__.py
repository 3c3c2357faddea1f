"""Experiments too slow for a one-minute notebook: ``python -m lora_from_scratch experiment NAME``.

Each experiment reproduces one of the papers' findings at classroom scale, on the shipped base
model and the generated tasks. It is one module of this folder, named as the command names it,
that defines ``TITLE``, ``PAPER`` (the paper and section, table or figure it reproduces) and:

- ``run(scale, progress)``: does the work and returns a JSON-able dict (settings, measurements,
  findings, seconds);
- ``plot(result)``: turns the result into the data its figure takes and draws it with ``plots`` (the
  figure functions only draw; no figure module imports an experiment);
- ``SCALES``: named settings. ``"full"`` is what the command runs and commits to ``figures/``;
  ``"slice"`` is the small part a notebook re-runs live to check the committed result; ``"test"``
  is what the test suite re-runs to assert the finding.

``run_experiment(name, scale)`` runs one and writes ``figures/NAME.json`` and ``figures/NAME.png``
as one set (``outputs.write_set``: both or neither; an interrupted run leaves the previous pair in
place); ``load_result(name)`` reads the committed JSON back.
"""

from __future__ import annotations

import importlib
import json
import os
import time

FIGURES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "figures")


_NOT_EXPERIMENTS = {"__init__", "common"}


def names() -> list[str]:
    """Every experiment: one module per experiment in this folder, named as the command names it."""
    folder = os.path.dirname(os.path.abspath(__file__))
    return sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and f[:-3] not in _NOT_EXPERIMENTS)


def get(name: str, scale: str | None = None):
    """The module of experiment ``name``: it defines TITLE, PAPER, SCALES, run(scale, progress) and plot(result).

    ``scale``: also check that the experiment has it (a ValueError listing its scales).
    """
    if name not in names():
        raise ValueError(f"unknown experiment {name!r}; experiments: {names()}")
    mod = importlib.import_module(f"lora_from_scratch.experiments.{name}")
    if scale is not None and scale not in mod.SCALES:
        raise ValueError(f"experiment {name!r} has no scale {scale!r}; scales: {sorted(mod.SCALES)}")
    return mod


def run(name: str, scale: str = "full", progress: bool = True) -> dict:
    """Run one experiment at a named scale and return its result (nothing is written)."""
    mod = get(name, scale)
    t0 = time.perf_counter()
    result = mod.run(scale=scale, progress=progress)
    result = {"experiment": name, "title": mod.TITLE, "paper": mod.PAPER, "scale": scale,
              "settings": mod.SCALES[scale], **result, "seconds": round(time.perf_counter() - t0, 1)}
    json.dumps(result)  # must be JSON-able: fail here, before anything is written
    return result


def result_paths(name: str, out_dir: str = FIGURES) -> tuple[str, str]:
    return os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.png")


def save_result(result: dict, out_dir: str = FIGURES) -> tuple[str, str]:
    """Write ``NAME.json`` and ``NAME.png`` into ``out_dir`` as one set (both or neither). Returns the two paths."""
    import matplotlib.pyplot as plt

    from ..files import json_writer
    from ..outputs import write_set

    name = result["experiment"]
    json_path, png_path = result_paths(name, out_dir)
    fig = get(name).plot(result)
    try:
        write_set({png_path: lambda tmp: fig.savefig(tmp, dpi=130, format="png"),
                   json_path: json_writer(result, indent=1, end="\n")})  # the bytes files.write_json writes
    finally:
        plt.close(fig)
    return json_path, png_path


def run_experiment(name: str, scale: str = "full", out_dir: str = FIGURES, progress: bool = True) -> dict:
    """Run, then save the JSON and the figure (see ``save_result``). Returns the result."""
    result = run(name, scale, progress)
    save_result(result, out_dir)
    return result


def load_result(name: str, out_dir: str = FIGURES) -> dict:
    """The committed result of an experiment (``figures/NAME.json``)."""
    get(name)
    path = result_paths(name, out_dir)[0]
    if not os.path.exists(path):
        raise FileNotFoundError(f"no result for {name!r} at {path}; run python -m lora_from_scratch experiment {name}")
    with open(path) as f:
        return json.load(f)


def add_arguments(parser) -> None:
    parser.add_argument("name", nargs="?", help="the experiment to run (omit to list them)")
    parser.add_argument("--scale", default="full", help="full (default, what figures/ holds), slice or test")
    parser.add_argument("--out", default=FIGURES, help="folder for NAME.json and NAME.png (default: figures/)")
    parser.add_argument("--no-progress", action="store_true")


def main(args) -> int:
    """List the experiments, or run one: its name, scale and output folder are checked before it starts."""
    from ..outputs import check_output_path

    if not args.name:
        for name in names():
            mod = get(name)
            print(f"{name:<20} {mod.TITLE} ({mod.PAPER})")
        return 0
    get(args.name, args.scale)  # an unknown name or scale: a ValueError listing the valid ones
    check_output_path(args.out, "--out", folder=True)
    result = run_experiment(args.name, args.scale, args.out, progress=not args.no_progress)
    paths = result_paths(args.name, args.out)
    print(f"{args.name}: {result['seconds']:.0f} s; wrote {paths[0]} and {paths[1]}")
    for line in result.get("findings", []):
        print(f"  {line}")
    return 0
