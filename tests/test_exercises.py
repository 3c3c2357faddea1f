"""Every exercise's checker accepts its solution, says a blank is unanswered, and names each typical mistake.

The exercises (``lora_from_scratch.exercises``) end every tutorial notebook from 02 on; the teacher's
notebooks hold the solutions between nbgrader's markers, the student copies in ``notebooks/student``
are generated from them (``python -m lora_from_scratch student-notebooks``) and must equal fresh ones.
"""

import json
import os
import re

import pytest

from lora_from_scratch import exercises
from lora_from_scratch.exercises import ExerciseError, check
from lora_from_scratch.exercises import students as st

ALL = exercises.exercises()
IDS = list(ALL)


def _blank(*args, **kwargs):
    raise NotImplementedError


def test_there_are_two_or_three_exercises_per_notebook_from_02_on():
    per_notebook = {}
    for ex in ALL.values():
        per_notebook.setdefault(ex.notebook, []).append(ex.id)
    notebooks = sorted(os.path.basename(p)[:2] for p in st.teacher_notebooks())
    numbered = sorted(os.path.basename(p)[:2] for p in os.listdir(st.NOTEBOOKS) if re.match(r"\d\d_.*\.ipynb$", p))
    assert [n for n in numbered if "02" <= n <= "09"] == notebooks, "every notebook from 02 to 09 has exercises"
    assert sorted(per_notebook) == notebooks
    for nb, ids in per_notebook.items():
        assert 2 <= len(ids) <= 3, (nb, ids)


@pytest.mark.parametrize("exercise_id", IDS)
def test_the_solution_passes(exercise_id, capsys):
    ex = ALL[exercise_id]
    check(exercise_id, ex.reference)  # raises ExerciseError unless right
    assert "correct" in capsys.readouterr().out


@pytest.mark.parametrize("exercise_id", IDS)
def test_a_blank_answer_is_unanswered(exercise_id):
    ex = ALL[exercise_id]
    with pytest.raises(ExerciseError, match="not answered yet"):
        check(exercise_id, None)
    if ex.is_function:
        with pytest.raises(ExerciseError, match="not answered yet"):
            check(exercise_id, _blank)


@pytest.mark.parametrize("exercise_id", IDS)
def test_each_typical_mistake_is_named(exercise_id):
    ex = ALL[exercise_id]
    assert ex.mistakes, f"{exercise_id} knows no typical mistake"
    for m in ex.mistakes:
        with pytest.raises(ExerciseError) as err:
            check(exercise_id, m.answer)
        assert m.hint in str(err.value), (exercise_id, m.name, str(err.value))


@pytest.mark.parametrize("exercise_id", IDS)
def test_an_unknown_wrong_answer_is_refused_without_a_wrong_hint(exercise_id):
    ex = ALL[exercise_id]
    wrong = (lambda *a, **k: "nonsense") if ex.is_function else "nonsense"
    with pytest.raises(ExerciseError) as err:
        check(exercise_id, wrong)
    assert not any(m.hint in str(err.value) for m in ex.mistakes)


def test_every_exercise_is_checked_inside_its_notebook():
    for path in st.teacher_notebooks():
        with open(path) as f:
            nb = json.load(f)
        source = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
        own = [ex.id for ex in ALL.values() if ex.notebook == os.path.basename(path)[:2]]
        for ex_id in own:
            assert re.search(rf"check\(\s*[\"']{re.escape(ex_id)}[\"']", source), (path, ex_id)


# ----------------------------------------------------------------- the student copies
def test_strip_solutions_keeps_indentation_and_everything_else():
    src = ["def f(x):\n", "    ### BEGIN SOLUTION\n", "    return 2 * x\n", "    ### END SOLUTION\n", "check('x', f)"]
    out, n = st.strip_solutions(src, "raise NotImplementedError", "test")
    assert n == 1
    assert out == ["def f(x):\n", "    raise NotImplementedError\n", "check('x', f)"]
    with pytest.raises(ValueError, match="has no"):
        st.strip_solutions(["### BEGIN SOLUTION\n", "x = 1\n"], "", "test")
    with pytest.raises(ValueError, match="without a"):
        st.strip_solutions(["x = 1\n", "### END SOLUTION\n"], "", "test")


def test_committed_student_notebooks_equal_fresh_ones(tmp_path):
    written = st.write_student_notebooks(out=str(tmp_path))
    assert written, "no teacher notebook has solution blocks"
    committed = sorted(os.listdir(st.STUDENT))
    assert committed == sorted(os.path.basename(p) for p in written), "regenerate: python -m lora_from_scratch " \
                                                                     "student-notebooks"
    for path in written:
        name = os.path.basename(path)
        with open(path) as fresh, open(os.path.join(st.STUDENT, name)) as old:
            assert fresh.read() == old.read(), f"notebooks/student/{name} is stale: run python -m " \
                                               "lora_from_scratch student-notebooks"


