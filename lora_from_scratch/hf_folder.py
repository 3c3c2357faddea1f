"""Reading what ``transformers``' ``save_pretrained`` writes for GPT-2 (Radford et al., 2019), without
transformers and without pickle: ``config.json`` checked field by field, and the safetensors files
(``model.safetensors``, or shards listed in ``model.safetensors.index.json``) read one tensor at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header
``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}``
and the raw little-endian bytes of every tensor. ``safetensors_header`` reads and checks the
header alone (every shape and byte range) before any data is read, so a folder's sizes are
checked against its config before a byte of weights is allocated; ``read_tensor`` then reads one
tensor's bytes with a plain file read (``np.fromfile``) into one new array.

Why not ``safetensors.safe_open``: it maps the whole file into memory, and every page of it that is
read stays in the process's resident memory until the file is closed. Loading GPT-2 small that way
peaked at twice the model's bytes (the model plus the mapped file); plain reads peak at the
model's bytes plus the tensor being converted.

``gpt2_config(config, path)`` turns a GPT-2 ``config.json`` into our ``GPTConfig`` and refuses, with
the field's name, whatever this GPT does not compute: another ``model_type``, an MLP width other
than 4 * n_embd (``n_inner``), an activation other than GPT-2's tanh GELU, a layer-norm epsilon
other than 1e-5, untied embeddings, unscaled or layer-scaled attention, cross-attention, a
quantized folder. The dropout rates (``embd_pdrop``, ``attn_pdrop``, ``resid_pdrop``) are
training settings, not weights: the loaded model has dropout 0 (transformers' eval mode).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np

from .model import GPTConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# safetensors dtype -> (NumPy dtype of the stored bytes, bytes per element); BF16 is widened by hand
DTYPES = {"F64": ("<f8", 8), "F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2)}
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header

# GPT2Config's defaults: what transformers assumes for a field config.json leaves out
SIZE_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12}
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")  # the same function: 0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3)))
# field -> (transformers' default, the values this GPT computes, what to say about them)
REQUIRED_VALUES = {
    "activation_function": ("gelu_new", TANH_GELU, "GPT-2's tanh GELU"),
    "layer_norm_epsilon": (1e-5, (1e-5,), "1e-05"),
    "tie_word_embeddings": (True, (True,), "true (the LM head is the token embedding)"),
    "scale_attn_weights": (True, (True,), "true (scores divided by sqrt(head size))"),
    "scale_attn_by_inverse_layer_idx": (False, (False,), "false"),
    "add_cross_attention": (False, (False,), "false (a decoder without an encoder)"),
}


def _size(config: dict, name: str, path: str) -> int:
    value = config.get(name, SIZE_DEFAULTS[name])
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{path}: field {name!r} must be a positive integer, got {value!r}")
    return value


def gpt2_config(config: dict, path: str = CONFIG_NAME) -> GPTConfig:
    """Our ``GPTConfig`` for a GPT-2 ``config.json`` (as a dict); ValueError naming ``path`` and the field.

    Sizes missing from the file take ``GPT2Config``'s defaults, as transformers does.
    """
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    if config.get("model_type") != "gpt2":
        raise ValueError(f"{path}: field 'model_type' is {config.get('model_type')!r}; only 'gpt2' is read here")
    if config.get("quantization_config") is not None:
        raise ValueError(f"{path}: field 'quantization_config' is set (a quantized folder); load a float folder "
                         "and quantize here (methods.adapt)")
    sizes = {name: _size(config, name, path) for name in SIZE_DEFAULTS}
    if sizes["n_embd"] % sizes["n_head"]:
        raise ValueError(f"{path}: field 'n_head' ({sizes['n_head']}) does not divide 'n_embd' ({sizes['n_embd']})")
    if config.get("n_ctx", sizes["n_positions"]) != sizes["n_positions"]:
        raise ValueError(f"{path}: field 'n_ctx' ({config['n_ctx']}) differs from 'n_positions' "
                         f"({sizes['n_positions']})")
    if config.get("n_inner") not in (None, 4 * sizes["n_embd"]):
        raise ValueError(f"{path}: field 'n_inner' is {config['n_inner']!r}; this GPT's MLP is 4 * n_embd = "
                         f"{4 * sizes['n_embd']} wide (null or that value)")
    for name, (default, allowed, said) in REQUIRED_VALUES.items():
        value = config.get(name, default)
        if isinstance(value, bool) != isinstance(default, bool) or value not in allowed:  # 1 is not true
            raise ValueError(f"{path}: field {name!r} is {value!r}; this GPT supports only {said}")
    for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):  # dropout rates: trained with, not computed here
        rate = config.get(name, 0.1)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise ValueError(f"{path}: field {name!r} must be a number in [0, 1), got {rate!r}")
    return GPTConfig(vocab_size=sizes["vocab_size"], block_size=sizes["n_positions"], n_layer=sizes["n_layer"],
                     n_head=sizes["n_head"], n_embd=sizes["n_embd"])


def read_gpt2_config(directory: str) -> GPTConfig:
    """``gpt2_config`` of ``directory/config.json``; FileNotFoundError for a missing folder or file."""
    check_folder(directory)
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}: not a folder written by save_pretrained")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    return gpt2_config(config, path)


def check_folder(directory: str) -> None:
    if not isinstance(directory, (str, os.PathLike)) or not os.path.exists(directory):
        raise FileNotFoundError(f"no model folder {directory}")
    if not os.path.isdir(directory):
        raise NotADirectoryError(f"{directory} is not a folder (a model is a folder written by save_pretrained)")


# ---------------------------------------------------------------- safetensors, one tensor at a time
@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: the file, the stored dtype (``"F32"``...), shape and byte range."""

    path: str
    key: str
    dtype: str
    shape: tuple
    begin: int  # absolute file offset of the first byte
    end: int

    def check_dtype(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"{self.path}: tensor {self.key!r} is stored as {self.dtype}; floating-point weights "
                             f"({', '.join(DTYPES)}) are expected")


