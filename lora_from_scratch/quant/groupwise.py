"""Group-wise asymmetric min-max INT-N quantization, the weight format of QA-LoRA.

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
``zero = 0``, codes 0 and ``w~ = 0`` exactly.

Zeros are stored as floats: a QA-LoRA merge adds a non-integer amount to them.
``pack_codes`` / ``unpack_codes`` store N-bit codes densely as a bit stream (3-bit codes take
3 bits), and ``groupwise_bits_per_parameter`` counts the real storage. All computation takes its
array module from the data and runs unchanged on CuPy.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_from_scratch.backend import xp_of
from lora_from_scratch.checks import check_int as _check_int

__all__ = [
    "GroupwiseQuantized",
    "dequantize_groupwise",
    "groupwise_bits_per_parameter",
    "pack_codes",
    "quantize_groupwise",
    "unpack_codes",
]


@dataclass
class GroupwiseQuantized:
    """A weight (out, in) in group-wise INT-N form.

    ``codes``  (out, in) uint8, each in [0, 2^bits - 1]
    ``scales`` (out, in / group_size) float, one step size per group
    ``zeros``  (out, in / group_size) float, one zero point per group (integers until a merge)
    ``bits``, ``group_size``.
    """

    codes: object
    scales: object
    zeros: object
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple:
        return tuple(int(s) for s in self.codes.shape)

    def dequantize(self):
        return dequantize_groupwise(self)

    def bits_per_parameter(self, scale_dtype="float16") -> float:
        return groupwise_bits_per_parameter(self, scale_dtype)


def quantize_groupwise(w, bits: int = 4, group_size: int = 32) -> GroupwiseQuantized:
    """Asymmetric min-max INT-``bits`` quantization of a 2-D weight ``(out, in)``, per group of inputs.

    ``bits`` in 2..8; ``group_size`` must divide ``in``. float64 weights are computed in float64,
    other float dtypes in float32. Raises ValueError for a non-float, non-2-D or non-finite
    weight, bits outside 2..8, or ``in`` not divisible by ``group_size``.
    """
    xp = xp_of(w)
    w = xp.asarray(w)
    if w.dtype.kind != "f":
        raise ValueError(f"quantize_groupwise needs a floating-point weight, got dtype {w.dtype}")
    if w.ndim != 2:
        raise ValueError(f"quantize_groupwise needs a 2-D weight (out, in), got shape {tuple(w.shape)}")
    bits = _check_int("bits", bits, 2, 8)
    group_size = _check_int("group_size", group_size, 1)
    out_features, in_features = (int(s) for s in w.shape)
    if in_features % group_size:
        raise ValueError(f"in_features {in_features} is not divisible by group_size {group_size}")
    if not bool(xp.isfinite(w).all()):
        raise ValueError("quantize_groupwise needs finite values, but the weight contains NaN or inf")

    ftype = xp.float64 if w.dtype == xp.float64 else xp.float32
    n_groups = in_features // group_size
    qmax = 2**bits - 1
    groups = w.astype(ftype, copy=False).reshape(out_features, n_groups, group_size)  # (out, in) -> (out, G, gs)
    hi = xp.maximum(groups.max(axis=2), 0.0)  # (out, G) range includes 0
    lo = xp.minimum(groups.min(axis=2), 0.0)  # (out, G)
    scale = (hi - lo) / qmax  # (out, G)
    scale = xp.where(scale > 0, scale, xp.ones_like(scale))  # (out, G) all-zero group -> 1
    zero = xp.rint(-lo / scale)  # (out, G) integer-valued (round half to even)
    q = xp.rint(groups / scale[:, :, None]) + zero[:, :, None]  # (out, G, gs)
    q = xp.clip(q, 0, qmax)  # (out, G, gs)
    codes = q.astype(xp.uint8).reshape(out_features, in_features)  # (out, G, gs) -> (out, in)
    return GroupwiseQuantized(codes=codes, scales=scale, zeros=zero, bits=bits, group_size=group_size)


def dequantize_groupwise(codes, scales=None, zeros=None, group_size=None):
    """``w~ = scale * (q - zero)`` per group: ``(out, in)`` in the scales' float dtype.

    Call it with the four arrays/numbers, or with a ``GroupwiseQuantized`` alone.
    """
    if isinstance(codes, GroupwiseQuantized):
        codes, scales, zeros, group_size = codes.codes, codes.scales, codes.zeros, codes.group_size
    if scales is None or zeros is None or group_size is None:
        raise ValueError("dequantize_groupwise needs codes, scales, zeros and group_size (or a GroupwiseQuantized)")
    group_size = _check_int("group_size", group_size, 1)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D (out, in), got shape {tuple(codes.shape)}")
    out_features, in_features = (int(s) for s in codes.shape)
    if in_features % group_size:
        raise ValueError(f"in_features {in_features} is not divisible by group_size {group_size}")
    n_groups = in_features // group_size
    expected = (out_features, n_groups)
    if tuple(scales.shape) != expected or tuple(zeros.shape) != expected:
        raise ValueError(
            f"scales and zeros must have shape {expected} for codes {tuple(codes.shape)} and "
            f"group_size {group_size}, got {tuple(scales.shape)} and {tuple(zeros.shape)}"
        )
    ftype = scales.dtype
    q = codes.reshape(out_features, n_groups, group_size).astype(ftype)  # (out, in) -> (out, G, gs)
    w = (q - zeros.astype(ftype)[:, :, None]) * scales[:, :, None]  # (out, G, gs)
    return w.reshape(out_features, in_features)  # (out, G, gs) -> (out, in)


def pack_codes(codes, bits: int):
    """Pack N-bit codes densely into bytes: any-shape codes (flattened row-major) -> ``(ceil(n*bits/8),)`` uint8.

    The codes are written as one bit stream, each code most significant bit first, bytes
    filled from their most significant bit; the last byte is padded with zero bits. With
    ``bits = 4`` this is the nibble layout of ``blockwise.pack_nibbles`` (first code in the high
    nibble). Raises ValueError for non-integer codes or codes outside [0, 2^bits - 1].
    """
    xp = xp_of(codes)
    bits = _check_int("bits", bits, 1, 8)
    flat = codes.reshape(-1)  # (n,)
    if flat.dtype.kind not in "ui":
        raise ValueError(f"pack_codes needs integer codes, got dtype {flat.dtype}")
    n = flat.size
    if n and (int(flat.min()) < 0 or int(flat.max()) > 2**bits - 1):
        raise ValueError(
            f"codes must lie in [0, {2**bits - 1}] for {bits} bits, got range [{int(flat.min())}, {int(flat.max())}]"
        )
    flat = flat.astype(xp.uint8)  # (n,)
    shifts = xp.arange(bits - 1, -1, -1, dtype=xp.uint8)  # (bits,) most significant bit first
    stream = ((flat[:, None] >> shifts[None, :]) & 1).reshape(-1)  # (n, bits) -> (n * bits,)
    n_bytes = -(-n * bits // 8)
    padded = xp.zeros(n_bytes * 8, dtype=xp.uint8)  # (n_bytes * 8,)
    padded[: n * bits] = stream
    weights = xp.left_shift(xp.ones(8, dtype=xp.uint8), xp.arange(7, -1, -1, dtype=xp.uint8))  # (8,) 128..1
    return (padded.reshape(n_bytes, 8) * weights).sum(axis=1, dtype=xp.uint8)  # (n_bytes, 8) -> (n_bytes,)


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
    shifts8 = xp.arange(7, -1, -1, dtype=xp.uint8)  # (8,)
    stream = ((packed[:, None] >> shifts8[None, :]) & 1).reshape(-1)[: n * bits]  # (m, 8) -> (n * bits,)
    shifts = xp.arange(bits - 1, -1, -1, dtype=xp.uint8)  # (bits,)
    weights = xp.left_shift(xp.ones(bits, dtype=xp.uint8), shifts)  # (bits,) 2^(bits-1)..1
    return (stream.reshape(n, bits) * weights).sum(axis=1, dtype=xp.uint8)  # (n, bits) -> (n,)


def groupwise_bits_per_parameter(q: GroupwiseQuantized, scale_dtype="float16") -> float:
    """Storage per weight, in bits, measured from ``nbytes`` of what would be stored.

    Counted: the codes packed densely with ``pack_codes`` (``bits`` bits each, the last byte
    padded), plus one scale and one zero per group, each cast to ``scale_dtype`` (float16 by
    default; the zeros are floats because a QA-LoRA merge makes them non-integer). Not counted:
    the few bytes of metadata (shape, bits, group size). For bits=4, group_size=32, float16:
    4 + 2 * 16 / 32 = 5 bits.
    """
    packed = pack_codes(q.codes, q.bits)  # (ceil(out * in * bits / 8),)
    scales = q.scales.astype(scale_dtype)  # (out, G)
    zeros = q.zeros.astype(scale_dtype)  # (out, G)
    total_bytes = int(packed.nbytes) + int(scales.nbytes) + int(zeros.nbytes)
    return 8.0 * total_bytes / int(q.codes.size)
