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
"""

import numpy as np
import pytest
from conftest import rel

from lora_from_scratch import functional as F
from lora_from_scratch.backend import asarray, to_numpy
from lora_from_scratch.gradcheck import check_gradients, numerical_gradient
from lora_from_scratch.model import GPT, MLP, Block, CausalSelfAttention, GPTConfig
from lora_from_scratch.nn import LayerNorm, Linear
from lora_from_scratch.verify import GRADCHECK_TOL, assert_ok, gradcheck_pair

TOL = GRADCHECK_TOL  # relative error of every gradient against central differences (float64): 1e-7


def host(rng, *shape, scale=1.0):
    """Float64 normal test data made on the host, moved to the default backend."""
    return asarray(rng.standard_normal(shape) * scale)  # shape


def check_pair(fwd, bwd, inputs, seed=0, h=1e-6):
    """``verify.gradcheck_pair`` (the comparison the verify command prints), every error below TOL."""
    measurements = assert_ok(gradcheck_pair(fwd, bwd, inputs, seed=seed, h=h))
    assert all(m.bound == TOL for m in measurements)
    return {m.what.removeprefix("d/d"): m.error for m in measurements}


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
    rng = np.random.default_rng(10)
    x, W = host(rng, 2, 3, 4), host(rng, 5, 4)  # (B, T, in), (out, in)
    b = host(rng, 5) if bias else None  # (out,)
    inputs = {"x": x, "W": W, **({"b": b} if bias else {})}

    def bwd(G, cache):
        dx, dW, db = F.linear_backward(G, cache)
        assert (db is None) == (not bias)
        return {"x": dx, "W": dW, **({"b": db} if bias else {})}

    check_pair(lambda: F.linear_forward(x, W, b), bwd, inputs)


def test_linear_need_flags_skip_only_what_they_name():
    rng = np.random.default_rng(11)
    x, W, b = host(rng, 2, 3, 4), host(rng, 5, 4), host(rng, 5)  # (B, T, in), (out, in), (out,)
    y, cache = F.linear_forward(x, W, b)  # (B, T, out)
    G = host(rng, *y.shape)  # (B, T, out)
    dx, dW, db = F.linear_backward(G, cache)
    dx2, dW2, db2 = F.linear_backward(G, cache, need_dW=False)
    assert dW2 is None
    assert rel(dx2, dx) == 0.0 and rel(db2, db) == 0.0
    dx3, dW3, db3 = F.linear_backward(G, cache, need_db=False, need_dx=False)
    assert dx3 is None and db3 is None and rel(dW3, dW) == 0.0


def test_embedding_with_repeated_ids():
    rng = np.random.default_rng(12)
    ids = asarray(np.array([[1, 3, 1, 1], [0, 3, 4, 1]]))  # (B, T); id 1 four times, 3 twice; 2, 5 unused
    W = host(rng, 6, 3)  # (V, C)

    def bwd(G, cache):
        dW = F.embedding_backward(G, cache)  # (V, C)
        assert not to_numpy(dW)[[2, 5]].any(), "rows of unused ids must get exactly zero gradient"
        return {"W": dW}

    check_pair(lambda: F.embedding_forward(ids, W), bwd, {"W": W})


def test_layernorm():
    rng = np.random.default_rng(13)
    x = host(rng, 2, 3, 6, scale=2.0) + 0.5  # (B, T, C), not centred
    gamma, beta = 1.0 + host(rng, 6, scale=0.3), host(rng, 6)  # (C,), (C,)

    def bwd(G, cache):
        dx, dg, db = F.layernorm_backward(G, cache)
        dx2, dg2, db2 = F.layernorm_backward(G, cache, need_params=False)
        assert dg2 is None and db2 is None and rel(dx2, dx) == 0.0
        return {"x": dx, "gamma": dg, "beta": db}

    check_pair(lambda: F.layernorm_forward(x, gamma, beta), bwd, {"x": x, "gamma": gamma, "beta": beta})


def test_gelu():
    rng = np.random.default_rng(14)
    x = host(rng, 3, 7, scale=2.5)  # (3, 7): covers the tails and the bend near 0
    check_pair(lambda: F.gelu_forward(x), lambda G, c: {"x": F.gelu_backward(G, c)}, {"x": x})


def test_dropout_with_fixed_mask():
    rng = np.random.default_rng(15)
    x = host(rng, 4, 5)  # (4, 5)
    mask_host = rng.random((4, 5)) >= 0.4  # (4, 5) booleans
    assert mask_host.any() and not mask_host.all()
    mask = asarray(mask_host)
    y, _ = F.dropout_forward(x, 0.4, mask=mask)  # (4, 5)
    assert rel(y, to_numpy(x) * mask_host / 0.6) < 1e-15  # inverted dropout: kept entries scaled by 1/(1-p)
    check_pair(lambda: F.dropout_forward(x, 0.4, mask=mask),
               lambda G, c: {"x": F.dropout_backward(G, c)}, {"x": x})


def test_softmax():
    rng = np.random.default_rng(16)
    x = host(rng, 2, 3, 5, scale=2.0)  # (2, 3, N)
    check_pair(lambda: F.softmax_forward(x), lambda G, c: {"x": F.softmax_backward(G, c)}, {"x": x})


@pytest.mark.parametrize("n_head", [1, 2, 3])
def test_causal_attention(n_head):
    rng = np.random.default_rng(17 + n_head)
    q, k, v = (host(rng, 2, 4, 6) for _ in range(3))  # 3 x (B, T, C)

    def bwd(G, cache):
        dq, dk, dv = F.causal_attention_backward(G, cache)
        return {"q": dq, "k": dk, "v": dv}

    check_pair(lambda: F.causal_attention_forward(q, k, v, n_head), bwd, {"q": q, "k": k, "v": v})


@pytest.mark.parametrize("shape", [(2, 4), (7,)])
def test_cross_entropy_gradient_is_the_derivative_of_the_loss(shape):
    rng = np.random.default_rng(20)
    V = 6
    logits = host(rng, *shape, V, scale=2.0)  # (..., V)
    tg = rng.integers(0, V, size=shape)  # (...)
    tg.reshape(-1)[[1, 4]] = F.IGNORE_INDEX  # two ignored positions
    targets = asarray(tg)
    loss, dlogits = F.cross_entropy(logits, targets)  # scalar, (..., V)
    numeric = numerical_gradient(lambda: F.cross_entropy(logits, targets)[0], logits)  # (..., V)
    assert rel(dlogits, numeric) < TOL
    ignored = to_numpy(dlogits).reshape(-1, V)[[1, 4]]  # (2, V)
    assert not ignored.any(), "ignored positions must get exactly zero gradient"


# ----------------------------------------------------------------- modules
def randomize(module, rng, scale=0.4):
    """Non-trivial float64 values for every parameter, in place (the checker perturbs these very arrays)."""
    for name, p in module.named_parameters():
        noise = rng.standard_normal(p.shape) * scale  # shape of p
        parts = name.split(".")
        if parts[-1] == "weight" and (len(parts) == 1 and isinstance(module, LayerNorm)
                                      or len(parts) > 1 and parts[-2].startswith("ln")):
            noise += 1.0  # layer-norm gains near 1
        p.data[...] = asarray(noise)


def zero_gradient_names(names):
    """The key biases: q.(k + b) = q.k + q.b shifts a whole softmax row by one constant, so dL/db_k = 0."""
    return {n for n in names if n == "k.bias" or n.endswith(".k.bias")}


def check_exactly_zero(loss_fn, module, names, G):
    """A gradient that is 0 in exact arithmetic, compared absolutely (backward ~1e-16, differences ~1e-10)."""
    params = dict(module.named_parameters())
    for n in names:
        analytic = to_numpy(params[n].grad)
        numeric = to_numpy(numerical_gradient(loss_fn, params[n].data))
        scale = max(float(np.linalg.norm(to_numpy(p.grad))) for p in params.values())
        assert np.abs(analytic).max() < 1e-12 * scale, f"{n}: backward is not zero"
        assert np.abs(numeric).max() < 1e-8 * scale, f"{n}: central differences are not zero"


def check_module(module, x, seed=0):
    """Gradcheck the input and every parameter (by name) of a float64 module."""
    params = dict(module.named_parameters())
    zero = zero_gradient_names(params)
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
        check_exactly_zero(lambda: (module(x) * G).sum(), module, zero, G)


CFG = GPTConfig(vocab_size=11, block_size=5, n_layer=1, n_head=2, n_embd=8)


def test_module_linear():
    rng = np.random.default_rng(30)
    for bias in (True, False):
        m = Linear(4, 3, bias=bias, rng=rng, dtype="float64")
        randomize(m, rng)
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
    randomize(m, rng)
    check_module(m, host(rng, 2, 4, CFG.n_embd))  # (B, T, C)


def _gpt(seed):
    rng = np.random.default_rng(seed)
    model = GPT(CFG, seed=seed, dtype="float64")
    randomize(model, rng)
    ids = asarray(np.array([[3, 10, 3, 0, 7], [1, 3, 9, 9, 2]]))  # (B, T); repeats exercise the scatter-add
    return model, ids


def _check_gpt(model, fwd, make_dlogits, h=1e-6):
    params = dict(model.named_parameters())
    assert "wte.weight" in params and len(params) == 2 + 16 * CFG.n_layer + 2
    zero = zero_gradient_names(params)
    assert len(zero) == CFG.n_layer

    def bwd(G, cache):
        model.zero_grad()
        model.backward(make_dlogits(G, cache))
        return {n: p.grad for n, p in params.items() if n not in zero}

    errors = check_pair(fwd, bwd, {n: p.data for n, p in params.items() if n not in zero}, h=h)
    assert set(errors) | zero == set(params)
    out, cache = fwd()
    G = asarray(np.random.default_rng(5).standard_normal(out.shape))  # shape of the output
    model.zero_grad()
    model.backward(make_dlogits(G, cache))
    check_exactly_zero(lambda: (fwd()[0] * G).sum(), model, zero, G)


def test_whole_gpt_logits_every_parameter():
    model, ids = _gpt(40)
    _check_gpt(model, lambda: (model(ids), None), lambda G, _: G)  # G is d(sum(logits * G))/d(logits)


def test_whole_gpt_cross_entropy_every_parameter():
    model, ids = _gpt(41)
    targets = asarray(np.array([[10, 3, 0, F.IGNORE_INDEX, 2], [3, 9, F.IGNORE_INDEX, 2, 5]]))  # (B, T)

    def fwd():
        loss, dlogits = F.cross_entropy(model(ids), targets)  # scalar, (B, T, V)
        return loss, dlogits

    # a mean loss of order 1 with small gradients: h = 1e-5 keeps the rounding error (eps |L| / h) well down
    _check_gpt(model, fwd, lambda G, dlogits: dlogits * G, h=1e-5)  # G is a 0-d upstream gradient
