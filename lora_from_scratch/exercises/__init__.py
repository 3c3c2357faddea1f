"""Classroom exercises that check themselves, and teach without giving the answer away.

Every tutorial notebook from 02 on ends with two or three exercises. A student writes the answer
in the cell's marked part (the teacher's copy holds the solution between ``### BEGIN SOLUTION``
and ``### END SOLUTION``, the student copy ``raise NotImplementedError`` instead) and calls

    check("03.merged_weight", merge)

which prints one line when the answer is right, and otherwise raises ``ExerciseError`` with a hint
that says what is wrong, never what is right: no expected value, no solution code. The hint comes
from, in this order:

1. the input: a function answer is called on copies of fixed inputs, and an input it changed in
   place is named (even when the result is right);
2. the exercise's own typical mistakes (``Mistake``) and relations (``Relation``: codes for values,
   nibbles swapped, ...);
3. properties of the answer against the reference, so that a mistake nobody listed still gets a
   hint: a tuple's parts swapped or one part wrong, NaN, the shape (transposed, the wrong size along
   one axis), the fraction cut off (integer division), a constant factor (named: r, alpha, sqrt(r),
   1 / group_size, 8 for bits and bytes, -1 for the sign, or an unnamed constant), an integer
   argument off by one, the right numbers in the wrong order.

An unanswered exercise (``None``, or a function that still raises ``NotImplementedError``) says so.
A value is accepted to the precision the notebook prints (each exercise's ``rtol`` / ``atol``).
``predict`` records a prediction the notebook then verifies with ``verify_prediction``; ``progress()``
shows which exercises this session has solved.

An exercise is either a value (a number, a tuple or an array to derive) or a function to implement.
Each notebook's exercises live in ``exercises/nbNN.py`` as a list ``EXERCISES`` (and ``PREDICTIONS``);
they are collected here by their id, ``"NN.name"``.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import to_numpy


class ExerciseError(AssertionError):
    """The answer is not right (the message says what was checked and, if it can tell, what is wrong)."""


@dataclass(frozen=True)
class Mistake:
    """A typical wrong answer: ``answer`` has the same kind as the reference; ``hint`` says what is wrong."""

    name: str
    answer: Any
    hint: str


@dataclass(frozen=True)
class Relation:
    """A typical wrong result derived from the right one: ``make(want, args)`` -> the wrong output, or None.

    With ``test`` instead, ``test(got, want, args)`` says whether an answer is this mistake.
    """

    name: str
    make: Callable | None
    hint: str
    test: Callable | None = None


@dataclass(frozen=True)
class Exercise:
    """One exercise. ``reference`` is the correct answer (a value, or a function to call on ``cases()``).

    ``cases``: for a function exercise, a function returning a list of argument tuples; ``rtol`` /
    ``atol``: how close a numeric answer must be (the precision the notebook prints); ``task``: what
    to do; ``factors``: named constants a wrong answer may be off by (a function of a case's
    arguments for a function exercise, a dict for a value); ``parts``: the names of a tuple answer's
    parts; ``relations``: typical wrong results derived from the right one; ``offset``: (name,
    function of a case's arguments) for a result that is an input plus an update (W0 + s B A): the
    factors are then sought in the update; ``min_decimals``: a number typed with at least this many
    decimals is accepted when it is the right value rounded to them (4.127 for 4.12744...).
    """

    id: str
    title: str
    task: str
    reference: Any
    mistakes: tuple = ()
    cases: Callable[[], list] | None = None
    rtol: float = 1e-6
    atol: float = 1e-9
    factors: Any = None
    parts: tuple = ()
    relations: tuple = ()
    offset: tuple | None = None
    min_decimals: int | None = None

    @property
    def notebook(self) -> str:
        return self.id.split(".")[0]

    @property
    def is_function(self) -> bool:
        return self.cases is not None

    def outputs(self, answer):
        """What ``answer`` gives: itself for a value, its results on every case for a function."""
        return self.run(answer)[0]

    def run(self, answer):
        """(outputs, names of the inputs ``answer`` changed in place); a function gets copies of each case."""
        if not self.is_function:
            return [answer], []
        if not callable(answer):
            raise ExerciseError(f"{self.id}: the answer must be a function ({self.task}); got {type(answer).__name__}")
        names = _parameter_names(self.reference)
        results, changed = [], []
        for args in self.cases():
            given = copy.deepcopy(args)
            results.append(answer(*given))
            for name, before, after in zip(names, args, given):
                if isinstance(before, np.ndarray) and not _identical(before, after) and name not in changed:
                    changed.append(name)
        return results, changed

    def agrees(self, got, want) -> bool:
        return _close(got, want, self.rtol, self.atol) or (
            self.min_decimals is not None and _rounded_alike(got, want, self.min_decimals))

    def case_factors(self, args) -> dict:
        if self.factors is None:
            return {}
        return dict(self.factors(*args)) if callable(self.factors) else dict(self.factors)


@dataclass(frozen=True)
class Prediction:
    """A "predict, then verify" question: the notebook records the student's choice, then verifies it."""

    id: str
    question: str
    choices: tuple
    explanation: str  # said when the measurement disagrees with the prediction


def _parameter_names(fn) -> list:
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []


def _identical(a, b) -> bool:
    b = np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b, equal_nan=True))


