"""Optimizers, gradient clipping and the learning-rate schedule.

- ``SGD``: p <- p - lr * (g + wd * p), with optional momentum.
- ``AdamW`` (Loshchilov & Hutter, 2019, Algorithm 2): Adam's moment
  estimates with bias correction (Kingma & Ba, 2015, Algorithm 1) and
  *decoupled* weight decay p <- p - lr * wd * p, applied to the weight
  itself, not added to the gradient. Same update order as PyTorch's AdamW.
- ``clip_grad_norm``: rescale all gradients so that their global L2 norm is
  at most ``max_norm``, entirely on the device (the norm it returns is a 0-d
  array; ``float()`` it when a number is needed).
- ``warmup_cosine``: linear warm-up, then cosine decay to a floor.

Only trainable parameters are given to an optimizer and only they get state
(AdamW keeps two moment arrays per parameter: with LoRA that state is
allocated for the small A and B matrices alone; Hu et al., 2021, section 4.2
"reduces the VRAM usage by up to 2/3").

Host synchronization: none. ``step`` and ``clip_grad_norm`` never read a
device value on the host; only ``grad_norm`` (a Python float) does, once.

Backends: the state lives on its parameters' backend. ``Optimizer.to(backend)`` moves
every state array: call it with ``model.to(backend)``. A ``step`` that finds a state array
on another backend than its parameter raises a ValueError saying so (it does not move it).
"""

from __future__ import annotations

import math

from . import fast
from .backend import asarray, get_backend_name, get_xp, is_cupy_array, set_backend, xp_of


def _groups(params, defaults: dict) -> list[dict]:
    """Normalize ``params`` (Parameters, or dicts with "params" and overrides) into groups of trainable ones."""
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    # frozen parameters are left out here, so they get no state at all
    groups = [{**defaults, **g, "params": [p for p in g["params"] if p.trainable]} for g in groups]
    if not any(g["params"] for g in groups):
        raise ValueError("optimizer got no trainable parameters")
    return groups


def _is_array(a) -> bool:
    """True for an array of either backend (state also holds plain numbers, such as AdamW's step count)."""
    return hasattr(a, "shape") and hasattr(a, "dtype")


class Optimizer:
    """Common parts: parameter groups, ``lr`` (settable), ``zero_grad``, ``state_nbytes``."""

    def __init__(self, params, defaults: dict):
        if defaults["lr"] < 0:
            raise ValueError(f"learning rate must be >= 0, got {defaults['lr']}")
        self.param_groups = _groups(params, defaults)
        self.state: dict[int, dict] = {}

    @property
    def params(self):
        return [p for g in self.param_groups for p in g["params"]]

    @property
    def lr(self) -> float:
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        for g in self.param_groups:
            g["lr"] = value

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def to(self, backend: str):
        """Move every state array (moments, momentum buffers) to ``"numpy"`` or ``"cupy"``; returns self.

        Call it with ``model.to(backend)``: ``step`` refuses state left on another backend than its parameter.
        """
        previous = get_backend_name()
        set_backend(backend)
        try:
            for st in self.state.values():
                for key, a in st.items():
                    if _is_array(a):
                        st[key] = asarray(a)  # (shape of p): the same values on the new backend
        finally:
            set_backend(previous)
        return self

    def _check_backend(self, p) -> None:
        """ValueError if a state array of ``p`` is on another backend than ``p`` (``model.to(...)`` without
        ``opt.to(...)``); ``step`` calls it for every parameter before it changes anything."""
        if any(_is_array(a) and is_cupy_array(a) != is_cupy_array(p.data) for a in self.state.get(id(p), {}).values()):
            raise ValueError(f"{type(self).__name__}'s state of a parameter {p.shape} is on another backend than the "
                             "parameter: after model.to(backend) call opt.to(backend)")

    def state_nbytes(self) -> int:
        """Bytes held by the optimizer state (momenta), measured from the arrays."""
        return sum(int(a.nbytes) for s in self.state.values() for a in s.values() if hasattr(a, "nbytes"))


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum and L2 weight decay."""

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    def step(self) -> None:
        for p in self.params:  # every state checked first: a refused step changes nothing
            self._check_backend(p)
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if g["weight_decay"]:
                    d = d + g["weight_decay"] * p.data  # (shape of p)
                if g["momentum"]:
                    st = self.state.setdefault(id(p), {})
                    buf = st.get("momentum")
                    buf = d.copy() if buf is None else buf * g["momentum"] + d  # (shape of p)
                    st["momentum"] = buf
                    d = buf
                p.data -= g["lr"] * d  # in place: (shape of p)


class AdamW(Optimizer):
    """Adam with decoupled weight decay; state (exp_avg, exp_avg_sq) only for trainable parameters."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        b1, b2 = betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay))

    def step(self) -> None:
        work = [(p, self._moments(p), g) for g in self.param_groups for p in g["params"] if p.grad is not None]
        for _, st, _ in work:  # every state passed _moments' check: only now does anything change
            st["step"] += 1
        if sum(p.data.size for p, _, _ in work) >= _THREADED_ELEMENTS and _threadable(work):
            _adamw_threaded(work)  # the same update in chunks on two threads (a whole GPT-2; a reader may skip it)
            return
        for p, st, g in work:
            _adamw_update(p.data, p.grad, st["exp_avg"], st["exp_avg_sq"], st["step"], g)

    def _moments(self, p) -> dict:
        """The state of ``p``: {"step": t, "exp_avg": m, "exp_avg_sq": v}, made with t = 0, m = v = 0 at first.

        ValueError if it is on another backend than ``p`` (``model.to(...)`` without ``opt.to(...)``).
        """
        if id(p) not in self.state:
            zeros = xp_of(p.data).zeros_like
            self.state[id(p)] = {"step": 0, "exp_avg": zeros(p.data), "exp_avg_sq": zeros(p.data)}
        self._check_backend(p)
        return self.state[id(p)]


