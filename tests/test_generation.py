"""``GPT.generate``: greedy tokens equal transformers' and PEFT's, the KV cache changes no token, sampling.

- Greedy decoding against ``GPT2LMHeadModel.generate(do_sample=False)`` (KV cache on in
  transformers too) on tiny random GPT2Configs, loaded into our GPT with ``checkpoint.load_hf_gpt2``, up to
  the full context: the tokens are identical.
- LoRA on every matrix against PEFT's ``PeftModel.generate`` over the same weights (our adapter
  saved with ``save_peft_adapter``): identical tokens.
- Every adapter kind (base, LoRA, QLoRA, QA-LoRA, each unmerged and merged), greedy and sampled:
  with the KV cache and without it (the whole sequence through ``GPT.forward`` at every step) the
  tokens are identical, and the adapters (B made non-zero) really change them.
- Each cached step (a prefill of 3 positions, 2 more, then 1) gives the last logits of
  ``GPT.forward`` on the sequence so far (rel < 1e-6, float32).
- Sampling: seeded, reproducible; top_k = 1 is greedy; samples stay in the top k; the frequencies
  of 40,000 draws match softmax(z / temperature) within 5 standard errors.
- Refusals: past the context length, bad arguments; the model's mode restored, no cache kept.
"""

import numpy as np
import pytest
import torch
from conftest import rel

from lora_from_scratch import verify
from lora_from_scratch.backend import asarray, to_numpy
from lora_from_scratch.checkpoint import load_hf_gpt2, to_hf_gpt2_state_dict
from lora_from_scratch.generation import KVCache, forward_cached, next_token
from lora_from_scratch.lora import apply_lora, lora_layers, merge_lora
from lora_from_scratch.model import GPT, GPTConfig
from lora_from_scratch.qalora import apply_qalora
from lora_from_scratch.qlora import apply_qlora

CONFIGS = list(verify.HF_CONFIGS) + [dict(n_layer=4, n_head=4, n_embd=64, vocab_size=101, n_positions=24),
                                     dict(n_layer=1, n_head=1, n_embd=16, vocab_size=300, n_positions=24)]


def prompt(B, T, V, seed=0):
    return np.random.default_rng(seed).integers(0, V, size=(B, T))  # (B, T) int64


def hf_greedy(hf, idx, n):
    hf.generation_config.eos_token_id = None  # never stop early: generate exactly n tokens, as ours does
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only wait on each other (and on a busy machine, a lot)
    try:
        with torch.no_grad():
            out = hf.generate(torch.tensor(idx), max_new_tokens=n, do_sample=False, pad_token_id=0,
                              attention_mask=torch.ones(idx.shape, dtype=torch.long))
    finally:
        torch.set_num_threads(threads)
    return out.numpy()


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"L{c['n_layer']}H{c['n_head']}C{c['n_embd']}V{c['vocab_size']}")
def test_greedy_equals_transformers(cfg):
    hf = verify.hf_model(cfg, seed=5)
    ours = load_hf_gpt2(verify.hf_state(hf), cfg["n_head"])
    rows = []
    for B, T in ((3, 3), (1, 7)):
        idx = prompt(B, T, cfg["vocab_size"], seed=T)
        n = cfg["n_positions"] - T  # up to the last position the model has
        got = to_numpy(ours.generate(asarray(idx), n))
        assert got.shape == (B, T + n) and got.dtype == idx.dtype
        np.testing.assert_array_equal(got[:, :T], idx)
        np.testing.assert_array_equal(got, hf_greedy(hf, idx, n))
        rows += [len(np.unique(row)) for row in got[:, T:]]
    assert max(rows) > 2, "constant continuations would hide position errors"