def _as_array(x):
    try:
        a = np.asarray(to_numpy(x))
    except Exception:
        return None
    return a if a.dtype.kind in "biuf" else None


def _decimals(x: float) -> int:
    text = repr(float(x))
    return 0 if "e" in text or "." not in text else len(text.split(".")[1].rstrip("0"))


def _rounded_alike(got, want, min_decimals: int) -> bool:
    """``got`` is ``want`` rounded to the decimals ``got`` was given with (at least ``min_decimals``)."""
    if isinstance(want, (tuple, list)):
        got = list(got) if isinstance(got, np.ndarray) and got.ndim == 1 else got
        return isinstance(got, (tuple, list)) and len(got) == len(want) and all(
            _rounded_alike(g, w, min_decimals) or _close(g, w, 1e-12, 0.0) for g, w in zip(got, want))
    try:
        g, w = float(got), float(want)
    except (TypeError, ValueError):
        return False
    n = _decimals(g)
    return n >= min_decimals and math.isclose(round(w, n), g, rel_tol=1e-12)


def _close(got, want, rtol, atol) -> bool:
    if isinstance(want, (tuple, list)):
        if isinstance(got, np.ndarray) and got.ndim == 1:  # an array for a tuple of numbers
            got = list(got)
        return isinstance(got, (tuple, list)) and len(got) == len(want) and all(
            _close(g, w, rtol, atol) for g, w in zip(got, want))
    if isinstance(want, dict):
        return isinstance(got, dict) and set(got) == set(want) and all(
            _close(got[k], want[k], rtol, atol) for k in want)
    if isinstance(want, (str, bool)) or want is None:
        return got == want
    g, w = _as_array(got), _as_array(want)
    if g is None or w is None or g.shape != w.shape:
        return False
    if w.dtype.kind in "biu" and g.dtype.kind in "biu":
        return bool(np.array_equal(g, w))
    return bool(np.allclose(g.astype(np.float64), w.astype(np.float64), rtol=rtol, atol=atol))


# ----------------------------------------------------------------- diagnosis by properties
UNIVERSAL_FACTORS = {"-1": -1.0, "8": 8.0, "2": 2.0}
_FACTOR_HINTS = {
    "-1": "the sign is flipped: your result is minus the right one (an added term subtracted, or the other way "
          "round)",
    "8": "a factor of 8 too large: a count in bits where bytes are asked for",
    "1/8": "a factor of 8 too small: a count in bytes where bits are asked for",
}


def _ratio(g, w, tol=1e-6):
    """c with g = c w when such a c exists (to ``tol``, relative), else None."""
    g, w = g.astype(np.float64).ravel(), w.astype(np.float64).ravel()
    ww = float(w @ w)
    if ww == 0:
        return None
    c = float(g @ w) / ww
    if c == 0 or np.linalg.norm(g - c * w) > tol * max(np.linalg.norm(g), 1e-300):
        return None
    return c


