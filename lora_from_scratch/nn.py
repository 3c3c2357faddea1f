"""Parameters, modules and the thin layer classes over ``functional``.

A ``Parameter`` is an array (``.data``) with a gradient slot (``.grad``) and
a ``.trainable`` flag. Freezing is the whole idea of LoRA (Hu et al., 2021,
section 4.1: "W0 is frozen and does not receive gradient updates"), so here
it is explicit: a layer whose weight is frozen never forms that weight's
gradient (``need_dW=False`` in ``functional.linear_backward``), and the
optimizers give it no state.

A ``Buffer`` is a frozen array that is not a parameter at all: the packed
4-bit codes and block constants of a quantized weight, the scales and zero
points of a group-wise one. It never has a gradient and no optimizer sees it,
yet it belongs to its layer like a parameter does: module traversal lists it
(``named_buffers``), ``Module.to`` moves it, memory accounting counts it and
checkpoints store it (``state_dict`` holds parameters and buffers).

A ``Module`` owns Parameters, Buffers and child Modules, calls the pure functions of
``functional`` in ``forward``, keeps the cache of its *last* forward, and
turns an upstream gradient into parameter gradients in ``backward``. A
second forward before the backward replaces the cache; a layer used twice
in one pass (the tied LM head) is therefore handled by the GPT with the
pure functions and a cache of its own.

Inference keeps nothing for a backward: inside ``with no_grad():`` every module drops the cache
of its forward as soon as that forward returns (``Module.__call__``), so the activations of a
layer are freed once the next layer has read them, and only the largest temporaries of one layer
(and the logits) are ever alive at once. A backward inside ``no_grad`` raises.
"""

from __future__ import annotations

import contextlib
import math

from . import functional as F
from .backend import asarray, device_rng, get_backend_name, get_xp, global_rng, like_of, xp_of

FLOAT_DTYPES = ("float16", "float32", "float64")  # what a model computes in (NumPy and CuPy have all three)


def check_float_dtype(dtype) -> str:
    """The name of ``dtype`` if it is one of ``FLOAT_DTYPES``; ValueError naming it otherwise.

    An integer dtype would turn every weight into zeros (``astype`` truncates), and the float
    arithmetic of every layer assumes a floating dtype.
    """
    try:
        name = str(get_xp().dtype(dtype))  # NumPy's dtype (CuPy uses NumPy's dtypes)
    except TypeError:
        name = None
    if name not in FLOAT_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not a floating-point dtype the model computes in; "
                         f"use one of {list(FLOAT_DTYPES)}")
    return name


