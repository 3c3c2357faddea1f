"""QLoRA: LoRA adapters over a frozen base weight stored in 4-bit NormalFloat (Dettmers et al., 2023).

QLoRA paper, Section 3 "QLoRA Finetuning", Eq. 5 and 6. For one linear layer with a frozen
pretrained weight W0 (out, in) and a LoRA update (Hu et al., 2021, Eq. 3):

    h = x doubleDequant(c1, c2, W0_NF4)^T + b + s * dropout(x) A^T B^T          (Eq. 5)
    doubleDequant(c1, c2, W) = dequant(dequant(c1, c2), W)                      (Eq. 6)

- Storage type: W0 lives only as packed 4-bit NF4 codes, two per byte, with one constant per
  block of ``blocksize`` weights (Section 2, Eq. 1); with double quantization those constants
  are themselves stored in 8 bits (c2) with one float32 constant (c1) per 256 of them: about
  4.127 bits per weight instead of 32 (``quant.blockwise``).
- Computation type: the forward dequantizes W0 on the fly into a temporary matrix and runs the
  frozen path x W0^T through it; the adapter (A, B) and the bias stay in floating point and are
  the only trainable / float parameters. The paper computes in BFloat16; here the computation
  type is the adapter's dtype: the NF4 dequantization yields float32, which is then cast to the
  dtype of A and B (float32 normally, float64 for gradient checks; ``Module.astype`` casts the
  adapter and the bias, the 4-bit weight stays what it is).
- Backward: the gradient flows to the input through the dequantized weight (dx = dy W0), and
  that weight is dequantized *again* in the backward (recomputed, not kept). Between calls the
  layer holds no float copy of W0: only the 4-bit codes, the block constants, the adapter and
  the bias. W0 gets no gradient at all (there is nothing to train in 4 bits); A and B do:
      dB = s dy^T u,  g = s dy B,  dA = g^T dropout(x),  dx = dy W0 + dropout_backward(g A)
  with u = dropout(x) A^T.
- Deployment and its weakness (SEED section 7): the adapter can only be folded into a
  high-precision copy of the weight, W = dequant(W0_NF4) + s B A (``merged_weight``,
  ``merge_qlora``). Stored back in 4 bits (``merge_qlora(requantize=True)``) the sum is rounded
  onto the NF4 grid again, and the fine-tuned model loses accuracy; kept in float, it loses
  the memory and speed of low-bit inference. (QA-LoRA, ``qalora.py``, removes this.)

Initialization is LoRA's ``"kaiming"`` (A ~ U(-1/sqrt(in), 1/sqrt(in))) or ``"gaussian"``
(A ~ N(0, 1/r^2)), with B = 0, drawn exactly as ``lora.LoRALinear`` draws them. PiSSA is not
offered: its residual W0 - s B A would be quantized in place of W0 (a different method,
QPiSSA), so ``init="pissa"`` raises ValueError.

The 4-bit weight is made on the backend of the base weight; build the QLoRA layers after
moving the model (``model.to("cupy")`` moves Parameters only, not the packed weight).
"""

from __future__ import annotations

from numbers import Integral

from . import functional as F
from .backend import global_rng, xp_of
from .backend import rng as host_rng
from .lora import LowRankAdapter, check_lora_args, mark_only_lora_as_trainable, replace_targets
from .nn import Linear
from .quant import Quantized4bit, dequantize_4bit, quantize_4bit

QLORA_INITS = ("kaiming", "gaussian")


def check_blocksize(blocksize) -> int:
    """The block size of the NF4 quantization: a power of two from 16 to 4096 (QLoRA uses 64)."""
    ok = isinstance(blocksize, Integral) and not isinstance(blocksize, bool)
    if ok:
        blocksize = int(blocksize)
        ok = 16 <= blocksize <= 4096 and blocksize & (blocksize - 1) == 0
    if not ok:
        raise ValueError(f"QLoRA blocksize must be a power of two from 16 to 4096 (QLoRA uses 64), "
                         f"got {blocksize!r}")
    return blocksize


def check_qlora_args(r, alpha, dropout, init, blocksize, in_features: int, out_features: int) -> None:
    """LoRA's checks (rank, alpha, dropout, init) plus the block size; raises ValueError naming the problem."""
    if init == "pissa":
        raise ValueError("init 'pissa' is not supported by QLoRA (its residual W0 - s B A would be the "
                         f"matrix to quantize); valid inits: {list(QLORA_INITS)}")
    if init not in QLORA_INITS:
        raise ValueError(f"unknown LoRA init {init!r}; valid inits: {list(QLORA_INITS)}")
    check_lora_args(r, alpha, dropout, init, in_features, out_features)
    check_blocksize(blocksize)


