"""nbgrader round trip on one tutorial notebook: generate the assignment, autograde two submissions.

The teacher notebooks carry nbgrader's cell metadata: each exercise is a solution cell (the answer between
``### BEGIN SOLUTION`` and ``### END SOLUTION``) followed by an autograded test cell (the ``check(...)``
call, locked, with points). Here, in a temporary course directory, the assignment is notebook 03 cut to
what grading runs (its title, its set-up cell and its exercise section, the cells as they are; the rest of
the notebook teaches, and ``--nbmake`` executes it): ``nbgrader generate_assignment`` makes the student
version, and ``nbgrader autograde`` grades (1) the teacher's solutions: full
marks, and (2) the same notebook with one typical mistake (the merged weight scaled by alpha instead of
alpha / r): exactly that exercise's points lost. nbgrader is a test-only dependency (requirements-dev.txt).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

nbgrader_api = pytest.importorskip("nbgrader.api")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "03_lora_math.ipynb"
NAME = NOTEBOOK.stem


def _nbgrader(course: Path, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "nbgrader", *args, "--CourseDirectory.root=" + str(course)],
                            cwd=course, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _assignment() -> dict:
    """Notebook 03's title, set-up cell and exercise section (from the "## Exercises" cell to the end)."""
    nb = json.loads(NOTEBOOK.read_text())
    start = next(i for i, c in enumerate(nb["cells"]) if "## Exercises" in "".join(c["source"]))
    nb["cells"] = nb["cells"][:2] + nb["cells"][start:]
    return nb


def _points(nb: dict) -> dict:
    return {c["metadata"]["nbgrader"]["grade_id"]: c["metadata"]["nbgrader"]["points"]
            for c in nb["cells"] if c["metadata"].get("nbgrader", {}).get("grade")}


def test_every_teacher_notebook_has_nbgrader_cells_for_each_exercise():
    from lora_from_scratch.exercises import exercises, predictions

    ids = set()
    for path in sorted((ROOT / "notebooks").glob("0[2-9]_*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        meta = [c["metadata"].get("nbgrader") for c in cells]
        grade_ids = [m["grade_id"] for m in meta if m]
        assert len(grade_ids) == len(set(grade_ids)), path.name
        for c, m in zip(cells, meta):
            text = "".join(c["source"])
            if "### BEGIN SOLUTION" in text:
                assert m and m["solution"] and not m["grade"] and not m["locked"], (path.name, text[:60])
            if m and m["grade"]:
                assert c["cell_type"] == "code" and m["locked"] and m["points"] > 0, (path.name, m)
                ids.add(m["grade_id"].removeprefix("check_"))
    assert ids == {i.replace(".", "_") for i in [*exercises(), *predictions()]}


@pytest.mark.slow
def test_generate_and_autograde_full_marks_and_one_mistake(tmp_path):
    course = tmp_path / "course"
    (course / "source" / "ps1").mkdir(parents=True)
    teacher = _assignment()
    (course / "source" / "ps1" / NOTEBOOK.name).write_text(json.dumps(teacher))
    (course / "nbgrader_config.py").write_text('c = get_config()\nc.CourseDirectory.course_id = "lora"\n'
                                               'c.ExecutePreprocessor.timeout = 240\n')
    _nbgrader(course, "generate_assignment", "ps1", "--force")
    released = json.loads((course / "release" / "ps1" / NOTEBOOK.name).read_text())
    text = json.dumps(released)
    assert "### BEGIN SOLUTION" not in text and "raise NotImplementedError" in text
    full = sum(_points(teacher).values())
    assert full == sum(_points(json.loads(NOTEBOOK.read_text())).values())  # every exercise of notebook 03

    solution = teacher
    mistake = _assignment()
    right = "return W0 + (alpha / r) * (B @ A)"
    cells = [c for c in mistake["cells"] if right in "".join(c["source"])]
    assert len(cells) == 1
    cells[0]["source"] = "".join(cells[0]["source"]).replace(right, "return W0 + alpha * (B @ A)")
    for student, nb in (("teacher", solution), ("mistake", mistake)):
        folder = course / "submitted" / student / "ps1"
        folder.mkdir(parents=True)
        (folder / NOTEBOOK.name).write_text(json.dumps(nb))
    _nbgrader(course, "autograde", "ps1", "--force")
    with nbgrader_api.Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        scores = {s: gb.find_submission("ps1", s).score for s in ("teacher", "mistake")}
        assert gb.find_submission("ps1", "teacher").max_score == full
    print(f"nbgrader marks on {NAME}: solutions {scores['teacher']} of {full}, one mistake {scores['mistake']}")
    assert scores["teacher"] == full
    assert scores["mistake"] == full - _points(teacher)["check_03_merged_weight"]


def test_the_teachers_guide_lists_every_exercise_with_its_points():
    guide = (ROOT / "TEACHING.md").read_text()
    points = {}
    for path in sorted((ROOT / "notebooks").glob("0[2-9]_*.ipynb")):
        for grade_id, p in _points(json.loads(path.read_text())).items():
            points[grade_id.removeprefix("check_").replace("_", ".", 1)] = p
    listed = {m.group(1): int(m.group(2)) for m in re.finditer(r"`(\d\d\.[a-z_0-9]+)` \((\d)\)", guide)}
    assert listed == points
    total = re.search(r"In all: (\d+) exercises and one recorded prediction, (\d+) points", guide)
    assert (int(total.group(1)), int(total.group(2))) == (len(points) - 1, sum(points.values()))
    assert "TEACHING.md" in (ROOT / "notebooks" / "README.md").read_text()
