"""How an adapted layer is built: a frozen base plus one low-rank adapter.

LoRA (Hu et al., 2021), section 4.1, eq. 3: for a pretrained weight W0 of shape (d, k),

    h = W0 x + dW x = W0 x + B A x,      B (d, r), A (r, k), r << min(d, k),

with W0 frozen and only A and B trained. QLoRA (Dettmers et al., 2023, eq. 5) keeps the same
adapter and changes only how W0 is stored (4-bit NF4, dequantized when it is used); QA-LoRA
(Xu et al., 2023, section 3.3) stores W0 group-wise in INT-N and lets the adapter see the input
averaged over each quantization group. For a batch of row vectors x (..., k) all three are

    h = base(x) + s * pool(dropout(x)) A^T B^T

and this file is that sentence as code:

- ``base``: any frozen linear layer. ``nn.Linear`` (LoRA: the float W0), ``qlora.NF4Linear``
  (QLoRA) or ``qalora.GroupwiseLinear`` (QA-LoRA). The two quantized ones derive from
  ``QuantizedLinear`` below: their arrays are ``Buffer``s, and they dequantize W0 on the fly in
  the forward *and again* in the backward, so no float W0 is ever kept between the two. The
  layers only compute; how each takes an update is written here (``merged_copy``): a float weight
  adds it; an NF4 weight is dequantized, added to and (on request) re-quantized; a group-wise
  weight folds an update that is constant within each group into its zero points and refuses any other.
- ``LowRankAdapter``: A (r, k'), B (d, r), the scaling s = alpha / r (rsLoRA, Kalajdzievski 2023:
  alpha / sqrt(r)), dropout on its input (PEFT's ``lora_dropout``), and ``pool``: the identity,
  or the mean over groups of ``group_size`` input channels (then k' = k / group_size). Its
  forward/backward is the pair ``functional.lowrank_forward`` / ``lowrank_backward``.
- ``AdaptedLinear``: the base, a ``ModuleDict`` of named adapters (one per task, the LoRA
  paper's "many small task-specific modules", section 1) and the name of the active one.
  ``merge`` folds the active adapter into the base (section 4.1, "No Additional Inference
  Latency") and ``unmerge`` takes it out again, where the base allows it.
- ``LoRALinear``: an ``AdaptedLinear`` over a float ``nn.Linear`` (LoRA itself), which also allows
  the PiSSA start (Meng et al., 2024, section 3): with W0 = U S V^T the adapter takes the top-r
  singular triplets, A = sqrt(S_r / s) V_r^T and B = U_r sqrt(S_r / s) (so s B A = U_r S_r V_r^T,
  PEFT's split), and W0 is replaced by the residual W0 - s B A, so the output is unchanged at step 0.
- ``TARGET_TABLE``: the six matrices of a block LoRA can adapt, Wq, Wk, Wv, Wo, MLP up and down
  (section 4.2: "the four projection matrices of the self-attention module ... and the two in the MLP
  module"; section 7.1 studies which to adapt), where each lives in our GPT and in GPT-2.
- ``replace_targets``: the targeted ``Linear`` layers of a GPT (``resolve_targets``) swapped for
  adapted layers, then ``mark_only_lora_as_trainable``: only the active adapters' A and B train.
  ``apply_lora`` does it with ``LoRALinear``; ``qlora.apply_qlora`` and ``qalora.apply_qalora`` with
  their bases. The other model-level tools (several adapters, disabling, per-task files, merging)
  are in ``lora.py``.

Initialization (section 4.1): "random Gaussian initialization for A and zero for B, so dW = B A
is zero at the beginning of training". ``"kaiming"``: A ~ U(-1/sqrt(k'), 1/sqrt(k')) (what PEFT
and loralib do: ``kaiming_uniform_(a=sqrt(5))``); ``"gaussian"``: A ~ N(0, 1/r^2) (PEFT's
reading of the paper); ``"pissa"`` (float bases only): ``LoRALinear`` below.

Nothing here forms the (d, k) matrix B A during training: the adapter's path runs through the
rank-r bottleneck, and a frozen W0 never gets a gradient (``need_dW=False``).
"""

from __future__ import annotations

import math
import re
import weakref
from dataclasses import dataclass
from numbers import Real

from . import functional as F
from .backend import global_rng, xp_of
from .backend import rng as host_rng
from .checks import check_int
from .nn import Dropout, Linear, Module, ModuleDict, Parameter, _need_cache
from .quant.blockwise import Quantized4bit
from .quant.groupwise import GroupwiseLayout