def test_lora_greedy_equals_peft(tmp_path):
    from peft import PeftModel

    from lora_from_scratch.peft_io import save_peft_adapter

    base_sd = verify.peft_base_state()
    ours = apply_lora(load_hf_gpt2(base_sd, verify.PEFT_HEADS), 4, 12, ["q", "k", "v", "o", "fc", "proj"], seed=5)
    verify.randomize_B(ours, scale=0.5)
    save_peft_adapter(ours, str(tmp_path))
    base_hf = verify.peft_hf_model(to_hf_gpt2_state_dict(ours))
    idx = verify.peft_ids(shape=(2, 5))
    n = verify.PEFT_POSITIONS - 5
    base_tokens = hf_greedy(base_hf, idx, n)
    pm = PeftModel.from_pretrained(base_hf, str(tmp_path)).eval()
    got = to_numpy(ours.generate(asarray(idx), n))
    np.testing.assert_array_equal(got, hf_greedy(pm, idx, n))
    assert (got != base_tokens).any(), "the adapters do not change the tokens: vacuous check"


CFG = GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=64)
KINDS = ["base", "lora", "qlora", "qalora"]


def make(kind, merged=False):
    model = GPT(CFG, seed=0)
    if kind == "lora":
        apply_lora(model, 4, 8, ["q", "k", "v", "o", "fc", "proj"], seed=1)
    elif kind == "qlora":
        apply_qlora(model, 4, 8, ["q", "v", "fc", "proj"], blocksize=32, seed=1)
    elif kind == "qalora":
        apply_qalora(model, 4, 8, ["q", "k", "o", "fc"], group_size=16, seed=1)
    if kind != "base":
        verify.randomize_B(model, seed=2, scale=0.5)
    if merged:
        merge_lora(model)
    return model


ADAPTED = [(k, False) for k in KINDS] + [(k, True) for k in KINDS[1:]]


@pytest.mark.parametrize("kind,merged", ADAPTED, ids=[f"{k}{'-merged' if m else ''}" for k, m in ADAPTED])
def test_cache_equals_no_cache_for_every_adapter_kind(kind, merged):
    model = make(kind, merged)
    idx = asarray(prompt(3, 4, CFG.vocab_size))
    n = CFG.block_size - 4
    greedy = to_numpy(model.generate(idx, n))
    np.testing.assert_array_equal(greedy, to_numpy(model.generate(idx, n, use_cache=False)))
    sampled = to_numpy(model.generate(idx, n, temperature=0.8, top_k=20, seed=7))
    np.testing.assert_array_equal(sampled, to_numpy(model.generate(idx, n, temperature=0.8, top_k=20, seed=7,
                                                                  use_cache=False)))
    if kind != "base":
        base = to_numpy(make("base").generate(idx, n))
        assert (greedy != base).any(), f"{kind}: the adapters do not change the tokens: vacuous check"
    if merged:  # merging changes no token (up to rounding, none flips here)
        np.testing.assert_array_equal(greedy, to_numpy(make(kind).generate(idx, n)))


@pytest.mark.parametrize("kind", KINDS)
def test_each_cached_step_gives_the_forwards_logits(kind):
    model = make(kind).eval()
    idx = asarray(prompt(2, 6, CFG.vocab_size, seed=4))
    full = model(idx)  # (2, 6, V)
    cache = KVCache(CFG.n_layer, capacity=6)
    assert rel(forward_cached(model, idx[:, :3], cache), full[:, 2]) < 1e-6  # the prefill of 3 positions
    assert rel(forward_cached(model, idx[:, 3:5], cache), full[:, 4]) < 1e-6  # 2 more: a causal mask after 3
    assert rel(forward_cached(model, idx[:, 5:6], cache), full[:, 5]) < 1e-6  # then one position
    assert cache.length == 6
    with pytest.raises(ValueError, match="KV cache full: 6 \\+ 1 positions exceed its capacity 6"):
        forward_cached(model, idx[:, :1], cache)


