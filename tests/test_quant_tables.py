"""Tests of the quantization code tables (QLoRA Section 3, NF4 Eq. 4; the dynamic 8-bit map).

Every table must equal bitsandbytes' constants bit for bit, read from the installed package at
test time; the inverse normal CDF is checked against scipy.
"""

import numpy as np
import pytest

from lora_from_scratch.quant import tables
from lora_from_scratch.quant.tables import (
    DYNAMIC_MAP,
    FP4_CODE,
    INT4_CODE,
    NF4_CODE,
    float32_linspace,
    normal_quantile,
    search_table,
)

torch = pytest.importorskip("torch")
bnbf = pytest.importorskip("bitsandbytes.functional")
scipy_stats = pytest.importorskip("scipy.stats")


def _bits(a) -> np.ndarray:
    """The raw float32 bit patterns (so that -0.0 and 0.0, or 1-ulp differences, count)."""
    return np.asarray(a, dtype=np.float32).view(np.uint32)


# ------------------------------------------------------------------ the inverse normal CDF


def test_normal_quantile_matches_scipy_to_1e15_relative():
    rng = np.random.default_rng(0)
    p = np.concatenate(
        [
            np.linspace(1e-6, 1 - 1e-6, 4001),  # the body
            10.0 ** -rng.uniform(0, 300, 400),  # lower tail down to 1e-300
            1 - 10.0 ** -rng.uniform(0, 15, 400),  # upper tail
            0.5 + rng.uniform(-1e-3, 1e-3, 400),  # near the centre, where x is tiny
        ]
    )
    ours = normal_quantile(p)
    ref = scipy_stats.norm.ppf(p)
    assert ours.shape == p.shape and ours.dtype == np.float64
    nonzero = ref != 0
    relative = np.abs(ours - ref)[nonzero] / np.abs(ref)[nonzero]
    assert relative.max() <= 1e-15
    assert np.all(ours[~nonzero] == 0.0)


def test_normal_quantile_edges_and_symmetry():
    assert normal_quantile(0.5) == 0.0
    assert normal_quantile(0.0) == -np.inf and normal_quantile(1.0) == np.inf
    for p in (2.0**-40, 2.0**-20, 0.125, 0.25, 0.375):  # 1 - p is exact for these
        assert normal_quantile(p) < 0
        assert normal_quantile(1.0 - p) == -normal_quantile(p)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="probability"):
            normal_quantile(bad)
    assert normal_quantile(np.full((2, 3), 0.5)).shape == (2, 3)


# ------------------------------------------------------------------ float32 grids


@pytest.mark.parametrize(
    "start, stop, num", [(0.9677083, 0.5, 9), (0.9677083, 0.5, 8), (0.1, 1.0, 9), (0.1, 1.0, 33), (0.1, 1.0, 65)]
)
def test_float32_linspace_equals_torch_linspace(start, stop, num):
    ref = torch.linspace(start, stop, num, dtype=torch.float32).numpy()
    np.testing.assert_array_equal(_bits(float32_linspace(start, stop, num)), _bits(ref))


# ------------------------------------------------------------------ NF4


def test_nf4_equals_bitsandbytes_bit_for_bit():
    ref = bnbf.get_4bit_type("nf4", device="cpu").numpy()  # bitsandbytes' hard-coded float32 table
    assert NF4_CODE.dtype == np.float32 and NF4_CODE.shape == (16,)
    np.testing.assert_array_equal(_bits(NF4_CODE), _bits(ref))


def test_nf4_equals_bitsandbytes_create_normal_map():
    # create_normal_map returns 256 entries: the 15 non-zero levels and 241 zeros (sorted).
    ref = bnbf.create_normal_map().numpy()
    np.testing.assert_array_equal(_bits(np.unique(ref)), _bits(NF4_CODE))


def test_nf4_structure():
    assert NF4_CODE[0] == -1.0 and NF4_CODE[-1] == 1.0
    assert np.all(np.diff(NF4_CODE) > 0)
    assert (NF4_CODE < 0).sum() == 7 and (NF4_CODE > 0).sum() == 8 and (NF4_CODE == 0).sum() == 1
    # Positive level j is Phi^-1(p_j) / Phi^-1(offset) for the 8 grid probabilities p_j
    # (float32 rounding of the quantiles and of the division: relative 1e-6).
    p = float32_linspace(tables.NF4_OFFSET, 0.5, 9)[:-1]
    expected = normal_quantile(p.astype(np.float64)) / normal_quantile(float(p[0]))
    np.testing.assert_allclose(NF4_CODE[8:][::-1], expected, rtol=1e-6, atol=0)


def test_nf4_needs_the_float32_grid():
    # The same construction on a float64 probability grid misses bitsandbytes' constants.
    pos = np.float32([normal_quantile(p) for p in np.linspace(tables.NF4_OFFSET, 0.5, 9)[:-1]])
    neg = np.float32([-normal_quantile(p) for p in np.linspace(tables.NF4_OFFSET, 0.5, 8)[:-1]])
    values = np.sort(np.concatenate([neg, np.zeros(1, np.float32), pos])) / pos.max()
    assert 4 <= int(np.sum(_bits(values) != _bits(NF4_CODE))) <= 12


# ------------------------------------------------------------------ FP4 and INT4


