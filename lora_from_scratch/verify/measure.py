"""Measurements: an error and the bound it must stay under (shared by every comparison and the tests).
"""

from __future__ import annotations

import math
from typing import NamedTuple

from ..backend import to_numpy
from ..gradcheck import rel_error

INSTALL = "pip install torch==2.13.0 && pip install -r requirements-dev.txt"
REFERENCES = ("torch", "transformers", "peft", "bitsandbytes")

TORCH_TOL = {"float64": 1e-10, "float32": 1e-5}  # our layer against torch autograd, same weights
GRADCHECK_TOL = 1e-7  # a backward against float64 central differences


# ============================================================================ measurements
class Measurement(NamedTuple):
    """One measured error and the bound it must stay under (``error < bound``; a count must be 0)."""

    what: str
    error: float
    bound: float

    @property
    def ok(self) -> bool:
        if self.bound == 0:
            return self.error == 0
        return self.error < self.bound  # False for NaN


class Mismatch(AssertionError):
    """The comparison could not be made as stated: a dtype, a name, a shape, or a vacuous reference."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise Mismatch(message)


def assert_ok(measurements) -> list:
    """Raise AssertionError naming every measurement out of bounds; return the measurements."""
    measurements = list(measurements)
    if not measurements:
        raise Mismatch("no measurement was made")
    bad = [m for m in measurements if not m.ok]
    if bad:
        raise AssertionError("; ".join(f"{m.what}: {m.error:.3e} not below {m.bound:g}" for m in bad))
    return measurements


def worst(measurements) -> Measurement:
    """The measurement closest to (or furthest past) its bound."""

    def ratio(m):
        if m.bound == 0:
            return math.inf if m.error != 0 else 0.0
        return math.inf if m.error != m.error else m.error / m.bound

    return max(measurements, key=ratio)


def _norm(a) -> float:
    h = to_numpy(a).astype("float64")  # any shape, float64 on the host
    return math.sqrt(float((h * h).sum()))


def _max_abs(a, b) -> float:
    d = to_numpy(a).astype("float64") - to_numpy(b).astype("float64")  # same shape, float64
    return float(abs(d).max())


def _host_array(t):
    """A torch tensor (or any array) as a host array."""
    if hasattr(t, "detach"):
        return t.detach().cpu().numpy()
    return to_numpy(t)


def _rel(what: str, ours, ref, bound: float) -> Measurement:
    return Measurement(what, rel_error(ours, _host_array(ref)), bound)
