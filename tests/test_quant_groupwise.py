"""Tests of group-wise asymmetric INT-N quantization (QA-LoRA Section 3, group-wise min-max).

Test data is made on the host with NumPy and moved to the backend under test.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_from_scratch.backend import asarray, to_numpy
from lora_from_scratch.quant import (
    GroupwiseQuantized,
    dequantize_groupwise,
    groupwise,
    groupwise_bits_per_parameter,
    pack_codes,
    pack_nibbles,
    quantize_groupwise,
    unpack_codes,
)

HYPOTHESIS = settings(max_examples=30, deadline=None)


def _weight(seed: int, shape, scale: float = 0.05) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _reference(w: np.ndarray, bits: int, group_size: int):
    """The formulas of groupwise.py, written out per group in float64: (codes, scales, zeros)."""
    out_f, in_f = w.shape
    codes = np.empty(w.shape, np.int64)
    scales = np.empty((out_f, in_f // group_size))
    zeros = np.empty_like(scales)
    for i in range(out_f):
        for g in range(in_f // group_size):
            group = w[i, g * group_size : (g + 1) * group_size].astype(np.float64)
            hi, lo = max(group.max(), 0.0), min(group.min(), 0.0)
            scale = (hi - lo) / (2**bits - 1) or 1.0
            zero = np.round(-lo / scale)
            codes[i, g * group_size : (g + 1) * group_size] = np.clip(np.round(group / scale) + zero, 0, 2**bits - 1)
            scales[i, g], zeros[i, g] = scale, zero
    return codes, scales, zeros


@pytest.mark.parametrize("bits, group_size", [(2, 16), (3, 32), (4, 32), (4, 64), (8, 128)])
def test_matches_the_formulas_and_error_is_at_most_half_a_step(bits, group_size):
    w = _weight(bits, (24, 256))
    w[3, :group_size] = 0.0  # an all-zero group
    w[5, group_size : 2 * group_size] = 0.01  # a constant non-zero group
    q = quantize_groupwise(asarray(w.astype(np.float64)), bits=bits, group_size=group_size)
    codes_ref, scales_ref, zeros_ref = _reference(w, bits, group_size)
    np.testing.assert_array_equal(to_numpy(q.codes), codes_ref)
    np.testing.assert_allclose(to_numpy(q.scales), scales_ref, rtol=1e-15, atol=0)
    np.testing.assert_array_equal(to_numpy(q.zeros), zeros_ref)
    assert q.codes.dtype == np.uint8 and q.codes.shape == (24, 256)
    assert q.scales.shape == q.zeros.shape == (24, 256 // group_size)

    w_hat = to_numpy(dequantize_groupwise(q))
    step = np.repeat(to_numpy(q.scales), group_size, axis=1)  # (out, in)
    assert np.all(np.abs(w_hat - w) <= step * (0.5 + 1e-12))  # float64: rounding only
    assert np.all(w_hat[3, :group_size] == 0.0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_float32_round_trip_bound_and_code_range(bits):
    w = _weight(10 + bits, (64, 128))
    q = quantize_groupwise(asarray(w), bits=bits, group_size=32)
    codes = to_numpy(q.codes)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    assert q.scales.dtype == np.float32 and q.zeros.dtype == np.float32
    w_hat = to_numpy(dequantize_groupwise(q.codes, q.scales, q.zeros, 32))
    assert w_hat.shape == w.shape and w_hat.dtype == np.float32
    step = np.repeat(to_numpy(q.scales), 32, axis=1)
    # scale/2, plus float32 rounding of w/scale and of scale*(q - zero): 1e-5 of a step.
    assert np.all(np.abs(w_hat - w) <= step * (0.5 + 1e-5))


def test_constant_groups_have_no_division_by_zero():
    w = np.zeros((4, 64), np.float32)
    w[1] = -0.25  # constant negative: range [-0.25, 0]
    w[2, 32:] = 3.0  # constant positive group
    with np.errstate(all="raise"):
        q = quantize_groupwise(asarray(w), bits=4, group_size=32)
        w_hat = to_numpy(dequantize_groupwise(q))
    scales, zeros = to_numpy(q.scales), to_numpy(q.zeros)
    assert np.all(np.isfinite(scales)) and np.all(scales > 0) and np.all(np.isfinite(zeros))
    assert scales[0, 0] == 1.0 and zeros[0, 0] == 0.0  # all-zero group: scale 1, zero 0
    assert not np.any(np.isnan(w_hat))
    np.testing.assert_array_equal(w_hat[0], 0.0)
    np.testing.assert_allclose(w_hat, w, rtol=1e-6, atol=0)  # both ends of a range are levels


def test_non_integer_zeros_dequantize():
    # After a QA-LoRA merge the zeros are no longer integers; dequantization takes them as they are.
    w = _weight(3, (8, 64))
    q = quantize_groupwise(asarray(w), bits=4, group_size=32)
    shifted = q.zeros + 0.37
    w_hat = to_numpy(dequantize_groupwise(q.codes, q.scales, shifted, 32))
    expected = to_numpy(dequantize_groupwise(q)) - 0.37 * np.repeat(to_numpy(q.scales), 32, axis=1)
    np.testing.assert_allclose(w_hat, expected, rtol=0, atol=1e-6 * np.abs(w).max())


def test_bad_input_raises():
    w = asarray(_weight(0, (4, 96)))
    with pytest.raises(ValueError, match="in_features 96 is not divisible by group_size 64"):
        quantize_groupwise(w, bits=4, group_size=64)
    for bits in (1, 9, 0, 2.5):
        with pytest.raises(ValueError, match="bits"):
            quantize_groupwise(w, bits=bits, group_size=32)
    with pytest.raises(ValueError, match="2-D"):
        quantize_groupwise(asarray(np.ones(64, np.float32)))
    with pytest.raises(ValueError, match="floating-point"):
        quantize_groupwise(asarray(np.ones((4, 64), np.int32)))
    bad = _weight(0, (4, 64))
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        quantize_groupwise(asarray(bad))
    q = quantize_groupwise(asarray(_weight(0, (4, 64))), bits=4, group_size=32)
    with pytest.raises(ValueError, match="shape"):
        dequantize_groupwise(q.codes, q.scales[:, :1], q.zeros, 32)
    with pytest.raises(ValueError, match="in_features 64 is not divisible by group_size 48"):
        dequantize_groupwise(q.codes, q.scales, q.zeros, 48)
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_codes(asarray(np.array([8], np.uint8)), 3)
    with pytest.raises(ValueError, match="cannot unpack"):
        unpack_codes(asarray(np.zeros(3, np.uint8)), 3, 9)


@HYPOTHESIS
@given(bits=st.integers(2, 8), n=st.integers(0, 200), seed=st.integers(0, 2**32 - 1))
def test_pack_unpack_codes_exact(bits, n, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, n).astype(np.uint8)
    packed = to_numpy(pack_codes(asarray(codes), bits))
    assert packed.dtype == np.uint8 and packed.shape == (-(-n * bits // 8),)
    np.testing.assert_array_equal(to_numpy(unpack_codes(asarray(packed), bits, n)), codes)
    # The bit stream, read bit by bit with NumPy, spells the codes most significant bit first.
    stream = np.unpackbits(packed)[: n * bits].reshape(n, bits)
    np.testing.assert_array_equal(stream @ (1 << np.arange(bits - 1, -1, -1)), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_by_units_equals_the_bit_by_bit_form_at_the_threshold(bits):
    # ``pack`` writes the stream bit by bit below PACK_UNITS_FROM codes and a unit at a time from there on:
    # both must give the same bytes, on either side of the threshold and at sizes that leave a partial unit.
    edge = groupwise.PACK_UNITS_FROM
    rng = np.random.default_rng(bits)
    for n in (0, 1, 7, 9, 1001, edge - 1, edge, edge + 3):
        codes = asarray(rng.integers(0, 2**bits, n).astype(np.uint8))
        units = to_numpy(groupwise._pack_units(codes, bits))
        np.testing.assert_array_equal(to_numpy(groupwise.pack(codes, bits)), units)
        if n < edge:  # the same bytes from the bit form itself, not only through the route pack takes
            digits = np.unpackbits(to_numpy(codes)).reshape(-1, 8)[:, 8 - bits :]  # (n, bits)
            np.testing.assert_array_equal(np.packbits(digits), units)


def test_pack_takes_the_unit_route_from_the_threshold_on(monkeypatch):
    calls = []
    monkeypatch.setattr(groupwise, "_pack_units", lambda codes, bits: calls.append(codes.size))
    codes = asarray(np.zeros(groupwise.PACK_UNITS_FROM, np.uint8))
    groupwise.pack(codes[:-1], 4)
    assert calls == []  # below the threshold: the bit form
    groupwise.pack(codes, 4)
    assert calls == [groupwise.PACK_UNITS_FROM]


def test_pack_codes_4bit_is_the_nibble_layout():
    codes = np.random.default_rng(1).integers(0, 16, 33).astype(np.uint8)
    np.testing.assert_array_equal(to_numpy(pack_codes(asarray(codes), 4)), to_numpy(pack_nibbles(asarray(codes))))


@pytest.mark.parametrize("bits, group_size", [(4, 32), (3, 64), (2, 128), (8, 16)])
def test_bits_per_parameter_from_nbytes(bits, group_size):
    w = _weight(bits, (96, 256))
    q = quantize_groupwise(asarray(w), bits=bits, group_size=group_size)
    assert isinstance(q, GroupwiseQuantized)
    packed = pack_codes(q.codes, bits)
    stored = packed.nbytes + q.scales.astype(np.float16).nbytes + q.zeros.astype(np.float16).nbytes
    measured = groupwise_bits_per_parameter(q, scale_dtype="float16")
    assert measured == 8 * stored / w.size == q.bits_per_parameter()
    # 96 * 256 * bits is a whole number of bytes here, so this is exactly bits + 2 * 16 / group_size.
    assert measured == bits + 2 * 16 / group_size
    assert groupwise_bits_per_parameter(q, scale_dtype="float32") == bits + 2 * 32 / group_size