class _Array:
    """What a Parameter and a Buffer share: they hold one array, ``.data``, and describe it."""

    data = None

    @property
    def shape(self):
        return tuple(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def size(self) -> int:
        return int(self.data.size)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


class Parameter(_Array):
    """An array with a gradient slot; ``trainable=False`` freezes it."""

    def __init__(self, data, trainable: bool = True):
        self.data = data
        self.grad = None
        self.trainable = trainable

    def accumulate(self, g) -> None:
        """Add ``g`` to ``.grad`` (gradients of a parameter used twice add up)."""
        if g.shape != self.data.shape:
            raise ValueError(f"gradient shape {tuple(g.shape)} does not match parameter {self.shape}")
        self.grad = g if self.grad is None else self.grad + g

    def __repr__(self) -> str:
        flag = "" if self.trainable else ", frozen"
        return f"Parameter(shape={self.shape}, dtype={self.dtype}{flag})"


class Buffer(_Array):
    """A frozen array that belongs to a layer but never trains (quantized codes, block constants, zero points).

    ``castable=False`` marks the fixed-precision parts of a storage format (NF4's float32 block
    constants, say): ``Module.astype`` leaves those as they are.
    """

    trainable = False  # a buffer is never trained and has no gradient
    grad = None

    def __init__(self, data, castable: bool = True):
        self.data = data
        self.castable = castable

    def __repr__(self) -> str:
        return f"Buffer(shape={self.shape}, dtype={self.dtype})"


_grad_enabled = True  # False inside no_grad(): forwards keep no cache, backwards raise


def is_grad_enabled() -> bool:
    """Whether forwards keep the caches a backward needs (False inside ``no_grad()``)."""
    return _grad_enabled


@contextlib.contextmanager
def no_grad():
    """Inference mode: inside it, forwards keep no backward caches and every ``backward`` raises.

    ``with no_grad(): logits = model(idx)`` computes the same logits as outside, but each module
    forgets its forward's cache (its input, attention probabilities, ...) when the forward returns.
    Nests, restores the previous mode on exit (an exception included), and also works as a decorator.
    """
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not name or "." in name or name.startswith("_") or not name.isprintable():
        raise ValueError(f"{what} name must be a non-empty string without '.' that does not start with '_', "
                         f"got {name!r}")
    return name


class Module:
    """Base class: finds Parameters, Buffers and child Modules among its attributes, in definition order.

    Calling a module runs its ``forward``; inside ``no_grad()`` the call then drops the cache the
    forward kept (``self._cache``, the one place every module keeps it). A backward takes that
    cache with ``_need_cache``, which raises inside ``no_grad()`` and when there is no cache.
    """

    training = True

    def __call__(self, *args, **kwargs):
        out = self.forward(*args, **kwargs)
        if not _grad_enabled and "_cache" in vars(self):
            self._cache = None  # inference: nothing is kept for a backward
        return out

    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, dy):  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- traversal
    def _items(self):
        for name, value in vars(self).items():
            if isinstance(value, (Parameter, Buffer, Module)):
                yield name, value

    def named_modules(self, prefix: str = ""):
        """Yields (dotted name, module) for this module and every descendant."""
        yield prefix, self
        for name, value in self._items():
            if isinstance(value, Module):
                yield from value.named_modules(f"{prefix}.{name}" if prefix else name)

    def _named(self, kind, prefix: str, seen: set):
        for name, value in self._items():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(value, Module):
                yield from value._named(kind, full, seen)
            elif isinstance(value, kind) and id(value) not in seen:
                seen.add(id(value))
                yield full, value

    def named_parameters(self, prefix: str = ""):
        """Yields (dotted name, Parameter), each Parameter once (first name wins)."""
        yield from self._named(Parameter, prefix, set())

    def named_buffers(self, prefix: str = ""):
        """Yields (dotted name, Buffer), each Buffer once: the frozen arrays that are not parameters."""
        yield from self._named(Buffer, prefix, set())

    def named_arrays(self, prefix: str = ""):
        """Parameters and buffers together, (dotted name, holder): everything ``state_dict`` stores."""
        yield from self._named((Parameter, Buffer), prefix, set())

    def get_submodule(self, path: str) -> Module:
        """The module at a dotted path (``"blocks.0.attn.q"``); ``""`` is this module. KeyError names the path."""
        module = self
        for part in path.split(".") if path else ():
            child = vars(module).get(part) if not isinstance(module, ModuleDict) else module._modules.get(part)
            if not isinstance(child, Module):
                raise KeyError(f"no submodule {path!r} (stopped at {part!r})")
            module = child
        return module

    def set_submodule(self, path: str, new: Module) -> None:
        """Replace the module at a dotted path by ``new`` (its parent must exist)."""
        if not path:
            raise ValueError("set_submodule needs a non-empty path")
        parent_path, _, name = path.rpartition(".")
        parent = self.get_submodule(parent_path)
        if isinstance(parent, ModuleDict):
            parent[name] = new
            return
        if not isinstance(vars(parent).get(name), Module):
            raise KeyError(f"no submodule {path!r} to replace")
        setattr(parent, name, new)

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def trainable_parameters(self):
        return [p for _, p in self.named_parameters() if p.trainable]

    # ---- state
    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def train(self, mode: bool = True):
        for _, m in self.named_modules():
            m.training = mode
        return self

    def eval(self):
        return self.train(False)

    def freeze(self):
        """Mark every parameter frozen (no gradient, no optimizer state)."""
        for p in self.parameters():
            p.trainable = False
        return self

    def unfreeze(self):
        for p in self.parameters():
            p.trainable = True
        return self

    def astype(self, dtype):
        """Cast every floating parameter (and castable floating buffer) to ``dtype`` (``"float64"`` for gradchecks)."""
        dtype = check_float_dtype(dtype)
        for _, a in self.named_arrays():
            if a.data.dtype.kind == "f" and (isinstance(a, Parameter) or a.castable):
                a.data = a.data.astype(dtype)
                if isinstance(a, Parameter):
                    a.grad = None
        self._drop_caches()
        return self

    def to(self, backend: str):
        """Move every parameter and buffer to ``"numpy"`` or ``"cupy"`` (gradients and caches are dropped)."""
        from .backend import set_backend

        previous = get_backend_name()
        set_backend(backend)
        try:
            for _, a in self.named_arrays():
                a.data = asarray(a.data)
                if isinstance(a, Parameter):
                    a.grad = None
        finally:
            set_backend(previous)
        self._drop_caches()
        return self

    def _drop_caches(self) -> None:
        for _, m in self.named_modules():
            if "_cache" in vars(m):
                m._cache = None

    def state_dict(self) -> dict:
        """name -> array for every parameter and buffer (the live arrays, not copies)."""
        return {name: a.data for name, a in self.named_arrays()}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy arrays into the parameters and buffers, checking every key, shape and dtype first.

        Floating arrays are cast to the holder's dtype; integer buffers (quantized codes) must have
        exactly their dtype. Nothing changes on error.
        """
        own = dict(self.named_arrays())
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(f"state dict mismatch: missing keys {missing}, unexpected keys {unexpected}")
        for k, a in own.items():
            if k not in state:
                continue
            if tuple(state[k].shape) != a.shape:
                raise ValueError(
                    f"shape mismatch for {k!r}: checkpoint has {tuple(state[k].shape)}, model expects {a.shape}"
                )
            kinds = (state[k].dtype.kind, a.dtype.kind)
            if kinds != ("f", "f") and str(state[k].dtype) != str(a.dtype):
                raise ValueError(f"dtype mismatch for {k!r}: checkpoint has {state[k].dtype}, model expects {a.dtype}")
        for k, a in own.items():
            if k in state:
                a.data = like_of(a.data, state[k])  # a copy on the holder's backend
        self._drop_caches()


class ModuleDict(Module):
    """Named child modules (``adapters["default"]``), in insertion order; names appear in parameter names."""

    def __init__(self, modules: dict | None = None):
        self._modules = {}
        for name, m in (modules or {}).items():
            self[name] = m

    def _items(self):
        yield from self._modules.items()

    def __getitem__(self, name: str) -> Module:
        return self._modules[name]  # KeyError naming it, as a dict (the model-level tools name the layer's entries)

    def __setitem__(self, name: str, m: Module) -> None:
        if not isinstance(m, Module):
            raise ValueError(f"ModuleDict holds Modules, got {type(m).__name__}")
        self._modules[_check_name(name, "entry")] = m

    def __delitem__(self, name: str) -> None:
        if name not in self._modules:
            raise KeyError(f"no entry {name!r}; entries: {list(self._modules)}")
        del self._modules[name]

    def __contains__(self, name) -> bool:
        return name in self._modules

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules)

    def keys(self):
        return list(self._modules)

    def items(self):
        return list(self._modules.items())

    def values(self):
        return list(self._modules.values())


class ModuleList(Module):
    """An indexable list of modules, named ``0``, ``1``, ... in parameter names."""

    def __init__(self, modules):
        for i, m in enumerate(modules):
            setattr(self, str(i), m)
        self._n = len(modules)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> Module:
        if not -self._n <= i < self._n:
            raise IndexError(f"index {i} out of range for {self._n} modules")
        return getattr(self, str(i % self._n))

    def __setitem__(self, i: int, m: Module) -> None:
        setattr(self, str(i % self._n), m)

    def __iter__(self):
        return (getattr(self, str(i)) for i in range(self._n))


def _new(shape, dtype, init: str, scale: float, rng):
    """A new parameter array on the default backend, drawn on the host from ``rng``."""
    if init == "zeros":
        return get_xp().zeros(shape, dtype=dtype)  # shape
    if init == "ones":
        return get_xp().ones(shape, dtype=dtype)  # shape
    rng = global_rng() if rng is None else rng
    if init == "normal":
        host = rng.standard_normal(shape) * scale  # shape
    elif init == "uniform":
        host = rng.uniform(-scale, scale, size=shape)  # shape
    else:  # pragma: no cover
        raise ValueError(f"unknown init {init!r}")
    return asarray(host, dtype=dtype)


def _need_cache(cache, name):
    """The cache of a module's last forward, for its backward; RuntimeError inside ``no_grad()`` or without one."""
    if not _grad_enabled:
        raise RuntimeError(f"{name}.backward called inside no_grad(): forwards there keep no caches; run the "
                           "forward and the backward outside no_grad() to train")
    if cache is None:
        raise RuntimeError(f"{name}.backward called without a forward (or twice for one forward, or after a "
                           "forward inside no_grad(), which keeps no cache)")
    return cache


