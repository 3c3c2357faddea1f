"""Argument checks, written once: integers in a range, powers of two, finite numbers, a choice among names.

Every function of the package that takes a count, a rank, a bit width, a group or block size
calls these, so the same input gets the same answer everywhere:

- an integer is a Python ``int`` or a NumPy integer (``np.int64(8)`` is as good as ``8``);
  ``True``, ``np.True_``, ``8.0`` and 0-d arrays are refused, never rounded or read as 1;
- the value comes back as a Python ``int`` (a NumPy integer would otherwise leak into shapes,
  JSON and f-strings);
- the error is a ``ValueError`` that names the argument, the range it must lie in and the
  value it got: ``bits must be an integer between 2 and 8, got 9``.

Nothing here imports NumPy or anything else of the package: any module may use it.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from numbers import Integral, Real

__all__ = ["check_choice", "check_int", "check_number", "check_power_of_two", "is_int"]


def is_int(value) -> bool:
    """True for a Python or NumPy integer, False for a bool (``np.bool_`` included), a float or anything else."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def _span(low, high) -> str:
    if low is not None and high is not None:
        return f"an integer between {low} and {high}"
    if low == 1:
        return "a positive integer"
    if low is not None:
        return f"an integer >= {low}"
    if high is not None:
        return f"an integer <= {high}"
    return "an integer"


def check_int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """``value`` as a Python int if it is an integer with ``low <= value <= high`` (either bound optional).

    Otherwise a ValueError: ``"{name} must be an integer between {low} and {high}, got {value!r}"``
    (``"a positive integer"`` when ``low`` is 1 and there is no ``high``).
    """
    if not is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be {_span(low, high)}, got {value!r}")
    return int(value)


def check_power_of_two(name: str, value, low: int, high: int) -> int:
    """``value`` as a Python int if it is a power of two from ``low`` to ``high``; else a ValueError naming it."""
    if not is_int(value) or not low <= value <= high or int(value) & (int(value) - 1):
        raise ValueError(f"{name} must be a power of two between {low} and {high}, got {value!r}")
    return int(value)


def check_choice(name: str, value, choices):
    """``value`` if it is one of ``choices``; else ``ValueError("unknown {name} 'x'; valid {name}s: [...]")``."""
    choices = list(choices)
    if not isinstance(value, Hashable) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid {name}s: {choices}")
    return value


def check_number(name: str, value, low: float | None = None, high: float | None = None,
                 above: float | None = None) -> float:
    """``value`` as a float if it is a finite real number (not a bool) with ``low <= value <= high`` and
    ``value > above`` (each bound optional); else a ValueError naming it and the bounds."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (low is not None and value < low) or (high is not None and value > high) or (
            above is not None and value <= above):
        bounds = [f"> {above}" if above is not None else None, f">= {low}" if low is not None else None,
                  f"<= {high}" if high is not None else None]
        span = " and ".join(b for b in bounds if b)
        raise ValueError(f"{name} must be a finite number{' ' + span if span else ''}, got {value!r}")
    return float(value)
