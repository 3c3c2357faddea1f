"""A CPU stand-in for "this code never waits on the GPU": arrays that refuse to be read on the host.

Under CuPy, every ``int()``, ``float()``, ``bool()``, ``.item()``, ``.tolist()``,
``if array:`` or ``to_numpy`` of a device array copies it to the host, which
waits for all the queued GPU work: a host synchronization. On the CPU nothing
waits, so such a line goes unnoticed. Here NumPy arrays are viewed as
``TrappedArray``, a subclass whose host conversions raise ``HostSync`` while
a ``no_host_sync()`` block is active (outside one it behaves like a plain
ndarray, so test code can inspect results afterwards).

What propagates the trap: ufuncs, matmul, reductions (0-d results stay
``TrappedArray``), reshapes, views, ``astype``, ``copy`` and indexing of a
trapped array. Scalar indexing, which NumPy answers with a NumPy scalar
(outside the trap), is wrapped back into a 0-d ``TrappedArray``. Arrays that the
code makes itself (``xp.zeros``, ``xp.where``, ``xp.stack``, ...) would be plain
ndarrays, so inside ``no_host_sync()`` the package's ``xp_of`` answers with
a NumPy namespace whose functions return trapped arrays: everything a forward
or backward makes is trapped too. The package's ``to_numpy``, ``asarray`` and
``like`` are patched to count a trapped array crossing to the host (or a host
array crossing onto the "device") as a sync. Indexing *with* a trapped
integer array (``W[ids]``, ``np.add.at``) works as with a plain one.

Limits, honestly: this catches Python-level reads of array values; it cannot
see a NumPy routine that silently converts to the host (there is none on the
CPU to see), CuPy-only paths, or a sync hidden in a library call that takes
a plain ndarray. It is a check of the code's *shape*, not a GPU profile.
Two side effects: the trapped namespace counts as a backend of its own, so a
cache keyed by backend (a Dropout layer's generator, lookup tables keyed by
``xp.__name__``) is filled afresh the first time a model runs trapped, and a
cache filled by a one-time sync should be warmed by one run outside the trap.

Typical use (any model built from ``lora_from_scratch.nn`` modules)::

    trap_module(model)                 # every parameter / buffer .data becomes a trapped view
    ids = trap(host_ids)
    with no_host_sync():               # any host sync in here raises HostSync
        logits = model(ids, check=False)
    with no_host_sync(allow=1) as log: # or count them
        model(ids)
    assert len(log.events) == 1
"""

from __future__ import annotations

import contextlib
import sys
import types

import numpy as np

from lora_from_scratch import backend


class HostSync(AssertionError):
    """A device value was read on the host inside ``no_host_sync()``."""


class SyncLog:
    """What crossed to the host inside one ``no_host_sync`` block: ``events`` lists one description each."""

    def __init__(self, allow: int):
        self.allow = allow
        self.events: list[str] = []

    def record(self, what: str) -> None:
        self.events.append(what)
        if len(self.events) > self.allow:
            raise HostSync(f"host synchronization: {what} (sync {len(self.events)}, {self.allow} allowed)")


_ACTIVE: list[SyncLog] = []


def _sync(what: str) -> None:
    if _ACTIVE:
        _ACTIVE[-1].record(what)


class TrappedArray(np.ndarray):
    """An ndarray whose host conversions count as host synchronizations (they raise inside ``no_host_sync``)."""

    def __bool__(self):
        _sync("bool() of an array (an `if array:` or `and`/`or`)")
        return np.ndarray.__bool__(self)

    def __int__(self):
        _sync("int() of an array")
        return np.ndarray.__int__(self)

    def __float__(self):
        _sync("float() of an array")
        return np.ndarray.__float__(self)

    def __complex__(self):
        _sync("complex() of an array")
        return np.ndarray.__complex__(self)

    def __index__(self):
        _sync("an array used as a Python integer (__index__)")
        return np.ndarray.__index__(self)

    def __format__(self, spec):
        _sync("formatting an array's value")
        return np.ndarray.__format__(self.view(np.ndarray), spec)

    def __contains__(self, value):
        _sync("`in` on an array (a bool on the host)")
        return np.ndarray.__contains__(self, value)

    def item(self, *args):
        _sync(".item()")
        return np.ndarray.item(self, *args)

    def tolist(self):
        _sync(".tolist()")
        return np.ndarray.tolist(self)

    def __getitem__(self, key):
        out = np.ndarray.__getitem__(self, key)
        if not isinstance(out, np.ndarray):  # a NumPy scalar would leave the trap; CuPy gives a 0-d array
            out = np.asarray(out).view(TrappedArray)
        return out

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


def _rewrapping(name):
    method = getattr(np.ndarray, name)

    def wrapped(self, *args, **kwargs):
        return _wrap_result(method(self, *args, **kwargs))

    wrapped.__name__ = name
    return wrapped


# the methods that NumPy answers with a NumPy scalar (or plain arrays) even for a subclass: CuPy gives 0-d arrays
for _name in ("argmax", "argmin", "dot", "trace", "searchsorted", "nonzero", "argsort", "argpartition"):
    setattr(TrappedArray, _name, _rewrapping(_name))


def trap(a):
    """A trapped view of a NumPy array (no copy; writes through). Non-arrays pass through unchanged."""
    if isinstance(a, TrappedArray):
        return a
    if isinstance(a, np.ndarray):
        return a.view(TrappedArray)
    if isinstance(a, np.generic):
        return np.asarray(a).view(TrappedArray)
    return a


