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

The integer codes q and the scales do not change; the zero points become non-integer floats,
held in float32 (the base stores its codes packed, two 4-bit codes per byte, and its scales and
integer zero points in float16: ``GroupwiseLinear``). ``QALoRALinear.merged_zeros()`` is that
equation; ``merge()`` puts the merged zero points into the base in place (and ``unmerge()`` takes them out again), and
``lora.merge_and_unload`` leaves a plain ``GroupwiseLinear`` per layer: the deployed model, whose
outputs equal the unmerged layer's up to float rounding. A plain LoRA/QLoRA update (B A of shape
(out, in)) varies inside a group and cannot be folded this way; it has to be added to the
dequantized weight and re-quantized, which loses accuracy at low bit widths (``qlora_vs_qalora.py``).

As for LoRA and QLoRA, the layer is a frozen base plus one adapter (``adapter.py``): the base is
``GroupwiseLinear`` (unpacked and dequantized on the fly in the forward and again in the backward), the
adapter is LoRA's with ``pool`` = the group mean (``functional.group_mean_forward`` /
``group_mean_backward``). Backward (the frozen codes, scales, zeros and bias get no gradient):

    u  = p A^T                 (..., r)        dB = s dy^T u
    g  = s dy B                (..., r)        dA = g^T p
    dp = g A                   (..., L)        dx = dy W~ + pool^T(dp),  pool^T(dp)[..., i] = dp[..., g(i)] / group_size

