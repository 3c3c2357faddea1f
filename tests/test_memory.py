"""Tests of memory.py: measured bytes against hand sums, and the paper-scale calculator.

LoRA paper (Hu et al., 2021) section 4.2 / 7.1 and Table 4; QLoRA (Dettmers et al., 2023) section 3.
"""

import math

import numpy as np
import pytest

from lora_from_scratch import memory as M
from lora_from_scratch.backend import asarray
from lora_from_scratch.functional import cross_entropy
from lora_from_scratch.model import GPT, GPTConfig
from lora_from_scratch.nn import Linear, Module, Parameter
from lora_from_scratch.optim import SGD, AdamW

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


class _Packed(Module):
    """A module that keeps arrays outside Parameters, some of them twice."""

    def __init__(self):
        rng = np.random.default_rng(0)
        self.weight = Parameter(asarray(rng.standard_normal((4, 6)).astype(np.float32)))  # (4, 6): 96 B
        self.codes = asarray(rng.integers(0, 255, size=(12,)).astype(np.uint8))  # (12,): 12 B
        self.same_codes = self.codes  # the same array under a second name
        self.state = {"absmax": asarray(np.ones(3, np.float32)), "codes": self.codes}  # (3,): 12 B
        self.tied = self.weight  # the same Parameter twice
        self.child = Linear(6, 2, rng=rng)  # (2, 6) + (2,): 48 + 8 B
        self.shared = [self.child.weight.data, (self.codes,)]  # nothing new
        self._cache = (asarray(np.zeros((100,), np.float64)),)  # (100,): 800 B, transient

    def forward(self, x):  # pragma: no cover - not used
        return x


def test_resident_bytes_counts_each_array_once():
    m = _Packed()
    assert M.resident_bytes(m) == 96 + 12 + 12 + 48 + 8
    assert M.resident_bytes(m, include_caches=True) == 96 + 12 + 12 + 48 + 8 + 800
    assert M.parameter_bytes(m) == 96 + 48 + 8  # Parameters only
    m.weight.grad = asarray(np.ones((4, 6), np.float32))  # (4, 6): 96 B
    assert M.resident_bytes(m) == 96 + 12 + 12 + 48 + 8
    assert M.resident_bytes(m, include_grads=True) == 2 * 96 + 12 + 12 + 48 + 8
    assert M.gradient_bytes(m) == 96


def test_resident_bytes_walks_a_quantized_weight():
    blockwise = pytest.importorskip("lora_from_scratch.quant.blockwise", reason="quant is not importable yet")
    rng = np.random.default_rng(5)
    W = asarray(rng.standard_normal((32, 128)).astype(np.float32))  # (32, 128)

    class QuantLinear(Module):
        def __init__(self):
            self.qweight = blockwise.quantize_4bit(W, blocksize=64, quant_type="nf4", double_quant=True)
            self.bias = Parameter(asarray(np.zeros(32, np.float32)))  # (32,): 128 B

    m = QuantLinear()
    q = m.qweight
    hand = sum(int(a.nbytes) for a in (q.packed, q.absmax, q.qabsmax, q.offset, q.absmax2) if a is not None)
    assert int(q.packed.nbytes) == 32 * 128 // 2  # two 4-bit codes per byte
    assert M.resident_bytes(m) == hand + 128
    assert M.parameter_bytes(m) == 128  # the packed weight is not a Parameter


def test_resident_bytes_after_forward_excludes_activations_by_default():
    model = GPT(TINY, seed=3)
    before = M.resident_bytes(model)
    idx = asarray(np.zeros((2, TINY.block_size), np.int64))  # (2, 8)
    model(idx)
    assert M.resident_bytes(model) == before == M.parameter_bytes(model)
    assert M.resident_bytes(model, include_caches=True) > before  # the caches of the last forward


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
    lora = pytest.importorskip("lora_from_scratch.lora", reason="lora.py is not importable yet")
    cfg = GPTConfig(vocab_size=13, block_size=8, n_layer=3, n_head=2, n_embd=16)
    size = M.TransformerSize.from_config(cfg)
    for r, targets in ((2, ("q", "v")), (4, ("q", "k", "v", "o", "fc", "proj")), (1, ("fc",))):
        model = GPT(cfg, seed=0)
        lora.apply_lora(model, r=r, alpha=2 * r, targets=targets, seed=0)
        trainable, total = lora.count_parameters(model)
        assert trainable == M.lora_trainable_parameters(size, r, targets)
        assert total == M.full_parameters(size) + trainable
        assert M.parameter_count(model, trainable=True) == trainable


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
    assert math.isclose(lo.weights - q.weights, quant * (2 - 4.126953125 / 8), rel_tol=1e-12)
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
