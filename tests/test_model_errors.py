"""Bad input gets a clear error; a frozen parameter gets no gradient (LoRA, Hu et al., 2021, section 4.1).

Covers GPT.forward's id and shape checks (which CuPy would otherwise skip:
out-of-range indices wrap around there), GPTConfig validation,
load_state_dict's key and shape checks (all or nothing), cross-entropy with
no valid target, backward without a forward, and frozen parameters.
"""

import numpy as np
import pytest

from lora_from_scratch import functional as F
from lora_from_scratch.backend import asarray, to_numpy
from lora_from_scratch.model import GPT, MLP, Block, CausalSelfAttention, GPTConfig
from lora_from_scratch.nn import GELU, Embedding, LayerNorm, Linear

CFG = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8)


@pytest.fixture
def model():
    return GPT(CFG, seed=0)


def ids_of(rows):
    return asarray(np.array(rows, dtype=np.int64))  # (B, T)


# ------------------------------------------------------------------ forward input checks
@pytest.mark.parametrize("bad", [11, 12, 1000])
def test_token_id_too_large(model, bad):
    with pytest.raises(ValueError, match=rf"\b{bad}\b") as err:
        model(ids_of([[1, 2, bad, 3]]))
    assert "11" in str(err.value)  # names the vocabulary size too


@pytest.mark.parametrize("bad", [-1, -7])
def test_negative_token_id(model, bad):
    with pytest.raises(ValueError, match=rf"{bad}\b"):
        model(ids_of([[1, bad, 2]]))


def test_largest_valid_id_and_full_context_are_accepted(model):
    logits = model(ids_of([[10, 0, 10, 5, 10, 1]]))  # (1, block_size)
    assert logits.shape == (1, 6, 11)


def test_sequence_longer_than_block_size(model):
    with pytest.raises(ValueError, match=r"7.*6|block_size"):
        model(ids_of([[1] * 7]))


@pytest.mark.parametrize("shape", [(5,), (1, 2, 3), ()])
def test_ids_must_be_two_dimensional(model, shape):
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(asarray(np.ones(shape, dtype=np.int64)))


def test_float_ids_rejected(model):
    with pytest.raises(ValueError, match="integer"):
        model(asarray(np.ones((1, 3), dtype=np.float32)))


def test_config_n_embd_not_divisible_by_n_head():
    with pytest.raises(ValueError, match=r"n_embd=10.*n_head=4"):
        GPTConfig(vocab_size=11, block_size=6, n_layer=1, n_head=4, n_embd=10)


@pytest.mark.parametrize("field,value", [("n_layer", 0), ("vocab_size", -3), ("block_size", 2.5)])
def test_config_rejects_non_positive_sizes(field, value):
    kwargs = dict(vocab_size=11, block_size=6, n_layer=1, n_head=2, n_embd=8)
    kwargs[field] = value
    with pytest.raises(ValueError, match=field):
        GPTConfig(**kwargs)


# ------------------------------------------------------------------ load_state_dict
def _snapshot(m):
    return {n: to_numpy(p.data).copy() for n, p in m.named_parameters()}


def _unchanged(m, snap):
    return all(np.array_equal(to_numpy(p.data), snap[n]) for n, p in m.named_parameters())


def _fresh_state(seed):
    return {n: to_numpy(p.data).copy() for n, p in GPT(CFG, seed=seed).named_parameters()}


def test_load_state_dict_round_trip(model):
    state = _fresh_state(1)
    model.load_state_dict(state)
    assert _unchanged(model, state)
    state["wte.weight"][0, 0] += 1.0  # the model holds copies, not the caller's arrays
    assert not np.array_equal(to_numpy(model.wte.weight.data), state["wte.weight"])


def test_load_state_dict_missing_key_names_it_and_changes_nothing(model):
    snap = _snapshot(model)
    state = _fresh_state(1)
    del state["blocks.1.attn.v.bias"]
    with pytest.raises(KeyError, match=r"blocks\.1\.attn\.v\.bias"):
        model.load_state_dict(state)
    assert _unchanged(model, snap)


def test_load_state_dict_unexpected_key(model):
    snap = _snapshot(model)
    state = _fresh_state(1)
    state["blocks.0.attn.c_attn.weight"] = np.zeros((8, 24), dtype=np.float32)
    with pytest.raises(KeyError, match=r"blocks\.0\.attn\.c_attn\.weight"):
        model.load_state_dict(state)
    assert _unchanged(model, snap)