def safetensors_header(path: str) -> dict:
    """key -> ``TensorEntry`` for every tensor of a safetensors file, from its header alone (no data read).

    Checks the header length, the JSON, and that each tensor's byte range lies inside the file and
    holds exactly prod(shape) elements of its dtype; ValueError naming the file and the tensor.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(MAX_HEADER, size - 8):
            raise ValueError(f"{path} is not a safetensors file ({size} bytes; truncated or another format?)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object")
    start, entries = 8 + n, {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            ok = all(isinstance(v, int) and v >= 0 for v in (*shape, begin, end))
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{path}: the header entry of {key!r} is malformed ({info!r})")
        itemsize = DTYPES.get(dtype, (None, 0))[1]
        if not begin <= end <= size - start or (itemsize and end - begin != math.prod(shape) * itemsize):
            raise ValueError(f"{path}: tensor {key!r} ({dtype} {list(shape)}) has bytes {begin}..{end}, which do "
                             f"not fit its shape or the file ({size - start} bytes of data; truncated?)")
        entries[key] = TensorEntry(path, key, dtype, shape, start + begin, start + end)
    return entries


def read_tensor(entry: TensorEntry, dtype="float32", rows: slice | None = None) -> np.ndarray:
    """The tensor's values as a new NumPy array of ``dtype`` (rows ``rows`` of it only, if given).

    One plain read of exactly its bytes; BF16 is widened to float32 by placing its 16 bits in the
    high half of a float32 (bfloat16 is float32 with the low 16 mantissa bits dropped).
    """
    entry.check_dtype()
    stored, itemsize = DTYPES[entry.dtype]
    shape, begin = entry.shape, entry.begin
    if rows is not None:  # a contiguous block of leading-axis rows
        first, stop, _ = rows.indices(shape[0])
        row_bytes = math.prod(shape[1:]) * itemsize
        shape, begin = (max(stop - first, 0), *shape[1:]), begin + first * row_bytes
    with open(entry.path, "rb") as f:
        f.seek(begin)
        arr = np.fromfile(f, dtype=stored, count=math.prod(shape))  # (n,) the stored bytes, as stored
    if arr.size != math.prod(shape):
        raise ValueError(f"{entry.path}: tensor {entry.key!r} is cut short (truncated file?)")
    if entry.dtype == "BF16":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)  # (n,) bfloat16 bits -> float32, exactly
    return arr.reshape(shape).astype(dtype, copy=False)  # shape


def folder_tensors(directory: str) -> dict:
    """key -> ``TensorEntry`` over the folder's ``model.safetensors`` or every shard of its index.

    A folder with only ``pytorch_model.bin`` (a pickle, which can run code when loaded) is refused
    with the one-line conversion; no pickle is ever opened.
    """
    check_folder(directory)
    single, index = os.path.join(directory, WEIGHTS_NAME), os.path.join(directory, INDEX_NAME)
    if os.path.isfile(single):
        return safetensors_header(single)
    if os.path.isfile(index):
        return _sharded(directory, index)
    if any(os.path.exists(os.path.join(directory, name)) for name in PICKLE_NAMES):
        raise ValueError(f"{directory} holds only pytorch_model.bin, a pickle, which this package never reads; "
                         "convert it once with transformers: GPT2LMHeadModel.from_pretrained(DIR)"
                         ".save_pretrained(DIR, safe_serialization=True)")
    raise FileNotFoundError(f"{directory} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")


def _sharded(directory: str, index: str) -> dict:
    """The tensors of a sharded folder: each key of the index's ``weight_map`` found in the shard it names."""
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({e!r})") from None
    headers = {}
    for name in shards:
        if not isinstance(name, str) or os.path.basename(name) != name or not name:
            raise ValueError(f"{index}: shard name {name!r} is not a file name in the folder")
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{index} names shard {name}, which is not in {directory}")
        headers[name] = safetensors_header(path)
    entries = {}
    for key, name in weight_map.items():
        if key not in headers[name]:
            raise ValueError(f"{index} puts tensor {key!r} in {name}, which does not hold it")
        entries[key] = headers[name][key]
    return entries
