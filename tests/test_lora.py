"""LoRALinear and apply_lora (Hu et al., 2021, section 4.1): gradients, torch parity, init, merge, freezing.

Every gradient is checked twice: against float64 central differences and against PyTorch autograd.
"""

import math
import pathlib

import numpy as np
import pytest
from conftest import adapter_gradient_errors, rel

from lora_from_scratch import functional as F
from lora_from_scratch import verify
from lora_from_scratch.backend import asarray, to_numpy
from lora_from_scratch.lora import (
    LoRALinear,
    apply_lora,
    count_parameters,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    merge_lora,
    unmerge_lora,
)
from lora_from_scratch.model import GPT, GPTConfig
from lora_from_scratch.nn import Linear
from lora_from_scratch.optim import AdamW
from lora_from_scratch.verify import adapter_vs_torch, assert_ok

IN, OUT, R = verify.ADAPTER_SHAPES["lora"]  # 7, 5, 3: the layers of make_layer
CASES = [(init, rs, p) for init in ("kaiming", "gaussian", "pissa") for rs in (False, True) for p in (0.0, 0.4)]
CFG = GPTConfig(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=16)
ALL = ["q", "k", "v", "o", "fc", "proj"]


def make_layer(init, use_rslora, p, dtype="float64", seed=0, alpha=6.0):
    """``verify.make_adapter_layer``'s LoRALinear (IN -> OUT, rank R) over a random Linear with random bias;
    B randomized (as after training) unless PiSSA; an input (2, 3, IN) and, with dropout, a fixed mask."""
    return verify.make_adapter_layer("lora", dtype, seed, dropout=p, use_rslora=use_rslora, init=init, alpha=alpha)


# ----------------------------------------------------------------- gradients
@pytest.mark.parametrize("init,use_rslora,p", CASES)
def test_gradcheck(init, use_rslora, p):
    layer, x, mask = make_layer(init, use_rslora, p)

    errs = adapter_gradient_errors(layer, x, dropout_mask=mask)
    assert list(errs) == ["d/dx", "d/dA", "d/dB"] and max(errs.values()) < 1e-7, errs
    assert layer.base.weight.grad is None and layer.base.bias.grad is None


def test_gradcheck_refuses_B_zero():
    """B = 0 (LoRA's start) makes dA = 0 on both sides: a check that would pass without checking dA."""
    layer, x, _ = verify.make_adapter_layer("lora", randomize_B=False)
    assert not np.any(to_numpy(layer.lora_B.data))
    with pytest.raises(verify.Mismatch, match="A: gradient is zero"):
        verify.adapter_gradients(layer, x)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("init,use_rslora,p", CASES)
def test_torch_parity(init, use_rslora, p, dtype):
    """Output, dx, dA, dB against the same layer in torch ops (``verify.adapter_vs_torch``): float64 rel < 1e-10,
    float32 rel < 1e-5, and every array in the dtype asked for."""
    layer, x, mask = make_layer(init, use_rslora, p, dtype=dtype)
    G = asarray(np.random.default_rng(5).standard_normal((2, 3, OUT)), dtype=dtype)  # (2, 3, OUT)
    measurements = assert_ok(adapter_vs_torch(layer, x, G, dtype, mask=mask))
    assert [m.what for m in measurements] == ["output", "dx", "dA", "dB"]
    assert all(m.bound == {"float64": 1e-10, "float32": 1e-5}[dtype] for m in measurements)


def test_scaling_rule():
    layer, _, _ = make_layer("kaiming", False, 0.0, alpha=6.0)
    assert layer.scaling == 6.0 / R
    layer, _, _ = make_layer("kaiming", True, 0.0, alpha=6.0)
    assert layer.scaling == 6.0 / math.sqrt(R)


def test_dropout_only_in_training_mode():
    layer, x, _ = make_layer("kaiming", False, 0.5)
    y_train = layer(x)  # random mask drawn
    layer.eval()
    y_eval = layer(x)
    layer.dropout.p = 0.0
    y_nodrop = layer(x)
    assert np.array_equal(to_numpy(y_eval), to_numpy(y_nodrop))
    assert rel(y_train, y_eval) > 1e-3  # the training-mode mask really changed the adapter branch