def _factor_hint(ratios, named) -> str | None:
    """Name the constant factor by which every case is off, if one is; ``named[i]`` the candidates of case i."""
    def every(test):
        return all(name in n and n[name] != 0 and test(c, float(n[name])) for c, n in zip(ratios, named))

    for name in named[0]:
        if every(lambda c, v: v != round(v) and math.isclose(c * v, math.floor(v), rel_tol=1e-9)):
            return f"{name} was computed with an integer division (//) or int(), which cut off its fraction"
    for name in named[0]:
        if every(lambda c, v: math.isclose(c, v, rel_tol=1e-6)):
            if name in _FACTOR_HINTS:
                return _FACTOR_HINTS[name]
            return (f"your result is {name} times the right one: a factor {name} too many, or a division by {name} "
                    "missing")
        if every(lambda c, v: math.isclose(c, 1 / v, rel_tol=1e-6)) and name != "-1":
            if name == "8":
                return _FACTOR_HINTS["1/8"]
            return (f"your result is the right one divided by {name}: a factor {name} missing, or a division by "
                    f"{name} too many")
    for name in named[0]:
        if name not in UNIVERSAL_FACTORS and (every(lambda c, v: math.isclose(c, v * v, rel_tol=1e-6))
                                              or every(lambda c, v: math.isclose(c * v * v, 1, rel_tol=1e-6))):
            return (f"your result is off by a factor {name} squared: multiplied by {name} where it should be "
                    "divided (or the other way round), or the factor applied twice")
    return None


def _diagnose_arrays(ex, got, want, cases) -> str | None:
    """A hint from the properties of ``got`` (one output per case) against ``want``, or None.

    Only the cases the answer gets wrong are looked at (a mistake in one branch of a function).
    """
    wrong = [i for i, (a, b) in enumerate(zip(got, want)) if not ex.agrees(a, b)] or list(range(len(got)))
    got, want, cases = [got[i] for i in wrong], [want[i] for i in wrong], [cases[i] for i in wrong]
    g = [_as_array(x) for x in got]
    w = [_as_array(x) for x in want]
    if any(x is None for x in g) or any(x is None for x in w):
        return None
    if any(not np.all(np.isfinite(x.astype(np.float64))) for x in g):
        return "your result holds NaN or infinity: a division by zero, or a value used before it is set"
    if any(a.shape != b.shape for a, b in zip(g, w)):
        if all(a.shape == b.shape[::-1] and np.allclose(a, b.T, rtol=ex.rtol, atol=ex.atol) for a, b in zip(g, w)):
            return ("your result is transposed: the right numbers, rows and columns swapped (check the order of a "
                    "product)")
        if all(a.shape == b.shape[::-1] for a, b in zip(g, w)):
            return (f"your result has shape {g[0].shape}, the transpose of the shape it must have: check the order "
                    "of the factors")
        a, b = g[0], w[0]
        if all(x.size == y.size and x.ndim == y.ndim for x, y in zip(g, w)):
            return (f"your result has the right number of entries but shape {a.shape}: it was repeated, reduced or "
                    "reshaped along the wrong axis")
        if a.ndim == b.ndim:
            axes = [i for i in range(a.ndim) if a.shape[i] != b.shape[i]]
            if len(axes) == 1:
                return (f"your result has the wrong size along axis {axes[0]} (shape {a.shape}): check the axis you "
                        "reduce, repeat or slice along")
        return (f"your result has shape {a.shape}, not the shape the task asks for: check the axes and the order "
                "of a product")
    floats_w = [b.astype(np.float64) for b in w]
    floats = [a.astype(np.float64) for a in g]
    if any(not np.all(b == np.round(b)) for b in floats_w):
        for cut in (np.floor, np.trunc, np.round):
            if all(np.array_equal(a, cut(b)) for a, b in zip(floats, floats_w)):
                return ("your result is whole where the right one has a fraction: an integer division (//) or an "
                        "int() cut it off")
    if ex.min_decimals is not None and all(a.size == 1 for a in floats):
        for n in range(ex.min_decimals):
            if all(float(a.ravel()[0]) == round(float(b.ravel()[0]), n) for a, b in zip(floats, floats_w)):
                return (f"rounded too coarsely ({n} decimals): give at least {ex.min_decimals} decimals, or the "
                        "unrounded value")
    named = [{**UNIVERSAL_FACTORS, **ex.case_factors(args)} for args in cases]
    if ex.offset is not None:  # a result W0 + update: look for the factor in the update
        name, base = ex.offset
        offs = [np.asarray(base(*args), dtype=np.float64) for args in cases]
        if all(np.allclose(a, b - o, rtol=ex.rtol, atol=ex.atol) for a, b, o in zip(floats, floats_w, offs)):
            return f"your result is only the update: {name} itself is missing from it"
        if all(np.allclose(a, o) for a, o in zip(floats, offs)):
            return f"your result is {name} unchanged: the update is missing"
        ratios = [_ratio(a - o, b - o, max(1e-6, 10 * ex.rtol)) for a, b, o in zip(floats, floats_w, offs)]
    else:
        ratios = [_ratio(a, b, max(1e-6, 10 * ex.rtol)) for a, b in zip(g, w)]
    if all(c is not None for c in ratios):
        hint = _factor_hint(ratios, named)
        if hint:
            return hint if ex.offset is None else f"in the update added to {ex.offset[0]}, {hint}"
        if len(ratios) > 1 and all(math.isclose(c, ratios[0], rel_tol=1e-6) for c in ratios):
            return ("your result is a constant multiple of the right one (the same ratio on every input): a scale "
                    "factor is wrong")
        if len(ratios) > 1 and len({round(c, 9) for c in ratios}) > 1:
            return ("your result is proportional to the right one on every input, but by a factor that changes "
                    "with the input: a factor that depends on the sizes (r, alpha, group_size, ...) is wrong")
    if not ex.is_function and all(a.size == 1 and abs(float(a.ravel()[0]) - float(b.ravel()[0])) == 1
                                  for a, b in zip(floats, floats_w)):
        return "off by one: check a count, or whether a range includes its end"
    if not ex.is_function and all(a.size == 1 for a in floats):
        for name, value in named[0].items():
            if name not in UNIVERSAL_FACTORS and all(abs(float(a.ravel()[0]) - float(b.ravel()[0])) == value
                                                     for a, b in zip(floats, floats_w)):
                return f"your count is off by exactly {name}: one of them counted once too often, or not at all"
    if all(a.size > 1 and np.allclose(np.sort(a, axis=None), np.sort(b, axis=None)) for a, b in zip(floats, floats_w)):
        return "the right numbers in the wrong order: check which element goes where (an index or a reshape)"
    return None


