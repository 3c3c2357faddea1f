"""Every hand-written backward against float64 central differences (cs231n's gradient check).

For an operation y = f(x1, x2, ...) and a random upstream gradient G, the
scalar L = sum(y * G) has dL/dxi equal to what the backward returns when fed
G (the chain rule, one layer at a time). ``gradcheck.check_gradients``
estimates dL/dxi entry by entry with (L(x + h e) - L(x - h e)) / 2h; every
input is required to agree to a norm-wise relative error below 1e-7.

Covers functional.py (linear, embedding, layer norm, GELU, dropout, softmax,
causal attention, cross-entropy) and the modules built on it (Linear,
LayerNorm, CausalSelfAttention, MLP, Block, and a whole tiny GPT, every
parameter by name). Arrays are tiny: the numerical gradient loops in Python.
The pairs and the whole GPT are ``verify.gradcheck_functional`` and ``verify.gradcheck_gpt``,
the comparisons ``python -m lora_from_scratch verify`` prints, with the same test data; what
only the tests check (the need flags, bias=False, the head sweep, the counts) is here.
"""

import numpy as np
import pytest
from conftest import rel

from lora_from_scratch import functional as F
from lora_from_scratch.backend import asarray, to_numpy
from lora_from_scratch.gradcheck import check_gradients, numerical_gradient
from lora_from_scratch.model import GPT, MLP, Block, CausalSelfAttention, GPTConfig
from lora_from_scratch.nn import LayerNorm, Linear
from lora_from_scratch.verify import (
    FUNCTIONAL_SEEDS,
    GPT_CHECK_CONFIG,
    GRADCHECK_TOL,
    assert_ok,
    exactly_zero,
    gradcheck_functional,
    gradcheck_gpt,
    gradcheck_pair,
    key_biases,
    randomize_params,
)

TOL = GRADCHECK_TOL  # relative error of every gradient against central differences (float64): 1e-7


def host(rng, *shape, scale=1.0):
    """Float64 normal test data made on the host, moved to the default backend."""
    return asarray(rng.standard_normal(shape) * scale)  # shape


def check_pair(fwd, bwd, inputs, seed=0, h=1e-6):
    """``verify.gradcheck_pair`` (the comparison the verify command prints), every error below TOL."""
    measurements = assert_ok(gradcheck_pair(fwd, bwd, inputs, seed=seed, h=h))
    assert all(m.bound == TOL for m in measurements)
    return {m.what.removeprefix("d/d"): m.error for m in measurements}


def check_functional(name, expected, **options):
    """``verify.gradcheck_functional(name)``: a gradient for each of ``expected``, every error below TOL."""
    measurements = assert_ok(gradcheck_functional(name, **options))
    assert all(m.bound == TOL for m in measurements)
    errors = {m.what.removeprefix("d/d"): m.error for m in measurements}
    assert list(errors) == list(expected), errors
    return errors


# ----------------------------------------------------------------- the checker itself
def test_numerical_gradient_of_a_known_function():
    rng = np.random.default_rng(0)
    x = host(rng, 3, 4)  # (3, 4)
    g = numerical_gradient(lambda: (x * x * x).sum(), x)  # d/dx sum(x^3) = 3 x^2
    assert rel(g, 3 * x * x) < 1e-8


def test_check_gradients_detects_a_wrong_backward():
    rng = np.random.default_rng(1)
    x = host(rng, 5)  # (5,)
    errors = check_gradients(lambda: x * x, lambda G: {"x": G * x}, {"x": x})  # true gradient is 2 G x
    assert errors["x"] > 0.4


def test_numerical_gradient_refuses_a_non_contiguous_array():
    """It perturbs x in place through a flat view, which a transposed view cannot give: it must say so."""
    rng = np.random.default_rng(2)
    x = host(rng, 4, 3).T  # (3, 4), a transposed view (not C-contiguous)
    with pytest.raises(ValueError, match="C-contiguous"):
        numerical_gradient(lambda: (x * x).sum(), x)
    xc = x.copy()  # (3, 4), C-contiguous: accepted
    assert rel(numerical_gradient(lambda: (xc * xc).sum(), xc), 2 * xc) < 1e-8


