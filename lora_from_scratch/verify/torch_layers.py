"""GPT-2's layers against PyTorch autograd, and every backward against float64 central differences.

Radford et al., 2019 (GPT-2); Vaswani et al., 2017, eq. 1 (attention). Same weights on both sides,
outputs and every gradient by name, float64 and float32.
"""

from __future__ import annotations

import math

from .. import functional as F
from ..backend import asarray, rng, to_numpy
from ..gradcheck import check_gradients, numerical_gradient, rel_error
from .measure import GRADCHECK_TOL, TORCH_TOL, Measurement, _host_array, _norm, _rel, require


# ============================================================================ PyTorch autograd
def _pair(g, shape, dtype, scale=1.0):
    """The same values for both sides: a host array of ``dtype`` and its torch leaf tensor."""
    import torch

    a = (g.standard_normal(shape) * scale).astype(dtype)  # shape
    return a, torch.tensor(a, requires_grad=True)  # shape, host array and torch leaf


def _close(ours, ref, dtype: str, what: str) -> Measurement:
    """Our array against torch's, relative error with the dtype's bound; a wrong dtype is a Mismatch."""
    got = str(to_numpy(ours).dtype)
    require(got == dtype, f"{what}: dtype {got}, expected {dtype}")
    return _rel(what, ours, ref, TORCH_TOL[dtype])


def set_params(module, g, dtype: str) -> None:
    """Random values for every parameter (biases non-zero, layer-norm gains near 1) on the default backend."""
    from ..nn import LayerNorm

    for name, p in module.named_parameters():
        parts = name.split(".")
        fan_in = p.shape[-1] if len(p.shape) == 2 else 1
        host = g.standard_normal(p.shape) / math.sqrt(fan_in)  # shape of p
        if len(p.shape) == 1:
            gain = parts[-1] == "weight" and (isinstance(module, LayerNorm)
                                              or (len(parts) > 1 and parts[-2].startswith("ln")))
            host = 0.2 * host + (1.0 if gain else 0.0)  # (C,)
        p.data = asarray(host.astype(dtype))  # shape of p, on the backend


def _torch_params(module) -> dict:
    """name -> torch leaf tensor holding the same values as our parameter of that name."""
    import torch

    return {n: torch.tensor(to_numpy(p.data), requires_grad=True) for n, p in module.named_parameters()}  # p's shapes


def _is_key_bias(name: str) -> bool:
    return name == "k.bias" or name.endswith(".k.bias")


def _grads(module, ref_params: dict, dtype: str) -> list:
    """Every gradient by name. The key bias's exact gradient is 0 (q.(k + b) shifts a softmax row by a
    constant), so both sides must be 0 up to rounding, measured against the largest gradient."""
    ours = dict(module.named_parameters())
    require(set(ours) == set(ref_params), f"parameter names differ: {sorted(set(ours) ^ set(ref_params))}")
    for name, p in ours.items():
        require(p.grad is not None, f"{name} got no gradient")
        require(ref_params[name].grad is not None, f"torch gave {name} no gradient")
    scale = max(_norm(p.grad) for p in ours.values())
    out = []
    for name, p in ours.items():
        if _is_key_bias(name):
            for side, g in (("ours", p.grad), ("torch", ref_params[name].grad)):
                out.append(Measurement(f"grad {name} ({side}) / largest grad, exactly 0",
                                       _norm(_host_array(g)) / scale, TORCH_TOL[dtype]))
        else:
            out.append(_close(p.grad, ref_params[name].grad, dtype, f"grad {name}"))
    return out


def _copy_into_torch(ours, ref) -> None:
    import torch

    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.from_numpy(to_numpy(getattr(ours, name).data)))


def torch_linear(dtype: str, bias: bool = True) -> list:
    """``nn.Linear`` (functional.linear_*) against ``torch.nn.Linear``: output, dx, dW, db."""
    import torch

    from ..nn import Linear

    g = rng(1)
    ours = Linear(6, 5, bias=bias, dtype=dtype)
    set_params(ours, g, dtype)
    ref = torch.nn.Linear(6, 5, bias=bias, dtype=getattr(torch, dtype))
    _copy_into_torch(ours, ref)
    x, xt = _pair(g, (2, 3, 6), dtype)  # (B, T, 6)
    y, yt = ours(asarray(x)), ref(xt)  # (B, T, 5)
    out = [_close(y, yt, dtype, "output")]
    G = g.standard_normal(y.shape).astype(dtype)  # (B, T, 5)
    dx = ours.backward(asarray(G))  # (B, T, 6)
    yt.backward(torch.from_numpy(G))
    out.append(_close(dx, xt.grad, dtype, "dx"))
    return out + _grads(ours, dict(ref.named_parameters()), dtype)