The model-level helpers: ``apply_qalora`` (adapt targeted layers) and ``quantize_model_groupwise``
(the QLoRA deployment: merge in float, then re-quantize the targeted weights group-wise); merging,
disabling, named adapters and files are ``lora``'s, the same for every kind.
"""
from __future__ import annotations

from .adapter import (
    DEFAULT_ADAPTER,
    RANDOM_INITS,
    TARGETS,
    AdaptedLinear,
    LowRankAdapter,
    QuantizedLinear,
    check_adapter_args,
    replace_targets,
    resolve_targets,
)
from .backend import xp_of
from .functional import group_mean_backward, group_mean_forward
from .nn import Buffer, Linear
from .quant.groupwise import (
    GroupwiseLayout,
    GroupwiseQuantized,
    check_bits,
    check_group_size,
    dequantize,
    pack,
    pack_codes,
    quantize_groupwise,
    unpack,
)

__all__ = [
    "GroupwiseLinear",
    "QALoRALinear",
    "apply_qalora",
    "group_mean_backward",
    "group_mean_forward",
    "quantize_model_groupwise",
]


# ---------------------------------------------------------------- the frozen group-wise base
class GroupwiseLinear(QuantizedLinear):
    """A frozen linear layer whose weight is stored group-wise INT-N: y = x W~^T + b.

    ``GroupwiseLinear(q, bias=None)`` with ``q`` a ``GroupwiseQuantized``. It stores the layout of
    ``quant.GroupwiseLayout`` (QA-LoRA's count: INT4 with groups of 32 is 4 + 16/32 + 16/32 = 5 bits
    per weight), as buffers never cast by ``Module.astype``:

    - ``packed`` (ceil(out * in * bits / 8),) uint8: the (out, in) codes as one bit stream
      (``quant.pack_codes``: two 4-bit or four 2-bit codes per byte, 3-bit codes across byte bounds);
    - ``scales`` (out, L) float16 (``from_weight`` rounds each scale up to a float16 before it
      computes the codes; the dtype of ``q.scales`` otherwise);
    - ``zeros`` (out, L): float16 while they are integers (float16 holds every integer up to 2048
      exactly); in the computation dtype ``weight_dtype`` (float32) once a merge has made them
      non-integer, since float16 would round a merged zero point (by up to 1/512 of a step below 8,
      1/16 near 255) and the merge would no longer be exact.

    It dequantizes to ``weight_dtype`` (float32, or float64 for a float64 weight): there every
    float16 scale times an integer code difference is exact. Made from a float weight with
    ``from_weight`` or from an ``nn.Linear`` with ``from_linear``; it is what ``lora.merge_and_unload``
    leaves of a QA-LoRA layer and what the QLoRA deployment re-quantizes into.
    """

    def __init__(self, q: GroupwiseQuantized, bias=None):
        if not isinstance(q, GroupwiseQuantized):
            raise ValueError(f"GroupwiseLinear needs a GroupwiseQuantized weight, got {type(q).__name__}")
        if q.codes.ndim != 2:
            raise ValueError(f"codes must be 2-D (out, in), got shape {tuple(q.codes.shape)}")
        out_features, in_features = (int(s) for s in q.codes.shape)
        L = in_features // check_group_size(q.group_size, in_features)
        if tuple(q.scales.shape) != (out_features, L) or tuple(q.zeros.shape) != (out_features, L):
            raise ValueError(f"scales and zeros must have shape {(out_features, L)}, got {tuple(q.scales.shape)} "
                             f"and {tuple(q.zeros.shape)}")
        packed = pack_codes(q.codes, check_bits(q.bits))  # (out, in) -> (ceil(out * in * bits / 8),), range checked
        self._store(packed, q.scales, q.zeros, q.bits, q.group_size, q.dtype, bias)

    def _store(self, packed, scales, zeros, bits: int, group_size: int, dtype: str, bias) -> None:
        """Hold the packed codes, the scales and the zero points (float16 when they are integers) as buffers."""
        QuantizedLinear.__init__(self, int(scales.shape[1]) * group_size, int(scales.shape[0]), bias)  # in, out
        self.bits, self.group_size, self.weight_dtype = bits, group_size, str(dtype)
        integer = bool((zeros.round() == zeros).all()) and bool((abs(zeros) <= 2048).all())
        self.packed = Buffer(packed, castable=False)  # (ceil(out * in * bits / 8),) uint8
        self.scales = Buffer(scales, castable=False)  # (out, L)
        self.zeros = Buffer(zeros.astype("float16" if integer else self.weight_dtype), castable=False)  # (out, L)

    @classmethod
    def from_weight(cls, weight, bias=None, bits: int = 4, group_size: int = 32) -> GroupwiseLinear:
        """Quantize a float weight (out, in) group-wise with float16 scales; the bias (out,) stays float."""
        q = quantize_groupwise(weight, bits=bits, group_size=group_size, scale_dtype="float16")  # checks its input
        layer = cls.__new__(cls)  # the quantizer's codes need no second check
        layer._store(pack(q.codes, q.bits), q.scales, q.zeros, q.bits, q.group_size, q.dtype, bias)
        return layer

    @classmethod
    def from_linear(cls, linear: Linear, bits: int = 4, group_size: int = 32) -> GroupwiseLinear:
        """Quantize an ``nn.Linear``'s weight group-wise (its bias array is shared)."""
        if not isinstance(linear, Linear):
            raise ValueError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        bias = linear.bias.data if linear.bias is not None else None
        return cls.from_weight(linear.weight.data, bias, bits, group_size)

    @property
    def n_groups(self) -> int:
        return self.in_features // self.group_size

    @property
    def layout(self) -> GroupwiseLayout:
        """The stored layout (``quant.GroupwiseLayout``): bits, group size, bytes per scale and per zero point."""
        return GroupwiseLayout(self.bits, self.group_size, self.scales.data.itemsize, self.zeros.data.itemsize)

    @property
    def codes(self):
        """The codes unpacked from the bit stream: a new (out, in) uint8 array."""
        n = self.out_features * self.in_features
        return unpack(self.packed.data, self.bits, n).reshape(self.out_features, self.in_features)

    @property
    def quantized(self) -> GroupwiseQuantized:
        return GroupwiseQuantized(self.codes, self.scales.data, self.zeros.data, self.bits, self.group_size,
                                  self.weight_dtype)

    def dequantized_weight(self):
        """W~ = scale * (codes - zero) per group: (out, in) in ``weight_dtype``, the codes unpacked on the fly."""
        n = self.out_features * self.in_features
        codes = unpack(self.packed.data, self.bits, n, self.weight_dtype)  # (out * in,) the codes, as floats
        return dequantize(codes, self.scales.data, self.zeros.data, self.weight_dtype)  # (out, L * gs) = (out, in)

    def with_zeros(self, zeros) -> GroupwiseLinear:
        """A new GroupwiseLinear with the same codes, scales and bias and these zero points (out, L)."""
        if tuple(zeros.shape) != tuple(self.zeros.shape):
            raise ValueError(f"zero points of shape {tuple(zeros.shape)} do not fit {tuple(self.zeros.shape)}")
        if not bool(xp_of(zeros).isfinite(zeros).all()):
            raise ValueError("merge refused: the merged zero points contain NaN or inf")
        new = GroupwiseLinear.__new__(GroupwiseLinear)  # the same packed codes and scales (shared, never copied)
        new._store(self.packed.data, self.scales.data, zeros, self.bits, self.group_size, self.weight_dtype,
                   self.bias.data if self.bias is not None else None)
        return new

    def __repr__(self) -> str:
        return (f"GroupwiseLinear(in={self.in_features}, out={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None})")


