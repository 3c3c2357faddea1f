"""``python -m lora_from_scratch verify``: the evidence a student can read without pytest.

Every layer and model of the package is compared with the library that defines it, and the
error is printed next to the bound it must stay under:

- the GPT-2 layers (Radford et al., 2019; attention: Vaswani et al., 2017, eq. 1) against
  PyTorch autograd with the same weights: outputs and every gradient by name, float64 and
  float32; every hand-written backward against float64 central differences (``gradcheck``);
- the whole GPT against Hugging Face ``transformers``' ``GPT2LMHeadModel`` (tiny random
  configurations built in memory, nothing downloaded): logits, loss and every gradient;
- LoRA (Hu et al., 2021, section 4.1), QLoRA (Dettmers et al., 2023, section 3, eq. 5-6) and
  QA-LoRA (Xu et al., 2023, section 3.3) layers against the same layer written in torch ops;
  LoRA adapters against PEFT: one layer, PiSSA's start, files both ways, gradients, merging;
- NF4 and FP4 blockwise quantization (QLoRA, sections 2-3) against bitsandbytes, bit for bit:
  the measured error is the number of mismatching bytes (or float bit patterns), bound 0.

The test suite calls the same functions with the same bounds (``tests/test_parity_torch.py``,
``test_gpt_hf.py``, ``test_lora_peft.py``, ``test_qlora.py``, ``test_quant_blockwise.py``,
``test_verify.py``), so each comparison is written once, here. Every comparison function returns
a list of ``Measurement(what, error, bound)``; ``assert_ok`` raises if any is out of bounds.
A comparison that cannot be made as stated (a wrong dtype, different parameter names, a
reference that would make it vacuous) raises ``Mismatch``.

The reference libraries are test dependencies, imported inside the functions: the package
imports without them. Test data is made on the host (``backend.rng``) and moved to the backend
under test (``backend.asarray``), so ``--backend cupy verify`` checks the GPU code against the
CPU references. Errors are norm-wise relative, ||ours - ref|| / ||ref|| (``gradcheck.rel_error``),
unless the row says otherwise.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from typing import NamedTuple

from . import functional as F
from .backend import asarray, rng, to_numpy
from .gradcheck import check_gradients, numerical_gradient, rel_error

INSTALL = "pip install torch==2.13.0 && pip install -r requirements-dev.txt"
REFERENCES = ("torch", "transformers", "peft", "bitsandbytes")

TORCH_TOL = {"float64": 1e-10, "float32": 1e-5}  # our layer against torch autograd, same weights
GRADCHECK_TOL = 1e-7  # a backward against float64 central differences


# ============================================================================ measurements
class Measurement(NamedTuple):
    """One measured error and the bound it must stay under (``error < bound``; a count must be 0)."""

    what: str
    error: float
    bound: float

    @property
    def ok(self) -> bool:
        if self.bound == 0:
            return self.error == 0
        return self.error < self.bound  # False for NaN


class Mismatch(AssertionError):
    """The comparison could not be made as stated: a dtype, a name, a shape, or a vacuous reference."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise Mismatch(message)


def assert_ok(measurements) -> list:
    """Raise AssertionError naming every measurement out of bounds; return the measurements."""
    measurements = list(measurements)
    if not measurements:
        raise Mismatch("no measurement was made")
    bad = [m for m in measurements if not m.ok]
    if bad:
        raise AssertionError("; ".join(f"{m.what}: {m.error:.3e} not below {m.bound:g}" for m in bad))
    return measurements


def worst(measurements) -> Measurement:
    """The measurement closest to (or furthest past) its bound."""

    def ratio(m):
        if m.bound == 0:
            return math.inf if m.error != 0 else 0.0
        return math.inf if m.error != m.error else m.error / m.bound

    return max(measurements, key=ratio)


def _norm(a) -> float:
    h = to_numpy(a).astype("float64")  # any shape, float64 on the host
    return math.sqrt(float((h * h).sum()))


def _max_abs(a, b) -> float:
    d = to_numpy(a).astype("float64") - to_numpy(b).astype("float64")  # same shape, float64
    return float(abs(d).max())


def _host_array(t):
    """A torch tensor (or any array) as a host array."""
    if hasattr(t, "detach"):
        return t.detach().cpu().numpy()
    return to_numpy(t)


def _rel(what: str, ours, ref, bound: float) -> Measurement:
    return Measurement(what, rel_error(ours, _host_array(ref)), bound)


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
    from .nn import LayerNorm

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

    from .nn import Linear

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

    from .nn import Embedding

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

    from .nn import LayerNorm

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

    from .nn import GELU

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

    from .nn import Dropout

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
    from .model import GPTConfig

    return GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=4, n_embd=16)


def torch_module(name: str, dtype: str) -> list:
    """``CausalSelfAttention``, ``MLP`` or ``Block`` against the same module in torch functions."""
    import torch

    from .model import MLP, Block, CausalSelfAttention

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


def gradcheck_functional(name: str) -> list:
    """One pair of ``functional`` against float64 central differences."""
    g = rng(10 + FUNCTIONAL.index(name)) if name in FUNCTIONAL else None
    if g is None:
        raise ValueError(f"unknown functional pair {name!r}; pairs: {list(FUNCTIONAL)}")
    if name == "linear":
        x, W, b = _host64(g, 2, 3, 4), _host64(g, 5, 4), _host64(g, 5)  # (B, T, in), (out, in), (out,)

        def bwd(G, cache):
            dx, dW, db = F.linear_backward(G, cache)
            return {"x": dx, "W": dW, "b": db}

        return gradcheck_pair(lambda: F.linear_forward(x, W, b), bwd, {"x": x, "W": W, "b": b})
    if name == "embedding":
        ids = asarray([[1, 3, 1, 1], [0, 3, 4, 1]])  # (B, T); repeated ids, 2 and 5 unused
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

        return gradcheck_pair(lambda: F.causal_attention_forward(q, k, v, 2), bwd, {"q": q, "k": k, "v": v})
    if name == "cross_entropy":
        logits = _host64(g, 2, 4, 6, scale=2.0)  # (B, T, V)
        tg = g.integers(0, 6, size=(2, 4))  # (B, T)
        tg.reshape(-1)[[1, 4]] = F.IGNORE_INDEX  # two ignored positions
        targets = asarray(tg)  # (B, T)
        loss, dlogits = F.cross_entropy(logits, targets)  # (), (B, T, V)
        numeric = numerical_gradient(lambda: F.cross_entropy(logits, targets)[0], logits)  # (B, T, V)
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


FUNCTIONAL = ("linear", "embedding", "layernorm", "gelu", "dropout", "softmax", "attention", "cross_entropy",
              "lowrank", "group_mean")


