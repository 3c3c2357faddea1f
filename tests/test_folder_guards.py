"""Folders: PEFT adapter folders and Hugging Face GPT-2 folders (``files.write_folder``, ``peft_io``, ``hf_io``).

Writing over an existing folder is all or nothing, even when interrupted between the two renames
of the swap; an ``adapter_config.json`` is checked field by field, the same way whether the model
already has adapters or not; a GPT-2 ``config.json`` is checked by ``hf_folder.gpt2_config``.
No transformers or PEFT needed except where a test says so.
"""

import json
import os

import numpy as np
import pytest

from lora_from_scratch import files, hf_folder
from lora_from_scratch.backend import to_numpy
from lora_from_scratch.hf_io import CONFIG_NAME as HF_CONFIG
from lora_from_scratch.hf_io import WEIGHTS_NAME as HF_WEIGHTS
from lora_from_scratch.hf_io import hf_gpt2_config_dict, save_hf_gpt2
from lora_from_scratch.lora import apply_lora, lora_layers
from lora_from_scratch.model import GPT, GPTConfig
from lora_from_scratch.peft_io import CONFIG_NAME, WEIGHTS_NAME, load_peft_adapter, save_peft_adapter

CFG = GPTConfig(vocab_size=29, block_size=8, n_layer=2, n_head=2, n_embd=16)
IDX = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 6))


def adapted(alpha=8, seed=0):
    model = apply_lora(GPT(CFG, seed=0), 2, alpha, ["q", "v", "fc"], seed=seed)
    rng = np.random.default_rng(seed + 10)
    for layer in lora_layers(model).values():
        layer.adapter.B.data = (rng.standard_normal(layer.adapter.B.shape) * 0.1).astype(np.float32)
    return model


def snapshot(folder) -> dict:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def interrupt_rename(monkeypatch, at: int, error=KeyboardInterrupt):
    """Make the ``at``-th call of os.replace / os.rename raise ``error`` (a Ctrl-C by default), the others pass."""
    real = {"replace": os.replace, "rename": os.rename}
    calls = []

    def patched(which):
        def call(*args, **kw):
            calls.append(args)
            if len(calls) == at:
                raise error()
            return real[which](*args, **kw)
        return call

    monkeypatch.setattr(os, "replace", patched("replace"))
    monkeypatch.setattr(os, "rename", patched("rename"))
    return calls


# ----------------------------------------------------------------- item: all-or-nothing folders
@pytest.mark.parametrize("at", [1, 2])
def test_an_interrupted_peft_overwrite_leaves_the_old_folder_whole(tmp_path, monkeypatch, at):
    out = tmp_path / "adapter"
    save_peft_adapter(adapted(alpha=8), str(out))
    (out / "README.md").write_text("notes kept beside the adapter")
    before = snapshot(out)
    interrupt_rename(monkeypatch, at)
    with pytest.raises(KeyboardInterrupt):
        save_peft_adapter(adapted(alpha=32, seed=1), str(out))
    monkeypatch.undo()
    assert snapshot(out) == before  # wholly old: the old config beside the old weights
    assert os.listdir(tmp_path) == ["adapter"]  # no temporary folder left behind
    loaded = load_peft_adapter(GPT(CFG, seed=0), str(out))
    assert {layer.adapter.alpha for layer in lora_layers(loaded).values()} == {8.0}
    np.testing.assert_array_equal(to_numpy(loaded(IDX)), to_numpy(adapted(alpha=8)(IDX)))


