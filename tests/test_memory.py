"""Tests of the memory package: measured bytes against hand sums, traced step memory, the paper calculator.

``memory.measured``: what a model and an optimizer hold, against sums written out from the shapes;
what a call allocates (``traced_peak``, ``step_memory``), against known allocations.
``memory.paper``: LoRA paper (Hu et al., 2021) section 4.2 / 7.1 and Table 4; QLoRA (Dettmers
et al., 2023) section 3.
"""

import math
import tracemalloc

import numpy as np
import pytest

from lora_from_scratch import lora
from lora_from_scratch import memory as M
from lora_from_scratch.adapter import TARGET_TABLE
from lora_from_scratch.backend import asarray, get_backend_name
from lora_from_scratch.functional import cross_entropy
from lora_from_scratch.model import GPT, GPTConfig
from lora_from_scratch.nn import Buffer, Linear, Module, Parameter
from lora_from_scratch.optim import SGD, AdamW
from lora_from_scratch.qalora import apply_qalora
from lora_from_scratch.qlora import apply_qlora

TINY = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)


def _one_step(model, opt, seed=0):
    """One forward, backward and optimizer step on random data."""
    rng = np.random.default_rng(seed)
    idx = asarray(rng.integers(0, TINY.vocab_size, size=(3, TINY.block_size)))  # (3, 8)
    targets = asarray(rng.integers(0, TINY.vocab_size, size=(3, TINY.block_size)))  # (3, 8)
    loss, dlogits = cross_entropy(model(idx), targets)
    model.zero_grad()
    model.backward(dlogits)
    opt.step()
    return float(loss)


def _hand_param_bytes(model, trainable=None):
    return sum(p.data.size * p.data.dtype.itemsize for _, p in model.named_parameters()
               if trainable is None or p.trainable == trainable)


# ---------------------------------------------------------------------------------------------
# measured
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_full_finetuning_after_one_adamw_step(dtype):
    model = GPT(TINY, seed=0, dtype=dtype)
    opt = AdamW(model.parameters(), lr=1e-3)
    assert M.optimizer_state_bytes(opt) == 0  # moments are allocated at the first step
    assert M.gradient_bytes(model) == 0
    _one_step(model, opt)
    n = model.num_parameters()
    itemsize = np.dtype(dtype).itemsize
    hand = n * itemsize
    assert M.parameter_bytes(model) == hand == _hand_param_bytes(model)
    assert M.parameter_bytes(model, trainable=True) == hand
    assert M.parameter_bytes(model, trainable=False) == 0
    assert M.gradient_bytes(model) == hand  # every parameter has a gradient of its own shape
    assert M.optimizer_state_bytes(opt) == 2 * hand  # exp_avg and exp_avg_sq
    assert M.trainable_state_bytes(model, opt) == 3 * hand
    rep = M.memory_report(model, opt)
    assert rep["parameters"] == n and rep["trainable_parameters"] == n and rep["frozen_parameters"] == 0
    assert rep["resident_bytes"] == hand  # the tied LM head shares wte: no extra array
    assert rep["total_bytes"] == 4 * hand  # weights + gradients + two moments
    assert rep["trainable_fraction"] == 1.0


def test_frozen_parameters_get_no_gradient_and_no_state():
    model = GPT(TINY, seed=1)
    model.freeze()
    for block in model.blocks:  # train only the attention projections Wq and Wv
        block.attn.q.weight.trainable = True
        block.attn.v.weight.trainable = True
    opt = AdamW(model.trainable_parameters(), lr=1e-3)
    _one_step(model, opt)
    hand_train = sum(b.attn.q.weight.data.nbytes + b.attn.v.weight.data.nbytes for b in model.blocks)
    assert M.parameter_bytes(model, trainable=True) == hand_train == _hand_param_bytes(model, True)
    assert M.parameter_bytes(model, trainable=False) == _hand_param_bytes(model, False)
    assert M.gradient_bytes(model) == hand_train
    assert M.optimizer_state_bytes(opt) == 2 * hand_train
    rep = M.memory_report(model, opt)
    assert rep["trainable_state_bytes"] == 3 * hand_train
    assert rep["trainable_bytes"] + rep["frozen_bytes"] == rep["parameter_bytes"]


