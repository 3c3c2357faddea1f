"""One adapter family: every model-level tool works for LoRA, QLoRA and QA-LoRA alike, or says why not.

An adapted layer is a frozen base plus named low-rank adapters (``adapter.AdaptedLinear``). Checked
here for each kind, on a small GPT: the per-task state dict and its round trip, merge / unmerge,
``merge_and_unload``, ``count_parameters``, ``disable_adapters`` (bit for bit the base model's
logits), several named adapters on one base and the switch between them, per-task adapter files,
and the ValueError each tool raises on a model without adapters. The training forward never forms
an (out, in) temporary and never keeps a dequantized W0 from forward to backward.
"""

import os
import tempfile

import numpy as np
import pytest
from conftest import rel

from lora_from_scratch import checkpoint, lora
from lora_from_scratch import functional as F
from lora_from_scratch.adapter import AdaptedLinear, QuantizedLinear, base_merges_in_place, merged_copy
from lora_from_scratch.backend import asarray, global_rng, manual_seed, to_numpy
from lora_from_scratch.model import GPT, GPTConfig
from lora_from_scratch.nn import Buffer, Linear
from lora_from_scratch.optim import AdamW
from lora_from_scratch.qalora import GroupwiseLinear, QALoRALinear, apply_qalora
from lora_from_scratch.qlora import NF4Linear, QLoRALinear, apply_qlora

CFG = GPTConfig(vocab_size=29, block_size=12, n_layer=2, n_head=2, n_embd=32)
TARGETS = ["q", "v", "o", "fc"]
KINDS = ("lora", "qlora", "qalora")
LAYER_CLASS = {"lora": lora.LoRALinear, "qlora": QLoRALinear, "qalora": QALoRALinear}
BASE_CLASS = {"lora": Linear, "qlora": NF4Linear, "qalora": GroupwiseLinear}


def adapt(kind, model=None, r=4, seed=1, **kw):
    model = GPT(CFG, seed=0) if model is None else model
    if kind == "lora":
        return lora.apply_lora(model, r, 8, TARGETS, seed=seed, **kw)
    if kind == "qlora":
        return apply_qlora(model, r, 8, TARGETS, seed=seed, **kw)
    return apply_qalora(model, r, 8, TARGETS, bits=4, group_size=8, seed=seed, **kw)


def randomize_B(model, seed=2, scale=0.2):
    rng = np.random.default_rng(seed)
    for layer in lora.lora_layers(model).values():
        layer.lora_B.data = asarray(rng.standard_normal(layer.lora_B.shape) * scale, dtype="float32")
    return model


def batch(seed=0, B=3, T=10):
    rng = np.random.default_rng(seed)
    return asarray(rng.integers(0, CFG.vocab_size, (B, T))), asarray(rng.integers(0, CFG.vocab_size, (B, T)))


def logits(model, idx):
    return to_numpy(model(idx)).copy()


