"""Optimizers, gradient clipping and the learning-rate schedule.

- ``SGD``: p <- p - lr * (g + wd * p), with optional momentum.
- ``AdamW`` (Loshchilov & Hutter, 2019, Algorithm 2): Adam's moment
  estimates with bias correction (Kingma & Ba, 2015, Algorithm 1) and
  *decoupled* weight decay p <- p - lr * wd * p, applied to the weight
  itself, not added to the gradient. Same update order as PyTorch's AdamW.
- ``clip_grad_norm``: rescale all gradients so that their global L2 norm is
  at most ``max_norm``.
- ``warmup_cosine``: linear warm-up, then cosine decay to a floor.

Only trainable parameters are given to an optimizer and only they get state
(AdamW keeps two moment arrays per parameter: with LoRA that state is
allocated for the small A and B matrices alone; Hu et al., 2021, section 4.2
"reduces the VRAM usage by up to 2/3").
"""

from __future__ import annotations

import math

from .backend import xp_of


def _groups(params, defaults: dict) -> list[dict]:
    """Normalize ``params`` (Parameters, or dicts with "params" and overrides) into groups of trainable ones."""
    params = list(params)
    if params and isinstance(params[0], dict):
        groups = [{**defaults, **g, "params": list(g["params"])} for g in params]
    else:
        groups = [{**defaults, "params": params}]
    for g in groups:
        g["params"] = [p for p in g["params"] if p.trainable]  # frozen ones get no state at all
    if not any(g["params"] for g in groups):
        raise ValueError("optimizer got no trainable parameters")
    return groups


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

    def state_nbytes(self) -> int:
        """Bytes held by the optimizer state (momenta), measured from the arrays."""
        return sum(int(a.nbytes) for s in self.state.values() for a in s.values() if hasattr(a, "nbytes"))


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum and L2 weight decay."""

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    def step(self) -> None:
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
        for g in self.param_groups:
            lr, (b1, b2), eps, wd = g["lr"], g["betas"], g["eps"], g["weight_decay"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                xp = xp_of(p.data)
                st = self.state.get(id(p))
                if st is None:
                    st = self.state[id(p)] = {
                        "step": 0,
                        "exp_avg": xp.zeros_like(p.data),  # (shape of p)
                        "exp_avg_sq": xp.zeros_like(p.data),  # (shape of p)
                    }
                st["step"] += 1
                t = st["step"]
                if wd:
                    p.data *= 1.0 - lr * wd  # decoupled decay, in place
                m, v, gr = st["exp_avg"], st["exp_avg_sq"], p.grad
                m *= b1
                m += (1.0 - b1) * gr  # (shape of p)
                v *= b2
                v += (1.0 - b2) * (gr * gr)  # (shape of p)
                bc1 = 1.0 - b1**t
                bc2 = 1.0 - b2**t
                denom = xp.sqrt(v) / math.sqrt(bc2) + eps  # (shape of p)
                p.data -= (lr / bc1) * (m / denom)  # (shape of p)


def grad_norm(params) -> float:
    """The global L2 norm of all gradients (a Python float)."""
    total = 0.0
    for p in params:
        if p.grad is not None:
            total += float((p.grad.astype("float64") ** 2).sum())
    return math.sqrt(total)


def clip_grad_norm(params, max_norm: float) -> float:
    """Scale gradients in place so their global norm is at most ``max_norm``; returns the norm before."""
    params = [p for p in params if p.grad is not None]
    norm = grad_norm(params)
    if math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in params:
            p.grad = p.grad * scale
    return norm


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_ratio: float = 0.1) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up to ``base_lr``, then cosine decay that reaches
    ``min_ratio * base_lr`` at the last step, ``total_steps - 1``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - 1 - warmup_steps)  # the last step run (total_steps - 1) reaches the floor
    progress = min(1.0, (step - warmup_steps) / span)
    return base_lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
