"""The whole GPT against Hugging Face transformers' GPT2LMHeadModel (Radford et al., 2019).

Tiny random GPT2Configs are built in memory (nothing is downloaded), their
weights are randomized (biases and layer-norm parameters included, so a
mis-mapped bias cannot hide behind zeros) and loaded into our GPT with
``checkpoint.load_hf_gpt2``. Checked: the logits (float32, max abs diff < 1e-4), the
language-model loss with ignored labels (HF shifts the labels inside), and
every parameter's gradient in float64 (rel < 1e-8), mapped by name: our
q, k, v are column blocks of HF's fused c_attn, HF's Conv1D weights are
(in, out) and so are transposed, and wte's gradient includes the tied head.

The comparisons are ``lora_from_scratch.verify``'s (``hf_gpt_float32``, ``hf_gpt_float64``,
``hf_tied_head``), the same that ``python -m lora_from_scratch verify`` prints.
"""

import numpy as np
import pytest
import transformers  # noqa: F401  (the reference: without it these tests fail, they are not skipped)
from conftest import rel

from lora_from_scratch import verify
from lora_from_scratch.backend import asarray, to_numpy
from lora_from_scratch.checkpoint import load_hf_gpt2

CONFIGS = list(verify.HF_CONFIGS)
IDS = pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"L{c['n_layer']}H{c['n_head']}C{c['n_embd']}")


@IDS
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_and_loss_float32(cfg, attn):
    measured = verify.assert_ok(verify.hf_gpt_float32(cfg, attn))
    assert [m.what for m in measured] == ["logits (max abs diff)", "loss"]
    assert [m.bound for m in measured] == [1e-4, 1e-5]


@IDS
def test_every_gradient_float64(cfg):
    measured = verify.assert_ok(verify.hf_gpt_float64(cfg))
    grads = [m for m in measured if m.what.startswith("grad ")]
    model = load_hf_gpt2(verify.hf_state(verify.hf_model(cfg, seed=3)), cfg["n_head"])
    # every parameter once, the key biases twice (ours and transformers' are both measured against 0)
    assert len(grads) == len(list(model.named_parameters())) + cfg["n_layer"]
    assert all(m.bound == 1e-8 for m in grads if "exactly 0" not in m.what)


def test_tied_head_gradient_has_both_parts():
    """wte's gradient = lookup part + head part (dlogits^T @ ln_f output); both are material here."""
    verify.assert_ok(verify.hf_tied_head(CONFIGS[1]))


@IDS
def test_named_parameters_match_hf(cfg):
    m = verify.hf_model(cfg, seed=7)
    model = load_hf_gpt2(verify.hf_state(m), cfg["n_head"])
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(names))
    assert len({id(p) for p in model.parameters()}) == len(names)  # each Parameter once
    assert names.count("wte.weight") == 1 and not any("head" in n for n in names)  # tied head: once, as wte
    # HF fuses q, k, v (2 tensors per layer) where we keep 6: 4 more names per layer, the same total size
    assert len(names) == len(list(m.parameters())) + 4 * cfg["n_layer"]
    assert model.num_parameters() == sum(p.numel() for p in m.parameters())


def test_astype_float64():
    cfg = CONFIGS[0]
    model = load_hf_gpt2(verify.hf_state(verify.hf_model(cfg, seed=8)), cfg["n_head"])
    before = {n: to_numpy(p.data).copy() for n, p in model.named_parameters()}
    ids, _ = verify.hf_batch(cfg, seed=9)
    logits32 = to_numpy(model(asarray(ids)))
    assert model.astype("float64") is model
    for n, p in model.named_parameters():
        assert p.dtype == np.float64, n
        assert np.array_equal(to_numpy(p.data), before[n].astype(np.float64)), n
    logits64 = to_numpy(model(asarray(ids)))
    assert logits64.dtype == np.float64
    assert rel(logits32, logits64) < 1e-5