def test_load_state_dict_wrong_shape_names_key_and_both_shapes(model):
    snap = _snapshot(model)
    state = _fresh_state(1)  # every other key holds new, valid values
    state["blocks.1.mlp.fc.weight"] = np.zeros((32, 9), dtype=np.float32)  # expected (32, 8)
    with pytest.raises(ValueError) as err:
        model.load_state_dict(state)
    msg = str(err.value)
    assert "blocks.1.mlp.fc.weight" in msg and "(32, 9)" in msg and "(32, 8)" in msg
    assert _unchanged(model, snap)  # all or nothing: no key before the bad one was copied


# ------------------------------------------------------------------ loss and backward misuse
def test_cross_entropy_all_ignored():
    logits = asarray(np.zeros((2, 3, 5)))  # (B, T, V)
    with pytest.raises(ValueError, match="ignore"):
        F.cross_entropy(logits, asarray(np.full((2, 3), -100)))


def test_cross_entropy_target_out_of_range_and_wrong_shape():
    logits = asarray(np.zeros((2, 3, 5)))  # (B, T, V)
    with pytest.raises(ValueError, match=r"\b5\b"):
        F.cross_entropy(logits, asarray(np.array([[0, 1, 5], [2, -100, 1]])))
    with pytest.raises(ValueError, match="shape"):
        F.cross_entropy(logits, asarray(np.zeros((2, 4), dtype=np.int64)))


def test_gpt_backward_without_forward(model):
    with pytest.raises(RuntimeError, match="forward"):
        model.backward(asarray(np.zeros((1, 3, 11), dtype=np.float32)))


def test_gpt_backward_twice_for_one_forward(model):
    logits = model(ids_of([[1, 2, 3]]))
    model.backward(logits * 0 + 1)
    with pytest.raises(RuntimeError, match="forward"):
        model.backward(logits * 0 + 1)


@pytest.mark.parametrize("make", [
    lambda: Linear(4, 4), lambda: LayerNorm(4), lambda: Embedding(5, 4), lambda: GELU(),
    lambda: CausalSelfAttention(GPTConfig(5, 4, 1, 2, 4)), lambda: MLP(GPTConfig(5, 4, 1, 2, 4)),
    lambda: Block(GPTConfig(5, 4, 1, 2, 4)),
], ids=["Linear", "LayerNorm", "Embedding", "GELU", "CausalSelfAttention", "MLP", "Block"])
def test_module_backward_without_forward(make):
    with pytest.raises(RuntimeError, match="forward"):
        make().backward(asarray(np.zeros((1, 3, 4), dtype=np.float32)))


# ------------------------------------------------------------------ frozen parameters
FROZEN = ["wte.weight", "blocks.0.ln_1.weight", "blocks.0.attn.q.weight", "blocks.0.attn.q.bias",
          "blocks.1.mlp.fc.weight", "ln_f.bias"]


def _grads(m, ids, targets):
    m.zero_grad()
    loss, dlogits = F.cross_entropy(m(ids), targets)
    m.backward(dlogits)
    return {n: p.grad for n, p in m.named_parameters()}


def test_frozen_parameters_get_no_grad_and_others_are_unaffected():
    rng = np.random.default_rng(0)
    ids = ids_of(rng.integers(0, 11, size=(2, 6)))  # (B, T)
    targets = ids_of(rng.integers(0, 11, size=(2, 6)))  # (B, T)
    full = _grads(GPT(CFG, seed=3), ids, targets)
    m = GPT(CFG, seed=3)
    params = dict(m.named_parameters())
    for n in FROZEN:
        params[n].trainable = False
    part = _grads(m, ids, targets)
    for n, g in part.items():
        if n in FROZEN:
            assert g is None, f"frozen {n} got a gradient"
        else:
            assert g is not None, f"trainable {n} got no gradient"
            assert np.array_equal(to_numpy(g), to_numpy(full[n])), f"freezing changed the gradient of {n}"


def test_fully_frozen_model_backward_leaves_every_grad_empty():
    m = GPT(CFG, seed=4).freeze()
    assert m.trainable_parameters() == []
    loss, dlogits = F.cross_entropy(m(ids_of([[1, 2, 3]])), ids_of([[2, 3, 4]]))
    m.backward(dlogits)
    assert all(p.grad is None for p in m.parameters())
    m.unfreeze()
    assert len(m.trainable_parameters()) == len(m.parameters())