def gradcheck_gpt() -> list:
    """A whole tiny float64 GPT's logits against central differences, every parameter by name.

    The key biases get an exactly zero gradient (a constant shift of each softmax row): measured
    absolutely against the largest gradient, both sides.
    """
    from .model import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=11, block_size=5, n_layer=1, n_head=2, n_embd=8)
    g = rng(40)
    model = GPT(cfg, seed=40, dtype="float64")
    for name, p in model.named_parameters():
        noise = g.standard_normal(p.shape) * 0.4  # shape of p
        if name.endswith("weight") and name.split(".")[-2].startswith("ln"):
            noise += 1.0  # layer-norm gains near 1
        p.data[...] = asarray(noise)  # shape of p, in place
    ids = asarray([[3, 10, 3, 0, 7], [1, 3, 9, 9, 2]])  # (B, T); repeats exercise the scatter-add
    params = dict(model.named_parameters())
    zero = {n for n in params if _is_key_bias(n)}

    def bwd(G, _):
        model.zero_grad()
        model.backward(G)
        return {n: p.grad for n, p in params.items() if n not in zero}

    out = gradcheck_pair(lambda: (model(ids), None), bwd, {n: p.data for n, p in params.items() if n not in zero})
    G = asarray(g.standard_normal((2, 5, cfg.vocab_size)))  # (B, T, V)
    model.zero_grad()
    model.backward(G)
    scale = max(_norm(p.grad) for p in params.values())
    for n in sorted(zero):
        numeric = numerical_gradient(lambda: (model(ids) * G).sum(), params[n].data)  # (C,)
        out.append(Measurement(f"d/d{n} (backward, exactly 0)", float(abs(to_numpy(params[n].grad)).max()) / scale,
                               1e-12))
        out.append(Measurement(f"d/d{n} (differences, exactly 0)", float(abs(to_numpy(numeric)).max()) / scale,
                               1e-8))
    return out


def adapter_gradients(layer, x, **forward_kwargs) -> list:
    """An adapted layer (LoRA, QLoRA, QA-LoRA) against central differences: dx, dA, dB (float64)."""

    def forward():
        return layer(x, **forward_kwargs)

    def backward(G):
        layer.lora_A.grad = layer.lora_B.grad = None
        dx = layer.backward(G)
        return {"x": dx, "A": layer.lora_A.grad, "B": layer.lora_B.grad}

    errors = check_gradients(forward, backward, {"x": x, "A": layer.lora_A.data, "B": layer.lora_B.data})
    return [Measurement(f"d/d{name}", e, GRADCHECK_TOL) for name, e in errors.items()]


# ============================================================================ adapter layers against torch
def make_adapter_layer(kind: str, dtype: str = "float64", seed: int = 0, dropout: float = 0.0, bits: int = 4,
                       use_rslora: bool = False):
    """A small adapted layer of ``kind`` over a random Linear with a random bias, B random (as after
    training), an input and (with dropout) a fixed mask: ``(layer, x, mask)``."""
    from .lora import LoRALinear
    from .nn import Linear
    from .qalora import QALoRALinear
    from .qlora import QLoRALinear

    g = rng(seed)
    in_f, out_f, r = {"lora": (7, 5, 3), "qlora": (42, 24, 3), "qalora": (12, 5, 2)}[kind]
    base = Linear(in_f, out_f, rng=g, dtype=dtype)
    base.bias.data = asarray(g.standard_normal(out_f), dtype=dtype)  # (out,)
    if kind == "lora":
        layer = LoRALinear(base, r, 6.0, dropout=dropout, use_rslora=use_rslora, rng=g)
    elif kind == "qlora":
        layer = QLoRALinear(base, r, 6.0, dropout=dropout, use_rslora=use_rslora, rng=g)
    else:
        layer = QALoRALinear(base, r, 6.0, bits=bits, group_size=4, dropout=dropout, use_rslora=use_rslora, rng=g)
    layer.lora_B.data = asarray(g.standard_normal((out_f, r)) * 0.5, dtype=dtype)  # (out, r)
    x = asarray(g.standard_normal((2, 3, in_f)), dtype=dtype)  # (2, 3, in)
    mask = asarray(g.random((2, 3, in_f)) >= dropout) if dropout > 0 else None  # (2, 3, in) fixed mask
    return layer, x, mask


def _torch_weight(layer, td):
    """The frozen W0 (out, in) as torch computes with it: the float weight, the NF4 values (our
    dequantization, float32, then cast), or the group-wise codes dequantized by torch itself."""
    import torch

    base = layer.base
    if hasattr(base, "codes"):  # group-wise INT-N: (q - zero) * scale, groups of group_size channels
        gs = layer.group_size
        codes = torch.tensor(to_numpy(base.codes.data).astype("int64"))  # (out, in)
        scales = torch.tensor(to_numpy(base.scales.data), dtype=td)  # (out, L)
        zeros = torch.tensor(to_numpy(base.zeros.data), dtype=td)  # (out, L)
        return (codes.to(td) - zeros.repeat_interleave(gs, dim=1)) * scales.repeat_interleave(gs, dim=1)  # (out, in)
    if hasattr(base, "dequantized_weight"):  # NF4
        return torch.tensor(to_numpy(base.dequantized_weight()), dtype=td)  # (out, in)
    return torch.tensor(to_numpy(base.weight.data), dtype=td)  # (out, in)


def adapter_vs_torch(layer, x, G, dtype: str, mask=None) -> list:
    """An adapted layer's output and dx, dA, dB against the same layer in torch ops (autograd).

    LoRA / QLoRA: y = x W0^T + b + s (dropout(x) A^T) B^T; QA-LoRA: the adapter sees
    ``avg_pool1d`` of x over groups of ``group_size`` channels.
    """
    import torch

    td = getattr(torch, dtype)
    W = _torch_weight(layer, td)  # (out, in)
    b = torch.tensor(to_numpy(layer.base.bias.data), dtype=td)  # (out,)
    A = torch.tensor(to_numpy(layer.lora_A.data), dtype=td, requires_grad=True)  # (r, k')
    B = torch.tensor(to_numpy(layer.lora_B.data), dtype=td, requires_grad=True)  # (out, r)
    tx = torch.tensor(to_numpy(x), dtype=td, requires_grad=True)  # (..., in)
    xd = tx
    if mask is not None:
        xd = tx * torch.tensor(to_numpy(mask), dtype=td) / (1.0 - layer.dropout.p)  # (..., in)
    if hasattr(layer, "group_size") and hasattr(layer.base, "codes"):
        lead = xd.shape[:-1]
        xd = torch.nn.functional.avg_pool1d(xd.reshape(-1, 1, xd.shape[-1]), layer.group_size).reshape(
            *lead, -1)  # (..., in) -> (N, 1, in) -> (N, 1, L) -> (..., L)
    ty = tx @ W.T + b + layer.scaling * (xd @ A.T) @ B.T  # (..., out)
    ty.backward(torch.tensor(to_numpy(G), dtype=td))
    y = layer(x, dropout_mask=mask) if mask is not None else layer(x)  # (..., out)
    dx = layer.backward(G)  # (..., in)
    return [_close(y, ty, dtype, "output"), _close(dx, tx.grad, dtype, "dx"),
            _close(layer.lora_A.grad, A.grad, dtype, "dA"), _close(layer.lora_B.grad, B.grad, dtype, "dB")]


