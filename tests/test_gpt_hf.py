"""The whole GPT against Hugging Face transformers' GPT2LMHeadModel (Radford et al., 2019).

Tiny random GPT2Configs are built in memory (nothing is downloaded), their
weights are randomized (biases and layer-norm parameters included, so a
mis-mapped bias cannot hide behind zeros) and loaded into our GPT with
``io.load_hf_gpt2``. Checked: the logits (float32, max abs diff < 1e-4), the
language-model loss with ignored labels (HF shifts the labels inside), and
every parameter's gradient in float64 (rel < 1e-8), mapped by name: our
q, k, v are column blocks of HF's fused c_attn, HF's Conv1D weights are
(in, out) and so are transposed, and wte's gradient includes the tied head.
"""

import numpy as np
import pytest
import torch
import transformers
from conftest import rel
from transformers import GPT2Config, GPT2LMHeadModel

from lora_from_scratch import functional as F
from lora_from_scratch.backend import asarray, to_numpy
from lora_from_scratch.io import load_hf_gpt2

transformers.logging.set_verbosity_error()

CONFIGS = [
    dict(n_layer=2, n_head=4, n_embd=32, vocab_size=50, n_positions=16),
    dict(n_layer=3, n_head=2, n_embd=24, vocab_size=37, n_positions=12),
]
IDS = pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"L{c['n_layer']}H{c['n_head']}C{c['n_embd']}")


def hf_model(cfg, seed, attn="eager"):
    """A GPT2LMHeadModel with every parameter randomized (float32, dropout off)."""
    config = GPT2Config(**cfg, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, layer_norm_epsilon=1e-5,
                        activation_function="gelu_new")
    config._attn_implementation = attn
    torch.manual_seed(seed)
    m = GPT2LMHeadModel(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim == 2:
                fan_in = p.shape[1] if name.endswith(("wte.weight", "wpe.weight")) else p.shape[0]
                p.copy_(r / fan_in**0.5)  # Conv1D weights are (in, out); embeddings are (rows, C)
            elif ".ln_" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * r)
            else:
                p.copy_(0.2 * r)
    return m


def numpy_state(m):
    return {k: v.detach().cpu().numpy().copy() for k, v in m.state_dict().items()}


def batch(cfg, seed, B=3):
    """Token ids over the full context and labels with a few ignored (-100) positions."""
    rng = np.random.default_rng(seed)
    T = cfg["n_positions"]
    ids = rng.integers(0, cfg["vocab_size"], size=(B, T))  # (B, T)
    ids[0, :3] = cfg["vocab_size"] - 1  # the last row of wte and repeated ids
    labels = ids.copy()  # (B, T)
    labels[0, 2] = labels[1, 5] = labels[2, T - 1] = -100
    return ids, labels


def our_loss(model, ids, labels):
    """The LM loss as HF computes it: logits at t predict the label at t + 1. Returns loss, full dlogits."""
    logits = model(asarray(ids))  # (B, T, V)
    loss, dl = F.cross_entropy(logits[:, :-1], asarray(labels[:, 1:]))  # scalar, (B, T-1, V)
    dlogits = logits * 0  # (B, T, V); the last position predicts nothing
    dlogits[:, :-1] = dl
    return logits, loss, dlogits


def torch_loss(m, ids, labels):
    """HF's logits and the shifted LM loss in the model's own dtype.

    (HF's built-in ``labels=`` loss upcasts logits with ``.float()``, i.e. computes in float32 even for
    a float64 model, so the float64 checks take the logits and apply torch's cross_entropy themselves.)
    """
    logits = m(torch.from_numpy(ids)).logits  # (B, T, V)
    V = logits.shape[-1]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V),
                                             torch.from_numpy(labels[:, 1:]).reshape(-1), ignore_index=-100)
    return logits, loss


