"""Loading a GPT-2 folder as transformers' ``save_pretrained`` writes it (``hf_io.load_hf_gpt2(directory)``).

Folders are written by transformers itself from tiny random ``GPT2Config``s (nothing downloaded):
one ``model.safetensors``, shards with an index, bfloat16 and float16 weights. Checked: the logits
against transformers' (float32, max abs diff < 1e-5), the weights bit for bit against the state-dict
path, every refusal (a pickle-only folder, a missing folder or config, an unsupported config field,
sizes that disagree with the tensors, a truncated file) with the name of what is wrong, and the
traced peak memory of loading (at most 1.3x the model's bytes).
"""

import json
import os
import tracemalloc

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from lora_from_scratch import hf_io, verify
from lora_from_scratch.backend import asarray, to_numpy
from lora_from_scratch.hf_folder import gpt2_config, safetensors_header
from lora_from_scratch.hf_io import load_hf_gpt2, save_hf_gpt2
from lora_from_scratch.model import GPT, GPTConfig
from lora_from_scratch.nn import Buffer, Module, Parameter

CONFIGS = list(verify.HF_CONFIGS)


def saved(tmp_path, cfg, seed=0, name="gpt2", **save_kwargs):
    """A random transformers GPT-2 of ``cfg`` and the folder its ``save_pretrained`` wrote."""
    m = verify.hf_model(cfg, seed=seed)
    path = tmp_path / name
    m.save_pretrained(str(path), **save_kwargs)
    return m, str(path)