def adapter_layer_vs_torch(kind: str, dtype: str, dropout: float = 0.0, bits: int = 4,
                           use_rslora: bool = False) -> list:
    layer, x, mask = make_adapter_layer(kind, dtype, seed=bits, dropout=dropout, bits=bits, use_rslora=use_rslora)
    G = asarray(rng(5).standard_normal((*x.shape[:-1], layer.out_features)), dtype=dtype)  # (2, 3, out)
    return adapter_vs_torch(layer, x, G, dtype, mask=mask)


def adapter_layer_gradients(kind: str, dropout: float = 0.0, bits: int = 4) -> list:
    layer, x, mask = make_adapter_layer(kind, "float64", dropout=dropout, bits=bits)
    return adapter_gradients(layer, x, **({"dropout_mask": mask} if mask is not None else {}))


# ============================================================================ transformers' GPT-2
HF_CONFIGS = (
    dict(n_layer=2, n_head=4, n_embd=32, vocab_size=50, n_positions=16),
    dict(n_layer=3, n_head=2, n_embd=24, vocab_size=37, n_positions=12),
)


def hf_model(cfg: dict, seed: int, attn: str = "eager"):
    """A ``GPT2LMHeadModel`` with every parameter randomized (float32, dropout off), built in memory."""
    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    config = GPT2Config(**cfg, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, layer_norm_epsilon=1e-5,
                        activation_function="gelu_new")
    config._attn_implementation = attn
    torch.manual_seed(seed)
    m = GPT2LMHeadModel(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            r = torch.randn(p.shape, generator=gen)  # shape of p
            if p.ndim == 2:
                fan_in = p.shape[1] if name.endswith(("wte.weight", "wpe.weight")) else p.shape[0]
                p.copy_(r / fan_in**0.5)  # Conv1D weights are (in, out); embeddings are (rows, C)
            elif ".ln_" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * r)
            else:
                p.copy_(0.2 * r)
    return m


def hf_state(m) -> dict:
    """A torch model's state dict as host arrays."""
    return {k: v.detach().cpu().numpy().copy() for k, v in m.state_dict().items()}


def hf_batch(cfg: dict, seed: int, B: int = 3):
    """Token ids over the full context and labels with a few ignored (-100) positions: (B, T) each."""
    g = rng(seed)
    T = cfg["n_positions"]
    ids = g.integers(0, cfg["vocab_size"], size=(B, T))  # (B, T)
    ids[0, :3] = cfg["vocab_size"] - 1  # the last row of wte and repeated ids
    labels = ids.copy()  # (B, T)
    labels[0, 2] = labels[1, 5] = labels[2, T - 1] = -100
    return ids, labels


def our_lm_loss(model, ids, labels):
    """The LM loss as transformers computes it (logits at t predict the label at t + 1): logits, loss, dlogits."""
    logits = model(asarray(ids))  # (B, T, V)
    loss, dl = F.cross_entropy(logits[:, :-1], asarray(labels[:, 1:]))  # (), (B, T-1, V)
    dlogits = logits * 0  # (B, T, V); the last position predicts nothing
    dlogits[:, :-1] = dl
    return logits, loss, dlogits


def _torch_lm_loss(m, ids, labels):
    """transformers' logits and the shifted LM loss in the model's own dtype (its ``labels=`` loss
    upcasts to float32, so the float64 checks apply torch's cross_entropy themselves)."""
    import torch

    logits = m(torch.from_numpy(ids)).logits  # (B, T, V)
    V = logits.shape[-1]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V),  # (B (T-1), V)
                                             torch.from_numpy(labels[:, 1:]).reshape(-1), ignore_index=-100)  # ()
    return logits, loss


