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

How the work is done (the results do not depend on it): ``quantize_4bit`` runs the four steps
as written (``_quantize_blocks``); from ``FAST_QUANTIZE_FROM`` values on (GPT-2's matrices) NumPy
takes a faster route to the same bytes (``_quantize_4bit_fast``, which a reader may skip).
Dequantizing unpacks the nibbles, looks up their levels and multiplies by the block constants;
from ``_DEQUANTIZE_FAST_MIN`` values on NumPy goes through the data in cache-sized pieces and
looks every packed byte up in a (256, 2) table of the levels of its two nibbles
(``_dequantize_4bit_fast``, the same bits; a reader may skip it too).

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
  a grid of 65,536 points on [-1, 1] (``quantize_blockwise_8bit``, ``tables.DYNAMIC_GRID_CODES``),
  which is the nearest level except within half a grid step (1.5e-5 of the block's absmax) of
  a midpoint, and near zero,
  where the dynamic map's levels are closer together than the grid; the offset is torch's
  float32 mean, summed in torch's order (``offset_mean``). What that order depends on: torch
  sums more than 32,768 block constants (a matrix of more than 2M weights) in two halves when it
  has two or more threads, and here that is assumed; with ``torch.set_num_threads(1)`` such a
  matrix's offset can differ in the last bit (and then its nested absmax and a few 8-bit codes).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

from lora_from_scratch.backend import to_numpy, xp_of
from lora_from_scratch.checks import check_int, check_power_of_two
from lora_from_scratch.quant import tables

__all__ = [
    "QUANT_TYPES",
    "Quantized4bit",
    "bits_per_parameter",
    "check_blocksize",
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
_CHUNK_ELEMENTS = 1 << 17  # the fast quantizer works through the data in chunks of this many values (cache)
# From this many values on, NumPy quantizes through ``_quantize_4bit_fast``: measured on two cores, the
# plain route takes under 2 ms below it (1.5x the fast one), 6 ms at 2^18 and 13 ms at GPT-2's 768 x 768
# (3-4x the fast one). The classroom model's matrices (at most 128 x 512) take the plain route.
FAST_QUANTIZE_FROM = 1 << 18


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def check_blocksize(blocksize) -> int:
    """The block size of blockwise quantization: a power of two from 16 to 4096 (QLoRA uses 64)."""
    return check_power_of_two("blocksize", blocksize, 16, 4096)


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
    return xp.stack([packed >> 4, packed & 15], axis=1).reshape(-1)[:n]  # (m, 2) each byte's high, low nibble -> (n,)


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
    blocksize = check_blocksize(blocksize)
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant_type {quant_type!r}; valid quant types: {list(QUANT_TYPES)}")
    flat = x.reshape(-1).astype(xp.float32, copy=False)  # (...) -> (n,) row-major
    if xp.__name__ == "numpy" and flat.size >= FAST_QUANTIZE_FROM and sys.byteorder == "little":
        packed, absmax = _quantize_4bit_fast(flat, blocksize, quant_type)  # the same bytes, faster: skip it
    else:
        packed, absmax = _quantize_blocks(flat, blocksize, quant_type)  # (ceil(n/2),) uint8, (nblocks,) float32
    if not double_quant:
        return Quantized4bit(packed, absmax, x.shape, x.dtype, blocksize, quant_type)
    # QLoRA "Double Quantization": centre the block constants on their mean, then 8 bits in blocks of 256.
    offset = xp.asarray(offset_mean(absmax)).reshape(1)  # (1,) float32 mean of the constants (on the host)
    qabsmax, absmax2 = quantize_blockwise_8bit(absmax - offset, DOUBLE_QUANT_BLOCKSIZE)  # (nblocks,), (nblocks/256,)
    return Quantized4bit(packed, None, x.shape, x.dtype, blocksize, quant_type, qabsmax, offset, absmax2)


def _quantize_blocks(flat, blocksize: int, quant_type: str):
    """Steps 1-4 of the module docstring: ``(n,)`` float32 -> ``(packed, absmax)``.

    ``packed`` (ceil(n/2),) uint8 holds two codes per byte, ``absmax`` (nblocks,) float32 the block
    constants. Complete blocks are scaled by the float32 reciprocal of their constant, the short
    last block by a division: bitsandbytes' arithmetic, so that the codes are its codes.
    """
    xp = xp_of(flat)
    n = flat.size
    blocks = xp.pad(flat, (0, -n % blocksize)).reshape(-1, blocksize)  # (n,) -> (nblocks, blocksize), zeros after
    absmax = xp.abs(blocks).max(axis=1)  # (nblocks,) Eq. 1: c = max |x| of each block (the zeros change none)
    if not bool(xp.isfinite(absmax).all()):
        _raise_not_finite(flat, xp)
    c = xp.maximum(absmax, _TINY)[:, None]  # (nblocks, 1) an all-zero block is divided by 1e-38, not by 0
    scaled = blocks * (1 / c)  # (nblocks, blocksize) in [-1, 1]
    if n % blocksize:
        scaled[-1] = blocks[-1] / c[-1]  # (blocksize,) the short last block is divided
    scaled = scaled.reshape(-1)[: n + n % 2]  # (n,), or (n + 1,) ending in one padded 0.0 when n is odd
    order, _, midpoints = tables.SEARCH_TABLES[quant_type]  # (16,) code indices by level, (15,) float32
    position = sum((scaled > m).astype(xp.uint8) for m in midpoints)  # (n,) midpoints below: the nearest level
    codes = xp.take(xp.asarray(order.astype(xp.uint8)), position)  # (n,) sorted position -> code index
    return (codes[0::2] << 4) | codes[1::2], absmax  # (n/2,) first code in the high nibble; (nblocks,)


def _quantize_4bit_fast(flat, blocksize: int, quant_type: str):
    """``_quantize_blocks``, bit for bit, several times faster on a large NumPy array. A reader may skip it.

    ``quantize_4bit`` takes this route from ``FAST_QUANTIZE_FROM`` values on (GPT-2's matrices
    hold 590K and 2.4M weights); the tests check that both routes give the same bytes. The same
    arithmetic, arranged for the CPU's caches and NumPy's fastest loops:

    - the complete blocks go through in chunks of ``_CHUNK_ELEMENTS`` values, and each chunk's
      15 midpoint comparisons land in two reused uint8 buffers instead of new temporaries;
    - the absmax is the maximum of ``|x|``'s float bits read as int32: for non-negative floats
      the integer order is the float order, so it is the same float, and NumPy's integer maximum
      is faster than its float maximum (a NaN's bits exceed inf's, so a NaN is still caught);
    - each pair of codes is read as one uint16 ``w`` (a view, no copy), whose low byte is the
      first code on a little-endian machine (the only kind that takes this route): the packed
      byte is the low byte of ``w << 4 | w >> 8``;
    - FP4 and INT4, whose code tables are not in ascending order, pack the two sorted positions
      and then translate each byte with one 256-entry table.
    """
    xp = xp_of(flat)  # NumPy: only NumPy arrays take this route
    order, _, midpoints = tables.SEARCH_TABLES[quant_type]  # (16,) code indices by level, (15,) float32
    code = order.astype(xp.uint8)  # (16,) sorted position -> code index
    byte = xp.arange(256, dtype=xp.uint8)  # (256,) every byte of two sorted positions
    translate = (code[byte >> 4] << 4) | code[byte & 15]  # (256,) -> the byte of their two code indices
    identity = bool((code == xp.arange(16)).all())  # NF4: the levels are in code order
    nfull = flat.size // blocksize
    rows = max(1, _CHUNK_ELEMENTS // blocksize)  # blocks per chunk
    absmax = xp.empty(-(-flat.size // blocksize), dtype=xp.float32)  # (nblocks,)
    packed = xp.empty((flat.size + 1) // 2, dtype=xp.uint8)  # (ceil(n/2),)
    position = xp.empty(min(rows, nfull) * blocksize, dtype=xp.uint8)  # (chunk,) reused for every chunk
    hit = xp.empty_like(position)  # (chunk,) the comparisons land here
    for start in range(0, nfull, rows):
        stop = min(nfull, start + rows)
        block = flat[start * blocksize : stop * blocksize].reshape(-1, blocksize)  # (r, blocksize)
        amax = xp.abs(block).view(xp.int32).max(axis=1).view(xp.float32)  # (r,) max |x| through the bits
        if not bool(xp.isfinite(amax).all()):
            _raise_not_finite(flat, xp)
        absmax[start:stop] = amax  # (r,)
        scaled = (block * xp.reciprocal(xp.maximum(amax, _TINY))[:, None]).reshape(-1)  # (m,) = (r * blocksize,)
        pos, flag = position[: scaled.size], hit[: scaled.size]  # (m,) views of the buffers
        pos[...] = 0
        for m in midpoints:
            xp.greater(scaled, m, out=flag.view(xp.bool_))  # (m,) 1 where the value is above the midpoint
            pos += flag  # (m,) sorted position of the nearest level
        pairs = pos.view(xp.uint16)  # (m,) uint8 -> (m/2,) uint16, the first code in the low byte (little-endian)
        both = ((pairs << 4) | (pairs >> 8)).astype(xp.uint8)  # (m/2,) low byte: first << 4 | second
        packed[start * blocksize // 2 : stop * blocksize // 2] = both if identity else translate[both]  # (m/2,)
    tail = flat[nfull * blocksize :]  # (rem,) the short last block, if any: the plain route
    if tail.size:
        if not bool(xp.isfinite(tail).all()):
            _raise_not_finite(flat, xp)
        packed[nfull * blocksize // 2 :], absmax[nfull:] = _quantize_blocks(tail, blocksize, quant_type)
    return packed, absmax  # (ceil(n/2),) uint8, (nblocks,) float32


def dequantize_4bit(q: Quantized4bit):
    """Dequantize a ``Quantized4bit``: float32 array of the original shape, on the arrays' backend.

    Each code is replaced by its level and multiplied by its block's constant (QLoRA Eq. 2), the
    constants dequantized first when they are double-quantized.
    """
    if not isinstance(q, Quantized4bit):
        raise ValueError(f"dequantize_4bit needs a Quantized4bit, got {type(q).__name__}")
    xp = xp_of(q.packed)
    absmax = q.absmax  # (nblocks,) float32 block constants c
    if q.double_quant:  # c stored in 8 bits: c = dequant(qabsmax, absmax2) + offset (QLoRA Eq. 6, inner part)
        absmax = dequantize_blockwise_8bit(q.qabsmax, q.absmax2, DOUBLE_QUANT_BLOCKSIZE) + q.offset  # (nblocks,)
    if q.numel >= _DEQUANTIZE_FAST_MIN and xp.__name__ == "numpy":  # a large host matrix: the same bits, faster
        return _dequantize_4bit_fast(q, absmax)
    levels = xp.asarray(tables.CODES[q.quant_type])  # (16,) float32, the levels of the code
    values = xp.take(levels, unpack_nibbles(q.packed, q.numel))  # (ceil(n/2),) -> (n,) codes -> level[code]
    values *= xp.repeat(absmax, q.blocksize)[: q.numel]  # (n,) times each value's block constant c, in place
    return values.reshape(q.shape)  # (n,) -> the original shape


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

_TORCH_GRAIN = 32768  # above this many values torch's CPU sum splits the work between (two) threads


def offset_mean(values):
    """The float32 mean of a 1-D float32 host array, rounded exactly as bitsandbytes' offset is.

    bitsandbytes takes the offset as ``absmax.mean()`` in torch, float32, and any other order of
    summation differs in the last bit for about a third of GPT-2's matrices. torch's CPU sum
    (``SumKernel.cpp``, ``cascade_sum``): above 32,768 values each of two threads sums one half
    and the halves are added (with ``torch.set_num_threads(1)`` the reference itself rounds
    differently there); each half is summed by ``_torch_sum``; the total is divided by the count
    in float32. (Python's ``sum(items, start)`` adds left to right: ``start + items[0] + ...``.)
    """
    x = to_numpy(values).astype("float32").reshape(-1)  # (m,) on the host, where torch's order is replayed
    xp = xp_of(x)  # NumPy: the replay runs on the host
    halves = xp.array_split(x, 2 if x.size > _TORCH_GRAIN else 1)  # sizes ceil(m/2), floor(m/2): one per thread
    return sum(map(_torch_sum, halves), xp.float32(0.0)) / xp.float32(x.size)  # float32 sum, float32 division


def _torch_sum(x):
    """torch's float32 sum of ``(m,)`` on one thread: 4 x 8 running sums, then the leftovers in order.

    The values are read as vectors of 8 lanes (1 lane when m < 8) and the vectors in groups of four:
    vector ``4 r + k`` goes to running sum ``k``, summed over ``r`` by ``_cascade_sum``. The 1-3
    vectors after the last group of four go into running sum 0, then the four are added in order;
    finally, starting from 0, the values after the last vector and the 8 lanes, one by one.
    """
    xp = xp_of(x)
    lanes = 8 if x.size >= 8 else 1
    nvec = x.size // lanes
    vectors = x[: nvec * lanes].reshape(nvec, lanes)  # (nvec, lanes)
    groups = nvec // 4
    acc = _cascade_sum(vectors[: groups * 4].reshape(groups, 4, lanes))  # (groups, 4, lanes) -> (4, lanes)
    acc[0] = sum(vectors[groups * 4 :], acc[0])  # (lanes,) plus the vectors after the last group of four
    lane_sums = acc[0] + acc[1] + acc[2] + acc[3]  # (lanes,) added left to right
    return sum([*x[nvec * lanes :], *lane_sums], xp.float32(0.0))  # float32 scalar


def _cascade_sum(rows):
    """torch's ``cascade_sum`` over the first axis: ``(m, ...)`` -> ``(...)``, float32.

    The rows are summed in order in groups of 16, those sums in groups of 16, and so on (four
    levels, the last without grouping). What is left over at each level (the rows after its last
    complete group) is summed in order, and these four leftover sums are added from the lowest level up.
    """
    xp = xp_of(rows)
    zeros = xp.zeros(rows.shape[1:], dtype=xp.float32)  # (...)
    leftovers = []
    for level in range(4):
        full = len(rows) // 16 * 16 if level < 3 else 0  # rows in complete groups of 16
        leftovers.append(sum(rows[full:], zeros))  # (...) the rows after the last group, in order
        groups = rows[:full].reshape(-1, 16, *rows.shape[1:])  # (full/16, 16, ...)
        rows = sum(groups.swapaxes(0, 1), xp.zeros_like(groups[:, 0]))  # (full/16, ...) each group in order
    return leftovers[0] + leftovers[1] + leftovers[2] + leftovers[3]  # (...) added left to right


# --------------------------------------------------------------------------------------------
# 8-bit blockwise quantization with the dynamic map (for the block constants)
# --------------------------------------------------------------------------------------------


def quantize_blockwise_8bit(values, blocksize: int = DOUBLE_QUANT_BLOCKSIZE):
    """8-bit absmax quantization with the dynamic map: ``(m,)`` float32 -> ``(codes, absmax2)``.

    ``codes`` (m,) uint8 index the dynamic map (``tables.DYNAMIC_MAP``); ``absmax2``
    (ceil(m/blocksize),) float32 is the absmax of each block of ``blocksize`` values. Each value
    is scaled into [-1, 1] by the float32 reciprocal of its block's absmax, and its level is
    found the way bitsandbytes' CPU kernel finds it (bit for bit): [-1, 1] is cut into a grid of
    65,536 points, each point is mapped once to its nearest level (``tables.DYNAMIC_GRID_CODES``),
    and the value takes the level of its nearest grid point. That is the nearest level except
    within about 1.5e-5 (half a grid step) of a midpoint between two levels. A block of zeros
    keeps absmax 0 and code 0.
    """
    xp = xp_of(values)
    blocksize = check_blocksize(blocksize)
    flat = values.reshape(-1).astype(xp.float32, copy=False)  # (m,)
    m = flat.size
    blocks = xp.pad(flat, (0, -m % blocksize)).reshape(-1, blocksize)  # (m,) -> (nblocks, blocksize), zeros after
    absmax2 = xp.abs(blocks).max(axis=1)  # (nblocks,)
    inv = 1 / xp.where(absmax2 > 0, absmax2, xp.ones_like(absmax2))  # (nblocks,) float32 1 / c
    normed = xp.clip(blocks * inv[:, None], -1.0, 1.0).reshape(-1)[:m]  # (m,) float32 in [-1, 1]
    grid = tables.DYNAMIC_GRID_CODES  # (65536,) uint8: the code nearest to each grid point -1 + 2 i / 65535
    point = (normed + xp.float32(1.0)) * xp.float32(0.5) * xp.float32(grid.size - 1) + xp.float32(0.5)  # (m,)
    codes = xp.take(xp.asarray(grid), point.astype(xp.uint16))  # (m,) nearest grid point -> its level's code
    codes[xp.repeat(absmax2 == 0, blocksize)[:m]] = 0  # (m,) bitsandbytes writes code 0 for an all-zero block
    return codes, absmax2  # (m,) uint8, (nblocks,) float32


def dequantize_blockwise_8bit(codes, absmax2, blocksize: int = DOUBLE_QUANT_BLOCKSIZE):
    """Inverse of ``quantize_blockwise_8bit``: ``level[code] * absmax2`` per block, ``(m,)`` float32."""
    xp = xp_of(codes, absmax2)
    levels = xp.asarray(tables.DYNAMIC_MAP)  # (256,) float32, on the codes' backend
    m = codes.size
    per_value = xp.repeat(absmax2, blocksize)[:m]  # (nblocks,) -> (m,)
    return xp.take(levels, codes.reshape(-1)) * per_value  # (m,) float32
