"""The array backend: NumPy on the CPU, CuPy on a GPU, chosen at run time.

Every computation in the package takes its array module from its inputs,
``xp = xp_of(x, W)``, so the same code runs on either backend. New arrays
(parameters, data batches) are made on the *default* backend, which is NumPy
unless ``set_backend("cupy")`` was called or the environment variable
``LFS_BACKEND=cupy`` is set. CuPy is imported lazily, never at import time,
so the package works on machines without a GPU.

Host <-> device copies happen only at the edges (``to_numpy`` for plotting,
saving and metrics; ``asarray`` for loading); never inside a forward or
backward pass.
"""

from __future__ import annotations

import os
import types

import numpy as np

from .checks import check_choice

_VALID = ("numpy", "cupy")
_default_name: str | None = None
CUPY_NEEDS = "needs CuPy and an NVIDIA GPU: pip install cupy-cuda12x (or pip install .[gpu])"


class BackendUnavailable(RuntimeError):
    """The backend asked for cannot run here (CuPy not installed, or no GPU); the message says how to get it.

    ``why``: what failed here (the import error, or no GPU found).
    """

    def __init__(self, why: str):
        self.why = why
        super().__init__(f"backend 'cupy' {CUPY_NEEDS} ({why})")


def _cupy():
    """Import CuPy on first use, with an error that says how to get it."""
    try:
        import cupy  # noqa: PLC0415  (lazy on purpose)
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise BackendUnavailable(f"import cupy: {e}") from e
    return cupy


def set_backend(name: str) -> None:
    """Choose the default backend for new arrays: ``"numpy"`` or ``"cupy"``.

    ``"cupy"`` is checked now, not at the first array: CuPy must import and see a GPU
    (``BackendUnavailable``, a RuntimeError, says how to get it); an unknown name is a ValueError.
    """
    global _default_name
    check_choice("backend", name, _VALID)
    if name == "cupy":
        cupy = _cupy()
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as e:  # pragma: no cover - depends on the machine (CUDA driver missing, ...)
            raise BackendUnavailable(f"no usable GPU: {e}") from None
        if count < 1:  # pragma: no cover - depends on the machine
            raise BackendUnavailable("no GPU found")
    _default_name = name


def get_backend_name() -> str:
    """The default backend's name (reads ``LFS_BACKEND`` the first time)."""
    global _default_name
    if _default_name is None:
        env = os.environ.get("LFS_BACKEND", "numpy").strip().lower() or "numpy"
        set_backend(env)
    return _default_name


def get_xp() -> types.ModuleType:
    """The default array module (``numpy`` or ``cupy``)."""
    return _cupy() if get_backend_name() == "cupy" else np


def is_cupy_array(a) -> bool:
    """True for a CuPy array, without importing CuPy."""
    return type(a).__module__.split(".")[0] == "cupy"


def xp_of(*arrays) -> types.ModuleType:
    """The array module of the inputs: ``cupy`` if any is a CuPy array, else ``numpy``."""
    return _cupy() if any(is_cupy_array(a) for a in arrays) else np


def to_numpy(a) -> np.ndarray:
    """A NumPy copy (or view) of an array of either backend; Python scalars pass through ``np.asarray``."""
    return a.get() if is_cupy_array(a) else np.asarray(a)


def asarray(a, dtype=None):
    """Move ``a`` onto the default backend (no copy when it is already there)."""
    xp = get_xp()
    if xp is np:
        return np.asarray(to_numpy(a), dtype=dtype)
    return xp.asarray(a, dtype=dtype)


def scatter_add(target, indices, values) -> None:
    """``target[indices] += values`` with repeated indices accumulated, on either backend.

    NumPy spells it ``np.add.at``; CuPy spells it ``cupyx.scatter_add``.
    """
    if is_cupy_array(target):
        import cupyx  # noqa: PLC0415

        cupyx.scatter_add(target, indices, values)
    else:
        np.add.at(target, indices, values)


def rng(seed: int | None = None) -> np.random.Generator:
    """A seeded host random generator: random data is made on the host, then moved."""
    return np.random.default_rng(seed)


_GLOBAL_RNG = np.random.default_rng(0)


def manual_seed(seed: int) -> None:
    """Reseed the host generator that initializes new layers when none is passed."""
    global _GLOBAL_RNG
    _GLOBAL_RNG = np.random.default_rng(seed)


def global_rng() -> np.random.Generator:
    """The package-wide host generator (seeded with 0 at import; see ``manual_seed``)."""
    return _GLOBAL_RNG


def device_rng(xp, seed: int | None = None):
    """A random generator that draws directly on the backend ``xp`` (for dropout masks)."""
    return xp.random.default_rng(seed)


def like(reference, a):
    """``a`` moved onto the backend of ``reference`` (no copy when already there)."""
    if is_cupy_array(reference):
        return _cupy().asarray(a)
    return np.asarray(to_numpy(a))


def like_of(reference, a):
    """``a`` on the backend *and* in the dtype of ``reference`` (``like`` then ``astype``: always a copy)."""
    return like(reference, a).astype(reference.dtype)