def _hf_grads_by_our_name(m, n_layer: int, C: int) -> dict:
    """transformers' gradients renamed and reshaped to ours (Conv1D (in, out) -> (out, in), c_attn split)."""
    g = {k: p.grad.detach().numpy() for k, p in m.named_parameters()}
    out = {"wte.weight": g["transformer.wte.weight"], "wpe.weight": g["transformer.wpe.weight"],
           "ln_f.weight": g["transformer.ln_f.weight"], "ln_f.bias": g["transformer.ln_f.bias"]}
    for i in range(n_layer):
        h, b = f"transformer.h.{i}.", f"blocks.{i}."
        for ln in ("ln_1", "ln_2"):
            out[b + ln + ".weight"] = g[h + ln + ".weight"]
            out[b + ln + ".bias"] = g[h + ln + ".bias"]
        for j, n in enumerate("qkv"):
            out[b + f"attn.{n}.weight"] = g[h + "attn.c_attn.weight"][:, j * C:(j + 1) * C].T  # (C, C)
            out[b + f"attn.{n}.bias"] = g[h + "attn.c_attn.bias"][j * C:(j + 1) * C]  # (C,)
        for ours, theirs in (("attn.o", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            out[b + ours + ".weight"] = g[h + theirs + ".weight"].T  # (out, in)
            out[b + ours + ".bias"] = g[h + theirs + ".bias"]  # (out,)
    return out


def hf_gpt_float32(cfg: dict, attn: str = "eager") -> list:
    """Our GPT holding a GPT2LMHeadModel's weights: float32 logits (max abs diff) and the LM loss."""
    import torch

    from .io import load_hf_gpt2

    m = hf_model(cfg, seed=1, attn=attn)
    model = load_hf_gpt2(hf_state(m), cfg["n_head"])
    ids, labels = hf_batch(cfg, seed=2)
    with torch.no_grad():
        out = m(torch.from_numpy(ids), labels=torch.from_numpy(labels))
    logits, loss, _ = our_lm_loss(model, ids, labels)
    require(str(to_numpy(logits).dtype) == "float32", f"logits dtype {to_numpy(logits).dtype}, expected float32")
    ref = out.logits.numpy()  # (B, T, V)
    require(float(abs(ref).max()) > 1.0, "the reference logits are near zero: the comparison would be vacuous")
    return [Measurement("logits (max abs diff)", _max_abs(logits, ref), 1e-4),
            _rel("loss", loss, out.loss, 1e-5)]


def hf_gpt_float64(cfg: dict) -> list:
    """float64: logits, the loss and every parameter's gradient by name against transformers' autograd."""
    from .io import load_hf_gpt2

    m = hf_model(cfg, seed=3)
    model = load_hf_gpt2(hf_state(m), cfg["n_head"]).astype("float64")  # same values, cast exactly
    m = m.double()
    ids, labels = hf_batch(cfg, seed=4)
    ref_logits, ref_loss = _torch_lm_loss(m, ids, labels)
    ref_loss.backward()
    logits, loss, dlogits = our_lm_loss(model, ids, labels)
    require(str(to_numpy(logits).dtype) == "float64", f"logits dtype {to_numpy(logits).dtype}, expected float64")
    out = [_rel("logits", logits, ref_logits, 1e-12), _rel("loss", loss, ref_loss, 1e-12)]
    model.zero_grad()
    model.backward(dlogits)
    ref = _hf_grads_by_our_name(m, cfg["n_layer"], cfg["n_embd"])
    params = dict(model.named_parameters())
    require(set(params) == set(ref), f"parameter names differ: {sorted(set(params) ^ set(ref))}")
    for name, p in params.items():
        if _is_key_bias(name):  # exactly 0: q.(k + b) shifts a softmax row by a constant
            scale = _norm(ref[name.replace("bias", "weight")])
            out.append(Measurement(f"grad {name} (ours) / grad of its weight, exactly 0", _norm(p.grad) / scale, 1e-12))
            out.append(Measurement(f"grad {name} (transformers) / grad of its weight, exactly 0",
                                   _norm(ref[name]) / scale, 1e-12))
        else:
            out.append(_rel(f"grad {name}", p.grad, ref[name], 1e-8))
    return out


def hf_tied_head(cfg: dict) -> list:
    """wte's gradient has both parts, the lookup and the tied head (dlogits^T @ ln_f output), as transformers'."""
    import torch

    from .io import load_hf_gpt2

    m = hf_model(cfg, seed=5).double()
    model = load_hf_gpt2(hf_state(m), cfg["n_head"], dtype="float64")
    ids, labels = hf_batch(cfg, seed=6)
    logits, loss = _torch_lm_loss(m, ids, labels)
    hidden = m.transformer(torch.from_numpy(ids)).last_hidden_state  # (B, T, C), after ln_f
    dlogits_t = torch.autograd.grad(loss, logits, retain_graph=True)[0]  # (B, T, V)
    V = logits.shape[-1]
    head_part = (dlogits_t.reshape(-1, V).T @ hidden.reshape(-1, hidden.shape[-1])).detach().numpy()  # (V, C)
    full = torch.autograd.grad(loss, m.transformer.wte.weight)[0].numpy()  # (V, C), both uses of wte
    require(rel_error(head_part, full) > 1e-2, "the lookup part of wte's gradient is negligible: vacuous check")
    _, _, dlogits = our_lm_loss(model, ids, labels)
    model.zero_grad()
    model.backward(dlogits)
    return [_rel("grad wte.weight (lookup + head)", model.wte.weight.grad, full, 1e-8)]


# ============================================================================ PEFT
PEFT_C, PEFT_HEADS, PEFT_LAYERS, PEFT_VOCAB, PEFT_POSITIONS = 32, 4, 2, 64, 32
ALL_TARGETS = ["q", "k", "v", "o", "fc", "proj"]


def peft_hf_config():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=PEFT_VOCAB, n_positions=PEFT_POSITIONS, n_embd=PEFT_C, n_layer=PEFT_LAYERS,
                      n_head=PEFT_HEADS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                      eos_token_id=0)


def peft_base_state() -> dict:
    """A random GPT-2 state dict (host arrays) with non-trivial biases and layer norms."""
    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(peft_hf_config())
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return hf_state(hf)


def peft_hf_model(sd: dict, dtype=None):
    """A ``GPT2LMHeadModel`` holding the state dict ``sd`` (float32 unless ``dtype``), eval mode."""
    import torch
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel(peft_hf_config())
    hf.load_state_dict({k: torch.tensor(v) for k, v in sd.items()}, strict=False)  # every tensor's own shape
    return hf.to(torch.float32 if dtype is None else dtype).eval()


def peft_ids(seed: int = 0, shape=(3, 12)):
    return rng(seed).integers(0, PEFT_VOCAB, shape)  # shape, host int64


def torch_logits(model, idx):
    """A torch model's logits for host ids, as a host array."""
    import torch

    with torch.no_grad():
        return model(torch.tensor(idx)).logits.numpy()


def randomize_B(model, seed: int = 1, scale: float = 0.2) -> None:
    """Non-zero B everywhere (as after training), so that the adapters really change the logits."""
    from .lora import lora_layers

    g = rng(seed)
    for layer in lora_layers(model).values():
        layer.lora_B.data = asarray(g.standard_normal(layer.lora_B.shape) * scale, dtype=layer.lora_B.dtype)  # (out, r)


def _tiny_torch_model():
    """A torch model holding one ``torch.nn.Linear(10, 6)`` named ``lin`` (what PEFT adapts)."""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(10, 6)

        def forward(self, x):
            return self.lin(x)

    return Tiny()


def peft_layer(use_rslora: bool, p: float) -> list:
    """``LoRALinear`` against ``peft.tuners.lora.Linear`` (float64, the same fixed dropout mask)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from .lora import LoRALinear
    from .nn import Linear

    class FixedDropout(torch.nn.Module):
        def __init__(self, keep):
            super().__init__()
            self.keep = keep

        def forward(self, x):
            return x * self.keep

    g = rng(0)
    base = Linear(10, 6, rng=g, dtype="float64")
    base.bias.data = asarray(g.standard_normal(6))  # (6,)
    ours = LoRALinear(base, 3, 5, dropout=p, use_rslora=use_rslora, rng=g)
    ours.lora_B.data = asarray(g.standard_normal((6, 3)))  # (6, 3)
    pm = get_peft_model(_tiny_torch_model().double(), LoraConfig(r=3, lora_alpha=5, target_modules=["lin"],
                                                    use_rslora=use_rslora, lora_dropout=p))
    layer = pm.base_model.model.lin
    require(layer.scaling["default"] == ours.scaling, f"scaling {ours.scaling} vs PEFT's {layer.scaling['default']}")
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.tensor(to_numpy(base.weight.data)))  # (6, 10)
        layer.base_layer.bias.copy_(torch.tensor(to_numpy(base.bias.data)))  # (6,)
        layer.lora_A["default"].weight.copy_(torch.tensor(to_numpy(ours.lora_A.data)))  # (3, 10)
        layer.lora_B["default"].weight.copy_(torch.tensor(to_numpy(ours.lora_B.data)))  # (6, 3)
    x = g.standard_normal((4, 5, 10))  # (4, 5, 10)
    mask = g.random(x.shape) >= p  # (4, 5, 10) fixed dropout mask
    if p > 0:
        layer.lora_dropout["default"] = FixedDropout(torch.tensor(mask / (1 - p)))  # (4, 5, 10) kept / (1 - p)
    G = g.standard_normal((4, 5, 6))  # (4, 5, 6) upstream gradient
    tx = torch.tensor(x, requires_grad=True)  # (4, 5, 10)
    ty = pm(tx)  # (4, 5, 6)
    ty.backward(torch.tensor(G))
    y = ours(asarray(x), dropout_mask=asarray(mask) if p > 0 else None)  # (4, 5, 6)
    dx = ours.backward(asarray(G))  # (4, 5, 10)
    require(layer.base_layer.weight.grad is None and ours.base.weight.grad is None, "W0 got a gradient")
    return [_rel("output", y, ty, 1e-12), _rel("dx", dx, tx.grad, 1e-12),
            _rel("dA", ours.lora_A.grad, layer.lora_A["default"].weight.grad, 1e-12),
            _rel("dB", ours.lora_B.grad, layer.lora_B["default"].weight.grad, 1e-12)]


def peft_pissa(use_rslora: bool) -> list:
    """PiSSA's start (top-r singular triplets, W0 replaced by the residual) against PEFT's (float32).

    Singular vectors are defined up to sign, so the products s B A, the residual weights and |A|
    are compared.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    from .lora import LoRALinear
    from .nn import Linear

    g = rng(1)
    W = g.standard_normal((6, 10)).astype("float32")  # (6, 10)
    base = Linear(10, 6, rng=g, dtype="float32")
    base.weight.data = asarray(W)  # (6, 10)
    ours = LoRALinear(base, 3, 5, init="pissa", use_rslora=use_rslora)
    tiny = _tiny_torch_model()
    with torch.no_grad():
        tiny.lin.weight.copy_(torch.tensor(W))  # (6, 10)
    pm = get_peft_model(tiny, LoraConfig(r=3, lora_alpha=5, target_modules=["lin"], use_rslora=use_rslora,
                                         init_lora_weights="pissa"))
    layer = pm.base_model.model.lin
    A, B = _host_array(layer.lora_A["default"].weight), _host_array(layer.lora_B["default"].weight)  # (3, 10), (6, 3)
    s = layer.scaling["default"]
    require(s == ours.scaling, f"scaling {ours.scaling} vs PEFT's {s}")
    ours_update = ours.scaling * to_numpy(ours.lora_B.data) @ to_numpy(ours.lora_A.data)  # (6, 10)
    return [Measurement("s B A", rel_error(ours_update, s * B @ A), 1e-5),
            _rel("residual W0 - s B A", ours.base.weight.data, layer.base_layer.weight, 1e-5),
            Measurement("|A|", rel_error(abs(to_numpy(ours.lora_A.data)), abs(A)), 1e-5)]


def peft_load_error(directory: str, hf_base, idx, expected) -> Measurement:
    """``PeftModel.from_pretrained(hf_base, directory)``'s logits against ours (max abs diff, float32)."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(hf_base, directory).eval()
    return Measurement("PeftModel logits (max abs diff)", _max_abs(torch_logits(pm, idx), expected), 1e-4)


def ours_to_peft(base_sd: dict, directory: str, targets, use_rslora: bool = False, init: str = "kaiming") -> list:
    """Our adapter (r 4, alpha 12) -> PEFT files -> PeftModel: the same logits; and back into our GPT, bit for bit.

    For PiSSA the base PEFT loads is our residual weights. The adapters must change the logits
    (else the check is vacuous).
    """
    from . import io
    from .lora import apply_lora, lora_layers
    from .model import GPT
    from .peft_io import load_peft_adapter, save_peft_adapter

    ours = apply_lora(io.load_hf_gpt2(base_sd, PEFT_HEADS), 4, 12, targets, init=init, use_rslora=use_rslora, seed=5)
    randomize_B(ours)
    idx = peft_ids()  # (3, 12)
    ref = to_numpy(ours(asarray(idx)))  # (3, 12, V)
    save_peft_adapter(ours, directory)
    base_hf = peft_hf_model(io.to_hf_gpt2_state_dict(ours))  # for PiSSA: the residual weights
    require(_max_abs(torch_logits(base_hf, idx), ref) > 1e-2, "the adapters do not change the logits: vacuous check")
    out = [peft_load_error(directory, base_hf, idx, ref)]
    again = load_peft_adapter(GPT(ours.config, seed=9), directory)
    again.load_state_dict({k: v for k, v in ours.state_dict().items() if ".adapters." not in k}, strict=False)
    require(sorted(lora_layers(again)) == sorted(lora_layers(ours)), "the reloaded model adapts other layers")
    require(all(lora_layers(again)[n].r == 4 for n in lora_layers(ours)), "the reloaded ranks differ")
    back = to_numpy(again(asarray(idx)))  # (3, 12, V)
    out.append(Measurement("reloaded into ours: mismatching logits", int((back != ref).sum()), 0))
    return out


def peft_saved_adapter(base_sd: dict, directory: str, use_rslora: bool = False):
    """A PEFT adapter on c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj (a rank and an alpha pattern, random A,
    non-zero B, float64) saved to ``directory`` by PEFT itself; returns the PeftModel (eval mode)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    hf = peft_hf_model(base_sd, torch.float64)
    pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"],
                                       rank_pattern={"transformer.h.1.mlp.c_fc": 2},
                                       alpha_pattern={"transformer.h.0.attn.c_proj": 3},
                                       use_rslora=use_rslora, fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn_like(p))
    pm.save_pretrained(directory)
    return pm.eval()


