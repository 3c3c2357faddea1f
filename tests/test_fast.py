"""The faster forms of ``fast.py`` and of ``quant.blockwise``'s dequantization equal their plain forms.

Each faster form runs only on large host arrays; here the size thresholds are moved (with
``monkeypatch``) so that the same inputs go once through the plain form and once through the
faster one. Element-wise work on threads and the dequantization lookup give the same bits; the
causal attention by query blocks sums each softmax row over the positions it can see, so it
agrees to rounding: float64 relative error < 1e-13, float32 < 2e-6, values and gradients.
On CuPy the plain form always runs, which the last test checks.
"""

import numpy as np
import pytest
from conftest import rel

from lora_from_scratch import fast
from lora_from_scratch import functional as F
from lora_from_scratch.backend import is_cupy_array
from lora_from_scratch.quant import blockwise, dequantize_4bit, quantize_4bit

NEVER = 1 << 62  # a threshold no array reaches: the plain form runs


def test_run_threads_calls_every_index_once_and_raises_a_workers_error():
    seen = []
    fast.run_threads(seen.append, 1000)  # list.append is atomic under the global lock
    assert sorted(seen) == list(range(1000))

    def task(i):
        if i == 7:
            raise ValueError("piece 7 failed")

    with pytest.raises(ValueError, match="piece 7 failed"):
        fast.run_threads(task, 50)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_on_threads_is_the_plain_gelu_bit_for_bit(monkeypatch, dtype):
    rng = np.random.default_rng(0)
    # not a whole number of pieces, and a transposed (non-contiguous) input
    x = (3 * rng.standard_normal((7, 3 * fast.ELEMENTWISE_CHUNK + 5))).astype(dtype).T  # (49157, 7)
    dy = rng.standard_normal(x.shape).astype(dtype)
    monkeypatch.setattr(fast, "ELEMENTWISE_MIN", NEVER)
    y0, c0 = F.gelu_forward(x)
    dx0 = F.gelu_backward(dy, c0)
    monkeypatch.setattr(fast, "ELEMENTWISE_MIN", 1)
    y1, c1 = F.gelu_forward(x)
    dx1 = F.gelu_backward(dy, c1)
    for fast_one, plain in ((y1, y0), (dx1, dx0)):
        assert fast_one.dtype == plain.dtype and fast_one.shape == plain.shape
        assert np.array_equal(fast_one, plain)


def _attention_both_ways(monkeypatch, B, T, C, n_head, dtype, seed=0):
    """(plain, blocked): each the output, the probabilities and (dq, dk, dv) for one random input."""
    rng = np.random.default_rng(seed)
    q, k, v, dy = (rng.standard_normal((B, T, C)).astype(dtype) for _ in range(4))
    out = []
    for min_t in (NEVER, 1):
        monkeypatch.setattr(fast, "ATTENTION_MIN_T", min_t)
        y, cache = F.causal_attention_forward(q, k, v, n_head)
        out.append((y, cache.probs, *F.causal_attention_backward(dy, cache)))
    return out


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-13), (np.float32, 2e-6)])
@pytest.mark.parametrize("T", [fast.ATTENTION_BLOCK * 2 + 37, fast.ATTENTION_BLOCK - 1])
def test_blocked_causal_attention_equals_the_plain_form(monkeypatch, dtype, tol, T):
    plain, blocked = _attention_both_ways(monkeypatch, B=2, T=T, C=32, n_head=2, dtype=dtype)
    for name, b, p in zip(("y", "probs", "dq", "dk", "dv"), blocked, plain):
        assert b.dtype == p.dtype and b.shape == p.shape, name
        assert rel(b, p) < tol, f"{name}: rel {rel(b, p):.2e}"
    probs = blocked[1]
    above = np.triu(np.ones((T, T), dtype=bool), k=1)
    assert not probs[..., above].any()  # exactly 0 where position t would see the future
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=10 * tol)


