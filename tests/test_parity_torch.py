"""Every layer against PyTorch autograd with identical weights: outputs and every gradient, by name.

Reference: torch.nn (Linear, Embedding, LayerNorm), torch.nn.functional
(gelu with approximate="tanh" as GPT-2 uses, softmax, dropout,
scaled_dot_product_attention with is_causal=True for Vaswani et al., 2017,
eq. 1, cross_entropy with ignore_index=-100). Composite modules
(CausalSelfAttention, MLP, Block) are rebuilt here from those torch
functions, reading the parameters under our names, so each gradient is
compared name by name. Tolerances (norm-wise relative error): 1e-10 in
float64, 1e-5 in float32.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from conftest import rel

from lora_from_scratch import functional as F
from lora_from_scratch.backend import asarray, to_numpy
from lora_from_scratch.model import MLP, Block, CausalSelfAttention, GPTConfig
from lora_from_scratch.nn import GELU, Dropout, Embedding, LayerNorm, Linear

TOL = {"float64": 1e-10, "float32": 1e-5}
DTYPES = pytest.mark.parametrize("dtype", ["float64", "float32"])


def data(rng, shape, dtype, scale=1.0):
    """The same values for both sides: a host array of ``dtype`` and its torch leaf tensor."""
    a = (rng.standard_normal(shape) * scale).astype(dtype)  # shape
    return a, torch.tensor(a, requires_grad=True)


def close(ours, ref, dtype, what):
    ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref
    assert to_numpy(ours).dtype == np.dtype(dtype), f"{what}: dtype {to_numpy(ours).dtype}, expected {dtype}"
    e = rel(ours, ref)
    assert e < TOL[dtype], f"{what}: relative error {e:.3e} >= {TOL[dtype]} ({dtype})"


def set_params(module, rng, dtype):
    """Random values for every parameter (biases non-zero, layer-norm gains near 1) on the default backend."""
    for name, p in module.named_parameters():
        parts = name.split(".")
        fan_in = p.shape[-1] if len(p.shape) == 2 else 1
        host = rng.standard_normal(p.shape) / np.sqrt(fan_in)  # shape of p
        if len(p.shape) == 1:
            host = 0.2 * host + (1.0 if parts[-1] == "weight" and (
                isinstance(module, LayerNorm) or (len(parts) > 1 and parts[-2].startswith("ln"))) else 0.0)
        p.data = asarray(host.astype(dtype))


def torch_params(module):
    """name -> torch leaf tensor holding the same values as our parameter of that name."""
    return {n: torch.tensor(to_numpy(p.data), requires_grad=True) for n, p in module.named_parameters()}


def compare_grads(module, ref_params, dtype):
    """Every gradient by name. The key bias is the exception: its exact gradient is 0 (q.(k + b) shifts
    a softmax row by a constant), so both sides must be 0 up to rounding, against the largest gradient."""
    ours = dict(module.named_parameters())
    assert set(ours) == set(ref_params)
    scale = max(float(np.linalg.norm(to_numpy(p.grad))) for p in ours.values() if p.grad is not None)
    for name, p in ours.items():
        assert p.grad is not None, f"{name} got no gradient"
        assert ref_params[name].grad is not None, f"torch gave {name} no gradient"
        if name == "k.bias" or name.endswith(".k.bias"):
            for side, g in (("ours", to_numpy(p.grad)), ("torch", ref_params[name].grad.numpy())):
                assert np.linalg.norm(g) < TOL[dtype] * scale, f"grad {name} ({side}) is not 0"
        else:
            close(p.grad, ref_params[name].grad, dtype, f"grad {name}")


# ------------------------------------------------------------------ torch references (our names)
def t_linear(x, P, pre):
    return TF.linear(x, P[pre + "weight"], P.get(pre + "bias"))


def t_layernorm(x, P, pre):
    return TF.layer_norm(x, (x.shape[-1],), P[pre + "weight"], P[pre + "bias"], eps=1e-5)


def t_attention(x, P, pre, n_head):
    B, T, C = x.shape
    hs = C // n_head

    def heads(a):
        return a.view(B, T, n_head, hs).transpose(1, 2)  # (B, T, C) -> (B, H, T, hs)

    q, k, v = (heads(t_linear(x, P, pre + n + ".")) for n in "qkv")
    y = TF.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hs)
    return t_linear(y.transpose(1, 2).reshape(B, T, C), P, pre + "o.")  # (B, T, C)


def t_mlp(x, P, pre):
    return t_linear(TF.gelu(t_linear(x, P, pre + "fc."), approximate="tanh"), P, pre + "proj.")


def t_block(x, P, pre, n_head):
    x = x + t_attention(t_layernorm(x, P, pre + "ln_1."), P, pre + "attn.", n_head)
    return x + t_mlp(t_layernorm(x, P, pre + "ln_2."), P, pre + "mlp.")


# ------------------------------------------------------------------ single layers
@DTYPES
@pytest.mark.parametrize("bias", [True, False])
def test_linear(dtype, bias):
    rng = np.random.default_rng(1)
    ours = Linear(6, 5, bias=bias, dtype=dtype)
    set_params(ours, rng, dtype)
    ref = torch.nn.Linear(6, 5, bias=bias, dtype=getattr(torch, dtype))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.from_numpy(to_numpy(getattr(ours, name).data)))
    x, xt = data(rng, (2, 3, 6), dtype)
    y, yt = ours(asarray(x)), ref(xt)  # (B, T, 5)
    close(y, yt, dtype, "output")
    G = rng.standard_normal(y.shape).astype(dtype)  # (B, T, 5)
    dx = ours.backward(asarray(G))
    yt.backward(torch.from_numpy(G))
    close(dx, xt.grad, dtype, "dx")
    compare_grads(ours, dict(ref.named_parameters()), dtype)


@DTYPES
def test_embedding(dtype):
    rng = np.random.default_rng(2)
    ours = Embedding(7, 4, dtype=dtype)
    set_params(ours, rng, dtype)
    ref = torch.nn.Embedding(7, 4, dtype=getattr(torch, dtype))
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(to_numpy(ours.weight.data)))
    ids = np.array([[0, 3, 3, 6], [3, 1, 0, 3]])  # (B, T), repeated ids
    y, yt = ours(asarray(ids)), ref(torch.from_numpy(ids))  # (B, T, C)
    close(y, yt, dtype, "output")
    G = rng.standard_normal(y.shape).astype(dtype)  # (B, T, C)
    assert ours.backward(asarray(G)) is None
    yt.backward(torch.from_numpy(G))
    compare_grads(ours, dict(ref.named_parameters()), dtype)


@DTYPES
def test_layernorm(dtype):
    rng = np.random.default_rng(3)
    ours = LayerNorm(8, dtype=dtype)
    set_params(ours, rng, dtype)
    ref = torch.nn.LayerNorm(8, eps=1e-5, dtype=getattr(torch, dtype))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.from_numpy(to_numpy(getattr(ours, name).data)))
    x, xt = data(rng, (3, 4, 8), dtype, scale=3.0)
    x += 2.0  # an offset the normalization must remove
    xt.data += 2.0
    y, yt = ours(asarray(x)), ref(xt)  # (B, T, C)
    close(y, yt, dtype, "output")
    G = rng.standard_normal(y.shape).astype(dtype)  # (B, T, C)
    dx = ours.backward(asarray(G))
    yt.backward(torch.from_numpy(G))
    close(dx, xt.grad, dtype, "dx")
    compare_grads(ours, dict(ref.named_parameters()), dtype)


@DTYPES
def test_gelu_tanh(dtype):
    rng = np.random.default_rng(4)
    x, xt = data(rng, (5, 40), dtype, scale=3.0)  # tails included
    ours = GELU()
    y, yt = ours(asarray(x)), TF.gelu(xt, approximate="tanh")
    close(y, yt, dtype, "output")
    G = rng.standard_normal(y.shape).astype(dtype)
    dx = ours.backward(asarray(G))
    yt.backward(torch.from_numpy(G))
    close(dx, xt.grad, dtype, "dx")


@DTYPES
def test_softmax(dtype):
    rng = np.random.default_rng(5)
    x, xt = data(rng, (3, 4, 6), dtype, scale=4.0)
    y, cache = F.softmax_forward(asarray(x))
    yt = torch.softmax(xt, dim=-1)
    close(y, yt, dtype, "output")
    G = rng.standard_normal(y.shape).astype(dtype)
    yt.backward(torch.from_numpy(G))
    close(F.softmax_backward(asarray(G), cache), xt.grad, dtype, "dx")


@DTYPES
def test_dropout_same_mask_as_torch(dtype):
    rng = np.random.default_rng(6)
    p = 0.3
    x, xt = data(rng, (4, 50), dtype)
    torch.manual_seed(0)
    yt = TF.dropout(xt, p=p, training=True)
    mask = yt.detach().numpy() != 0  # torch's mask (x has no exact zeros)
    assert 0.5 < mask.mean() < 0.9
    ours = Dropout(p)
    y = ours(asarray(x), mask=asarray(mask))
    close(y, yt, dtype, "output")
    G = rng.standard_normal(y.shape).astype(dtype)
    yt.backward(torch.from_numpy(G))
    close(ours.backward(asarray(G)), xt.grad, dtype, "dx")
    ours.eval()
    assert ours(asarray(x)) is not None and rel(ours(asarray(x)), x) == 0.0  # identity in eval mode


@DTYPES
def test_cross_entropy(dtype):
    rng = np.random.default_rng(7)
    V = 9
    logits, lt = data(rng, (2, 5, V), dtype, scale=3.0)
    targets = rng.integers(0, V, size=(2, 5))
    targets[0, 1] = targets[1, 4] = targets[1, 0] = -100  # ignored positions
    loss, dlogits = F.cross_entropy(asarray(logits), asarray(targets))
    lt_loss = TF.cross_entropy(lt.view(-1, V), torch.from_numpy(targets).view(-1), ignore_index=-100)
    lt_loss.backward()
    close(loss, lt_loss, dtype, "loss")
    close(dlogits, lt.grad, dtype, "dlogits")


# ------------------------------------------------------------------ composite modules
CFG = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=4, n_embd=16)


def _run_module(cls, dtype, seed, ref_fn):
    rng = np.random.default_rng(seed)
    ours = cls(CFG, dtype=dtype)
    set_params(ours, rng, dtype)
    P = torch_params(ours)
    x, xt = data(rng, (2, 7, CFG.n_embd), dtype)
    y, yt = ours(asarray(x)), ref_fn(xt, P)  # (B, T, C)
    close(y, yt, dtype, "output")
    G = rng.standard_normal(y.shape).astype(dtype)  # (B, T, C)
    ours.zero_grad()
    dx = ours.backward(asarray(G))
    yt.backward(torch.from_numpy(G))
    close(dx, xt.grad, dtype, "dx")
    compare_grads(ours, P, dtype)


@DTYPES
def test_causal_self_attention(dtype):
    _run_module(CausalSelfAttention, dtype, 8, lambda x, P: t_attention(x, P, "", CFG.n_head))


@DTYPES
def test_mlp(dtype):
    _run_module(MLP, dtype, 9, lambda x, P: t_mlp(x, P, ""))


@DTYPES
def test_block(dtype):
    _run_module(Block, dtype, 10, lambda x, P: t_block(x, P, "", CFG.n_head))


def test_attention_is_causal():
    """Changing the last position's input must not change any earlier output."""
    rng = np.random.default_rng(11)
    attn = CausalSelfAttention(CFG, dtype="float64")
    set_params(attn, rng, "float64")
    x = rng.standard_normal((1, 6, CFG.n_embd))  # (B, T, C)
    y1 = to_numpy(attn(asarray(x))).copy()
    x[0, -1] += 1.0
    y2 = to_numpy(attn(asarray(x)))
    assert np.array_equal(y1[:, :-1], y2[:, :-1])
    assert not np.allclose(y1[:, -1], y2[:, -1])