# ----------------------------------------------------------------- initialization
def test_kaiming_and_gaussian_init():
    rng = np.random.default_rng(0)
    base = Linear(400, 300, rng=rng)
    k = LoRALinear(base, 16, 32, init="kaiming", rng=rng)
    A = to_numpy(k.lora_A.data)
    bound = 1 / math.sqrt(400)
    assert A.shape == (16, 400) and np.abs(A).max() <= bound
    assert abs(A.std() / (bound / math.sqrt(3)) - 1) < 0.03  # 6400 draws: std within 3 %
    assert not np.any(to_numpy(k.lora_B.data)) and k.lora_B.shape == (300, 16)
    g = LoRALinear(Linear(400, 300, rng=rng), 16, 32, init="gaussian", rng=rng)
    assert abs(to_numpy(g.lora_A.data).std() / (1 / 16) - 1) < 0.03
    assert abs(to_numpy(g.lora_A.data).mean()) < 3 * (1 / 16) / 80  # 3 sigma of the mean of 6400 draws
    assert not np.any(to_numpy(g.lora_B.data))


def test_seeded_init_is_reproducible():
    a = apply_lora(GPT(CFG, seed=0), 4, 8, ALL, seed=3)
    b = apply_lora(GPT(CFG, seed=0), 4, 8, ALL, seed=3)
    c = apply_lora(GPT(CFG, seed=0), 4, 8, ALL, seed=4)
    sa, sb, sc = lora_state_dict(a), lora_state_dict(b), lora_state_dict(c)
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert not np.array_equal(sa["blocks.0.attn.q.lora_A"], sc["blocks.0.attn.q.lora_A"])


@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_init(use_rslora):
    rng = np.random.default_rng(1)
    base = Linear(12, 9, rng=rng, dtype="float64")
    W0 = to_numpy(base.weight.data).copy()
    layer = LoRALinear(base, 4, 8, init="pissa", use_rslora=use_rslora)
    U, S, Vh = np.linalg.svd(W0, full_matrices=False)
    best = (U[:, :4] * S[:4]) @ Vh[:4]  # the best rank-4 approximation of W0
    s = layer.scaling
    assert rel(s * to_numpy(layer.lora_B.data) @ to_numpy(layer.lora_A.data), best) < 1e-12
    assert rel(to_numpy(layer.base.weight.data), W0 - best) < 1e-12  # W0 replaced by the residual
    # the split of PEFT: A = sqrt(S_r / s) V_r^T, so the rows of A have norms sqrt(S_r / s)
    assert np.allclose(np.linalg.norm(to_numpy(layer.lora_A.data), axis=1), np.sqrt(S[:4] / s), rtol=1e-12)
    x = rng.standard_normal((3, 12))  # (3, 12)
    assert rel(layer(asarray(x)), x @ W0.T) < 1e-12  # the output is unchanged at step 0


def test_adapted_model_starts_as_base_model():
    model = GPT(CFG, seed=0)
    idx = asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (3, 11)))  # (3, 11)
    base_logits = to_numpy(model(idx)).copy()
    apply_lora(model, 4, 8, ALL, seed=1)
    assert np.array_equal(to_numpy(model(idx)), base_logits)  # B = 0: exactly the base model
    pissa = apply_lora(GPT(CFG, seed=0), 4, 8, ALL, init="pissa")
    assert rel(pissa(idx), base_logits) < 1e-5  # float32: residual + s B A reproduces W0 to rounding


