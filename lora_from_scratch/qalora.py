"""QA-LoRA: a frozen group-wise INT-N weight plus a group-pooled low-rank adapter (Xu et al., 2023).

QA-LoRA ("Quantization-Aware Low-Rank Adaptation of Large Language Models"), Section 3.3 and
Algorithm 1. The frozen weight W0 (out, in) is stored group-wise (``quant/groupwise.py``): the
``in`` input channels are cut into L = in / group_size groups of consecutive channels, and every
(row o, group g) has its own step size and zero point,

    W~[o, i] = scale[o, g] * (q[o, i] - zero[o, g])          for channel i in group g.

The adapter does not see x itself but x *mean-pooled over each group*:

    p[..., g] = (1 / group_size) * sum_{i in group g} x[..., i]        (..., in) -> (..., L)
    h = x W~^T + b + s * p A^T B^T           A (r, L), B (out, r), s = alpha / r

Written out per input channel, the adapter's term is  sum_i x_i * s (B A)[o, g(i)] / group_size:
the update it makes to the weight is s (B A)[o, g] / group_size for *every* channel of group g,
one constant per (row, group), exactly the granularity of the zero points. So after training it
folds into them (Section 3.3, "the merged weights ... remain in the quantized form"):

    scale * (q - zero') = scale * (q - zero) + s (B A)[o, g] / group_size
    <=>  zero'[o, g] = zero[o, g] - s (B A)[o, g] / (group_size * scale[o, g])

The integer codes q and the scales do not change; the zero points become non-integer floats
(stored as such). ``QALoRALinear.merge()`` returns that merged layer, a ``GroupwiseLinear``, whose
outputs equal the unmerged layer's up to float rounding. A plain LoRA/QLoRA update (B A of shape
(out, in)) varies inside a group and cannot be folded this way; it has to be added to the
dequantized weight and re-quantized, which loses accuracy at low bit widths (``compare.py``).

Backward (hand-written; the frozen codes, scales, zeros and bias get no gradient):

    u  = p A^T                 (..., r)        dB = s dy^T u
    g  = s dy B                (..., r)        dA = g^T p
    dp = g A                   (..., L)        dx = dy W~ + pool^T(dp),  pool^T(dp)[..., i] = dp[..., g(i)] / group_size

The model-level helpers: ``apply_qalora`` (adapt targeted layers), ``merge_qalora`` (deploy: every
adapter folded into its zero points) and ``quantize_model_groupwise`` (the QLoRA deployment:
merge in float, then re-quantize the targeted weights group-wise).
"""

from __future__ import annotations

import math
from numbers import Integral

from . import functional as F
from .backend import global_rng, like, xp_of
from .lora import _PARENT, TARGETS, LoRALinear, LowRankAdapter, replace_targets, resolve_targets
from .nn import Linear, Module, Parameter
from .quant.groupwise import GroupwiseQuantized, dequantize_groupwise, quantize_groupwise

__all__ = [
    "GroupwiseLinear",
    "QALoRALinear",
    "apply_qalora",
    "group_mean_backward",
    "group_mean_forward",
    "merge_qalora",
    "qalora_layers",
    "quantize_model_groupwise",
]


# ---------------------------------------------------------------- checks
def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, Integral) or not 2 <= int(bits) <= 8:
        raise ValueError(f"bits must be an integer between 2 and 8, got {bits!r}")
    return int(bits)


def _check_group_size(group_size, in_features: int) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, Integral) or int(group_size) < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    group_size = int(group_size)
    if in_features % group_size:
        raise ValueError(f"in_features {in_features} is not divisible by group_size {group_size}")
    return group_size


