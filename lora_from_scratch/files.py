"""Files on disk, below the three formats that use them: our checkpoints and adapter files (``checkpoint``),
Hugging Face GPT-2 folders (``hf_io``) and PEFT adapter folders (``peft_io``).

Nothing here builds a model; this module knows how to write a file so that it is never half
there, how to tell a damaged file, and what every file format may claim before anything is built
from it.

Writing: a crash or Ctrl-C never leaves half a file or half a folder.

- ``atomic_write(path, write_fn)``: the file is written under a temporary name in the same folder
  and renamed over ``path`` when complete. ``json_writer`` / ``write_json`` for JSON,
  ``host_tensors`` for the arrays (on the host, C order, never NaN or inf), ``usual_mode`` for
  the mode a plain ``open`` would give.
- ``write_folder(directory, files)``: the whole folder is written beside ``directory`` under a
  temporary name, then swapped in: the old folder is renamed aside, the new one renamed in, the
  old one removed. A folder is never a mix of old and new files (new weights beside an old
  config would load silently with the old alpha).

Integrity: safetensors has no checksum, and a damaged data byte loads as a different weight.
``tensors_checksum`` is a SHA-256 over the metadata and every tensor (name, dtype, shape, raw
bytes) in key order; our checkpoints and adapter files store it in their metadata under
``CHECKSUM_KEY`` and ``verify_checksum`` checks it on load. Files written before it existed
carry none and load without verification. PEFT and Hugging Face files are written and read by
other libraries that know nothing of our key, so they carry none.

Validation: ``read_header`` gives the keys, shapes and dtypes of a safetensors file without
reading its data (safetensors itself checks that the header covers the file exactly, so the
shapes bound what the data holds). Each reader checks every claim of its file against that
header before it builds anything: ``gpt_config``, ``stored_layer_specs`` and ``check_arrays`` for our
checkpoints, ``validate_peft_config`` for PEFT's ``adapter_config.json``,
``check_values`` for what the data
holds (NaN, inf, codes beyond their bit width). Every refusal is a ``FileFormatError``, a
ValueError whose message names the file and the field: ``FILE: field 'x': problem``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from numbers import Real

import numpy as np

from .adapter import INITS, parse_path
from .backend import to_numpy
from .checks import is_int
from .model import GPTConfig
from .nn import FLOAT_DTYPES, check_float_dtype
from .qalora import check_bits, check_group_size
from .qlora import check_blocksize
from .quant.tables import CODES

CHECKSUM_KEY = "lora_from_scratch.sha256"
# safetensors' dtype names -> NumPy's
_ST_DTYPES = {"F16": "float16", "F32": "float32", "F64": "float64", "BF16": "bfloat16", "BOOL": "bool",
              "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "U32": "uint32", "I32": "int32",
              "U64": "uint64", "I64": "int64"}


class FileFormatError(ValueError):
    """A file that claims something it cannot hold: ``FILE: field 'x': problem`` (or ``tensor 'k'``)."""

    def __init__(self, path, problem: str, field: str | None = None, tensor: str | None = None):
        where = f"field {field!r}: " if field is not None else f"tensor {tensor!r}: " if tensor is not None else ""
        super().__init__(f"{path}: {where}{problem}")
        self.path, self.field, self.tensor = str(path), field, tensor


# ---------------------------------------------------------------- writing
def usual_mode(folder: bool = False) -> int:
    """The mode ``open`` (0o666) or ``os.makedirs`` (0o777, ``folder=True``) gives under the current umask.

    ``tempfile`` makes its files (0600) and folders (0700) private; a temporary that is renamed
    into place is first given this mode, so what we write looks like any other file or folder.
    """
    umask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def _target(path) -> str:
    """``path`` as a string; ValueError for an empty one (which would mean the current folder's own name)."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"expected a file path, got {type(path).__name__}")
    path = os.fspath(path)
    if path == "":
        raise ValueError("empty path: give the name of the file or folder to write")
    return path


def _naming(path: str, e: OSError) -> OSError:
    """The same OSError, naming the user's ``path`` rather than our temporary file."""
    out = type(e)(e.errno, f"cannot write {path}: {e.strerror or e}")
    out.filename = path
    return out


def _temporary(make, path: str, folder: str):
    """``make(dir=folder)`` (a temporary file or folder beside ``path``); an OSError names ``path``."""
    try:
        os.makedirs(folder, exist_ok=True)
        return make(folder)
    except OSError as e:
        raise _naming(path, e) from None


def atomic_write(path: str, write_fn) -> None:
    """Call ``write_fn(tmp_path)`` then rename the temporary file onto ``path`` (same folder, so atomic).

    Refused before anything is written: an empty path (ValueError), a folder as ``path``
    (IsADirectoryError). An unwritable folder raises an OSError naming ``path``.
    """
    path = _target(path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, f"{path} is a directory; give the name of a file to write", path)
    folder = os.path.dirname(os.path.abspath(path))

    def make(folder):
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
        os.close(fd)
        return tmp

    tmp = _temporary(make, path, folder)
    try:
        write_fn(tmp)
        os.chmod(tmp, usual_mode())  # mkstemp makes the file private (0600); give it the usual mode
        os.replace(tmp, path)
    except OSError as e:
        raise (_naming(path, e) if e.filename == tmp else e) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)  # the same bytes under a second name: nothing copied
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _carry_other_entries(old: str, new: str, written) -> None:
    """Give ``new`` every entry of ``old`` that is not being written (tokenizer files, a README, ...)."""
    for name in os.listdir(old):
        if name in written:
            continue
        src, dst = os.path.join(old, name), os.path.join(new, name)
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def write_folder(directory: str, files: dict, prefix: str = ".tmp-") -> None:
    """Write ``{file name: write_fn(path)}`` as the folder ``directory``, all or nothing.

    The new folder is written complete under a temporary name beside ``directory``, with every
    other entry of an existing folder carried over (hard links, or copies). Then the old folder
    is renamed aside, the new one renamed in, and the old one removed. An error or Ctrl-C up to
    the second rename leaves the old folder as it was; a crash between the two renames leaves it
    whole under ``<temporary>-old`` beside a missing ``directory``, never a mix of old and new
    files. ValueError if ``directory`` is empty or exists and is not a folder. The folder and its
    new files get the modes ``os.makedirs`` and ``open`` give (an existing folder keeps its mode).
    """
    user = _target(directory)
    directory = os.path.realpath(user)  # a link to a folder: replace the folder, keep the link
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"{user} exists and is not a directory")
    tmp = _temporary(lambda parent: tempfile.mkdtemp(prefix=prefix, dir=parent), user, os.path.dirname(directory))
    old, swapped = tmp + "-old", False
    try:
        os.chmod(tmp, usual_mode(folder=True))  # mkdtemp makes the folder private (0700); give it the usual mode
        for name, write in files.items():
            write(os.path.join(tmp, name))
            os.chmod(os.path.join(tmp, name), usual_mode())  # as atomic_write: safetensors writes 0600 files
        if not os.path.isdir(directory):
            os.replace(tmp, directory)  # the whole folder appears at once
            return
        _carry_other_entries(directory, tmp, files)
        shutil.copymode(directory, tmp)
        os.replace(directory, old)  # 1: the old folder steps aside, whole
        try:
            os.replace(tmp, directory)  # 2: the new one, whole, takes its name
            swapped = True
        finally:
            if not swapped:
                os.replace(old, directory)  # put the old folder back as it was
    except OSError as e:
        raise (_naming(user, e) if str(e.filename).startswith(tmp) else e) from None
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        if swapped:
            shutil.rmtree(old, ignore_errors=True)