def _adamw_update(p, gr, m, v, t: int, g: dict) -> None:
    """One AdamW update of p from its gradient gr and moments m, v (all the same shape), in place."""
    lr, (b1, b2), eps, wd = g["lr"], g["betas"], g["eps"], g["weight_decay"]
    xp = xp_of(p)
    if wd:
        p *= 1.0 - lr * wd  # decoupled decay, in place: p = (1 - lr wd) p
    m *= b1
    m += (1.0 - b1) * gr  # (shape of p): m = b1 m + (1 - b1) g
    v *= b2
    v += (1.0 - b2) * (gr * gr)  # (shape of p): v = b2 v + (1 - b2) g^2
    bc1 = 1.0 - b1**t  # bias corrections: m_hat = m / bc1, v_hat = v / bc2
    bc2 = 1.0 - b2**t
    denom = xp.sqrt(v) / math.sqrt(bc2) + eps  # (shape of p): sqrt(v_hat) + eps
    p -= (lr / bc1) * (m / denom)  # (shape of p): p -= lr m_hat / (sqrt(v_hat) + eps)


# ---------------------------------------------------------------- the same update, faster on the CPU
# (a reader may skip this part: it computes exactly what _adamw_update computes, bit for bit)
# Over a whole model (full fine-tuning of GPT-2 small: 124M parameters) AdamW is memory-bound:
# the plain form above makes several full-size temporaries. Here every parameter is cut into
# cache-sized chunks, each chunk is updated with in-place operations on one reused scratch
# buffer, and the threads of ``fast.run_threads`` (two unless LFS_THREADS says otherwise) take a
# share of the chunks each (NumPy releases the GIL inside its element-wise loops, so both cores work).
_THREADED_ELEMENTS = 1 << 20  # below this many values in all, the plain loop is as fast
_CHUNK = 1 << 15  # values per chunk: a few arrays of it stay in the L2 cache


def _threadable(work) -> bool:
    """NumPy arrays (host memory, two cores), all C-contiguous (so flat views can be cut into chunks)."""
    arrays = [a for p, st, _ in work for a in (p.data, p.grad, st["exp_avg"], st["exp_avg_sq"])]
    dtype = arrays[0].dtype
    return all(not is_cupy_array(a) and a.flags.c_contiguous and a.dtype == dtype for a in arrays)


