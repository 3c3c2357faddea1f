"""Bad input gets a clear error; a frozen parameter gets no gradient (LoRA, Hu et al., 2021, section 4.1).

Covers GPT.forward's id and shape checks (which CuPy would otherwise skip:
out-of-range indices wrap around there; done once per batch, and skipped with
``check=False``), GPTConfig validation, load_state_dict's key and shape checks
(all or nothing), target validation (``check_targets`` and
``cross_entropy(check=True)``; unchecked, an all-ignored batch gives 0, never
NaN, and an out-of-range target gives NaN, never a wrong finite loss),
backward without a forward, frozen parameters, and the GPT's dropout seeding
(each layer its own mask, a new mask every training forward, reproducible for
a seed, and weights that do not depend on dropout).
"""

import math

import numpy as np
import pytest

from lora_from_scratch import functional as F
from lora_from_scratch.backend import asarray, global_rng, manual_seed, to_numpy
from lora_from_scratch.model import GPT, MLP, Block, CausalSelfAttention, GPTConfig
from lora_from_scratch.nn import GELU, Dropout, Embedding, LayerNorm, Linear

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
    with pytest.raises(ValueError, match="integer"):  # even unchecked: the dtype is known without a sync
        model(asarray(np.ones((1, 3), dtype=np.float32)), check=False)


def test_unchecked_forward_gives_the_same_logits(model):
    ids = ids_of([[10, 0, 3, 5]])
    assert np.array_equal(to_numpy(model(ids)), to_numpy(model(ids, check=False)))


@pytest.mark.parametrize("bad", [11, -2])
def test_check_ids_and_embedding_forward_check(bad):
    ids = ids_of([[1, bad, 4]])
    W = asarray(np.zeros((11, 3)))  # (V, C)
    with pytest.raises(ValueError, match=rf"{bad}\b"):
        F.check_ids(ids, 11)
    with pytest.raises(ValueError, match=rf"{bad}\b"):
        F.embedding_forward(ids, W, check=True)
    F.check_ids(ids_of([[0, 10]]), 11)  # the bounds themselves are fine
    F.check_ids(asarray(np.zeros((0, 3), dtype=np.int64)), 11)  # nothing to check


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
    targets = asarray(np.full((2, 3), -100))  # (B, T)
    with pytest.raises(ValueError, match="ignore"):
        F.check_targets(targets, 5)
    with pytest.raises(ValueError, match="ignore"):
        F.cross_entropy(logits, targets, check=True)
    loss, dlogits = F.cross_entropy(logits, targets, check=False)  # unchecked: the guarded division gives 0, not 0 / 0
    assert float(loss) == 0.0 and not to_numpy(dlogits).any()


@pytest.mark.parametrize("bad", [5, 7, -1, -99, -101])
def test_cross_entropy_target_out_of_range(bad):
    logits = asarray(np.zeros((2, 3, 5)))  # (B, T, V)
    targets = asarray(np.array([[0, 1, bad], [2, -100, bad]]))  # (B, T); -100 is ignore_index, -99 is not
    with pytest.raises(ValueError, match=rf"target id {bad} .*\b5 classes"):
        F.check_targets(targets, 5)
    with pytest.raises(ValueError, match=rf"target id {bad}\b"):
        F.cross_entropy(logits, targets, check=True)
    loss, dlogits = F.cross_entropy(logits, targets, check=False)  # unchecked: poisoned, never a wrong finite number
    assert math.isnan(float(loss)) and np.isnan(to_numpy(dlogits)).all()


def test_check_targets_names_the_first_bad_target_and_accepts_good_ones():
    with pytest.raises(ValueError, match="target id 9 "):
        F.check_targets(asarray(np.array([[0, -100, 9], [-3, 1, 2]])), 5)
    F.check_targets(asarray(np.array([[0, -100, 4], [-100, 1, 2]])), 5)
    F.check_targets(asarray(np.array([[-1, 3]])), 5, ignore_index=-1)  # another ignore_index
    with pytest.raises(ValueError, match="integer"):
        F.check_targets(asarray(np.zeros((2, 3))), 5)
    with pytest.raises(ValueError, match="no targets"):
        F.check_targets(asarray(np.zeros((0,), dtype=np.int64)), 5)


def test_cross_entropy_wrong_shape():
    logits = asarray(np.zeros((2, 3, 5)))  # (B, T, V)
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