def json_writer(obj, indent: int = 2, end: str = ""):
    """A ``write_fn(path)`` that writes ``json.dumps(obj, indent=indent, sort_keys=True) + end``.

    The text is made now, so an object JSON cannot hold fails before any file is opened.
    """
    text = json.dumps(obj, indent=indent, sort_keys=True) + end

    def write(path):
        with open(path, "w") as f:
            f.write(text)

    return write


def write_json(path: str, obj) -> None:
    """``obj`` as JSON (indent 1, sorted keys, a final newline) at ``path``, written atomically.

    NaN and inf are written as ``NaN`` / ``Infinity`` (``json``'s default); a missing folder is
    created; an object JSON cannot hold raises before anything is created.
    """
    atomic_write(path, json_writer(obj, indent=1, end="\n"))


def host_tensors(arrays: dict, refusal: str) -> dict:
    """``{name: C-ordered NumPy array}`` for safetensors; ValueError ``"<refusal>: 'name' holds NaN or inf"``.

    Each array is copied to the host (when on a GPU) and made contiguous; a floating one with a
    NaN or inf is refused, so nothing non-finite is ever written.
    """
    tensors = {}
    for name, a in arrays.items():
        arr = np.ascontiguousarray(to_numpy(a))
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            raise ValueError(f"{refusal}: {name!r} holds NaN or inf")
        tensors[name] = arr
    return tensors