def test_a_completed_overwrite_is_wholly_new_and_keeps_other_files(tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    save_peft_adapter(adapted(alpha=8), str(out))
    (out / "README.md").write_text("notes kept beside the adapter")
    calls = interrupt_rename(monkeypatch, at=3)  # the swap needs only two renames: nothing is interrupted
    save_peft_adapter(adapted(alpha=32, seed=1), str(out))
    monkeypatch.undo()
    assert len(calls) == 2
    assert sorted(os.listdir(out)) == sorted([CONFIG_NAME, WEIGHTS_NAME, "README.md"])
    assert (out / "README.md").read_text() == "notes kept beside the adapter"
    assert os.listdir(tmp_path) == ["adapter"]
    loaded = load_peft_adapter(GPT(CFG, seed=0), str(out))
    assert {layer.adapter.alpha for layer in lora_layers(loaded).values()} == {32.0}
    np.testing.assert_array_equal(to_numpy(loaded(IDX)), to_numpy(adapted(alpha=32, seed=1)(IDX)))


@pytest.mark.parametrize("at", [1, 2])
def test_an_interrupted_hf_overwrite_leaves_the_old_folder_whole(tmp_path, monkeypatch, at):
    out = tmp_path / "gpt2"
    old = GPT(CFG, seed=0)
    save_hf_gpt2(old, str(out))
    (out / "vocab.json").write_text("{}")
    before = snapshot(out)
    interrupt_rename(monkeypatch, at, error=OSError)
    with pytest.raises(OSError):
        save_hf_gpt2(GPT(GPTConfig(vocab_size=29, block_size=8, n_layer=1, n_head=2, n_embd=16), seed=1), str(out))
    monkeypatch.undo()
    assert snapshot(out) == before
    assert json.loads(before[HF_CONFIG])["n_layer"] == 2 and HF_WEIGHTS in before
    assert os.listdir(tmp_path) == ["gpt2"]


def test_write_folder_refuses_a_file_and_names_an_unwritable_parent(tmp_path, monkeypatch):
    import tempfile

    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"file exists and is not a directory"):
        files.write_folder(str(tmp_path / "file"), {"a.json": files.json_writer({})})

    def denied(*args, dir=None, prefix="", **kw):
        raise PermissionError(13, "Permission denied", os.path.join(dir, prefix + "abc123"))

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    target = tmp_path / "adapter"
    with pytest.raises(PermissionError, match=rf"cannot write {target}: Permission denied") as err:
        save_peft_adapter(adapted(), str(target))
    assert ".tmp-" not in str(err.value)


# ----------------------------------------------------------------- items: adapter_config.json, field by field
def _with_config(tmp_path, edit=None, text=None):
    """A saved PEFT folder whose adapter_config.json is edited (``edit(config)``) or replaced by ``text``."""
    out = tmp_path / "adapter"
    save_peft_adapter(adapted(), str(out))
    path = out / CONFIG_NAME
    if text is None:
        config = json.loads(path.read_text())
        edit(config)
        text = json.dumps(config)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return out


@pytest.mark.parametrize("into", ["plain", "adapted"])
@pytest.mark.parametrize("alpha", [-16, 0, float("nan"), float("inf"), "abc", None, True])
def test_a_bad_lora_alpha_is_refused_into_any_model(tmp_path, into, alpha):
    out = _with_config(tmp_path, lambda c: c.update(lora_alpha=alpha))
    model = GPT(CFG, seed=0) if into == "plain" else adapted()
    before = to_numpy(model(IDX))
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}: field 'lora_alpha': expected a finite number > 0"):
        load_peft_adapter(model, str(out))
    np.testing.assert_array_equal(to_numpy(model(IDX)), before)  # nothing changed


@pytest.mark.parametrize("into", ["plain", "adapted"])
def test_a_bad_alpha_pattern_value_is_refused_into_any_model(tmp_path, into):
    out = _with_config(tmp_path, lambda c: c.update(alpha_pattern={"transformer.h.0.mlp.c_fc": -3}))
    model = GPT(CFG, seed=0) if into == "plain" else adapted()
    with pytest.raises(ValueError, match=r"field 'alpha_pattern': 'transformer\.h\.0\.mlp\.c_fc': expected a finite "
                                         r"number > 0, got -3"):
        load_peft_adapter(model, str(out))


CONFIG_EDITS = [
    ("bad regex alpha", lambda c: c.update(alpha_pattern={"(": 4}), r"field 'alpha_pattern': '\(' is not a regular"),
    ("bad regex rank", lambda c: c.update(rank_pattern={"[a-": 2}), r"field 'rank_pattern': '\[a-' is not a regular"),
    ("pattern list", lambda c: c.update(rank_pattern=[2]), r"field 'rank_pattern': expected a JSON object"),
    ("rank 0", lambda c: c.update(r=0), r"field 'r': expected an integer >= 1, got 0"),
    ("rank str", lambda c: c.update(r="2"), r"field 'r': expected an integer, got '2'"),
    ("rslora no", lambda c: c.update(use_rslora="no"), r"field 'use_rslora': expected true or false, got 'no'"),
    ("fan_in 1", lambda c: c.update(fan_in_fan_out=1), r"field 'fan_in_fan_out': expected true or false"),
    ("dropout 1", lambda c: c.update(lora_dropout=1.0), r"field 'lora_dropout': expected a number in \[0, 1\)"),
    ("peft_type", lambda c: c.update(peft_type="IA3"), r"field 'peft_type': 'IA3' is not 'LORA'"),
    ("dora", lambda c: c.update(use_dora=True), r"field 'use_dora': true is not supported"),
]


