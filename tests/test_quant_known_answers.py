"""Known-answer tests of blockwise 4-bit quantization that need neither torch nor bitsandbytes.

The bit-for-bit comparisons with bitsandbytes (``test_quant_blockwise.py``, ``test_quant_tables.py``)
are skipped where bitsandbytes is not installed. These tests pin the same behaviour down without
it: the NF4 levels as published in the QLoRA paper (Dettmers et al., 2023, Appendix E), the FP4
and INT4 levels from their definitions, and pure-Python float64 loop references for blockwise
absmax quantization (QLoRA Eq. 1-2) and for the 8-bit double quantization of the block constants.

Float32 against float64: the module scales in float32 and compares with float32 midpoints, the
references here scale in float64 and pick the nearest level by distance. The two can only pick
different levels for a scaled value within about 1e-7 of a midpoint (one float32 rounding of the
scaled value, half a float32 ulp between the float32 and the exact midpoint). The test data is
therefore built so that no scaled value lies within 1e-6 of a midpoint (``_clear_of_midpoints``
moves the few that do and the tests assert that none is left); then every code must agree
exactly. Dequantized values are compared bit for bit too: a float32 level times a float32 block
constant is exact in float64, so rounding the float64 product to float32 once is what the float32
multiplication gives.
"""

import math
from fractions import Fraction

import numpy as np
import pytest

from lora_from_scratch.backend import asarray, to_numpy
from lora_from_scratch.quant import (
    DYNAMIC_MAP,
    FP4_CODE,
    INT4_CODE,
    NF4_CODE,
    Quantized4bit,
    bits_per_parameter,
    dequantize_4bit,
    dequantize_blockwise_8bit,
    quantize_4bit,
    quantize_blockwise_8bit,
    tables,
    unpack_nibbles,
)

# The 16 NF4 levels as listed in the QLoRA paper, Appendix E (the same numbers are bitsandbytes'
# NF4 table). Each is the float64 printout of a float32 value.
NF4_PUBLISHED = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# FP4 in index order (sign bit, then magnitudes 0, 0.0625, 8, 12, 4, 6, 2, 3 over 12); INT4: the
# sign bit and k/7 for k = 0..7. Both zeros of each table are +0.0.
FP4_TWELFTHS = (0, 0.0625, 8, 12, 4, 6, 2, 3)
FP4_DEFINED = tuple(m / 12 for m in FP4_TWELFTHS) + tuple(-m / 12 + 0.0 for m in FP4_TWELFTHS)
INT4_DEFINED = tuple(k / 7 for k in range(8)) + tuple(-k / 7 + 0.0 for k in range(8))

WINDOW = 1e-6  # no scaled test value lies closer than this to a level midpoint


def _bits(a) -> np.ndarray:
    """Raw float32 bit patterns: equal bits means the same float32, sign of zero included."""
    return np.ascontiguousarray(to_numpy(a), dtype=np.float32).view(np.uint32)


def _float32_levels(values) -> list:
    """Python floats holding the float32 roundings of ``values`` (the levels the tables store)."""
    return [float(np.float32(v)) for v in values]


REFERENCE_LEVELS = {
    "nf4": _float32_levels(NF4_PUBLISHED),
    "fp4": _float32_levels(FP4_DEFINED),
    "int4": _float32_levels(INT4_DEFINED),
}


# ------------------------------------------------------------------ the code tables


def test_nf4_equals_the_published_levels_exactly():
    # Exact, not to 1e-7: every published number is the float64 printout of a float32 value, so
    # it converts back to that float32 without error, and the table must be that float32 in every
    # bit. A 1e-7 tolerance would let 1-2 float32 ulps through (the ulp is 6e-8 just below 1).
    published = np.array(NF4_PUBLISHED, dtype=np.float64)  # (16,)
    assert NF4_CODE.dtype == np.float32 and NF4_CODE.shape == (16,)
    np.testing.assert_array_equal(NF4_CODE.astype(np.float64), published)
    np.testing.assert_array_equal(_bits(NF4_CODE), _bits(published.astype(np.float32)))
    # The table is built from its definition (tables.nf4_code), not copied: rebuilding gives it again.
    np.testing.assert_array_equal(_bits(tables.nf4_code()), _bits(published.astype(np.float32)))
    assert tables.CODES["nf4"] is NF4_CODE