# ---------------------------------------------------------------- checksum
def tensors_checksum(tensors: dict, metadata: dict) -> str:
    """SHA-256 (hex) over the metadata (but ``CHECKSUM_KEY``) and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in metadata.items() if k != CHECKSUM_KEY}, sort_keys=True).encode())
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        h.update(json.dumps([name, str(arr.dtype), list(arr.shape)]).encode())
        h.update(arr.reshape(-1).view(np.uint8))  # (nbytes,) the raw bytes, as safetensors stores them
    return h.hexdigest()


def with_checksum(tensors: dict, metadata: dict) -> dict:
    """``metadata`` plus ``CHECKSUM_KEY``: what ``save_file(tensors, path, metadata=...)`` should store."""
    return {**metadata, CHECKSUM_KEY: tensors_checksum(tensors, metadata)}


def verify_checksum(tensors: dict, metadata: dict, path) -> None:
    """FileFormatError if the stored checksum does not match; a file without one (older) passes unverified."""
    stored = metadata.get(CHECKSUM_KEY)
    if stored is not None and stored != tensors_checksum(tensors, metadata):
        raise FileFormatError(path, "the tensors and metadata do not match the checksum stored when the file was "
                                    "written: the file is damaged or was edited", field=CHECKSUM_KEY)


# ---------------------------------------------------------------- reading
def _readable(path, read):
    """``read(safe_open handle)``; FileNotFoundError / ValueError naming ``path`` for a missing or bad file."""
    from safetensors import safe_open

    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with safe_open(path, framework="numpy") as f:
            return read(f)
    except Exception as e:  # safetensors raises its own error type for a truncated or foreign file
        size = os.path.getsize(path)
        raise ValueError(f"{path} is not a readable safetensors file ({size} bytes; truncated or corrupt?): "
                         f"{e}") from None


def read_header(path) -> tuple[dict, dict]:
    """(metadata, {key: (shape, NumPy dtype name)}) of a safetensors file, without reading its data."""
    def read(f):
        header = {}
        for k in f.keys():
            view = f.get_slice(k)
            header[k] = (tuple(int(n) for n in view.get_shape()), _ST_DTYPES.get(view.get_dtype(), view.get_dtype()))
        return dict(f.metadata() or {}), header

    return _readable(path, read)


def read_safetensors(path) -> tuple[dict, dict]:
    """(tensors as NumPy arrays, metadata) of a safetensors file; a clear error for a bad file. Not verified."""
    return _readable(path, lambda f: ({k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})))


def json_field(meta: dict, key: str, path, default=None):
    """The JSON-decoded metadata entry ``key``; FileFormatError if it is missing (and no default) or not JSON."""
    if key not in meta:
        if default is not None:
            return default
        raise FileFormatError(path, "the file's metadata has no such entry", field=key)
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise FileFormatError(path, f"not valid JSON ({e})", field=key) from None


# ---------------------------------------------------------------- field checks: each raises ValueError(problem)
def _int(v, low: int = 1, high: int | None = None) -> int:
    if not is_int(v):
        raise ValueError(f"expected an integer, got {v!r}")
    if v < low or (high is not None and v > high):
        raise ValueError(f"expected an integer from {low} to {high}, got {v}" if high is not None else
                         f"expected an integer >= {low}, got {v}")
    return int(v)


def _bool(v) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    return v


def _positive(v) -> float:
    if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"expected a finite number > 0, got {v!r}")
    return float(v)


def _rate(v) -> float:
    if isinstance(v, bool) or not isinstance(v, Real) or not 0.0 <= v < 1.0:
        raise ValueError(f"expected a number in [0, 1), got {v!r}")
    return float(v)


def _float_dtype(v) -> str:
    if not isinstance(v, str) or v not in FLOAT_DTYPES:
        raise ValueError(f"expected one of {list(FLOAT_DTYPES)}, got {v!r}")
    return v


def _optional(check):
    return lambda v: None if v is None else check(v)


def _one_of(options):
    def check(v):
        if not isinstance(v, str) or v not in options:
            raise ValueError(f"expected one of {sorted(options)}, got {v!r}")
        return v
    return check


def _checked(check, v, path, field: str):
    """``check(v)``, its ValueError turned into a FileFormatError naming ``path`` and ``field``."""
    try:
        return check(v)
    except ValueError as e:
        raise FileFormatError(path, str(e), field=field) from None


def _object(v, path, field: str, keys=None) -> dict:
    """``v`` if it is a JSON object (with exactly ``keys``, when given); FileFormatError otherwise."""
    if not isinstance(v, dict):
        raise FileFormatError(path, f"expected a JSON object, got {type(v).__name__} {_short(v)}", field=field)
    if keys is not None and set(v) != set(keys):
        missing, extra = sorted(set(keys) - set(v)), sorted(set(v) - set(keys))
        raise FileFormatError(path, f"missing entries {missing}, unknown entries {extra}", field=field)
    return v


def _short(v) -> str:
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------- our checkpoints: config and layers
def gpt_config(meta: dict, header: dict, path):
    """The GPTConfig the metadata's ``config`` claims, checked against the tensors' shapes in ``header``.

    Every field is checked (positive integers, a dropout rate, n_embd divisible by n_head), and the
    sizes must be those of ``wte.weight`` (vocab_size, n_embd), ``wpe.weight`` (block_size, n_embd)
    and the blocks the file holds: a config claiming a larger model than the file holds is refused
    before anything of that size exists.
    """
    raw = _object(json_field(meta, "config", path), path, "config")
    fields = [f for f in GPTConfig.__dataclass_fields__]
    required = [f for f in fields if f != "dropout"]
    if set(raw) - set(fields) or set(required) - set(raw):
        raise FileFormatError(path, f"missing entries {sorted(set(required) - set(raw))}, unknown entries "
                                    f"{sorted(set(raw) - set(fields))}", field="config")
    for name in required:
        _checked(_int, raw[name], path, f"config.{name}")
    _checked(_rate, raw.get("dropout", 0.0), path, "config.dropout")
    config = _checked(lambda c: GPTConfig(**c), raw, path, "config")  # n_embd divisible by n_head
    for key, shape in (("wte.weight", (config.vocab_size, config.n_embd)),
                       ("wpe.weight", (config.block_size, config.n_embd))):
        if key not in header:
            raise FileFormatError(path, "the checkpoint has no such tensor", tensor=key)
        if header[key][0] != shape:
            raise FileFormatError(path, f"the config gives {key} the shape {shape} (vocab_size={config.vocab_size}, "
                                        f"block_size={config.block_size}, n_embd={config.n_embd}); the file holds "
                                        f"{header[key][0]}", field="config")
        _checked(check_float_dtype, header[key][1], path, f"dtype of {key}")
    blocks = {int(m.group(1)) for k in header if (m := re.match(r"blocks\.(\d+)\.", k))}
    if blocks != set(range(config.n_layer)):
        raise FileFormatError(path, f"the config claims n_layer={config.n_layer}; the file holds tensors of blocks "
                                    f"{sorted(blocks)[:8]}", field="config")
    return config


def _base_fields(in_features) -> dict:
    """kind -> {field: check} of a frozen layer's structure ("in" and "out" are then checked against the config)."""
    size = {"in": _int, "out": _int, "bias": _bool}
    bias_dtype = _optional(_float_dtype)
    return {"Linear": {**size, "dtype": _float_dtype},
            "NF4Linear": {**size, "bias_dtype": bias_dtype, "blocksize": check_blocksize, "quant_type": _one_of(CODES),
                          "double_quant": _bool, "weight_dtype": _float_dtype},
            "GroupwiseLinear": {**size, "bias_dtype": bias_dtype, "bits": check_bits,
                                "group_size": lambda g: check_group_size(g, in_features), "dtype": _float_dtype,
                                "scale_dtype": _float_dtype, "zero_dtype": _float_dtype}}


