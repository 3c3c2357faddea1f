"""Parameters, modules and the thin layer classes over ``functional``.

A ``Parameter`` is an array (``.data``) with a gradient slot (``.grad``) and
a ``.trainable`` flag. Freezing is the whole idea of LoRA (Hu et al., 2021,
section 4.1: "W0 is frozen and does not receive gradient updates"), so here
it is explicit: a layer whose weight is frozen never forms that weight's
gradient (``need_dW=False`` in ``functional.linear_backward``), and the
optimizers give it no state.

A ``Module`` owns Parameters and child Modules, calls the pure functions of
``functional`` in ``forward``, keeps the cache of its *last* forward, and
turns an upstream gradient into parameter gradients in ``backward``. A
second forward before the backward replaces the cache; a layer used twice
in one pass (the tied LM head) is therefore handled by the GPT with the
pure functions and a cache of its own.
"""

from __future__ import annotations

import math

from . import functional as F
from .backend import asarray, device_rng, get_backend_name, get_xp, global_rng, like, xp_of


class Parameter:
    """An array with a gradient slot; ``trainable=False`` freezes it."""

    def __init__(self, data, trainable: bool = True):
        self.data = data
        self.grad = None
        self.trainable = trainable

    @property
    def shape(self):
        return tuple(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def size(self) -> int:
        return int(self.data.size)

    def accumulate(self, g) -> None:
        """Add ``g`` to ``.grad`` (gradients of a parameter used twice add up)."""
        if g.shape != self.data.shape:
            raise ValueError(f"gradient shape {tuple(g.shape)} does not match parameter {self.shape}")
        self.grad = g if self.grad is None else self.grad + g

    def __repr__(self) -> str:
        flag = "" if self.trainable else ", frozen"
        return f"Parameter(shape={self.shape}, dtype={self.dtype}{flag})"


class Module:
    """Base class: finds Parameters and child Modules among its attributes, in definition order."""

    training = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, dy):  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- traversal
    def _items(self):
        for name, value in vars(self).items():
            if isinstance(value, (Parameter, Module)):
                yield name, value

    def named_modules(self, prefix: str = ""):
        """Yields (dotted name, module) for this module and every descendant."""
        yield prefix, self
        for name, value in self._items():
            if isinstance(value, Module):
                yield from value.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self, prefix: str = "", _seen=None):
        """Yields (dotted name, Parameter), each Parameter once (first name wins)."""
        seen = set() if _seen is None else _seen
        for name, value in self._items():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(value, Parameter):
                if id(value) not in seen:
                    seen.add(id(value))
                    yield full, value
            else:
                yield from value.named_parameters(full, seen)

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
        """Cast every floating parameter to ``dtype`` (e.g. ``"float64"`` for gradient checks)."""
        for p in self.parameters():
            if p.data.dtype.kind == "f":
                p.data = p.data.astype(dtype)
                p.grad = None
        return self

    def to(self, backend: str):
        """Move every parameter to ``"numpy"`` or ``"cupy"``."""
        from .backend import set_backend

        previous = get_backend_name()
        set_backend(backend)
        try:
            for p in self.parameters():
                p.data = asarray(p.data)
                p.grad = None
        finally:
            set_backend(previous)
        return self

    def state_dict(self) -> dict:
        """name -> array (the live arrays, not copies)."""
        return {name: p.data for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy arrays into the parameters, checking every key and shape first (nothing changes on error)."""
        own = dict(self.named_parameters())
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(f"state dict mismatch: missing keys {missing}, unexpected keys {unexpected}")
        for k, p in own.items():
            if k in state and tuple(state[k].shape) != p.shape:
                raise ValueError(
                    f"shape mismatch for {k!r}: checkpoint has {tuple(state[k].shape)}, model expects {p.shape}"
                )
        for k, p in own.items():
            if k in state:
                p.data = like(p.data, state[k]).astype(p.dtype)  # a copy on the parameter's backend


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
        return (self[i] for i in range(self._n))


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
    if cache is None:
        raise RuntimeError(f"{name}.backward called without a forward (or twice for one forward)")
    return cache


class Linear(Module):
    """y = x W^T + b with W of shape (out_features, in_features), as in the LoRA paper's W0 (d x k)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, std=None,
                 rng=None, dtype="float32"):
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"Linear needs positive sizes, got in={in_features}, out={out_features}")
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
        dx, dW, db = F.linear_backward(
            dy, cache,
            need_dW=self.weight.trainable,
            need_db=self.bias is not None and self.bias.trainable,
        )
        if dW is not None:
            self.weight.accumulate(dW)
        if db is not None:
            self.bias.accumulate(db)
        return dx

    def __repr__(self) -> str:
        return f"Linear(in={self.in_features}, out={self.out_features}, bias={self.bias is not None})"


class Embedding(Module):
    """A lookup table W of shape (num_embeddings, dim); ids are bounds-checked."""

    def __init__(self, num_embeddings: int, dim: int, *, std: float = 0.02, rng=None, dtype="float32"):
        self.weight = Parameter(_new((num_embeddings, dim), dtype, "normal", std, rng))  # (V, C)
        self._cache = None

    def forward(self, ids):
        out, self._cache = F.embedding_forward(ids, self.weight.data)  # (B, T) -> (B, T, C)
        return out

    def backward(self, dout):
        cache, self._cache = _need_cache(self._cache, "Embedding"), None
        if self.weight.trainable:
            self.weight.accumulate(F.embedding_backward(dout, cache))
        return None  # integer ids have no gradient


class LayerNorm(Module):
    """Layer normalization over the last axis with a gain and a bias (eps = 1e-5 as GPT-2)."""

    def __init__(self, dim: int, eps: float = 1e-5, dtype="float32"):
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
    """Inverted dropout, active only in training mode; masks are drawn on the data's backend."""

    def __init__(self, p: float = 0.0, seed: int | None = 0):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p, self.seed = p, seed
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
