"""Numerical gradient checks: float64 central differences.

For a function f and a random upstream gradient G, the scalar
L(x) = sum(f(x) * G) has dL/dx equal to what a backward pass returns when it
is fed G. Central differences estimate it entry by entry,

    dL/dx[i] ~ (L(x + h e_i) - L(x - h e_i)) / (2 h),

with an error of order h^2 (truncation) plus eps_machine / h (rounding);
h = 1e-6 in float64 keeps both near 1e-10. Used by the tests for every
backward in the package (cs231n's gradient_check.py is the classic).
"""

from __future__ import annotations

import numpy as np

from .backend import to_numpy, xp_of


def rel_error(a, b) -> float:
    """Norm-wise relative error ||a - b|| / ||b|| (the measure every test here states)."""
    a, b = to_numpy(a).astype(np.float64), to_numpy(b).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_error: shapes differ, {a.shape} vs {b.shape}")
    nb = np.linalg.norm(b)
    if nb == 0.0:
        return float(np.linalg.norm(a))
    return float(np.linalg.norm(a - b) / nb)


def numerical_gradient(loss_fn, x, h: float = 1e-6):
    """Central-difference gradient of the scalar ``loss_fn()`` w.r.t. the array ``x`` (perturbed in place)."""
    if x.dtype != np.float64:
        raise ValueError(f"gradient checks need float64 arrays, got {x.dtype}")
    if not x.flags.c_contiguous:
        raise ValueError("numerical_gradient perturbs x in place through a flat view; x must be C-contiguous")
    xp = xp_of(x)
    grad = xp.zeros_like(x)  # (shape of x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = float(flat[i])
        flat[i] = old + h
        plus = float(loss_fn())
        flat[i] = old - h
        minus = float(loss_fn())
        flat[i] = old
        gflat[i] = (plus - minus) / (2.0 * h)
    return grad


def check_gradients(forward, backward, inputs: dict, seed: int = 0, h: float = 1e-6) -> dict:
    """Compare a hand-written backward with central differences for every array in ``inputs``.

    ``forward()`` reads the arrays of ``inputs`` (which are perturbed in place)
    and returns the output array; ``backward(G)`` returns a dict name -> gradient
    for the same names, for upstream gradient G. Returns name -> rel error.
    """
    out = forward()
    xp = xp_of(out)
    G = xp.asarray(np.random.default_rng(seed).standard_normal(out.shape))  # (shape of out)
    analytic = backward(G)

    def loss():
        return (forward() * G).sum()

    errors = {}
    for name, arr in inputs.items():
        numeric = numerical_gradient(loss, arr, h)
        errors[name] = rel_error(analytic[name], numeric)
    return errors
