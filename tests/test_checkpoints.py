"""Checkpoints of every model kind: plain, LoRA, QLoRA, QA-LoRA, merged, several adapters.

``checkpoint.save_checkpoint`` / ``checkpoint.load_checkpoint`` must give back the same layer kinds, the quantized
bases as their stored codes and constants (not float, not re-quantized), the trainable flags, and
logits identical bit for bit. A missing, truncated or corrupt file gets an error that names it.
"""

import json
import os

import numpy as np
import pytest

from lora_from_scratch import checkpoint, files, lora
from lora_from_scratch.backend import asarray, to_numpy
from lora_from_scratch.model import GPT, GPTConfig
from lora_from_scratch.qalora import apply_qalora
from lora_from_scratch.qlora import apply_qlora

CFG = GPTConfig(vocab_size=31, block_size=12, n_layer=2, n_head=2, n_embd=64)
IDX = np.random.default_rng(0).integers(0, CFG.vocab_size, (3, 11))


def _randomize(model, seed=1):
    rng = np.random.default_rng(seed)
    for layer in lora.lora_layers(model).values():
        for a in layer.adapters.values():
            a.B.data = asarray(rng.standard_normal(a.B.shape) * 0.1, dtype=str(a.B.dtype))
    return model


def make(kind):
    m = GPT(CFG, seed=0)
    if kind == "plain":
        return m
    if kind in ("lora", "lora_merged", "lora_two_adapters"):
        lora.apply_lora(m, 4, 8, ["q", "v", "fc"], seed=1, dropout=0.1)
    elif kind in ("qlora", "qlora_no_dq", "qlora_requantized"):
        apply_qlora(m, 4, 8, ["q", "k", "proj"], seed=1, double_quant=kind != "qlora_no_dq")
    elif kind in ("qalora", "qalora_merged", "qalora_deployed"):
        apply_qalora(m, 4, 8, ["q", "o", "fc"], bits=3, group_size=16, seed=1)
    if kind == "lora_two_adapters":
        lora.add_adapter(m, "task2", 2, 4, seed=3)
        lora.set_adapter(m, "task2")
    _randomize(m)
    if kind in ("lora_merged", "qalora_merged"):
        lora.merge_lora(m)
    if kind == "qlora_requantized":
        lora.merge_lora(m, requantize=True)
    if kind == "qalora_deployed":
        lora.merge_and_unload(m)
    return m


KINDS = ["plain", "lora", "lora_merged", "lora_two_adapters", "qlora", "qlora_no_dq", "qlora_requantized",
         "qalora", "qalora_merged", "qalora_deployed"]


def _structure(model):
    out = {}
    for name, m in model.named_modules():
        entry = type(m).__name__
        if isinstance(m, lora.AdaptedLinear):
            entry += f" active={m.active} merged={m.merged} adapters={m.adapters.keys()}"
        out[name] = entry
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_exact(kind, tmp_path):
    model = make(kind)
    path = str(tmp_path / f"{kind}.safetensors")
    checkpoint.save_checkpoint(model, path, metadata={"note": kind})
    back = checkpoint.load_checkpoint(path)
    assert _structure(back) == _structure(model)
    assert {n: p.trainable for n, p in back.named_parameters()} == {n: p.trainable for n, p in model.named_parameters()}
    ours, theirs = model.state_dict(), back.state_dict()
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and np.array_equal(to_numpy(ours[k]), to_numpy(theirs[k])), k
    model.eval(), back.eval()
    assert np.array_equal(to_numpy(model(IDX)), to_numpy(back(IDX)))  # bit for bit
    assert checkpoint.checkpoint_metadata(path)["note"] == kind