def test_sgd_without_momentum_holds_no_state():
    model = GPT(TINY, seed=2)
    opt = SGD(model.parameters(), lr=0.1)
    _one_step(model, opt)
    assert M.optimizer_state_bytes(opt) == 0
    assert M.optimizer_state_bytes(None) == 0
    opt_m = SGD(model.parameters(), lr=0.1, momentum=0.9)
    _one_step(model, opt_m)
    assert M.optimizer_state_bytes(opt_m) == M.parameter_bytes(model)


class _Held(Module):
    """A module whose parameters and buffers share arrays, beside arrays it holds in plain attributes."""

    def __init__(self):
        rng = np.random.default_rng(0)
        self.weight = Parameter(asarray(rng.standard_normal((4, 6)).astype(np.float32)))  # (4, 6): 96 B
        self.codes = Buffer(asarray(rng.integers(0, 255, size=(12,)).astype(np.uint8)))  # (12,): 12 B
        self.same_codes = self.codes  # the same Buffer under a second name
        self.absmax = Buffer(asarray(np.ones(3, np.float32)))  # (3,): 12 B
        self.tied = self.weight  # the same Parameter twice
        self.child = Linear(6, 2, rng=rng)  # (2, 6) + (2,): 48 + 8 B
        self.bias_again = Parameter(self.child.bias.data, trainable=False)  # a second holder of the (2,) bias
        self.plain = asarray(np.zeros(50, np.float32))  # neither a Parameter nor a Buffer: not the module's
        self._cache = (asarray(np.zeros((100,), np.float64)),)  # (100,): 800 B of activations

    def forward(self, x):  # pragma: no cover - not used
        return x


def test_resident_bytes_counts_parameters_and_buffers_each_array_once():
    m = _Held()
    held = 96 + 12 + 12 + 48 + 8  # the plain attribute and the cache are not parameters or buffers
    assert M.resident_bytes(m) == held
    assert M.parameter_bytes(m) == 96 + 48 + 8  # the shared bias array once
    assert M.buffer_bytes(m) == 12 + 12
    assert M.parameter_count(m) == 24 + 12 + 2
    m.weight.grad = asarray(np.ones((4, 6), np.float32))  # (4, 6): 96 B
    assert M.resident_bytes(m) == held
    assert M.resident_bytes(m, include_grads=True) == held + 96
    assert M.gradient_bytes(m) == 96


def test_resident_bytes_after_forward_excludes_activations():
    model = GPT(TINY, seed=3)
    before = M.resident_bytes(model)
    idx = asarray(np.zeros((2, TINY.block_size), np.int64))  # (2, 8)
    model(idx)
    assert M.resident_bytes(model) == before == M.parameter_bytes(model)


# GPT with matrices large enough for whole blocks of 256 block constants: q, k, v, o are 128 x 128
# (16,384 weights: 256 blocks of 64), fc and proj 512 x 128 and 128 x 512 (1,024 blocks)
MID = GPTConfig(vocab_size=56, block_size=16, n_layer=2, n_head=4, n_embd=128)
SIX = ["q", "k", "v", "o", "fc", "proj"]


def _shapes(cfg):
    """(out, in) of the six adapted matrices of one block, written out by hand."""
    C = cfg.n_embd
    return [(C, C), (C, C), (C, C), (C, C), (4 * C, C), (C, 4 * C)]


def _unadapted_bytes(cfg, itemsize=4):
    """Token and position embeddings, two LayerNorms per block and the final one: never adapted."""
    C = cfg.n_embd
    return itemsize * (cfg.vocab_size * C + cfg.block_size * C + cfg.n_layer * 4 * C + 2 * C)