def untrap(a):
    """A plain ndarray view of a trapped array (anything else unchanged)."""
    return a.view(np.ndarray) if isinstance(a, TrappedArray) else a


def is_trapped(a) -> bool:
    return isinstance(a, TrappedArray)


def trap_module(module):
    """Replace ``.data`` of every parameter and buffer of ``module`` with a trapped view; returns ``module``.

    Views share memory, so in-place updates (AdamW's) land in the same storage. Gradients made
    by a trapped forward and backward are trapped too.
    """
    holders = module.named_arrays() if hasattr(module, "named_arrays") else module.named_parameters()
    for _, a in holders:
        a.data = trap(a.data)
        if getattr(a, "grad", None) is not None:
            a.grad = trap(a.grad)
    return module


def untrap_module(module):
    """Undo ``trap_module`` (plain ndarray views of the same memory)."""
    holders = module.named_arrays() if hasattr(module, "named_arrays") else module.named_parameters()
    for _, a in holders:
        a.data = untrap(a.data)
        if getattr(a, "grad", None) is not None:
            a.grad = untrap(a.grad)
    return module


# ------------------------------------------------------------------ the trapped NumPy namespace
def _wrap_result(r):
    if isinstance(r, (np.ndarray, np.generic)):
        return trap(r)
    if isinstance(r, tuple):
        return tuple(_wrap_result(x) for x in r)
    if isinstance(r, list):
        return [_wrap_result(x) for x in r]
    return r


class _Callable:
    """A NumPy function or ufunc whose array results come back trapped; other attributes (``.at``) delegate."""

    def __init__(self, fn):
        self._fn = fn

    def __call__(self, *args, **kwargs):
        return _wrap_result(self._fn(*args, **kwargs))

    def __getattr__(self, name):
        return getattr(self._fn, name)


class _TrappedNumpy(types.ModuleType):
    """``numpy`` (or one of its submodules) as ``xp``: the same names, with functions whose array results
    are trapped. Its ``__name__`` is ``"numpy_trapped"``, so caches keyed by ``xp.__name__`` stay apart."""

    def __init__(self, module=np, name="numpy_trapped"):
        super().__init__(name)
        self._module = module
        self._cache = {}

    def __getattr__(self, name):
        d = self.__dict__
        if name.startswith("__") or "_module" not in d:
            raise AttributeError(name)
        cache = d["_cache"]
        if name not in cache:
            obj = getattr(d["_module"], name)
            if isinstance(obj, types.ModuleType):
                obj = _TrappedNumpy(obj, f"{self.__name__}.{name}")  # np.linalg, np.random, ...
            elif callable(obj) and not isinstance(obj, type):
                obj = _Callable(obj)
            cache[name] = obj  # dtypes, classes and constants as they are
        return cache[name]


TRAPPED_NUMPY = _TrappedNumpy()


def _patched(originals):
    xp_of, to_numpy, asarray, like = (originals[k] for k in ("xp_of", "to_numpy", "asarray", "like"))

    def trapped_xp_of(*arrays):
        xp = xp_of(*arrays)
        return TRAPPED_NUMPY if xp is np else xp

    def trapped_to_numpy(a):
        if is_trapped(a):
            _sync("to_numpy() of a device array (a device-to-host copy)")
            return np.asarray(untrap(a))
        return to_numpy(a)

    def trapped_asarray(a, dtype=None):
        if is_trapped(a):  # the default backend is NumPy here: moving a "device" array onto it is a download
            _sync("asarray() of a device array onto the host backend")
            return np.asarray(untrap(a), dtype=dtype)
        return asarray(a, dtype=dtype)

    def trapped_like(reference, a):
        if is_trapped(reference) == is_trapped(a):
            return a if is_trapped(a) else like(reference, a)  # the same side: no copy
        if is_trapped(reference):
            _sync("like(): a host array copied onto the device")
            return trap(np.asarray(to_numpy(a)))
        _sync("like(): a device array copied to the host")
        return np.asarray(untrap(a))

    return {"xp_of": trapped_xp_of, "to_numpy": trapped_to_numpy, "asarray": trapped_asarray, "like": trapped_like}


def _package_modules():
    return [m for name, m in list(sys.modules.items())
            if m is not None and (name == "lora_from_scratch" or name.startswith("lora_from_scratch."))]


@contextlib.contextmanager
def no_host_sync(allow: int = 0):
    """Inside: reading a trapped array on the host is recorded, and the sync past ``allow`` raises ``HostSync``.

    Yields a ``SyncLog`` (``.events``). Also swaps the package's ``xp_of``, ``to_numpy``,
    ``asarray`` and ``like`` (wherever a package module imported them) for trapped versions,
    and puts them back on exit.
    """
    originals = {k: getattr(backend, k) for k in ("xp_of", "to_numpy", "asarray", "like")}
    replacements = _patched(originals)
    swapped = []
    for mod in _package_modules():
        for name, original in originals.items():
            if vars(mod).get(name) is original:
                swapped.append((mod, name, original))
                setattr(mod, name, replacements[name])
    log = SyncLog(allow)
    _ACTIVE.append(log)
    try:
        yield log
    finally:
        _ACTIVE.pop()
        for mod, name, original in swapped:
            setattr(mod, name, original)