def _off_by_one(ex, got, cases) -> str | None:
    """A function answer that equals the reference with one integer argument shifted by one."""
    names = _parameter_names(ex.reference)
    for p, value in enumerate(cases[0]):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            continue
        for delta in (1, -1):
            try:
                shifted = [ex.reference(*a[:p], a[p] + delta, *a[p + 1:]) for a in copy.deepcopy(cases)]
            except Exception:
                continue
            if all(ex.agrees(g, s) for g, s in zip(got, shifted)):
                name = names[p] if p < len(names) else f"argument {p + 1}"
                return (f"off by one: your result is what the right one would be with {name} "
                        f"{'+' if delta > 0 else '-'} 1: check a slice bound, a range or a count")
    return None


def _diagnose(ex, got, want, cases) -> str | None:
    for m in ex.mistakes:
        try:
            wrong = ex.outputs(m.answer)
        except Exception:
            continue
        if all(ex.agrees(g, w) for g, w in zip(got, wrong)):
            return m.hint
    for rel in ex.relations:
        try:
            if rel.test is not None:
                if all(rel.test(g, w, args) for g, w, args in zip(got, want, cases)):
                    return rel.hint
                continue
            wrong = [rel.make(w, args) for w, args in zip(want, cases)]
        except Exception:
            continue
        if all(x is not None and ex.agrees(g, x) for g, x in zip(got, wrong)):
            return rel.hint
    if isinstance(want[0], (tuple, list)):
        n = len(want[0])
        got = [list(g) if isinstance(g, np.ndarray) and g.ndim == 1 else g for g in got]
        if not all(isinstance(g, (tuple, list)) and len(g) == n for g in got):
            return f"the answer must be a tuple of {n} ({', '.join(ex.parts) if ex.parts else 'see the task'})"
        if n > 1 and all(ex.agrees(list(g)[::-1], w) for g, w in zip(got, want)):
            return "the parts are in the wrong order: right values, swapped places"
        names = ex.parts or tuple(f"part {i + 1}" for i in range(n))
        wrong = [i for i in range(n) if not all(ex.agrees(g[i], w[i]) for g, w in zip(got, want))]
        hints = []
        for i in wrong:
            inner = _diagnose_arrays(ex, [g[i] for g in got], [w[i] for w in want], cases)
            hints.append(f"{names[i]}: {inner or 'not right'}")
        right = [names[i] for i in range(n) if i not in wrong]
        return "; ".join(hints) + (f" ({', '.join(right)} right)" if right else "")
    if ex.is_function:
        hint = _off_by_one(ex, got, cases)
        if hint:
            return hint
    return _diagnose_arrays(ex, got, want, cases)