def test_resident_bytes_of_a_lora_model():
    r = 4
    model = lora.apply_lora(GPT(MID, seed=0), r=r, alpha=8, targets=SIX, seed=0)
    per_block = sum(4 * (o * i + o) + 4 * r * (i + o) for o, i in _shapes(MID))  # W0 + bias + A + B, float32
    assert M.resident_bytes(model) == _unadapted_bytes(MID) + MID.n_layer * per_block
    assert M.buffer_bytes(model) == 0
    assert M.resident_bytes(model) == M.parameter_bytes(model)


def test_resident_bytes_of_a_qlora_model_and_its_bits_per_weight():
    r = 4
    model = apply_qlora(GPT(MID, seed=0), r=r, alpha=8, targets=SIX, seed=0)
    storage = 0  # NF4 with double quantization, from the sizes alone
    rest = 0
    for o, i in _shapes(MID):
        n = o * i
        blocks = n // 64
        storage += n // 2 + blocks + 4 * (-(-blocks // 256)) + 4  # codes, 8-bit constants, absmax2, offset
        rest += 4 * o + 4 * r * (i + o)  # float32 bias, A and B
    assert M.buffer_bytes(model) == MID.n_layer * storage
    assert M.resident_bytes(model) == _unadapted_bytes(MID) + MID.n_layer * (storage + rest)
    # the same from the buffers' own arrays, named
    layers = lora.lora_layers(model)
    by_name = sum(int(getattr(layer.base, b).data.nbytes) for layer in layers.values()
                  for b in ("packed", "qabsmax", "offset", "absmax2"))
    assert by_name == M.buffer_bytes(model)
    # bits per weight: 4 + 8/64 + 32/(64*256) = 4.127, plus one float32 offset per matrix
    n_weights = MID.n_layer * sum(o * i for o, i in _shapes(MID))
    offsets = 4 * len(layers)
    assert 8 * (M.buffer_bytes(model) - offsets) / n_weights == 4 + 8 / 64 + 32 / (64 * 256)
    assert round(8 * (M.buffer_bytes(model) - offsets) / n_weights, 3) == 4.127
    assert abs(8 * M.buffer_bytes(model) / n_weights - 4.127) < 1e-3
    assert math.isclose(8 * (M.buffer_bytes(model) - offsets) / n_weights, M.QLORA_BITS_PER_PARAMETER)
    # counts: a 4-bit weight counts as the weights it encodes, as in lora.count_parameters
    rep = M.memory_report(model)
    trainable, total = lora.count_parameters(model)
    assert rep["parameters"] == total and rep["trainable_parameters"] == trainable
    assert rep["frozen_parameters"] == total - trainable
    assert total == GPT(MID, seed=0).num_parameters() + trainable


def test_resident_bytes_of_a_qalora_model():
    r, gs = 4, 32
    model = apply_qalora(GPT(MID, seed=0), r=r, alpha=8, targets=SIX, bits=4, group_size=gs, seed=0)
    per_block = 0
    for o, i in _shapes(MID):
        L = i // gs
        per_block += o * i // 2  # 4-bit codes, two per byte
        per_block += 2 * 2 * o * L  # float16 scales and (integer) zero points
        per_block += 4 * o + 4 * r * (L + o)  # float32 bias, A (r, L) and B (o, r)
    assert M.resident_bytes(model) == _unadapted_bytes(MID) + MID.n_layer * per_block
    assert M.resident_bytes(model) == M.parameter_bytes(model) + M.buffer_bytes(model)


def test_to_numpy_keeps_resident_bytes():
    model = apply_qlora(GPT(MID, seed=0), r=4, alpha=8, targets=SIX, seed=0)
    before = M.resident_bytes(model), M.buffer_bytes(model), M.parameter_bytes(model)
    model.to("numpy")
    assert (M.resident_bytes(model), M.buffer_bytes(model), M.parameter_bytes(model)) == before


# ---------------------------------------------------------------------------------------------
# traced: host allocations during a call
# ---------------------------------------------------------------------------------------------