# ----------------------------------------------------------------- functional.py
@pytest.mark.parametrize("bias", [True, False])
def test_linear(bias):
    check_functional("linear", ["x", "W", "b"] if bias else ["x", "W"], bias=bias)  # and db is None without bias


def test_linear_need_flags_skip_only_what_they_name():
    rng = np.random.default_rng(11)
    x, W, b = host(rng, 2, 3, 4), host(rng, 5, 4), host(rng, 5)  # (B, T, in), (out, in), (out,)
    y, cache = F.linear_forward(x, W, b)  # (B, T, out)
    G = host(rng, *y.shape)  # (B, T, out)
    dx, dW, db = F.linear_backward(G, cache)
    dx2, dW2, db2 = F.linear_backward(G, cache, need_dW=False)
    assert dW2 is None
    assert rel(dx2, dx) == 0.0 and rel(db2, db) == 0.0
    dx3, dW3, db3 = F.linear_backward(G, cache, need_db=False)
    assert db3 is None and rel(dx3, dx) == 0.0 and rel(dW3, dW) == 0.0


def test_embedding_with_repeated_ids():
    # id 1 four times, 3 twice; the rows of the unused ids 2 and 5 must get exactly zero gradient
    check_functional("embedding", ["W"])


def test_layernorm():
    check_functional("layernorm", ["x", "gamma", "beta"])


def test_layernorm_need_params_skips_only_the_parameters():
    rng = np.random.default_rng(FUNCTIONAL_SEEDS["layernorm"])  # the inputs of test_layernorm
    x = host(rng, 2, 3, 6, scale=2.0) + 0.5  # (B, T, C), not centred
    gamma, beta = 1.0 + host(rng, 6, scale=0.3), host(rng, 6)  # (C,), (C,)
    y, cache = F.layernorm_forward(x, gamma, beta)  # (B, T, C)
    G = host(rng, *y.shape)  # (B, T, C)
    dx, dg, db = F.layernorm_backward(G, cache)
    dx2, dg2, db2 = F.layernorm_backward(G, cache, need_params=False)
    assert dg is not None and db is not None
    assert dg2 is None and db2 is None and rel(dx2, dx) == 0.0


def test_gelu():
    check_functional("gelu", ["x"])  # (3, 7) at scale 2.5: covers the tails and the bend near 0


def test_dropout_with_fixed_mask():
    rng = np.random.default_rng(FUNCTIONAL_SEEDS["dropout"])  # the inputs verify checks
    x = host(rng, 4, 5)  # (4, 5)
    mask_host = rng.random((4, 5)) >= 0.4  # (4, 5) booleans
    assert mask_host.any() and not mask_host.all()
    mask = asarray(mask_host)
    y, _ = F.dropout_forward(x, 0.4, mask=mask)  # (4, 5)
    assert rel(y, to_numpy(x) * mask_host / 0.6) < 1e-15  # inverted dropout: kept entries scaled by 1/(1-p)
    check_functional("dropout", ["x"])


def test_softmax():
    check_functional("softmax", ["x"])


@pytest.mark.parametrize("n_head", [1, 2, 3])
def test_causal_attention(n_head):
    check_functional("attention", ["q", "k", "v"], n_head=n_head)


@pytest.mark.parametrize("shape", [(2, 4), (7,)])
def test_cross_entropy_gradient_is_the_derivative_of_the_loss(shape):
    # and the two ignored positions get exactly zero gradient
    check_functional("cross_entropy", ["logits"], shape=shape)


