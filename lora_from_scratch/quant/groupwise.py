"""Group-wise asymmetric min-max INT-N quantization, the weight format of QA-LoRA, and how it is stored.

QA-LoRA (Xu et al., 2023), Section 3: min-max quantization ``W~ = alpha * W^ + beta`` with
``W^ = round((W - beta) / alpha)``, applied with one (alpha, beta) pair per *group* of input
channels of each output row (Section 3.3, "group-wise quantization"). Because the low-rank
update of QA-LoRA is constant within a group, it can be folded into the per-group offset after
training, and the merged weight stays in this format.

Here the offset is written as an integer-valued zero point ``zero`` (``beta = -scale * zero``).
For row ``i`` and group ``g`` (input channels ``g*group_size .. (g+1)*group_size - 1``):

    lo    = min(min(w_group), 0)       hi = max(max(w_group), 0)   (the range always holds 0)
    scale = (hi - lo) / (2^bits - 1)
    zero  = round(-lo / scale)                                    (so w = 0 is a level)
    q     = clip(round(w / scale) + zero, 0, 2^bits - 1)          (the stored code)
    w~    = scale * (q - zero)                                    (dequantized)

Rounding is to nearest, halves to even. Every ``|w - w~| <= scale / 2`` (up to float rounding):
a value that the clip moves is within half a step of the end of the range. A group of zeros has
``hi = lo = 0``; its scale is set to 1 instead of 0 (no division by zero), which gives
``zero = 0``, codes 0 and ``w~ = 0`` exactly. With ``scale_dtype="float16"`` (how the QA-LoRA
base stores it) the scale is rounded *up* to a float16 before the zero point and the codes are
computed, so the codes are those of the stored scale and the bound above still holds.

The stored layout (``GroupwiseLayout``, read by ``qalora.GroupwiseLinear`` and by the memory
calculator ``memory.paper``), QA-LoRA's count of 4 + 16/32 + 16/32 = 5 bits per weight at INT4
with groups of 32:

- the codes of the whole (out, in) matrix, row-major, as one bit stream (``pack_codes``): each code
  ``bits`` bits, most significant bit first, bytes filled from their most significant bit, the
  last byte padded with zero bits. 4-bit: two codes per byte, the first in the high nibble;
  2-bit: four per byte; 3-bit: eight codes fill exactly three bytes, so the third and the sixth
  code of every eight run across a byte boundary (bits ``aaabbbcc | cdddeeef | ffggghhh``);
- one scale per group in float16;
- one zero point per group in float16 while they are integers (float16 holds every integer up to
  2048 exactly). A QA-LoRA merge moves them by non-integer amounts, which float16 (11 significant
  bits) would round, by up to 1/512 of a step for a zero point below 8 and 1/16 near 255: not the
  exact merge QA-LoRA promises. Merged zero points are held in the layer's computation dtype
  (float32) instead: 4 + 16/32 + 32/32 = 5.5 bits per weight for a merged INT4 g32 base.

All computation takes its array module from the data and runs unchanged on CuPy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lora_from_scratch.backend import xp_of
from lora_from_scratch.checks import check_int as _check_int

__all__ = [
    "GroupwiseLayout",
    "GroupwiseQuantized",
    "check_bits",
    "check_group_size",
    "dequantize_groupwise",
    "groupwise_bits_per_parameter",
    "pack_codes",
    "quantize_groupwise",
    "unpack_codes",
]


def check_bits(bits) -> int:
    """bits must be an integer from 2 to 8 (QA-LoRA studies INT4, INT3 and INT2)."""
    return _check_int("bits", bits, 2, 8)


def check_group_size(group_size, in_features: int) -> int:
    """group_size must be a positive integer that divides the number of input channels."""
    group_size = _check_int("group_size", group_size, 1)
    if in_features % group_size:
        raise ValueError(f"in_features {in_features} is not divisible by group_size {group_size}")
    return group_size


@dataclass(frozen=True)
class GroupwiseLayout:
    """What a group-wise INT-N weight stores, in bytes: the one description the layer and the memory calculator read.

    ``bits`` per code (packed as one bit stream), one scale of ``scale_bytes`` and one zero point of
    ``zero_bytes`` per group of ``group_size`` input channels (2 and 2: float16; merged zero points 4).
    """

    bits: int
    group_size: int
    scale_bytes: int = 2
    zero_bytes: int = 2

    def packed_bytes(self, n_codes: int) -> int:
        """Bytes of ``n_codes`` codes as one bit stream: ceil(n * bits / 8)."""
        return -(-n_codes * self.bits // 8)

    def nbytes(self, out_features: int, in_features: int) -> int:
        """Bytes stored for an (out, in) weight: the packed codes, plus a scale and a zero per group."""
        groups = out_features * (in_features // self.group_size)
        return self.packed_bytes(out_features * in_features) + groups * (self.scale_bytes + self.zero_bytes)

    def bits_per_weight(self) -> float:
        """bits + 8 (scale_bytes + zero_bytes) / group_size (the stream's last padded byte not counted)."""
        return self.bits + 8 * (self.scale_bytes + self.zero_bytes) / self.group_size


@dataclass
class GroupwiseQuantized:
    """A weight (out, in) in group-wise INT-N form (codes unpacked: the arrays of the formulas).

    ``codes``  (out, in) uint8, each in [0, 2^bits - 1]
    ``scales`` (out, in / group_size) float, one step size per group
    ``zeros``  (out, in / group_size) float, one zero point per group (integers until a merge)
    ``bits``, ``group_size``; ``dtype``: the float dtype it dequantizes to (float32 unless the
    weight was float64).
    """

    codes: object
    scales: object
    zeros: object
    bits: int
    group_size: int
    dtype: str = "float32"

    @property
    def shape(self) -> tuple:
        return tuple(int(s) for s in self.codes.shape)

    def dequantize(self):
        return dequantize_groupwise(self)

    def bits_per_parameter(self, scale_dtype="float16") -> float:
        return groupwise_bits_per_parameter(self, scale_dtype)


def quantize_groupwise(w, bits: int = 4, group_size: int = 32, scale_dtype=None) -> GroupwiseQuantized:
    """Asymmetric min-max INT-``bits`` quantization of a 2-D weight ``(out, in)``, per group of inputs.

    ``bits`` in 2..8; ``group_size`` must divide ``in``. float64 weights are computed in float64,
    other float dtypes in float32. ``scale_dtype`` None keeps the scales and zeros in that dtype;
    ``"float16"`` rounds each scale up to a float16 first (the stored layout) and returns float16
    scales and zeros. Raises ValueError for a non-float, non-2-D or non-finite weight, bits outside
    2..8, ``in`` not divisible by ``group_size``, or a scale beyond float16's range.
    """
    xp = xp_of(w)
    w = xp.asarray(w)
    if w.dtype.kind != "f":
        raise ValueError(f"quantize_groupwise needs a floating-point weight, got dtype {w.dtype}")
    if w.ndim != 2:
        raise ValueError(f"quantize_groupwise needs a 2-D weight (out, in), got shape {tuple(w.shape)}")
    bits = check_bits(bits)
    out_features, in_features = (int(s) for s in w.shape)
    group_size = check_group_size(group_size, in_features)
    if not bool(xp.isfinite(w).all()):
        raise ValueError("quantize_groupwise needs finite values, but the weight contains NaN or inf")

    ftype = xp.float64 if w.dtype == xp.float64 else xp.float32
    qmax = 2**bits - 1
    groups = w.astype(ftype, copy=False).reshape(out_features, -1, group_size)  # (out, in) -> (out, G, gs)
    hi = xp.maximum(groups.max(axis=2), 0.0)  # (out, G) range includes 0
    lo = xp.minimum(groups.min(axis=2), 0.0)  # (out, G)
    scale = (hi - lo) / qmax  # (out, G)
    scale = xp.where(scale > 0, scale, xp.ones_like(scale))  # (out, G) all-zero group -> 1
    scale_dtype = ftype if scale_dtype is None else scale_dtype
    if float(scale.max()) > float(xp.finfo(scale_dtype).max):
        raise ValueError(f"a group's range is too wide for {scale_dtype} scales (largest scale "
                         f"{float(scale.max()):.3g}); quantize with scale_dtype='float32'")
    stored = scale.astype(scale_dtype)  # (out, G) rounded to nearest, then up where that went down:
    stored = xp.where(stored < scale, xp.nextafter(stored, xp.asarray(math.inf, dtype=scale_dtype)), stored)
    scale = stored.astype(ftype)  # (out, G) the stored scale, never below (hi - lo) / qmax
    zero = xp.rint(-lo / scale)  # (out, G) integer-valued (round half to even)
    q = xp.clip(xp.rint(groups / scale[:, :, None]) + zero[:, :, None], 0, qmax)  # (out, G, gs) the stored code
    codes = q.astype(xp.uint8).reshape(out_features, in_features)  # (out, G, gs) -> (out, in)
    return GroupwiseQuantized(codes=codes, scales=scale.astype(scale_dtype), zeros=zero.astype(scale_dtype),
                              bits=bits, group_size=group_size, dtype=str(xp.dtype(ftype)))  # (out, G) both exact


def dequantize_groupwise(codes, scales=None, zeros=None, group_size=None, dtype=None):
    """``w~ = scale * (q - zero)`` per group: ``(out, in)`` in ``dtype``.

    Call it with the four arrays/numbers, or with a ``GroupwiseQuantized`` alone. ``dtype``
    defaults to the scales' (float32 for float16 scales): in float32 every float16 scale times an
    integer code difference is exact.
    """
    if isinstance(codes, GroupwiseQuantized):
        codes, scales, zeros, group_size, dtype = codes.codes, codes.scales, codes.zeros, codes.group_size, codes.dtype
    if scales is None or zeros is None or group_size is None:
        raise ValueError("dequantize_groupwise needs codes, scales, zeros and group_size (or a GroupwiseQuantized)")
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D (out, in), got shape {tuple(codes.shape)}")
    out_features, in_features = (int(s) for s in codes.shape)
    group_size = check_group_size(group_size, in_features)
    expected = (out_features, in_features // group_size)
    if tuple(scales.shape) != expected or tuple(zeros.shape) != expected:
        raise ValueError(
            f"scales and zeros must have shape {expected} for codes {tuple(codes.shape)} and "
            f"group_size {group_size}, got {tuple(scales.shape)} and {tuple(zeros.shape)}"
        )
    if dtype is None:
        dtype = "float32" if str(scales.dtype) == "float16" else scales.dtype
    return dequantize(codes.astype(dtype), scales, zeros, dtype)


def dequantize(codes, scales, zeros, dtype):
    """``scale * (q - zero)`` for codes (out, in) (or flat, row-major) and scales, zeros (out, L), unchecked.

    ``codes`` are integers, or already floats of ``dtype`` (``GroupwiseLinear`` unpacks them straight
    into floats), which are then overwritten: the result is computed in place.
    """
    out_features, n_groups = scales.shape
    w = codes.reshape(out_features, n_groups, -1).astype(dtype, copy=False)  # (out, in) -> (out, L, gs)
    w -= zeros.astype(dtype, copy=False)[:, :, None]  # (out, L, gs)
    w *= scales.astype(dtype, copy=False)[:, :, None]  # (out, L, gs)
    return w.reshape(out_features, -1)  # (out, L, gs) -> (out, in)


# ---------------------------------------------------------------- the bit stream
# bits -> (c, b, word): c codes of ``bits`` bits fill exactly b whole bytes (c * bits = 8 * b), the smallest
# repeating unit of the stream, read as one big-endian integer of 8 b bits, held in the integer type ``word``
_UNITS = {1: (8, 1, "uint8"), 2: (4, 1, "uint8"), 3: (8, 3, "uint32"), 4: (2, 1, "uint8"),
          5: (8, 5, "uint64"), 6: (4, 3, "uint32"), 7: (8, 7, "uint64"), 8: (1, 1, "uint8")}


def pack_codes(codes, bits: int):
    """Pack N-bit codes densely into bytes: any-shape codes (flattened row-major) -> ``(ceil(n*bits/8),)`` uint8.

    The codes are written as one bit stream, each code most significant bit first, bytes
    filled from their most significant bit; the last byte is padded with zero bits. With
    ``bits = 4`` this is the nibble layout of ``blockwise.pack_nibbles`` (first code in the high
    nibble). Raises ValueError for non-integer codes or codes outside [0, 2^bits - 1].
    """
    bits = _check_int("bits", bits, 1, 8)
    flat = codes.reshape(-1)  # (n,)
    if flat.dtype.kind not in "ui":
        raise ValueError(f"pack_codes needs integer codes, got dtype {flat.dtype}")
    if flat.size and (int(flat.min()) < 0 or int(flat.max()) > 2**bits - 1):
        raise ValueError(
            f"codes must lie in [0, {2**bits - 1}] for {bits} bits, got range [{int(flat.min())}, {int(flat.max())}]"
        )
    return pack(flat, bits)


def pack(codes, bits: int):
    """``pack_codes`` unchecked (codes known to fit, as the quantizer's): the layout as it is defined, bit by bit.

    Every code is written as its 8 binary digits, most significant first; its last ``bits`` digits are the
    code, and these, all in a row, are cut into bytes (the last one padded with zero bits).
    """
    xp = xp_of(codes)
    if codes.size >= PACK_UNITS_FROM:
        return _pack_units(codes, bits)  # the same bytes, faster on a large matrix: a reader may skip it
    digits = xp.unpackbits(codes.reshape(-1).astype(xp.uint8, copy=False)).reshape(-1, 8)  # (n,) -> (n, 8)
    return xp.packbits(digits[:, 8 - bits :].reshape(-1))  # (n, bits) in a row, 8 per byte -> (ceil(n * bits / 8),)


# From this many codes on ``pack`` takes ``_pack_units``: measured on one core, 2,359,296 codes (a GPT-2 MLP
# matrix) pack in 2-6 ms that way against 20-40 ms bit by bit (5-15x), 65,536 in 0.1 ms against 0.5-0.9 ms.
# The classroom model's matrices (at most 65,536 weights) take the bit form.
PACK_UNITS_FROM = 1 << 18


def _pack_units(codes, bits: int):
    """``pack`` a unit at a time (c codes in b bytes, ``_UNITS``), the same bytes: a reader may skip it.

    The c codes of a unit go side by side into one integer, the first in the high bits, and the integer's
    b bytes are written big-endian. No (n, 8) array of binary digits is made.
    """
    xp = xp_of(codes)
    c, b, word = _UNITS[bits]
    n = codes.size
    units = xp.zeros((-(-n // c), c), dtype=word)  # (m, c): the codes, zero-padded to whole units
    units.reshape(-1)[:n] = codes.reshape(-1)
    words = xp.zeros(units.shape[0], dtype=word)  # (m,)
    for k in range(c):  # the c codes side by side in one integer, the first in the high bits
        words = (words << bits) | units[:, k]  # (m,)
    stream = xp.empty((units.shape[0], b), dtype=xp.uint8)  # (m, b)
    for j in range(b):  # its bytes, big-endian
        stream[:, j] = (words >> (8 * (b - 1 - j))) & 255  # (m,)
    return stream.reshape(-1)[: -(-n * bits // 8)]  # (ceil(n * bits / 8),)


def unpack_codes(packed, bits: int, n: int):
    """Inverse of ``pack_codes``: the first ``n`` codes of the bit stream, ``(n,)`` uint8."""
    xp = xp_of(packed)
    bits = _check_int("bits", bits, 1, 8)
    n = _check_int("n", n, 0)
    packed = packed.reshape(-1)  # (m,)
    if packed.dtype != xp.uint8:
        raise ValueError(f"unpack_codes needs uint8 bytes, got dtype {packed.dtype}")
    if n * bits > 8 * packed.size:
        raise ValueError(f"cannot unpack {n} codes of {bits} bits from {packed.size} bytes")
    return unpack(packed, bits, n)


def unpack(packed, bits: int, n: int, dtype="uint8"):
    """``unpack_codes`` unchecked, the layer's every forward: the first ``n`` codes, ``(n,)`` in ``dtype``.

    The stream is read a unit at a time (c codes in b bytes, ``_UNITS``): the b bytes as one
    big-endian integer, then its c codes cut out of it, the first from the high bits.
    """
    xp = xp_of(packed)
    c, b, word = _UNITS[bits]
    m = -(-n // c)  # units
    words = packed[:m] if b == 1 else _words(packed, m, b, word)  # (m,) 1, 2, 4, 8 bits: a unit is one byte
    codes = xp.empty((m, c), dtype=dtype)  # (m, c)
    for k in range(c):
        codes[:, k] = (words >> (bits * (c - 1 - k))) & (2**bits - 1)  # (m,) the k-th code of every unit
    return codes.reshape(-1)[:n]  # (n,)


def _words(packed, m: int, b: int, word):
    """The stream as m units of b bytes (3, 5, 6, 7 bits), each read as one big-endian integer: (m,) ``word``."""
    xp = xp_of(packed)
    stream = xp.zeros(m * b, dtype=xp.uint8)  # (m * b,) the bytes, zero-padded to whole units
    stream[: min(packed.size, m * b)] = packed[: m * b]
    stream = stream.reshape(m, b)  # (m, b)
    words = xp.zeros(m, dtype=word)  # (m,)
    for j in range(b):  # the first byte is the most significant
        words = (words << 8) | stream[:, j]  # (m,)
    return words


def groupwise_bits_per_parameter(q: GroupwiseQuantized, scale_dtype="float16") -> float:
    """Storage per weight, in bits, measured from ``nbytes`` of what would be stored.

    Counted: the codes packed densely with ``pack_codes`` (``bits`` bits each, the last byte
    padded), plus one scale and one zero per group, each cast to ``scale_dtype`` (float16 by
    default). Not counted: the few bytes of metadata (shape, bits, group size). For bits=4,
    group_size=32, float16: 4 + 2 * 16 / 32 = 5 bits (``GroupwiseLayout.bits_per_weight``).
    """
    packed = pack_codes(q.codes, q.bits)  # (ceil(out * in * bits / 8),)
    scales = q.scales.astype(scale_dtype)  # (out, G)
    zeros = q.zeros.astype(scale_dtype)  # (out, G)
    total_bytes = int(packed.nbytes) + int(scales.nbytes) + int(zeros.nbytes)
    return 8.0 * total_bytes / int(q.codes.size)