INITS = ("kaiming", "gaussian", "pissa")
RANDOM_INITS = ("kaiming", "gaussian")
DEFAULT_ADAPTER = "default"


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """s = alpha / r (LoRA), or alpha / sqrt(r) (rsLoRA)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def check_adapter_args(r, alpha, dropout, init, shape, *, pooled: bool = False, inits=INITS) -> None:
    """Raise ValueError naming the first bad hyperparameter of an adapter for a weight of ``shape`` (out, in).

    The rank is at most min(in, out), except for a ``pooled`` adapter (QA-LoRA), whose r may exceed L.
    """
    check_int(f"LoRA rank r for a weight of shape {shape}", r, 1, None if pooled else min(shape))
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    if init not in inits:
        why = " (PiSSA starts from the SVD of a float W0)" if init == "pissa" else ""
        raise ValueError(f"unknown or unsupported LoRA init {init!r}{why}; valid inits here: {list(inits)}")


# ---------------------------------------------------------------- the adapter
class LowRankAdapter(Module):
    """s * pool(dropout(x)) A^T B^T with trainable A (r, k') and B (d, r).

    Made with ``LowRankAdapter.create(...)`` (random A, B = 0) or from given arrays (PiSSA,
    checkpoints). ``group_size`` None means no pooling (LoRA, QLoRA); an integer means the
    adapter sees the mean of each group of that many input channels (QA-LoRA), so k' = k / group_size.
    """

    def __init__(self, A, B, alpha: float, *, dropout: float = 0.0, use_rslora: bool = False,
                 group_size: int | None = None, init: str = "kaiming", dropout_seed: int | None = None):
        if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"A must be (r, k) and B (d, r), got shapes {tuple(A.shape)} and {tuple(B.shape)}")
        self.A = Parameter(A)  # (r, k')
        self.B = Parameter(B)  # (d, r)
        self.r, self.alpha, self.use_rslora = int(A.shape[0]), float(alpha), bool(use_rslora)
        self.group_size = None if group_size is None else int(group_size)
        self.init = init
        self.dropout = Dropout(dropout, seed=dropout_seed)
        self._cache = None

    @classmethod
    def create(cls, in_features: int, out_features: int, r: int, alpha: float, *, init: str = "kaiming",
               dropout: float = 0.0, use_rslora: bool = False, group_size: int | None = None, rng=None, like_array):
        """A fresh adapter: A random (``init``), B = 0, so B A = 0 and the layer starts as its base.

        ``rng`` is a host NumPy generator, ``backend.global_rng()`` if None (the draws are made on the
        host, then moved to the backend and dtype of ``like_array``); it also gives the dropout its own seed.
        """
        rng = global_rng() if rng is None else rng
        k = in_features // group_size if group_size else in_features
        if init == "kaiming":  # kaiming_uniform_(a=sqrt(5)) gives the bound 1/sqrt(fan_in)
            bound = 1.0 / math.sqrt(k)
            host = rng.uniform(-bound, bound, size=(r, k))  # (r, k') on the host
        elif init == "gaussian":
            host = rng.standard_normal((r, k)) * (1.0 / r)  # (r, k'), std 1/r
        else:
            raise ValueError(f"LowRankAdapter.create draws A at random; init must be one of {list(RANDOM_INITS)}, "
                             f"got {init!r}")
        A = xp_of(like_array).asarray(host, dtype=like_array.dtype)  # (r, k') on the base's backend and dtype
        B = xp_of(like_array).zeros((out_features, r), dtype=like_array.dtype)  # (d, r): B A = 0 at step 0
        seed = int(rng.integers(0, 2**31 - 1))  # each adapter's dropout draws its own mask stream
        return cls(A, B, alpha, dropout=dropout, use_rslora=use_rslora, group_size=group_size, init=init,
                   dropout_seed=seed)

    @property
    def scaling(self) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return lora_scaling(self.r, self.alpha, self.use_rslora)

    def forward(self, x, dropout_mask=None):
        """s * pool(dropout(x)) A^T B^T: (..., k) -> (..., d). ``dropout_mask`` fixes dropout (gradient checks)."""
        xd = self.dropout(x, mask=dropout_mask)  # (..., k): the adapter's input only; the base sees x
        if self.group_size:  # the pooling's cache is the group size, which the adapter keeps anyway
            xd, _ = F.group_mean_forward(xd, self.group_size)  # (..., k) -> (..., k / group_size)
        y, self._cache = F.lowrank_forward(xd, self.A.data, self.B.data, self.scaling)  # (..., k') -> (..., d)
        return y

    def backward(self, dy):
        """Accumulates dA and dB; returns the adapter's share of dx (..., k)."""
        cache, self._cache = _need_cache(self._cache, "LowRankAdapter"), None
        dxa, dA, dB = F.lowrank_backward(dy, cache, need_dA=self.A.trainable, need_dB=self.B.trainable)
        if dA is not None:
            self.A.accumulate(dA)  # (r, k')
        if dB is not None:
            self.B.accumulate(dB)  # (d, r)
        if self.group_size:
            dxa = F.group_mean_backward(dxa, self.group_size)  # (..., k') -> (..., k)
        return self.dropout.backward(dxa)  # (..., k): through the dropout mask

    def delta_weight(self):
        """The update as a full (d, k) matrix: s B A, or for a pooled adapter s (B A)[:, g] / group_size
        repeated over the channels of each group g (what the pooled adapter adds per input channel)."""
        BA = self.B.data @ self.A.data  # (d, r) @ (r, k') -> (d, k')
        if not self.group_size:
            return BA * self.scaling  # (d, k)
        per_group = BA * (self.scaling / self.group_size)  # (d, L)
        return xp_of(BA).repeat(per_group, self.group_size, axis=1)  # (d, L) -> (d, L * group_size)

    def num_parameters(self) -> int:
        """The size of A plus B: r (k' + d)."""
        return self.A.size + self.B.size

    def __repr__(self) -> str:
        rs = ", rslora" if self.use_rslora else ""
        pool = f", pooled over groups of {self.group_size}" if self.group_size else ""
        return f"LowRankAdapter(r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}{rs}{pool})"


# ---------------------------------------------------------------- quantized frozen bases
class QuantizedLinear(Module):
    """A frozen linear layer whose weight is stored quantized (the QLoRA and QA-LoRA bases).

    Subclasses hold their storage as ``Buffer``s and define ``dequantized_weight()``. The forward
    dequantizes W0 into a temporary, computes x W0^T + b and drops it; the backward dequantizes it
    again for dx = dy W0 (QLoRA, section 3: "we dequantize the storage data type to the
    computation data type to perform the forward and backward pass"). ``dequantizations`` counts
    how often that happened. The computation dtype is the input's: W0 is cast to x's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias=None):
        self.in_features, self.out_features = int(in_features), int(out_features)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
        self.bias = Parameter(bias, trainable=False) if bias is not None else None  # (out,) float, frozen
        self.dequantizations = 0
        self._cache = None

    def dequantized_weight(self):  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def weight_count(self) -> int:
        """How many weights the stored form encodes: out * in."""
        return self.in_features * self.out_features

    def storage_bytes(self) -> int:
        """Bytes of the stored weight (the buffers), bias not included."""
        return sum(b.nbytes for _, b in self.named_buffers())

    def _weight_as(self, dtype):
        self.dequantizations += 1
        return self.dequantized_weight().astype(dtype, copy=False)  # (out, in), a temporary

    def forward(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects inputs with last dimension {self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        b = self.bias.data if self.bias is not None else None
        W = self._weight_as(x.dtype)  # (out, in), dequantized on the fly
        y, _ = F.linear_forward(x, W, b)  # (..., in) -> (..., out); the cache (which holds W) is dropped
        self._cache = tuple(x.shape)  # only the input's shape: the backward needs no x and no W
        return y

    def backward(self, dy):
        _, self._cache = _need_cache(self._cache, type(self).__name__), None  # it kept only x's shape
        W = self._weight_as(dy.dtype)  # (out, in), dequantized again (not kept from the forward)
        need_db = self.bias is not None and self.bias.trainable
        dx, _, db = F.linear_backward(dy, (None, W, self.bias is not None), need_dW=False, need_db=need_db)
        if db is not None:
            self.bias.accumulate(db)
        return dx  # (..., in) = dy W0


# ---------------------------------------------------------------- merging: each base takes an update its own way
# LoRA, section 4.1 ("No Additional Inference Latency"): after training, W = W0 + s B A is stored and
# used like any weight. How W0 is stored decides how it takes the update: the three bases below.
def merged_float_copy(base: Linear, delta) -> Linear:
    """A new frozen Linear computing x (W + delta)^T + b: how an update merges into a float weight.

    The bias array is shared. Raises ValueError if W + delta is not finite (nothing changes). ``delta``
    has W's shape (``merged_copy`` checks it).
    """
    W = base.weight.data  # (out, in)
    merged = W + delta.astype(W.dtype, copy=False)  # (out, in)
    if not bool(xp_of(merged).isfinite(merged).all()):
        raise ValueError("merge refused: W + update has NaN or inf entries; the weight is left unchanged")
    return Linear.from_weight(merged, base.bias.data if base.bias is not None else None, trainable=False)


def merged_nf4_copy(base, delta, requantize: bool = False):
    """dequant(W0) + delta as a frozen float ``Linear``, or re-quantized (``requantize=True``) as an NF4Linear.

    ``base`` is a ``qlora.NF4Linear``: its 4 bits cannot hold the update, so the merged layer leaves
    the 4-bit format (float), or is rounded onto the NF4 grid again and loses part of the update
    (QLoRA's deployment weakness). The sum is formed in delta's dtype. ValueError if it is not finite.
    """
    W = base.dequantized_weight().astype(delta.dtype, copy=False) + delta  # (out, in)
    if not bool(xp_of(W).isfinite(W).all()):
        raise ValueError("merge refused: dequant(W0) + update has NaN or inf entries")
    bias = base.bias.data if base.bias is not None else None
    if requantize:  # the same block size, constants and levels as the base
        return type(base).from_weight(W, bias, base.blocksize, base.double_quant, base.quant_type)
    return Linear.from_weight(W, bias, trainable=False)


def merged_groupwise_copy(base, delta):
    """A copy of a group-wise base holding a full (out, in) update that is constant within each group, in its zeros.

    ``base`` is a ``qalora.GroupwiseLinear``: zero'[o, g] = zero[o, g] - delta[o, g] / scale[o, g], the same
    codes and scales (``GroupwiseLinear.with_zeros``). Any other update cannot be held by this format without
    re-quantizing: ValueError. A QA-LoRA layer does not come this way: it folds its (out, L) update
    directly (``QALoRALinear.merged_zeros``).
    """
    out_features, L, gs = base.out_features, base.n_groups, base.group_size
    grouped = delta.reshape(out_features, L, gs)  # (out, in) -> (out, L, gs)
    if not bool((grouped.max(axis=2) == grouped.min(axis=2)).all()):
        raise ValueError("a group-wise weight can only absorb an update that is constant within each group "
                         f"of {gs} input channels (a QA-LoRA update); this one is not: merge in float and "
                         "re-quantize instead (qalora.quantize_model_groupwise)")
    return base.with_zeros(base.zeros.data - grouped[:, :, 0] / base.scales.data)  # (out, L)


def base_format(base) -> str:
    """How ``base`` stores W0: "float" (``nn.Linear``), "nf4" (``qlora.NF4Linear``) or "groupwise"
    (``qalora.GroupwiseLinear``), told by what it holds (those two modules build on this one, so it
    cannot name their classes); ValueError for any other layer."""
    if isinstance(base, Linear):
        return "float"
    if isinstance(base, QuantizedLinear) and isinstance(getattr(base, "layout", None), GroupwiseLayout):
        return "groupwise"
    if isinstance(base, QuantizedLinear) and isinstance(getattr(base, "quantized", None), Quantized4bit):
        return "nf4"
    raise ValueError(f"no merge is known for a {type(base).__name__} base: an adapter merges into an nn.Linear, "
                     "an NF4Linear or a GroupwiseLinear")


def merged_copy(base, delta, requantize: bool = False):
    """A new frozen layer computing base + the (out, in) update ``delta``; ``base`` is not changed.

    Float base: a Linear holding W0 + delta. NF4 base: a float Linear of dequant(W0) + delta, or with
    ``requantize=True`` that sum quantized to NF4 again. Group-wise base: the same codes and scales
    with merged zero points, for an update constant within each group (``requantize`` matters only
    to an NF4 base; the others ignore it). ValueError if ``delta`` is not (out, in) or the result would
    not be finite.
    """
    kind = base_format(base)
    if tuple(delta.shape) != (base.out_features, base.in_features):
        raise ValueError(f"update of shape {tuple(delta.shape)} does not fit the weight "
                         f"{(base.out_features, base.in_features)}")
    if kind == "float":
        return merged_float_copy(base, delta)
    if kind == "nf4":
        return merged_nf4_copy(base, delta, requantize)
    return merged_groupwise_copy(base, delta)


def base_merges_in_place(base) -> bool:
    """Whether ``base`` can take an update exactly and give it back, so an adapter merges into it in place.

    True for a float weight (W0 + s B A, then - s B A) and a group-wise one (QA-LoRA: the group-constant
    update moves the zero points, and can be moved back); False for NF4, where an update forces the
    weight out of its format (float, or re-quantized with a loss), so a merge replaces the layer.
    """
    return base_format(base) != "nf4"


# ---------------------------------------------------------------- the adapted layer
class AdaptedLinear(Module):
    """h = base(x) + s * pool(dropout(x)) A^T B^T: a frozen base and named low-rank adapters, one active.

    Subclasses (``LoRALinear`` below, ``qlora.QLoRALinear``, ``qalora.QALoRALinear``) only choose
    the base and the adapter's pooling. Parameter names below a model read
    ``blocks.0.attn.q.base.weight``, ``blocks.0.attn.q.adapters.default.A``.

    ``lora_A``, ``lora_B``, ``r``, ``alpha``, ``scaling`` are those of the active adapter. With no
    active adapter (``lora.disable_adapters``) or while merged, the layer computes ``base(x)``
    alone: exactly the base layer's output. Training while merged is refused.
    """

    kind = "adapted"
    inits = RANDOM_INITS  # subclasses with a float base add "pissa"
    pooled = False  # QA-LoRA: the adapter sees group means of the base's group size

    def __init__(self, base, adapter: LowRankAdapter, adapter_name: str = DEFAULT_ADAPTER):
        """``base`` and an ``adapter`` made to fit it: each subclass checks its arguments and makes both;
        ``assemble`` checks parts that come from a file."""
        self.base = base.freeze()  # a base never trains: every parameter frozen; buffers never train anyway
        self.adapters = ModuleDict({adapter_name: adapter})
        self.active: str | None = adapter_name
        self.merged = False
        self._cache = None

    # ------------------------------------------------------------ the pieces
    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def bias(self):
        """The base's (frozen, float) bias Parameter, or None."""
        return self.base.bias

    @property
    def group_size(self) -> int | None:
        """The adapter's pooling group (QA-LoRA), or None."""
        return self.base.group_size if self.pooled else None

    @property
    def adapter_in_features(self) -> int:
        """k': what A's columns see, in (LoRA, QLoRA) or in / group_size (QA-LoRA)."""
        return self.in_features // self.group_size if self.pooled else self.in_features

    @property
    def adapter(self) -> LowRankAdapter:
        """The active adapter (ValueError when adapters are disabled)."""
        if self.active is None:
            raise ValueError("this layer has no active adapter (adapters are disabled)")
        return self.adapters[self.active]

    @property
    def lora_A(self) -> Parameter:
        return self.adapter.A

    @property
    def lora_B(self) -> Parameter:
        return self.adapter.B

    @property
    def r(self) -> int:
        return self.adapter.r

    @property
    def alpha(self) -> float:
        return self.adapter.alpha

    @property
    def scaling(self) -> float:
        return self.adapter.scaling

    @property
    def dropout(self) -> Dropout:
        return self.adapter.dropout

    def delta_weight(self):
        """The active adapter's update as a full (out, in) matrix (for merging and for study, not for training)."""
        return self.adapter.delta_weight()

    def check_args(self, r, alpha, dropout, init) -> None:
        """Raise ValueError naming the problem with an adapter of these hyperparameters for this layer."""
        check_adapter_args(r, alpha, dropout, init, (self.out_features, self.in_features), pooled=self.pooled,
                           inits=self.inits)

    def new_adapter(self, r: int, alpha: float, *, dropout: float = 0.0, init: str = "kaiming",
                    use_rslora: bool = False, rng) -> LowRankAdapter:
        """A fresh adapter for this layer (random A, B = 0) in the dtype and backend of the existing ones."""
        self.check_args(r, alpha, dropout, init)
        if init == "pissa":
            raise ValueError("a PiSSA adapter replaces W0 by a residual, so it can only be a layer's first adapter "
                             "(make it with apply_lora(..., init='pissa')); an added adapter takes one of "
                             f"{list(RANDOM_INITS)}")
        ref = next(iter(self.adapters.values())).A.data
        return LowRankAdapter.create(self.in_features, self.out_features, r, alpha, init=init, dropout=dropout,
                                     use_rslora=use_rslora, group_size=self.group_size, rng=rng, like_array=ref)

    # ------------------------------------------------------------ forward / backward
    def forward(self, x, dropout_mask=None):
        """h = base(x) + s * pool(dropout(x)) A^T B^T (base(x) alone when merged or disabled)."""
        y = self.base(x)  # (..., in) -> (..., out), the frozen path (the base checks x's last dimension)
        used = None if self.merged else self.active  # None: merged, or adapters disabled
        if used is not None:
            y += self.adapters[used](x, dropout_mask)  # (..., out) += (..., out), the adapter's path
        self._cache = {"adapter": used}
        return y

    def backward(self, dy):
        """dx = dy W0 + the adapter's share; accumulates the active adapter's dA and dB (W0 gets nothing)."""
        if self.merged:
            raise RuntimeError(f"{type(self).__name__} is merged (the base holds W0 + s B A): call unmerge() "
                               "before training")
        used, self._cache = _need_cache(self._cache, type(self).__name__)["adapter"], None
        dx = self.base.backward(dy)  # (..., in) = dy W0; no (out, in) weight gradient is formed
        if used is not None:
            dx += self.adapters[used].backward(dy)  # (..., in)
        return dx

    # ------------------------------------------------------------ merge / unmerge
    def merged_base(self, requantize: bool = False):
        """A new frozen layer that computes base + the active adapter's update s B A (self is not changed).

        ``merged_copy`` of the base: W0 + s B A in float, dequant(W0) + s B A for NF4 (re-quantized with
        ``requantize=True``), merged zero points for a group-wise base. ValueError if it would not be finite.
        """
        if self.merged:
            raise ValueError("the layer is already merged: its base is the merged layer")
        return merged_copy(self.base, self.delta_weight(), requantize=requantize)  # delta (out, in)

    @property
    def merges_in_place(self) -> bool:
        """Whether the base can hold the update and give it back: a float weight, or QA-LoRA's zero points."""
        return base_merges_in_place(self.base)

    def merge(self):
        """Fold the active adapter into the base, in place (where the base allows it). A no-op when merged."""
        if self.merged:
            return self
        if not self.merges_in_place:
            raise ValueError(f"a {type(self).__name__} cannot merge in place: its {type(self.base).__name__} "
                             "cannot hold the update; use lora.merge_lora(model), which replaces the layer by a "
                             "float (or re-quantized) one")
        return self.set_merged_base(self.merged_base())

    def set_merged_base(self, new):
        """Make ``new`` (from ``merged_base``) the base and mark the layer merged (``merge``, ``lora.merge_lora``).

        ``merged_base`` computes and checks the merge without changing anything; this commits it, so a
        model-wide merge can check every layer first and change them only when all succeeded.
        """
        for p in self.adapter.parameters():
            p.grad = None  # no stale gradient may move A or B while they are folded into the base
        self.base, self.merged, self._cache = new, True, None
        return self

    def unmerge(self):
        """Take the merged adapter out of the base again: W0 = W - s B A, up to float rounding (no-op if not merged)."""
        if not self.merged:
            return self
        delta = self.adapter.delta_weight()  # (out, in), the same A, B and s as the merge (they cannot change)
        self.base = merged_copy(self.base, -delta)  # (out, in) update taken out again
        self.merged, self._cache = False, None
        return self

    # ------------------------------------------------------------ from parts (checkpoints)
    @classmethod
    def assemble(cls, base, adapters: dict, active: str | None, merged: bool = False) -> AdaptedLinear:
        """A layer from its parts (checkpoints): ``adapters`` maps names to LowRankAdapters.

        ValueError unless ``base`` is a float or quantized linear layer and every adapter fits it:
        A (r, k') with k' = in (in / group_size for a pooled layer), B (out, r).
        """
        if not isinstance(base, (Linear, QuantizedLinear)):
            raise ValueError(f"an adapted layer's base must be an nn.Linear or a quantized linear layer, "
                             f"got {type(base).__name__}")
        if not adapters:
            raise ValueError("an adapted layer needs at least one adapter")
        (name0, first), *rest = adapters.items()
        layer = cls.__new__(cls)
        AdaptedLinear.__init__(layer, base, first, name0)
        k = layer.adapter_in_features  # A's columns: k'
        for name, a in adapters.items():
            if tuple(a.A.shape[1:]) != (k,) or a.B.shape[0] != base.out_features:
                raise ValueError(f"adapter {name!r}: shapes A {a.A.shape}, B {a.B.shape} do not fit a base of "
                                 f"(out, in) = ({base.out_features}, {base.in_features}) (A needs {k} columns)")
        for name, a in rest:
            layer.adapters[name] = a
        if active is not None and active not in layer.adapters:
            raise ValueError(f"active adapter {active!r} is not among {layer.adapters.keys()}")
        layer.active, layer.merged = active, bool(merged)
        return layer

    def __repr__(self) -> str:
        names = ", ".join(f"{n}{'*' if n == self.active else ''}: r={a.r}" for n, a in self.adapters.items())
        m = ", merged" if self.merged else ""
        return f"{type(self).__name__}(base={self.base!r}, adapters [{names}]{m})"


# ---------------------------------------------------------------- LoRA: a float base
class LoRALinear(AdaptedLinear):
    """A frozen float ``Linear`` (``.base``) plus the trainable update s * B A.

    ``LoRALinear(base, r, alpha, dropout=0.0, init="kaiming", use_rslora=False, rng=None)`` freezes
    ``base.weight`` and ``base.bias`` and creates A (r, in) and B (out, r) from the host generator
    ``rng`` (default ``backend.global_rng()``); ``init`` is "kaiming", "gaussian" or "pissa".
    """

    kind = "lora"
    inits = INITS

    def __init__(self, base: Linear, r: int, alpha: float, dropout: float = 0.0, init: str = "kaiming",
                 use_rslora: bool = False, *, rng=None, adapter_name: str = DEFAULT_ADAPTER):
        if not isinstance(base, Linear):
            raise ValueError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        check_lora_args(r, alpha, dropout, init, base.in_features, base.out_features)
        if init == "pissa":
            adapter = _pissa_adapter(base, r, alpha, dropout, use_rslora, rng)
        else:
            adapter = LowRankAdapter.create(base.in_features, base.out_features, r, alpha, init=init,
                                            dropout=dropout, use_rslora=use_rslora, rng=rng,
                                            like_array=base.weight.data)
        super().__init__(base, adapter, adapter_name)


def check_lora_args(r, alpha, dropout, init, in_features: int, out_features: int) -> None:
    """LoRA's checks for a float weight (out, in): 1 <= r <= min(in, out), alpha > 0, dropout, an init of ``INITS``."""
    check_adapter_args(r, alpha, dropout, init, (out_features, in_features))


def _pissa_adapter(base: Linear, r: int, alpha: float, dropout: float, use_rslora: bool, rng) -> LowRankAdapter:
    """Top-r singular triplets of W0 into A and B; W0 becomes the residual (computed in float64)."""
    W = base.weight.data  # (out, in)
    xp = xp_of(W)
    s = lora_scaling(r, alpha, use_rslora)
    W64 = W.astype("float64")  # (out, in)
    U, S, Vh = xp.linalg.svd(W64, full_matrices=False)  # (out, K), (K,), (K, in); K = min(out, in)
    root = xp.sqrt(S[:r] / s)  # (r,): sqrt(S_r / s), so that s B A = U_r S_r V_r^T
    A = (root[:, None] * Vh[:r]).astype(W.dtype)  # (r, 1) * (r, in) -> (r, in)
    B = (U[:, :r] * root[None, :]).astype(W.dtype)  # (out, r) * (1, r) -> (out, r)
    # the residual from the rounded factors, so that W_res + s B A reproduces W0 as closely as possible
    residual = W64 - s * (B.astype("float64") @ A.astype("float64"))  # (out, r) @ (r, in) -> (out, in)
    base.weight.data = residual.astype(W.dtype)  # (out, in)
    rng = global_rng() if rng is None else rng  # the dropout's seed, as LowRankAdapter.create takes it
    return LowRankAdapter(A, B, alpha, dropout=dropout, use_rslora=use_rslora, init="pissa",
                          dropout_seed=int(rng.integers(0, 2**31 - 1)))


# ---------------------------------------------------------------- putting adapters into a model
@dataclass(frozen=True)
class Target:
    """One of the six matrices LoRA can adapt in each block (Hu et al., 2021, section 4.2), and where it lives.

    Our GPT keeps all six as separate ``Linear`` layers; GPT-2 (and therefore Hugging Face
    ``transformers`` and PEFT) fuses Wq, Wk, Wv into one ``c_attn`` of width 3C and names the attention
    output projection and the MLP's down projection both ``c_proj``. For each of our names:

    - ``parent``: the module of a block that holds it (``attn`` or ``mlp``), so its path is
      ``blocks.{i}.{parent}.{name}``;
    - ``hf_module``: the GPT-2 module it belongs to (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``,
      ``mlp.c_proj``), below ``transformer.h.{i}.``;
    - ``fused_index``: for q, k, v, which third of ``c_attn``'s 3C outputs it is (0, 1, 2); None otherwise;
    - ``in_mult``, ``out_mult``: its (in, out) widths in units of n_embd (fc: C -> 4C, proj: 4C -> C).
    """

    name: str
    parent: str
    hf_module: str
    fused_index: int | None
    in_mult: int
    out_mult: int

    def path(self, block: int) -> str:
        """Our dotted path in a GPT: ``blocks.{block}.{parent}.{name}``."""
        return f"blocks.{block}.{self.parent}.{self.name}"

    def hf_path(self, block: int) -> str:
        """The GPT-2 module path: ``transformer.h.{block}.{hf_module}``."""
        return f"transformer.h.{block}.{self.hf_module}"

    def shape(self, n_embd: int) -> tuple[int, int]:
        """(out, in) of the weight, the paper's (d, k) orientation."""
        return self.out_mult * n_embd, self.in_mult * n_embd


TARGET_TABLE = {
    "q": Target("q", "attn", "attn.c_attn", 0, 1, 1),
    "k": Target("k", "attn", "attn.c_attn", 1, 1, 1),
    "v": Target("v", "attn", "attn.c_attn", 2, 1, 1),
    "o": Target("o", "attn", "attn.c_proj", None, 1, 1),
    "fc": Target("fc", "mlp", "mlp.c_fc", None, 1, 4),
    "proj": Target("proj", "mlp", "mlp.c_proj", None, 4, 1),
}
TARGETS = tuple(TARGET_TABLE)  # ("q", "k", "v", "o", "fc", "proj")
FUSED = ("q", "k", "v")  # the three thirds of GPT-2's c_attn, in order
HF_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

_PATH = re.compile(r"^blocks\.(\d+)\.(attn|mlp)\.([a-z]+)$")
_TARGET = re.compile(r"(?:blocks\.(\d+)\.)?([a-z]+)")  # a short name, optionally after "blocks.{i}."


def parse_path(path: str) -> tuple[int, Target]:
    """(block index, Target) of a dotted path such as ``blocks.2.attn.q``; ValueError otherwise."""
    m = _PATH.match(path)
    if m is None or m.group(3) not in TARGET_TABLE or TARGET_TABLE[m.group(3)].parent != m.group(2):
        raise ValueError(f"{path!r} is not the path of an adaptable matrix (blocks.<i>.attn.q|k|v|o or "
                         f"blocks.<i>.mlp.fc|proj)")
    return int(m.group(1)), TARGET_TABLE[m.group(3)]


def resolve_targets(n_layer: int, targets) -> list[tuple[int, Target]]:
    """(block, Target) pairs for ``targets``, in model order.

    ``targets``: short names from ``TARGETS`` (that matrix in every block) or ``"blocks.{i}.{name}"``
    (one block), or one such string. Raises ValueError naming an unknown target or a missing block.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError(f"at least one target is needed; valid targets: {list(TARGETS)}")
    chosen = set()  # (block, name)
    for t in targets:
        m = _TARGET.fullmatch(t) if isinstance(t, str) else None  # groups: the block (None: every block), the name
        if m is None or m.group(2) not in TARGET_TABLE:
            raise ValueError(f"unknown target {t!r}; valid targets: {list(TARGETS)} or 'blocks.<i>.<name>'")
        if m.group(1) is not None and int(m.group(1)) >= n_layer:
            raise ValueError(f"target {t!r} names block {int(m.group(1))}, but the model has {n_layer} blocks "
                             f"(0..{n_layer - 1})")
        blocks = range(n_layer) if m.group(1) is None else [int(m.group(1))]
        chosen.update((i, m.group(2)) for i in blocks)
    return [(i, TARGET_TABLE[name]) for i in range(n_layer) for name in TARGETS if (i, name) in chosen]


def is_adapter(module) -> bool:
    """True for an adapted layer of any kind (LoRA, QLoRA, QA-LoRA)."""
    return isinstance(module, AdaptedLinear)


def lora_layers(model) -> dict:
    """dotted name -> adapted layer (LoRA, QLoRA or QA-LoRA), e.g. ``blocks.0.attn.q``, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdaptedLinear)}