MIB = 2**20
SLACK = 64 * 1024  # the Python objects a call makes around its arrays: far below a MiB


def test_traced_peak_of_a_known_allocation():
    def keep():
        return np.ones(MIB, np.uint8)  # (2^20,): 1 MiB, returned

    def make_and_drop():
        a = np.ones(MIB, np.uint8)  # (2^20,): 1 MiB, freed on return
        return int(a[0])

    kept, peak, retained = M.traced_peak(keep)
    assert kept.nbytes == MIB
    assert MIB <= peak < MIB + SLACK
    assert MIB <= retained < MIB + SLACK
    value, peak, retained = M.traced_peak(make_and_drop)
    assert value == 1
    assert MIB <= peak < MIB + SLACK
    assert abs(retained) < SLACK
    # arguments are passed through, and arrays made before the call are not counted
    big = np.ones(MIB // 2, np.float64)  # (2^19,): 4 MiB
    total, peak, _ = M.traced_peak(lambda a, scale=1: float(a.sum()) * scale, big, scale=2)
    assert total == MIB and peak < SLACK  # a float64 sum reads the array in place: no copy of it
    assert not tracemalloc.is_tracing()  # tracing is switched off again


def test_traced_peak_calls_nest():
    def outer():
        a = np.ones(4 * MIB, np.uint8)  # (4 MiB,), freed before the inner call
        del a
        _, inner_peak, _ = M.traced_peak(lambda: np.ones(MIB, np.uint8).nbytes)  # (1 MiB,), dropped at once
        return inner_peak

    inner_peak, peak, retained = M.traced_peak(outer)
    assert MIB <= inner_peak < MIB + SLACK
    assert 4 * MIB <= peak < 4 * MIB + SLACK  # the inner call did not hide the outer one's earlier peak
    assert abs(retained) < SLACK


WIDE = GPTConfig(vocab_size=56, block_size=32, n_layer=4, n_head=4, n_embd=256)


@pytest.mark.skipif(get_backend_name() != "numpy", reason="tracemalloc sees host (NumPy) memory only")
def test_step_memory_lora_needs_less_than_full_finetuning():
    """A measured property, not a timed one: the bytes NumPy allocates during one training step.

    On a width-256, 4-layer GPT (3.2M parameters, 12 MiB of float32 weights), the first AdamW
    step of full fine-tuning makes a gradient and two moments for every parameter; LoRA (r = 8 on
    the six matrices) makes them for its 147k adapter values only. Both keep about the same
    activations for the backward.
    """
    rng = np.random.default_rng(0)
    batch = (asarray(rng.integers(0, WIDE.vocab_size, size=(4, WIDE.block_size))),  # (4, 32)
             asarray(rng.integers(0, WIDE.vocab_size, size=(4, WIDE.block_size))))  # (4, 32)
    full = GPT(WIDE, seed=0)
    full_opt = AdamW(full.parameters(), lr=1e-3)
    adapted = lora.apply_lora(GPT(WIDE, seed=0), r=8, alpha=16, targets=SIX, seed=0)
    lora_opt = AdamW(adapted.trainable_parameters(), lr=1e-3)
    f = M.step_memory(full, full_opt, batch)
    lo = M.step_memory(adapted, lora_opt, batch)

    P = M.parameter_bytes(full)
    assert f["held_before"] == f["weights"] == P  # a first step: no optimizer state yet
    assert f["gradients"] == P and f["optimizer"] == 2 * P
    assert abs(f["retained"] - 3 * P) < SLACK  # what the step kept: its gradients and the moments
    assert f["peak"] == f["held_before"] + f["step_peak"]
    assert f["activations"] > 0 and f["step_peak"] >= f["activations"]
    n_adapter = M.parameter_count(adapted, trainable=True)
    assert n_adapter == 4 * 8 * (4 * (256 + 256) + 2 * (256 + 1024))
    assert lo["gradients"] == 4 * n_adapter and lo["optimizer"] == 8 * n_adapter
    assert abs(lo["retained"] - 12 * n_adapter) < SLACK
    # the comparison: LoRA's step needs less on top of the weights, and less in all
    assert lo["step_peak"] < f["step_peak"]
    assert lo["peak"] < f["peak"]
    assert f["step_peak"] - lo["step_peak"] > P / 2  # at least half the weights' size apart
    assert 0.8 < lo["activations"] / f["activations"] < 1.25  # activations: about the same
    assert math.isclose(lo["loss"], f["loss"], rel_tol=1e-6)  # B = 0: the same model at step 0
    # a second step: the moments exist, so the full step keeps only its new gradients
    f2 = M.step_memory(full, full_opt, batch)
    assert f2["held_before"] == 3 * P  # weights + moments; the old gradients went with zero_grad
    assert abs(f2["retained"] - P) < SLACK


def test_memory_report_bad_arguments():
    model = GPT(TINY, seed=0)
    with pytest.raises(ValueError, match="trainable"):
        M.parameter_bytes(model, trainable="yes")
    with pytest.raises(ValueError, match="state"):
        M.optimizer_state_bytes(object())
    text = M.format_report(M.memory_report(model))
    assert "trainable" in text and "KiB" in text


# ---------------------------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------------------------


def test_format_bytes():
    assert M.format_bytes(0) == "0 B"
    assert M.format_bytes(1023) == "1023 B"
    assert M.format_bytes(1024) == "1.0 KiB"
    assert M.format_bytes(1536) == "1.5 KiB"
    assert M.format_bytes(3 * 2**20) == "3.0 MiB"
    assert M.format_bytes(5 * 2**30, digits=2) == "5.00 GiB"
    assert M.format_bytes(2**40) == "1.0 TiB"
    assert M.format_bytes(1024 * 1024 - 1) == "1.0 MiB"  # never "1024.0 KiB"
    assert M.format_bytes(350e9, binary=False) == "350.0 GB"
    assert M.format_bytes(1.2e12, binary=False) == "1.2 TB"
    assert M.format_bytes(35e6, binary=False) == "35.0 MB"
    for bad in (-1, float("nan"), float("inf"), "12", None, True):
        with pytest.raises(ValueError):
            M.format_bytes(bad)


# ---------------------------------------------------------------------------------------------
# calculator
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [TINY, GPTConfig(vocab_size=56, block_size=32, n_layer=4, n_head=4, n_embd=128)])
def test_full_parameters_equals_our_gpt(cfg):
    size = M.TransformerSize.from_config(cfg)
    assert M.full_parameters(size) == GPT(cfg, seed=0).num_parameters()