def peft_to_ours(pm, directory: str, base_sd: dict) -> list:
    """A PEFT-saved adapter loaded into our GPT: the logits of PeftModel (float32 on both sides)."""
    import copy

    from . import io
    from .peft_io import load_peft_adapter

    ours = load_peft_adapter(io.load_hf_gpt2(base_sd, PEFT_HEADS), directory)
    idx = peft_ids(1)  # (3, 12)
    expected = torch_logits(copy.deepcopy(pm).float(), idx)  # (3, 12, V)
    return [Measurement("logits (max abs diff)", _max_abs(ours(asarray(idx)), expected), 1e-4)]


def peft_gradients(pm, directory: str, base_sd: dict) -> list:
    """The same loss in float64: every adapter gradient of our GPT against PEFT's (fused c_attn: A's
    gradient is the sum of q's, k's and v's, since each holds a copy of A; B's rows are theirs)."""
    import torch

    from . import io
    from .lora import lora_layers
    from .peft_io import load_peft_adapter

    ours = load_peft_adapter(io.load_hf_gpt2(base_sd, PEFT_HEADS, dtype="float64"), directory)
    idx, tgt = peft_ids(2, (2, 10)), peft_ids(3, (2, 10))  # (2, 10) each
    pm.zero_grad()
    logits_t = pm(torch.tensor(idx)).logits  # (2, 10, V)
    torch.nn.functional.cross_entropy(logits_t.reshape(-1, PEFT_VOCAB), torch.tensor(tgt).reshape(-1)).backward()  # ()
    loss, dlogits = F.cross_entropy(ours(asarray(idx)), asarray(tgt))  # (), (2, 10, V)
    ours.backward(dlogits)
    layers = lora_layers(ours)
    C = PEFT_C
    out = []
    for i in range(PEFT_LAYERS):
        h = pm.base_model.model.transformer.h[i]
        grads = {n: (h.attn.c_attn.lora_A["default"].weight.grad.numpy(),
                     h.attn.c_attn.lora_B["default"].weight.grad.numpy()[j * C:(j + 1) * C])
                 for j, n in enumerate(("attn.q", "attn.k", "attn.v"))}
        for n, mod in (("attn.o", h.attn.c_proj), ("mlp.fc", h.mlp.c_fc), ("mlp.proj", h.mlp.c_proj)):
            grads[n] = (mod.lora_A["default"].weight.grad.numpy(), mod.lora_B["default"].weight.grad.numpy())
        dA_qkv = sum(to_numpy(layers[f"blocks.{i}.{n}"].lora_A.grad) for n in ("attn.q", "attn.k", "attn.v"))  # (R, C)
        out.append(Measurement(f"blocks.{i}.attn.qkv dA (summed)", rel_error(dA_qkv, grads["attn.q"][0]), 1e-10))
        for n, (dA, dB) in grads.items():
            layer = layers[f"blocks.{i}.{n}"]
            out.append(_rel(f"blocks.{i}.{n} dB", layer.lora_B.grad, dB, 1e-10))
            if n not in ("attn.q", "attn.k", "attn.v"):
                out.append(_rel(f"blocks.{i}.{n} dA", layer.lora_A.grad, dA, 1e-10))
    return out