# layer -> how many ``disable_adapters`` contexts it is inside (weak: a copy or a dropped model is not counted)
_DISABLED = weakref.WeakKeyDictionary()


def refuse_while_disabled(layers: dict, what: str) -> None:
    """ValueError if any of ``layers`` is inside ``disable_adapters``: on exit the context puts back the active
    adapters it saved, so a switch, a deletion or a merge made inside would be half undone."""
    inside = [path for path, layer in layers.items() if _DISABLED.get(layer)]
    if inside:
        raise ValueError(f"{what} inside lora.disable_adapters ({inside[0]}): the adapters are switched off "
                         "until the with-block ends, and its end restores the active adapter it saved; call it "
                         "after the block")


def mark_only_lora_as_trainable(model):
    """Freeze every parameter except the active adapters' A and B (embeddings, layer norms, biases, W0 included)."""
    layers = lora_layers(model)
    refuse_while_disabled(layers, "mark_only_lora_as_trainable")
    model.freeze()
    for layer in layers.values():
        if layer.active is not None:
            for p in layer.adapters[layer.active].parameters():
                p.trainable = True  # A and B of the active adapter
    return model


def replace_targets(model, targets, check, make, seed: int | None = None, rng=None):
    """Swap each targeted ``Linear`` of a GPT for ``make(linear, rng)``, then freeze all but the adapters.

    The shared part of ``apply_lora``, ``qlora.apply_qlora`` and ``qalora.apply_qalora``: targets
    are resolved (``resolve_targets``), every layer is checked with ``check(linear)``
    *before* the model changes, and the new layers are made in model order from ``rng``, or a
    generator seeded with ``seed``, or ``backend.global_rng()``.
    """
    refuse_while_disabled(lora_layers(model), "adding adapter layers")
    found, blocks = [], list(model.blocks)
    for i, target in resolve_targets(len(blocks), targets):
        path, parent = target.path(i), getattr(blocks[i], target.parent)  # blocks.{i}.attn or .mlp
        lin = getattr(parent, target.name)
        if isinstance(lin, AdaptedLinear):
            raise ValueError(f"{path} already has an adapter ({type(lin).__name__}); use add_adapter for another task")
        if type(lin) is not Linear:
            raise ValueError(f"{path} is a {type(lin).__name__}, not a float Linear layer")
        try:
            check(lin)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        found.append((parent, target.name, lin))
    if rng is None:
        rng = host_rng(seed) if seed is not None else global_rng()
    for parent, name, lin in found:
        setattr(parent, name, make(lin, rng))  # the adapted layer takes the Linear's place
    return mark_only_lora_as_trainable(model)


def apply_lora(model, r: int, alpha: float, targets, dropout: float = 0.0, init: str = "kaiming",
               use_rslora: bool = False, seed: int | None = None, rng=None, adapter_name: str = DEFAULT_ADAPTER):
    """Replace the targeted Linear layers of a GPT by LoRALinear, in place; freeze all the rest.

    ``targets``: short names from ['q', 'k', 'v', 'o', 'fc', 'proj'] (that matrix in every
    block: Wq, Wk, Wv, Wo, MLP up, MLP down) or 'blocks.{i}.{name}' (one block).
    Adapters are initialized in model order from ``rng`` (a host NumPy generator),
    or from a new generator seeded with ``seed``, or else ``backend.global_rng()``.
    Everything is checked before the model changes. Returns the model.
    """
    return replace_targets(
        model, targets,
        check=lambda lin: check_lora_args(r, alpha, dropout, init, lin.in_features, lin.out_features),
        make=lambda lin, g: LoRALinear(lin, r, alpha, dropout=dropout, init=init, use_rslora=use_rslora, rng=g,
                                       adapter_name=adapter_name),
        seed=seed, rng=rng)
