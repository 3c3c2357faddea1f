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