@pytest.mark.parametrize("kind", ["qlora", "qalora"])
def test_quantized_bases_are_stored_as_codes(kind, tmp_path):
    model = make(kind)
    path = str(tmp_path / "q.safetensors")
    checkpoint.save_checkpoint(model, path)
    tensors, _ = checkpoint.read_checkpoint(path)
    layer = model.get_submodule("blocks.0.attn.q")
    out_in = layer.out_features * layer.in_features
    stored = {k[len("blocks.0.attn.q.base."):]: v for k, v in tensors.items() if k.startswith("blocks.0.attn.q.base.")}
    if kind == "qlora":
        assert sorted(stored) == ["absmax2", "bias", "offset", "packed", "qabsmax"]
        assert stored["packed"].dtype == np.uint8 and stored["packed"].size == out_in // 2  # two codes per byte
        assert stored["qabsmax"].dtype == np.uint8
    else:
        assert sorted(stored) == ["bias", "packed", "scales", "zeros"]
        assert stored["packed"].dtype == np.uint8 and stored["packed"].shape == (out_in * layer.bits // 8,)  # packed
        assert stored["scales"].dtype == np.float16
    assert not any(v.dtype.kind == "f" and v.size == out_in for v in stored.values())  # no float W0 in the file
    size_plain = _file_size(make("plain"), tmp_path / "plain.safetensors")
    assert os.path.getsize(path) < size_plain


def _file_size(model, path):
    checkpoint.save_checkpoint(model, str(path))
    return os.path.getsize(path)


def test_float64_model_round_trip(tmp_path):
    model = make("qalora").astype("float64")
    path = str(tmp_path / "f64.safetensors")
    checkpoint.save_checkpoint(model, path)
    back = checkpoint.load_checkpoint(path)
    assert back.wte.weight.dtype == np.float64 and back.blocks[0].attn.q.lora_A.dtype == np.float64
    assert np.array_equal(to_numpy(model(IDX)), to_numpy(back(IDX)))
    cast = checkpoint.load_checkpoint(path, dtype="float32")
    assert cast.wte.weight.dtype == np.float32


def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    path = tmp_path / "good.safetensors"
    checkpoint.save_checkpoint(make("qlora"), str(path))
    raw = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"truncated\.safetensors.*not a readable safetensors file"):
        checkpoint.load_checkpoint(str(truncated))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a checkpoint at all" * 10)
    with pytest.raises(ValueError, match=r"garbage\.safetensors.*not a readable"):
        checkpoint.load_checkpoint(str(garbage))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        checkpoint.load_checkpoint(str(tmp_path / "missing.safetensors"))


def test_a_file_whose_structure_does_not_match_its_tensors(tmp_path):
    from safetensors.numpy import save_file

    model = make("qlora")
    tensors = {k: np.ascontiguousarray(to_numpy(v)) for k, v in model.state_dict().items()}
    meta = {"format": checkpoint.FORMAT, "config": json.dumps(CFG.to_dict()),
            "layers": json.dumps(checkpoint.layer_specs(model))}
    del tensors["blocks.0.attn.q.base.packed"]
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ValueError, match=r"bad\.safetensors.*missing keys \['blocks\.0\.attn\.q\.base\.packed'\]"):
        checkpoint.load_checkpoint(str(bad))
    meta["layers"] = "{not json"
    worse = tmp_path / "worse.safetensors"
    save_file(tensors, str(worse), metadata=meta)
    with pytest.raises(ValueError, match=r"worse\.safetensors.*'layers'.*not valid JSON"):
        checkpoint.load_checkpoint(str(worse))
    meta["layers"] = json.dumps({"blocks.0.attn.q": {"kind": "Mystery"}})
    odd = tmp_path / "odd.safetensors"
    save_file(tensors, str(odd), metadata=meta)
    with pytest.raises(ValueError, match=r"odd\.safetensors.*unknown layer kind 'Mystery'"):
        checkpoint.load_checkpoint(str(odd))


def test_non_finite_buffer_is_refused_and_nothing_is_written(tmp_path):
    model = make("qalora")
    model.get_submodule("blocks.0.attn.q").base.zeros.data[0, 0] = np.nan
    path = tmp_path / "nan.safetensors"
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q\.base\.zeros.*NaN"):
        checkpoint.save_checkpoint(model, str(path))
    assert not path.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_a_layer_no_checkpoint_can_describe_is_refused_by_path_and_nothing_is_written(tmp_path):
    from lora_from_scratch.nn import Embedding

    model = make("lora")
    model.set_submodule("blocks.1.attn.o", Embedding(64, 64))
    path = tmp_path / "odd.safetensors"
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.o: a Embedding is not a layer a checkpoint can describe"):
        checkpoint.save_checkpoint(model, str(path))
    assert not os.listdir(tmp_path)