def test_base_preset_matches_the_shipped_base_config():
    from lora_from_scratch import data
    from lora_from_scratch.__main__ import BASE_CONFIG

    cfg = GPTConfig(vocab_size=data.VOCAB_SIZE, **BASE_CONFIG)
    assert M.PRESETS["lfs-base"] == M.TransformerSize.from_config(cfg, name="our base model")


def test_presets_match_published_sizes():
    # GPT-2 small: 124,439,808 parameters (Hugging Face "gpt2"); GPT-3: "175.0B" (Brown et al., table 2.1)
    assert M.full_parameters(M.preset("gpt2")) == 124_439_808
    assert abs(M.full_parameters(M.preset("gpt2-xl")) / 1.5e9 - 1) < 0.05
    n = M.full_parameters(M.preset("gpt3-175b"))
    assert abs(n / 175e9 - 1) < 0.02
    assert abs(n / M.PAPER_GPT3["full_parameters"] - 1) < 0.02
    # the leading term 12 L d^2 dominates
    g = M.preset("gpt3-175b")
    assert M.linear_parameters(g) == 12 * g.n_layer * g.d_model**2
    with pytest.raises(ValueError, match="unknown preset"):
        M.preset("gpt-5")


def test_lora_parameter_formula_and_gpt3_ratio():
    g = M.preset("gpt3-175b")
    n_lora = M.lora_trainable_parameters(g, 4, ("q", "v"))
    assert n_lora == 96 * 2 * 4 * (12288 + 12288)
    # the paper's section 7.1 budget "18M" and Table 4's "4.7M" (r_q = r_v = 1) and "37.7M" (r_q = r_v = 8)
    assert abs(n_lora / 18e6 - 1) < 0.05
    assert round(M.lora_trainable_parameters(g, 1, ("q", "v")) / 1e5) == 47
    assert round(M.lora_trainable_parameters(g, 8, ("q", "v")) / 1e5) == 377
    assert M.lora_trainable_parameters(g, 8, ("v",)) == n_lora  # one matrix at r = 8: the same budget
    ratio = M.full_parameters(g) / n_lora
    assert 5_000 < ratio < 20_000
    comparison = M.gpt3_comparison()
    assert comparison["trainable_reduction"][0] == ratio
    # MLP matrices: fc is (4d, d), proj (d, 4d): r (d + 4d) each
    assert M.lora_trainable_parameters(g, 2, ("fc", "proj")) == 96 * 2 * 2 * 5 * 12288