# ------------------------------------------------------------------ dropout seeding
DCFG = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, dropout=0.3)
IDS = [[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]]


def _dropouts(m):
    return [(n, d) for n, d in m.named_modules() if isinstance(d, Dropout)]


def test_each_dropout_layer_of_a_gpt_draws_its_own_mask():
    m = GPT(DCFG, seed=0).train()
    layers = _dropouts(m)
    assert len(layers) == 1 + 3 * DCFG.n_layer
    x = asarray(np.ones((2, 6, 8), dtype=np.float32))  # (B, T, C): the same input for every layer
    masks = {n: to_numpy(d(x)) != 0 for n, d in layers}  # (B, T, C) each: which entries were kept
    for n, mask in masks.items():
        assert 0.4 < mask.mean() < 0.95, f"{n} keeps {mask.mean():.0%}, expected about 70 %"
    names = list(masks)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not np.array_equal(masks[a], masks[b]), f"{a} and {b} drew the same mask"


def test_successive_training_forwards_draw_new_masks_and_eval_is_deterministic():
    m = GPT(DCFG, seed=0)
    ids = ids_of(IDS)
    m.train()
    first, second = to_numpy(m(ids)), to_numpy(m(ids))
    assert not np.allclose(first, second), "two training forwards reused the same dropout masks"
    m.eval()
    a, b = to_numpy(m(ids)), to_numpy(m(ids))
    assert np.array_equal(a, b)
    assert not np.allclose(a, first)
    plain = GPT(GPTConfig(**{**DCFG.to_dict(), "dropout": 0.0}), seed=0)
    assert np.array_equal(a, to_numpy(plain(ids)))  # eval mode is the same network without dropout


def test_dropout_masks_are_reproducible_for_a_seed_and_leave_the_global_generator_alone():
    before = global_rng().bit_generator.state
    a, b, c = GPT(DCFG, seed=0).train(), GPT(DCFG, seed=0).train(), GPT(DCFG, seed=1).train()
    assert global_rng().bit_generator.state == before  # a seeded model never draws from the package generator
    seeds = [[d.seed for _, d in _dropouts(m)] for m in (a, b, c)]
    assert seeds[0] == seeds[1] and seeds[0] != seeds[2]
    assert len(set(seeds[0])) == len(seeds[0])
    ids = ids_of(IDS)
    for _ in range(2):
        assert np.array_equal(to_numpy(a(ids)), to_numpy(b(ids)))


def test_seedless_gpt_dropout_seeds_follow_manual_seed():
    saved = global_rng().bit_generator.state
    try:
        manual_seed(5)
        first = [d.seed for _, d in _dropouts(GPT(DCFG))]
        manual_seed(5)
        again = [d.seed for _, d in _dropouts(GPT(DCFG))]
    finally:
        global_rng().bit_generator.state = saved
    assert first == again and len(set(first)) == len(first)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_weights_for_a_seed_are_the_documented_draws_whatever_the_dropout(dropout):
    """wte, wpe, then per block q, k, v, o, fc, proj: standard normals from rng(seed) times their std."""
    cfg = GPTConfig(**{**DCFG.to_dict(), "dropout": dropout})
    m = GPT(cfg, seed=7)
    rng = np.random.default_rng(7)
    C, L = cfg.n_embd, cfg.n_layer
    expected = {"wte.weight": rng.standard_normal((cfg.vocab_size, C)) * 0.02,
                "wpe.weight": rng.standard_normal((cfg.block_size, C)) * 0.01}
    resid = 0.02 / math.sqrt(2 * L)
    for i in range(L):
        for name, shape, std in (("attn.q", (C, C), 0.02), ("attn.k", (C, C), 0.02), ("attn.v", (C, C), 0.02),
                                 ("attn.o", (C, C), resid), ("mlp.fc", (4 * C, C), 0.02),
                                 ("mlp.proj", (C, 4 * C), resid)):
            expected[f"blocks.{i}.{name}.weight"] = rng.standard_normal(shape) * std
    params = dict(m.named_parameters())
    for name, e in expected.items():
        assert np.array_equal(to_numpy(params[name].data), e.astype(np.float32)), name
    others = set(params) - set(expected)  # biases and layer-norm parameters: constants
    assert all(np.all(to_numpy(params[n].data) == (1.0 if n.split(".")[-2].startswith("ln") and
                                                    n.endswith("weight") else 0.0)) for n in others)