# ---------------------------------------------------------------- QA-LoRA
class QALoRALinear(AdaptedLinear):
    """A frozen ``GroupwiseLinear`` (``.base``) plus the pooled adapter s * pool(dropout(x)) A^T B^T.

    ``QALoRALinear(base, r, alpha, bits=4, group_size=32, dropout=0.0, init="kaiming",
    use_rslora=False, *, rng=None)``: ``base`` is an ``nn.Linear`` (its weight is quantized here,
    asymmetric min-max INT-``bits`` per group of ``group_size`` input channels) or an already
    quantized ``GroupwiseLinear`` (its own bits and group size must then match). A (r, L) starts
    U(-1/sqrt(L), 1/sqrt(L)) (LoRA's Kaiming-uniform with fan-in L = in / group_size) and B (out, r)
    at zero, so the layer starts as the quantized base layer. r may exceed L (the rank of B A is
    then at most L).
    """

    kind = "qalora"
    inits = RANDOM_INITS
    pooled = True

    def __init__(self, base, r: int, alpha: float, bits: int = 4, group_size: int = 32, dropout: float = 0.0,
                 init: str = "kaiming", use_rslora: bool = False, *, rng=None, adapter_name: str = DEFAULT_ADAPTER):
        if isinstance(base, Linear):  # quantize_groupwise checks bits and group size
            base = GroupwiseLinear.from_linear(base, bits, group_size)
        elif not isinstance(base, GroupwiseLinear):
            raise ValueError(f"QALoRALinear wraps an nn.Linear or a GroupwiseLinear, got {type(base).__name__}")
        elif (base.bits, base.group_size) != (bits, group_size):
            raise ValueError(f"the GroupwiseLinear base has bits={base.bits}, group_size={base.group_size}; "
                             f"got bits={bits!r}, group_size={group_size!r}")
        check_qalora_args(r, alpha, dropout, init)
        adapter = LowRankAdapter.create(base.in_features, base.out_features, r, alpha, init=init, dropout=dropout,
                                        use_rslora=use_rslora, group_size=base.group_size, rng=rng,
                                        like_array=xp_of(base.packed.data).zeros(1, dtype=base.weight_dtype))
        super().__init__(base, adapter, adapter_name)

    @property
    def bits(self) -> int:
        return self.base.bits

    @property
    def n_groups(self) -> int:
        return self.base.n_groups

    @property
    def codes(self):
        return self.base.codes  # (out, in) uint8, unpacked

    @property
    def scales(self):
        return self.base.scales.data  # (out, L)

    @property
    def zeros(self):
        return self.base.zeros.data  # (out, L)

    def merged_zeros(self):
        """zero' = zero - s (B A) / (group_size * scale), per (row, group): (out, L) in the base's computation dtype
        (float32: float16 would round a merged zero point, the merge would not be exact). The base is not changed."""
        return self.zeros.astype(self.base.weight_dtype) - self._zero_shift()  # (out, L)

    def _zero_shift(self):
        """s (B A) / (group_size * scale): the active adapter's update in units of each group's step, (out, L)."""
        a = self.adapter
        BA = a.B.data @ a.A.data  # (out, r) @ (r, L) -> (out, L)
        return BA * (a.scaling / self.group_size) / self.scales.astype(BA.dtype)  # (out, L)

    def merged_base(self, requantize: bool = False) -> GroupwiseLinear:
        """The base with the merged zero points (the paper's one line, ``merged_zeros``); self is not changed."""
        if self.merged:
            raise ValueError("the layer is already merged: its base is the merged layer")
        return self.base.with_zeros(self.merged_zeros())  # (out, L)

    def unmerge(self):
        """Take the merged adapter out of the zero points again: zero = zero' + shift.

        The quantizer's zero points are integers, and the fold's float rounding moves them by far less
        than 1/100 of a step: when every zero' + shift is that close to an integer, the integers come
        back bit for bit (float16 again). Zero points that were not integers come back up to float rounding.
        """
        if self.merged:
            xp = xp_of(self.zeros)
            zeros = self.zeros + self._zero_shift()  # (out, L)
            if bool((xp.abs(zeros - xp.rint(zeros)) < 0.01).all()):
                zeros = xp.rint(zeros)  # (out, L) the integers the merge started from
            self.base = self.base.with_zeros(zeros)  # (out, L)
            self.merged, self._cache = False, None
        return self


