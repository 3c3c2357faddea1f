"""Student copies of the tutorial notebooks: the solutions taken out, without nbgrader installed.

The notebooks in ``notebooks/`` are the teacher's copies: every exercise's answer sits between
the markers nbgrader uses,

    ### BEGIN SOLUTION
    ...
    ### END SOLUTION

``student_notebook(nb)`` replaces each marked part of a code cell by ``raise NotImplementedError``
(at the marker's indentation) and of a markdown cell by "*Your answer here.*", and clears every
output and execution count, so the copy carries no answer in its outputs either.
``write_student_notebooks()`` (``python -m lora_from_scratch student-notebooks``) writes
``notebooks/student/``; the test suite checks that the committed copies equal fresh ones.
"""

from __future__ import annotations

import copy
import glob
import json
import os

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
STUDENT = os.path.join(NOTEBOOKS, "student")


def _lines(source) -> list[str]:
    text = "".join(source) if isinstance(source, list) else source
    return text.splitlines(keepends=True)


def strip_solutions(lines: list[str], replacement: str, where: str) -> tuple[list[str], int]:
    """Replace each BEGIN..END block (markers included) by ``replacement`` at the BEGIN line's indentation."""
    out, n, inside, indent = [], 0, False, ""
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise ValueError(f"{where}: line {i + 1}: {BEGIN!r} inside another solution block")
            inside, indent, n = True, line[: len(line) - len(line.lstrip())], n + 1
            out.append(f"{indent}{replacement}\n")
        elif stripped == END:
            if not inside:
                raise ValueError(f"{where}: line {i + 1}: {END!r} without a {BEGIN!r}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{where}: a {BEGIN!r} has no {END!r}")
    if out and out[-1].endswith("\n") and not (lines and lines[-1].endswith("\n")):
        out[-1] = out[-1][:-1]
    return out, n


def student_notebook(nb: dict, name: str = "notebook") -> dict:
    """The student copy of a notebook (a new dict; ``nb`` is not changed)."""
    nb = copy.deepcopy(nb)
    for k, cell in enumerate(nb.get("cells", [])):
        where = f"{name}, cell {k}"
        if cell["cell_type"] == "code":
            lines, _ = strip_solutions(_lines(cell["source"]), "raise NotImplementedError  # your answer here", where)
            cell["outputs"], cell["execution_count"] = [], None
        elif cell["cell_type"] == "markdown":
            lines, _ = strip_solutions(_lines(cell["source"]), "*Your answer here.*", where)
        else:
            continue
        cell["source"] = lines
        cell.get("metadata", {}).pop("execution", None)
    return nb


def count_solutions(nb: dict) -> int:
    """How many marked solution blocks a notebook has."""
    total = 0
    for k, cell in enumerate(nb.get("cells", [])):
        if cell["cell_type"] in ("code", "markdown"):
            total += strip_solutions(_lines(cell["source"]), "", f"cell {k}")[1]
    return total


def dumps(nb: dict) -> str:
    """Notebook JSON as Jupyter writes it (one space indent, sorted keys), so copies compare as text."""
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def teacher_notebooks(folder: str = NOTEBOOKS) -> list[str]:
    """The tutorial notebooks that have exercises (at least one solution block), in order."""
    paths = []
    for path in sorted(glob.glob(os.path.join(folder, "[0-9][0-9]_*.ipynb"))):
        with open(path) as f:
            if count_solutions(json.load(f)):
                paths.append(path)
    return paths


def write_student_notebooks(src: str = NOTEBOOKS, out: str = STUDENT) -> list[str]:
    """Write the student copy of every notebook with exercises into ``out``; returns the paths written."""
    from ..files import atomic_write

    written = []
    for path in teacher_notebooks(src):
        with open(path) as f:
            nb = json.load(f)
        text = dumps(student_notebook(nb, os.path.basename(path)))
        target = os.path.join(out, os.path.basename(path))

        def write(tmp, text=text):
            with open(tmp, "w") as f:
                f.write(text)

        atomic_write(target, write)
        written.append(target)
    return written