@pytest.mark.parametrize("delta", [-1e-4, -1e-6, 1e-6, 1e-4])
def test_a_shifted_nf4_offset_would_fail_the_published_levels(delta):
    # A planted bug: the outermost probability moved by delta. The levels move by more than 1e-7
    # (so even a 1e-7 tolerance would catch it), and the exact comparison above fails.
    shifted = tables.nf4_code(offset=tables.NF4_OFFSET + delta)
    published = np.array(NF4_PUBLISHED, dtype=np.float64)
    assert np.abs(shifted.astype(np.float64) - published).max() > 1e-7
    assert not np.array_equal(_bits(shifted), _bits(published.astype(np.float32)))


def test_the_paper_rounded_offset_would_fail_too():
    # 0.9677 instead of 0.9677083: a plausible transcription slip, also caught.
    shifted = tables.nf4_code(offset=0.9677)
    assert np.abs(shifted.astype(np.float64) - np.array(NF4_PUBLISHED)).max() > 1e-6


def test_fp4_and_int4_equal_their_definitions():
    np.testing.assert_array_equal(_bits(FP4_CODE), _bits(np.array(REFERENCE_LEVELS["fp4"])))
    np.testing.assert_array_equal(_bits(INT4_CODE), _bits(np.array(REFERENCE_LEVELS["int4"])))
    assert not np.signbit(FP4_CODE[[0, 8]]).any() and not np.signbit(INT4_CODE[[0, 8]]).any()  # +0.0 twice
    # Those are the exact fractions m/12 and k/7 correctly rounded to float32: within half an ulp.
    fractions = {
        "fp4": [Fraction(m) / 12 for m in FP4_TWELFTHS] + [-Fraction(m) / 12 for m in FP4_TWELFTHS],
        "int4": [Fraction(k, 7) for k in range(8)] + [-Fraction(k, 7) for k in range(8)],
    }
    for code, exact in ((FP4_CODE, fractions["fp4"]), (INT4_CODE, fractions["int4"])):
        for level, value in zip(code.tolist(), exact):
            half_ulp = Fraction(float(np.spacing(np.float32(abs(level))))) / 2
            assert abs(Fraction(level) - value) <= half_ulp


def test_dynamic_map_follows_its_formula():
    # Magnitudes 10^(j-6) times the midpoints of 2^j equal parts of [0.1, 1], j = 0..6, with both
    # signs, plus 0 and 1. The table's float32 arithmetic (grid, average, product) stays within a
    # few float32 roundings of the float64 formula: relative 3e-7 (5 half-ulps).
    magnitudes = [10.0 ** (j - 6) * (0.1 + 0.9 * (2 * i + 1) / 2 ** (j + 1)) for j in range(7) for i in range(2**j)]
    expected = sorted([-m for m in magnitudes] + [0.0] + magnitudes + [1.0])
    assert DYNAMIC_MAP.dtype == np.float32 and DYNAMIC_MAP.shape == (256,) and len(expected) == 256
    np.testing.assert_allclose(DYNAMIC_MAP.astype(np.float64), expected, rtol=3e-7, atol=0)
    assert DYNAMIC_MAP[-1] == 1.0 and DYNAMIC_MAP[127] == 0.0


# ------------------------------------------------------------------ a float64 loop reference


def _sorted_levels(levels: list) -> tuple[list, list]:
    """(order, ascending levels): code indices by increasing level; Python's sort is stable, so of
    two equal levels (the two zeros of FP4 and INT4, codes 0 and 8) the lower code comes first."""
    order = sorted(range(len(levels)), key=lambda i: levels[i])
    return order, [levels[i] for i in order]


def _nearest_code(v: float, order: list, ascending: list) -> int:
    """Code index of the level nearest to ``v``, with the module's tie rules.

    Scanning upwards and keeping a level only when strictly nearer sends a value exactly halfway
    between two levels to the lower one. Where a level is listed twice (the zeros of FP4 and INT4)
    the midpoint between the copies is that level itself, and the module counts midpoints strictly
    below the value: so a value above it takes the later copy (code 8), a value at or below it the
    earlier one (code 0).
    """
    best = 0
    for j in range(1, len(ascending)):
        if abs(v - ascending[j]) < abs(v - ascending[best]):
            best = j
    while best + 1 < len(ascending) and ascending[best + 1] == ascending[best] and v > ascending[best]:
        best += 1
    return order[best]