def torch_embedding(dtype: str) -> list:
    """``nn.Embedding`` (functional.embedding_*) against ``torch.nn.Embedding``, repeated ids."""
    import torch

    from ..nn import Embedding

    g = rng(2)
    ours = Embedding(7, 4, dtype=dtype)
    set_params(ours, g, dtype)
    ref = torch.nn.Embedding(7, 4, dtype=getattr(torch, dtype))
    _copy_into_torch(ours, ref)
    ids = to_numpy(asarray([[0, 3, 3, 6], [3, 1, 0, 3]]))  # (B, T) host int64, repeated ids
    y, yt = ours(asarray(ids)), ref(torch.from_numpy(ids))  # (B, T, C)
    out = [_close(y, yt, dtype, "output")]
    G = g.standard_normal(y.shape).astype(dtype)  # (B, T, C)
    require(ours.backward(asarray(G)) is None, "an embedding has no input gradient")
    yt.backward(torch.from_numpy(G))
    return out + _grads(ours, dict(ref.named_parameters()), dtype)


def torch_layernorm(dtype: str) -> list:
    """``nn.LayerNorm`` (functional.layernorm_*, eps 1e-5) against ``torch.nn.LayerNorm``, off-centre input."""
    import torch

    from ..nn import LayerNorm

    g = rng(3)
    ours = LayerNorm(8, dtype=dtype)
    set_params(ours, g, dtype)
    ref = torch.nn.LayerNorm(8, eps=1e-5, dtype=getattr(torch, dtype))
    _copy_into_torch(ours, ref)
    x, xt = _pair(g, (3, 4, 8), dtype, scale=3.0)  # (B, T, C)
    x += 2.0  # an offset the normalization must remove
    xt.data += 2.0
    y, yt = ours(asarray(x)), ref(xt)  # (B, T, C)
    out = [_close(y, yt, dtype, "output")]
    G = g.standard_normal(y.shape).astype(dtype)  # (B, T, C)
    dx = ours.backward(asarray(G))  # (B, T, C)
    yt.backward(torch.from_numpy(G))
    out.append(_close(dx, xt.grad, dtype, "dx"))
    return out + _grads(ours, dict(ref.named_parameters()), dtype)


def torch_gelu(dtype: str) -> list:
    """``nn.GELU`` (tanh approximation, GPT-2's) against ``gelu(approximate="tanh")``, tails included."""
    import torch
    import torch.nn.functional as TF

    from ..nn import GELU

    g = rng(4)
    x, xt = _pair(g, (5, 40), dtype, scale=3.0)  # (5, 40)
    ours = GELU()
    y, yt = ours(asarray(x)), TF.gelu(xt, approximate="tanh")  # (5, 40)
    out = [_close(y, yt, dtype, "output")]
    G = g.standard_normal(y.shape).astype(dtype)  # (5, 40)
    dx = ours.backward(asarray(G))  # (5, 40)
    yt.backward(torch.from_numpy(G))
    return out + [_close(dx, xt.grad, dtype, "dx")]


def torch_softmax(dtype: str) -> list:
    """``functional.softmax_*`` against ``torch.softmax`` over the last axis."""
    import torch

    g = rng(5)
    x, xt = _pair(g, (3, 4, 6), dtype, scale=4.0)  # (3, 4, 6)
    y, cache = F.softmax_forward(asarray(x))  # (3, 4, 6)
    yt = torch.softmax(xt, dim=-1)  # (3, 4, 6)
    out = [_close(y, yt, dtype, "output")]
    G = g.standard_normal(y.shape).astype(dtype)  # (3, 4, 6)
    yt.backward(torch.from_numpy(G))
    return out + [_close(F.softmax_backward(asarray(G), cache), xt.grad, dtype, "dx")]