def test_student_copies_hold_no_solution_and_no_output():
    for name in sorted(os.listdir(st.STUDENT)):
        with open(os.path.join(st.STUDENT, name)) as f:
            nb = json.load(f)
        text = json.dumps(nb)
        assert st.BEGIN not in text and st.END not in text, name
        assert "raise NotImplementedError" in text, name
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, name


# ----------------------------------------------------------------- the student copies, filled in and started
REPLACEMENT = "raise NotImplementedError  # your answer here"


def fill(student: dict, teacher: dict) -> dict:
    """The student copy with every blank answered by the teacher's solution (without nbgrader's markers)."""
    filled = json.loads(json.dumps(student))
    assert len(filled["cells"]) == len(teacher["cells"])
    for mine, ref in zip(filled["cells"], teacher["cells"]):
        text = "".join(mine["source"])
        if REPLACEMENT not in text:
            continue
        blocks = re.findall(rf"^[ \t]*{st.BEGIN}\n(.*?)^[ \t]*{st.END}\n?", "".join(ref["source"]), re.M | re.S)
        lines, k = [], 0
        for line in text.splitlines(keepends=True):
            if line.strip() == REPLACEMENT:
                lines.append(blocks[k] if line.endswith("\n") or not blocks[k].endswith("\n") else blocks[k][:-1])
                k += 1
            else:
                lines.append(line)
        assert k == len(blocks)
        mine["source"] = "".join(lines)
    return filled


def _code(nb: dict) -> list:
    """The code of every code cell, nbgrader's solution markers left out."""
    return ["".join(ln for ln in "".join(c["source"]).splitlines(keepends=True) if ln.strip() not in (st.BEGIN, st.END))
            .rstrip("\n") for c in nb["cells"] if c["cell_type"] == "code"]


STUDENT_COPIES = sorted(n for n in os.listdir(st.STUDENT) if n.endswith(".ipynb"))
CWD_DEPENDENT = re.compile(r"\.\./|[\"']\.\.[\"']|os\.chdir|Path\.cwd|getcwd|\bopen\(")


@pytest.mark.parametrize("name", STUDENT_COPIES)
def test_a_filled_student_copy_is_the_teacher_notebook_and_starts_in_student(name):
    """The student copy, answered with the solutions, starts where a student opens it (notebooks/student/).

    The filled copy's code equals the teacher notebook's cell for cell, and after the set-up cell no code
    depends on the folder it runs in; the suite executes the teacher notebook in full (``--nbmake``),
    every ``check`` included. So executing the filled copy again in full would run the same code a second
    time; what only the student folder can break, the start (finding the package from
    ``notebooks/student/`` without installing it), is executed here: every cell up to the first import
    from the package, in a fresh kernel whose working folder is ``notebooks/student/``.
    """
    import nbformat
    from nbclient import NotebookClient

    with open(os.path.join(st.STUDENT, name)) as f:
        student = json.load(f)
    with open(os.path.join(st.NOTEBOOKS, name)) as f:
        teacher = json.load(f)
    filled = fill(student, teacher)
    assert _code(filled) == _code(teacher), f"{name}: the filled student copy is not the teacher's code"
    code = [c for c in filled["cells"] if c["cell_type"] == "code"]
    for c in code[1:]:
        assert not CWD_DEPENDENT.search("".join(c["source"])), f"{name}: code that depends on the working folder"
    first_import = next(i for i, c in enumerate(code) if re.search(r"^from lora_from_scratch", "".join(c["source"]),
                                                                    re.M))
    start = nbformat.reads(json.dumps(dict(filled, cells=code[: first_import + 1])), as_version=4)
    env_path = os.environ.get("PYTHONPATH", "")
    assert st.ROOT not in env_path.split(os.pathsep), "the kernel must find the package by itself"
    NotebookClient(start, timeout=120, kernel_name="python3", resources={"metadata": {"path": st.STUDENT}}).execute()
    outputs = [o for c in start["cells"] for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]


def test_fill_restores_a_solution_and_a_blank_stays_blank():
    teacher = {"cells": [{"cell_type": "code", "source": f"def f(x):\n    {st.BEGIN}\n    return 2 * x\n    {st.END}\n"
                                                          "\n\nf(1)"}]}
    student = st.student_notebook(teacher)
    assert REPLACEMENT in "".join(student["cells"][0]["source"])
    assert _code(fill(student, teacher)) == _code(teacher) == ["def f(x):\n    return 2 * x\n\n\nf(1)"]
    assert _code(student) != _code(teacher)