# ----------------------------------------------------------------- the registry
_MODULE_PREFIX = "nb"


def _collect() -> tuple[dict, dict]:
    folder = os.path.dirname(os.path.abspath(__file__))
    found, predictions = {}, {}
    for f in sorted(os.listdir(folder)):
        if f.startswith(_MODULE_PREFIX) and f.endswith(".py"):
            mod = importlib.import_module(f"lora_from_scratch.exercises.{f[:-3]}")
            for ex in mod.EXERCISES:
                if ex.id in found:
                    raise ValueError(f"two exercises share the id {ex.id!r}")
                found[ex.id] = ex
            for p in getattr(mod, "PREDICTIONS", ()):
                predictions[p.id] = p
    return found, predictions


_REGISTRY: tuple | None = None


def _registry() -> tuple[dict, dict]:
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = _collect()
    return _REGISTRY


def exercises() -> dict:
    """Every exercise, by id (``"03.merged_weight"``), in notebook order."""
    return _registry()[0]


def predictions() -> dict:
    """Every "predict, then verify" question, by id."""
    return _registry()[1]


def get(exercise_id: str) -> Exercise:
    all_ = exercises()
    if exercise_id not in all_:
        raise ValueError(f"unknown exercise {exercise_id!r}; exercises: {list(all_)}")
    return all_[exercise_id]


# ----------------------------------------------------------------- this session's record
_RECORD: dict = {}  # id -> {"tries": int, "solved": bool, "prediction": ...}


def _note(exercise_id: str, solved: bool) -> None:
    entry = _RECORD.setdefault(exercise_id, {"tries": 0, "solved": False})
    entry["tries"] += 1
    entry["solved"] = entry["solved"] or solved


class Progress(list):
    """Rows (id, title, status) of every exercise and prediction; shown as a table."""

    def __str__(self) -> str:
        width = max(len(r[0]) for r in self) if self else 10
        lines = [f"{'exercise':<{width}}  {'status':<22}  title", f"{'-' * width}  {'-' * 22}  {'-' * 5}"]
        lines += [f"{i:<{width}}  {s:<22}  {t}" for i, t, s in self]
        solved = sum(1 for r in self if r[2].startswith(("solved", "predicted right")))
        lines.append(f"{solved} of {len(self)} done this session")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)

    def _repr_pretty_(self, p, cycle) -> None:  # IPython's text form
        p.text(str(self))

    def _repr_markdown_(self) -> str:
        rows = "\n".join(f"| {i} | {s} | {t} |" for i, t, s in self)
        return f"| exercise | status | title |\n|---|---|---|\n{rows}"