def torch_dropout(dtype: str) -> list:
    """``nn.Dropout`` (inverted dropout) with torch's own mask against ``torch.nn.functional.dropout``."""
    import torch
    import torch.nn.functional as TF

    from ..nn import Dropout

    g = rng(6)
    p = 0.3
    x, xt = _pair(g, (4, 50), dtype)  # (4, 50)
    torch.manual_seed(0)
    yt = TF.dropout(xt, p=p, training=True)  # (4, 50)
    mask = _host_array(yt) != 0  # (4, 50) torch's mask (x has no exact zeros)
    require(0.5 < float(mask.mean()) < 0.9, f"torch kept {float(mask.mean()):.2f} of the entries at p = {p}")
    ours = Dropout(p)
    y = ours(asarray(x), mask=asarray(mask))  # (4, 50)
    out = [_close(y, yt, dtype, "output")]
    G = g.standard_normal(y.shape).astype(dtype)  # (4, 50)
    yt.backward(torch.from_numpy(G))
    return out + [_close(ours.backward(asarray(G)), xt.grad, dtype, "dx")]


def torch_cross_entropy(dtype: str) -> list:
    """``functional.cross_entropy`` (mean over scored positions, ignore_index -100) against torch's."""
    import torch
    import torch.nn.functional as TF

    g = rng(7)
    V = 9
    logits, lt = _pair(g, (2, 5, V), dtype, scale=3.0)  # (2, 5, V)
    targets = g.integers(0, V, size=(2, 5))  # (2, 5)
    targets[0, 1] = targets[1, 4] = targets[1, 0] = -100  # ignored positions
    loss, dlogits = F.cross_entropy(asarray(logits), asarray(targets))  # (), (2, 5, V)
    lt_loss = TF.cross_entropy(lt.view(-1, V), torch.from_numpy(targets).view(-1), ignore_index=-100)
    lt_loss.backward()
    return [_close(loss, lt_loss, dtype, "loss"), _close(dlogits, lt.grad, dtype, "dlogits")]


# torch references of the composite modules, reading the parameters under our names
def _t_linear(x, P, pre):
    import torch.nn.functional as TF

    return TF.linear(x, P[pre + "weight"], P.get(pre + "bias"))


def _t_layernorm(x, P, pre):
    import torch.nn.functional as TF

    return TF.layer_norm(x, (x.shape[-1],), P[pre + "weight"], P[pre + "bias"], eps=1e-5)


def _t_attention(x, P, pre, n_head):
    import torch.nn.functional as TF

    B, T, C = x.shape
    hs = C // n_head

    def heads(a):
        return a.view(B, T, n_head, hs).transpose(1, 2)  # (B, T, C) -> (B, H, T, hs)

    q, k, v = (heads(_t_linear(x, P, pre + n + ".")) for n in "qkv")
    y = TF.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hs)
    return _t_linear(y.transpose(1, 2).reshape(B, T, C), P, pre + "o.")  # (B, T, C)


def _t_mlp(x, P, pre):
    import torch.nn.functional as TF

    return _t_linear(TF.gelu(_t_linear(x, P, pre + "fc."), approximate="tanh"), P, pre + "proj.")


def _t_block(x, P, pre, n_head):
    x = x + _t_attention(_t_layernorm(x, P, pre + "ln_1."), P, pre + "attn.", n_head)  # (B, T, C)
    return x + _t_mlp(_t_layernorm(x, P, pre + "ln_2."), P, pre + "mlp.")  # (B, T, C)


def _module_config():
    from ..model import GPTConfig

    return GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=4, n_embd=16)


def torch_module(name: str, dtype: str) -> list:
    """``CausalSelfAttention``, ``MLP`` or ``Block`` against the same module in torch functions."""
    import torch

    from ..model import MLP, Block, CausalSelfAttention

    cfg = _module_config()
    modules = {"attention": (CausalSelfAttention, 8, lambda x, P: _t_attention(x, P, "", cfg.n_head)),
               "mlp": (MLP, 9, lambda x, P: _t_mlp(x, P, "")),
               "block": (Block, 10, lambda x, P: _t_block(x, P, "", cfg.n_head))}
    if name not in modules:
        raise ValueError(f"unknown module {name!r}; modules: {sorted(modules)}")
    cls, seed, ref_fn = modules[name]
    g = rng(seed)
    ours = cls(cfg, dtype=dtype)
    set_params(ours, g, dtype)
    P = _torch_params(ours)
    x, xt = _pair(g, (2, 7, cfg.n_embd), dtype)  # (B, T, C)
    y, yt = ours(asarray(x)), ref_fn(xt, P)  # (B, T, C)
    out = [_close(y, yt, dtype, "output")]
    G = g.standard_normal(y.shape).astype(dtype)  # (B, T, C)
    ours.zero_grad()
    dx = ours.backward(asarray(G))  # (B, T, C)
    yt.backward(torch.from_numpy(G))
    out.append(_close(dx, xt.grad, dtype, "dx"))
    return out + _grads(ours, P, dtype)