def test_a_planted_wrong_backward_fails_the_verify_check(monkeypatch):
    """The pairs above can fail: a dW off by 1e-6 (relative) is out of bounds, a missing db is a Mismatch."""
    right = F.linear_backward

    def off(G, cache, **kw):
        dx, dW, db = right(G, cache, **kw)
        return dx, dW * (1 + 1e-6), db

    monkeypatch.setattr(F, "linear_backward", off)
    with pytest.raises(AssertionError, match="d/dW"):
        assert_ok(gradcheck_functional("linear"))
    monkeypatch.setattr(F, "linear_backward", lambda G, cache, **kw: right(G, cache, **kw)[:2] + (None,))
    with pytest.raises(AssertionError, match="db is None with bias=True"):
        gradcheck_functional("linear")


# ----------------------------------------------------------------- modules
def check_module(module, x, seed=0):
    """Gradcheck the input and every parameter (by name) of a float64 module."""
    params = dict(module.named_parameters())
    zero = key_biases(params)
    inputs = {"x": x, **{n: p.data for n, p in params.items() if n not in zero}}

    def fwd():
        return module(x), None

    def bwd(G, _):
        module.zero_grad()
        dx = module.backward(G)
        return {"x": dx, **{n: p.grad for n, p in params.items() if n not in zero}}

    errors = check_pair(fwd, bwd, inputs, seed=seed)
    assert len(errors) + len(zero) == len(params) + 1
    if zero:
        G = asarray(np.random.default_rng(seed).standard_normal(module(x).shape))  # (B, T, C)
        module.zero_grad()
        module.backward(G)
        measured = assert_ok(exactly_zero(lambda: (module(x) * G).sum(), module, zero))
        assert [m.bound for m in measured] == [1e-12, 1e-8] * len(zero)


CFG = GPTConfig(**GPT_CHECK_CONFIG)  # the tiny GPT of verify.gradcheck_gpt: vocab 11, block 5, 1 layer, 2 heads, C 8


def test_module_linear():
    rng = np.random.default_rng(30)
    for bias in (True, False):
        m = Linear(4, 3, bias=bias, rng=rng, dtype="float64")
        randomize_params(m, rng)
        check_module(m, host(rng, 2, 3, 4))  # (B, T, in)


def test_module_layernorm():
    rng = np.random.default_rng(31)
    m = LayerNorm(6, dtype="float64")
    for p in m.parameters():
        p.data[...] += asarray(rng.standard_normal(p.shape) * 0.3)  # (C,)
    check_module(m, host(rng, 2, 3, 6, scale=1.5))  # (B, T, C)


@pytest.mark.parametrize("cls", [CausalSelfAttention, MLP, Block], ids=lambda c: c.__name__)
def test_module_transformer_parts(cls):
    rng = np.random.default_rng(32)
    m = cls(CFG, rng=rng, dtype="float64")
    randomize_params(m, rng)
    check_module(m, host(rng, 2, 4, CFG.n_embd))  # (B, T, C)


def _check_gpt(output):
    """``verify.gradcheck_gpt(output)``: every parameter by name once, the key biases exactly 0."""
    measured = assert_ok(gradcheck_gpt(output))
    names = [n for n, _ in GPT(CFG, seed=0, dtype="float64").named_parameters()]
    assert "wte.weight" in names and len(names) == 2 + 16 * CFG.n_layer + 2
    zero = key_biases(names)
    assert len(zero) == CFG.n_layer
    grads = [m for m in measured if "exactly 0" not in m.what]
    assert [m.what for m in grads] == [f"d/d{n}" for n in names if n not in zero]
    assert all(m.bound == TOL for m in grads)
    exact = [(m.what, m.bound) for m in measured if "exactly 0" in m.what]
    assert exact == [(f"d/d{n} ({side}, exactly 0)", bound) for n in sorted(zero)
                     for side, bound in (("backward", 1e-12), ("differences", 1e-8))]


def test_whole_gpt_logits_every_parameter():
    _check_gpt("logits")  # sum(logits * G): G is d/d(logits)


def test_whole_gpt_cross_entropy_every_parameter():
    _check_gpt("loss")  # the mean cross-entropy with two ignored positions, h = 1e-5