def progress(notebook: str | None = None) -> Progress:
    """Which exercises this session has solved (a table; ``notebook="03"`` for one notebook's)."""
    rows = Progress()
    items = [(e.id, e.title) for e in exercises().values()] + [(p.id, p.question) for p in predictions().values()]
    for ex_id, title in sorted(items, key=lambda x: x[0].split(".")[0]):
        if notebook is not None and not ex_id.startswith(f"{notebook}."):
            continue
        entry = _RECORD.get(ex_id)
        if entry is None:
            status = "not tried"
        elif "prediction" in entry:
            status = {None: f"predicted {entry['prediction']!r}", True: "predicted right",
                      False: "predicted wrong"}[entry.get("right")]
        elif entry["solved"]:
            status = f"solved ({entry['tries']} tries)" if entry["tries"] > 1 else "solved"
        else:
            status = f"not yet ({entry['tries']} tries)"
        rows.append((ex_id, title, status))
    return rows


def reset_progress() -> None:
    """Forget this session's record (for tests)."""
    _RECORD.clear()


# ----------------------------------------------------------------- checking
def check(exercise_id: str, answer, quiet: bool = False) -> None:
    """Check a student's answer: prints one line when it is right, raises ExerciseError otherwise."""
    ex = get(exercise_id)
    if answer is None or answer is Ellipsis:
        raise ExerciseError(f"{ex.id} is not answered yet: {ex.task}")
    try:
        got, changed = ex.run(answer)
    except NotImplementedError:
        raise ExerciseError(f"{ex.id} is not answered yet (the function still raises NotImplementedError): "
                            f"{ex.task}") from None
    except ExerciseError:
        raise
    except Exception as e:  # the student's code failed: say how
        _note(ex.id, False)
        raise ExerciseError(f"{ex.id}: your answer raised {type(e).__name__}: {e}") from e
    if changed:
        _note(ex.id, False)
        raise ExerciseError(f"{ex.id}: not yet. Your function changed its input {', '.join(changed)} in place "
                            "(an in-place operation such as +=, -= or a slice assignment): the caller's array must "
                            "stay as it was, so compute a new array.")
    cases = ex.cases() if ex.is_function else [()]
    want = ex.outputs(ex.reference)
    if all(ex.agrees(g, w) for g, w in zip(got, want)):
        _note(ex.id, True)
        if not quiet:
            what = f" on {len(want)} inputs" if ex.is_function else ""
            print(f"{ex.id} correct{what}: {ex.title}")
        return
    _note(ex.id, False)
    hint = _diagnose(ex, got, want, cases)
    if hint:
        raise ExerciseError(f"{ex.id}: not yet. {hint}")
    raise ExerciseError(f"{ex.id}: not yet: the answer does not match, and it is none of the typical mistakes this "
                        f"checker knows. Re-read the task: {ex.task}")


def predict(prediction_id: str, choice) -> None:
    """Record a prediction (one of the question's choices); the notebook verifies it after measuring."""
    p = predictions().get(prediction_id)
    if p is None:
        raise ValueError(f"unknown prediction {prediction_id!r}; predictions: {list(predictions())}")
    if choice is None or choice is Ellipsis:
        raise ExerciseError(f"{p.id} is not answered yet: {p.question} (one of {p.choices})")
    if choice not in p.choices:
        raise ExerciseError(f"{p.id}: the prediction must be one of {p.choices}; got {choice!r}")
    _RECORD[p.id] = {"tries": 1, "solved": False, "prediction": choice, "right": None}
    print(f"{p.id}: prediction recorded ({choice!r}); the measurement comes next")


def verify_prediction(prediction_id: str, measured) -> None:
    """Compare the recorded prediction with what was measured; raises ExerciseError if they differ."""
    p = predictions()[prediction_id]
    entry = _RECORD.get(p.id)
    if entry is None or "prediction" not in entry:
        raise ExerciseError(f"{p.id}: no prediction recorded: run predict({p.id!r}, ...) first ({p.question})")
    entry["right"] = entry["prediction"] == measured
    entry["solved"] = entry["right"]
    if not entry["right"]:
        raise ExerciseError(f"{p.id}: the measurement is {measured!r}, your prediction was {entry['prediction']!r}. "
                            f"{p.explanation}")
    print(f"{p.id}: your prediction {measured!r} is what was measured")


__all__ = ["Exercise", "ExerciseError", "Mistake", "Prediction", "Relation", "check", "exercises", "get",
           "predict", "predictions", "progress", "reset_progress", "verify_prediction"]