def _grid_point(v: float, c: float) -> float:
    """bitsandbytes' 8-bit rounding grid: v scaled by the float32 reciprocal of c, moved to the nearest of
    the 65,536 points -1 + 2 i / 65535 (float32 arithmetic, as its CPU kernel computes it)."""
    f = np.float32
    scaled = min(max(f(v) * (f(1.0) / f(c)), f(-1.0)), f(1.0))
    i = int((scaled + f(1.0)) * f(0.5) * f(65535) + f(0.5))  # truncation of a non-negative float
    return float(f(-1.0) + (f(2.0) * f(i)) / f(65535))


def _reference_absmax_blocks(values: list, blocksize: int, levels: list, order: list, ascending: list,
                             grid: bool = False):
    """Blockwise absmax quantization of Python floats, one value at a time in float64.

    For each block of ``blocksize`` consecutive values (the last may be shorter): c = max |v|, each
    code is the nearest level of v / c (``_nearest_code``; 0.0 for an all-zero block), restored as
    level * c. Returns (codes, absmax, restored) as Python lists.
    """
    codes, absmax, restored = [], [], []
    for start in range(0, len(values), blocksize):
        block = values[start : start + blocksize]
        c = max(abs(v) for v in block)
        absmax.append(c)
        for v in block:
            if grid:  # the 8-bit constants: nearest level of the nearest grid point; code 0 for a zero block
                k = _nearest_code(_grid_point(v, c), order, ascending) if c > 0 else 0
            else:
                k = _nearest_code(v / c if c > 0 else 0.0, order, ascending)
            codes.append(k)
            restored.append(levels[k] * c)  # exact in float64: 24-bit times 24-bit significands
    return codes, absmax, restored


def _reference_4bit(x: np.ndarray, blocksize: int, quant_type: str):
    """Blockwise absmax 4-bit quantization, one value at a time in float64 Python floats.

    Returns (codes, packed, absmax, dequantized) as Python lists: for each block of ``blocksize``
    consecutive values (row-major; the last block may be shorter) c = max |x|, each code is the
    nearest level of x / c (0 for an all-zero block), two codes per byte with the first in the high
    nibble, an odd count padded with the code of 0.0, and x is restored as level * c.
    """
    levels = REFERENCE_LEVELS[quant_type]
    order, ascending = _sorted_levels(levels)
    codes, absmax, dequantized = _reference_absmax_blocks([float(v) for v in x.reshape(-1)], blocksize, levels,
                                                          order, ascending)
    padded = codes + [_nearest_code(0.0, order, ascending)] * (len(codes) % 2)
    packed = [(padded[i] << 4) | padded[i + 1] for i in range(0, len(padded), 2)]
    return codes, packed, absmax, dequantized


def _midpoints(levels: list) -> list:
    """Exact midpoints between neighbouring distinct levels (float32 sums are exact in float64)."""
    distinct = sorted(set(levels))
    return [(a + b) / 2 for a, b in zip(distinct[:-1], distinct[1:])]


def _closeness(v: float, midpoints: list, relative: bool) -> float:
    """Distance of ``v`` to the nearest midpoint, in units of the window (< 1: too close)."""
    return min(abs(v - m) / (WINDOW * (abs(m) if relative else 1.0)) for m in midpoints)


def _clear_of_midpoints(x: np.ndarray, blocksize: int, midpoints: list, relative: bool = False) -> np.ndarray:
    """A float32 copy of ``x`` in which no scaled value x / c lies within the window of a midpoint.

    The window is WINDOW (absolute) or WINDOW * |midpoint| (``relative``, for the dynamic 8-bit
    map, whose levels near zero are closer together than 1e-6). A value that is too close is
    moved four windows away from the midpoint, on its own side; midpoints lie well inside
    (-1, 1), so the block's absmax is unchanged.
    """
    flat = x.astype(np.float32).reshape(-1).copy()  # (n,)
    for start in range(0, flat.size, blocksize):
        c = float(np.abs(flat[start : start + blocksize]).max())
        if c == 0:
            continue
        for i in range(start, min(start + blocksize, flat.size)):
            v = float(flat[i]) / c
            for m in midpoints:
                width = WINDOW * (abs(m) if relative else 1.0)
                if abs(v - m) < width:
                    flat[i] = np.float32((m + math.copysign(4 * width, v - m)) * c)
    _assert_clear(flat, blocksize, midpoints, relative)
    return flat.reshape(x.shape)