def check_qalora_args(r, alpha, dropout=0.0, init="kaiming") -> None:
    """The adapter's hyperparameters for QA-LoRA: r >= 1 (it may exceed L), alpha > 0, dropout, a random init."""
    check_adapter_args(r, alpha, dropout, init, "(out, in)", pooled=True, inits=RANDOM_INITS)


# ---------------------------------------------------------------- model level
def apply_qalora(model, r: int, alpha: float, targets, bits: int = 4, group_size: int = 32, dropout: float = 0.0,
                 init: str = "kaiming", use_rslora: bool = False, seed: int | None = None, rng=None,
                 adapter_name: str = DEFAULT_ADAPTER):
    """Replace the targeted Linear layers of a GPT by QALoRALinear (weights quantized group-wise), in place.

    ``targets`` as in ``lora.apply_lora``. Every other parameter (embeddings, layer norms, biases)
    is frozen: only the adapters' A and B train. Adapters are initialized in model order from
    ``rng``, or from a generator seeded with ``seed``, or else ``backend.global_rng()``. Everything
    is checked before the model changes. Returns the model.
    """
    bits = check_bits(bits)
    check_qalora_args(r, alpha, dropout, init)
    return replace_targets(
        model, targets,
        check=lambda lin: check_group_size(group_size, lin.in_features),
        make=lambda lin, g: QALoRALinear(lin, r, alpha, bits=bits, group_size=group_size, dropout=dropout,
                                         init=init, use_rslora=use_rslora, rng=g, adapter_name=adapter_name),
        seed=seed, rng=rng)


def _float_weight_and_bias(layer, path: str):
    """The float (out, in) weight a layer computes with, its adapter merged in, and its bias (or None)."""
    if isinstance(layer, AdaptedLinear):
        if isinstance(layer, QALoRALinear):
            raise ValueError(f"{path} is already group-wise quantized (QALoRALinear); deploy it with "
                             "lora.merge_and_unload")
        layer = layer.base if layer.merged else layer.merged_base()  # a float Linear: base + s B A
    if isinstance(layer, GroupwiseLinear):
        raise ValueError(f"{path} is already group-wise quantized (GroupwiseLinear)")
    if isinstance(layer, QuantizedLinear):  # an NF4Linear: its dequantized weight
        return layer.dequantized_weight(), layer.bias.data if layer.bias is not None else None
    if isinstance(layer, Linear):
        return layer.weight.data, layer.bias.data if layer.bias is not None else None
    raise ValueError(f"{path} is a {type(layer).__name__}; expected a Linear, an adapted layer or an NF4Linear")


def quantize_model_groupwise(model, bits: int = 4, group_size: int = 32, targets=TARGETS):
    """Replace each targeted layer by a GroupwiseLinear of its float weight (adapter merged first), in place.

    The deployment of a float-merged model (LoRA, or QLoRA: dequantized NF4 W0 + s B A) at INT-``bits``:
    the update is added in floating point, then the sum is re-quantized with the same group-wise
    min-max scheme as QA-LoRA's base. Everything is checked before the model changes. Returns the model.
    """
    bits = check_bits(bits)
    new = []
    for i, target in resolve_targets(len(model.blocks), targets):
        path = target.path(i)
        W, bias = _float_weight_and_bias(model.get_submodule(path), path)
        try:
            new.append((path, GroupwiseLinear.from_weight(W, bias, bits, group_size)))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    for path, layer in new:
        model.set_submodule(path, layer)
    return model