# ============================================================================ central differences
def _host64(g, *shape, scale=1.0):
    """Float64 normal test data made on the host, moved to the default backend."""
    return asarray(g.standard_normal(shape) * scale)  # shape


def gradcheck_pair(fwd, bwd, inputs: dict, seed: int = 0, h: float = 1e-6) -> list:
    """A forward/backward pair against central differences; ``fwd()`` -> (y, cache), ``bwd(G, cache)`` -> dict.

    A zero or missing analytic gradient is a Mismatch (it would make the comparison vacuous).
    """
    state = {}

    def forward():
        y, state["cache"] = fwd()
        return y

    def backward(G):
        grads = bwd(G, state["cache"])
        for name, grad in grads.items():
            require(grad is not None and _norm(grad) > 0, f"{name}: gradient is zero/None")
        return grads

    errors = check_gradients(forward, backward, inputs, seed=seed, h=h)
    require(set(errors) == set(inputs), f"gradients for {sorted(errors)}, inputs {sorted(inputs)}")
    return [Measurement(f"d/d{name}", e, GRADCHECK_TOL) for name, e in errors.items()]


# The seed of each pair's test data, shared with the tests that call these functions
# (tests/test_functional_gradcheck.py, test_qalora.py); attention's is 17 + n_head.
FUNCTIONAL_SEEDS = {"linear": 10, "embedding": 12, "layernorm": 13, "gelu": 14, "dropout": 15, "softmax": 16,
                    "attention": 17, "cross_entropy": 20, "lowrank": 18, "group_mean": 3}
FUNCTIONAL = tuple(FUNCTIONAL_SEEDS)