def test_the_faster_forms_take_over_exactly_at_their_thresholds(monkeypatch):
    calls = []

    def spy(name, real):
        def wrapped(*args):
            calls.append(name)
            return real(*args)

        monkeypatch.setattr(fast, name, wrapped)

    spy("causal_attention_heads", fast.causal_attention_heads)
    spy("elementwise", fast.elementwise)
    rng = np.random.default_rng(1)
    for T in (fast.ATTENTION_MIN_T - 1, fast.ATTENTION_MIN_T):
        F.causal_attention_forward(*(rng.standard_normal((1, T, 8)) for _ in range(3)), 2)
    for n in (fast.ELEMENTWISE_MIN - 1, fast.ELEMENTWISE_MIN):
        F.gelu_forward(rng.standard_normal(n))
    assert calls == ["causal_attention_heads", "elementwise"]  # once each: at the threshold, not below


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("n, blocksize", [((1 << 16) + 37, 64), ((1 << 14) * 3, 256), (4097 * 3, 4096)])
def test_dequantize_fast_form_is_the_plain_form_bit_for_bit(monkeypatch, quant_type, double_quant, n, blocksize):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)  # n odd: a short last block, half a byte
    q = quantize_4bit(x, blocksize, quant_type, double_quant=double_quant)
    monkeypatch.setattr(blockwise, "_DEQUANTIZE_FAST_MIN", NEVER)
    plain = dequantize_4bit(q)
    monkeypatch.setattr(blockwise, "_DEQUANTIZE_FAST_MIN", 1)
    quick = dequantize_4bit(q)
    assert quick.dtype == plain.dtype == np.float32 and quick.shape == plain.shape == (n,)
    assert np.array_equal(quick.view(np.uint32), plain.view(np.uint32))  # the same bits, signs of zeros included


@pytest.mark.gpu
def test_on_cupy_the_plain_forms_run(monkeypatch):
    import cupy

    def refuse(*args):
        raise AssertionError("a NumPy-only faster form was called with CuPy arrays")

    monkeypatch.setattr(fast, "elementwise", refuse)
    monkeypatch.setattr(fast, "causal_attention_heads", refuse)
    monkeypatch.setattr(fast, "causal_attention_heads_backward", refuse)
    monkeypatch.setattr(blockwise, "_dequantize_4bit_fast", refuse)
    rng = np.random.default_rng(2)
    q, k, v = (cupy.asarray(rng.standard_normal((1, fast.ATTENTION_MIN_T, 16)).astype(np.float32)) for _ in range(3))
    y, cache = F.causal_attention_forward(q, k, v, 2)
    F.causal_attention_backward(y, cache)
    x = cupy.asarray(rng.standard_normal(fast.ELEMENTWISE_MIN).astype(np.float32))
    F.gelu_backward(x, F.gelu_forward(x)[1])
    w = quantize_4bit(cupy.asarray(rng.standard_normal(1 << 17).astype(np.float32)))
    assert is_cupy_array(dequantize_4bit(w))


def test_elementwise_with_arrays_of_different_shapes_runs_the_function_whole():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, fast.ELEMENTWISE_MIN))
    dy = rng.standard_normal((1, fast.ELEMENTWISE_MIN))  # broadcast over the rows
    assert np.array_equal(F.gelu_backward(dy, x), F._gelu_grad(dy, x))


def test_lfs_threads_sets_the_thread_count_and_a_bad_value_is_named(monkeypatch):
    monkeypatch.setenv("LFS_THREADS", "1")
    assert fast._threads_from_env() == 1
    monkeypatch.delenv("LFS_THREADS")
    assert fast._threads_from_env() == 2
    for bad in ("0", "two", "-1", ""):
        monkeypatch.setenv("LFS_THREADS", bad)
        with pytest.raises(ValueError, match="LFS_THREADS must be a positive integer"):
            fast._threads_from_env()


def test_one_thread_gives_the_same_numbers(monkeypatch):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(fast.ELEMENTWISE_MIN + 3).astype(np.float32)
    q, k, v = (rng.standard_normal((1, fast.ATTENTION_MIN_T, 16)).astype(np.float32) for _ in range(3))
    results = []
    for threads in (1, 2):
        monkeypatch.setattr(fast, "THREADS", threads)
        y, cache = F.causal_attention_forward(q, k, v, 2)
        results.append((F.gelu_forward(x)[0], y, *F.causal_attention_backward(y, cache)))
    for one, two in zip(*results):
        assert np.array_equal(one, two)
