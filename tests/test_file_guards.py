"""What a checkpoint or adapter file may claim, and what writing one refuses (``files``, ``checkpoint``).

Each test edits or damages a file the way a user (or a disk) might and checks that loading refuses
it with one ValueError naming the file and the field or tensor, before anything is built from the
claim; and that files written before the checksum existed still load. Edited files are rewritten
with a fresh checksum (``files.with_checksum``) where the test is about validation, so that it is
the validation, not the checksum, that refuses them.
"""

import json
import os
import struct
import tempfile
import tracemalloc

import numpy as np
import pytest
from safetensors.numpy import save_file

from lora_from_scratch import checkpoint, files, lora
from lora_from_scratch.backend import to_numpy
from lora_from_scratch.model import GPT, GPTConfig
from lora_from_scratch.qalora import apply_qalora
from lora_from_scratch.qlora import apply_qlora

CFG = GPTConfig(vocab_size=23, block_size=8, n_layer=2, n_head=2, n_embd=32)
IDX = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 7))


def make(kind="plain"):
    m = GPT(CFG, seed=0)
    if kind == "lora":
        lora.apply_lora(m, 4, 8, ["q", "fc"], seed=1)
    elif kind == "qlora":
        apply_qlora(m, 4, 8, ["q", "k"], seed=1)
    elif kind == "qalora":
        apply_qalora(m, 4, 8, ["q", "fc"], bits=4, group_size=8, seed=1)
    rng = np.random.default_rng(2)
    for layer in lora.lora_layers(m).values():
        layer.adapter.B.data = (rng.standard_normal(layer.adapter.B.shape) * 0.1).astype(np.float32)
    return m


def saved(tmp_path, kind="plain", name="model.safetensors"):
    path = str(tmp_path / name)
    checkpoint.save_checkpoint(make(kind), path)
    return path


def rewrite(path, out, meta_edit=None, tensor_edit=None, checksum="fresh"):
    """``path`` rewritten to ``out`` with its metadata / tensors edited; checksum "fresh", "kept" or "dropped"."""
    tensors, meta = checkpoint.read_checkpoint(path)
    if meta_edit is not None:
        meta_edit(meta)
    if tensor_edit is not None:
        tensor_edit(tensors)
    if checksum == "fresh":
        meta = files.with_checksum(tensors, meta)
    elif checksum == "dropped":
        meta.pop(files.CHECKSUM_KEY)
    save_file(tensors, str(out), metadata=meta)
    return str(out)


def edit_json(key, change):
    """A ``meta_edit`` that applies ``change`` to the JSON-decoded metadata entry ``key``."""
    def edit(meta):
        value = json.loads(meta[key])
        new = change(value)  # a new value, or None when ``change`` edited ``value`` in place
        meta[key] = json.dumps(value if new is None else new)
    return edit


def set_spec(layer, dotted, value):
    """A ``change`` for ``layers``: set ``spec[layer][a][b]... = value`` (``dotted`` = "a.b")."""
    def change(specs):
        d = specs[layer]
        *parents, last = dotted.split(".")
        for p in parents:
            d = d[p]
        d[last] = value
    return change


# ----------------------------------------------------------------- item: non-float dtypes
@pytest.mark.parametrize("dtype", ["int32", "int8", "uint8", "bool", "bogus", np.int64])
def test_non_float_dtypes_are_refused_everywhere(tmp_path, dtype):
    name = repr(dtype)
    with pytest.raises(ValueError, match=rf"dtype {name}.*not a floating-point dtype.*float16.*float32.*float64"):
        GPT(CFG, dtype=dtype)
    path = saved(tmp_path)
    with pytest.raises(ValueError, match=rf"dtype {name}.*not a floating-point"):
        checkpoint.load_checkpoint(path, dtype=dtype)
    model = make()
    with pytest.raises(ValueError, match=rf"dtype {name}"):
        model.astype(dtype)
    assert model.wte.weight.dtype == np.float32  # nothing was cast


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_float_dtypes_still_load(tmp_path, dtype):
    path = saved(tmp_path, "lora")
    m = checkpoint.load_checkpoint(path, dtype=dtype)
    assert m.wte.weight.dtype == np.dtype(dtype)
    assert GPT(CFG, dtype=dtype).wte.weight.dtype == np.dtype(dtype)


# ----------------------------------------------------------------- item: values and metadata values
@pytest.mark.parametrize("key,value", [("blocks.1.mlp.fc.weight", np.nan), ("ln_f.bias", -np.inf),
                                       ("blocks.0.attn.q.base.zeros", np.inf)])