class QLoRALinear(LowRankAdapter):
    """A frozen linear layer stored in NF4 (``.weight_q``) plus the trainable update s * B A.

    ``QLoRALinear(base, r, alpha, blocksize=64, double_quant=True, dropout=0.0, init="kaiming",
    use_rslora=False, rng=None)`` quantizes ``base.weight`` (out, in) to NF4 blockwise and keeps
    only the quantized form; ``base.bias`` is kept, frozen, in floating point (``.bias``).
    ``lora_A`` (r, in) and ``lora_B`` (out, r) are created in the base weight's dtype, exactly as
    ``LoRALinear`` would create them from the same ``rng``. Parameter names below a model read
    e.g. ``blocks.0.attn.q.lora_A``, ``blocks.0.attn.q.bias``; the 4-bit weight is not a
    Parameter (it never trains and the optimizer never sees it).
    """

    def __init__(self, base: Linear, r: int, alpha: float, blocksize: int = 64, double_quant: bool = True,
                 dropout: float = 0.0, init: str = "kaiming", use_rslora: bool = False, *, rng=None,
                 dropout_seed: int | None = None):
        if not isinstance(base, Linear):
            raise ValueError(f"QLoRALinear wraps an nn.Linear, got {type(base).__name__}")
        check_qlora_args(r, alpha, dropout, init, blocksize, base.in_features, base.out_features)
        rng = global_rng() if rng is None else rng
        W0 = base.weight.data  # (out, in), the float weight: quantized here and then dropped
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.use_rslora, self.init = r, float(alpha), bool(use_rslora), init
        self.blocksize, self.double_quant = int(blocksize), bool(double_quant)
        # the storage type: packed NF4 codes + (double-quantized) block constants, no float W0
        self.weight_q: Quantized4bit = quantize_4bit(W0, blocksize=blocksize, quant_type="nf4",
                                                     double_quant=double_quant)  # (out, in) -> packed
        self.bias = base.bias  # (out,) or None, frozen, in floating point
        if self.bias is not None:
            self.bias.trainable = False
        A, B = self._random_factors(W0, rng)  # the same draws as LoRALinear's
        self._make_adapter(A, B, dropout, dropout_seed, rng)
        self._cache = None

    # ------------------------------------------------------------ the frozen weight
    def dequantized_weight(self):
        """dequant(W0_NF4) as float32 (out, in): a new array each call (QLoRA Eq. 6)."""
        return dequantize_4bit(self.weight_q)  # packed -> (out, in) float32

    def _compute_weight(self):
        """The dequantized W0 in the computation type (the adapter's dtype): a temporary (out, in)."""
        return self.dequantized_weight().astype(self.lora_A.data.dtype, copy=False)  # (out, in)

    # ------------------------------------------------------------ forward / backward
    def forward(self, x, dropout_mask=None):
        """h = x dequant(W0)^T + b + s * dropout(x) A^T B^T (QLoRA Eq. 5).

        ``dropout_mask`` (x's shape, 0/1) fixes the dropout (for gradient checks); it is unused
        when dropout is inactive (p = 0 or eval mode). The dequantized weight is a temporary:
        the cache keeps x, dropout(x) and s u = s dropout(x) A^T, never the (out, in) matrix.
        The frozen path and the adapter branch are computed apart and then added, so with B = 0
        the output is exactly the frozen path's (the adapter adds zeros).
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QLoRALinear expects inputs with last dimension {self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        b = self.bias.data if self.bias is not None else None
        W = self._compute_weight()  # (out, in), dequantized on the fly
        y, _ = F.linear_forward(x, W, b)  # (..., in) -> (..., out); the cache (which holds W) is dropped
        del W  # the float copy of W0 ends here
        A, B, s = self.lora_A.data, self.lora_B.data, self.scaling  # (r, in), (out, r)
        dropout_active = self.dropout.training and self.dropout.p > 0.0
        xd = self.dropout(x, mask=dropout_mask) if dropout_active else x  # (..., in)
        us = (xd @ A.T) * s  # (..., in) @ (in, r) -> (..., r), scaled while narrow
        y = y + us @ B.T  # (..., out) + (..., r) @ (r, out) -> (..., out)
        self._cache = (x, xd, us, dropout_active)
        return y

    def backward(self, dy):
        """Returns dx; accumulates dA into ``lora_A.grad`` and dB into ``lora_B.grad``.

        With u = dropout(x) A^T and h = x W0^T + b + s u B^T (W0 the dequantized weight):
            dB = s dy^T u                       (out, r)
            g  = s dy B                         (..., r)
            dA = g^T dropout(x)                 (r, in)
            dx = dy W0 + dropout_backward(g A)  (..., in)
        W0 is dequantized again here. Neither W0 (4-bit, not a Parameter) nor the frozen bias
        get a gradient: the (out, in) product dy^T x is never formed.
        """
        cache, self._cache = self._cache, None
        if cache is None:
            raise RuntimeError("QLoRALinear.backward called without a forward (or twice for one forward)")
        x, xd, us, dropout_active = cache
        W = self._compute_weight()  # (out, in), recomputed from the 4-bit codes
        need_db = self.bias is not None and self.bias.trainable
        dx, _, db = F.linear_backward(dy, (x, W, self.bias is not None), need_dW=False,
                                      need_db=need_db)  # dx (..., in) = dy W0
        del W
        if db is not None:
            self.bias.accumulate(db)
        g = self._adapter_backward(dy, us, xd)  # (N, r); dA and dB accumulated
        A = self.lora_A.data  # (r, in)
        dxd = (g @ A).reshape(dx.shape)  # (N, r) @ (r, in) -> (N, in) -> (..., in)
        if dropout_active:
            dxd = self.dropout.backward(dxd)  # (..., in): through the dropout mask
        return dx + dxd  # (..., in)

    # ------------------------------------------------------------ deployment
    def merged_weight(self):
        """dequant(W0_NF4) + s B A as a float32 (out, in) array: the adapter merged into float weights.

        The sum is formed in the adapter's dtype (float64 when the adapter is float64) and
        returned in float32. Storing it in 4 bits again (``quantize_4bit``) rounds it onto the
        NF4 grid: that loss is QLoRA's weakness at deployment.
        """
        dtype = self.lora_A.data.dtype
        W = self._compute_weight() + self.delta_weight().astype(dtype, copy=False)  # (out, in)
        return W.astype("float32", copy=False)  # (out, in) float32

    def __repr__(self) -> str:
        rs = ", rslora" if self.use_rslora else ""
        dq = ", double_quant" if self.double_quant else ""
        return (f"QLoRALinear(in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha:g}, "
                f"scaling={self.scaling:g}{rs}, nf4 blocksize={self.blocksize}{dq})")


# ---------------------------------------------------------------- model level
def qlora_layers(model) -> dict:
    """dotted name -> QLoRALinear, for every QLoRA layer of ``model`` (e.g. ``blocks.0.attn.q``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QLoRALinear)}


