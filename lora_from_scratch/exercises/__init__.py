"""Classroom exercises that check themselves.

Every tutorial notebook from 02 on ends with two or three exercises. A student writes the answer
in the cell's marked part (the teacher's copy holds the solution between ``### BEGIN SOLUTION``
and ``### END SOLUTION``, the student copy ``raise NotImplementedError`` instead) and calls

    check("03.scaled_update", my_answer)

which prints what was checked when the answer is right, and otherwise raises ``ExerciseError``
with a hint that names the mistake when it is one of the typical ones (alpha instead of alpha/r,
B random at init, A transposed, max instead of absmax, nibbles in the wrong order, the merge
without the 1/group_size, ...). An unanswered exercise (``None``, or a function that still raises
``NotImplementedError``) says so.

An exercise is either a value (a number or an array to derive) or a function to implement; a
function answer is called on a few fixed inputs and its results compared with the reference's.
Each notebook's exercises live in ``exercises/nbNN.py`` as a list ``EXERCISES``; they are
collected here by their id, ``"NN.name"``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import to_numpy


class ExerciseError(AssertionError):
    """The answer is not right (the message says what was checked and, if it knows, which mistake it is)."""


@dataclass(frozen=True)
class Mistake:
    """A typical wrong answer: ``answer`` has the same kind as the reference; ``hint`` names the mistake."""

    name: str
    answer: Any
    hint: str


@dataclass(frozen=True)
class Exercise:
    """One exercise. ``reference`` is the correct answer (a value, or a function to call on ``cases()``).

    ``cases``: for a function exercise, a function returning a list of argument tuples; ``rtol`` /
    ``atol``: how close a numeric answer must be; ``task``: one line saying what to do.
    """

    id: str
    title: str
    task: str
    reference: Any
    mistakes: tuple = ()
    cases: Callable[[], list] | None = None
    rtol: float = 1e-6
    atol: float = 1e-9

    @property
    def notebook(self) -> str:
        return self.id.split(".")[0]

    @property
    def is_function(self) -> bool:
        return self.cases is not None

    def outputs(self, answer):
        """What ``answer`` gives: itself for a value, its results on every case for a function."""
        if not self.is_function:
            return [answer]
        if not callable(answer):
            raise ExerciseError(f"{self.id}: the answer must be a function ({self.task}); got {type(answer).__name__}")
        return [answer(*args) for args in self.cases()]

    def agrees(self, got, want) -> bool:
        return _close(got, want, self.rtol, self.atol)


def _close(got, want, rtol, atol) -> bool:
    if isinstance(want, (tuple, list)):
        return isinstance(got, (tuple, list)) and len(got) == len(want) and all(
            _close(g, w, rtol, atol) for g, w in zip(got, want))
    if isinstance(want, dict):
        return isinstance(got, dict) and set(got) == set(want) and all(
            _close(got[k], want[k], rtol, atol) for k in want)
    if isinstance(want, (str, bool)) or want is None:
        return got == want
    try:
        g, w = np.asarray(to_numpy(got)), np.asarray(to_numpy(want))
    except Exception:
        return False
    if g.shape != w.shape:
        return False
    if w.dtype.kind in "biu" and g.dtype.kind in "biu":
        return bool(np.array_equal(g, w))
    try:
        return bool(np.allclose(g.astype(np.float64), w.astype(np.float64), rtol=rtol, atol=atol))
    except (TypeError, ValueError):
        return False


def _describe(outputs) -> str:
    first = outputs[0]
    if hasattr(first, "shape"):
        return f"shape {tuple(first.shape)}"
    return repr(first) if not isinstance(first, (list, tuple, dict)) else type(first).__name__


_MODULE_PREFIX = "nb"


def _collect() -> dict:
    folder = os.path.dirname(os.path.abspath(__file__))
    found = {}
    for f in sorted(os.listdir(folder)):
        if f.startswith(_MODULE_PREFIX) and f.endswith(".py"):
            mod = importlib.import_module(f"lora_from_scratch.exercises.{f[:-3]}")
            for ex in mod.EXERCISES:
                if ex.id in found:
                    raise ValueError(f"two exercises share the id {ex.id!r}")
                found[ex.id] = ex
    return found


_EXERCISES: dict | None = None


def exercises() -> dict:
    """Every exercise, by id (``"03.scaled_update"``), in notebook order."""
    global _EXERCISES
    if _EXERCISES is None:
        _EXERCISES = _collect()
    return _EXERCISES


def get(exercise_id: str) -> Exercise:
    all_ = exercises()
    if exercise_id not in all_:
        raise ValueError(f"unknown exercise {exercise_id!r}; exercises: {list(all_)}")
    return all_[exercise_id]


def check(exercise_id: str, answer, quiet: bool = False) -> None:
    """Check a student's answer: prints one line when it is right, raises ExerciseError otherwise."""
    ex = get(exercise_id)
    if answer is None or answer is Ellipsis:
        raise ExerciseError(f"{ex.id} is not answered yet: {ex.task}")
    try:
        got = ex.outputs(answer)
    except NotImplementedError:
        raise ExerciseError(f"{ex.id} is not answered yet (the function still raises NotImplementedError): "
                            f"{ex.task}") from None
    except ExerciseError:
        raise
    except Exception as e:  # the student's code failed: say how, on which input
        raise ExerciseError(f"{ex.id}: your answer raised {type(e).__name__}: {e}") from e
    want = ex.outputs(ex.reference)
    if all(ex.agrees(g, w) for g, w in zip(got, want)):
        if not quiet:
            what = f"on {len(want)} inputs" if ex.is_function else ""
            print(f"{ex.id} correct {what}: {ex.title}".replace("  ", " "))
        return
    for m in ex.mistakes:
        try:
            wrong = ex.outputs(m.answer)
        except Exception:
            continue
        if all(ex.agrees(g, w) for g, w in zip(got, wrong)):
            raise ExerciseError(f"{ex.id}: not yet. {m.hint}")
    shapes = "" if _describe(got) == _describe(want) else f" (got {_describe(got)}, expected {_describe(want)})"
    raise ExerciseError(f"{ex.id}: not yet: the answer does not match{shapes}. {ex.task}")


__all__ = ["Exercise", "ExerciseError", "Mistake", "check", "exercises", "get"]
