"""Blockwise 4-bit quantization (NF4, FP4, INT4) with optional double quantization.

QLoRA (Dettmers et al., 2023), Section 2 "Block-wise k-bit Quantization" (Eq. 1-2), Section 3
"4-bit NormalFloat Quantization" and "Double Quantization", and the storage cost quoted there
(32/64 = 0.5 bits per parameter for the block scales, 8/64 + 32/(64*256) = 0.127 with double
quantization).

Quantizing a weight tensor ``x`` to 4 bits:

1. Flatten ``x`` row-major and cut it into blocks of ``blocksize`` consecutive values (the last
   block may be shorter).
2. For each block, the *absmax* ``c = max |x_i|`` is the quantization constant (Eq. 1).
3. Every value is scaled into [-1, 1], ``v = x_i / c``, and replaced by the index of the nearest
   level of the code table (``tables.py``): the count of level midpoints strictly below ``v``
   (so a value exactly on a midpoint goes to the lower level). FP4 and INT4 list the level 0
   twice, as codes 0 and 8; the midpoint between the two is 0 itself, so 0 and small negative
   values get code 0 and small positive values code 8.
4. Two 4-bit indices share one byte; the first element goes into the high nibble.

Dequantizing reverses it: ``x_i ~ level[index_i] * c`` (Eq. 2).

How the work is done (the results do not depend on it): on NumPy the data goes through in
cache-sized chunks. Quantizing runs the 15 midpoint comparisons into reused buffers and packs
each pair of codes through a uint16 view of the pair; FP4 and INT4, whose tables are not in
sorted order, then translate each packed byte with one 256-entry lookup. Dequantizing looks
every packed byte up in a (256, 2) table of the levels of its two nibbles, so the nibbles are
never unpacked, and multiplies by the block constants.

Double quantization stores the block constants themselves in 8 bits: subtract their mean (the
*offset*), cut the centred values into blocks of 256, and quantize each block with its own
absmax (a float32 ``absmax2``) to the nearest of the 256 levels of the dynamic 8-bit map.

All functions take their array module from the data (``xp_of``) and run unchanged on CuPy.

Agreement with bitsandbytes (checked in the tests, bitsandbytes 0.50.2, CPU):

- packed bytes, absmax and dequantized values are identical, bit for bit, without double
  quantization. To get there the arithmetic follows bitsandbytes' CPU path: full blocks are
  scaled by the float32 reciprocal ``x * (1 / c)``, the short last block by the division
  ``x / c``; ``c`` is replaced by 1e-38 when it is smaller (so an all-zero block gives zeros);
  level midpoints are float32 averages; an odd-length input is padded with one 0.0 before
  packing. (FP4 code 8, "minus zero", dequantizes to +0.0 here; bitsandbytes' CPU kernels
  disagree among themselves on the sign of that zero.) One deliberate difference: for an
  all-zero short last block bitsandbytes stores absmax 1e-38, this code stores 0 (both
  dequantize to zeros).
- with double quantization too, every stored array is bitsandbytes', bit for bit (checked on all
  72 block matrices of GPT-2 small): the 8-bit codes round the way its CPU kernel does, through
  a grid of 65,536 points on [-1, 1] (``quantize_blockwise_8bit``), which is the nearest level
  except within half a grid step (1.5e-5 of the block's absmax) of a midpoint, and near zero,
  where the dynamic map's levels are closer together than the grid; the offset is torch's
  float32 mean, summed in torch's order (``offset_mean``). What that order depends on: torch
  sums more than 32,768 block constants (a matrix of more than 2M weights) in two halves when it
  has two or more threads, and here that is assumed; with ``torch.set_num_threads(1)`` such a
  matrix's offset can differ in the last bit (and then its nested absmax and a few 8-bit codes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lora_from_scratch.backend import to_numpy, xp_of
from lora_from_scratch.checks import check_int, check_power_of_two
from lora_from_scratch.quant import tables

__all__ = [
    "QUANT_TYPES",
    "Quantized4bit",
    "bits_per_parameter",
    "dequantize_4bit",
    "dequantize_blockwise_8bit",
    "offset_mean",
    "pack_nibbles",
    "quantize_4bit",
    "quantize_blockwise_8bit",
    "unpack_nibbles",
]

QUANT_TYPES = ("nf4", "fp4", "int4")
DOUBLE_QUANT_BLOCKSIZE = 256
_TINY = 1e-38  # the smallest absmax used as a divisor (bitsandbytes' clamp)
_CHUNK_ELEMENTS = 1 << 17  # NumPy works through the data in chunks of this many values (cache)


# --------------------------------------------------------------------------------------------
# Tables on the data's backend
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Table4:
    """What the 4-bit search and lookup need, on one backend."""

    midpoints: tuple  # 15 Python floats (float32 values), ascending
    byte_levels: object  # (256, 2) float32, packed byte -> (level of its high nibble, level of its low nibble)
    translate: object  # (256,) uint8, byte of two sorted positions -> byte of two code indices; None: identity


_CACHE: dict = {}


def _table4(xp, quant_type: str) -> _Table4:
    key = (xp.__name__, quant_type)
    if key not in _CACHE:
        order, _, midpoints = tables.search_table(tables.CODES[quant_type])
        identity = [int(i) for i in order] == list(range(16))
        levels = xp.asarray(tables.CODES[quant_type])  # (16,) float32
        byte = xp.arange(256, dtype=xp.uint8)  # (256,) every possible packed byte
        high, low = byte >> 4, byte & 15  # (256,) its first and second 4-bit code
        byte_levels = xp.stack([xp.take(levels, high), xp.take(levels, low)], axis=1)  # 2 x (256,) -> (256, 2)
        translate = None
        if not identity:
            code_of = xp.asarray(order.astype("uint8"))  # (16,) sorted position -> code index
            translate = (xp.take(code_of, high) << 4) | xp.take(code_of, low)  # (256,) uint8
        _CACHE[key] = _Table4(
            midpoints=tuple(float(m) for m in midpoints),  # 15 floats, exact float32 values
            byte_levels=byte_levels,
            translate=translate,
        )
    return _CACHE[key]


def _dynamic_levels(xp):
    """The 256 levels of the dynamic map, float32 ascending, on ``xp``."""
    key = (xp.__name__, "dynamic")
    if key not in _CACHE:
        _CACHE[key] = xp.asarray(tables.DYNAMIC_MAP)  # (256,) float32
    return _CACHE[key]


_GRID = 65536  # points of the grid on [-1, 1] through which bitsandbytes' CPU kernel rounds to 8 bits


def _grid_levels(xp):
    """(65536,) uint8: the code of the dynamic-map level nearest to each grid point -1 + 2 i / 65535.

    Nearest by float32 midpoints, a point on a midpoint going to the lower level (bitsandbytes'
    ``build_quantize_lut``).
    """
    key = (xp.__name__, "grid")
    if key not in _CACHE:
        levels = _dynamic_levels(xp)  # (256,) float32, ascending
        midpoints = xp.float32(0.5) * (levels[:-1] + levels[1:])  # (255,) float32
        i = xp.arange(_GRID, dtype=xp.float32)  # (65536,)
        point = xp.float32(-1.0) + (xp.float32(2.0) * i) / xp.float32(_GRID - 1)  # (65536,) float32
        _CACHE[key] = xp.searchsorted(midpoints, point, side="left").astype(xp.uint8)  # midpoints strictly below
    return _CACHE[key]


def _little_endian(xp) -> bool:
    """Whether ``xp`` keeps the first byte of a uint16 in its low byte (x86, ARM and GPUs do)."""
    key = (xp.__name__, "little-endian")
    if key not in _CACHE:
        pair = xp.arange(2, dtype=xp.uint8).view(xp.uint16)  # bytes (0, 1) -> (1,) uint16
        _CACHE[key] = int(pair[0]) == 256
    return _CACHE[key]


def _chunk_rows(xp, blocksize: int, nblocks: int) -> int:
    """How many blocks to process at once: cache-sized chunks on NumPy, everything on a GPU."""
    if xp.__name__ == "numpy":
        return max(1, _CHUNK_ELEMENTS // blocksize)
    return max(1, nblocks)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_blocksize(blocksize) -> int:
    return check_power_of_two("blocksize", blocksize, 16, 4096)


def _check_quant_type(quant_type) -> str:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant_type {quant_type!r}; valid quant types: {list(QUANT_TYPES)}")
    return quant_type


def _raise_not_finite(flat, xp) -> None:
    """Raise a ValueError that says how many NaN / inf values the input has and where."""
    n_nan = int(xp.isnan(flat).sum())
    n_inf = int(xp.isinf(flat).sum())
    first = int(xp.argmax(~xp.isfinite(flat)))
    found = [f"{count} {name}" for count, name in ((n_nan, "NaN"), (n_inf, "inf")) if count]
    raise ValueError(
        f"quantize_4bit needs finite values, but the input contains {' and '.join(found)} "
        f"value(s) (first at flat index {first})"
    )


# --------------------------------------------------------------------------------------------
# Nibble packing
# --------------------------------------------------------------------------------------------


def pack_nibbles(codes, fill: int = 0):
    """Pack 4-bit codes two per byte: ``(n,)`` uint8 values < 16 -> ``(ceil(n/2),)`` uint8.

    Element ``2k`` goes into the high nibble of byte ``k`` and element ``2k + 1`` into the low
    nibble. An odd ``n`` is padded with ``fill`` in the last low nibble. A code or a ``fill``
    outside 0..15 is a ValueError naming it (a 5th bit would spill into the neighbour's nibble).
    """
    xp = xp_of(codes)
    codes = codes.reshape(-1)  # (n,)
    if codes.dtype != xp.uint8:
        raise ValueError(f"pack_nibbles needs uint8 codes, got dtype {codes.dtype}")
    fill = check_int("pack_nibbles fill", fill, 0, 15)
    if codes.size and int(codes.max()) > 15:  # one host synchronization
        i = int(xp.argmax(codes > 15))
        raise ValueError(f"pack_nibbles needs 4-bit codes from 0 to 15, got {int(codes[i])} at index {i}")
    if codes.size % 2:
        codes = xp.concatenate([codes, xp.full(1, fill, dtype=xp.uint8)])  # (n,) -> (n + 1,)
    return (codes[0::2] << 4) | codes[1::2]  # (n/2,) high nibble first


def unpack_nibbles(packed, n: int):
    """Inverse of ``pack_nibbles``: ``(m,)`` uint8 bytes -> the first ``n`` 4-bit codes, ``(n,)`` uint8."""
    xp = xp_of(packed)
    packed = packed.reshape(-1)  # (m,)
    if not 0 <= n <= 2 * packed.size:
        raise ValueError(f"cannot unpack {n} codes from {packed.size} bytes (at most {2 * packed.size})")
    codes = xp.empty(2 * packed.size, dtype=xp.uint8)  # (2m,)
    codes[0::2] = packed >> 4  # (m,) high nibbles
    codes[1::2] = packed & 15  # (m,) low nibbles
    return codes[:n]  # (2m,) -> (n,)


# --------------------------------------------------------------------------------------------
# 4-bit quantization
# --------------------------------------------------------------------------------------------


@dataclass
class Quantized4bit:
    """A tensor in blockwise 4-bit form: everything needed to dequantize it.

    ``packed``   (ceil(n/2),) uint8, two 4-bit codes per byte, first element in the high nibble
    ``absmax``   (nblocks,) float32 block constants; None when double-quantized, and then:
    ``qabsmax``  (nblocks,) uint8 codes of ``absmax - offset`` in the dynamic 8-bit map
    ``offset``   (1,) float32, the mean of the block constants
    ``absmax2``  (ceil(nblocks/256),) float32, one scale per 256 block constants
    ``shape``, ``dtype``  of the original tensor; ``blocksize``; ``quant_type``.
    """

    packed: object
    absmax: object
    shape: tuple
    dtype: object
    blocksize: int
    quant_type: str
    qabsmax: object = None
    offset: object = None
    absmax2: object = None

    @property
    def double_quant(self) -> bool:
        return self.qabsmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: the sum of the arrays' ``nbytes``."""
        arrays = (self.packed, self.absmax, self.qabsmax, self.offset, self.absmax2)
        return sum(int(a.nbytes) for a in arrays if a is not None)

    @property
    def bits_per_parameter(self) -> float:
        return bits_per_parameter(self)

    def dequantize(self):
        return dequantize_4bit(self)


def bits_per_parameter(q: Quantized4bit) -> float:
    """Storage per original value, in bits, from the stored arrays' ``nbytes``.

    For a 4096 x 4096 matrix with blocksize 64: 4 + 32/64 = 4.5 bits without double
    quantization; 4 + 8/64 + 32/(64*256) (+ 32 bits of offset for the whole matrix) = 4.127 with it.
    """
    return 8.0 * q.nbytes / q.numel


def _absmax_rows(rows, xp):
    """Exact ``max |x|`` of each row: ``(r, k)`` float32 -> ``(r,)`` float32.

    The maximum is taken over the float bits read as int32: for non-negative floats the integer
    order is the float order, so the result is the same float, and NumPy's integer maximum is
    faster than its float maximum (which has to look out for NaN). A NaN still comes out on top
    (its bits exceed those of inf) and is caught as not finite.
    """
    magnitude = xp.abs(rows).view(xp.int32)  # (r, k) float32 bits of |x|, as int32 >= 0
    return magnitude.max(axis=1).view(xp.float32)  # (r,) int32 -> (r,) float32


def _positions_4bit(scaled, table: _Table4, xp, position, hit):
    """Sorted position of the nearest level of each scaled value: ``(m,)`` float32 -> ``(m,)`` uint8.

    The position is the number of midpoints strictly below the value (15 comparisons, each one
    pass of vectorized work); a value on a midpoint is not counted, so it goes to the lower
    level. Values slightly outside [-1, 1] (rounding) need no clipping: every midpoint lies
    inside. ``position`` and ``hit`` are (m,) uint8 buffers; the result is written to ``position``.
    """
    flag = hit.view(xp.bool_)  # (m,) uint8 buffer seen as bool: comparisons land here
    position[...] = 0  # (m,)
    for midpoint in table.midpoints:
        xp.greater(scaled, midpoint, out=flag)  # (m,) 1 where the value is above the midpoint
        position += hit  # (m,) uint8 + uint8, no conversion from bool
    return position


def _pack_even(codes, xp):
    """``pack_nibbles`` for a contiguous even-length ``(m,)`` uint8 array, working on byte pairs.

    Each pair of codes is read as one uint16 ``w`` (no copy); the packed byte is the low byte of
    ``w << 4 | w >> 8`` if the first code is the low byte of ``w`` (little-endian), else of
    ``w >> 4 | w``. Casting to uint8 keeps the low byte.
    """
    pairs = codes.view(xp.uint16)  # (m,) uint8 -> (m/2,) uint16
    if _little_endian(xp):
        both = (pairs << 4) | (pairs >> 8)  # (m/2,) low byte: first << 4 | second
    else:
        both = (pairs >> 4) | pairs  # (m/2,) low byte: first << 4 | second
    return both.astype(xp.uint8)  # (m/2,) uint16 -> uint8


def _encode_4bit(scaled, table: _Table4, xp, position, hit):
    """Packed code bytes of an even number of scaled values: ``(m,)`` float32 -> ``(m/2,)`` uint8."""
    packed = _pack_even(_positions_4bit(scaled, table, xp, position, hit), xp)  # (m,) -> (m/2,)
    if table.translate is None:
        return packed
    # FP4 and INT4 tables are not in sorted order: translate both sorted positions of each byte
    # to code indices with one 256-entry lookup.
    return xp.take(table.translate, packed)  # (m/2,) uint8


def quantize_4bit(x, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = False) -> Quantized4bit:
    """Blockwise absmax 4-bit quantization of a float array (QLoRA Eq. 1 with NF4, FP4 or INT4).

    ``x``: a float16/float32/float64 array of any shape (NumPy or CuPy), computed in float32.
    ``blocksize``: values per block, a power of two from 16 to 4096 (QLoRA uses 64).
    ``quant_type``: ``"nf4"``, ``"fp4"`` or ``"int4"`` (see ``tables.py``).
    ``double_quant``: also quantize the block constants to 8 bits (blocks of 256).

    Returns a ``Quantized4bit``; ``dequantize_4bit`` turns it back into an array.
    Raises ValueError for a non-float or empty input, NaN or inf values, a bad block size or an
    unknown quant type.

    On unit-variance Gaussian data NF4 has the smallest mean squared error of the three types;
    FP4 has a larger one than even the uniform INT4 grid by this measure, unlike the QLoRA
    paper's ordering of FP4 above INT4 in the perplexity of whole quantized models.
    """
    xp = xp_of(x)
    x = xp.asarray(x)
    if x.dtype.kind != "f":
        raise ValueError(f"quantize_4bit needs a floating-point array, got dtype {x.dtype}")
    if x.size == 0:
        raise ValueError(f"quantize_4bit needs a non-empty array, got shape {tuple(x.shape)}")
    blocksize = _check_blocksize(blocksize)
    quant_type = _check_quant_type(quant_type)
    table = _table4(xp, quant_type)

    flat = x.reshape(-1).astype(xp.float32, copy=False)  # (...) -> (n,) row-major
    n = flat.size
    nfull = n // blocksize  # complete blocks
    rem = n - nfull * blocksize  # values in the short last block (0 if none)
    nblocks = nfull + (1 if rem else 0)
    half = blocksize // 2  # bytes per complete block
    absmax = xp.empty(nblocks, dtype=xp.float32)  # (nblocks,)
    packed = xp.empty((n + 1) // 2, dtype=xp.uint8)  # (ceil(n/2),)

    full = flat[: nfull * blocksize].reshape(nfull, blocksize)  # (n,) -> (nfull, blocksize)
    rows = _chunk_rows(xp, blocksize, nfull)
    position = xp.empty(min(rows, max(nfull, 1)) * blocksize, dtype=xp.uint8)  # (chunk,) >= rem + 1
    hit = xp.empty_like(position)  # (chunk,) scratch for the comparisons
    for start in range(0, nfull, rows):
        stop = min(nfull, start + rows)
        block = full[start:stop]  # (r, blocksize)
        amax = _absmax_rows(block, xp)  # (r,) Eq. 1: c = absmax of the block
        if not bool(xp.isfinite(amax).all()):
            _raise_not_finite(flat, xp)
        absmax[start:stop] = amax  # (r,)
        inv = xp.reciprocal(xp.maximum(amax, _TINY))  # (r,) float32 1 / c
        scaled = (block * inv[:, None]).reshape(-1)  # (r, blocksize) -> (r * blocksize,) in [-1, 1]
        m = scaled.size
        packed[start * half : stop * half] = _encode_4bit(scaled, table, xp, position[:m], hit[:m])  # (r * half,)

    if rem:
        tail = flat[nfull * blocksize :]  # (rem,)
        amax = _absmax_rows(tail.reshape(1, rem), xp)  # (1, rem) -> (1,) absmax of the short block
        if not bool(xp.isfinite(amax).all()):
            _raise_not_finite(flat, xp)
        absmax[nfull:] = amax  # (1,) the last entry of (nblocks,)
        scaled = tail / xp.maximum(amax, _TINY)  # (rem,) / (1,) float32 division
        if rem % 2:
            scaled = xp.concatenate([scaled, xp.zeros(1, dtype=xp.float32)])  # (rem,) -> (rem + 1,)
        m = scaled.size
        packed[nfull * half :] = _encode_4bit(scaled, table, xp, position[:m], hit[:m])  # (ceil(rem/2),)

    q = Quantized4bit(
        packed=packed,
        absmax=absmax,
        shape=tuple(int(s) for s in x.shape),
        dtype=x.dtype,
        blocksize=blocksize,
        quant_type=quant_type,
    )
    if double_quant:
        # QLoRA "Double Quantization": centre the constants, then 8-bit blocks of 256.
        offset = xp.asarray(offset_mean(to_numpy(absmax))).reshape(1)  # (1,) float32 mean of the constants
        q.qabsmax, q.absmax2 = quantize_blockwise_8bit(absmax - offset, DOUBLE_QUANT_BLOCKSIZE)
        q.offset = offset
        q.absmax = None
    return q


def _block_constants(q: Quantized4bit):
    """The float32 block constants of ``q``, dequantizing them first if double-quantized."""
    if not q.double_quant:
        return q.absmax  # (nblocks,)
    centred = dequantize_blockwise_8bit(q.qabsmax, q.absmax2, DOUBLE_QUANT_BLOCKSIZE)  # (nblocks,)
    return centred + q.offset  # (nblocks,) + (1,) -> (nblocks,)  (QLoRA Eq. 6, inner part)


def dequantize_4bit(q: Quantized4bit):
    """Dequantize a ``Quantized4bit``: float32 array of the original shape, on the arrays' backend.

    Each code is replaced by its level and multiplied by its block's constant (QLoRA Eq. 2).
    """
    if not isinstance(q, Quantized4bit):
        raise ValueError(f"dequantize_4bit needs a Quantized4bit, got {type(q).__name__}")
    xp = xp_of(q.packed)
    absmax = _block_constants(q)  # (nblocks,)
    if q.numel >= _DEQUANTIZE_FAST_MIN and xp.__name__ == "numpy":  # a large host matrix: the same bits, faster
        return _dequantize_4bit_fast(q, absmax)
    levels = xp.asarray(tables.CODES[q.quant_type])  # (16,) float32, the levels of the code
    codes = unpack_nibbles(q.packed, q.numel)  # (ceil(n/2),) -> (n,) uint8, one 4-bit index per value
    scale = xp.repeat(absmax, q.blocksize)[: q.numel]  # (nblocks,) -> (n,): each value's block constant
    return (xp.take(levels, codes) * scale).reshape(q.shape)  # (n,) level[code] * c -> the original shape


# --------------------------------------------------------------------------------------------
# Dequantizing a large matrix faster on the CPU (a reader may skip this part: it computes
# exactly what the plain form of dequantize_4bit computes, bit for bit)
# --------------------------------------------------------------------------------------------

# The form below measured 1.2-1.7x faster than the plain one from 65,536 values up; it takes over from
# 262,144 values, above the demo model's largest matrix (512 x 128), whose steps run the plain form.
# GPT-2 small's matrices have 589,824 and 2,359,296.
_DEQUANTIZE_FAST_MIN = 1 << 18  # values
_DEQUANTIZE_PIECE = 1 << 17  # values per piece (64 KiB of packed bytes; its levels stay in the L2 cache)
_BYTE_LEVELS: dict = {}


def _byte_levels(quant_type: str):
    """(256, 2) float32: for every packed byte, the levels of its high and its low nibble (element order).

    A single lookup per packed byte gives both of its values, with no unpacking of the nibbles.
    """
    np = xp_of(tables.CODES[quant_type])  # NumPy: the tables live on the host
    if quant_type not in _BYTE_LEVELS:
        levels = tables.CODES[quant_type]  # (16,) float32
        byte = np.arange(256)  # (256,) every possible packed byte
        _BYTE_LEVELS[quant_type] = np.stack([levels[byte >> 4], levels[byte & 15]], axis=1)  # (256, 2) float32
    return _BYTE_LEVELS[quant_type]


def _dequantize_4bit_fast(q: Quantized4bit, absmax):
    """``dequantize_4bit`` of a host ``q``: one lookup per packed byte, in cache-sized pieces.

    One thread: on two cores shared with other work a second thread measured slower here (the
    lookup, ``take``, gained nothing from it), unlike the element-wise work of ``fast.py``.
    """
    np = xp_of(q.packed)  # NumPy
    pairs = _byte_levels(q.quant_type)  # (256, 2) float32
    packed = q.packed.reshape(-1)  # (ceil(n/2),)
    n, blocksize = q.numel, q.blocksize
    nfull, half = n // blocksize, blocksize // 2
    out = np.empty(n, dtype=np.float32)  # (n,)
    full = out[: nfull * blocksize].reshape(nfull, blocksize)  # view (nfull, blocksize)
    rows = max(1, _DEQUANTIZE_PIECE // blocksize)  # blocks per piece

    for s in range(0, nfull, rows):
        e = min(nfull, s + rows)
        both = np.take(pairs, packed[s * half : e * half], axis=0)  # (r * half,) -> (r * half, 2)
        np.multiply(both.reshape(e - s, blocksize), absmax[s:e, None], out=full[s:e])  # (r, bs) * (r, 1)
    rem = n - nfull * blocksize
    if rem:  # the short last block
        both = np.take(pairs, packed[nfull * half :], axis=0)  # (ceil(rem/2),) -> (ceil(rem/2), 2)
        out[nfull * blocksize :] = both.reshape(-1)[:rem] * absmax[nfull]  # (rem,)
    return out.reshape(q.shape)  # (n,) -> original shape


# --------------------------------------------------------------------------------------------
# The offset of double quantization, summed in bitsandbytes' order (a reader may skip this)
# --------------------------------------------------------------------------------------------

_TORCH_LANES = 8  # float32 lanes of torch's AVX2 sum kernel
_TORCH_GRAIN = 32768  # below this many values torch sums on one thread
_TORCH_THREADS = 2  # torch's threads on the CPU (at least two: its default on a multi-core machine)


def offset_mean(values):
    """The float32 mean of a 1-D float32 host array, rounded exactly as bitsandbytes' offset is.

    bitsandbytes takes the offset as ``absmax.mean()`` in torch, float32: torch's CPU sum kernel
    (``SumKernel.cpp``, ``cascade_sum``) adds 8 lanes side by side, four vectors interleaved, in
    cascaded partial sums of 16, then the leftover values and the 8 lanes in order; above 32,768
    values each of two threads sums one half and the halves are added. Then the sum is divided
    by the count in float32. Any other order differs in the last bit for about a third of
    GPT-2's matrices. (With ``torch.set_num_threads(1)`` or another vector width the reference
    itself rounds differently, for more than 32,768 values.)
    """
    x = to_numpy(values).astype("float32").reshape(-1)  # (m,) on the host, where torch's order is replayed
    np = xp_of(x)  # NumPy
    n = x.size
    parts = 1 if n < _TORCH_GRAIN else min(_TORCH_THREADS, -(-n // _TORCH_GRAIN))
    chunk = -(-n // parts)
    total = np.float32(0.0)
    for start in range(0, n, chunk):
        total = np.float32(total + _torch_inner_sum(x[start : start + chunk]))
    return np.float32(total / np.float32(n))


def _torch_inner_sum(x):
    """torch's float32 sum of a contiguous ``(m,)`` array on one thread (vectorized when m >= 8)."""
    np = xp_of(x)  # NumPy (a host array)

    lanes = _TORCH_LANES if x.size >= _TORCH_LANES else 1
    nvec = x.size // lanes
    partial = _torch_row_sum(x[: nvec * lanes].reshape(nvec, lanes))  # (lanes,)
    total = np.float32(0.0)
    for v in x[nvec * lanes :]:  # the values after the last full vector, in order
        total = np.float32(total + v)
    for v in partial:  # then the lanes, in order
        total = np.float32(total + v)
    return total


def _torch_row_sum(vecs):
    """torch's ``row_sum``: ``(m, lanes)`` -> ``(lanes,)``, four vectors interleaved, cascaded in steps of 16."""
    np = xp_of(vecs)  # NumPy (a host array)
    m, lanes = vecs.shape
    rows = m // 4
    quads = vecs[: rows * 4].reshape(rows, 4, lanes)  # (rows, 4, lanes)
    acc = np.zeros((4, 4, lanes), dtype=np.float32)  # (level, 4, lanes)
    i = 0
    while i + 16 <= rows:
        for _ in range(16):
            acc[0] += quads[i]  # (4, lanes)
            i += 1
        for level in range(1, 4):  # carry up while the count is a multiple of 16 ** level
            acc[level] += acc[level - 1]
            acc[level - 1] = 0
            if i & (15 << (4 * level)):
                break
    for r in range(i, rows):
        acc[0] += quads[r]  # (4, lanes)
    for level in range(1, 4):
        acc[0] += acc[level]
    out = acc[0]  # (4, lanes)
    for r in range(rows * 4, m):
        out[0] += vecs[r]  # the vectors left over after the last group of four
    for k in range(1, 4):
        out[0] += out[k]
    return out[0]  # (lanes,)


# --------------------------------------------------------------------------------------------
# 8-bit blockwise quantization with the dynamic map (for the block constants)
# --------------------------------------------------------------------------------------------


def quantize_blockwise_8bit(values, blocksize: int = DOUBLE_QUANT_BLOCKSIZE):
    """8-bit absmax quantization with the dynamic map: ``(m,)`` float32 -> ``(codes, absmax2)``.

    ``codes`` (m,) uint8 index the dynamic map (``tables.DYNAMIC_MAP``); ``absmax2``
    (ceil(m/blocksize),) float32 is the absmax of each block of ``blocksize`` values. Each value
    is scaled into [-1, 1] by the float32 reciprocal of its block's absmax, and its level is
    found the way bitsandbytes' CPU kernel finds it (bit for bit): [-1, 1] is cut into a grid of
    65,536 points, each point is mapped once to its nearest level (a table, ``_grid_levels``),
    and the value takes the level of its nearest grid point. That is the nearest level except
    within about 1.5e-5 (half a grid step) of a midpoint between two levels. A block of zeros
    keeps absmax 0 and code 0.
    """
    xp = xp_of(values)
    blocksize = _check_blocksize(blocksize)
    flat = values.reshape(-1).astype(xp.float32, copy=False)  # (m,)
    m = flat.size
    nblocks = -(-m // blocksize)
    padded = xp.zeros(nblocks * blocksize, dtype=xp.float32)  # (nblocks * blocksize,)
    padded[:m] = flat  # (m,) into (nblocks * blocksize,), zeros after
    blocks = padded.reshape(nblocks, blocksize)  # (nblocks, blocksize)
    absmax2 = xp.abs(blocks).max(axis=1)  # (nblocks,)
    inv = xp.float32(1.0) / xp.where(absmax2 > 0, absmax2, xp.ones_like(absmax2))  # (nblocks,) float32 1 / c
    normed = xp.clip(blocks * inv[:, None], -1.0, 1.0).reshape(-1)[:m]  # (m,) float32 in [-1, 1]
    point = ((normed + xp.float32(1.0)) * xp.float32(0.5) * xp.float32(_GRID - 1) + xp.float32(0.5))  # (m,) float32
    codes = xp.take(_grid_levels(xp), point.astype(xp.uint16))  # (m,) nearest grid point -> its level's code
    zero_block = xp.repeat(absmax2 == 0, blocksize)[:m]  # (m,) values of all-zero blocks
    codes[zero_block] = 0  # (m,) bitsandbytes writes code 0 there
    return codes, absmax2  # (m,) uint8, (nblocks,) float32


def dequantize_blockwise_8bit(codes, absmax2, blocksize: int = DOUBLE_QUANT_BLOCKSIZE):
    """Inverse of ``quantize_blockwise_8bit``: ``level[code] * absmax2`` per block, ``(m,)`` float32."""
    xp = xp_of(codes, absmax2)
    levels = _dynamic_levels(xp)
    m = codes.size
    per_value = xp.repeat(absmax2, blocksize)[:m]  # (nblocks,) -> (m,)
    return xp.take(levels, codes.reshape(-1)) * per_value  # (m,) float32