def mark_only_qlora_as_trainable(model):
    """Freeze every parameter except the adapters' A and B (embeddings, layer norms, biases)."""
    return mark_only_lora_as_trainable(model)


def apply_qlora(model, r: int, alpha: float, targets, blocksize: int = 64, double_quant: bool = True,
                dropout: float = 0.0, init: str = "kaiming", use_rslora: bool = False, seed: int | None = None,
                rng=None):
    """Replace the targeted Linear layers of a GPT by QLoRALinear (NF4 base + LoRA), in place; freeze the rest.

    ``targets`` as in ``lora.apply_lora``: ['q', 'k', 'v', 'o', 'fc', 'proj'] (that matrix in every
    block) or 'blocks.{i}.{name}'. Each targeted weight is quantized to NF4 with ``blocksize``
    (and double quantization of the block constants unless ``double_quant=False``); its float
    copy is dropped with the Linear it belonged to. Adapters are initialized in model order from
    ``rng``, or a new generator seeded with ``seed``, or ``backend.global_rng()``: the same draws
    as ``apply_lora`` with the same arguments. Everything is checked before the model changes.
    Returns the model.
    """
    return replace_targets(
        model, targets,
        check=lambda lin: check_qlora_args(r, alpha, dropout, init, blocksize, lin.in_features, lin.out_features),
        make=lambda lin, g: QLoRALinear(lin, r, alpha, blocksize=blocksize, double_quant=double_quant,
                                        dropout=dropout, init=init, use_rslora=use_rslora, rng=g),
        seed=seed, rng=rng)


def merge_qlora(model, requantize: bool = False):
    """Deploy: replace every QLoRALinear by a plain frozen Linear holding its merged weight, in place.

    ``requantize=False``: the weight is ``merged_weight()``, dequant(W0_NF4) + s B A, in float
    (the model now holds float weights again: 8x the memory of NF4 in float32).
    ``requantize=True``: the merged weight is quantized to NF4 again (the layer's block size and
    double quantization) and the Linear holds its dequantized values, i.e. exactly the numbers a
    4-bit deployment of the merged model computes with. The adapter's small update is rounded
    away in part, which costs accuracy (SEED section 7).
    The weights are cast to the adapter's dtype. All merged weights are checked to be finite
    before any layer is replaced. Returns the model.
    """
    pending = []
    for name, layer in qlora_layers(model).items():
        W = layer.merged_weight()  # (out, in) float32
        if not bool(xp_of(W).isfinite(W).all()):
            raise ValueError(f"{name}: merge refused, dequant(W0) + s B A has NaN or inf entries; "
                             "the model is left unchanged")
        if requantize:
            q = quantize_4bit(W, blocksize=layer.blocksize, quant_type="nf4", double_quant=layer.double_quant)
            W = dequantize_4bit(q)  # (out, in) float32 on the NF4 grid of the merged weight
        pending.append((name, layer, W))
    for name, layer, W in pending:
        dtype = layer.lora_A.data.dtype
        lin = Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, std=0.0,
                     rng=host_rng(0), dtype=dtype)  # placeholder values, replaced next
        lin.weight.data = W.astype(dtype, copy=False)  # (out, in)
        lin.weight.trainable = False
        if layer.bias is not None:
            lin.bias = layer.bias  # (out,), frozen
        parent_name, _, attr = name.rpartition(".")
        parent = dict(model.named_modules())[parent_name]
        setattr(parent, attr, lin)
    return model