class Linear(Module):
    """y = x W^T + b with W of shape (out_features, in_features), as in the LoRA paper's W0 (d x k)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, std=None,
                 rng=None, dtype="float32"):
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"Linear needs positive sizes, got in={in_features}, out={out_features}")
        dtype = check_float_dtype(dtype)
        self.in_features, self.out_features = in_features, out_features
        if std is None:  # PyTorch's default: U(-1/sqrt(in), 1/sqrt(in))
            w = _new((out_features, in_features), dtype, "uniform", 1.0 / math.sqrt(in_features), rng)
        else:
            w = _new((out_features, in_features), dtype, "normal", std, rng)
        self.weight = Parameter(w)  # (out, in)
        self.bias = Parameter(_new((out_features,), dtype, "zeros", 0.0, rng)) if bias else None
        self._cache = None

    def forward(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear expects inputs with last dimension {self.in_features}, got shape "
                             f"{tuple(x.shape)}")
        b = self.bias.data if self.bias is not None else None
        y, self._cache = F.linear_forward(x, self.weight.data, b)  # (..., in) -> (..., out)
        return y

    def backward(self, dy):
        cache, self._cache = _need_cache(self._cache, "Linear"), None
        # a frozen W0 (LoRA) skips its gradient: no dW = dy^T x is formed
        need_db = self.bias is not None and self.bias.trainable
        dx, dW, db = F.linear_backward(dy, cache, need_dW=self.weight.trainable, need_db=need_db)
        if dW is not None:
            self.weight.accumulate(dW)
        if db is not None:
            self.bias.accumulate(db)
        return dx

    @classmethod
    def from_weight(cls, weight, bias=None, trainable: bool = True) -> Linear:
        """A Linear holding the given arrays: ``weight`` (out, in), ``bias`` (out,) or None (no copies)."""
        if weight.ndim != 2:
            raise ValueError(f"a Linear weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
        out_features, in_features = (int(n) for n in weight.shape)
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        lin = cls.__new__(cls)
        lin.in_features, lin.out_features = in_features, out_features
        lin.weight = Parameter(weight, trainable)  # (out, in)
        lin.bias = Parameter(bias, trainable) if bias is not None else None  # (out,)
        lin._cache = None
        return lin

    def __repr__(self) -> str:
        return f"Linear(in={self.in_features}, out={self.out_features}, bias={self.bias is not None})"


class Embedding(Module):
    """A lookup table W of shape (num_embeddings, dim).

    ``check=True`` bounds-checks the ids first (one host transfer; CuPy would wrap an
    out-of-range id around instead of raising). The GPT checks each batch once itself and
    looks up without checking, so a forward makes no host synchronization.
    """

    def __init__(self, num_embeddings: int, dim: int, *, std: float = 0.02, rng=None, dtype="float32"):
        dtype = check_float_dtype(dtype)
        self.weight = Parameter(_new((num_embeddings, dim), dtype, "normal", std, rng))  # (V, C)
        self._cache = None

    def forward(self, ids, check: bool = False):
        out, self._cache = F.embedding_forward(ids, self.weight.data, check)  # (B, T) -> (B, T, C)
        return out

    def backward(self, dout):
        cache, self._cache = _need_cache(self._cache, "Embedding"), None
        if self.weight.trainable:
            self.weight.accumulate(F.embedding_backward(dout, cache))
        return None  # integer ids have no gradient


class LayerNorm(Module):
    """Layer normalization over the last axis with a gain and a bias (eps = 1e-5 as GPT-2)."""

    def __init__(self, dim: int, eps: float = 1e-5, dtype="float32"):
        dtype = check_float_dtype(dtype)
        self.weight = Parameter(_new((dim,), dtype, "ones", 0.0, None))  # (C,)
        self.bias = Parameter(_new((dim,), dtype, "zeros", 0.0, None))  # (C,)
        self.eps = eps
        self._cache = None

    def forward(self, x):
        y, self._cache = F.layernorm_forward(x, self.weight.data, self.bias.data, self.eps)  # (..., C)
        return y

    def backward(self, dy):
        cache, self._cache = _need_cache(self._cache, "LayerNorm"), None
        need = self.weight.trainable or self.bias.trainable
        dx, dg, db = F.layernorm_backward(dy, cache, need_params=need)
        if self.weight.trainable:
            self.weight.accumulate(dg)
        if self.bias.trainable:
            self.bias.accumulate(db)
        return dx


class GELU(Module):
    """The tanh approximation of GELU used by GPT-2."""

    def __init__(self):
        self._cache = None

    def forward(self, x):
        y, self._cache = F.gelu_forward(x)  # (...)
        return y

    def backward(self, dy):
        cache, self._cache = _need_cache(self._cache, "GELU"), None
        return F.gelu_backward(dy, cache)


class Dropout(Module):
    """Inverted dropout, active only in training mode; masks are drawn on the data's backend.

    Each layer draws from its own stream: ``seed`` fixes it, and without one a seed is taken from
    ``backend.global_rng()`` when the layer is made, so two layers never share a mask sequence.
    Every training forward draws a new mask.
    """

    def __init__(self, p: float = 0.0, seed: int | None = None):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        if seed is None:
            seed = int(global_rng().integers(0, 2**31 - 1))
        self.p, self.seed = p, int(seed)
        self._rng = None
        self._cache = None

    def forward(self, x, mask=None):
        if not self.training or self.p == 0.0:
            self._cache = None
            return x
        xp = xp_of(x)
        if mask is None and (self._rng is None or self._rng[0] is not xp):
            self._rng = (xp, device_rng(xp, self.seed))
        y, self._cache = F.dropout_forward(x, self.p, mask=mask, rng=None if mask is not None else self._rng[1])
        return y

    def backward(self, dy):
        return F.dropout_backward(dy, self._cache)
