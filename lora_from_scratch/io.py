"""Files in and out: safetensors checkpoints of every model kind, per-task adapter files, GPT-2 and PEFT.

- ``save_checkpoint`` / ``load_checkpoint``: a whole model in one safetensors file (never pickle:
  a pickle can run code when loaded). The tensors are every parameter *and buffer* under its
  dotted name, stored as held: a QLoRA base as its packed 4-bit codes and block constants, a
  QA-LoRA base as its integer codes, scales and zero points (never in float, never re-quantized).
  The metadata (JSON) holds the GPTConfig, the structure of every layer that is not a plain
  ``Linear`` (its kind, its base's format, its adapters, which one is active, whether it is
  merged) and the names of the trainable parameters, so the loaded model has the same layer
  kinds and flags and computes bit for bit the same logits.
- ``save_adapter`` / ``load_adapter``: one adapter of every adapted layer, the per-task file of
  the LoRA paper (Hu et al., 2021, section 4.2: only A and B differ between tasks).
- Writing is atomic: a file goes to a temporary name in the same folder and is renamed over the
  target only when complete, so a crash or Ctrl-C never leaves half a checkpoint (``atomic_write``;
  ``write_json`` for results). Files and folders get the usual umask-based mode (``usual_mode``).
- A file that is missing, truncated, not safetensors, or not ours raises an error naming the file
  and what is wrong with it.
- ``load_hf_gpt2`` / ``to_hf_gpt2_state_dict`` / ``save_hf_gpt2`` (in ``hf_io``): Hugging Face GPT-2;
  ``save_peft_adapter`` / ``load_peft_adapter`` (in ``peft_io``): PEFT's adapter files.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from .backend import like_of, to_numpy
from .model import GPT, GPTConfig
from .targets import TARGETS, resolve_targets

FORMAT = "lora_from_scratch.gpt"
ADAPTER_FORMAT = "lora_from_scratch.adapter"
# the pre-trained base model that ships with the package (``python -m lora_from_scratch pretrain`` makes it)
BASE_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "base.safetensors")


def usual_mode(folder: bool = False) -> int:
    """The mode ``open`` (0o666) or ``os.makedirs`` (0o777, ``folder=True``) gives under the current umask.

    ``tempfile`` makes its files (0600) and folders (0700) private; a temporary that is renamed
    into place is first given this mode, so what we write looks like any other file or folder.
    """
    umask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def atomic_write(path: str, write_fn) -> None:
    """Call ``write_fn(tmp_path)`` then rename the temporary file onto ``path`` (same folder, so atomic)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, usual_mode())  # mkstemp makes the file private (0600); give it the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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


# ------------------------------------------------------------ layer kinds
def _layer_classes() -> dict:
    from .lora import LoRALinear
    from .nn import Linear
    from .qalora import GroupwiseLinear, QALoRALinear
    from .qlora import NF4Linear, QLoRALinear

    return {"Linear": Linear, "NF4Linear": NF4Linear, "GroupwiseLinear": GroupwiseLinear,
            "lora": LoRALinear, "qlora": QLoRALinear, "qalora": QALoRALinear}


def layer_from_spec(spec: dict):
    """An empty layer (zeros of the right shapes and dtypes) of the structure ``spec`` describes."""
    from .adapter import AdaptedLinear, LowRankAdapter

    classes = _layer_classes()
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind not in classes:
        raise ValueError(f"unknown layer kind {kind!r}; known kinds: {sorted(classes)}")
    cls = classes[kind]
    if issubclass(cls, AdaptedLinear):
        adapters = {name: LowRankAdapter.from_spec(a) for name, a in spec["adapters"].items()}
        return cls.assemble(layer_from_spec(spec["base"]), adapters, spec["active"], spec["merged"])
    return cls.from_spec(spec)


def layer_specs(model) -> dict:
    """dotted path -> structure, for every matrix of a GPT that is not a plain ``Linear`` (see ``layer_from_spec``)."""
    from .nn import Linear

    specs = {}
    for i, target in resolve_targets(model.config.n_layer, list(TARGETS)):
        path = target.path(i)
        layer = model.get_submodule(path)
        if type(layer) is not Linear:
            if not callable(getattr(layer, "spec", None)):
                raise ValueError(f"{path} is a {type(layer).__name__}, which a checkpoint cannot describe")
            specs[path] = layer.spec()
    return specs