def _check_adapter_args(r, alpha) -> None:
    if isinstance(r, bool) or not isinstance(r, Integral) or int(r) < 1:
        raise ValueError(f"QA-LoRA rank r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"QA-LoRA alpha must be a finite number > 0, got {alpha!r}")


# ---------------------------------------------------------------- the pooling, a forward/backward pair
def group_mean_forward(x, group_size: int):
    """p = the mean of x over each group of ``group_size`` consecutive input channels.

    x (..., in) -> p (..., in / group_size); the cache is what the backward needs (the group size).
    """
    in_features = int(x.shape[-1])
    group_size = _check_group_size(group_size, in_features)
    n_groups = in_features // group_size
    p = x.reshape(*x.shape[:-1], n_groups, group_size).mean(axis=-1)  # (..., in) -> (..., L, gs) -> (..., L)
    return p, group_size


def group_mean_backward(dp, cache):
    """dx[..., i] = dp[..., g(i)] / group_size: each channel of a group gets an equal share. (..., L) -> (..., in)."""
    group_size = cache
    xp = xp_of(dp)
    share = dp[..., None] * (1.0 / group_size)  # (..., L) -> (..., L, 1)
    dx = xp.broadcast_to(share, (*dp.shape, group_size))  # (..., L, 1) -> (..., L, gs), a view
    return dx.reshape(*dp.shape[:-1], dp.shape[-1] * group_size)  # (..., L, gs) -> (..., in), a copy


# ---------------------------------------------------------------- the frozen quantized layer
class GroupwiseLinear(Module):
    """A frozen linear layer whose weight is stored group-wise INT-N: y = x W~^T + b.

    ``GroupwiseLinear(q, bias=None)`` with ``q`` a ``GroupwiseQuantized`` (codes (out, in) uint8,
    scales and zeros (out, in / group_size)) and an optional float bias (out,). Everything is
    frozen: ``backward`` returns dx only. The forward dequantizes the weight on the fly,
    ``W~ = scale * (codes - zero)`` per group, and keeps it for the backward's dx = dy W~.
    Build one from a float weight with ``from_weight`` or from an ``nn.Linear`` with ``from_linear``.
    It is what ``QALoRALinear.merge()`` returns and what the QLoRA deployment re-quantizes into.
    """

    def __init__(self, q: GroupwiseQuantized, bias=None):
        if not isinstance(q, GroupwiseQuantized):
            raise ValueError(f"GroupwiseLinear needs a GroupwiseQuantized weight, got {type(q).__name__}")
        if q.codes.ndim != 2:
            raise ValueError(f"codes must be 2-D (out, in), got shape {tuple(q.codes.shape)}")
        out_features, in_features = (int(s) for s in q.codes.shape)
        self.bits = _check_bits(q.bits)
        self.group_size = _check_group_size(q.group_size, in_features)
        expected = (out_features, in_features // self.group_size)
        if tuple(q.scales.shape) != expected or tuple(q.zeros.shape) != expected:
            raise ValueError(f"scales and zeros must have shape {expected}, got {tuple(q.scales.shape)} "
                             f"and {tuple(q.zeros.shape)}")
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        self.in_features, self.out_features = in_features, out_features
        # all frozen: no gradient is ever formed for them and no optimizer keeps state for them
        self.weight_codes = Parameter(q.codes, trainable=False)  # (out, in) uint8
        self.weight_scales = Parameter(q.scales, trainable=False)  # (out, L)
        self.weight_zeros = Parameter(q.zeros, trainable=False)  # (out, L)
        self.bias = Parameter(bias, trainable=False) if bias is not None else None  # (out,)
        self._cache = None

    @classmethod
    def from_weight(cls, weight, bias=None, bits: int = 4, group_size: int = 32):
        """Quantize a float weight (out, in) group-wise; the bias (out,) stays float."""
        bits = _check_bits(bits)
        _check_group_size(group_size, int(weight.shape[-1]))
        return cls(quantize_groupwise(weight, bits=bits, group_size=group_size), bias)

    @classmethod
    def from_linear(cls, linear: Linear, bits: int = 4, group_size: int = 32):
        """Quantize an ``nn.Linear``'s weight group-wise (its bias is copied by reference)."""
        if not isinstance(linear, Linear):
            raise ValueError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        bias = linear.bias.data if linear.bias is not None else None
        return cls.from_weight(linear.weight.data, bias, bits, group_size)

    # the three arrays of the format, as arrays
    @property
    def codes(self):
        return self.weight_codes.data  # (out, in) uint8

    @property
    def scales(self):
        return self.weight_scales.data  # (out, L)

    @property
    def zeros(self):
        return self.weight_zeros.data  # (out, L)

    @property
    def quantized(self) -> GroupwiseQuantized:
        return GroupwiseQuantized(self.codes, self.scales, self.zeros, self.bits, self.group_size)

    def dequantized_weight(self):
        """W~ = scale * (codes - zero) per group: (out, in) in the scales' dtype."""
        return dequantize_groupwise(self.codes, self.scales, self.zeros, self.group_size)  # (out, in)

    def forward(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"GroupwiseLinear expects inputs with last dimension {self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        W = self.dequantized_weight()  # (out, in), made on the fly from the codes
        b = self.bias.data if self.bias is not None else None
        y, self._cache = F.linear_forward(x, W, b)  # (..., in) -> (..., out)
        return y

    def backward(self, dy):
        cache, self._cache = self._cache, None
        if cache is None:
            raise RuntimeError("GroupwiseLinear.backward called without a forward (or twice for one forward)")
        dx, _, _ = F.linear_backward(dy, cache, need_dW=False, need_db=False)  # (..., out) -> (..., in)
        return dx

    def __repr__(self) -> str:
        return (f"GroupwiseLinear(in={self.in_features}, out={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None})")


# ---------------------------------------------------------------- QA-LoRA
class QALoRALinear(LowRankAdapter):
    """A frozen ``GroupwiseLinear`` (``.base``) plus the pooled adapter s * B A (A acting on group means).

    ``QALoRALinear(base, r, alpha, bits=4, group_size=32, *, rng=None)``: ``base`` is an
    ``nn.Linear`` (its weight is quantized here, asymmetric min-max INT-``bits`` per group of
    ``group_size`` input channels) or an already quantized ``GroupwiseLinear`` (its own bits and
    group size must then match). ``lora_A`` (r, L) starts U(-1/sqrt(L), 1/sqrt(L)) (LoRA's
    Kaiming-uniform with fan-in L) from the host generator ``rng``; ``lora_B`` (out, r) starts at
    zero, so the layer starts as the quantized base layer. ``.codes``, ``.scales``, ``.zeros``
    are the base's arrays; ``merge()`` returns the deployed ``GroupwiseLinear``.

    r may exceed L (the rank of B A is then at most L); only r >= 1 is required.
    """

    def __init__(self, base, r: int, alpha: float, bits: int = 4, group_size: int = 32, *, rng=None):
        bits = _check_bits(bits)
        if isinstance(base, Linear):
            _check_group_size(group_size, base.in_features)
            base = GroupwiseLinear.from_linear(base, bits, group_size)
        elif isinstance(base, GroupwiseLinear):
            if (base.bits, base.group_size) != (bits, group_size):
                raise ValueError(f"the GroupwiseLinear base has bits={base.bits}, group_size={base.group_size}; "
                                 f"got bits={bits}, group_size={group_size}")
        else:
            raise ValueError(f"QALoRALinear wraps an nn.Linear or a GroupwiseLinear, got {type(base).__name__}")
        _check_adapter_args(r, alpha)
        self.base = base  # frozen by construction
        self.in_features, self.out_features = base.in_features, base.out_features
        self.bits, self.group_size = base.bits, base.group_size
        self.n_groups = self.in_features // self.group_size  # L
        self.r, self.alpha = int(r), float(alpha)
        rng = global_rng() if rng is None else rng
        scales = base.scales  # (out, L), the dtype and backend the adapter takes
        bound = 1.0 / math.sqrt(self.n_groups)
        host = rng.uniform(-bound, bound, size=(self.r, self.n_groups))  # (r, L) on the host
        self.lora_A = Parameter(like(scales, host).astype(scales.dtype))  # (r, L)
        self.lora_B = Parameter(xp_of(scales).zeros((self.out_features, self.r), dtype=scales.dtype))  # (out, r)
        self._cache = None

    @property
    def codes(self):
        return self.base.codes  # (out, in) uint8

    @property
    def scales(self):
        return self.base.scales  # (out, L)

    @property
    def zeros(self):
        return self.base.zeros  # (out, L)

    # ------------------------------------------------------------ forward / backward
    def forward(self, x):
        """h = x W~^T + b + s * pool(x) A^T B^T, pool = the mean over each group of input channels."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QALoRALinear expects inputs with last dimension {self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        base = self.base
        W = base.dequantized_weight()  # (out, in), dequantized on the fly
        b = base.bias.data if base.bias is not None else None
        y, lin_cache = F.linear_forward(x, W, b)  # (..., in) -> (..., out), the frozen path
        p, pool_cache = group_mean_forward(x, self.group_size)  # (..., in) -> (..., L)
        A, B = self.lora_A.data, self.lora_B.data  # (r, L), (out, r)
        us = (p @ A.T) * self.scaling  # (..., L) @ (L, r) -> (..., r), scaled while narrow
        y += us @ B.T  # (..., r) @ (r, out) -> (..., out)
        self._cache = (lin_cache, pool_cache, p, us)
        return y

    def backward(self, dy):
        """Returns dx; accumulates dA into ``lora_A.grad`` and dB into ``lora_B.grad`` (see the module docstring)."""
        cache, self._cache = self._cache, None
        if cache is None:
            raise RuntimeError("QALoRALinear.backward called without a forward (or twice for one forward)")
        lin_cache, pool_cache, p, us = cache
        # the frozen path: dx = dy W~ only; no (out, N) @ (N, in) weight gradient is formed
        dx, _, _ = F.linear_backward(dy, lin_cache, need_dW=False, need_db=False)  # (..., out) -> (..., in)
        A, B, L = self.lora_A.data, self.lora_B.data, self.n_groups  # (r, L), (out, r)
        dy2 = dy.reshape(-1, self.out_features)  # (..., out) -> (N, out)
        p2 = p.reshape(-1, L)  # (..., L) -> (N, L)
        g = (dy2 @ B) * self.scaling  # (N, out) @ (out, r) -> (N, r)
        if self.lora_B.trainable:
            self.lora_B.accumulate((us.reshape(-1, self.r).T @ dy2).T)  # ((r, N) @ (N, out)).T -> (out, r)
        if self.lora_A.trainable:
            self.lora_A.accumulate(g.T @ p2)  # (r, N) @ (N, L) -> (r, L)
        dp = (g @ A).reshape(*dy.shape[:-1], L)  # (N, r) @ (r, L) -> (N, L) -> (..., L)
        dx += group_mean_backward(dp, pool_cache)  # (..., L) -> (..., in): the pooling's backward
        return dx

    # ------------------------------------------------------------ the merge into the zero points
    def delta_weight(self):
        """The adapter as a full (out, in) update: s (B A)[o, g] / group_size, repeated over each group."""
        xp = xp_of(self.lora_B.data)
        per_group = (self.lora_B.data @ self.lora_A.data) * (self.scaling / self.group_size)  # (out, r) @ (r, L)
        return xp.repeat(per_group, self.group_size, axis=1)  # (out, L) -> (out, in)

    def merged_zeros(self):
        """zero' = zero - s (B A) / (group_size * scale), per (row, group): (out, L).

        Raises ValueError (naming the problem) if the result is not finite.
        """
        BA = self.lora_B.data @ self.lora_A.data  # (out, r) @ (r, L) -> (out, L)
        zeros, scales = self.zeros, self.scales  # (out, L) each
        shift = BA * (self.scaling / self.group_size) / scales  # (out, L), in units of each group's step
        merged = (zeros - shift).astype(zeros.dtype)  # (out, L)
        if not bool(xp_of(merged).isfinite(merged).all()):
            raise ValueError("merge refused: the merged zero points contain NaN or inf")
        return merged

    def merge(self) -> GroupwiseLinear:
        """The deployed layer: the same codes, scales and bias (shared, not copied), the merged zero points."""
        q = GroupwiseQuantized(codes=self.codes, scales=self.scales, zeros=self.merged_zeros(),
                               bits=self.bits, group_size=self.group_size)
        bias = self.base.bias.data if self.base.bias is not None else None
        return GroupwiseLinear(q, bias)

    def __repr__(self) -> str:
        return (f"QALoRALinear(in={self.in_features}, out={self.out_features}, r={self.r}, "
                f"alpha={self.alpha:g}, bits={self.bits}, group_size={self.group_size}, L={self.n_groups})")


# ---------------------------------------------------------------- model level
def qalora_layers(model) -> dict:
    """dotted name -> QALoRALinear, for every adapted layer of ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QALoRALinear)}


def _set_module(model, dotted: str, new) -> None:
    """Replace the sub-module at ``dotted`` (e.g. ``blocks.0.attn.q``) by ``new``."""
    *path, last = dotted.split(".")
    parent = model
    for part in path:
        parent = getattr(parent, part)
    setattr(parent, last, new)


def apply_qalora(model, r: int, alpha: float, targets, bits: int = 4, group_size: int = 32,
                 seed: int | None = None, rng=None):
    """Replace the targeted Linear layers of a GPT by QALoRALinear (weights quantized), in place.

    ``targets`` as in ``lora.apply_lora``: names from ['q', 'k', 'v', 'o', 'fc', 'proj'] or
    'blocks.{i}.{name}'. Every other parameter (embeddings, layer norms, biases) is frozen: only
    the adapters' A and B train. Adapters are initialized in model order from ``rng``, or from a
    generator seeded with ``seed``, or else ``backend.global_rng()``. Everything is checked
    before the model changes. Returns the model.
    """
    bits = _check_bits(bits)
    _check_adapter_args(r, alpha)
    return replace_targets(
        model, targets,
        check=lambda lin: _check_group_size(group_size, lin.in_features),
        make=lambda lin, g: QALoRALinear(lin, r, alpha, bits=bits, group_size=group_size, rng=g),
        seed=seed, rng=rng)


def merge_qalora(model):
    """Deploy: replace every QALoRALinear by its merged GroupwiseLinear (same codes, merged zero points).

    All merges are computed first; on a non-finite result a ValueError names the layer and the
    model is unchanged. Returns the model.
    """
    merged = []
    for name, layer in qalora_layers(model).items():
        try:
            merged.append((name, layer.merge()))
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    for name, new in merged:
        _set_module(model, name, new)
    return model


def _array(b):
    return b.data if isinstance(b, Parameter) else b


def _float_weight_and_bias(layer, path: str):
    """The float (out, in) weight a layer computes with, adapter merged in, and its bias (or None)."""
    if isinstance(layer, (GroupwiseLinear, QALoRALinear)):
        raise ValueError(f"{path} is already group-wise quantized ({type(layer).__name__}); "
                         "deploy a QALoRALinear with merge_qalora")
    if isinstance(layer, LoRALinear):
        W0 = layer.base.weight.data  # (out, in)
        W = W0 if layer.merged else W0 + layer.delta_weight().astype(W0.dtype)  # (out, in)
        bias = layer.base.bias
    elif isinstance(layer, Linear):
        W, bias = layer.weight.data, layer.bias  # (out, in)
    elif callable(getattr(layer, "merged_weight", None)):  # a QLoRA layer: dequantized NF4 W0 + s B A
        W = layer.merged_weight()  # (out, in)
        bias = getattr(layer, "bias", None)
        if bias is None and getattr(layer, "base", None) is not None:
            bias = getattr(layer.base, "bias", None)
    else:
        raise ValueError(f"{path} is a {type(layer).__name__}; expected a Linear, LoRALinear or a layer "
                         "with merged_weight()")
    return W, _array(bias)


def quantize_model_groupwise(model, bits: int = 4, group_size: int = 32, targets=TARGETS):
    """Replace each targeted layer by a GroupwiseLinear of its float weight (adapter merged first), in place.

    The deployment of a float-merged model (LoRA, or QLoRA: dequantized NF4 W0 + s B A) at INT-``bits``:
    the update is added in floating point, then the sum is re-quantized with the same group-wise
    min-max scheme as QA-LoRA's base. Everything is checked before the model changes. Returns the model.
    """
    bits = _check_bits(bits)
    new = []
    for i, name in resolve_targets(model, targets):
        path = f"blocks.{i}.{_PARENT[name]}.{name}"
        layer = getattr(getattr(model.blocks[i], _PARENT[name]), name)
        W, bias = _float_weight_and_bias(layer, path)
        try:
            new.append((path, GroupwiseLinear.from_weight(W, bias, bits, group_size)))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    for path, layer in new:
        _set_module(model, path, layer)
    return model