def test_lora_formula_equals_apply_lora_count():
    cfg = GPTConfig(vocab_size=13, block_size=8, n_layer=3, n_head=2, n_embd=16)
    size = M.TransformerSize.from_config(cfg)
    for r, targets in ((2, ("q", "v")), (4, ("q", "k", "v", "o", "fc", "proj")), (1, ("fc",))):
        model = GPT(cfg, seed=0)
        lora.apply_lora(model, r=r, alpha=2 * r, targets=targets, seed=0)
        trainable, total = lora.count_parameters(model)
        assert trainable == M.lora_trainable_parameters(size, r, targets)
        assert total == M.full_parameters(size) + trainable
        assert M.parameter_count(model, trainable=True) == trainable


def test_target_shapes_come_from_the_target_table_and_match_our_gpt():
    size = M.TransformerSize.from_config(MID)
    shapes = M.target_shapes(size)
    assert tuple(shapes) == tuple(TARGET_TABLE)
    block = GPT(MID, seed=0).blocks[0]
    for name, t in TARGET_TABLE.items():
        assert shapes[name] == t.shape(MID.n_embd)  # d_ff = 4 d: the table's own widths
        assert shapes[name] == block.get_submodule(f"{t.parent}.{name}").weight.shape


def test_a_custom_mlp_width_d_ff():
    # d = 64, d_ff = 96 (not 4 d = 256): fc is (96, 64), proj (64, 96)
    size = M.TransformerSize("narrow MLP", n_layer=3, d_model=64, n_head=4, vocab_size=10, n_ctx=8, d_ff=96)
    assert M.target_shapes(size)["fc"] == (96, 64) and M.target_shapes(size)["proj"] == (64, 96)
    assert M.linear_parameters(size) == 3 * (4 * 64 * 64 + 2 * 64 * 96)
    biases, norms = 4 * 64 + 96 + 64, 4 * 64
    assert M.full_parameters(size) == M.linear_parameters(size) + 3 * (biases + norms) + (10 + 8) * 64 + 2 * 64
    assert M.lora_trainable_parameters(size, 2, ("fc", "proj")) == 3 * 2 * 2 * (64 + 96)
    assert M.lora_trainable_parameters(size, 2, ("q",)) == 3 * 2 * (64 + 64)
    with pytest.raises(ValueError, match="exceeds"):
        M.lora_trainable_parameters(size, 65, ("fc",))