def _assert_clear(flat: np.ndarray, blocksize: int, midpoints: list, relative: bool) -> None:
    """The precondition of an exact comparison: every scaled value is outside every window."""
    for start in range(0, flat.size, blocksize):
        block = [float(v) for v in flat[start : start + blocksize]]
        c = max(abs(v) for v in block)
        if c > 0:
            assert all(_closeness(v / c, midpoints, relative) > 1 for v in block), "test data too near a midpoint"


def _test_data(shape, seed: int, blocksize: int, quant_type: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 2)  # (shape) a random overall scale
    x[rng.random(shape) < 0.05] = 0.0  # some exact zeros
    return _clear_of_midpoints(x, blocksize, _midpoints(REFERENCE_LEVELS[quant_type]))


def _assert_matches_reference(x: np.ndarray, blocksize: int, quant_type: str) -> Quantized4bit:
    q = quantize_4bit(asarray(x), blocksize=blocksize, quant_type=quant_type)
    codes, packed, absmax, dequantized = _reference_4bit(x, blocksize, quant_type)
    n = x.size
    np.testing.assert_array_equal(to_numpy(unpack_nibbles(q.packed, n)), np.array(codes, np.uint8))
    np.testing.assert_array_equal(to_numpy(q.packed), np.array(packed, np.uint8))
    np.testing.assert_array_equal(_bits(q.absmax), _bits(np.array(absmax)))
    out = dequantize_4bit(q)
    assert out.shape == x.shape and out.dtype == np.float32
    np.testing.assert_array_equal(_bits(out).reshape(-1), _bits(np.array(dequantized)))
    return q


SHAPES = [(1,), (2,), (7,), (63,), (64,), (65,), (201,), (5, 37), (3, 100), (33, 64), (2, 3, 50), (4, 1, 129)]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_matches_the_float64_loop_reference(shape, quant_type):
    x = _test_data(shape, sum(shape) + len(shape), 64, quant_type)
    _assert_matches_reference(x, 64, quant_type)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("blocksize, shape", [(16, (3, 333)), (128, (1000,)), (256, (7, 99)), (4096, (5000,))])
def test_other_block_sizes_match_the_float64_loop_reference(blocksize, shape, quant_type):
    x = _test_data(shape, blocksize, blocksize, quant_type)
    _assert_matches_reference(x, blocksize, quant_type)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_every_code_occurs_and_matches_the_reference(quant_type):
    # Enough data that all 16 codes occur, FP4's and INT4's code 8 (small positive values) included,
    # spread over several NumPy chunks plus a short last block.
    x = _test_data((70001,), 3, 64, quant_type)
    q = _assert_matches_reference(x, 64, quant_type)
    assert set(to_numpy(unpack_nibbles(q.packed, x.size)).tolist()) == set(range(16))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_a_value_on_a_midpoint_goes_to_the_lower_level(quant_type):
    # The module's rule: the code counts the float32 midpoints strictly below the scaled value, so
    # a value exactly on one takes the lower level. With absmax 1 the scaled values are the values.
    order, ascending = _sorted_levels(REFERENCE_LEVELS[quant_type])
    distinct = sorted(set(ascending))
    midpoints32 = [float(np.float32((a + b) / 2)) for a, b in zip(distinct[:-1], distinct[1:])]  # 15 or 14
    x = np.array([1.0] + midpoints32, np.float32)  # (16,) or (15,): one block
    q = quantize_4bit(asarray(x), blocksize=16, quant_type=quant_type)
    # the lower level's code; of FP4's and INT4's two zeros the later one, code 8 (the value is > 0)
    lower = [[order[j] for j, level in enumerate(ascending) if level == below][-1] for below in distinct[:-1]]
    np.testing.assert_array_equal(to_numpy(unpack_nibbles(q.packed, x.size))[1:], lower)

    # The exactly nearest level is the same where the float32 midpoint is exact or lies below the
    # exact one; where rounding put it above (by at most half a float32 ulp) the exactly nearest
    # level is the upper one. Those are the values the 1e-6 window keeps out of the other tests.
    exact = _midpoints(ascending)
    for v, m, code in zip(midpoints32, exact, lower):
        if v <= m:
            assert _nearest_code(v, order, ascending) == code
        else:
            assert v - m <= float(np.spacing(np.float32(abs(m)))) / 2 < WINDOW
            assert _nearest_code(v, order, ascending) != code


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_zero_blocks_match_the_reference(quant_type):
    x = np.zeros(64 + 64 + 64 + 3, np.float32)  # a block of data, an all-zero block, -0.0s, a zero tail
    x[:64] = _test_data((64,), 1, 64, quant_type)
    x[128:192] = -0.0
    q = _assert_matches_reference(x, 64, quant_type)
    assert to_numpy(q.absmax)[-1] == 0  # an all-zero short last block keeps absmax 0 (see blockwise.py)