# ----------------------------------------------------------------- the structure
@pytest.mark.parametrize("kind", KINDS)
def test_layer_is_a_base_plus_an_adapter(kind):
    model = adapt(kind)
    layers = lora.lora_layers(model)
    assert len(layers) == len(TARGETS) * CFG.n_layer
    for path, layer in layers.items():
        assert type(layer) is LAYER_CLASS[kind] and isinstance(layer, AdaptedLinear), path
        assert type(layer.base) is BASE_CLASS[kind], path
        assert layer.adapters.keys() == ["default"] and layer.active == "default"
        k = layer.in_features // 8 if kind == "qalora" else layer.in_features
        assert layer.lora_A.shape == (4, k) and layer.lora_B.shape == (layer.out_features, 4)
        assert layer.group_size == (8 if kind == "qalora" else None)
        assert all(not p.trainable for p in layer.base.parameters())
        if kind != "lora":  # the quantized storage: buffers, seen by traversal, not parameters
            buffers = dict(layer.base.named_buffers())
            assert buffers and all(isinstance(b, Buffer) for b in buffers.values())
            assert not any(p.shape == (layer.out_features, layer.in_features) for p in layer.base.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_every_array_lives_on_the_backend_under_test(kind, backend):
    """With LFS_BACKEND=cupy every parameter and buffer of every kind is a CuPy array, and so are the outputs."""
    model = randomize_B(adapt(kind))
    arrays = dict(model.named_arrays())
    elsewhere = [n for n, h in arrays.items() if not backend.owns(h.data)]
    assert not elsewhere, elsewhere
    idx, tgt = batch()
    out = model(backend.put(backend.host(idx)))
    loss, dlogits = F.cross_entropy(out, tgt)
    model.backward(dlogits)
    assert backend.owns(out) and backend.owns(dlogits)
    grads = [p.grad for p in model.trainable_parameters()]
    assert grads and all(g is not None and backend.owns(g) for g in grads)


@pytest.mark.parametrize("kind", KINDS)
def test_count_parameters(kind):
    plain_total = GPT(CFG, seed=0).num_parameters()
    model = adapt(kind)
    expected = 0
    for path, layer in lora.lora_layers(model).items():
        n = layer.r * (layer.adapter_in_features + layer.out_features)  # r (k' + d), by hand
        assert layer.adapter.num_parameters() == n, path
        expected += n
    # the quantized weights count as the weights they encode, so every kind has the same total
    assert lora.count_parameters(model) == (expected, plain_total + expected)


@pytest.mark.parametrize("kind", KINDS)
def test_training_forward_holds_no_out_in_float_matrix(kind):
    """Two-path form: no (out, in) temporary in any cache, and quantized bases dequantize twice per step."""
    model = randomize_B(adapt(kind))
    idx, tgt = batch()
    model(idx)
    for path, layer in lora.lora_layers(model).items():
        shape = (layer.out_features, layer.in_features)
        cached = [a for a in _arrays(layer.adapter._cache) + _arrays(layer.base._cache) if a.ndim == 2]
        if kind != "lora":
            assert not any(tuple(a.shape) == shape for a in cached), path  # no dequantized W0 kept
        else:  # the float base's cache holds W0 itself (the Parameter's array, not a new one)
            assert all(a is layer.base.weight.data for a in cached if tuple(a.shape) == shape), path
    for layer in lora.lora_layers(model).values():
        layer.base.dequantizations = 0
    loss, dlogits = F.cross_entropy(model(idx), tgt)
    model.backward(dlogits)
    if kind != "lora":  # one training step: W0 dequantized in the forward and again in the backward
        assert {layer.base.dequantizations for layer in lora.lora_layers(model).values()} == {2}


def _arrays(obj):
    if obj is None:
        return []
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [a for o in obj for a in _arrays(o)]
    if isinstance(obj, dict):
        return [a for o in obj.values() for a in _arrays(o)]
    return []


# ----------------------------------------------------------------- state dicts and files
@pytest.mark.parametrize("kind", KINDS)
def test_lora_state_dict_round_trip(kind):
    a = randomize_B(adapt(kind))
    state = lora.lora_state_dict(a)
    assert sorted(state) == sorted(f"{p}.lora_{ab}" for p in lora.lora_layers(a) for ab in "AB")
    b = adapt(kind, seed=7)
    idx, _ = batch()
    assert not np.array_equal(logits(a, idx), logits(b, idx))
    lora.load_lora_state_dict(b, state)
    assert np.array_equal(logits(a, idx), logits(b, idx))
    bad = dict(state)
    key = next(iter(bad))
    bad[key] = np.zeros((9, 9), dtype=np.float32)
    with pytest.raises(ValueError, match=r"shape mismatch for '.*lora_A'"):
        lora.load_lora_state_dict(b, bad)


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_file_round_trip(kind, tmp_path):
    a = randomize_B(adapt(kind))
    path = str(tmp_path / "task.safetensors")
    checkpoint.save_adapter(a, path)
    b = adapt(kind, seed=9)
    name = checkpoint.load_adapter(b, path, name="task")
    idx, _ = batch(1)
    assert name == "task" and lora.active_adapter(b) == "task"
    assert np.array_equal(logits(a, idx), logits(b, idx))
    trainable = {n for n, p in b.named_parameters() if p.trainable}
    assert trainable and all(".adapters.task." in n for n in trainable)
    with pytest.raises(ValueError, match="not a lora_from_scratch adapter file"):
        checkpoint.load_adapter(b, checkpoint.BASE_CHECKPOINT)


# ----------------------------------------------------------------- merging
@pytest.mark.parametrize("kind", KINDS)
def test_merge_lora_and_unmerge(kind):
    model = randomize_B(adapt(kind))
    idx, _ = batch(2)
    y = logits(model, idx)
    before = {k: to_numpy(v).copy() for k, v in model.state_dict().items()}
    lora.merge_lora(model)
    assert rel(model(idx), y) < 1e-5
    if kind == "qlora":  # leaves the 4-bit world: float layers, not undoable
        assert not lora.lora_layers(model)
        assert all(type(model.get_submodule(f"blocks.{i}.attn.q")) is Linear for i in range(CFG.n_layer))
        with pytest.raises(ValueError, match="no merged adapter layers"):
            lora.unmerge_lora(model)
        return
    assert all(layer.merged for layer in lora.lora_layers(model).values())
    with pytest.raises(ValueError, match="already merged"):
        lora.merge_lora(model)
    loss, dlogits = F.cross_entropy(model(idx), idx)
    with pytest.raises(RuntimeError, match="merged"):
        model.backward(dlogits)  # training a merged model is refused
    with pytest.raises(ValueError, match="merged"):
        lora.load_lora_state_dict(model, lora.lora_state_dict(model))
    lora.unmerge_lora(model)
    assert rel(model(idx), y) < 1e-5
    for k, v in model.state_dict().items():
        assert rel(v, before[k]) < 1e-6, k  # merge -> refused load -> unmerge restores W0 / the zero points


def test_qlora_merge_requantized_is_nf4():
    model = randomize_B(adapt("qlora"))
    idx, _ = batch(3)
    y = logits(model, idx)
    lora.merge_lora(model, requantize=True)
    layer = model.get_submodule("blocks.0.attn.q")
    assert type(layer) is NF4Linear and layer.double_quant
    assert rel(model(idx), y) < 0.2  # re-quantizing moves the logits (QLoRA's deployment weakness)
    with pytest.raises(ValueError, match="requantize"):
        lora.merge_lora(randomize_B(adapt("lora")), requantize=True)


@pytest.mark.parametrize("kind", ["lora", "qalora"])
def test_requantize_without_an_nf4_base_is_refused_by_both_merges(kind):
    """merge_lora and merge_and_unload refuse requantize=True alike on a model with no QLoRA layer; nothing changes."""
    model = randomize_B(adapt(kind))
    idx, _ = batch(4)
    y = logits(model, idx)
    before = {k: to_numpy(v).copy() for k, v in model.state_dict().items()}
    for merge in (lora.merge_lora, lora.merge_and_unload):
        with pytest.raises(ValueError, match=rf"{merge.__name__}\(requantize=True\).*this model has none"):
            merge(model, requantize=True)
    assert all(type(layer) is LAYER_CLASS[kind] and not layer.merged for layer in lora.lora_layers(model).values())
    assert len(lora.lora_layers(model)) == len(TARGETS) * CFG.n_layer
    assert np.array_equal(logits(model, idx), y)
    assert all(np.array_equal(to_numpy(v), before[k]) for k, v in model.state_dict().items())
    if kind == "lora":  # a merged model too: merge_and_unload(requantize=True) does not deploy it silently
        lora.merge_lora(model)
        with pytest.raises(ValueError, match="requantize"):
            lora.merge_and_unload(model, requantize=True)
        assert all(layer.merged for layer in lora.lora_layers(model).values())


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_deploys_plain_layers(kind):
    model = randomize_B(adapt(kind))
    idx, _ = batch(4)
    y = logits(model, idx)
    lora.merge_and_unload(model)
    assert not lora.lora_layers(model)
    deployed = type(model.get_submodule("blocks.1.mlp.fc"))
    assert deployed is {"lora": Linear, "qlora": Linear, "qalora": GroupwiseLinear}[kind]
    assert rel(model(idx), y) < 1e-5


def test_group_wise_base_refuses_an_update_that_varies_within_a_group():
    layer = adapt("qalora").get_submodule("blocks.0.attn.q")
    delta = asarray(np.random.default_rng(0).standard_normal((layer.out_features, layer.in_features)),
                    dtype="float32")
    with pytest.raises(ValueError, match="constant within each group"):
        merged_copy(layer.base, delta)


@pytest.mark.parametrize("kind", KINDS)
def test_every_base_refuses_an_update_of_another_shape(kind):
    layer = adapt(kind).get_submodule("blocks.0.attn.q")
    base = layer.base
    delta = asarray(np.zeros((base.out_features, base.in_features + 1)), dtype="float32")
    with pytest.raises(ValueError, match=r"update of shape \(\d+, \d+\) does not fit the weight"):
        merged_copy(base, delta)


def test_a_merge_into_a_base_of_no_known_format_is_refused_by_name():
    from lora_from_scratch.nn import Embedding

    with pytest.raises(ValueError, match="no merge is known for a Embedding base"):
        merged_copy(Embedding(8, 4), asarray(np.zeros((8, 4)), dtype="float32"))


# ----------------------------------------------------------------- disabling and named adapters
@pytest.mark.parametrize("kind", KINDS)
def test_disable_adapters_gives_the_base_model_bit_for_bit(kind):
    idx, _ = batch(5)
    plain = GPT(CFG, seed=0)
    model = randomize_B(adapt(kind, GPT(CFG, seed=0)))
    adapted = logits(model, idx)
    reference = logits(lora.merge_and_unload(randomize_B(adapt(kind, GPT(CFG, seed=0)), scale=0.0)), idx)
    if kind == "lora":
        assert np.array_equal(reference, logits(plain, idx))
    with lora.disable_adapters(model):
        inside = logits(model, idx)
    assert np.array_equal(inside, reference)  # the base model's outputs, bit for bit
    assert not np.array_equal(inside, adapted)
    assert np.array_equal(logits(model, idx), adapted)  # restored on exit
    with pytest.raises(ValueError, match="no active adapter"):
        with lora.disable_adapters(model):
            lora.lora_state_dict(model)


@pytest.mark.parametrize("kind", KINDS)
def test_named_adapters_switch_tasks_on_one_base(kind):
    model = randomize_B(adapt(kind), seed=3)
    idx, tgt = batch(6)
    first = logits(model, idx)
    lora.add_adapter(model, "second", r=2, alpha=4, seed=11)
    assert lora.adapter_names(model) == ["default", "second"] and lora.active_adapter(model) == "default"
    assert np.array_equal(logits(model, idx), first)  # adding does not change the active one
    lora.set_adapter(model, "second")
    trainable = {n for n, p in model.named_parameters() if p.trainable}
    assert trainable and all(".adapters.second." in n for n in trainable)
    fresh = logits(model, idx)  # the new adapter starts with B = 0: the base model's logits
    with lora.disable_adapters(model):
        assert np.array_equal(logits(model, idx), fresh)
    opt = AdamW(model.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        loss, dlogits = F.cross_entropy(model(idx), tgt)
        model.zero_grad()
        model.backward(dlogits)
        opt.step()
    second = logits(model, idx)
    assert not np.array_equal(second, first)
    lora.set_adapter(model, "default")
    assert np.array_equal(logits(model, idx), first)  # the first task's adapter is untouched
    lora.set_adapter(model, "second")
    assert np.array_equal(logits(model, idx), second)
    with pytest.raises(ValueError, match="active adapter"):
        lora.delete_adapter(model, "second")
    lora.set_adapter(model, "default")
    lora.delete_adapter(model, "second")
    assert lora.adapter_names(model) == ["default"]
    with pytest.raises(ValueError, match="only adapter"):
        lora.delete_adapter(model, "default")
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        lora.set_adapter(model, "nope")
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        lora.add_adapter(model, "default", r=2, alpha=4)
    with pytest.raises(ValueError, match="name"):
        lora.add_adapter(model, "a.b", r=2, alpha=4)


@pytest.mark.parametrize("kind", KINDS)
def test_refusals_leave_the_model_unchanged(kind):
    """A PiSSA adapter cannot be added, and merging inside disable_adapters is refused, naming the layer; nothing
    changes."""
    model = randomize_B(adapt(kind))
    idx, _ = batch(7)
    y = logits(model, idx)
    why = "first adapter" if kind == "lora" else "unsupported LoRA init 'pissa'"
    with pytest.raises(ValueError, match=why):
        lora.add_adapter(model, "second", r=2, alpha=4, init="pissa", seed=3)
    assert lora.adapter_names(model) == ["default"]
    with lora.disable_adapters(model):
        for merge in (lora.merge_lora, lora.merge_and_unload):
            with pytest.raises(ValueError, match=r"^merge.* inside lora\.disable_adapters \(blocks\.0\.attn\.q\)"):
                merge(model)
    assert all(type(layer) is LAYER_CLASS[kind] and not layer.merged for layer in lora.lora_layers(model).values())
    assert len(lora.lora_layers(model)) == len(TARGETS) * CFG.n_layer
    assert np.array_equal(logits(model, idx), y)


# ----------------------------------------------------------------- no silent no-ops
@pytest.mark.parametrize("tool", [
    lambda m: lora.lora_state_dict(m),
    lambda m: lora.load_lora_state_dict(m, {}),
    lambda m: lora.merge_lora(m),
    lambda m: lora.merge_and_unload(m),
    lambda m: lora.disable_adapters(m).__enter__(),
    lambda m: lora.add_adapter(m, "x", 2, 4),
    lambda m: lora.set_adapter(m, "x"),
    lambda m: lora.adapter_names(m),
])
def test_every_tool_refuses_a_model_without_adapters(tool):
    with pytest.raises(ValueError, match="no adapter layers"):
        tool(GPT(CFG, seed=0))


def test_unmerge_of_a_model_that_is_not_merged_is_refused():
    with pytest.raises(ValueError, match="no merged adapter layers"):
        lora.unmerge_lora(adapt("lora"))


@pytest.mark.parametrize("kind", KINDS)
def test_to_moves_parameters_and_buffers(kind, monkeypatch):
    """Module.to replaces every parameter's and buffer's array (checked on the CPU with a marker class)."""
    from lora_from_scratch import nn

    class Moved(np.ndarray):
        pass

    model = adapt(kind)
    monkeypatch.setattr(nn, "asarray", lambda a, dtype=None: np.asarray(a, dtype=dtype).view(Moved))
    model.to("numpy")
    arrays = dict(model.named_arrays())
    assert any(isinstance(h, Buffer) for h in arrays.values()) == (kind != "lora")
    assert all(isinstance(h.data, Moved) for h in arrays.values()), [n for n, h in arrays.items()
                                                                       if not isinstance(h.data, Moved)]


@pytest.mark.parametrize("kind", ["qlora", "qalora"])
def test_astype_keeps_the_storage_format(kind):
    model = adapt(kind)
    layer = model.get_submodule("blocks.0.attn.q")
    fixed = {n: (b.dtype, to_numpy(b.data).copy()) for n, b in layer.base.named_buffers() if not b.castable}
    model.astype("float64")
    assert layer.lora_A.dtype == np.float64
    for n, b in layer.base.named_buffers():
        if n in fixed:
            assert b.dtype == fixed[n][0] and np.array_equal(to_numpy(b.data), fixed[n][1]), n
    assert isinstance(layer.base, QuantizedLinear)
    idx, _ = batch()
    assert model(idx).dtype == np.float64


# ----------------------------------------------------------------- order of calls: disable_adapters
def _load_adapter_inside(m):
    """Save adapter "b" to a file and load it back as "c": load_adapter would add and switch adapters."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "b.safetensors")
        checkpoint.save_adapter(m, path, adapter="b")
        checkpoint.load_adapter(m, path, name="c")


INSIDE_DISABLED = {
    "load_adapter": _load_adapter_inside,
    "set_adapter": lambda m: lora.set_adapter(m, "b"),
    "delete_adapter": lambda m: lora.delete_adapter(m, "default"),
    "add_adapter": lambda m: lora.add_adapter(m, "c", r=2, alpha=4, seed=5),
    "merge_lora": lambda m: lora.merge_lora(m),
    "merge_and_unload": lambda m: lora.merge_and_unload(m),
    "unmerge_lora": lambda m: lora.unmerge_lora(m),
    "mark_only_lora_as_trainable": lambda m: lora.mark_only_lora_as_trainable(m),
    "apply_lora": lambda m: lora.apply_lora(m, 2, 4, ["k"], seed=6),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("call", list(INSIDE_DISABLED))
def test_changing_adapters_inside_disable_adapters_is_refused(kind, call):
    """The context restores the adapters it saved: a switch made inside would leave the old adapter active and
    the new one frozen (train changes nothing), a deletion would leave the layers pointing at a deleted adapter."""
    model = randomize_B(adapt(kind))
    lora.add_adapter(model, "b", r=2, alpha=4, seed=3)
    idx, targets = batch(7)
    y = logits(model, idx)
    trainable = [n for n, p in model.named_parameters() if p.trainable]
    with lora.disable_adapters(model):
        with pytest.raises(ValueError, match=r"inside lora\.disable_adapters \(blocks\.0\.attn\.q\).*after the block"):
            INSIDE_DISABLED[call](model)
    assert lora.active_adapter(model) == "default" and lora.adapter_names(model) == ["default", "b"]
    assert [n for n, p in model.named_parameters() if p.trainable] == trainable
    assert all(type(layer) is LAYER_CLASS[kind] and not layer.merged for layer in lora.lora_layers(model).values())
    assert np.array_equal(logits(model, idx), y)
    # after the block the same call works, and the model trains the adapter it says is active
    lora.set_adapter(model, "b")
    lora.delete_adapter(model, "default")
    opt = AdamW(model.trainable_parameters(), lr=1e-2)
    before = {n: to_numpy(p.data).copy() for n, p in model.named_parameters() if p.trainable}
    loss, dlogits = F.cross_entropy(model(idx), targets)
    model.zero_grad()
    model.backward(dlogits)
    opt.step()
    now = {n: to_numpy(p.data) for n, p in model.named_parameters() if n in before}
    changed = [n for n in before if not np.array_equal(now[n], before[n])]
    assert changed and all(".adapters.b." in n for n in changed), changed[:3]


def test_nested_disable_adapters_still_refuses_until_the_outer_block_ends():
    model = adapt("lora")
    lora.add_adapter(model, "b", r=2, alpha=4, seed=3)
    with lora.disable_adapters(model):
        with lora.disable_adapters(model):
            pass
        with pytest.raises(ValueError, match="inside lora.disable_adapters"):
            lora.set_adapter(model, "b")
    lora.set_adapter(model, "b")
    assert lora.active_adapter(model) == "b"


@pytest.mark.parametrize("kind", KINDS)
def test_merges_in_place_is_the_bases_and_says_what_merge_does(kind):
    """One name for one idea: a layer merges in place exactly when its base can hold the update (float W0, QA-LoRA's
    zero points); then ``merge`` keeps the layer and ``set_merged_base`` commits; else ``merge`` refuses."""
    model = randomize_B(adapt(kind))
    layer = next(iter(lora.lora_layers(model).values()))
    assert layer.merges_in_place is base_merges_in_place(layer.base) is (kind != "qlora")
    if layer.merges_in_place:
        base = layer.base
        assert layer.merge() is layer and layer.merged and layer.base is not base
    else:
        with pytest.raises(ValueError, match="cannot merge in place"):
            layer.merge()
        assert not layer.merged


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_layer_without_rng_draws_from_the_global_generator(kind, init):
    """No ``rng``: every layer kind draws A and its dropout seed from ``backend.global_rng()``, as with it passed."""
    kw = {"qalora": dict(bits=4, group_size=8)}.get(kind, {})
    saved = global_rng().bit_generator.state
    layers = []
    try:
        for pass_rng in (False, True):
            manual_seed(11)
            base = Linear(32, 16, rng=np.random.default_rng(0))
            extra = {"rng": global_rng()} if pass_rng else {}
            layers.append(LAYER_CLASS[kind](base, 4, 8, init=init, dropout=0.1, **kw, **extra))
            # the draws moved the global generator on
            assert global_rng().bit_generator.state != np.random.default_rng(11).bit_generator.state
    finally:
        global_rng().bit_generator.state = saved
    a, b = layers
    np.testing.assert_array_equal(to_numpy(a.lora_A.data), to_numpy(b.lora_A.data))
    assert a.dropout.seed == b.dropout.seed and not to_numpy(a.lora_B.data).any()