def peft_merge(pm, directory: str, base_sd: dict) -> list:
    """Our merge (W0 + s B A, (out, in)) against PEFT's ``merge_and_unload`` (fan_in_fan_out: (B A)^T added
    to GPT-2's (in, out) Conv1D weights), float64, every tensor of the GPT-2 state dict."""
    import torch
    from peft import LoraConfig, get_peft_model

    from . import io
    from .lora import merge_lora
    from .peft_io import load_peft_adapter

    ours = merge_lora(load_peft_adapter(io.load_hf_gpt2(base_sd, PEFT_HEADS, dtype="float64"), directory))
    torch.manual_seed(0)
    config = pm.peft_config["default"]
    pm2 = get_peft_model(peft_hf_model(base_sd, torch.float64), LoraConfig(**{
        k: getattr(config, k) for k in
        ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "fan_in_fan_out")}))
    pm2.load_state_dict(pm.state_dict())
    merged = {k: v.detach().numpy() for k, v in pm2.merge_and_unload().state_dict().items()}
    return [Measurement(k, rel_error(v, merged[k]), 1e-12) for k, v in io.to_hf_gpt2_state_dict(ours).items()]


# ============================================================================ bitsandbytes
def bnb_quantize(x, quant_type: str, double_quant: bool = False, blocksize: int = 64):
    """bitsandbytes' CPU ``quantize_4bit`` / ``dequantize_4bit`` of a host float32 array:
    (packed bytes, flat; the quant state; the dequantized values in x's shape)."""
    import bitsandbytes.functional as bnbf
    import torch

    # bitsandbytes wraps part of its CPU path in torch.compile, which spends seconds compiling for
    # each new odd shape; run it eagerly (the same operations) to keep this fast.
    with torch._dynamo.config.patch(disable=True):
        packed, state = bnbf.quantize_4bit(torch.from_numpy(x), blocksize=blocksize, compress_statistics=double_quant,
                                           quant_type=quant_type)
        # the CPU path returns packed bytes of shape (ceil(n/2), 1) and, for a 1-D input, a
        # dequantized tensor of shape (1, n): compare flattened / reshaped
        dequantized = bnbf.dequantize_4bit(packed, state).numpy().reshape(x.shape)  # x's shape
    return packed.numpy().reshape(-1), state, dequantized  # (ceil(n / 2),) uint8, state, x's shape


def float_bits(a):
    """Raw float32 bit patterns (uint32): equal bits means equal to the last bit, the sign of zero included."""
    return to_numpy(a).astype("float32", order="C").view("uint32")  # same shape, uint32


def mismatching_floats(ours, ref) -> int:
    """How many float32 values differ in their bits, 0.0 and -0.0 counted as equal.

    bitsandbytes' own CPU kernels disagree on the sign of the zero that FP4 code 8 ("minus zero")
    dequantizes to: +0.0 when the length is a multiple of the block size, -0.0 otherwise.
    """
    a, b = to_numpy(ours).astype("float32"), to_numpy(ref).astype("float32")  # same shape, float32 each
    require(a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}")
    zero = a.dtype.type(0)  # a float32 zero: x + 0 turns -0.0 into +0.0 and changes nothing else
    return int((float_bits(a + zero) != float_bits(b + zero)).sum())


def bnb_4bit_mismatches(x, quant_type: str, blocksize: int = 64, dequantized: bool = True) -> list:
    """Our 4-bit quantization of the host float32 array ``x`` against bitsandbytes', bit for bit:
    mismatching packed bytes, absmax bit patterns and (``dequantized``) dequantized values."""
    from .quant import dequantize_4bit, quantize_4bit

    q = quantize_4bit(asarray(x), blocksize=blocksize, quant_type=quant_type)  # x -> packed (ceil(n / 2),), absmax
    packed_ref, state, dequantized_ref = bnb_quantize(x, quant_type, blocksize=blocksize)
    packed = to_numpy(q.packed)  # (ceil(n / 2),) uint8
    require(packed.shape == packed_ref.shape, f"packed shapes differ: {packed.shape} vs {packed_ref.shape}")
    absmax, absmax_ref = float_bits(q.absmax), float_bits(state.absmax.numpy())  # (nblocks,) uint32 each
    require(absmax.shape == absmax_ref.shape, f"absmax shapes differ: {absmax.shape} vs {absmax_ref.shape}")
    out = [Measurement("packed bytes mismatching", int((packed != packed_ref).sum()), 0),
           Measurement("absmax values mismatching", int((absmax != absmax_ref).sum()), 0)]
    if dequantized:
        back = dequantize_4bit(q)  # x's shape, float32
        require(tuple(back.shape) == tuple(x.shape) and str(back.dtype) == "float32",
                f"dequantized {tuple(back.shape)} {back.dtype}, expected {tuple(x.shape)} float32")
        out.append(Measurement("dequantized values mismatching", mismatching_floats(back, dequantized_ref), 0))
    return out


