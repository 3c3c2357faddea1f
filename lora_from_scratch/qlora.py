"""QLoRA: LoRA adapters over a frozen base weight stored in 4-bit NormalFloat (Dettmers et al., 2023).

QLoRA paper, Section 3 "QLoRA Finetuning", Eq. 5 and 6. For one linear layer with a frozen
pretrained weight W0 (out, in) and a LoRA update (Hu et al., 2021, Eq. 3):

    h = x doubleDequant(c1, c2, W0_NF4)^T + b + s * dropout(x) A^T B^T          (Eq. 5)
    doubleDequant(c1, c2, W) = dequant(dequant(c1, c2), W)                      (Eq. 6)

An adapted layer is a frozen base plus a low-rank adapter (``adapter.py``); QLoRA changes only the
base, ``NF4Linear``:

- Storage type: W0 lives only as packed 4-bit NF4 codes, two per byte, with one constant per
  block of ``blocksize`` weights (Section 2, Eq. 1); with double quantization those constants
  are themselves stored in 8 bits (c2) with one float32 constant (c1) per 256 of them: about
  4.127 bits per weight instead of 32 (``quant.blockwise``). These arrays are ``Buffer``s: frozen,
  moved by ``.to()``, counted by ``memory``, stored by checkpoints, never given to an optimizer.
- Computation type: the forward dequantizes W0 on the fly into a temporary and the backward
  dequantizes it *again* for dx = dy W0 (``adapter.QuantizedLinear``): between the two passes the
  layer holds no float copy of W0, and ``dequantizations`` counts two per training step. The
  paper computes in BFloat16; here the computation type is the input's dtype (float32, or
  float64 for gradient checks).
- The adapter is LoRA's, drawn exactly as ``lora.LoRALinear`` draws it from the same generator:
  "kaiming" or "gaussian" A, B = 0. PiSSA is not offered (its residual W0 - s B A would be the
  matrix to quantize: a different method, QPiSSA).
- Deployment and its weakness: the adapter can only be folded into a high-precision copy of the
  weight, dequant(W0_NF4) + s B A (``lora.merge_lora`` replaces the layer by that float Linear).
  Stored back in 4 bits (``merge_lora(model, requantize=True)``) the sum is rounded onto the NF4
  grid again, and the fine-tuned model loses accuracy; kept in float, it loses the memory and
  speed of low-bit inference. (QA-LoRA, ``qalora.py``, removes this.)
"""

from __future__ import annotations

from .adapter import (
    DEFAULT_ADAPTER,
    RANDOM_INITS,
    AdaptedLinear,
    LowRankAdapter,
    QuantizedLinear,
    check_adapter_args,
    replace_targets,
)
from .backend import xp_of
from .nn import Buffer, Linear
from .quant import Quantized4bit, dequantize_4bit, quantize_4bit
from .quant.blockwise import check_blocksize

QLORA_INITS = RANDOM_INITS


# ---------------------------------------------------------------- the frozen 4-bit base
class NF4Linear(QuantizedLinear):
    """A frozen linear layer whose weight (out, in) is stored blockwise in 4 bits (NF4, or FP4 / INT4).

    Buffers: ``packed`` (out * in / 2,) uint8, two codes per byte, first in the high nibble; and
    either ``absmax`` (nblocks,) float32, or with double quantization ``qabsmax`` (nblocks,) uint8,
    ``offset`` (1,) float32 and ``absmax2`` (nblocks / 256,) float32. The bias stays float and frozen.
    """

    def __init__(self, q: Quantized4bit, bias=None):
        if not isinstance(q, Quantized4bit):
            raise ValueError(f"NF4Linear needs a Quantized4bit weight, got {type(q).__name__}")
        if len(q.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D (out, in) weight, got shape {q.shape}")
        out_features, in_features = q.shape
        super().__init__(in_features, out_features, bias)
        self.blocksize, self.quant_type, self.weight_dtype = int(q.blocksize), q.quant_type, str(q.dtype)
        self.double_quant = bool(q.double_quant)  # the block constants stored in 8 bits (c2) with c1 per 256
        # the storage: fixed-precision arrays of the format, never cast by Module.astype
        self.packed = Buffer(q.packed, castable=False)  # (out * in / 2,) uint8
        if q.double_quant:
            self.qabsmax = Buffer(q.qabsmax, castable=False)  # (nblocks,) uint8
            self.offset = Buffer(q.offset, castable=False)  # (1,) float32
            self.absmax2 = Buffer(q.absmax2, castable=False)  # (ceil(nblocks / 256),) float32
        else:
            self.absmax = Buffer(q.absmax, castable=False)  # (nblocks,) float32

    @classmethod
    def from_weight(cls, weight, bias=None, blocksize: int = 64, double_quant: bool = True,
                    quant_type: str = "nf4") -> NF4Linear:
        """Quantize a float weight (out, in); the bias (out,) stays float. ``quantize_4bit`` checks the block size
        and the quant type, the constructor the shape (a 2-D weight)."""
        q = quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)  # packed
        return cls(q, bias)

    @classmethod
    def from_linear(cls, linear: Linear, blocksize: int = 64, double_quant: bool = True,
                    quant_type: str = "nf4") -> NF4Linear:
        """Quantize an ``nn.Linear``'s weight (its bias array is shared, not copied), as ``from_weight``."""
        if not isinstance(linear, Linear):
            raise ValueError(f"NF4Linear.from_linear needs an nn.Linear, got {type(linear).__name__}")
        bias = linear.bias.data if linear.bias is not None else None
        return cls.from_weight(linear.weight.data, bias, blocksize, double_quant, quant_type)  # (out, in) -> NF4

    @property
    def quantized(self) -> Quantized4bit:
        """The stored form as a ``quant.Quantized4bit`` (the live arrays): each buffer is the field of its name."""
        arrays = {name: buffer.data for name, buffer in self.named_buffers()}  # packed, and absmax or the three
        return Quantized4bit(shape=(self.out_features, self.in_features), dtype=self.weight_dtype,
                             blocksize=self.blocksize, quant_type=self.quant_type, absmax=arrays.pop("absmax", None),
                             **arrays)

    def dequantized_weight(self):
        """dequant(W0_NF4) as float32 (out, in): a new array each call (QLoRA Eq. 6)."""
        return dequantize_4bit(self.quantized)  # packed -> (out, in) float32

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (f"NF4Linear(in={self.in_features}, out={self.out_features}, {self.quant_type} "
                f"blocksize={self.blocksize}{dq})")


