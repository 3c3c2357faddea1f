"""QLoRALinear and apply_qlora (QLoRA, Dettmers et al., 2023, Section 3, Eq. 5-6).

The frozen weight lives only in NF4 (+ double-quantized block constants); the forward and the
backward dequantize it on the fly. Checked here: float64 central differences for dx, dA, dB;
PyTorch autograd through the same dequantized weight; exact equality with the dequantized base
layer at B = 0; no float copy of W0 held between calls; resident bytes against a float32
LoRALinear; the shipped base model after NF4 quantization; a short fine-tune; bad input.
The layers, the gradient check and the torch comparison are ``lora_from_scratch.verify``'s
(``make_adapter_layer``, ``adapter_gradients``, ``adapter_vs_torch``), the same that
``python -m lora_from_scratch verify`` prints.
"""

import pathlib

import numpy as np
import pytest
from conftest import rel

from lora_from_scratch import checkpoint, data, verify
from lora_from_scratch import qlora as qlora_module
from lora_from_scratch.backend import asarray, to_numpy
from lora_from_scratch.functional import cross_entropy
from lora_from_scratch.lora import LoRALinear, apply_lora, lora_layers, merge_lora
from lora_from_scratch.memory import resident_bytes
from lora_from_scratch.nn import Linear, Module, Parameter
from lora_from_scratch.qlora import NF4Linear, QLoRALinear, apply_qlora
from lora_from_scratch.quant import Quantized4bit, dequantize_4bit, quantize_4bit
from lora_from_scratch.train import TrainConfig, evaluate, train

IN, OUT, R = verify.ADAPTER_SHAPES["qlora"]  # 42, 24, 3: 1008 weights, 15 blocks of 64 and one of 48, or 63 of 16
ALL = ["q", "k", "v", "o", "fc", "proj"]
BASE = pathlib.Path(__file__).parents[1] / "lora_from_scratch" / "checkpoints" / "base.safetensors"
GRAD_CASES = [(p, rs, dq, bs) for p in (0.0, 0.4) for rs in (False, True) for dq, bs in ((True, 64), (False, 16))]


def make_layer(p=0.0, use_rslora=False, double_quant=True, blocksize=64, dtype="float64", seed=0, randomize_B=True,
               lead=(3, 5)):
    """``verify.make_adapter_layer``'s QLoRALinear (IN -> OUT, rank R) over a random Linear (random bias) of
    ``dtype``; B random (as after training) by default; an input (*lead, IN) and, with dropout, a fixed mask."""
    return verify.make_adapter_layer("qlora", dtype, seed, dropout=p, use_rslora=use_rslora, blocksize=blocksize,
                                     double_quant=double_quant, randomize_B=randomize_B, lead=lead)


def float_arrays(obj, path="layer", seen=None):
    """(path, array) for every floating array reachable from ``obj``'s attributes, caches included."""
    seen = set() if seen is None else seen
    if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, bool, type, np.dtype)):
        return []
    seen.add(id(obj))
    if type(obj).__module__.split(".")[0] in ("numpy", "cupy"):  # an array (or a NumPy scalar)
        return [(path, obj)] if getattr(obj, "dtype", np.dtype("O")).kind == "f" else []
    if isinstance(obj, dict):
        items = [(f"{path}[{k!r}]", v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple)):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
    elif hasattr(obj, "__dict__"):
        items = [(f"{path}.{k}", v) for k, v in vars(obj).items()]
    else:
        return []
    return [found for sub, v in items for found in float_arrays(v, sub, seen)]