def _adamw_chunks(items, scratch) -> None:
    """_adamw_update on chunks ``(p, gr, m, v, t, g)`` of flat views, every temporary in ``scratch``."""
    np = xp_of(scratch)  # NumPy: only host arrays are threaded
    for p, gr, m, v, t, g in items:
        lr, (b1, b2), eps, wd = g["lr"], g["betas"], g["eps"], g["weight_decay"]
        tmp = scratch[: p.size]  # (chunk,)
        if wd:
            p *= 1.0 - lr * wd
        m *= b1
        np.multiply(gr, 1.0 - b1, out=tmp)
        m += tmp  # m = b1 m + (1 - b1) g
        v *= b2
        np.multiply(gr, gr, out=tmp)
        tmp *= 1.0 - b2
        v += tmp  # v = b2 v + (1 - b2) g^2
        np.sqrt(v, out=tmp)
        tmp /= math.sqrt(1.0 - b2**t)
        tmp += eps  # denom
        np.divide(m, tmp, out=tmp)
        tmp *= lr / (1.0 - b1**t)
        p -= tmp


def _adamw_threaded(work) -> None:
    np = xp_of(work[0][0].data)  # NumPy: only host arrays are threaded
    items = []
    for p, st, g in work:
        flat = [a.reshape(-1) for a in (p.data, p.grad, st["exp_avg"], st["exp_avg_sq"])]  # 4 x (n,) views
        for start in range(0, flat[0].size, _CHUNK):
            items.append((*(a[start : start + _CHUNK] for a in flat), st["step"], g))
    share = [items[i :: fast.THREADS] for i in range(fast.THREADS)]  # interleaved: each gets big and small chunks
    dtype = work[0][0].data.dtype
    fast.run_threads(lambda i: _adamw_chunks(share[i], np.empty(_CHUNK, dtype=dtype)), len(share))  # own scratch


def _global_norm(grads):
    """sqrt(sum of every squared entry) of ``grads``: a 0-d float64 array on their device (0 on the default
    backend when the list is empty)."""
    xp = xp_of(*grads) if grads else get_xp()
    zero = xp.zeros((), dtype="float64")  # (), so that an empty list sums to a 0-d array too
    total = sum(((g.astype("float64") ** 2).sum() for g in grads), zero)  # each (shape of g) -> (), summed in order
    return xp.asarray(xp.sqrt(total))  # ()


def grad_norm(params) -> float:
    """The global L2 norm of all gradients, as a Python float (one host synchronization; 0.0 with no gradient)."""
    return float(_global_norm([p.grad for p in params if p.grad is not None]))


def clip_grad_norm(params, max_norm: float):
    """Scale gradients so their global norm is at most ``max_norm``; returns the norm before, a 0-d array.

    Everything stays on the device, with no host synchronization: the norm is
    summed there (in float64), and every gradient is multiplied by

        scale = max_norm / (norm + 1e-6)   if norm is finite and norm > max_norm, else 1

    cast to the gradient's own dtype (so float32 gradients stay float32). A
    NaN or inf norm leaves the gradients as they are (scale 1), as PyTorch's
    ``clip_grad_norm_`` does without ``error_if_nonfinite``. The gradients are
    replaced by new arrays, never scaled in place.

    The returned norm is a 0-d float64 array on the gradients' backend (the
    default backend when no parameter has a gradient): ``float(norm)`` when a
    Python number is needed, which is one host synchronization.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    params = [p for p in params if p.grad is not None]
    norm = _global_norm([p.grad for p in params])  # ()
    xp = xp_of(norm)
    clip = xp.isfinite(norm) & (norm > max_norm)  # () bool, on the device
    scale = xp.where(clip, max_norm / (norm + 1e-6), 1.0)  # () float64
    for p in params:
        p.grad = p.grad * scale.astype(p.grad.dtype)  # (shape of p), dtype kept
    return norm


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_ratio: float = 0.1) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up to ``base_lr``, then cosine decay that reaches
    ``min_ratio * base_lr`` at the last step, ``total_steps - 1``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - 1 - warmup_steps)  # the last step run (total_steps - 1) reaches the floor
    progress = min(1.0, (step - warmup_steps) / span)
    return base_lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