# ----------------------------------------------------------------- merge
def test_merge_unmerge():
    layer, x, _ = make_layer("kaiming", True, 0.0, dtype="float32")
    W0 = to_numpy(layer.base.weight.data).copy()
    y = to_numpy(layer(x)).copy()
    layer.merge()
    assert layer.merged
    W = to_numpy(layer.base.weight.data)
    assert rel(W, W0 + layer.scaling * to_numpy(layer.lora_B.data) @ to_numpy(layer.lora_A.data)) < 1e-6
    assert rel(layer(x), y) < 1e-6
    with pytest.raises(RuntimeError, match="merged"):
        layer.backward(asarray(np.ones((2, 3, OUT), dtype="float32")))
    layer.merge()  # merging twice is a no-op
    layer.unmerge()
    assert not layer.merged
    assert rel(layer.base.weight.data, W0) < 1e-6
    assert rel(layer(x), y) < 1e-6


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_merge_refuses_non_finite():
    layer, x, _ = make_layer("kaiming", False, 0.0, dtype="float32")
    W0 = to_numpy(layer.base.weight.data).copy()
    layer.lora_B.data[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.merge()
    assert not layer.merged and np.array_equal(to_numpy(layer.base.weight.data), W0)
    layer.lora_B.data[0, 0] = 3e38  # finite factors whose product overflows float32
    layer.lora_A.data[:] = 3e38
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.merge()
    assert np.array_equal(to_numpy(layer.base.weight.data), W0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_merge_lora_model_all_or_nothing():
    model = apply_lora(GPT(CFG, seed=0), 4, 8, ALL, seed=1)
    rng = np.random.default_rng(2)
    for layer in lora_layers(model).values():
        layer.lora_B.data = asarray(rng.standard_normal(layer.lora_B.shape) * 0.1, dtype="float32")
    idx = asarray(rng.integers(0, CFG.vocab_size, (2, 9)))  # (2, 9)
    y = to_numpy(model(idx)).copy()
    before = {k: to_numpy(v).copy() for k, v in model.state_dict().items()}
    lora_layers(model)["blocks.1.mlp.proj"].lora_B.data[0, 0] = np.nan
    with pytest.raises(ValueError, match="blocks.1.mlp.proj"):
        merge_lora(model)
    assert all(not layer.merged for layer in lora_layers(model).values())
    assert all(np.array_equal(to_numpy(v), before[k]) for k, v in model.state_dict().items() if ".adapters." not in k)
    lora_layers(model)["blocks.1.mlp.proj"].lora_B.data[0, 0] = before["blocks.1.mlp.proj.adapters.default.B"][0, 0]
    merge_lora(model)
    assert all(layer.merged for layer in lora_layers(model).values())
    assert rel(model(idx), y) < 1e-6
    unmerge_lora(model)
    for k, v in model.state_dict().items():
        assert rel(v, before[k]) < 1e-6, k


# ----------------------------------------------------------------- apply_lora, counting, names
def test_names_and_parameter_count():
    model = GPT(CFG, seed=0)
    total0 = model.num_parameters()
    apply_lora(model, 4, 8, ["q", "v", "blocks.1.fc"], seed=0)
    names = dict(model.named_parameters())
    assert "blocks.0.attn.q.adapters.default.A" in names and "blocks.0.attn.q.adapters.default.B" in names
    assert "blocks.0.attn.q.base.weight" in names and "blocks.0.attn.q.base.bias" in names
    assert sorted(lora_layers(model)) == ["blocks.0.attn.q", "blocks.0.attn.v", "blocks.1.attn.q",
                                          "blocks.1.attn.v", "blocks.1.mlp.fc"]
    C = CFG.n_embd
    expected = 4 * 4 * (C + C) + 4 * (C + 4 * C)  # r * (in + out) per adapted matrix
    assert count_parameters(model) == (expected, total0 + expected)
    trainable = sorted(n.replace(".adapters.default.", ".lora_") for n, p in names.items() if p.trainable)
    assert trainable == sorted(lora_state_dict(model))
    for name, layer in lora_layers(model).items():
        assert layer.adapter.num_parameters() == layer.r * (layer.in_features + layer.out_features), name


def test_lora_state_dict_round_trip():
    a = apply_lora(GPT(CFG, seed=0), 2, 4, ["k", "proj"], seed=1)
    for layer in lora_layers(a).values():
        layer.lora_B.data = layer.lora_B.data + 1.0  # (out, r)
    b = apply_lora(GPT(CFG, seed=0), 2, 4, ["k", "proj"], seed=2)
    load_lora_state_dict(b, lora_state_dict(a))
    idx = asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 5)))  # (2, 5)
    assert np.array_equal(to_numpy(a(idx)), to_numpy(b(idx)))
    bad = dict(lora_state_dict(a))
    bad["blocks.0.attn.k.lora_A"] = np.zeros((3, CFG.n_embd), dtype="float32")
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.k\.lora_A.*\(3, 16\).*\(2, 16\)"):
        load_lora_state_dict(b, bad)