# ----------------------------------------------------------------- gradients and parity
@pytest.mark.parametrize("p,use_rslora,double_quant,blocksize", GRAD_CASES)
def test_gradcheck(p, use_rslora, double_quant, blocksize):
    # float64 layer from a float64 base: the NF4 weight is fixed data, dequantized and cast to float64
    layer, x, mask = make_layer(p, use_rslora, double_quant, blocksize)

    measured = verify.assert_ok(verify.adapter_gradients(layer, x, dropout_mask=mask))  # rel error < 1e-7
    assert [m.what for m in measured] == ["d/dx", "d/dA", "d/dB"]
    assert layer.bias.grad is None and not layer.bias.trainable


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-5)])
@pytest.mark.parametrize("p,use_rslora", [(0.0, False), (0.4, True)])
def test_torch_parity(p, use_rslora, dtype, tol):
    pytest.importorskip("torch")
    layer, x, mask = make_layer(p, use_rslora, dtype=dtype)
    G = asarray(np.random.default_rng(5).standard_normal((3, 5, OUT)), dtype=dtype)  # (3, 5, OUT)
    # the layer in torch ops through the same dequantized weight: output, dx, dA, dB (and their dtypes)
    measured = verify.assert_ok(verify.adapter_vs_torch(layer, x, G, dtype, mask=mask))
    assert [m.what for m in measured] == ["output", "dx", "dA", "dB"] and all(m.bound == tol for m in measured)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_zero_B_is_exactly_the_dequantized_base_layer(dtype):
    # Exact, not just to rounding: the frozen path is the same matrix product as the reference
    # (same operands, same shapes, one BLAS call), and the adapter's term s (x A^T) B^T with B = 0
    # is exactly zero, which leaves every float of the frozen path unchanged when added.
    layer, x, _ = make_layer(dtype=dtype, randomize_B=False, lead=(7,))
    assert not np.any(to_numpy(layer.lora_B.data))
    W = layer.dequantized_weight().astype(dtype)  # (OUT, IN)
    ref = x @ W.T + layer.bias.data  # (7, IN) @ (IN, OUT) + (OUT,) -> (7, OUT)
    assert np.array_equal(to_numpy(layer(x)), to_numpy(ref))


