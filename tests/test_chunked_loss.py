"""The LM head and cross-entropy in chunks of positions equal the plain ones, values and gradients (float64).

``functional.lm_head_cross_entropy`` never forms the (N, V) logits whole; ``GPT.loss`` + ``GPT.backward()``
is the training step's form of ``cross_entropy(model(idx), targets)`` + ``model.backward(dlogits)``.
"""

import numpy as np
import pytest

from lora_from_scratch import functional as F
from lora_from_scratch.backend import asarray, to_numpy
from lora_from_scratch.lora import apply_lora
from lora_from_scratch.model import GPT, GPTConfig


def _rel(a, b):
    return np.linalg.norm(to_numpy(a) - to_numpy(b)) / np.linalg.norm(to_numpy(b))


@pytest.mark.parametrize("rows", [1, 3, 7, 40, None])
def test_chunked_head_and_loss_equal_the_plain_ones(rows):
    rng = np.random.default_rng(0)
    N, C, V = 37, 16, 101
    x = asarray(rng.standard_normal((N, C)))  # (N, C) float64
    W = asarray(rng.standard_normal((V, C)))  # (V, C)
    t = rng.integers(0, V, N)
    t[[2, 9, 30]] = F.IGNORE_INDEX  # ignored positions count nowhere
    t = asarray(t)
    logits, cache = F.linear_forward(x, W)  # (N, V)
    loss_ref, dlogits = F.cross_entropy(logits, t)
    dx_ref, dW_ref, _ = F.linear_backward(dlogits, cache, need_db=False)
    loss, dx, dW = F.lm_head_cross_entropy(x, W, t, rows=rows)
    assert abs(float(loss) - float(loss_ref)) <= 1e-14 * abs(float(loss_ref))
    assert _rel(dx, dx_ref) < 1e-13 and _rel(dW, dW_ref) < 1e-13
    _, dx2, none = F.lm_head_cross_entropy(x, W, t, need_dW=False, rows=rows)
    assert none is None and _rel(dx2, dx_ref) < 1e-13


@pytest.mark.parametrize("N, V", [(128, 56), (37, 101)])
def test_one_chunk_is_the_plain_form_bit_for_bit(N, V):
    """Float32 at a classroom batch and a character vocabulary: loss, dx and dW are the very same bytes."""
    rng = np.random.default_rng(3)
    x = asarray(rng.standard_normal((N, 32)).astype(np.float32))  # (N, C)
    W = asarray((rng.standard_normal((V, 32)) * 0.1).astype(np.float32))
    t = rng.integers(0, V, x.shape[0])
    t[::5] = F.IGNORE_INDEX
    t = asarray(t)
    plain = F.lm_head_cross_entropy(x, W, t)
    chunked = F._lm_head_cross_entropy_chunked(x, W, t, F.IGNORE_INDEX, True)
    for a, b in zip(plain, chunked):
        assert to_numpy(a).tobytes() == to_numpy(b).tobytes()


def test_the_chunked_form_runs_only_above_the_threshold(monkeypatch):
    calls = []
    real = F._lm_head_cross_entropy_chunked
    monkeypatch.setattr(F, "_lm_head_cross_entropy_chunked", lambda *a: calls.append(a) or real(*a))
    rng = np.random.default_rng(4)
    V = 64
    for N, chunked in [(F._WHOLE_LOGITS // V, False), (F._WHOLE_LOGITS // V + 1, True)]:
        x, W = asarray(rng.standard_normal((N, 8))), asarray(rng.standard_normal((V, 8)))
        F.lm_head_cross_entropy(x, W, asarray(rng.integers(0, V, N)))
        assert len(calls) == chunked
        calls.clear()


def test_chunked_loss_poisons_an_out_of_range_target_and_keeps_zero_for_all_ignored():
    x, W = asarray(np.ones((4, 3))), asarray(np.ones((5, 3)))
    loss, dx, dW = F.lm_head_cross_entropy(x, W, asarray(np.array([0, 1, 7, 2])), rows=2)
    assert np.isnan(float(loss)) and np.isnan(to_numpy(dx)).all() and np.isnan(to_numpy(dW)).all()
    loss, dx, _ = F.lm_head_cross_entropy(x, W, asarray(np.full(4, F.IGNORE_INDEX)), rows=3)
    assert float(loss) == 0.0 and not to_numpy(dx).any()
    with pytest.raises(ValueError, match="targets shape"):
        F.lm_head_cross_entropy(x, W, asarray(np.zeros(3, dtype=int)))


@pytest.mark.parametrize("adapted", [False, True])
def test_gpt_loss_and_backward_equal_forward_cross_entropy_backward(adapted):
    cfg = GPTConfig(vocab_size=53, block_size=16, n_layer=2, n_head=2, n_embd=8)
    rng = np.random.default_rng(1)
    idx, tgt = asarray(rng.integers(0, 53, (3, 16))), asarray(rng.integers(0, 53, (3, 16)))
    grads = []
    for chunked in (False, True):
        model = GPT(cfg, seed=0, dtype="float64")
        if adapted:  # a frozen embedding: the head gets no dW
            apply_lora(model, 2, 4, ["q", "v"], seed=3)
            draw = np.random.default_rng(2)  # the same B for both forms
            for name, p in model.named_parameters():
                if name.endswith("B"):  # B = 0 at the start: give the adapters a nonzero update
                    p.data[...] = asarray(draw.standard_normal(p.shape))
        if chunked:
            loss = model.loss(idx, tgt)
            model.backward()
        else:
            loss, dlogits = F.cross_entropy(model(idx), tgt)
            model.backward(dlogits)
        grads.append((float(loss), {n: to_numpy(p.grad) for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, ga), (loss_b, gb) = grads
    assert abs(loss_a - loss_b) <= 1e-14 * loss_a
    assert sorted(ga) == sorted(gb) and ga
    for name in ga:
        assert _rel(gb[name], ga[name]) < 1e-12, name


def test_gpt_backward_says_which_argument_it_needs():
    cfg = GPTConfig(vocab_size=11, block_size=4, n_layer=1, n_head=1, n_embd=4)
    model = GPT(cfg, seed=0)
    idx = asarray(np.zeros((1, 4), dtype=int))
    model.loss(idx, idx)
    with pytest.raises(ValueError, match="without dlogits"):
        model.backward(asarray(np.zeros((1, 4, 11), np.float32)))
    model(idx)
    with pytest.raises(ValueError, match="needs dlogits"):
        model.backward()