_ADAPTED_BASE = {"lora": "Linear", "qlora": "NF4Linear", "qalora": "GroupwiseLinear"}  # adapted kind -> its base
_ADAPTER_FIELDS = {"r": _int, "k": _int, "d": _int, "alpha": _positive, "use_rslora": _bool,
                   "group_size": _optional(_int), "init": _one_of(INITS), "dropout": _rate,
                   "dropout_seed": _optional(lambda v: _int(v, 0, 2**63 - 1)), "dtype": _float_dtype}


def _base_spec(spec, path, field: str, shape: tuple[int, int]) -> None:
    out_f, in_f = shape
    kinds = _base_fields(in_f)
    kind = _object(spec, path, field).get("kind")
    if kind == "GroupwiseLinear" and not {"scale_dtype", "zero_dtype"} & set(spec):  # one byte per code (older)
        spec.update(scale_dtype=spec.get("dtype"), zero_dtype=spec.get("dtype"))  # its scales and zeros: "dtype"
    if kind not in kinds:
        known = sorted(kinds) + sorted(_ADAPTED_BASE)
        raise FileFormatError(path, f"unknown layer kind {kind!r}; known kinds: {known}", field=f"{field}.kind")
    _object(spec, path, field, keys=["kind", *kinds[kind]])
    for name, check in kinds[kind].items():
        _checked(check, spec[name], path, f"{field}.{name}")
    if (spec["out"], spec["in"]) != shape:
        raise FileFormatError(path, f"(out, in) = {(spec['out'], spec['in'])}; the config gives this matrix "
                                    f"{shape}", field=field)
    if "bias_dtype" in spec and (spec["bias_dtype"] is None) == spec["bias"]:
        raise FileFormatError(path, f"bias={spec['bias']} with bias_dtype={spec['bias_dtype']!r}", field=field)