def _bnb_dequantized_levels(quant_type: str) -> np.ndarray:
    """The value bitsandbytes' CPU dequantizer gives each of the 16 codes (absmax 1)."""
    packed = torch.tensor([[(c << 4) | c] for c in range(16)], dtype=torch.uint8)  # (16, 1)
    state = bnbf.QuantState(absmax=torch.ones(1), shape=(32,), dtype=torch.float32, blocksize=64, quant_type=quant_type)
    out = bnbf.dequantize_4bit(packed, state).numpy().reshape(-1)  # (32,) each code twice
    return out[0::2]


def test_fp4_equals_the_levels_bitsandbytes_dequantizes_to():
    levels = _bnb_dequantized_levels("fp4")
    assert FP4_CODE.dtype == np.float32 and FP4_CODE.shape == (16,)
    # Code 0b1000 is a sign bit over a zero magnitude: bitsandbytes' native CPU kernel gives -0.0 for it on
    # some processors and +0.0 on others (its Python table below says +0.0). The value is zero either way;
    # every other code must match bit for bit.
    assert levels[8] == 0.0 and FP4_CODE[8] == 0.0
    others = np.arange(16) != 8
    np.testing.assert_array_equal(_bits(FP4_CODE)[others], _bits(levels)[others])
    # bitsandbytes' Python table (used for odd shapes) is the same, bit for bit.
    np.testing.assert_array_equal(_bits(FP4_CODE), _bits(bnbf.get_4bit_type("fp4", device="cpu").numpy()))


def test_nf4_equals_the_levels_bitsandbytes_dequantizes_to():
    np.testing.assert_array_equal(_bits(NF4_CODE), _bits(_bnb_dequantized_levels("nf4")))


def test_fp4_layout_sign_exponent_mantissa():
    # Sign bit: the second half is the negation of the first half.
    np.testing.assert_array_equal(FP4_CODE[8:], -FP4_CODE[:8])
    assert FP4_CODE[8] == 0 and not np.signbit(FP4_CODE[8])  # "minus zero" stored as +0.0
    # Mantissa bit: within a normal exponent, the odd code is 1.5 times the even one.
    for e in (1, 2, 3):
        assert FP4_CODE[2 * e + 1] == np.float32(1.5) * FP4_CODE[2 * e]
    assert np.abs(FP4_CODE).max() == 1.0


def test_int4_is_symmetric_uniform_grid():
    distinct = np.unique(INT4_CODE)
    assert distinct.size == 15
    np.testing.assert_allclose(distinct * 7, np.arange(-7, 8), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(INT4_CODE[8:], -INT4_CODE[:8])


# ------------------------------------------------------------------ the dynamic 8-bit map


def test_dynamic_map_equals_bitsandbytes_bit_for_bit():
    ref = bnbf.create_dynamic_map(signed=True).numpy()
    assert DYNAMIC_MAP.dtype == np.float32 and DYNAMIC_MAP.shape == (256,)
    np.testing.assert_array_equal(_bits(DYNAMIC_MAP), _bits(ref))


def test_dynamic_map_structure():
    assert np.all(np.diff(DYNAMIC_MAP) > 0)
    assert DYNAMIC_MAP[-1] == 1.0 and 0.0 in DYNAMIC_MAP
    assert abs(DYNAMIC_MAP[0] + (1 - 0.9 / 128)) < 1e-6  # the most negative level: -(1 - 0.9/128)
    assert np.min(np.abs(DYNAMIC_MAP[DYNAMIC_MAP != 0])) == pytest.approx(0.55e-6, rel=1e-6)


# ------------------------------------------------------------------ search tables


@pytest.mark.parametrize("code", [NF4_CODE, FP4_CODE, INT4_CODE, DYNAMIC_MAP], ids=["nf4", "fp4", "int4", "dyn"])
def test_search_table(code):
    order, levels, midpoints = search_table(code)
    np.testing.assert_array_equal(code[order], levels)
    assert np.all(np.diff(levels) >= 0)
    assert midpoints.dtype == np.float32 and midpoints.size == code.size - 1
    assert np.all(levels[:-1] <= midpoints) and np.all(midpoints <= levels[1:])


@pytest.mark.parametrize("name", ["nf4", "fp4", "int4"])
def test_search_tables_are_the_code_tables_sorted(name):
    """The quantizer reads ``SEARCH_TABLES``: each entry is ``search_table`` of its code table, read-only."""
    arrays = tables.SEARCH_TABLES[name]
    for ours, expected in zip(arrays, search_table(tables.CODES[name]), strict=True):
        assert ours.dtype == expected.dtype
        np.testing.assert_array_equal(ours, expected)
        with pytest.raises(ValueError):
            ours[0] = 1
    assert set(tables.SEARCH_TABLES) == set(tables.CODES)


def test_fp4_sort_order_matches_bitsandbytes():
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    bounds, order = _get_4bit_quantize_bounds("fp4", torch.device("cpu"))
    ours_order, _, ours_mid = search_table(FP4_CODE)
    np.testing.assert_array_equal(ours_order, order.numpy())
    np.testing.assert_array_equal(_bits(ours_mid), _bits(bounds.numpy()))


def test_tables_are_read_only():
    with pytest.raises(ValueError):
        NF4_CODE[0] = 0.0