# ------------------------------------------------------------ whole models
def save_checkpoint(model: GPT, path: str, metadata: dict | None = None) -> None:
    """Write every parameter and buffer of ``model`` as held, its config and its structure to ``path``.

    Any adapter kind, merged or not. Refuses (ValueError, nothing written) a floating array with NaN or inf.
    """
    from safetensors.numpy import save_file

    tensors = host_tensors({name: holder.data for name, holder in model.named_arrays()},
                           "refusing to save a checkpoint")
    meta = {"format": FORMAT, "config": json.dumps(model.config.to_dict()),
            "layers": json.dumps(layer_specs(model)),
            "trainable": json.dumps([n for n, p in model.named_parameters() if p.trainable])}
    for k, v in (metadata or {}).items():
        if str(k) in meta:
            raise ValueError(f"metadata key {k!r} is reserved by the checkpoint format")
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_checkpoint(path: str) -> tuple[dict, dict]:
    """(tensors as NumPy arrays, metadata dict) of a safetensors file; a clear error for a bad file."""
    from safetensors import safe_open

    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with safe_open(path, framework="numpy") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for a truncated or foreign file
        size = os.path.getsize(path)
        raise ValueError(f"{path} is not a readable safetensors file ({size} bytes; truncated or corrupt?): "
                         f"{e}") from None
    return tensors, meta


def _json_field(meta: dict, key: str, path: str, default=None):
    if key not in meta:
        if default is not None:
            return default
        raise ValueError(f"{path}: the checkpoint's metadata has no {key!r} entry")
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the metadata entry {key!r} is not valid JSON ({e})") from None