def gradcheck_functional(name: str, *, bias: bool = True, n_head: int = 2, shape: tuple = (2, 4)) -> list:
    """One pair of ``functional`` against float64 central differences.

    ``bias``: linear's (without it, the backward must return no db); ``n_head``: attention's heads;
    ``shape``: cross-entropy's leading shape (before the vocabulary axis). A gradient that must be
    exactly zero (an unused embedding row, an ignored position) is a Mismatch when it is not.
    """
    if name not in FUNCTIONAL_SEEDS:
        raise ValueError(f"unknown functional pair {name!r}; pairs: {list(FUNCTIONAL)}")
    g = rng(FUNCTIONAL_SEEDS[name] + (n_head if name == "attention" else 0))
    if name == "linear":
        x, W = _host64(g, 2, 3, 4), _host64(g, 5, 4)  # (B, T, in), (out, in)
        b = _host64(g, 5) if bias else None  # (out,)
        inputs = {"x": x, "W": W, **({"b": b} if bias else {})}

        def bwd(G, cache):
            dx, dW, db = F.linear_backward(G, cache)
            require((db is None) == (not bias), f"db is {'None' if db is None else 'an array'} with bias={bias}")
            return {"x": dx, "W": dW, **({"b": db} if bias else {})}

        return gradcheck_pair(lambda: F.linear_forward(x, W, b), bwd, inputs)
    if name == "embedding":
        ids = asarray([[1, 3, 1, 1], [0, 3, 4, 1]])  # (B, T); id 1 four times, 3 twice; 2 and 5 unused
        W = _host64(g, 6, 3)  # (V, C)

        def bwd(G, cache):
            dW = F.embedding_backward(G, cache)  # (V, C)
            require(not to_numpy(dW)[[2, 5]].any(), "rows of unused ids must get exactly zero gradient")
            return {"W": dW}

        return gradcheck_pair(lambda: F.embedding_forward(ids, W), bwd, {"W": W})
    if name == "layernorm":
        x = _host64(g, 2, 3, 6, scale=2.0) + 0.5  # (B, T, C), not centred
        gamma, beta = 1.0 + _host64(g, 6, scale=0.3), _host64(g, 6)  # (C,), (C,)

        def bwd(G, cache):
            dx, dg, db = F.layernorm_backward(G, cache)
            return {"x": dx, "gamma": dg, "beta": db}

        return gradcheck_pair(lambda: F.layernorm_forward(x, gamma, beta), bwd, {"x": x, "gamma": gamma, "beta": beta})
    if name == "gelu":
        x = _host64(g, 3, 7, scale=2.5)  # (3, 7): the tails and the bend near 0
        return gradcheck_pair(lambda: F.gelu_forward(x), lambda G, c: {"x": F.gelu_backward(G, c)}, {"x": x})
    if name == "dropout":
        x = _host64(g, 4, 5)  # (4, 5)
        mask = asarray(g.random((4, 5)) >= 0.4)  # (4, 5) fixed mask
        return gradcheck_pair(lambda: F.dropout_forward(x, 0.4, mask=mask),
                              lambda G, c: {"x": F.dropout_backward(G, c)}, {"x": x})
    if name == "softmax":
        x = _host64(g, 2, 3, 5, scale=2.0)  # (2, 3, N)
        return gradcheck_pair(lambda: F.softmax_forward(x), lambda G, c: {"x": F.softmax_backward(G, c)}, {"x": x})
    if name == "attention":
        q, k, v = (_host64(g, 2, 4, 6) for _ in range(3))  # 3 x (B, T, C)

        def bwd(G, cache):
            dq, dk, dv = F.causal_attention_backward(G, cache)
            return {"q": dq, "k": dk, "v": dv}

        return gradcheck_pair(lambda: F.causal_attention_forward(q, k, v, n_head), bwd, {"q": q, "k": k, "v": v})
    if name == "cross_entropy":
        V = 6
        logits = _host64(g, *shape, V, scale=2.0)  # (..., V)
        tg = g.integers(0, V, size=shape)  # (...)
        tg.reshape(-1)[[1, 4]] = F.IGNORE_INDEX  # two ignored positions
        targets = asarray(tg)  # (...)
        loss, dlogits = F.cross_entropy(logits, targets)  # (), (..., V)
        require(not to_numpy(dlogits).reshape(-1, V)[[1, 4]].any(), "ignored positions must get exactly zero gradient")
        numeric = numerical_gradient(lambda: F.cross_entropy(logits, targets)[0], logits)  # (..., V)
        return [Measurement("d/dlogits", rel_error(dlogits, numeric), GRADCHECK_TOL)]
    if name == "lowrank":
        xa, A, B = _host64(g, 2, 3, 6), _host64(g, 2, 6), _host64(g, 5, 2)  # (..., k), (r, k), (d, r)

        def bwd(G, cache):
            dxa, dA, dB = F.lowrank_backward(G, cache)
            return {"xa": dxa, "A": dA, "B": dB}

        return gradcheck_pair(lambda: F.lowrank_forward(xa, A, B, 1.5), bwd, {"xa": xa, "A": A, "B": B})
    x = _host64(g, 2, 3, 12)  # (..., in) for the group mean, group size 4
    return gradcheck_pair(lambda: F.group_mean_forward(x, 4), lambda G, c: {"x": F.group_mean_backward(G, c)},
                          {"x": x})


def randomize_params(module, g, scale: float = 0.4) -> None:
    """Non-trivial float64 values for every parameter, in place (the checker perturbs these very arrays):
    normal * ``scale``, layer-norm gains near 1."""
    from ..nn import LayerNorm

    for name, p in module.named_parameters():
        noise = g.standard_normal(p.shape) * scale  # shape of p
        parts = name.split(".")
        if parts[-1] == "weight" and (len(parts) == 1 and isinstance(module, LayerNorm)
                                      or len(parts) > 1 and parts[-2].startswith("ln")):
            noise += 1.0  # layer-norm gains near 1
        p.data[...] = asarray(noise)  # shape of p, in place


def key_biases(names) -> set:
    """The key biases among ``names``: q.(k + b) = q.k + q.b shifts a whole softmax row by one constant,
    so their exact gradient is 0."""
    return {n for n in names if _is_key_bias(n)}