PARITY_SHAPES = ((1,), (7,), (64,), (65,), (1000,), (4097,), (5, 37), (128, 64), (33, 64), (3, 2, 64), (2, 1000))


def parity_input(shape):
    """The test input of a parity shape: N(0, 0.02^2) float32, seeded by the shape (host)."""
    return (rng(sum(shape)).standard_normal(shape) * 0.02).astype("float32")  # shape


def bnb_parity(quant_type: str) -> list:
    """Every shape of ``PARITY_SHAPES`` (odd lengths, short last blocks, 1-D to 3-D), block size 64."""
    out = []
    for shape in PARITY_SHAPES:
        out += [m._replace(what=f"{shape}: {m.what}") for m in bnb_4bit_mismatches(parity_input(shape), quant_type)]
    return out


BLOCKSIZES = (32, 128, 256, 4096)


def bnb_blocksizes() -> list:
    """NF4 at block sizes 32 to 4096 on 5000 values."""
    out = []
    for blocksize in BLOCKSIZES:
        x = rng(blocksize).standard_normal(5000).astype("float32")  # (5000,)
        out += [m._replace(what=f"blocksize {blocksize}: {m.what}") for m in bnb_4bit_mismatches(x, "nf4", blocksize)]
    return out


def bnb_double_quant_codes(quant_type: str = "nf4") -> list:
    """With double quantization the 4-bit codes still come from the float32 block constants: bit for bit."""
    from .quant import quantize_4bit

    x = rng(11).standard_normal((512, 512)).astype("float32")  # (512, 512)
    q = quantize_4bit(asarray(x), quant_type=quant_type, double_quant=True)  # (512, 512) -> packed (131072,)
    packed_ref, _, _ = bnb_quantize(x, quant_type, double_quant=True)
    return [Measurement("packed bytes mismatching", int((to_numpy(q.packed) != packed_ref).sum()), 0)]


# ============================================================================ the table
class Check(NamedTuple):
    component: str
    reference: str
    run: Callable[[], list]
    needs: tuple  # the reference libraries it imports


def _peft_checks() -> list:
    """The PEFT rows share one base state and one PEFT-saved adapter per variant (made on first use)."""
    shared = {}

    def base():
        if "sd" not in shared:
            shared["sd"] = peft_base_state()
        return shared["sd"]

    def saved(use_rslora):
        key = ("saved", use_rslora)
        if key not in shared:  # removed when the table is done (or at exit)
            shared.setdefault("tmp", tempfile.TemporaryDirectory(prefix="lfs-verify-peft-"))
            folder = os.path.join(shared["tmp"].name, f"peft-rslora-{use_rslora}")
            shared[key] = (peft_saved_adapter(base(), folder, use_rslora), folder)
        return shared[key]

    def round_trip(targets, use_rslora, init):
        with tempfile.TemporaryDirectory(prefix="lfs-verify-peft-") as folder:
            return ours_to_peft(base(), os.path.join(folder, "adapter"), targets, use_rslora, init)

    needs = ("torch", "transformers", "peft")
    rows = [Check("LoRALinear (float64)", "peft lora.Linear", lambda: peft_layer(False, 0.0), needs),
            Check("LoRALinear (rsLoRA, dropout 0.3)", "peft lora.Linear", lambda: peft_layer(True, 0.3), needs),
            Check("LoRALinear PiSSA init (float32)", "peft pissa", lambda: peft_pissa(False), needs),
            Check("LoRA adapter -> PEFT files (all six)", "PeftModel + back", lambda: round_trip(ALL_TARGETS, False,
                                                                                             "kaiming"), needs),
            Check("LoRA adapter -> PEFT files (rsLoRA, PiSSA)", "PeftModel + back",
                  lambda: round_trip(ALL_TARGETS, True, "pissa"), needs)]
    for use_rslora in (False, True):
        tag = "rsLoRA, " if use_rslora else ""
        rows += [Check(f"PEFT adapter -> ours ({tag}fused c_attn)", "PeftModel",
                       lambda u=use_rslora: peft_to_ours(*saved(u), base()), needs),
                 Check(f"adapter gradients ({tag}float64)", "PeftModel autograd",
                       lambda u=use_rslora: peft_gradients(*saved(u), base()), needs),
                 Check(f"merge_lora ({tag}float64)", "peft merge_and_unload",
                       lambda u=use_rslora: peft_merge(*saved(u), base()), needs)]
    return rows