def load_checkpoint(path: str, dtype=None) -> GPT:
    """Rebuild the model saved by ``save_checkpoint``: same layer kinds, arrays, flags and logits.

    ``dtype`` (e.g. ``"float64"``) casts the floating parameters after loading; by default they
    stay as stored. Every key, shape and dtype is checked; errors name the file.
    """
    tensors, meta = read_checkpoint(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a lora_from_scratch GPT checkpoint (metadata keys: {sorted(meta)})")
    try:
        config = GPTConfig(**_json_field(meta, "config", path))
    except TypeError as e:
        raise ValueError(f"{path}: the stored config does not describe a GPTConfig ({e})") from None
    if "wte.weight" not in tensors:
        raise ValueError(f"{path}: the checkpoint has no 'wte.weight' tensor")
    model = GPT(config, seed=0, dtype=str(tensors["wte.weight"].dtype))
    try:
        for layer_path, spec in _json_field(meta, "layers", path, default={}).items():
            model.set_submodule(layer_path, layer_from_spec(spec))
        model.load_state_dict(tensors)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: the file does not match the model it describes: {e}") from None
    trainable = _json_field(meta, "trainable", path, default=[p for p, _ in model.named_parameters()])
    named = dict(model.named_parameters())
    trainable = set(trainable)
    unknown = sorted(trainable - set(named))
    if unknown:
        raise ValueError(f"{path}: 'trainable' names parameters the model does not have: {unknown[:3]}")
    for name, p in named.items():
        p.trainable = name in trainable
    if dtype is not None:
        model.astype(dtype)
    return model


def checkpoint_metadata(path: str) -> dict:
    """The JSON-decoded metadata of a checkpoint (config, training command, seed, scores)."""
    _, meta = read_checkpoint(path)
    out = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            out[k] = v
    return out


# ------------------------------------------------------------ per-task adapter files
def save_adapter(model, path: str, adapter: str | None = None) -> None:
    """Write one adapter (default: the active one) of every adapted layer to ``path`` (safetensors).

    The file holds A and B of each layer (``lora.lora_state_dict``) and, as metadata, each
    adapter's hyperparameters: what ``load_adapter`` needs to rebuild it on the same base model.
    """
    from safetensors.numpy import save_file

    from .lora import _adapter_of, active_adapter, lora_layers, lora_state_dict

    state = lora_state_dict(model, adapter)
    layers = lora_layers(model)
    name = adapter if adapter is not None else active_adapter(model)
    specs = {p: {"kind": layer.kind, **_adapter_of(p, layer, adapter).spec()} for p, layer in layers.items()}
    tensors = host_tensors(state, "refusing to save the adapter")
    meta = {"format": ADAPTER_FORMAT, "name": str(name), "layers": json.dumps(specs)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_adapter(model, path: str, name: str | None = None, activate: bool = True) -> str:
    """Add the adapter stored at ``path`` to ``model`` under ``name`` (default: its stored name); returns the name.

    The model must have adapted layers of the same kinds at the same paths (the base model the
    adapter was trained on, adapted with any first adapter). If an adapter of that name exists it
    is overwritten (same shapes required); ``activate`` makes it the active one. Everything is
    checked before the model changes.
    """
    from .adapter import LowRankAdapter
    from .lora import lora_layers, set_adapter

    tensors, meta = read_checkpoint(path)
    if meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path} is not a lora_from_scratch adapter file (metadata keys: {sorted(meta)})")
    specs = _json_field(meta, "layers", path)
    name = meta.get("name", "default") if name is None else name
    layers = lora_layers(model)
    if sorted(specs) != sorted(layers):
        raise ValueError(f"{path}: the adapter is for layers {sorted(specs)[:4]}..., the model has adapted layers "
                         f"{sorted(layers)[:4]}...")
    plan = []
    for p, spec in specs.items():
        layer = layers[p]
        if spec.get("kind") != layer.kind:
            raise ValueError(f"{path}: {p} was a {spec.get('kind')} layer, the model's is {layer.kind}")
        if layer.merged:
            raise ValueError(f"{p} is merged; unmerge_lora before loading an adapter")
        A, B = tensors.get(f"{p}.lora_A"), tensors.get(f"{p}.lora_B")
        if A is None or B is None:
            raise ValueError(f"{path}: no {p}.lora_A / {p}.lora_B tensors")
        for key, arr in ((f"{p}.lora_A", A), (f"{p}.lora_B", B)):  # as lora.load_lora_state_dict checks
            if arr.dtype.kind != "f" or not np.all(np.isfinite(arr)):
                raise ValueError(f"{path}: {key!r}: expected finite floating-point values (dtype {arr.dtype})")
        try:
            new = LowRankAdapter.from_spec(spec)
            if new.A.shape != tuple(A.shape) or new.B.shape != tuple(B.shape):
                raise ValueError(f"{p}: A {tuple(A.shape)} / B {tuple(B.shape)} do not match the stored rank "
                                 f"{spec['r']}")
            if (new.A.shape[1], new.B.shape[0]) != (layer.adapter_in_features, layer.out_features):
                raise ValueError(f"{p}: the adapter's A {tuple(A.shape)} and B {tuple(B.shape)} do not fit the layer")
            if name in layer.adapters and layer.adapters[name].A.shape != new.A.shape:
                raise ValueError(f"{p} has an adapter {name!r} of rank {layer.adapters[name].r}, the file's is "
                                 f"rank {new.r}")
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: the stored spec of {p} is incomplete ({e})") from None
        ref = next(iter(layer.adapters.values())).A.data
        new.A.data = like_of(ref, A)
        new.B.data = like_of(ref, B)
        plan.append((layer, new))
    for layer, new in plan:
        for q in new.parameters():
            q.trainable = False
        layer.adapters[name] = new
    if activate:
        set_adapter(model, name)
    return name


# ------------------------------------------------------------ GPT-2 and PEFT
def load_hf_gpt2(source, n_head: int | None = None, dtype="float32") -> GPT:
    """Our GPT from a ``save_pretrained`` folder or a ``GPT2LMHeadModel`` state dict (see ``hf_io.load_hf_gpt2``)."""
    from .hf_io import load_hf_gpt2 as _load

    return _load(source, n_head, dtype)


def to_hf_gpt2_state_dict(model: GPT) -> dict:
    """A GPT-2 state dict of our GPT's float weights (see ``hf_io.to_hf_gpt2_state_dict``)."""
    from .hf_io import to_hf_gpt2_state_dict as _to

    return _to(model)


def save_peft_adapter(model, directory: str) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` that PEFT loads (see ``peft_io``)."""
    from .peft_io import save_peft_adapter as _save

    _save(model, directory)


def load_peft_adapter(model, directory: str):
    """Read an adapter saved by PEFT (or by ``save_peft_adapter``) into ``model`` (see ``peft_io``)."""
    from .peft_io import load_peft_adapter as _load

    return _load(model, directory)


def save_hf_gpt2(model: GPT, directory: str, base_only: bool = False, dequantize: bool = False) -> None:
    """Write a folder that ``transformers.GPT2LMHeadModel.from_pretrained`` loads (see ``hf_io.save_hf_gpt2``)."""
    from .hf_io import save_hf_gpt2 as _save

    _save(model, directory, base_only=base_only, dequantize=dequantize)
