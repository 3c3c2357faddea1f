"""QA-LoRA (Xu et al., 2023, Section 3.3): the pooled adapter's gradients, torch parity, the lossless merge.

Every gradient is checked against float64 central differences and against PyTorch autograd; the
merge into the zero points is checked on random shapes at every bit width 2..8.
"""

import numpy as np
import pytest
from conftest import adapter_gradient_errors, rel

from lora_from_scratch import adapter as adapter_module
from lora_from_scratch import verify
from lora_from_scratch.backend import asarray, to_numpy
from lora_from_scratch.functional import cross_entropy
from lora_from_scratch.gradcheck import check_gradients
from lora_from_scratch.lora import LoRALinear, apply_lora, lora_layers, merge_and_unload, merge_lora, unmerge_lora
from lora_from_scratch.model import GPT, GPTConfig
from lora_from_scratch.nn import Linear
from lora_from_scratch.optim import AdamW
from lora_from_scratch.qalora import (
    GroupwiseLinear,
    QALoRALinear,
    apply_qalora,
    group_mean_forward,
    quantize_model_groupwise,
)
from lora_from_scratch.quant import dequantize_groupwise, quantize_groupwise
from lora_from_scratch.verify import FUNCTIONAL_SEEDS, adapter_vs_torch, assert_ok, gradcheck_functional

IN, OUT, R = verify.ADAPTER_SHAPES["qalora"]  # 12, 5, 2
GS = 4  # L = 3 groups
CFG = GPTConfig(vocab_size=23, block_size=12, n_layer=2, n_head=2, n_embd=16)
ALL = ["q", "k", "v", "o", "fc", "proj"]


def make_layer(dtype="float64", bits=4, seed=0, in_features=IN, out_features=OUT, r=R, group_size=GS, alpha=6.0):
    """``verify.make_adapter_layer``'s QALoRALinear over a random Linear with a random bias; B randomized (as
    after training); an input (2, 3, in)."""
    layer, x, _ = verify.make_adapter_layer("qalora", dtype, seed, bits=bits, in_features=in_features,
                                            out_features=out_features, r=r, group_size=group_size, alpha=alpha)
    return layer, x