def test_the_loop_reference_catches_a_planted_nf4_offset_bug(monkeypatch):
    # Plant the bug in the module: quantize with an NF4 table built from a shifted offset.
    x = _test_data((64, 64), 0, 64, "nf4")
    _assert_matches_reference(x, 64, "nf4")  # the real table passes ...
    monkeypatch.setitem(tables.CODES, "nf4", tables.nf4_code(offset=tables.NF4_OFFSET + 1e-3))
    with pytest.raises(AssertionError):
        _assert_matches_reference(x, 64, "nf4")  # ... the shifted one fails
    q = quantize_4bit(asarray(x), blocksize=64, quant_type="nf4")
    _, _, _, dequantized = _reference_4bit(x, 64, "nf4")
    assert np.mean(_bits(dequantize_4bit(q)).reshape(-1) != _bits(np.array(dequantized))) > 0.5


def test_packing_order_is_high_nibble_first():
    # 1.0 and -1.0 with absmax 1 are exactly levels 15 and 0 of NF4: one byte 0xF0.
    q = quantize_4bit(asarray(np.array([1.0, -1.0, 0.0], np.float32)), blocksize=64, quant_type="nf4")
    np.testing.assert_array_equal(to_numpy(q.packed), [0xF0, 0x77])  # 0.0 is code 7, the pad too


# ------------------------------------------------------------------ double quantization


def _bits_from_storage(q: Quantized4bit) -> Fraction:
    return Fraction(8 * q.nbytes, q.numel)


def test_storage_known_answers_4096x4096():
    # QLoRA Section 3: 4 + 32/64 = 4.5 bits per parameter with float32 block constants;
    # 4 + 8/64 + 32/(64*256) = 4.127 with double quantization (plus one float32 offset).
    n = 4096 * 4096
    x = np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32)
    plain = quantize_4bit(asarray(x), blocksize=64)
    assert plain.nbytes == n // 2 + 4 * (n // 64) == 9_437_184
    assert _bits_from_storage(plain) == Fraction(9, 2) and bits_per_parameter(plain) == 4.5
    double = quantize_4bit(asarray(x), blocksize=64, double_quant=True)
    # packed n/2 + one uint8 per block + one float32 per 256 blocks + the float32 offset
    assert double.nbytes == 8_388_608 + 262_144 + 4 * 1024 + 4 == 8_654_852
    expected = Fraction(4) + Fraction(8, 64) + Fraction(32, 64 * 256) + Fraction(32, n)
    assert _bits_from_storage(double) == expected
    assert bits_per_parameter(double) == pytest.approx(float(expected), rel=1e-15)
    assert round(bits_per_parameter(double), 3) == 4.127


def test_storage_known_answer_with_short_blocks():
    # 1000 x 77 = 77000 values: 1204 blocks of 64 (the last one has 8 values), 5 blocks of 256
    # block constants (the last one 180): 38500 + 1204 + 5 * 4 + 4 bytes.
    q = quantize_4bit(asarray(np.ones((1000, 77), np.float32)), blocksize=64, double_quant=True)
    assert q.qabsmax.shape == (1204,) and q.absmax2.shape == (5,) and q.offset.shape == (1,)
    assert q.nbytes == 38_500 + 1204 + 20 + 4 == 39_728
    assert _bits_from_storage(q) == Fraction(8 * 39_728, 77_000)