@pytest.mark.parametrize("what,edit,message", CONFIG_EDITS, ids=[case[0] for case in CONFIG_EDITS])
def test_adapter_config_fields_are_checked_by_name(tmp_path, what, edit, message):
    out = _with_config(tmp_path, edit)
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}: " + message):
        load_peft_adapter(adapted(), str(out))


@pytest.mark.parametrize("text,message", [
    ('{"r": 2, "lora_alpha": ', r"adapter_config\.json: not valid JSON \(Expecting value: line 1 column 24"),
    ("[1, 2]", r"adapter_config\.json: expected a JSON object, got list \[1, 2\]"),
    (b"\xff\xfe{}", r"adapter_config\.json: not valid JSON \('utf-8' codec can't decode"),
], ids=["truncated", "list", "binary"])
def test_an_adapter_config_that_is_not_a_json_object_gets_one_line(tmp_path, text, message):
    out = _with_config(tmp_path, text=text)
    with pytest.raises(ValueError, match=message) as err:
        load_peft_adapter(GPT(CFG, seed=0), str(out))
    assert str(out / CONFIG_NAME) in str(err.value) and "\n" not in str(err.value)


def test_non_finite_peft_weights_are_refused_naming_file_and_key(tmp_path):
    from safetensors.numpy import save_file

    out = tmp_path / "adapter"
    save_peft_adapter(adapted(), str(out))
    tensors, meta = files.read_safetensors(str(out / WEIGHTS_NAME))
    key = "base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight"
    tensors[key][3, 1] = np.nan
    save_file(tensors, str(out / WEIGHTS_NAME), metadata=meta)
    model = adapted()
    before = to_numpy(model(IDX))
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}: tensor '{key}': holds NaN or inf"):
        load_peft_adapter(model, str(out))
    np.testing.assert_array_equal(to_numpy(model(IDX)), before)


def test_a_bad_weights_file_is_named(tmp_path):
    out = tmp_path / "adapter"
    save_peft_adapter(adapted(), str(out))
    small = GPT(GPTConfig(vocab_size=29, block_size=8, n_layer=1, n_head=2, n_embd=16), seed=0)
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}: .*block 1 does not exist"):
        load_peft_adapter(small, str(out))


# ----------------------------------------------------------------- Hugging Face config.json (for the folder loader)
def test_our_and_transformers_gpt2_configs_pass():
    assert hf_folder.gpt2_config(hf_gpt2_config_dict(CFG), "config.json") == CFG
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=29, n_positions=8, n_embd=16, n_layer=2, n_head=2).to_dict()
    assert hf_folder.gpt2_config(config, "config.json") == CFG


HF_EDITS = [
    ("model_type", {"model_type": "llama"}, r"field 'model_type' is 'llama'; only 'gpt2'"),
    ("heads", {"n_head": 3}, r"field 'n_head' \(3\) does not divide 'n_embd' \(16\)"),
    ("n_embd str", {"n_embd": "16"}, r"field 'n_embd' must be a positive integer, got '16'"),
    ("n_layer 0", {"n_layer": 0}, r"field 'n_layer' must be a positive integer, got 0"),
    ("n_inner", {"n_inner": 100}, r"field 'n_inner' is 100; this GPT's MLP is 4 \* n_embd = 64"),
    ("gelu", {"activation_function": "relu"}, r"field 'activation_function' is 'relu'; this GPT supports only"),
    ("eps", {"layer_norm_epsilon": 1e-6}, r"field 'layer_norm_epsilon' is 1e-06"),
    ("untied", {"tie_word_embeddings": False}, r"field 'tie_word_embeddings' is False"),
    ("dropout", {"attn_pdrop": 1.5}, r"field 'attn_pdrop' must be a number in \[0, 1\), got 1\.5"),
    ("quantized", {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}},
     r"field 'quantization_config' is set \(a quantized folder\)"),
]


@pytest.mark.parametrize("what,change,message", HF_EDITS, ids=[case[0] for case in HF_EDITS])
def test_hf_gpt2_config_fields_are_checked_by_name(what, change, message):
    config = dict(hf_gpt2_config_dict(CFG), **change)
    with pytest.raises(ValueError, match=r"some/folder/config\.json: " + message):
        hf_folder.gpt2_config(config, "some/folder/config.json")


def test_hf_gpt2_config_must_be_an_object_and_missing_sizes_take_gpt2s_defaults():
    with pytest.raises(ValueError, match=r"config\.json: expected a JSON object, got list"):
        hf_folder.gpt2_config([1], "config.json")
    config = hf_gpt2_config_dict(CFG)
    del config["n_positions"]  # transformers reads a missing size as GPT2Config's default, and so do we
    assert hf_folder.gpt2_config(config, "config.json").block_size == 1024