def weights(model) -> dict:
    return {n: to_numpy(p.data) for n, p in model.named_parameters()}


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"L{c['n_layer']}H{c['n_head']}C{c['n_embd']}")
def test_a_saved_folder_loads_and_its_logits_match_transformers(tmp_path, cfg):
    m, path = saved(tmp_path, cfg)
    assert sorted(os.listdir(path)) == ["config.json", "generation_config.json", "model.safetensors"]
    ours = load_hf_gpt2(path)
    assert ours.config == GPTConfig(vocab_size=cfg["vocab_size"], block_size=cfg["n_positions"],
                                    n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"])
    ids, _ = verify.hf_batch(cfg, seed=1)
    with torch.no_grad():
        theirs = m(torch.from_numpy(ids)).logits.numpy()  # (B, T, V)
    assert np.abs(to_numpy(ours(asarray(ids))) - theirs).max() < 1e-5
    by_dict = weights(load_hf_gpt2(verify.hf_state(m), cfg["n_head"]))
    got = weights(ours)
    assert sorted(got) == sorted(by_dict)
    for name in got:  # the folder path and the state-dict path hold the same numbers, bit for bit
        assert got[name].dtype == np.float32 and np.array_equal(got[name], by_dict[name]), name


def test_a_sharded_folder_loads(tmp_path):
    cfg = CONFIGS[0]
    _, single = saved(tmp_path, cfg, name="one")
    _, sharded = saved(tmp_path, cfg, name="shards", max_shard_size="20KB")
    index = json.load(open(os.path.join(sharded, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not os.path.exists(os.path.join(sharded, "model.safetensors"))
    a, b = weights(load_hf_gpt2(single)), weights(load_hf_gpt2(sharded))
    assert all(np.array_equal(a[n], b[n]) for n in a)
    os.remove(os.path.join(sharded, shards[-1]))
    with pytest.raises(FileNotFoundError, match=f"names shard {shards[-1]}"):
        load_hf_gpt2(sharded)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_folders_are_widened_exactly(tmp_path, dtype):
    cfg = CONFIGS[1]
    m = verify.hf_model(cfg, seed=2).to(dtype)
    m.save_pretrained(str(tmp_path))
    ours = weights(load_hf_gpt2(str(tmp_path)))
    wte = m.transformer.wte.weight.detach().float().numpy()  # (V, C), the half values widened by torch
    c_fc = m.transformer.h[1].mlp.c_fc.weight.detach().float().numpy()  # (C, 4C)
    assert ours["wte.weight"].dtype == np.float32 and np.array_equal(ours["wte.weight"], wte)
    assert np.array_equal(ours["blocks.1.mlp.fc.weight"], c_fc.T)


def test_loading_builds_the_same_modules_as_the_constructor(tmp_path):
    """Every module of the loaded GPT has the type and the settings (sizes, heads, eps, dropout) GPT(config) gives."""
    _, path = saved(tmp_path, CONFIGS[1])
    loaded = load_hf_gpt2(path)
    fresh = GPT(loaded.config, seed=0)

    def settings(model):
        out = {}
        for name, mod in model.named_modules():
            plain = {k: v for k, v in vars(mod).items() if not isinstance(v, (Parameter, Buffer, Module))
                     and k not in ("_cache", "_rng", "seed")}
            out[name] = (type(mod), plain)
        return out

    assert settings(loaded) == settings(fresh)
    assert {n: p.shape for n, p in loaded.named_parameters()} == {n: p.shape for n, p in fresh.named_parameters()}
    assert all(p.trainable for p in loaded.parameters())


def test_gpt2model_keys_and_mask_buffers_are_read(tmp_path):
    """The hub's own files have GPT2Model's names (no ``transformer.``) and older ones the attn.bias masks."""
    m = verify.hf_model(CONFIGS[0], seed=4)
    m.save_pretrained(str(tmp_path))
    sd = verify.hf_state(m)
    plain = {k.removeprefix("transformer."): v for k, v in sd.items() if k != "lm_head.weight"}
    P = CONFIGS[0]["n_positions"]
    for i in range(CONFIGS[0]["n_layer"]):
        plain[f"h.{i}.attn.bias"] = np.tril(np.ones((P, P), np.float32))[None, None]  # (1, 1, P, P)
    save_file(plain, str(tmp_path / "model.safetensors"))
    a, b = weights(load_hf_gpt2(str(tmp_path))), weights(load_hf_gpt2(sd, CONFIGS[0]["n_head"]))
    assert all(np.array_equal(a[n], b[n]) for n in a)


def test_a_stored_lm_head_must_be_the_embedding(tmp_path):
    m = verify.hf_model(CONFIGS[0], seed=5)
    m.save_pretrained(str(tmp_path))
    sd = verify.hf_state(m)
    sd["lm_head.weight"] = sd["transformer.wte.weight"].copy()
    save_file(sd, str(tmp_path / "model.safetensors"))
    load_hf_gpt2(str(tmp_path))
    sd["lm_head.weight"][-1, 0] += 1.0  # the last row: the comparison runs over the whole table
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
        load_hf_gpt2(str(tmp_path))


def test_a_pickle_only_folder_is_refused_without_being_opened(tmp_path):
    m, path = saved(tmp_path, CONFIGS[0])
    os.remove(os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:
        f.write(b"not even a pickle")  # opening it would fail differently
    with pytest.raises(ValueError, match=r"only pytorch_model.bin, a pickle.*save_pretrained\(DIR, "
                                         r"safe_serialization=True\)") as e:
        load_hf_gpt2(path)
    assert "\n" not in str(e.value)


def test_missing_folder_config_or_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model folder"):
        load_hf_gpt2(str(tmp_path / "nowhere"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        load_hf_gpt2(str(tmp_path / "file"))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_hf_gpt2(str(tmp_path))
    _, path = saved(tmp_path, CONFIGS[0])
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_hf_gpt2(path)
    with pytest.raises(ValueError, match="pass n_head"):
        load_hf_gpt2({})


GOOD = dict(model_type="gpt2", vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4, n_inner=None,
            activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=True)


@pytest.mark.parametrize("field, value", [
    ("model_type", "llama"), ("n_inner", 100), ("activation_function", "relu"), ("activation_function", "gelu"),
    ("layer_norm_epsilon", 1e-6), ("tie_word_embeddings", False), ("scale_attn_weights", False),
    ("scale_attn_by_inverse_layer_idx", True), ("add_cross_attention", True), ("add_cross_attention", 1),
    ("quantization_config", {"load_in_4bit": True}), ("n_head", 3), ("vocab_size", 0), ("n_layer", "2"),
    ("n_embd", 32.0), ("n_ctx", 8)])
def test_unsupported_config_fields_are_named(field, value):
    assert gpt2_config(dict(GOOD), "d/config.json") == GPTConfig(50, 16, 2, 4, 32)
    with pytest.raises(ValueError, match=f"d/config.json: field '{field}'") as e:
        gpt2_config(dict(GOOD, **{field: value}), "d/config.json")
    assert "\n" not in str(e.value)


def test_the_accepted_variants_of_a_config():
    assert gpt2_config(dict(GOOD, activation_function="gelu_pytorch_tanh", n_inner=128, n_ctx=16,
                            reorder_and_upcast_attn=True)) == GPTConfig(50, 16, 2, 4, 32)
    assert gpt2_config({"model_type": "gpt2"}) == GPTConfig(50257, 1024, 12, 12, 768)  # GPT2Config's defaults


def test_sizes_are_checked_against_the_headers_before_any_weight_is_read(tmp_path, monkeypatch):
    _, path = saved(tmp_path, CONFIGS[0])
    config = json.load(open(os.path.join(path, "config.json")))
    json.dump(dict(config, vocab_size=51), open(os.path.join(path, "config.json"), "w"))

    def no_read(*args, **kwargs):
        raise AssertionError("a tensor was read before the sizes were checked")

    monkeypatch.setattr(hf_io, "read_tensor", no_read)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'transformer.wte.weight' has shape \[50, 32\], "
                                         r"config.json's sizes give \[51, 32\]"):
        load_hf_gpt2(path)
    json.dump(dict(config, n_layer=3), open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"missing tensors \['transformer.h.2.ln_1.weight'"):
        load_hf_gpt2(path)
    json.dump(dict(config, n_layer=1), open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"unexpected tensors \['transformer.h.1."):
        load_hf_gpt2(path)


def test_a_truncated_or_foreign_file_is_named(tmp_path):
    m, path = saved(tmp_path, CONFIGS[0])
    weights_file = os.path.join(path, "model.safetensors")
    data = open(weights_file, "rb").read()
    open(weights_file, "wb").write(data[:-100])
    with pytest.raises(ValueError, match=r"model.safetensors: tensor '.*' .* do not fit its shape or the file"):
        load_hf_gpt2(path)
    open(weights_file, "wb").write(b"\x00" * 7)
    with pytest.raises(ValueError, match="model.safetensors is not a safetensors file"):
        safetensors_header(weights_file)
    sd = verify.hf_state(m)
    del sd["lm_head.weight"]
    save_file(dict(sd, **{"transformer.wte.weight": np.zeros((50, 32), np.int64)}), weights_file)
    with pytest.raises(ValueError, match="tensor 'transformer.wte.weight' is stored as I64"):
        load_hf_gpt2(path)


def test_loading_peaks_near_the_models_own_bytes(tmp_path):
    """tracemalloc's peak while loading is at most 1.3x the loaded parameters' bytes (no second model)."""
    cfg = GPTConfig(vocab_size=4000, block_size=256, n_layer=2, n_head=4, n_embd=256)
    path = str(tmp_path / "gpt")
    save_hf_gpt2(GPT(cfg, seed=0), path)
    tracemalloc.start()
    try:
        model = load_hf_gpt2(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    model_bytes = sum(p.nbytes for p in model.parameters())
    assert model_bytes > 6e6
    assert peak <= 1.3 * model_bytes, f"peak {peak / model_bytes:.2f}x the model's bytes"