def _adapted_spec(spec, path, field: str, shape: tuple[int, int]) -> None:
    kind = spec["kind"]
    _object(spec, path, field, keys=["kind", "base", "active", "merged", "adapters"])
    _base_spec(spec["base"], path, f"{field}.base", shape)
    if spec["base"]["kind"] != _ADAPTED_BASE[kind]:
        raise FileFormatError(path, f"a {kind} layer has a {_ADAPTED_BASE[kind]} base, not a "
                                    f"{spec['base']['kind']}", field=f"{field}.base.kind")
    _checked(_bool, spec["merged"], path, f"{field}.merged")
    adapters = _object(spec["adapters"], path, f"{field}.adapters")
    if not adapters:
        raise FileFormatError(path, "an adapted layer needs at least one adapter", field=f"{field}.adapters")
    if spec["active"] is not None and spec["active"] not in adapters:
        raise FileFormatError(path, f"{spec['active']!r} is not among the adapters {sorted(adapters)}",
                              field=f"{field}.active")
    group = spec["base"].get("group_size") if kind == "qalora" else None
    for name, a in adapters.items():
        check_adapter_spec(a, path, f"{field}.adapters.{name}", shape, group)


def check_adapter_spec(a, path, field: str, shape: tuple[int, int], group_size: int | None) -> None:
    """One adapter's stored hyperparameters (r, alpha, dropout, init, ...) for a layer of ``shape`` (out, in)."""
    _object(a, path, field, keys=_ADAPTER_FIELDS)
    for key, check in _ADAPTER_FIELDS.items():
        _checked(check, a[key], path, f"{field}.{key}")
    out_f, in_f = shape
    for key, value in {"k": in_f // (group_size or 1), "d": out_f, "group_size": group_size}.items():
        if a[key] != value:
            raise FileFormatError(path, f"{a[key]!r}; the layer's shape {shape} and base give {value!r}",
                                  field=f"{field}.{key}")
    if a["r"] > max(in_f, out_f):  # bounds what is made before the shapes are compared with the file
        raise FileFormatError(path, f"rank {a['r']} exceeds the layer's widths {shape}", field=f"{field}.r")


def stored_layer_specs(meta: dict, config, path) -> dict:
    """The metadata's ``layers`` ({path: structure}), every field checked: kinds, sizes against the config,
    quantization settings, dtypes, adapter hyperparameters; and the NF4 tables it names (``quant_tables``)."""
    specs = _object(json_field(meta, "layers", path, default={}), path, "layers")
    used = set()
    for p, spec in specs.items():
        try:
            block, target = parse_path(p)
        except ValueError as e:
            raise FileFormatError(path, str(e), field="layers") from None
        if block >= config.n_layer:
            raise FileFormatError(path, f"block {block} does not exist; the config has {config.n_layer}",
                                  field=f"layers.{p}")
        shape = target.shape(config.n_embd)
        if isinstance(spec, dict) and spec.get("kind") in _ADAPTED_BASE:
            _adapted_spec(spec, path, f"layers.{p}", shape)
            spec = spec["base"]
        else:
            _base_spec(spec, path, f"layers.{p}", shape)
        if spec["kind"] == "NF4Linear":
            used.add(spec["quant_type"])
    if "quant_tables" in meta:  # the 4-bit levels each quant_type stood for when the file was written
        tables = _object(json_field(meta, "quant_tables", path), path, "quant_tables")
        for qt in sorted(used):
            if qt not in tables:
                raise FileFormatError(path, f"a layer is quantized as {qt!r}, but the file's codes were made with "
                                            f"{sorted(tables)}", field="quant_tables")
        for qt, levels in tables.items():
            if not _same_levels(levels, CODES.get(qt)):
                raise FileFormatError(path, f"the stored 4-bit levels of {qt!r} are not this package's",
                                      field=f"quant_tables.{qt}")
    return specs


def _same_levels(levels, code) -> bool:
    try:
        return code is not None and np.array_equal(np.asarray(levels, dtype=np.float32), code)
    except (TypeError, ValueError):
        return False


def quant_tables(specs: dict) -> dict:
    """{quant_type: its 16 levels} for every NF4 base among ``specs`` (what ``stored_layer_specs`` checks)."""
    types = {(s.get("base") or s).get("quant_type") for s in specs.values()} - {None}
    return {qt: [float(x) for x in CODES[qt]] for qt in sorted(types)}


def trainable_names(meta: dict, path, default: list) -> list:
    """The metadata's ``trainable``: a list of parameter names (``default`` when absent)."""
    names = json_field(meta, "trainable", path, default=default)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise FileFormatError(path, f"expected a list of parameter names, got {_short(names)}", field="trainable")
    return names


def check_arrays(expected: dict, header: dict, path) -> None:
    """Every array a model expects ({name: (shape, dtype)}) is in ``header`` with that shape and a fitting dtype.

    Floating arrays may differ in float dtype (they are cast on loading); any other must match exactly.
    """
    missing = [k for k in expected if k not in header]
    unexpected = [k for k in header if k not in expected]
    if missing or unexpected:
        raise FileFormatError(path, f"the file does not match the model it describes: missing keys {missing[:8]}, "
                                    f"unexpected keys {unexpected[:8]}")
    for k, (shape, dtype) in expected.items():
        shape_f, dtype_f = header[k]
        if tuple(shape) != shape_f:
            raise FileFormatError(path, f"the file holds shape {shape_f}, the model it describes has {tuple(shape)}",
                                  tensor=k)
        floats = dtype_f in FLOAT_DTYPES and str(dtype) in FLOAT_DTYPES
        if not floats and dtype_f != str(dtype):
            raise FileFormatError(path, f"the file holds {dtype_f}, the model it describes has {dtype}", tensor=k)


def check_values(tensors: dict, path, code_bits: dict | None = None, floats_only: bool = False,
                 packed_bits: dict | None = None) -> None:
    """Every floating tensor finite (and with ``floats_only`` every tensor floating); every integer code tensor
    in ``code_bits`` ({key: bits}) below 2**bits; every bit stream of codes in ``packed_bits`` ({key: the
    number of bits its codes fill}) padded with zero bits after its last code. The readers of every format
    call this one check."""
    for k, arr in tensors.items():
        if floats_only and arr.dtype.kind != "f":
            raise FileFormatError(path, f"holds {arr.dtype} values; expected finite floating-point values", tensor=k)
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise FileFormatError(path, "holds NaN or inf; expected finite floating-point values", tensor=k)
    for k, bits in (code_bits or {}).items():
        arr = tensors[k]
        if arr.size and int(arr.max()) >= 2**bits:
            raise FileFormatError(path, f"holds the code {int(arr.max())}, beyond the {2**bits} levels of "
                                        f"{bits}-bit codes", tensor=k)
    for k, used in (packed_bits or {}).items():
        spare = 8 * tensors[k].size - used  # the zero bits after the last code
        if spare and int(tensors[k][-1]) & (2**spare - 1):
            raise FileFormatError(path, f"holds bits after its last code ({used} bits of codes in "
                                        f"{tensors[k].size} bytes); a packed stream ends in zero bits", tensor=k)


# ---------------------------------------------------------------- PEFT's adapter_config.json
_PEFT_UNSUPPORTED = ("use_dora", "lora_bias", "modules_to_save", "target_parameters", "trainable_token_indices")


def _pattern(check):
    """A PEFT ``rank_pattern`` / ``alpha_pattern``: {regex: value}, each key a regex, each value ``check``ed."""
    def validate(pattern):
        if pattern is None:
            return {}
        if not isinstance(pattern, dict):
            raise ValueError(f"expected a JSON object {{module regex: value}}, got {_short(pattern)}")
        for k, v in pattern.items():
            try:
                re.compile(k)  # alone first, so that the error's position is the key's
                re.compile(rf"(.*\.)?({k})$")  # as PEFT matches it
            except re.error as e:
                raise ValueError(f"{k!r} is not a regular expression ({e})") from None
            try:
                check(v)
            except ValueError as e:
                raise ValueError(f"{k!r}: {e}") from None
        return pattern
    return validate


def read_json_object(path) -> dict:
    """The JSON object in the file ``path``; FileFormatError (one line, naming the file) if it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FileFormatError(path, f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise FileFormatError(path, f"expected a JSON object, got {type(obj).__name__} {_short(obj)}")
    return obj


def validate_peft_config(config: dict, path) -> dict:
    """Check a PEFT LoRA ``adapter_config.json`` (a dict); return it with PEFT's defaults filled in.

    ``peft_type`` "LORA"; ``r`` a positive integer and ``lora_alpha`` a finite number > 0 (both 8
    by default, as PEFT); ``rank_pattern`` / ``alpha_pattern`` objects whose keys are regular
    expressions and whose values are ranks / alphas; ``use_rslora`` and ``fan_in_fan_out`` true or
    false; ``lora_dropout`` in [0, 1); no DoRA, LoRA bias, trained bias or extra modules.
    """
    _object(config, path, "adapter_config")
    if config.get("peft_type", "LORA") != "LORA":
        raise FileFormatError(path, f"{config.get('peft_type')!r} is not 'LORA'", field="peft_type")
    out = dict(config)
    for field, check, default in (("r", _int, 8), ("lora_alpha", _positive, 8), ("use_rslora", _bool, False),
                                  ("fan_in_fan_out", _bool, False), ("lora_dropout", _optional(_rate), 0.0),
                                  ("rank_pattern", _pattern(_int), {}), ("alpha_pattern", _pattern(_positive), {})):
        out[field] = _checked(check, config.get(field, default), path, field)
    out["lora_dropout"] = out["lora_dropout"] or 0.0
    for field in _PEFT_UNSUPPORTED:
        if config.get(field):
            raise FileFormatError(path, f"{_short(config[field])} is not supported (plain LoRA only)", field=field)
    if config.get("bias", "none") != "none":
        raise FileFormatError(path, f"{config.get('bias')!r} is not supported (only 'none')", field="bias")
    return out