# ---------------------------------------------------------------- QLoRA
class QLoRALinear(AdaptedLinear):
    """An ``NF4Linear`` base (``.base``) plus the trainable update s * B A.

    ``QLoRALinear(base, r, alpha, blocksize=64, double_quant=True, dropout=0.0, init="kaiming",
    use_rslora=False, rng=None)``: ``base`` is an ``nn.Linear`` (its weight is quantized here and the
    float copy dropped with it) or an ``NF4Linear``. A (r, in) and B (out, r) are made in the float
    weight's dtype (an NF4Linear's ``weight_dtype``, the dtype of the weight it was quantized from) on
    the base's backend, with the same draws as ``LoRALinear``'s: a Linear and its ``NF4Linear.from_linear``
    give the same layer.
    """

    kind = "qlora"
    inits = QLORA_INITS

    def __init__(self, base, r: int, alpha: float, blocksize: int = 64, double_quant: bool = True,
                 dropout: float = 0.0, init: str = "kaiming", use_rslora: bool = False, *, quant_type: str = "nf4",
                 rng=None, adapter_name: str = DEFAULT_ADAPTER):
        if isinstance(base, Linear):
            base = NF4Linear.from_linear(base, blocksize, double_quant, quant_type)  # W0 -> NF4; the bias stays float
        elif not isinstance(base, NF4Linear):
            raise ValueError(f"QLoRALinear wraps an nn.Linear or an NF4Linear, got {type(base).__name__}")
        check_qlora_args(r, alpha, dropout, init, base.blocksize, base.in_features, base.out_features)
        adapter = LowRankAdapter.create(base.in_features, base.out_features, r, alpha, init=init, dropout=dropout,
                                        use_rslora=use_rslora, rng=rng,
                                        like_array=xp_of(base.packed.data).zeros(1, dtype=base.weight_dtype))
        super().__init__(base, adapter, adapter_name)

    @property
    def weight_q(self) -> Quantized4bit:
        """The base's stored 4-bit weight."""
        return self.base.quantized

    def dequantized_weight(self):
        """dequant(W0_NF4), float32 (out, in), a temporary."""
        return self.base.dequantized_weight()


def check_qlora_args(r, alpha, dropout, init, blocksize, in_features: int, out_features: int) -> None:
    """LoRA's checks (rank, alpha, dropout, init) plus the block size; raises ValueError naming the problem.

    PiSSA is refused with the other unknown inits (its residual W0 - s B A would be the matrix to quantize).
    """
    check_adapter_args(r, alpha, dropout, init, (out_features, in_features), inits=QLORA_INITS)
    check_blocksize(blocksize)


def apply_qlora(model, r: int, alpha: float, targets, blocksize: int = 64, double_quant: bool = True,
                dropout: float = 0.0, init: str = "kaiming", use_rslora: bool = False, seed: int | None = None,
                rng=None, quant_type: str = "nf4", adapter_name: str = DEFAULT_ADAPTER):
    """Replace the targeted Linear layers of a GPT by QLoRALinear (NF4 base + LoRA), in place; freeze the rest.

    ``targets`` as in ``lora.apply_lora``. Each targeted weight is quantized with ``blocksize`` (and
    double quantization of the block constants unless ``double_quant=False``); its float copy is
    dropped with the Linear it belonged to. Adapters are initialized in model order from ``rng``,
    or a new generator seeded with ``seed``, or ``backend.global_rng()``: the same draws as
    ``apply_lora`` with the same arguments. Everything is checked before the model changes.
    Returns the model.
    """
    return replace_targets(
        model, targets,
        check=lambda lin: check_qlora_args(r, alpha, dropout, init, blocksize, lin.in_features, lin.out_features),
        make=lambda lin, g: QLoRALinear(lin, r, alpha, blocksize=blocksize, double_quant=double_quant,
                                        dropout=dropout, init=init, use_rslora=use_rslora, quant_type=quant_type,
                                        rng=g, adapter_name=adapter_name),
        seed=seed, rng=rng)