def hf_grads_by_our_name(m, n_layer, C):
    """HF's gradients renamed and reshaped to our parameters (Conv1D (in, out) -> (out, in), c_attn split)."""
    g = {k: p.grad.detach().numpy() for k, p in m.named_parameters()}
    out = {"wte.weight": g["transformer.wte.weight"], "wpe.weight": g["transformer.wpe.weight"],
           "ln_f.weight": g["transformer.ln_f.weight"], "ln_f.bias": g["transformer.ln_f.bias"]}
    for i in range(n_layer):
        h, b = f"transformer.h.{i}.", f"blocks.{i}."
        for ln in ("ln_1", "ln_2"):
            out[b + ln + ".weight"] = g[h + ln + ".weight"]
            out[b + ln + ".bias"] = g[h + ln + ".bias"]
        for j, n in enumerate("qkv"):
            out[b + f"attn.{n}.weight"] = g[h + "attn.c_attn.weight"][:, j * C:(j + 1) * C].T  # (C, C)
            out[b + f"attn.{n}.bias"] = g[h + "attn.c_attn.bias"][j * C:(j + 1) * C]  # (C,)
        for ours, theirs in (("attn.o", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            out[b + ours + ".weight"] = g[h + theirs + ".weight"].T
            out[b + ours + ".bias"] = g[h + theirs + ".bias"]
    return out


@IDS
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_and_loss_float32(cfg, attn):
    m = hf_model(cfg, seed=1, attn=attn)
    model = load_hf_gpt2(numpy_state(m), cfg["n_head"])
    ids, labels = batch(cfg, seed=2)
    with torch.no_grad():
        out = m(torch.from_numpy(ids), labels=torch.from_numpy(labels))
    logits, loss, _ = our_loss(model, ids, labels)
    assert to_numpy(logits).dtype == np.float32
    ref = out.logits.numpy()
    assert float(np.abs(ref).max()) > 1.0  # the comparison is not between near-zero numbers
    assert float(np.abs(to_numpy(logits) - ref).max()) < 1e-4
    assert rel(loss, out.loss.numpy()) < 1e-5


@IDS
def test_every_gradient_float64(cfg):
    m = hf_model(cfg, seed=3)
    model = load_hf_gpt2(numpy_state(m), cfg["n_head"]).astype("float64")  # same values, cast exactly
    m = m.double()
    ids, labels = batch(cfg, seed=4)
    ref_logits, ref_loss = torch_loss(m, ids, labels)
    ref_loss.backward()
    logits, loss, dlogits = our_loss(model, ids, labels)
    assert to_numpy(logits).dtype == np.float64
    assert rel(logits, ref_logits.detach().numpy()) < 1e-12
    assert rel(loss, ref_loss.detach().numpy()) < 1e-12
    model.zero_grad()
    model.backward(dlogits)
    ref = hf_grads_by_our_name(m, cfg["n_layer"], cfg["n_embd"])
    params = dict(model.named_parameters())
    assert set(params) == set(ref)
    for name, p in params.items():
        if name.endswith(".k.bias"):  # exactly 0: q.(k + b) shifts a softmax row by a constant
            scale = float(np.linalg.norm(ref[name.replace("bias", "weight")]))
            assert np.linalg.norm(to_numpy(p.grad)) < 1e-12 * scale
            assert np.linalg.norm(ref[name]) < 1e-12 * scale
            continue
        e = rel(p.grad, ref[name])
        assert e < 1e-8, f"grad {name}: relative error {e:.3e}"


def test_tied_head_gradient_has_both_parts():
    """wte's gradient = lookup part + head part (dlogits^T @ ln_f output); both are material here."""
    cfg = CONFIGS[1]
    m = hf_model(cfg, seed=5).double()
    model = load_hf_gpt2(numpy_state(m), cfg["n_head"], dtype="float64")
    ids, labels = batch(cfg, seed=6)
    logits, loss = torch_loss(m, ids, labels)
    hidden = m.transformer(torch.from_numpy(ids)).last_hidden_state  # (B, T, C), after ln_f
    dlogits_t = torch.autograd.grad(loss, logits, retain_graph=True)[0]  # (B, T, V)
    V = logits.shape[-1]
    head_part = (dlogits_t.reshape(-1, V).T @ hidden.reshape(-1, hidden.shape[-1])).detach().numpy()  # (V, C)
    full = torch.autograd.grad(loss, m.transformer.wte.weight)[0].numpy()  # (V, C), both uses of wte
    assert rel(head_part, full) > 1e-2  # the lookup part is not negligible
    _, _, dlogits = our_loss(model, ids, labels)
    model.zero_grad()
    model.backward(dlogits)
    assert rel(model.wte.weight.grad, full) < 1e-8


@IDS
def test_named_parameters_match_hf(cfg):
    m = hf_model(cfg, seed=7)
    model = load_hf_gpt2(numpy_state(m), cfg["n_head"])
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(names))
    assert len({id(p) for p in model.parameters()}) == len(names)  # each Parameter once
    assert names.count("wte.weight") == 1 and not any("head" in n for n in names)  # tied head: once, as wte
    # HF fuses q, k, v (2 tensors per layer) where we keep 6: 4 more names per layer, the same total size
    assert len(names) == len(list(m.parameters())) + 4 * cfg["n_layer"]
    assert model.num_parameters() == sum(p.numel() for p in m.parameters())


def test_astype_float64():
    cfg = CONFIGS[0]
    model = load_hf_gpt2(numpy_state(hf_model(cfg, seed=8)), cfg["n_head"])
    before = {n: to_numpy(p.data).copy() for n, p in model.named_parameters()}
    ids, _ = batch(cfg, seed=9)
    logits32 = to_numpy(model(asarray(ids)))
    assert model.astype("float64") is model
    for n, p in model.named_parameters():
        assert p.dtype == np.float64, n
        assert np.array_equal(to_numpy(p.data), before[n].astype(np.float64)), n
    logits64 = to_numpy(model(asarray(ids)))
    assert logits64.dtype == np.float64
    assert rel(logits32, logits64) < 1e-5