@pytest.mark.parametrize("r", [0, -1, 17, 2.5])
def test_bad_rank(r):
    base = Linear(16, 64, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(base, r, 8)
    assert base.weight.trainable  # nothing was frozen
    with pytest.raises(ValueError, match="rank"):
        apply_lora(GPT(CFG, seed=0), r, 8, ["fc"])


def test_bad_arguments():
    model = GPT(CFG, seed=0)
    with pytest.raises(ValueError) as e:
        apply_lora(model, 4, 8, ["q", "foo"])
    assert str(e.value) == ("unknown target 'foo'; valid targets: ['q', 'k', 'v', 'o', 'fc', 'proj'] "
                            "or 'blocks.<i>.<name>'")
    with pytest.raises(ValueError, match="valid targets"):
        apply_lora(model, 4, 8, ["blocks.0.Wq"])
    for whole_name_only in ("q\n", "blocks.0.q\n", "blocks.0.attn.q"):  # the name must be the whole string
        with pytest.raises(ValueError, match="unknown target"):
            apply_lora(model, 4, 8, [whole_name_only])
    with pytest.raises(ValueError, match="block 5.*2 blocks"):
        apply_lora(model, 4, 8, ["blocks.5.q"])
    with pytest.raises(ValueError, match="alpha"):
        apply_lora(model, 4, 0, ["q"])
    with pytest.raises(ValueError, match="init"):
        apply_lora(model, 4, 8, ["q"], init="xavier")
    with pytest.raises(ValueError, match="dropout"):
        apply_lora(model, 4, 8, ["q"], dropout=1.0)
    assert not lora_layers(model) and all(p.trainable for p in model.parameters())  # unchanged
    apply_lora(model, 4, 8, ["q"], seed=0)
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, 4, 8, ["blocks.1.q"], seed=0)


# ----------------------------------------------------------------- freezing and training
def test_frozen_parameters_get_no_gradient_and_no_state():
    model = apply_lora(GPT(CFG, seed=0), 4, 8, ALL, seed=1)
    rng = np.random.default_rng(3)
    for layer in lora_layers(model).values():
        layer.lora_B.data = asarray(rng.standard_normal(layer.lora_B.shape) * 0.1, dtype="float32")
    idx = asarray(rng.integers(0, CFG.vocab_size, (2, 8)))  # (2, 8)
    loss, dlogits = F.cross_entropy(model(idx), idx)
    model.backward(dlogits)
    adapters = {n for n, _ in model.named_parameters() if ".adapters." in n}
    assert len(adapters) == len(lora_state_dict(model))
    for name, p in model.named_parameters():
        if name in adapters:
            assert p.grad is not None and float(np.abs(to_numpy(p.grad)).sum()) > 0, name
        else:
            assert not p.trainable and p.grad is None, name
    opt = AdamW(model.parameters(), lr=1e-3)
    opt.step()
    lora_ids = {id(p) for n, p in model.named_parameters() if n in adapters}
    assert set(opt.state) == lora_ids
    assert opt.state_nbytes() == 2 * sum(p.data.nbytes for n, p in model.named_parameters() if n in adapters)


def test_training_only_adapters_reduces_loss():
    base = GPT(CFG, seed=0)
    # a wider token embedding than the 0.02 of a fresh GPT, as a pretrained one has: the frozen tied
    # head can then express confident predictions, and the adapters only have to steer the features
    emb = np.random.default_rng(0).standard_normal(base.wte.weight.shape) * 0.3  # (V, C)
    base.wte.weight.data = asarray(emb, dtype="float32")
    model = apply_lora(base, 4, 8, ALL, seed=1)
    frozen = {k: to_numpy(v).copy() for k, v in model.state_dict().items() if ".adapters." not in k}
    rng = np.random.default_rng(7)
    idx = asarray(rng.integers(0, CFG.vocab_size, (4, 12)))  # (4, 12)
    target = asarray(rng.integers(0, CFG.vocab_size, (4, 12)))  # (4, 12) a fixed random target
    opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss, dlogits = F.cross_entropy(model(idx), target)
        model.backward(dlogits)
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses
    for k, v in model.state_dict().items():
        if ".adapters." not in k:
            assert np.array_equal(to_numpy(v), frozen[k]), k  # the base model never moved


def test_source_has_no_numpy_import():
    src = (pathlib.Path(__file__).parents[1] / "lora_from_scratch" / "lora.py").read_text()
    assert "import numpy" not in src