def test_dtype_policy_and_quantized_weight():
    rng = np.random.default_rng(3)
    base = Linear(IN, OUT, rng=rng, dtype="float64")
    W0 = to_numpy(base.weight.data).copy()  # (OUT, IN) float64
    layer = QLoRALinear(base, R, 4.0, rng=rng)
    assert isinstance(layer.weight_q, Quantized4bit) and layer.weight_q.quant_type == "nf4"
    assert layer.weight_q.double_quant and layer.weight_q.blocksize == 64
    assert layer.weight_q.packed.dtype == np.uint8 and layer.weight_q.packed.shape == (IN * OUT // 2,)
    deq = layer.dequantized_weight()
    assert deq.dtype == np.float32 and deq.shape == (OUT, IN)  # NF4 dequantization yields float32
    same = dequantize_4bit(quantize_4bit(asarray(W0), blocksize=64, quant_type="nf4", double_quant=True))
    assert np.array_equal(to_numpy(deq), to_numpy(same))
    assert layer.lora_A.dtype == np.float64 and layer.lora_B.dtype == np.float64  # the adapter: base dtype
    x = asarray(rng.standard_normal((2, IN)))  # (2, IN) float64
    assert layer(x).dtype == np.float64  # computation type = the adapter's dtype
    layer.astype("float32")  # casts the adapter and bias; the 4-bit weight is unchanged
    assert layer(x.astype("float32")).dtype == np.float32
    assert np.array_equal(to_numpy(layer.dequantized_weight()), to_numpy(deq))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_linear_and_its_nf4_base_give_the_same_layer(dtype):
    # The adapter takes the float weight's dtype either way: an NF4Linear remembers it as weight_dtype.
    lin = Linear(IN, OUT, rng=np.random.default_rng(5), dtype=dtype)
    from_linear = QLoRALinear(lin, R, 4.0, rng=np.random.default_rng(6))
    from_nf4 = QLoRALinear(NF4Linear.from_linear(lin), R, 4.0, rng=np.random.default_rng(6))
    for name in ("lora_A", "lora_B"):
        a, b = getattr(from_linear, name), getattr(from_nf4, name)
        assert a.dtype == b.dtype == np.dtype(dtype)
        assert np.array_equal(to_numpy(a.data), to_numpy(b.data))  # the same draws
    x = asarray(np.random.default_rng(7).standard_normal((2, IN)).astype(dtype))  # (2, IN)
    assert np.array_equal(to_numpy(from_linear(x)), to_numpy(from_nf4(x)))


def test_same_adapter_init_as_lora():
    for init in ("kaiming", "gaussian"):
        W = np.random.default_rng(0).standard_normal((OUT, IN)).astype("float32")  # (OUT, IN)
        lin_a, lin_b = Linear(IN, OUT), Linear(IN, OUT)
        lin_a.weight.data, lin_b.weight.data = asarray(W), asarray(W.copy())
        q = QLoRALinear(lin_a, R, 8, init=init, rng=np.random.default_rng(9))
        lo = LoRALinear(lin_b, R, 8, init=init, rng=np.random.default_rng(9))
        assert np.array_equal(to_numpy(q.lora_A.data), to_numpy(lo.lora_A.data))
        assert q.lora_B.shape == (OUT, R) and not np.any(to_numpy(q.lora_B.data))


# ----------------------------------------------------------------- memory: no float W0 between calls
def test_no_float_copy_of_W0_is_kept(monkeypatch):
    layer, x, _ = make_layer(dtype="float32", lead=(3, 5))  # 15 rows: no activation has OUT rows
    calls = []
    original = qlora_module.dequantize_4bit
    monkeypatch.setattr(qlora_module, "dequantize_4bit", lambda q: calls.append(1) or original(q))
    assert layer.base.dequantizations == 0

    def big_float_arrays():
        return [(path, a.shape) for path, a in float_arrays(layer)
                if tuple(a.shape) in ((OUT, IN), (IN, OUT)) or a.size >= OUT * IN]

    assert big_float_arrays() == []
    layer(x)
    assert len(calls) == 1
    assert big_float_arrays() == []  # the cache holds x, dropout(x) and s u: no (out, in) matrix
    dx = layer.backward(asarray(np.ones((3, 5, OUT), dtype="float32")))
    assert len(calls) == 2 and layer.base.dequantizations == 2  # the backward dequantized W0 again (not kept)
    assert dx.shape == x.shape and layer._cache is None
    assert big_float_arrays() == []
    assert not any(isinstance(v, Parameter) and v.shape == (OUT, IN) for v in vars(layer).values())


@pytest.mark.parametrize("double_quant", [True, False])
def test_resident_bytes_against_float32_lora(double_quant):
    d = k = 512
    r = 8
    rng = np.random.default_rng(0)
    lin_q, lin_l = Linear(k, d, rng=rng), Linear(k, d, rng=rng)
    q = QLoRALinear(lin_q, r, 16, double_quant=double_quant, rng=rng)
    lo = LoRALinear(lin_l, r, 16, rng=rng)
    n, blocks = d * k, d * k // 64
    adapters_and_bias = 4 * r * (d + k) + 4 * d  # float32 A, B and the bias
    lora_expected = 4 * n + adapters_and_bias
    if double_quant:  # 4-bit codes + 8-bit constants + a float32 scale per 256 constants + the float32 offset
        weight_bits = 4 + 8 / 64 + 32 / (64 * 256) + 32 / n
        weight_bytes = n // 2 + blocks + 4 * (-(-blocks // 256)) + 4
    else:  # 4-bit codes + a float32 constant per block
        weight_bits = 4 + 32 / 64
        weight_bytes = n // 2 + 4 * blocks
    assert weight_bytes == n * weight_bits / 8  # 4.127 (or 4.5) bits per weight, from the formula
    assert resident_bytes(lo) == lora_expected
    assert resident_bytes(q) == weight_bytes + adapters_and_bias
    assert q.weight_q.nbytes == weight_bytes  # the stored arrays' own nbytes say the same
    x = asarray(rng.standard_normal((4, k)), dtype="float32")  # (4, k)
    q.backward(q(x))
    assert resident_bytes(q) == weight_bytes + adapters_and_bias  # unchanged after a training step's passes
    ratio = resident_bytes(lo) / resident_bytes(q)
    expected_ratio = lora_expected / (n * weight_bits / 8 + adapters_and_bias)
    assert abs(ratio / expected_ratio - 1) < 1e-12
    # the frozen weight alone: 32 / 4.127 = 7.75x (32 / 4.5 = 7.11x) smaller; the float32 adapters and bias
    # (34,816 bytes, the same in both) bring the whole layer's ratio down to 6.37x (5.94x)
    assert abs(4 * n / weight_bytes - 32 / (4.127 if double_quant else 4.5)) < 1e-3
    assert ratio > (6.3 if double_quant else 5.9)


# ----------------------------------------------------------------- deployment
def test_merged_base_and_merge_lora_on_qlora():
    layer, x, _ = make_layer(dtype="float32", lead=(6,))
    deq = to_numpy(layer.dequantized_weight())
    merged = layer.merged_base().weight.data
    assert merged.dtype == np.float32 and merged.shape == (OUT, IN)
    delta = layer.scaling * to_numpy(layer.lora_B.data) @ to_numpy(layer.lora_A.data)  # (OUT, IN)
    assert rel(merged, deq + delta) < 1e-6
    assert rel(layer.delta_weight(), delta) < 1e-6

    class Holder(Module):
        def __init__(self, lin):
            self.lin = lin

    y = to_numpy(layer(x)).copy()
    with pytest.raises(ValueError, match="cannot merge in place"):
        layer.merge()  # an NF4 weight cannot hold the update
    holder = merge_lora(Holder(layer))
    assert type(holder.lin) is Linear and not holder.lin.weight.trainable
    assert np.array_equal(to_numpy(holder.lin.weight.data), to_numpy(merged))
    assert rel(holder.lin(x), y) < 1e-6  # the merged float layer computes what the QLoRA layer computed
    layer2, _, _ = make_layer(dtype="float32", lead=(6,))
    float_merged = layer2.merged_base().weight.data
    holder = merge_lora(Holder(layer2), requantize=True)
    assert type(holder.lin) is NF4Linear and holder.lin.double_quant
    again = dequantize_4bit(quantize_4bit(float_merged, 64, "nf4", double_quant=True))
    assert np.array_equal(to_numpy(holder.lin.dequantized_weight()), to_numpy(again))


# ----------------------------------------------------------------- the shipped base model
@pytest.fixture(scope="module")
def pretrain_eval():
    return data.eval_set(data.PRETRAIN_TASKS, 128, seed=0)


def test_apply_qlora_on_base_model(pretrain_eval):
    model = checkpoint.load_checkpoint(str(BASE))
    floats = {name: to_numpy(m.weight.data).copy() for name, m in model.named_modules() if type(m) is Linear}
    float_scores = evaluate(model, pretrain_eval)
    apply_qlora(model, 8, 16, ALL, seed=0)
    layers = lora_layers(model)
    assert sorted(layers) == sorted(floats) and len(layers) == 6 * model.config.n_layer
    named = dict(model.named_parameters())
    trainable = sorted(n for n, p in named.items() if p.trainable)
    assert trainable == sorted(f"{n}.adapters.default.{ab}" for n in layers for ab in ("A", "B"))
    for name, layer in layers.items():  # W0 is gone: no float (out, in) Parameter, only the NF4 codes
        shape = (layer.out_features, layer.in_features)
        assert not any(n.startswith(name + ".") and p.shape == shape for n, p in named.items()), name
        assert not any(a.shape == shape for _, a in float_arrays(layer)), name
    # the reference: the float model with every targeted weight replaced by its NF4-dequantized values
    ref = checkpoint.load_checkpoint(str(BASE))
    for name, m in ref.named_modules():
        if type(m) is Linear:
            m.weight.data = dequantize_4bit(quantize_4bit(asarray(floats[name]), 64, "nf4", double_quant=True))
    idx = pretrain_eval["sort"][0]  # (128, T)
    # B = 0: exactly equal (each frozen path is the same float32 product; the adapters add zeros)
    assert np.array_equal(to_numpy(model(idx)), to_numpy(ref(idx)))
    assert rel(model(idx), ref(idx)) < 1e-6
    # exact match on the pre-training tasks survives NF4 (blocks of 64, double quantization) of all six
    # matrices in every block. Measured (128 rows per task, seed 0): float 1.0 / 1.0 / 0.984 / 1.0,
    # NF4 1.0 / 1.0 / 0.984 / 1.0 for copy / reverse / sort / upper.
    scores = evaluate(model, pretrain_eval)
    for task in data.PRETRAIN_TASKS:
        assert scores[task] >= 0.9, (task, scores)
        assert scores[task] >= float_scores[task] - 0.05, (task, scores, float_scores)
    # one backward: only the adapters get gradients
    loss, dlogits = cross_entropy(model(idx), pretrain_eval["sort"][1])
    model.backward(dlogits)
    assert all((p.grad is not None) == p.trainable for p in model.parameters())


def test_short_qlora_fine_tune_learns_desc():
    model = apply_qlora(checkpoint.load_checkpoint(str(BASE)), 8, 16, ALL, seed=0)
    desc = data.eval_set((data.FINETUNE_TASK,), 128, seed=0)
    before = evaluate(model, desc)[data.FINETUNE_TASK]
    frozen = {n: to_numpy(p.data).copy() for n, p in model.named_parameters() if not p.trainable}
    packed = {n: to_numpy(m.weight_q.packed).copy() for n, m in lora_layers(model).items()}
    cfg = TrainConfig(steps=60, batch_size=32, lr=1e-2, warmup_steps=10, eval_every=0,
                      tasks=(data.FINETUNE_TASK,), seed=0)
    history = train(model, cfg, progress=False, eval_sets=desc)
    after = history["eval"][-1][1][data.FINETUNE_TASK]
    # measured: 0.0 before, 0.46 after 60 steps (128 rows, seed 0)
    assert before <= 0.02 and after >= 0.25, (before, after)
    assert history["loss"][-1] < 0.5 * history["loss"][0]
    for n, p in model.named_parameters():
        if n in frozen:
            assert np.array_equal(to_numpy(p.data), frozen[n]), n
    for n, m in lora_layers(model).items():  # the 4-bit base weights never changed
        assert np.array_equal(to_numpy(m.weight_q.packed), packed[n]), n


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize("r", [0, -1, 17, 2.5])
def test_bad_rank(r):
    base = Linear(16, 64, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="rank"):
        QLoRALinear(base, r, 8)
    assert base.weight.trainable  # nothing was frozen
    model = checkpoint.load_checkpoint(str(BASE))
    with pytest.raises(ValueError, match="rank"):
        apply_qlora(model, 200 if r == 17 else r, 8, ["fc"])  # 200 > min(128, 512)
    assert not lora_layers(model)


@pytest.mark.parametrize("blocksize", [48, 100, 0, -64, 8, 8192, 64.0, True])
def test_bad_blocksize(blocksize):
    base = Linear(16, 64, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="blocksize"):
        QLoRALinear(base, 4, 8, blocksize=blocksize)
    model = checkpoint.load_checkpoint(str(BASE))
    with pytest.raises(ValueError, match="blocksize"):
        apply_qlora(model, 4, 8, ALL, blocksize=blocksize)
    assert not lora_layers(model) and all(p.trainable for p in model.parameters())


def test_bad_arguments():
    model = checkpoint.load_checkpoint(str(BASE))
    with pytest.raises(ValueError) as e:
        apply_qlora(model, 4, 8, ["q", "foo"])
    assert str(e.value).startswith("unknown target 'foo'; valid targets: ['q', 'k', 'v', 'o', 'fc', 'proj']")
    with pytest.raises(ValueError, match="valid targets"):
        apply_qlora(model, 4, 8, ["blocks.0.Wq"])
    with pytest.raises(ValueError, match="block 9.*4 blocks"):
        apply_qlora(model, 4, 8, ["blocks.9.q"])
    with pytest.raises(ValueError, match="alpha"):
        apply_qlora(model, 4, 0, ["q"])
    with pytest.raises(ValueError, match="pissa"):
        apply_qlora(model, 4, 8, ["q"], init="pissa")
    with pytest.raises(ValueError, match="init"):
        apply_qlora(model, 4, 8, ["q"], init="xavier")
    with pytest.raises(ValueError, match="dropout"):
        apply_qlora(model, 4, 8, ["q"], dropout=1.0)
    with pytest.raises(ValueError, match="nn.Linear"):
        QLoRALinear(model.blocks[0].ln_1, 4, 8)
    assert not lora_layers(model) and all(p.trainable for p in model.parameters())  # unchanged
    apply_qlora(model, 4, 8, ["q"], seed=0)
    with pytest.raises(ValueError, match=r"already has an adapter \(QLoRALinear\)"):
        apply_qlora(model, 4, 8, ["blocks.1.q"], seed=0)
    lora_model = apply_lora(checkpoint.load_checkpoint(str(BASE)), 4, 8, ["v"], seed=0)
    with pytest.raises(ValueError, match=r"already has an adapter \(LoRALinear\)"):
        apply_qlora(lora_model, 4, 8, ["v"])
    layer, x, _ = make_layer(dtype="float32")
    with pytest.raises(ValueError, match=f"last dimension {IN}"):
        layer(x[..., :-1])
    with pytest.raises(RuntimeError, match="without a forward"):
        layer.backward(asarray(np.ones((3, 5, OUT), dtype="float32")))


def test_source_has_no_numpy_import():
    src = (pathlib.Path(__file__).parents[1] / "lora_from_scratch" / "qlora.py").read_text()
    assert "import numpy" not in src