def test_reserved_metadata_keys_are_refused(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        checkpoint.save_checkpoint(make("plain"), str(tmp_path / "x.safetensors"), metadata={"layers": "mine"})


# ----------------------------------------------------------------- adapter files: what load_adapter refuses
def _adapter_file(tmp_path, plant=None):
    """A saved LoRA adapter file, rewritten with ``plant(tensors)`` applied (save_adapter refuses NaN itself)."""
    from safetensors.numpy import save_file

    path = str(tmp_path / "task.safetensors")
    checkpoint.save_adapter(make("lora"), path)
    tensors, meta = checkpoint.read_checkpoint(path)
    if plant is not None:
        plant(tensors)
        save_file(tensors, path, metadata=meta)
    return path


@pytest.mark.parametrize("what,plant", [
    ("NaN", lambda t: t["blocks.1.attn.v.lora_B"].__setitem__((0, 0), np.nan)),
    ("inf", lambda t: t["blocks.1.attn.v.lora_B"].__setitem__((1, 2), -np.inf)),
    ("int", lambda t: t.__setitem__("blocks.1.attn.v.lora_B", t["blocks.1.attn.v.lora_B"].astype(np.int32))),
])
def test_load_adapter_refuses_non_finite_or_non_float_arrays(tmp_path, what, plant):
    path = _adapter_file(tmp_path, plant)
    target = make("lora")
    before = {k: to_numpy(v).copy() for k, v in target.state_dict().items()}
    trainable = {n: p.trainable for n, p in target.named_parameters()}
    with pytest.raises(ValueError, match=r"task\.safetensors.*'blocks\.1\.attn\.v\.lora_B'.*expected finite "
                                         r"floating-point values"):
        checkpoint.load_adapter(target, path, name="task")
    assert all("task" not in layer.adapters for layer in lora.lora_layers(target).values())  # nothing changed
    assert {n: p.trainable for n, p in target.named_parameters()} == trainable
    after = target.state_dict()
    assert sorted(after) == sorted(before) and all(np.array_equal(to_numpy(after[k]), v) for k, v in before.items())


def test_load_adapter_activates_like_set_adapter(tmp_path):
    path = _adapter_file(tmp_path)
    a, b = make("lora"), make("lora")
    assert checkpoint.load_adapter(a, path, name="task") == "task"
    checkpoint.load_adapter(b, path, name="task", activate=False)
    assert lora.active_adapter(b) == "default"
    lora.set_adapter(b, "task")
    assert {n: p.trainable for n, p in a.named_parameters()} == {n: p.trainable for n, p in b.named_parameters()}
    assert lora.active_adapter(a) == "task"


def test_save_adapter_refuses_layers_with_different_active_adapters(tmp_path):
    model = make("lora_two_adapters")
    lora.lora_layers(model)["blocks.0.attn.q"].active = "default"  # the others use task2
    path = tmp_path / "mixed.safetensors"
    with pytest.raises(ValueError, match="different active adapters"):
        checkpoint.save_adapter(model, str(path))
    assert not path.exists()


# ----------------------------------------------------------------- write_json and file modes
def test_write_json_bytes_folders_and_nan(tmp_path):
    obj = {"b": [1, 2.5, {"z": None, "a": "x"}], "a": float("nan"), "c": float("inf"), "é": "ü"}
    path = tmp_path / "new" / "folder" / "result.json"
    files.write_json(str(path), obj)
    expected = json.dumps(obj, indent=1, sort_keys=True) + "\n"
    assert path.read_bytes() == expected.encode("ascii")  # ensure_ascii: \u escapes, whatever the locale
    assert '"a": NaN' in expected and '"c": Infinity' in expected
    assert os.stat(path).st_mode & 0o777 == files.usual_mode()
    assert os.listdir(path.parent) == ["result.json"]
    with pytest.raises(TypeError):
        files.write_json(str(tmp_path / "other" / "bad.json"), {"x": object()})
    assert not (tmp_path / "other").exists()  # refused before any folder or file was made


def test_written_files_get_the_mode_open_gives(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    path = tmp_path / "ckpt.safetensors"
    checkpoint.save_checkpoint(make("plain"), str(path))
    assert os.stat(path).st_mode & 0o777 == os.stat(plain).st_mode & 0o777 == files.usual_mode()
    os.makedirs(tmp_path / "d")
    assert os.stat(tmp_path / "d").st_mode & 0o777 == files.usual_mode(folder=True)
