"""The code tables of 4-bit and 8-bit quantization, derived step by step.

QLoRA (Dettmers et al., 2023), Section 3 "4-bit NormalFloat Quantization" (Eq. 4) and
"Double Quantization"; the dynamic 8-bit type of Dettmers (2016), "8-Bit Approximations for
Parallelism in Deep Learning", Section 3.

A 4-bit code has 16 values; a *code table* says which real number (a *level* in [-1, 1]) each
of them stands for. Blockwise quantization (``blockwise.py``) divides a block of weights by its
largest magnitude, so every value lies in [-1, 1], and stores for each value the index of the
nearest level. This module builds the tables:

``NF4_CODE``     NormalFloat4: levels at quantiles of the standard normal distribution, so that
                 each level is used about equally often by normally distributed weights.
``FP4_CODE``     a 4-bit float (1 sign, 2 exponent, 1 mantissa bit) in bitsandbytes' layout.
``INT4_CODE``    symmetric integers -7..7 divided by 7 (sign and 3-bit magnitude).
``DYNAMIC_MAP``  the signed 8-bit dynamic type used to store the block scales ("double
                 quantization").
``DYNAMIC_GRID_CODES``  the dynamic map's code nearest to each of 65,536 points on [-1, 1]: the
                 table through which bitsandbytes' CPU kernel rounds to 8 bits.
``SEARCH_TABLES``  each 4-bit table sorted for the nearest-level search (``search_table``): the
                 code indices in level order, the ascending levels and the midpoints between them.

Every table is computed here from its definition, in the float32 arithmetic that bitsandbytes
uses, so that it equals bitsandbytes' constants bit for bit (the tests check this against the
installed package). The inverse normal CDF is written out too (``normal_quantile``); nothing
beyond the standard library's ``math.erf``/``math.erfc`` is needed.

This is a host-side module: it uses NumPy, and its tables are NumPy float32 arrays.
``blockwise.py`` moves them to the backend of the data.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "DYNAMIC_GRID_CODES",
    "DYNAMIC_MAP",
    "FP4_CODE",
    "INT4_CODE",
    "NF4_CODE",
    "NF4_OFFSET",
    "CODES",
    "dynamic_grid_codes",
    "dynamic_map",
    "float32_linspace",
    "fp4_code",
    "int4_code",
    "nf4_code",
    "normal_quantile",
    "search_table",
    "SEARCH_TABLES",
]

# --------------------------------------------------------------------------------------------
# The inverse of the standard normal CDF
# --------------------------------------------------------------------------------------------

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

# Abramowitz & Stegun, Handbook of Mathematical Functions, formula 26.2.23: a rational
# approximation of the upper-tail quantile, absolute error below 4.5e-4. It only serves as
# the starting point of the Halley iteration below.
_AS_C = (2.515517, 0.802853, 0.010328)
_AS_D = (1.432788, 0.189269, 0.001308)


def _initial_guess_lower_tail(p: float) -> float:
    """Rough quantile for 0 < p <= 1/2 (A&S 26.2.23, error < 4.5e-4): a negative number."""
    t = math.sqrt(-2.0 * math.log(p))
    num = _AS_C[0] + t * (_AS_C[1] + t * _AS_C[2])
    den = 1.0 + t * (_AS_D[0] + t * (_AS_D[1] + t * _AS_D[2]))
    return -(t - num / den)


def _quantile_lower_half(p: float) -> float:
    """Solve Phi(x) = p for 0 < p < 1/2 by Halley's method, in float64.

    Phi(x) = erfc(-x / sqrt 2) / 2 and Phi'(x) = phi(x) = exp(-x^2/2) / sqrt(2 pi),
    Phi''(x) = -x phi(x). With the residual r = Phi(x) - p and u = r / phi(x), Halley's step
    is x <- x - u / (1 + x u / 2); it triples the number of correct digits per step, so three
    steps take the 4e-4 starting error below the float64 rounding error.

    The residual is computed without cancellation: near the centre (p >= 1/4) as
    erf(x / sqrt 2) / 2 - (p - 1/2), where p - 1/2 is exact in floating point; in the tail as
    erfc(-x / sqrt 2) / 2 - p, where erfc keeps its relative accuracy for tiny p.
    """
    x = _initial_guess_lower_tail(p)
    for _ in range(8):
        if p >= 0.25:
            r = 0.5 * math.erf(x / _SQRT2) - (p - 0.5)
        else:
            r = 0.5 * math.erfc(-x / _SQRT2) - p
        phi = math.exp(-0.5 * x * x) * _INV_SQRT_2PI
        u = r / phi
        step = u / (1.0 + 0.5 * x * u)
        x -= step
        if abs(step) <= 1e-17 * abs(x):
            break
    return x


def _normal_quantile_scalar(p: float) -> float:
    p = float(p)
    if not 0.0 <= p <= 1.0 or math.isnan(p):
        raise ValueError(f"normal_quantile needs a probability in [0, 1], got {p!r}")
    if p == 0.0:
        return -math.inf
    if p == 1.0:
        return math.inf
    if p == 0.5:
        return 0.0
    if p > 0.5:
        # Symmetry Phi^-1(p) = -Phi^-1(1 - p); 1 - p is exact for p in [1/2, 1].
        return -_quantile_lower_half(1.0 - p)
    return _quantile_lower_half(p)


def normal_quantile(p):
    """The inverse CDF of the standard normal distribution, Phi^-1(p), in float64.

    ``p`` is a float or an array-like of probabilities in [0, 1]; the result has the same
    shape (a Python float for a scalar). Phi^-1(0) = -inf and Phi^-1(1) = +inf.

    Method: a rough rational approximation refined by Halley's iteration on
    Phi(x) = (1/2) erfc(-x / sqrt 2) (see ``_quantile_lower_half``). The result agrees with
    ``scipy.stats.norm.ppf`` to about 1e-15 relative.
    """
    if np.ndim(p) == 0:
        return _normal_quantile_scalar(p)
    arr = np.asarray(p, dtype=np.float64)  # (...) probabilities
    out = np.array([_normal_quantile_scalar(v) for v in arr.ravel()], dtype=np.float64)  # (N,)
    return out.reshape(arr.shape)  # (N,) -> (...)


# --------------------------------------------------------------------------------------------
# float32 grids as PyTorch makes them
# --------------------------------------------------------------------------------------------


def float32_linspace(start: float, stop: float, num: int) -> np.ndarray:
    """``num`` evenly spaced float32 points from ``start`` to ``stop``, as ``torch.linspace`` makes them.

    bitsandbytes builds its tables from float32 ``torch.linspace`` grids, and the last bits
    matter: a float64 grid changes half of the NF4 levels in their last float32 bit. PyTorch
    rounds ``start`` and ``stop`` to float32, computes ``step = (stop - start) / (num - 1)`` in
    float32, and then makes the first half of the points as ``start + i * step`` and the second
    half as ``stop - (num - 1 - i) * step`` (so both ends are hit exactly), each rounded to
    float32 *once* from the exact value (a fused multiply-add). Here the exact value is formed
    in float64, which holds it without error (a 24-bit step times a small integer plus a
    24-bit end point), and then rounded to float32.
    """
    if num < 2:
        raise ValueError(f"float32_linspace needs num >= 2, got {num}")
    s32, e32 = np.float32(start), np.float32(stop)
    step = (e32 - s32) / np.float32(num - 1)  # float32 arithmetic, one rounding
    i = np.arange(num, dtype=np.float64)  # (num,)
    first = np.float64(s32) + np.float64(step) * i  # (num,) exact in float64
    second = np.float64(e32) - np.float64(step) * (num - 1 - i)  # (num,) exact in float64
    return np.where(i < num // 2, first, second).astype(np.float32)  # (num,) -> (num,) float32


# --------------------------------------------------------------------------------------------
# NF4
# --------------------------------------------------------------------------------------------

# The outermost probability. It cannot be 1 (Phi^-1(1) is infinite). bitsandbytes uses
# 0.9677083, which is, to 7 digits, the average of 1 - 1/(2*15) and 1 - 1/(2*16): half a bin
# below the top of a grid of 15 or of 16 equal-probability bins, (0.966667 + 0.96875) / 2.
NF4_OFFSET = 0.9677083


def nf4_code(offset: float = NF4_OFFSET) -> np.ndarray:
    """The 16 NormalFloat4 levels in index order (ascending), float32 (QLoRA Eq. 4).

    Construction, level by level:

    1. Positive side, 8 levels: the probabilities ``float32_linspace(offset, 0.5, 9)`` are
       offset, ..., 0.5 in 8 equal steps; drop the last one (0.5, whose quantile is 0) and take
       the normal quantile of the other 8: Phi^-1(0.9677) = 1.8481, Phi^-1(0.9092) = 1.3361,
       ..., Phi^-1(0.5585) = 0.1471.
    2. Negative side, 7 levels: ``float32_linspace(offset, 0.5, 8)`` (7 equal steps), drop 0.5,
       negate the quantiles: -1.8481, -1.2867, ..., -0.1683 (coarser steps than on the positive
       side).
    3. Add an exact zero, so that zero weights (padding, pruned weights) stay exactly zero.
    4. Round each of the 16 values to float32 and divide by the largest, Phi^-1(offset), in
       float32, so that the levels run from -1 to 1 (1.3361 / 1.8481 = 0.7230, ...,
       0.1471 / 1.8481 = 0.0796; -0.1683 / 1.8481 = -0.0911). Sort ascending.

    There is one more positive level than negative ones: 4 bits give an even number of codes,
    and a symmetric table with an exact zero would have an odd number of levels.
    """
    p_pos = float32_linspace(offset, 0.5, 9)[:-1]  # (9,) -> (8,) probabilities above 1/2
    p_neg = float32_linspace(offset, 0.5, 8)[:-1]  # (8,) -> (7,)
    pos = np.array([normal_quantile(float(p)) for p in p_pos]).astype(np.float32)  # (8,)
    neg = np.array([-normal_quantile(float(p)) for p in p_neg]).astype(np.float32)  # (7,)
    values = np.concatenate([neg, np.zeros(1, np.float32), pos])  # (7,) + (1,) + (8,) -> (16,)
    values = np.sort(values)  # (16,) ascending
    return (values / pos.max()).astype(np.float32)  # (16,) float32 division, range [-1, 1]


# --------------------------------------------------------------------------------------------
# FP4 and INT4
# --------------------------------------------------------------------------------------------


def fp4_code() -> np.ndarray:
    """The 16 FP4 levels in index order, float32, as bitsandbytes encodes 4-bit floats.

    A 4-bit index ``i`` is read as bits ``s e1 e0 m``: sign ``s = i >> 3``, a 2-bit exponent
    field ``e = (i >> 1) & 3`` and a 1-bit mantissa ``m = i & 1``. bitsandbytes' magnitudes are

    - ``e = 0`` (subnormal): ``m * 2^-4``, i.e. 0 and 0.0625;
    - ``e = 1, 2, 3``: ``2^(4 - e) * (1 + m/2)``, i.e. 8, 12 / 4, 6 / 2, 3.

    (The exponent field counts *down*; the largest magnitude, 12, sits at index 3.) The sign bit
    makes the second half negative. Index 8, "minus zero", is stored as +0.0, as in
    bitsandbytes (its table lists the integer ``-0``, and its CPU kernel also returns +0.0), so
    that dequantized zeros are identical bit for bit. Finally every value is divided by the
    largest magnitude, 12, in float32: index order
    0, 1/192, 2/3, 1, 1/3, 1/2, 1/6, 1/4, 0, -1/192, -2/3, -1, -1/3, -1/2, -1/6, -1/4.
    """
    values = []
    for i in range(16):
        sign, e, m = i >> 3, (i >> 1) & 3, i & 1
        magnitude = m * 2.0**-4 if e == 0 else 2.0 ** (4 - e) * (1.0 + m / 2.0)
        values.append(-magnitude if sign and magnitude else magnitude)  # +0.0 for i = 8
    code = np.array(values, dtype=np.float32)  # (16,) index order
    return code / np.float32(12.0)  # (16,) float32 division, range [-1, 1]


def int4_code() -> np.ndarray:
    """Symmetric 4-bit integers in index order, float32: sign bit and 3-bit magnitude, over 7.

    Index ``i = s * 8 + k`` stands for ``(-1)^s * k / 7`` with k = 0..7, so the levels are
    0, 1/7, ..., 1, 0, -1/7, ..., -1: 15 distinct evenly spaced values (0 appears twice, both
    as +0.0, like FP4's two zeros). This
    is the uniform grid that NF4 and FP4 are compared against (bitsandbytes lists the same
    levels, in another order, for its experimental ``"int4"`` type).
    """
    k = np.arange(16) % 8  # (16,) magnitudes 0..7, 0..7
    sign = np.where(np.arange(16) < 8, 1.0, -1.0)  # (16,)
    return (sign * k / 7.0).astype(np.float32) + np.float32(0.0)  # (16,) float32, -0.0 -> +0.0


# --------------------------------------------------------------------------------------------
# The dynamic 8-bit map (double quantization)
# --------------------------------------------------------------------------------------------


def dynamic_map() -> np.ndarray:
    """The signed dynamic 8-bit map (bitsandbytes ``create_dynamic_map(signed=True)``), float32 (256,).

    Each 8-bit value is a sign bit, then a run of zero bits whose length ``z`` (0..6) gives a
    decimal exponent 10^-z, then an indicator 1 bit, then the remaining ``6 - z`` bits as a
    linear fraction. Read as numbers, level group ``j = 6 - z`` (j = 0..6) is

    - ``10^(j - 6)`` times the midpoints of ``2^j`` equal sub-intervals of [0.1, 1]
      (``float32_linspace(0.1, 1, 2^j + 1)``, midpoints ``(b[:-1] + b[1:]) / 2`` in float32,
      then multiplied by ``float32(10^(j-6))`` in float32), together with their negatives;

    so magnitudes span 0.55e-6 (j = 0) to 0.99297 (j = 6), finer for large magnitudes
    (64 levels in [0.1, 1]) and dense in relative terms near zero. That gives
    2 * (1 + 2 + ... + 64) = 254 levels; 0 and 1 are added (256 in all), and the table is sorted
    ascending. Note the asymmetry: +1 is a level, the most negative level is -0.99297.
    """
    data = []
    for j in range(7):
        edges = float32_linspace(0.1, 1.0, 2**j + 1)  # (2^j + 1,)
        mids = (edges[:-1] + edges[1:]) / np.float32(2.0)  # (2^j,) float32
        scaled = np.float32(10.0 ** (j - 6)) * mids  # (2^j,) float32 product
        data.append(scaled)
        data.append(-scaled)
    data.append(np.array([0.0, 1.0], dtype=np.float32))
    table = np.concatenate(data).astype(np.float32)  # (254 + 2,) = (256,)
    return np.sort(table)  # (256,) ascending


# --------------------------------------------------------------------------------------------
# Search tables: what the nearest-level search needs
# --------------------------------------------------------------------------------------------


def search_table(code: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort a code table for the nearest-level search: ``(order, levels, midpoints)``.

    ``order`` (int64, (K,)) lists the code indices by increasing level (a stable sort, so of
    the two zeros of FP4/INT4, index 0 comes before index 8), ``levels`` is
    ``code[order]`` (float32, ascending) and ``midpoints`` (float32, (K-1,)) are the float32
    averages ``(levels[:-1] + levels[1:]) / 2`` of neighbouring levels. A scaled value v lies
    nearest to ``levels[j]`` where ``j`` = the number of midpoints strictly below v; a value
    exactly on a midpoint goes to the lower level. The stored code is ``order[j]``.
    These are bitsandbytes' rules (its CPU path bucketizes against these float32 midpoints).
    """
    code = np.asarray(code, dtype=np.float32)  # (K,)
    order = np.argsort(code, kind="stable")  # (K,) int64
    levels = code[order]  # (K,) ascending
    midpoints = (levels[:-1] + levels[1:]) / np.float32(2.0)  # (K-1,) float32
    return order, levels, midpoints.astype(np.float32)


def dynamic_grid_codes(points: int = 65536) -> np.ndarray:
    """(points,) uint8: the code of the dynamic-map level nearest to each grid point ``-1 + 2 i / (points - 1)``.

    bitsandbytes' CPU kernel rounds a value to 8 bits through this table (its
    ``build_quantize_lut``): the value goes to its nearest grid point, the point to its nearest
    level. Nearest means: the count of float32 level midpoints strictly below the point (a point
    on a midpoint goes to the lower level), as in ``search_table``; grid points are computed in float32.
    """
    _, _, midpoints = search_table(dynamic_map())  # (255,) float32, ascending
    i = np.arange(points, dtype=np.float32)  # (points,)
    grid = np.float32(-1.0) + (np.float32(2.0) * i) / np.float32(points - 1)  # (points,) float32
    return np.searchsorted(midpoints, grid, side="left").astype(np.uint8)  # (points,) midpoints strictly below


NF4_CODE = nf4_code()  # (16,) float32
FP4_CODE = fp4_code()  # (16,) float32
INT4_CODE = int4_code()  # (16,) float32
DYNAMIC_MAP = dynamic_map()  # (256,) float32
DYNAMIC_GRID_CODES = dynamic_grid_codes()  # (65536,) uint8
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE, "int4": INT4_CODE}
# each 4-bit code table sorted for the nearest-level search: name -> (order, levels, midpoints)
SEARCH_TABLES = {name: search_table(code) for name, code in CODES.items()}
for _table in (NF4_CODE, FP4_CODE, INT4_CODE, DYNAMIC_MAP, DYNAMIC_GRID_CODES,
               *(a for arrays in SEARCH_TABLES.values() for a in arrays)):
    _table.setflags(write=False)