def exactly_zero(loss_fn, module, names) -> list:
    """Gradients that are 0 in exact arithmetic, measured absolutely against the largest gradient of
    ``module`` (which holds the backward's gradients for the upstream gradient of ``loss_fn``): the
    backward's (bound 1e-12, ~1e-16 measured) and central differences of ``loss_fn`` (bound 1e-8, ~1e-10)."""
    params = dict(module.named_parameters())
    for n, p in params.items():
        require(p.grad is not None, f"{n} got no gradient")
    scale = max(_norm(p.grad) for p in params.values())
    require(scale > 0, "every gradient is zero")
    out = []
    for n in sorted(names):
        numeric = numerical_gradient(loss_fn, params[n].data)  # shape of the parameter
        out.append(Measurement(f"d/d{n} (backward, exactly 0)", float(abs(to_numpy(params[n].grad)).max()) / scale,
                               1e-12))
        out.append(Measurement(f"d/d{n} (differences, exactly 0)", float(abs(to_numpy(numeric)).max()) / scale,
                               1e-8))
    return out


GPT_CHECK_CONFIG = {"vocab_size": 11, "block_size": 5, "n_layer": 1, "n_head": 2, "n_embd": 8}


def gradcheck_gpt(output: str = "logits") -> list:
    """A whole tiny float64 GPT against central differences, every parameter by name.

    ``output``: "logits" (seed 40, the scalar sum(logits * G)) or "loss" (seed 41, the mean
    cross-entropy with two ignored positions; h = 1e-5: a loss of order 1 with small gradients, so
    the rounding error eps |L| / h stays well down). The key biases get an exactly zero gradient (a
    constant shift of each softmax row): measured absolutely against the largest gradient, both sides.
    """
    from ..model import GPT, GPTConfig

    if output not in ("logits", "loss"):
        raise ValueError(f"output must be 'logits' or 'loss', got {output!r}")
    seed, h = (40, 1e-6) if output == "logits" else (41, 1e-5)
    model = GPT(GPTConfig(**GPT_CHECK_CONFIG), seed=seed, dtype="float64")
    randomize_params(model, rng(seed))
    ids = asarray([[3, 10, 3, 0, 7], [1, 3, 9, 9, 2]])  # (B, T); repeats exercise the scatter-add
    if output == "logits":
        def fwd():
            return model(ids), None  # (B, T, V)

        def dlogits(G, _):
            return G  # G is d(sum(logits * G))/d(logits)
    else:
        targets = asarray([[10, 3, 0, F.IGNORE_INDEX, 2], [3, 9, F.IGNORE_INDEX, 2, 5]])  # (B, T)

        def fwd():
            return F.cross_entropy(model(ids), targets)  # (), (B, T, V)

        def dlogits(G, d):
            return d * G  # G is a 0-d upstream gradient

    params = dict(model.named_parameters())
    zero = key_biases(params)

    def bwd(G, cache):
        model.zero_grad()
        model.backward(dlogits(G, cache))
        return {n: p.grad for n, p in params.items() if n not in zero}

    out = gradcheck_pair(fwd, bwd, {n: p.data for n, p in params.items() if n not in zero}, h=h)
    y, cache = fwd()
    G = asarray(rng(5).standard_normal(y.shape))  # shape of the output
    model.zero_grad()
    model.backward(dlogits(G, cache))
    return out + exactly_zero(lambda: (fwd()[0] * G).sum(), model, zero)


def adapter_gradients(layer, x, **forward_kwargs) -> list:
    """An adapted layer (LoRA, QLoRA, QA-LoRA) against central differences: dx, dA, dB (float64).

    ``gradcheck_pair``'s comparison, so a zero gradient is a Mismatch: with B = 0, dA = 0 on both
    sides and the check would pass without checking anything (give B values first).
    """

    def bwd(G, _):
        layer.lora_A.grad = layer.lora_B.grad = None
        dx = layer.backward(G)
        return {"x": dx, "A": layer.lora_A.grad, "B": layer.lora_B.grad}

    return gradcheck_pair(lambda: (layer(x, **forward_kwargs), None), bwd,
                          {"x": x, "A": layer.lora_A.data, "B": layer.lora_B.data})
