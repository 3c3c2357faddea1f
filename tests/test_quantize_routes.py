"""The two routes of ``quantize_4bit`` give the same bytes: the plain one and the fast one for large arrays.

``blockwise._quantize_blocks`` is QLoRA Eq. 1 as written (absmax per block, scale, nearest level,
two codes per byte); ``blockwise._quantize_4bit_fast`` does the same arithmetic in cache-sized
chunks, with integer maxima, reused buffers and a uint16-view packer, and ``quantize_4bit`` takes
it from ``FAST_QUANTIZE_FROM`` values on (NumPy only). Here both run on the same inputs, chosen
where a difference would show: values exactly on a midpoint between two levels (ties), one float32
step on either side of it, zeros and negative zeros, all-zero blocks, the largest float32 values,
subnormals, a short last block of odd length, every block size and quant type. Packed bytes and
block constants must be equal bit for bit.
"""

import numpy as np
import pytest

from lora_from_scratch.quant import blockwise, quantize_4bit, tables

QUANT_TYPES = ["nf4", "fp4", "int4"]


def _awkward_values(rng, n: int, quant_type: str) -> np.ndarray:
    """(n,) float32: Gaussian values salted with ties, near-ties, zeros, -0.0, extremes and all-zero stretches."""
    _, _, midpoints = tables.search_table(tables.CODES[quant_type])  # (15,) float32
    x = rng.standard_normal(n).astype(np.float32) * np.float32(rng.uniform(0.01, 10))  # (n,)
    ties = rng.choice(midpoints, n)  # (n,)
    ulp = np.spacing(ties)  # (n,) one float32 step
    near = np.stack([ties, ties - ulp, ties + ulp, np.zeros_like(ties), -np.zeros_like(ties)])  # (5, n)
    pick = rng.integers(0, 6, n)  # 5: keep the Gaussian value
    keep = pick < 5
    x[keep] = near[pick[keep], np.arange(n)[keep]]  # (n,)
    x[::64] = np.where(np.arange(x[::64].size) % 2, np.float32(1.0), np.float32(-1.0))  # absmax 1: ties stay ties
    blocks = max(1, n // 64)
    special = {
        "top of float32": lambda v: np.clip(v, -1, 1) * np.finfo(np.float32).max,
        "subnormals below 1e-38": lambda v: rng.integers(-3, 4, v.size) * np.float32(1.4e-45),
        "zeros and -0.0": lambda v: np.where(rng.random(v.size) < 0.5, np.float32(0.0), np.float32(-0.0)),
    }
    first = int(rng.integers(0, blocks))
    for k, make in enumerate(special.values()):
        b = (first + k) % blocks
        x[b * 64 : b * 64 + 64] = make(x[b * 64 : b * 64 + 64])  # (64,) or shorter at the end
    return x


def _assert_routes_equal(x: np.ndarray, blocksize: int, quant_type: str) -> None:
    plain_packed, plain_absmax = blockwise._quantize_blocks(x, blocksize, quant_type)
    fast_packed, fast_absmax = blockwise._quantize_4bit_fast(x, blocksize, quant_type)
    assert fast_packed.dtype == plain_packed.dtype == np.uint8
    np.testing.assert_array_equal(fast_packed, plain_packed)
    np.testing.assert_array_equal(fast_absmax.view(np.uint32), plain_absmax.view(np.uint32))  # -0.0 vs 0.0 too


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", [16, 64, 256, 4096])
def test_fast_route_equals_the_plain_one(blocksize, quant_type):
    rng = np.random.default_rng(blocksize * 7 + QUANT_TYPES.index(quant_type))
    # more than one chunk of the fast route, a short last block of odd length
    n = blockwise._CHUNK_ELEMENTS * 2 + 5 * blocksize + 3
    x = _awkward_values(rng, n, quant_type)
    assert np.any(x == 0) and np.any(np.signbit(x) & (x == 0)) and np.any(np.abs(x) == np.finfo(np.float32).max)
    _assert_routes_equal(x, blocksize, quant_type)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_fast_route_on_ties_of_every_midpoint(quant_type):
    # Each block of 16: absmax 1, the 15 midpoints exactly (scaled value = midpoint, a tie) -> then one step off.
    _, _, midpoints = tables.search_table(tables.CODES[quant_type])  # (15,) float32
    blocks = []
    for shift in (0, -1, 1):
        values = midpoints + shift * np.spacing(midpoints)  # (15,)
        blocks.append(np.concatenate([[np.float32(1.0)], values]))  # (16,)
        blocks.append(np.concatenate([[np.float32(-1.0)], -values]))  # (16,) mirrored
    x = np.concatenate(blocks * 8 + [np.float32([0.5, -0.25, 0.0])]).astype(np.float32)  # short last block of 3
    _assert_routes_equal(x, 16, quant_type)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 63, 64, 65, 4095, 4097])
def test_fast_route_on_small_and_short_inputs(n):
    x = _awkward_values(np.random.default_rng(n), n, "nf4")
    for quant_type in QUANT_TYPES:
        _assert_routes_equal(x, 16, quant_type)


def test_quantize_4bit_takes_the_fast_route_from_the_threshold_on(monkeypatch):
    calls = []
    fast = blockwise._quantize_4bit_fast
    monkeypatch.setattr(blockwise, "_quantize_4bit_fast", lambda *a: calls.append(a[0].size) or fast(*a))
    n = blockwise.FAST_QUANTIZE_FROM
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)  # (n,)
    quantize_4bit(x[: n - 2])  # below the threshold: the plain route
    assert calls == []
    q = quantize_4bit(x, double_quant=True)
    assert calls == [n]
    packed, absmax = blockwise._quantize_blocks(x, 64, "nf4")
    np.testing.assert_array_equal(q.packed, packed)
    q_plain = quantize_4bit(x[: n - 2], double_quant=True)
    assert q_plain.qabsmax.shape == (n // 64,)


def test_fast_route_names_the_first_bad_value_like_the_plain_one():
    x = np.random.default_rng(1).standard_normal(blockwise.FAST_QUANTIZE_FROM + 5).astype(np.float32)  # (n,)
    for where in (100_000, x.size - 2):  # in a complete block, in the short last block
        y = x.copy()
        y[where] = np.nan
        y[where + 1] = np.inf
        for route in (blockwise._quantize_blocks, blockwise._quantize_4bit_fast):
            with pytest.raises(ValueError, match=rf"1 NaN and 1 inf value\(s\) \(first at flat index {where}\)"):
                route(y, 64, "nf4")


@pytest.mark.parametrize("signed", [False, True])
def test_offset_mean_is_torchs_float32_mean_around_every_cascade_boundary(signed):
    # torch's sum changes its grouping at 8 values (a vector), 32 (a group of four vectors), 512 and 8,192
    # (16 and 256 groups: the cascade's levels), 32,768 (two threads) and, for its last level, from 2 x 32 x 8,192.
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    from lora_from_scratch.quant import offset_mean

    sizes = list(range(1, 80)) + [n + d for n in (512, 8192, 32768, 1 << 20) for d in (-33, -1, 0, 1, 7, 31, 40)]
    rng = np.random.default_rng(3)
    for n in sizes:
        values = (rng.standard_normal(n) * rng.uniform(1e-3, 10)).astype(np.float32)  # (n,)
        values = values if signed else np.abs(values)
        ours, ref = offset_mean(values), torch.from_numpy(values).mean().numpy()
        assert ours.dtype == np.float32 and ours.view(np.uint32) == ref.view(np.uint32), n