def test_training_memory_accounting():
    g = M.preset("gpt3-175b")
    n = M.full_parameters(g)
    n_lora = M.lora_trainable_parameters(g, 4)
    full = M.training_memory(g, "full")
    assert full.weights == 2 * n and full.gradients == 2 * n and full.optimizer == 4 * n
    assert full.total == 8 * n
    lora = M.training_memory(g, "lora", r=4, targets=("q", "v"))
    assert lora.weights == 2 * (n + n_lora)
    assert lora.gradients == 2 * n_lora and lora.optimizer == 4 * n_lora
    # the paper: 1.2 TB -> 350 GB ("3 times"); the state-only accounting gives the same order
    assert 2.5 < full.total / lora.total < 4.5
    assert abs(lora.total / M.PAPER_GPT3["vram_lora"] - 1) < 0.02
    no_grad = M.training_memory(g, "full", keep_gradients=False)
    assert no_grad.total == 6 * n  # the paper's "up to 2/3" reasoning: weights + two moments
    mixed = M.training_memory(g, "full", master_bytes=4, moment_bytes=4)
    assert mixed.total == 16 * n
    sgd = M.training_memory(g, "full", optimizer="sgd")
    assert sgd.optimizer == 0
    d = full.to_dict()
    assert d["total"] == full.total and d["method"] == "full"


def test_qlora_bits_and_memory():
    # QLoRA section 3: 8/64 + 32/(64*256) = 0.127 extra bits; without double quantization 32/64 = 0.5
    assert M.QLORA_BITS_PER_PARAMETER == 4 + 8 / 64 + 32 / (64 * 256)
    assert round(M.QLORA_BITS_PER_PARAMETER, 3) == 4.127
    assert M.nf4_bits_per_parameter(double_quant=False) == 4.5
    assert M.groupwise_bits_per_parameter(4, 32, 16, 16) == 5.0
    g = M.preset("gpt3-175b")
    q = M.training_memory(g, "qlora")
    lo = M.training_memory(g, "lora")
    quant = M.linear_parameters(g)
    # 4.127 bits per weight, plus one float32 offset per matrix (96 layers x 6), counted exactly (nf4_bytes)
    assert lo.weights - q.weights == quant * (2 - 4.126953125 / 8) - 4 * 96 * 6
    assert q.gradients == lo.gradients and q.optimizer == lo.optimizer
    assert 3.5 < lo.total / q.total < 4.0  # 16-bit -> ~4.1-bit base


def test_checkpoint_bytes():
    g = M.preset("gpt3-175b")
    full = M.checkpoint_bytes(g, "full")
    lora = M.checkpoint_bytes(g, "lora", r=4, targets=("q", "v"))
    assert full == 2 * M.full_parameters(g)
    assert lora == 2 * M.lora_trainable_parameters(g, 4)
    assert abs(full / M.PAPER_GPT3["checkpoint_full"] - 1) < 0.02  # 350 GB
    assert abs(lora / M.PAPER_GPT3["checkpoint_lora"] - 1) < 0.1  # 35 MB (from the rounded 18M budget)
    assert M.checkpoint_bytes(g, "qlora") == lora


def test_calculator_rejects_bad_input():
    g = M.preset("gpt2")
    with pytest.raises(ValueError, match="rank"):
        M.lora_trainable_parameters(g, 0)
    with pytest.raises(ValueError, match="rank"):
        M.lora_trainable_parameters(g, 2.5)
    with pytest.raises(ValueError, match="unknown target"):
        M.lora_trainable_parameters(g, 4, ("q", "w"))
    with pytest.raises(ValueError, match="single string"):
        M.lora_trainable_parameters(g, 4, "qv")
    with pytest.raises(ValueError, match="repeat"):
        M.lora_trainable_parameters(g, 4, ("q", "q"))
    with pytest.raises(ValueError, match="exceeds"):
        M.lora_trainable_parameters(g, 1000, ("q",))
    with pytest.raises(ValueError, match="unknown method"):
        M.training_memory(g, "prefix")
    with pytest.raises(ValueError, match="unknown optimizer"):
        M.training_memory(g, "full", optimizer="lion")
    with pytest.raises(ValueError, match="weight_bytes"):
        M.training_memory(g, "full", weight_bytes=-2)
    with pytest.raises(ValueError, match="divisible"):
        M.TransformerSize("bad", 2, 10, 3, 5, 4)
    with pytest.raises(ValueError, match="n_layer"):
        M.TransformerSize("bad", 0, 8, 2, 5, 4)