def test_sampling_is_seeded_and_top_k_bounds_it():
    model = make("lora")
    idx = asarray(prompt(4, 3, CFG.vocab_size))
    a = to_numpy(model.generate(idx, 20, temperature=1.0, seed=11))
    np.testing.assert_array_equal(a, to_numpy(model.generate(idx, 20, temperature=1.0, seed=11)))
    assert (a != to_numpy(model.generate(idx, 20, temperature=1.0, seed=12))).any()
    np.testing.assert_array_equal(to_numpy(model.generate(idx, 20, temperature=1.5, top_k=1, seed=3)),
                                  to_numpy(model.generate(idx, 20)))
    top3 = to_numpy(model.generate(idx, 10, temperature=2.0, top_k=3, seed=5))
    for t in range(3, 13):  # each sampled token is among the 3 largest logits at its step
        logits = to_numpy(model.eval()(asarray(top3[:, :t]))[:, -1])  # (B, V)
        allowed = np.argsort(-logits, axis=-1)[:, :3]
        assert all(top3[b, t] in allowed[b] for b in range(4))


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.5, None), (2.0, 4)])
def test_sample_frequencies_match_the_softmax(temperature, top_k):
    z = np.random.default_rng(0).standard_normal(8) * 1.5  # (V,) one row of logits
    n = 40_000
    draws = to_numpy(next_token(asarray(np.tile(z, (n, 1)).astype(np.float32)), temperature, top_k,
                                np.random.default_rng(1)))  # (n,) one draw per identical row
    w = z.astype(np.float32).astype(np.float64) / temperature
    if top_k:
        w[w < np.sort(w)[-top_k]] = -np.inf
    p = np.exp(w - w.max()) / np.exp(w - w.max()).sum()
    freq = np.bincount(draws, minlength=8) / n
    assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-12), (freq, p)
    assert freq[p == 0].sum() == 0


def test_refuses_past_the_context_and_bad_arguments():
    model = make("base")
    idx = asarray(prompt(2, 5, CFG.vocab_size))
    assert to_numpy(model.generate(idx, CFG.block_size - 5)).shape == (2, CFG.block_size)  # exactly full: fine
    with pytest.raises(ValueError, match="5 tokens \\+ 28 new tokens = 33 positions exceeds the model's context of "
                                         "32.*refuses rather than slides.*at most 27 new tokens"):
        model.generate(idx, 28)
    bad = [(dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
           (dict(max_new_tokens=2.0), "max_new_tokens must be an integer"),
           (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
           (dict(temperature=float("nan")), "temperature must be a finite number"),
           (dict(temperature=1.0, top_k=0), "top_k must be None or an integer in \\[1, 97\\]"),
           (dict(top_k=98), "top_k must be None or an integer in \\[1, 97\\]"),
           (dict(seed=-3), "seed must be None or an integer >= 0")]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            model.generate(idx, **{"max_new_tokens": 3, **kwargs})
    with pytest.raises(ValueError, match="shape \\(B, T\\)"):
        model.generate(asarray(np.zeros(4, dtype=np.int64)), 2)
    with pytest.raises(ValueError, match="at least one token"):
        model.generate(asarray(np.zeros((2, 0), dtype=np.int64)), 2)
    with pytest.raises(ValueError, match="integers"):
        model.generate(asarray(np.zeros((2, 3))), 2)
    with pytest.raises(ValueError, match="97"):
        model.generate(asarray(np.full((1, 3), 97)), 2)


def test_leaves_the_model_as_it_was():
    model = make("lora").train()
    model.blocks[1].eval()  # a mixed state comes back as it was
    idx = asarray(prompt(2, 4, CFG.vocab_size))
    np.testing.assert_array_equal(to_numpy(model.generate(idx, 0)), to_numpy(idx))
    np.testing.assert_array_equal(to_numpy(model.generate(to_numpy(idx).tolist(), 3)), to_numpy(model.generate(idx, 3)))
    model.generate(idx, 5)
    assert all(m.training == (not name.startswith("blocks.1")) for name, m in model.named_modules())
    assert all(vars(m).get("_cache") is None for _, m in model.named_modules())
    assert all(p.grad is None for p in model.parameters())
    assert len(lora_layers(model)) == 12
