"""Shared test configuration: the backend under test, seeds, and the GPU marker.

``LFS_BACKEND=cupy pytest`` runs the suite on the GPU: test data is still made
with NumPy on the host and moved with ``backend.asarray``.
"""

import numpy as np
import pytest

from lora_from_scratch.backend import asarray, get_backend_name, get_xp, is_cupy_array, to_numpy


def _cupy_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _cupy_available():
        return
    skip = pytest.mark.skip(reason="needs CuPy and an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def host_rng():
    """A seeded NumPy generator for test data (made on the host, then moved)."""
    return np.random.default_rng(1234)


def rel(a, b) -> float:
    """||a - b|| / ||b|| in float64 over the whole array (the measure every tolerance here uses)."""
    a = to_numpy(a).astype(np.float64)
    b = to_numpy(b).astype(np.float64)
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


BACKEND = get_backend_name()


class Backend:
    """The backend the suite runs on (``LFS_BACKEND``, NumPy by default).

    Test data is made on the host with NumPy and moved with ``put``; ``owns(a)`` says whether an
    array lives on this backend, ``host(a)`` brings it back as NumPy.
    """

    def __init__(self, name: str):
        self.name = name
        self.xp = get_xp()

    def put(self, a, dtype=None):
        return asarray(a, dtype=dtype)

    def host(self, a):
        return to_numpy(a)

    def owns(self, a) -> bool:
        return is_cupy_array(a) == (self.name == "cupy")


@pytest.fixture(scope="session")
def backend():
    """The backend under test: every layer kind's tests take their arrays from it."""
    return Backend(BACKEND)


def adapter_gradient_errors(layer, x, **forward_kwargs) -> dict:
    """Central-difference check of an adapter layer (LoRA, QLoRA, QA-LoRA): rel errors of dx, dA, dB.

    The comparison is ``verify.adapter_gradients``, the one ``python -m lora_from_scratch verify`` prints.
    """
    from lora_from_scratch.verify import adapter_gradients

    return {m.what: m.error for m in adapter_gradients(layer, x, **forward_kwargs)}
