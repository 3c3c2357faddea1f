"""Every layer against PyTorch autograd with identical weights: outputs and every gradient, by name.

Reference: torch.nn (Linear, Embedding, LayerNorm), torch.nn.functional
(gelu with approximate="tanh" as GPT-2 uses, softmax, dropout,
scaled_dot_product_attention with is_causal=True for Vaswani et al., 2017,
eq. 1, cross_entropy with ignore_index=-100). Composite modules
(CausalSelfAttention, MLP, Block) are rebuilt from those torch
functions, reading the parameters under our names, so each gradient is
compared name by name. Tolerances (norm-wise relative error): 1e-10 in
float64, 1e-5 in float32 (``verify.TORCH_TOL``).

The comparisons are ``lora_from_scratch.verify``'s: ``python -m lora_from_scratch verify``
prints these same measurements, so each is written once.
"""

import numpy as np
import pytest
import torch  # noqa: F401  (the reference: without it these tests fail, they are not skipped)
from conftest import rel

from lora_from_scratch import verify
from lora_from_scratch.backend import asarray, to_numpy
from lora_from_scratch.model import CausalSelfAttention, GPTConfig
from lora_from_scratch.nn import Dropout

DTYPES = pytest.mark.parametrize("dtype", ["float64", "float32"])


def test_bounds():
    assert verify.TORCH_TOL == {"float64": 1e-10, "float32": 1e-5}


# ------------------------------------------------------------------ single layers
@DTYPES
@pytest.mark.parametrize("bias", [True, False])
def test_linear(dtype, bias):
    measured = verify.assert_ok(verify.torch_linear(dtype, bias))
    names = {m.what for m in measured}
    assert {"output", "dx", "grad weight"} <= names and (("grad bias" in names) == bias)


@DTYPES
def test_embedding(dtype):
    verify.assert_ok(verify.torch_embedding(dtype))


@DTYPES
def test_layernorm(dtype):
    verify.assert_ok(verify.torch_layernorm(dtype))


@DTYPES
def test_gelu_tanh(dtype):
    verify.assert_ok(verify.torch_gelu(dtype))


@DTYPES
def test_softmax(dtype):
    verify.assert_ok(verify.torch_softmax(dtype))


@DTYPES
def test_dropout_same_mask_as_torch(dtype):
    verify.assert_ok(verify.torch_dropout(dtype))
    x = np.random.default_rng(6).standard_normal((4, 50)).astype(dtype)  # (4, 50)
    ours = Dropout(0.3).eval()
    assert rel(ours(asarray(x)), x) == 0.0  # identity in eval mode


@DTYPES
def test_cross_entropy(dtype):
    verify.assert_ok(verify.torch_cross_entropy(dtype))


# ------------------------------------------------------------------ composite modules
@DTYPES
def test_causal_self_attention(dtype):
    measured = verify.assert_ok(verify.torch_module("attention", dtype))
    assert any("k.bias" in m.what and "exactly 0" in m.what for m in measured)  # the special case is measured


@DTYPES
def test_mlp(dtype):
    verify.assert_ok(verify.torch_module("mlp", dtype))


@DTYPES
def test_block(dtype):
    measured = verify.assert_ok(verify.torch_module("block", dtype))
    assert len([m for m in measured if m.what.startswith("grad ")]) >= 16  # every parameter by name


def test_a_wrong_dtype_is_a_mismatch():
    with pytest.raises(verify.Mismatch, match="dtype float32, expected float64"):
        verify._close(np.ones(3, np.float32), np.ones(3), "float64", "output")


def test_attention_is_causal():
    """Changing the last position's input must not change any earlier output."""
    cfg = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=4, n_embd=16)
    rng = np.random.default_rng(11)
    attn = CausalSelfAttention(cfg, dtype="float64")
    verify.set_params(attn, rng, "float64")
    x = rng.standard_normal((1, 6, cfg.n_embd))  # (B, T, C)
    y1 = to_numpy(attn(asarray(x))).copy()
    x[0, -1] += 1.0
    y2 = to_numpy(attn(asarray(x)))
    assert np.array_equal(y1[:, :-1], y2[:, :-1])
    assert not np.allclose(y1[:, -1], y2[:, -1])