def checks() -> list:
    """Every row of the table, in order: (component, reference, the comparison, the libraries it needs)."""
    torch_ = ("torch",)
    rows = []
    for dtype in ("float64", "float32"):
        rows += [Check(f"Linear ({dtype})", "torch.nn.Linear", lambda d=dtype: torch_linear(d, True), torch_),
                 Check(f"Linear, no bias ({dtype})", "torch.nn.Linear", lambda d=dtype: torch_linear(d, False), torch_),
                 Check(f"Embedding ({dtype})", "torch.nn.Embedding", lambda d=dtype: torch_embedding(d), torch_),
                 Check(f"LayerNorm ({dtype})", "torch.nn.LayerNorm", lambda d=dtype: torch_layernorm(d), torch_),
                 Check(f"GELU, tanh ({dtype})", "torch gelu(tanh)", lambda d=dtype: torch_gelu(d), torch_),
                 Check(f"softmax ({dtype})", "torch.softmax", lambda d=dtype: torch_softmax(d), torch_),
                 Check(f"dropout, torch's mask ({dtype})", "torch dropout", lambda d=dtype: torch_dropout(d), torch_),
                 Check(f"cross-entropy ({dtype})", "torch cross_entropy", lambda d=dtype: torch_cross_entropy(d),
                       torch_),
                 Check(f"CausalSelfAttention ({dtype})", "torch sdpa(causal)", lambda d=dtype: torch_module(
                     "attention", d), torch_),
                 Check(f"MLP ({dtype})", "torch autograd", lambda d=dtype: torch_module("mlp", d), torch_),
                 Check(f"Block ({dtype})", "torch autograd", lambda d=dtype: torch_module("block", d), torch_)]
    for dtype in ("float64", "float32"):
        rows += [Check(f"LoRALinear, dropout 0.4 ({dtype})", "torch autograd",
                       lambda d=dtype: adapter_layer_vs_torch("lora", d, dropout=0.4, use_rslora=True), torch_),
                 Check(f"QLoRALinear NF4, dropout 0.4 ({dtype})", "torch autograd",
                       lambda d=dtype: adapter_layer_vs_torch("qlora", d, dropout=0.4), torch_),
                 Check(f"QALoRALinear INT4 ({dtype})", "torch avg_pool1d",
                       lambda d=dtype: adapter_layer_vs_torch("qalora", d, bits=4), torch_),
                 Check(f"QALoRALinear INT2 ({dtype})", "torch avg_pool1d",
                       lambda d=dtype: adapter_layer_vs_torch("qalora", d, bits=2), torch_)]
    for name in FUNCTIONAL:
        rows.append(Check(f"functional.{name}_* (float64)", "central differences",
                          lambda n=name: gradcheck_functional(n), ()))
    rows += [Check("GPT, every parameter (float64)", "central differences", gradcheck_gpt, ()),
             Check("LoRALinear, dropout 0.4 (float64)", "central differences",
                   lambda: adapter_layer_gradients("lora", dropout=0.4), ()),
             Check("QLoRALinear NF4 (float64)", "central differences", lambda: adapter_layer_gradients("qlora"), ()),
             Check("QALoRALinear INT2 (float64)", "central differences",
                   lambda: adapter_layer_gradients("qalora", bits=2), ())]
    hf = ("torch", "transformers")
    for cfg in HF_CONFIGS:
        shape = f"L{cfg['n_layer']}H{cfg['n_head']}C{cfg['n_embd']}"
        for attn in ("eager", "sdpa"):
            rows.append(Check(f"GPT {shape} logits, loss (float32)", f"GPT2LMHeadModel {attn}",
                              lambda c=cfg, a=attn: hf_gpt_float32(c, a), hf))
        rows.append(Check(f"GPT {shape} every gradient (float64)", "GPT2LMHeadModel", lambda c=cfg: hf_gpt_float64(c),
                          hf))
    rows.append(Check("GPT tied head: wte gradient (float64)", "GPT2LMHeadModel", lambda: hf_tied_head(HF_CONFIGS[1]),
                      hf))
    rows += _peft_checks()
    bnb = ("torch", "bitsandbytes")
    rows += [Check(f"NF4 quantize + dequantize ({len(PARITY_SHAPES)} shapes)", "bitsandbytes",
                   lambda: bnb_parity("nf4"), bnb),
             Check(f"FP4 quantize + dequantize ({len(PARITY_SHAPES)} shapes)", "bitsandbytes",
                   lambda: bnb_parity("fp4"), bnb),
             Check("NF4 at block sizes 32 to 4096", "bitsandbytes", bnb_blocksizes, bnb),
             Check("NF4 double quantization: 4-bit codes", "bitsandbytes", bnb_double_quant_codes, bnb)]
    return rows


def missing_references() -> list:
    """The reference libraries that cannot be imported here."""
    import importlib
    import logging

    quiet = logging.getLogger("bitsandbytes")  # it warns on import about optional CPU kernels verify never uses
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    missing = []
    try:
        for name in REFERENCES:
            try:
                importlib.import_module(name)
            except ImportError:
                missing.append(name)
    finally:
        quiet.setLevel(level)
    return missing


def _fmt_error(m: Measurement) -> str:
    return f"{int(m.error)}" if m.bound == 0 else f"{m.error:.2e}"


def _fmt_bound(m: Measurement) -> str:
    return "= 0" if m.bound == 0 else f"< {m.bound:.0e}"


HEAD = f"{'component':<44} | {'reference':<24} | {'measured error':>14} | {'bound':>7} | ok"


def run_checks(rows, out=print) -> tuple[int, int]:
    """Run every check, print one line each (the worst of its measurements); returns (passed, failed)."""
    out(HEAD)
    out("-" * len(HEAD))
    passed = failed = 0
    for check in rows:
        try:
            measurements = check.run()
        except Exception as e:  # a Mismatch, or a comparison that crashed: reported, not hidden
            failed += 1
            out(f"{check.component:<44} | {check.reference:<24} | {'-':>14} | {'':>7} | FAILED: "
                f"{type(e).__name__}: {e}")
            continue
        m = worst(measurements)
        ok = all(x.ok for x in measurements)
        passed, failed = passed + ok, failed + (not ok)
        out(f"{check.component:<44} | {check.reference:<24} | {_fmt_error(m):>14} | {_fmt_bound(m):>7} | "
            f"{'ok' if ok else 'FAILED'}")
        for bad in (x for x in measurements if not x.ok):
            out(f"    {bad.what}: {bad.error:.3e}, bound {bad.bound:g}")
    return passed, failed


def add_arguments(parser) -> None:
    parser.description = ("Compare every layer and model with PyTorch autograd, transformers, PEFT and "
                          "bitsandbytes, and print the measured error of each next to its bound. Exit code 0: "
                          "every row ok; 1: a row failed or the reference libraries are not installed (then "
                          f"it says how to install them: {INSTALL}).")


def main(args=None) -> int:
    """Print the table; exit code 0 when every row is ok, 1 otherwise (or when references are missing)."""
    t0, c0 = time.perf_counter(), time.process_time()
    missing = missing_references()
    rows = checks()
    runnable = [c for c in rows if not set(c.needs) & set(missing)]
    print("lora_from_scratch verify: each row is measured now; 'measured error' is the worst of the row's "
          "comparisons\n(norm-wise relative unless it says max abs; a count of mismatching bytes or values "
          "must be 0)\n", flush=True)
    import warnings

    with warnings.catch_warnings():  # the references' deprecation notices are not findings
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        passed, failed = run_checks(runnable, out=lambda line: print(line, flush=True))
    skipped = len([c for c in rows if c.needs]) - len([c for c in runnable if c.needs])
    print(f"\n{passed} ok, {failed} failed ({time.perf_counter() - t0:.0f} s wall, "
          f"{time.process_time() - c0:.0f} s CPU)")
    if missing:
        print(f"\nNot run: the {skipped} comparisons with PyTorch, transformers, PEFT and bitsandbytes "
              f"({', '.join(missing)} cannot be imported: not installed).\nInstall the test dependencies with:\n"
              f"    {INSTALL}")
        return 1
    return 0 if failed == 0 else 1