DYNAMIC_LEVELS = [float(v) for v in DYNAMIC_MAP]  # the module's float32 table (checked above)
DYNAMIC_MIDPOINTS = _midpoints(DYNAMIC_LEVELS)


def _reference_8bit(values: list, blocksize: int = 256):
    """8-bit absmax quantization with the dynamic map, one value at a time.

    For each block: a2 = max |v|; code = index of the level nearest to the grid point nearest to
    v / a2 (``_grid_point``), ties to the lower level (0 for an all-zero block); restored as
    level * a2. Returns (codes, absmax2, restored) as Python lists.
    """
    order = list(range(256))  # the dynamic map is stored ascending: index = sorted position
    return _reference_absmax_blocks(values, blocksize, DYNAMIC_LEVELS, order, DYNAMIC_LEVELS, grid=True)


def test_8bit_dynamic_quantization_matches_the_float64_loop_reference():
    rng = np.random.default_rng(5)
    raw = rng.standard_normal(1500) * rng.uniform(1e-4, 10, 1500)  # magnitudes over 5 decades
    raw[:40] = rng.standard_normal(40) * 1e-6  # values that land among the levels near zero
    values = _clear_of_midpoints(raw, 256, DYNAMIC_MIDPOINTS, relative=True)  # (1500,) float32
    codes, absmax2 = quantize_blockwise_8bit(asarray(values), 256)
    codes_ref, absmax2_ref, restored_ref = _reference_8bit([float(v) for v in values])
    assert to_numpy(codes).dtype == np.uint8 and to_numpy(absmax2).shape == (6,)
    np.testing.assert_array_equal(_bits(absmax2), _bits(np.array(absmax2_ref)))
    np.testing.assert_array_equal(to_numpy(codes), np.array(codes_ref, np.uint8))
    assert len(set(codes_ref)) > 100  # many different levels are exercised
    restored = dequantize_blockwise_8bit(codes, absmax2, 256)
    np.testing.assert_array_equal(_bits(restored), _bits(np.array(restored_ref)))


def test_double_quant_matches_the_float64_loop_reference():
    # 300 x 100 = 30000 values: 469 blocks of 64 (a short last one), so 2 blocks of block constants.
    x = _test_data((300, 100), 21, 64, "nf4")
    q = quantize_4bit(asarray(x), blocksize=64, quant_type="nf4", double_quant=True)
    codes, packed, absmax, _ = _reference_4bit(x, 64, "nf4")
    np.testing.assert_array_equal(to_numpy(q.packed), np.array(packed, np.uint8))  # from float32 absmax

    # offset: the mean of the block constants in float32, summed in torch's order (bitsandbytes'
    # offset), so within one float32 step of the exact mean rounded once
    exact = np.float32(math.fsum(absmax) / len(absmax))
    offset = float(to_numpy(q.offset)[0])
    assert abs(offset - float(exact)) <= np.spacing(exact)
    # centred constants: float32 differences (exact in float64, then rounded once)
    centred = [float(np.float32(c - offset)) for c in absmax]
    _assert_clear(np.array(centred, np.float32), 256, DYNAMIC_MIDPOINTS, relative=True)  # this seed: no ties
    codes8, absmax2, restored = _reference_8bit(centred)
    np.testing.assert_array_equal(to_numpy(q.qabsmax), np.array(codes8, np.uint8))
    np.testing.assert_array_equal(_bits(q.absmax2), _bits(np.array(absmax2)))

    # dequantized: constant = float32(float32(level * absmax2) + offset), weight = float32(level4 * constant)
    constants = [float(np.float32(float(np.float32(r)) + offset)) for r in restored]
    levels = REFERENCE_LEVELS["nf4"]
    expected = [levels[k] * constants[i // 64] for i, k in enumerate(codes)]
    out = dequantize_4bit(q)
    assert out.shape == x.shape
    np.testing.assert_array_equal(_bits(out).reshape(-1), _bits(np.array(expected)))