def test_non_finite_tensors_are_refused(tmp_path, key, value):
    kind = "qalora" if ".base." in key else "plain"

    def plant(t):
        t[key].reshape(-1)[3] = value

    bad = rewrite(saved(tmp_path, kind), tmp_path / "nan.safetensors", tensor_edit=plant)
    with pytest.raises(ValueError, match=rf"nan\.safetensors: tensor '{key}': holds NaN or inf"):
        checkpoint.load_checkpoint(bad)


def test_qalora_packed_codes_of_another_bit_width_are_refused(tmp_path):
    """The codes are one packed bit stream: a file whose spec claims another bit width holds a stream of the wrong
    length (codes one byte each, from before the packed layout: ``test_qalora_packed.py``)."""
    path = saved(tmp_path, "qalora")
    key = "blocks.0.mlp.fc.base.packed"
    assert checkpoint.read_checkpoint(path)[0][key].shape == (128 * 32 * 4 // 8,)  # (out * in * bits / 8,) bytes
    two_bits = rewrite(path, tmp_path / "bits.safetensors",
                       meta_edit=edit_json("layers", set_spec("blocks.0.mlp.fc", "base.bits", 2)))
    with pytest.raises(ValueError, match=rf"bits\.safetensors: tensor '{key}': the file holds shape \(2048,\), the "
                                         r"model it describes has \(1024,\)"):
        checkpoint.load_checkpoint(two_bits)


@pytest.mark.parametrize("alpha", [-5, 0, float("nan"), float("inf"), "8", None, True])
def test_bad_adapter_alpha_in_a_checkpoint_is_refused(tmp_path, alpha):
    field = "layers.blocks.0.attn.q.adapters.default.alpha"
    bad = rewrite(saved(tmp_path, "lora"), tmp_path / "alpha.safetensors",
                  meta_edit=edit_json("layers", set_spec("blocks.0.attn.q", "adapters.default.alpha", alpha)))
    with pytest.raises(ValueError, match=rf"alpha\.safetensors: field '{field}': expected a finite number > 0"):
        checkpoint.load_checkpoint(bad)


def test_quant_type_that_does_not_match_the_stored_tables_is_refused(tmp_path):
    path = saved(tmp_path, "qlora")
    to_fp4 = edit_json("layers", set_spec("blocks.0.attn.k", "base.quant_type", "fp4"))
    bad = rewrite(path, tmp_path / "fp4.safetensors", meta_edit=to_fp4)
    with pytest.raises(ValueError, match=r"fp4\.safetensors: field 'quant_tables': a layer is quantized as 'fp4', "
                                         r"but the file's codes were made with \['nf4'\]"):
        checkpoint.load_checkpoint(bad)
    tables = rewrite(path, tmp_path / "tables.safetensors",
                     meta_edit=edit_json("quant_tables", lambda t: {"nf4": t["nf4"][::-1]}))
    with pytest.raises(ValueError, match=r"tables\.safetensors: field 'quant_tables\.nf4'"):
        checkpoint.load_checkpoint(tables)


# ----------------------------------------------------------------- item: checksum
def _data_section(path) -> tuple[bytes, int]:
    raw = open(path, "rb").read()
    return raw, 8 + struct.unpack("<Q", raw[:8])[0]  # safetensors: 8-byte header length, JSON header, data


@pytest.mark.parametrize("kind", ["qlora", "qalora"])
def test_every_flipped_data_byte_is_refused(tmp_path, kind):
    path = saved(tmp_path, kind)
    raw, start = _data_section(path)
    rng = np.random.default_rng(14)
    positions = rng.choice(np.arange(start, len(raw)), size=120, replace=False)
    bad = str(tmp_path / "flipped.safetensors")
    refused = 0
    for pos in positions:
        damaged = bytearray(raw)
        damaged[pos] ^= int(rng.integers(1, 256))  # a nonzero XOR: the byte always changes
        with open(bad, "wb") as f:
            f.write(bytes(damaged))
        with pytest.raises(ValueError, match=r"flipped\.safetensors: (field 'lora_from_scratch\.sha256'|tensor )"):
            checkpoint.load_checkpoint(bad)
        refused += 1
    assert refused == len(positions) == 120


def test_every_flipped_byte_of_an_adapter_file_is_refused(tmp_path):
    path = str(tmp_path / "task.safetensors")
    checkpoint.save_adapter(make("lora"), path)
    raw, start = _data_section(path)
    rng = np.random.default_rng(15)
    bad = str(tmp_path / "flipped.safetensors")
    for pos in rng.choice(np.arange(start, len(raw)), size=60, replace=False):
        damaged = bytearray(raw)
        damaged[pos] ^= int(rng.integers(1, 256))
        with open(bad, "wb") as f:
            f.write(bytes(damaged))
        target = make("lora")
        with pytest.raises(ValueError, match=r"flipped\.safetensors: (field 'lora_from_scratch\.sha256'|tensor )"):
            checkpoint.load_adapter(target, bad, name="task")
        assert all("task" not in layer.adapters for layer in lora.lora_layers(target).values())


def test_a_valid_looking_metadata_edit_is_caught_by_the_checksum(tmp_path):
    bad = rewrite(saved(tmp_path, "lora"), tmp_path / "edited.safetensors", checksum="kept",
                  meta_edit=edit_json("layers", set_spec("blocks.0.attn.q", "adapters.default.alpha", 32)))
    with pytest.raises(ValueError, match=r"edited\.safetensors: field 'lora_from_scratch\.sha256': .*damaged or "
                                         r"was edited"):
        checkpoint.load_checkpoint(bad)


def test_files_without_a_checksum_still_load(tmp_path):
    model = make("qlora")
    path = str(tmp_path / "new.safetensors")
    checkpoint.save_checkpoint(model, path)
    assert files.CHECKSUM_KEY in checkpoint.read_checkpoint(path)[1]
    old = rewrite(path, tmp_path / "old.safetensors", checksum="dropped")
    np.testing.assert_array_equal(to_numpy(checkpoint.load_checkpoint(old)(IDX)), to_numpy(model(IDX)))
    adapter = str(tmp_path / "task.safetensors")
    checkpoint.save_adapter(make("lora"), adapter)
    old_adapter = rewrite(adapter, tmp_path / "old_task.safetensors", checksum="dropped")
    assert checkpoint.load_adapter(make("lora"), old_adapter, name="task") == "task"


# ----------------------------------------------------------------- item: the config and sizes, before building
METADATA_EDITS = [
    ("layers list", lambda m: m.__setitem__("layers", json.dumps([1, 2])),
     r"field 'layers': expected a JSON object, got list \[1, 2\]"),
    ("trainable 5", lambda m: m.__setitem__("trainable", "5"),
     r"field 'trainable': expected a list of parameter names, got 5"),
    ("blocksize 0", edit_json("layers", set_spec("blocks.0.attn.q", "base.blocksize", 0)),
     r"field 'layers\.blocks\.0\.attn\.q\.base\.blocksize': blocksize must be a power of two between 16 and 4096"),
    ("dtype bogus", edit_json("layers", set_spec("blocks.0.attn.q", "base.weight_dtype", "bogus")),
     r"field 'layers\.blocks\.0\.attn\.q\.base\.weight_dtype': expected one of \['float16', 'float32', 'float64'\], "
     r"got 'bogus'"),
    ("rank 1e9", edit_json("layers", set_spec("blocks.1.attn.k", "adapters.default.r", 10**9)),
     r"field 'layers\.blocks\.1\.attn\.k\.adapters\.default\.r': rank 1000000000 exceeds"),
    ("kind", edit_json("layers", set_spec("blocks.0.attn.q", "kind", "lora")),
     r"field 'layers\.blocks\.0\.attn\.q\.base\.kind': a lora layer has a Linear base, not a NF4Linear"),
    ("n_embd 1e7", edit_json("config", lambda c: dict(c, n_embd=1e7)),
     r"field 'config\.n_embd': expected an integer, got 10000000\.0"),
    ("n_embd 10**7", edit_json("config", lambda c: dict(c, n_embd=10**7)),
     r"field 'config': the config gives wte\.weight the shape \(23, 10000000\)"),
    ("n_layer 3", edit_json("config", lambda c: dict(c, n_layer=3)),
     r"field 'config': the config claims n_layer=3; the file holds tensors of blocks \[0, 1\]"),
    ("unknown field", edit_json("config", lambda c: dict(c, n_ctx=8)),
     r"field 'config': .*unknown entries \['n_ctx'\]"),
]


@pytest.mark.parametrize("what,edit,message", METADATA_EDITS, ids=[case[0] for case in METADATA_EDITS])
def test_edited_checkpoint_metadata_is_refused_by_name(tmp_path, what, edit, message):
    bad = rewrite(saved(tmp_path, "qlora"), tmp_path / "edited.safetensors", meta_edit=edit)
    with pytest.raises(ValueError, match=r"edited\.safetensors: " + message):
        checkpoint.load_checkpoint(bad)


def test_group_size_zero_is_refused_by_name(tmp_path):
    bad = rewrite(saved(tmp_path, "qalora"), tmp_path / "edited.safetensors",
                  meta_edit=edit_json("layers", set_spec("blocks.1.mlp.fc", "base.group_size", 0)))
    with pytest.raises(ValueError, match=r"edited\.safetensors: field 'layers\.blocks\.1\.mlp\.fc\.base\.group_size': "
                                         r"group_size must be a positive integer, got 0"):
        checkpoint.load_checkpoint(bad)


def test_a_tiny_file_claiming_a_huge_model_is_refused_without_allocating(tmp_path):
    """A GPT-2-small config over a 1 x 1 tensor: refused from the header, with a peak of well under 1 MiB."""
    path = tmp_path / "tiny.safetensors"
    config = {"vocab_size": 50257, "block_size": 1024, "n_layer": 12, "n_head": 12, "n_embd": 768}
    save_file({"wte.weight": np.zeros((1, 1), np.float32)}, str(path),
              metadata={"format": checkpoint.FORMAT, "config": json.dumps(config)})
    assert os.path.getsize(path) < 300
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"tiny\.safetensors: field 'config': the config gives wte\.weight the "
                                             r"shape \(50257, 768\).*the file holds \(1, 1\)"):
            checkpoint.load_checkpoint(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"{peak} bytes allocated to refuse a {os.path.getsize(path)}-byte file"


# ----------------------------------------------------------------- item: config errors name the file
def test_config_errors_name_the_file(tmp_path):
    bad = rewrite(saved(tmp_path), tmp_path / "heads.safetensors",
                  meta_edit=edit_json("config", lambda c: dict(c, n_head=3)))
    with pytest.raises(ValueError, match=r"heads\.safetensors: field 'config': n_embd=32 is not divisible by n_head=3"):
        checkpoint.load_checkpoint(bad)


def test_adapter_file_claims_are_checked_before_loading(tmp_path):
    path = str(tmp_path / "task.safetensors")
    checkpoint.save_adapter(make("lora"), path)
    bad = rewrite(path, tmp_path / "alpha.safetensors",
                  meta_edit=edit_json("layers", set_spec("blocks.1.mlp.fc", "alpha", -5)))
    with pytest.raises(ValueError, match=r"alpha\.safetensors: field 'layers\.blocks\.1\.mlp\.fc\.alpha': expected a "
                                         r"finite number > 0, got -5"):
        checkpoint.load_adapter(make("lora"), bad)
    huge = rewrite(path, tmp_path / "rank.safetensors",
                   meta_edit=edit_json("layers", set_spec("blocks.1.mlp.fc", "r", 16)))
    with pytest.raises(ValueError, match=r"rank\.safetensors: tensor 'blocks\.1\.mlp\.fc\.lora_A': shape \(4, 32\) "
                                         r"does not match the stored rank 16"):
        checkpoint.load_adapter(make("lora"), huge)


# ----------------------------------------------------------------- items: paths (empty, a folder, unwritable)
def test_an_empty_path_is_refused_before_anything(tmp_path):
    from lora_from_scratch.hf_io import save_hf_gpt2
    from lora_from_scratch.peft_io import save_peft_adapter

    model = make("lora")
    for call in (lambda: checkpoint.save_checkpoint(model, ""), lambda: checkpoint.save_adapter(model, ""),
                 lambda: files.write_json("", {}), lambda: save_peft_adapter(model, ""),
                 lambda: save_hf_gpt2(model, "", base_only=True)):
        with pytest.raises(ValueError, match="empty path"):
            call()


def test_a_folder_given_as_the_file_names_the_folder(tmp_path):
    target = tmp_path / "existing.safetensors"
    os.makedirs(target)
    with pytest.raises(IsADirectoryError, match=rf"{target} is a directory") as err:
        checkpoint.save_checkpoint(make(), str(target))
    assert ".tmp-" not in str(err.value)
    assert os.listdir(tmp_path) == ["existing.safetensors"] and os.listdir(target) == []


def test_an_unwritable_folder_names_the_users_path(tmp_path, monkeypatch):
    """As a read-only folder answers mkstemp (EACCES on the temporary name), simulated: the tests may run as root."""
    real = tempfile.mkstemp

    def denied(*args, dir=None, prefix="", suffix="", **kw):
        raise PermissionError(13, "Permission denied", os.path.join(dir, prefix + "xgruubgc" + suffix))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    target = tmp_path / "ro" / "existing.safetensors"
    with pytest.raises(PermissionError, match=rf"cannot write {target}: Permission denied") as err:
        checkpoint.save_checkpoint(make(), str(target))
    assert ".tmp-" not in str(err.value) and err.value.filename == str(target)
    monkeypatch.setattr(tempfile, "mkstemp", real)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_names_the_users_path(tmp_path):
    folder = tmp_path / "ro"
    os.makedirs(folder)
    os.chmod(folder, 0o555)
    try:
        with pytest.raises(PermissionError, match=rf"cannot write {folder / 'm.safetensors'}") as err:
            checkpoint.save_checkpoint(make(), str(folder / "m.safetensors"))
        assert ".tmp-" not in str(err.value)
    finally:
        os.chmod(folder, 0o755)
