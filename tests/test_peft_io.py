"""Folders written by ``peft_io.save_peft_adapter`` and ``hf_io.save_hf_gpt2``: modes, refusals, bad files.

No transformers or PEFT needed: these check our own files (``test_lora_peft`` and ``test_hf_export``
check them against PEFT and transformers).
"""

import os

import numpy as np
import pytest

from lora_from_scratch import files
from lora_from_scratch.hf_io import save_hf_gpt2
from lora_from_scratch.lora import apply_lora, lora_layers
from lora_from_scratch.model import GPT, GPTConfig
from lora_from_scratch.peft_io import CONFIG_NAME, WEIGHTS_NAME, load_peft_adapter, save_peft_adapter

CFG = GPTConfig(vocab_size=29, block_size=8, n_layer=2, n_head=2, n_embd=16)


def adapted(seed=0):
    return apply_lora(GPT(CFG, seed=0), 2, 4, ["q", "v", "fc"], seed=seed)


def _mode(path) -> int:
    return os.stat(path).st_mode & 0o777


@pytest.mark.parametrize("save", [save_peft_adapter, lambda m, d: save_hf_gpt2(m, d, base_only=True)],
                         ids=["peft", "hf"])
def test_a_new_folder_gets_the_mode_makedirs_gives(tmp_path, save):
    plain = tmp_path / "plain"
    os.makedirs(plain)
    out = tmp_path / "out"
    save(adapted(), str(out))
    assert _mode(out) == _mode(plain) == files.usual_mode(folder=True)  # not mkdtemp's private 0700
    plain_file = plain / "f.txt"
    plain_file.write_text("x")
    assert all(_mode(out / name) == _mode(plain_file) for name in os.listdir(out))


def test_a_corrupt_adapter_file_names_the_file(tmp_path):
    save_peft_adapter(adapted(), str(tmp_path))
    wpath = tmp_path / WEIGHTS_NAME
    raw = wpath.read_bytes()
    wpath.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is not a readable safetensors file"):
        load_peft_adapter(GPT(CFG, seed=0), str(tmp_path))
    os.remove(wpath)
    with pytest.raises(FileNotFoundError, match=f"no {WEIGHTS_NAME} in"):
        load_peft_adapter(GPT(CFG, seed=0), str(tmp_path))


def test_round_trip_through_the_folder(tmp_path):
    src = adapted()
    for layer in lora_layers(src).values():
        layer.lora_B.data = layer.lora_B.data + 0.1
    save_peft_adapter(src, str(tmp_path))
    back = load_peft_adapter(GPT(CFG, seed=0), str(tmp_path))
    for path, layer in lora_layers(src).items():
        theirs = lora_layers(back)[path]
        assert np.array_equal(np.asarray(theirs.lora_A.data), np.asarray(layer.lora_A.data))
        assert np.array_equal(np.asarray(theirs.lora_B.data), np.asarray(layer.lora_B.data))
        assert theirs.lora_A.dtype == layer.lora_A.dtype


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_non_finite_weights_are_refused_and_nothing_is_written(tmp_path):
    model = adapted()
    lora_layers(model)["blocks.1.mlp.fc"].lora_B.data[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"refusing to save.*'base_model\.model\.transformer\.h\.1\.mlp\.c_fc\."
                                         r"lora_B\.weight' holds NaN or inf"):
        save_peft_adapter(model, str(tmp_path / "a"))
    model = GPT(CFG, seed=0)
    model.wpe.weight.data[0, 0] = np.inf
    with pytest.raises(ValueError, match=r"refusing to save: 'transformer\.wpe\.weight' holds NaN or inf"):
        save_hf_gpt2(model, str(tmp_path / "b"))
    assert os.listdir(tmp_path) == []  # no folder, no temporary left behind
    assert CONFIG_NAME == "adapter_config.json"