# ----------------------------------------------------------------- gradients
def test_group_mean_gradcheck():
    """``verify.gradcheck_functional("group_mean")`` (groups of GS = 4 over IN = 12), and the forward is the mean."""
    measured = assert_ok(gradcheck_functional("group_mean"))  # rel error < 1e-7
    assert [(m.what, m.bound) for m in measured] == [("d/dx", 1e-7)]
    x = asarray(np.random.default_rng(FUNCTIONAL_SEEDS["group_mean"]).standard_normal((2, 3, IN)))  # verify's input
    p, _ = group_mean_forward(x, GS)
    assert rel(p, to_numpy(x).reshape(2, 3, IN // GS, GS).mean(-1)) < 1e-15


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gradcheck(bits):
    layer, x = make_layer(bits=bits)

    errs = adapter_gradient_errors(layer, x)
    assert max(errs.values()) < 1e-7, errs
    frozen = layer.base.parameters()  # the bias; codes, scales and zeros are buffers, not parameters
    assert len(frozen) == 1 and all(not p.trainable and p.grad is None for p in frozen)
    assert sorted(n for n, _ in layer.base.named_buffers()) == ["packed", "scales", "zeros"]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_torch_parity(bits, dtype):
    """Output, dx, dA, dB against torch ops (torch dequantizes the codes itself and pools with avg_pool1d;
    ``verify.adapter_vs_torch``): float64 rel < 1e-10, float32 rel < 1e-5, every array in the dtype asked for."""
    layer, x = make_layer(dtype=dtype, bits=bits, seed=bits)
    G = asarray(np.random.default_rng(5).standard_normal((2, 3, OUT)), dtype=dtype)  # (2, 3, OUT)
    measurements = assert_ok(adapter_vs_torch(layer, x, G, dtype))
    assert [m.what for m in measurements] == ["output", "dx", "dA", "dB"]
    assert all(m.bound == {"float64": 1e-10, "float32": 1e-5}[dtype] for m in measurements)


def test_groupwise_linear_forward_backward():
    rng = np.random.default_rng(2)
    W = asarray(rng.standard_normal((OUT, IN)))  # (OUT, IN) float64
    b = asarray(rng.standard_normal(OUT))  # (OUT,)
    layer = GroupwiseLinear.from_weight(W, b, bits=3, group_size=GS)
    x = asarray(rng.standard_normal((4, IN)))  # (4, IN)
    Wq = dequantize_groupwise(quantize_groupwise(W, 3, GS, scale_dtype="float16"))  # (OUT, IN)
    assert rel(layer(x), to_numpy(x) @ to_numpy(Wq).T + to_numpy(b)) < 1e-14
    errs = check_gradients(lambda: layer(x), lambda G: {"x": layer.backward(G)}, {"x": x})
    assert errs["x"] < 1e-7
    assert all(p.grad is None and not p.trainable for p in layer.parameters())


def test_starts_as_the_quantized_base_and_init():
    rng = np.random.default_rng(0)
    base = Linear(64, 20, rng=rng)
    layer = QALoRALinear(base, 8, 16, bits=4, group_size=16, rng=rng)  # L = 4 < r = 8 is allowed
    A = to_numpy(layer.lora_A.data)
    assert A.shape == (8, 4) and layer.lora_B.shape == (20, 8) and not np.any(to_numpy(layer.lora_B.data))
    assert np.abs(A).max() <= 0.5 and np.abs(A).max() > 0.25  # U(-1/sqrt(L), 1/sqrt(L)), L = 4
    assert layer.scaling == 2.0 and layer.adapter.num_parameters() == 8 * (4 + 20)
    q = quantize_groupwise(base.weight.data, 4, 16, scale_dtype="float16")
    assert np.array_equal(to_numpy(layer.codes), to_numpy(q.codes))
    x = asarray(rng.standard_normal((3, 64)), dtype="float32")  # (3, 64)
    assert np.array_equal(to_numpy(layer(x)), to_numpy(layer.base(x)))  # B = 0: the quantized base exactly


# ----------------------------------------------------------------- the merge
MERGE_SHAPES = [(8, 6, 2, 4), (24, 7, 3, 8), (96, 33, 5, 32), (40, 16, 4, 5)]  # (in, out, r, group_size)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float64", 1e-12)])
def test_merge_is_exact_and_keeps_codes(bits, dtype, tol):
    for k, (fin, fout, r, gs) in enumerate(MERGE_SHAPES):
        rng = np.random.default_rng(100 * bits + k)
        layer, _ = make_layer(dtype=dtype, bits=bits, seed=100 * bits + k, in_features=fin, out_features=fout,
                              r=r, group_size=gs, alpha=2.0 * r)
        layer.lora_A.data = asarray(rng.standard_normal((r, fin // gs)), dtype=dtype)  # (r, L)
        layer.lora_B.data = asarray(rng.standard_normal((fout, r)) * 0.2, dtype=dtype)  # (out, r)
        x = asarray(rng.standard_normal((3, 5, fin)), dtype=dtype)  # (3, 5, in)
        codes, scales, zeros = (to_numpy(a).copy() for a in (layer.codes, layer.scales, layer.zeros))
        y = layer(x)  # (3, 5, out), adapter unmerged
        merged = layer.merged_base()
        assert isinstance(merged, GroupwiseLinear) and (merged.bits, merged.group_size) == (bits, gs)
        assert rel(merged(x), y) < tol, (fin, fout, r, gs)
        assert np.array_equal(to_numpy(merged.codes), codes) and merged.packed.data is layer.base.packed.data
        assert np.array_equal(to_numpy(merged.scales.data), scales)
        assert np.array_equal(to_numpy(layer.zeros), zeros)  # the unmerged layer is left as it was
        # the change of the zeros is exactly the formula, and it is a real change (not a no-op)
        s, BA = layer.scaling, to_numpy(layer.lora_B.data) @ to_numpy(layer.lora_A.data)  # (out, L)
        assert rel(merged.zeros.data, zeros - s * BA / gs / scales) < tol
        assert np.array_equal(to_numpy(merged.zeros.data), to_numpy(layer.merged_zeros()))
        assert rel(merged.zeros.data, zeros) > 1e-3
        # the merged weight is the dequantized base plus the adapter's per-group constant update
        W = to_numpy(layer.base.dequantized_weight()) + to_numpy(layer.delta_weight())  # (out, in)
        assert rel(merged.dequantized_weight(), W) < tol
        # in place: the layer's base takes the merged zero points, and unmerge gives them back
        layer.merge()
        assert layer.merged and np.array_equal(to_numpy(layer.zeros), to_numpy(merged.zeros.data))
        assert rel(layer(x), y) < tol
        layer.unmerge()
        assert not layer.merged and rel(layer.zeros, zeros) < tol and np.array_equal(to_numpy(layer.codes), codes)


def test_delta_weight_is_constant_within_groups():
    layer, x = make_layer()
    D = to_numpy(layer.delta_weight()).reshape(OUT, IN // GS, GS)  # (out, L, gs)
    assert np.all(D == D[:, :, :1])  # one value per (row, group)
    # and the adapter's output is x times that update
    y_adapter = to_numpy(layer(x)) - to_numpy(layer.base(x))  # (2, 3, OUT)
    assert rel(y_adapter, to_numpy(x) @ to_numpy(layer.delta_weight()).T) < 1e-12


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_merge_refuses_non_finite():
    layer, _ = make_layer(dtype="float32")
    layer.lora_B.data[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.merge()


# ----------------------------------------------------------------- bad input and constant groups
def test_bad_group_size_and_bits():
    with pytest.raises(ValueError, match=r"in_features 12 is not divisible by group_size 5"):
        QALoRALinear(Linear(12, 4), 2, 4.0, bits=4, group_size=5)
    with pytest.raises(ValueError, match=r"12.*5"):
        GroupwiseLinear.from_weight(np.zeros((4, 12), dtype=np.float32), bits=4, group_size=5)
    for bits in (1, 9, 0, 2.5, True, "4"):
        with pytest.raises(ValueError, match="bits must be an integer between 2 and 8"):
            QALoRALinear(Linear(12, 4), 2, 4.0, bits=bits, group_size=4)
    for r in (0, -1, 2.0):
        with pytest.raises(ValueError, match="rank r"):
            QALoRALinear(Linear(12, 4), r, 4.0, group_size=4)
    with pytest.raises(ValueError, match="alpha"):
        QALoRALinear(Linear(12, 4), 2, 0.0, group_size=4)
    with pytest.raises(ValueError, match="last dimension 12"):
        QALoRALinear(Linear(12, 4), 2, 4.0, group_size=4)(asarray(np.ones((2, 8), dtype=np.float32)))
    gl = GroupwiseLinear.from_weight(np.ones((4, 12), dtype=np.float32), bits=4, group_size=4)
    with pytest.raises(ValueError, match="bits=4, group_size=4"):
        QALoRALinear(gl, 2, 4.0, bits=3, group_size=4)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_constant_groups_through_the_layer(bits):
    """Groups with max = min (zero, positive, negative constants) quantize and merge with no division by zero."""
    rng = np.random.default_rng(7)
    W = rng.standard_normal((3, 16)).astype(np.float32)  # (3, 16), groups of 4
    W[0, 0:4] = 0.0  # an all-zero group: hi = lo = 0, scale set to 1
    W[1, 4:8] = 0.7  # a positive constant group (the range holds 0, so hi - lo = 0.7)
    W[2, 8:12] = -0.3
    W[:, 12:16] = 0.0  # a whole column block of zeros
    base = Linear(16, 3)
    base.weight.data = asarray(W)  # (3, 16)
    with np.errstate(all="raise"):
        layer = QALoRALinear(base, 2, 4.0, bits=bits, group_size=4, rng=rng)
        layer.lora_B.data = asarray(rng.standard_normal((3, 2)), dtype="float32")  # (3, 2)
        x = asarray(rng.standard_normal((5, 16)), dtype="float32")  # (5, 16)
        y = layer(x)
        dx = layer.backward(asarray(np.ones((5, 3), dtype=np.float32)))
        merged = layer.merged_base()
        y_merged = merged(x)
    Wq = to_numpy(layer.base.dequantized_weight())
    for o, g, v in [(0, 0, 0.0), (1, 1, 0.7), (2, 2, -0.3), (0, 3, 0.0), (1, 3, 0.0)]:
        # a constant v is the top (or bottom) level qmax * scale, the scale rounded up to float16: within 2^-10 of v
        assert np.allclose(Wq[o, 4 * g:4 * g + 4], v, rtol=2**-10, atol=0), (o, g, Wq[o, 4 * g:4 * g + 4])
    assert np.all(to_numpy(layer.scales)[:, 3] == 1.0) and np.all(to_numpy(layer.codes)[:, 12:] == 0)
    assert np.isfinite(to_numpy(y)).all() and np.isfinite(to_numpy(dx)).all()
    assert rel(y_merged, y) < 1e-5


# ----------------------------------------------------------------- the model level
def _batch(seed=0, B=3, T=10):
    rng = np.random.default_rng(seed)
    return asarray(rng.integers(0, CFG.vocab_size, (B, T))), asarray(rng.integers(0, CFG.vocab_size, (B, T)))


def test_apply_qalora_train_and_merge_model():
    idx, tgt = _batch()
    ref = quantize_model_groupwise(GPT(CFG, seed=0), 3, 8, ALL)  # the base model in INT3, no adapters
    model = apply_qalora(GPT(CFG, seed=0), 4, 8, ALL, bits=3, group_size=8, seed=1)
    layers = lora_layers(model)
    assert len(layers) == 12 and all(m.bits == 3 and m.n_groups in (2, 8) for m in layers.values())
    assert np.array_equal(to_numpy(model(idx)), to_numpy(ref(idx)))  # B = 0: exactly the quantized base
    trainable = {n for n, p in model.named_parameters() if p.trainable}
    assert trainable == {f"{n}.adapters.default.{ab}" for n in layers for ab in "AB"}
    opt = AdamW(model.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        loss, dlogits = cross_entropy(model(idx), tgt)
        model.zero_grad()
        model.backward(dlogits)
        opt.step()
    assert all(p.grad is None for p in model.parameters() if not p.trainable)  # frozen: no gradient at all
    before = {n: to_numpy(m.codes).copy() for n, m in layers.items()}
    logits = to_numpy(model(idx)).copy()
    assert rel(logits, to_numpy(ref(idx))) > 1e-3  # training changed the model
    merge_lora(model)  # in place: the zero points take the update, the layers stay QALoRALinear
    assert all(m.merged for m in lora_layers(model).values()) and rel(model(idx), logits) < 1e-5
    unmerge_lora(model)
    assert rel(model(idx), logits) < 1e-5
    merge_and_unload(model)  # deployed: plain group-wise layers, no adapters left
    assert not lora_layers(model)
    deployed = {n: m for n, m in model.named_modules() if isinstance(m, GroupwiseLinear)}
    assert sorted(deployed) == sorted(before)
    assert all(np.array_equal(to_numpy(deployed[n].codes), before[n]) for n in before)
    assert rel(model(idx), logits) < 1e-5


def test_apply_qalora_checks_before_changing():
    model = GPT(CFG, seed=0)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q: in_features 16 is not divisible by group_size 6"):
        apply_qalora(model, 2, 4, ALL, group_size=6)
    assert not lora_layers(model)
    with pytest.raises(ValueError, match="bits"):
        apply_qalora(model, 2, 4, ALL, bits=9)
    with pytest.raises(ValueError, match="unknown target"):
        apply_qalora(model, 2, 4, ["qq"])
    apply_qalora(model, 2, 4, ["v"], group_size=8, seed=0)
    with pytest.raises(ValueError, match=r"already has an adapter \(QALoRALinear\)"):
        apply_qalora(model, 2, 4, ["v"], group_size=8)


def test_quantize_model_groupwise_merges_lora_first():
    idx, _ = _batch(1)
    model = apply_lora(GPT(CFG, seed=0), 4, 8, ["q", "fc"], seed=2)
    rng = np.random.default_rng(4)
    for layer in (m for m in model.named_modules() if isinstance(m[1], LoRALinear)):
        layer[1].lora_B.data = asarray(rng.standard_normal(layer[1].lora_B.shape) * 0.05, dtype="float32")
    q0 = model.blocks[0].attn.q
    W = to_numpy(q0.base.weight.data) + to_numpy(q0.delta_weight())  # (16, 16) float merge
    quantize_model_groupwise(model, 2, 8, ["q", "fc"])
    dep = model.blocks[0].attn.q
    assert isinstance(dep, GroupwiseLinear) and isinstance(model.blocks[0].attn.k, Linear)
    assert np.array_equal(to_numpy(dep.codes), to_numpy(quantize_groupwise(W, 2, 8, scale_dtype="float16").codes))
    assert np.isfinite(to_numpy(model(idx))).all()
    with pytest.raises(ValueError, match="already group-wise quantized"):
        quantize_model_groupwise(model, 2, 8, ["q"])


def test_the_merge_that_runs_folds_the_out_by_L_update_without_an_out_by_in_matrix(monkeypatch):
    # QA-LoRA's merge is the paper's one line on (out, L): neither the (out, in) update nor the
    # generic fold of a full update into the zero points is used
    layer, _ = make_layer(dtype="float64", bits=4, seed=7, in_features=64, out_features=24, r=4, group_size=16,
                          alpha=8.0)
    rng = np.random.default_rng(7)
    layer.lora_B.data = asarray(rng.standard_normal((24, 4)), dtype="float64")  # (out, r): a nonzero update
    expected = to_numpy(layer.merged_zeros())  # (out, L)

    def refuse(*args, **kwargs):
        raise AssertionError("the QA-LoRA merge went through an (out, in) update")

    monkeypatch.setattr(adapter_module, "merged_groupwise_copy", refuse)
    monkeypatch.setattr(adapter_module, "merged_copy", refuse)
    monkeypatch.setattr(type(layer.adapter), "delta_weight", refuse)
    zeros = to_numpy(layer.zeros).copy()
    layer.merge()
    assert np.array_equal(to_numpy(layer.zeros), expected) and not np.array_equal(expected, zeros)
    layer.unmerge()
    np.testing.assert_allclose(to_numpy(layer.zeros), zeros, rtol=0, atol=1e-12)
