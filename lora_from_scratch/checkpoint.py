"""Files in and out: safetensors checkpoints of every model kind, per-task adapter files, GPT-2 and PEFT.

- ``save_checkpoint`` / ``load_checkpoint``: a whole model in one safetensors file (never pickle:
  a pickle can run code when loaded). The tensors are every parameter *and buffer* under its
  dotted name, stored as held: a QLoRA base as its packed 4-bit codes and block constants, a
  QA-LoRA base as its codes packed into one bit stream, its float16 scales and its zero points
  (never in float, never re-quantized). A QA-LoRA base written with one byte per code (files from
  before the packed layout) is packed on loading.
  The metadata (JSON) holds the GPTConfig, the structure of every layer that is not a plain
  ``Linear`` (its kind, its base's format, its adapters, which one is active, whether it is
  merged) and the names of the trainable parameters, so the loaded model has the same layer
  kinds and flags and computes bit for bit the same logits. That structure is written here, one
  branch per layer kind (``layer_spec`` / ``layer_from_spec``, ``adapter_spec`` /
  ``adapter_from_spec``): the layers compute and know nothing of files.
- ``save_adapter`` / ``load_adapter``: one adapter of every adapted layer, the per-task file of
  the LoRA paper (Hu et al., 2021, section 4.2: only A and B differ between tasks).
- Writing is atomic: a file goes to a temporary name in the same folder and is renamed over the
  target only when complete, so a crash or Ctrl-C never leaves half a checkpoint (``files.atomic_write``;
  ``files.write_json`` for results). Files and folders get the usual umask-based mode (``files.usual_mode``).
- Both files carry a SHA-256 of their metadata and tensors (safetensors has no checksum of its
  own), verified on load: a damaged byte is refused, not loaded as a different weight. Files
  written before the checksum existed load without verification.
- A file that is missing, truncated, not safetensors, or not ours raises an error naming the file
  and what is wrong with it; every claim of its metadata (config, layer kinds, quantization
  settings, adapter hyperparameters) is checked against its header before anything is built, and
  its values after reading (``files``: one place for every format's checks).
- ``load_hf_gpt2`` / ``to_hf_gpt2_state_dict`` / ``save_hf_gpt2`` (written in ``hf_io``): Hugging Face
  GPT-2; ``save_peft_adapter`` / ``load_peft_adapter`` (written in ``peft_io``): PEFT's adapter files.
  Both are imported here so that ``checkpoint`` offers every format; neither imports ``checkpoint``.
"""

from __future__ import annotations

import json
import os

from .adapter import (
    TARGETS,
    AdaptedLinear,
    LoRALinear,
    LowRankAdapter,
    lora_layers,
    refuse_while_disabled,
    resolve_targets,
)
from .backend import get_xp, like_of
from .files import (
    CHECKSUM_KEY,
    FileFormatError,
    atomic_write,
    check_adapter_spec,
    check_arrays,
    check_values,
    gpt_config,
    host_tensors,
    json_field,
    quant_tables,
    read_header,
    stored_layer_specs,
    trainable_names,
    verify_checksum,
    with_checksum,
)
from .files import read_safetensors as read_checkpoint
from .hf_io import load_hf_gpt2, save_hf_gpt2, to_hf_gpt2_state_dict  # noqa: F401  (GPT-2, see ``hf_io``)
from .lora import _adapter_of, active_adapter, lora_state_dict, set_adapter
from .model import GPT
from .nn import Linear, check_float_dtype
from .peft_io import load_peft_adapter, save_peft_adapter  # noqa: F401  (PEFT, see ``peft_io``)
from .qalora import GroupwiseLinear, QALoRALinear
from .qlora import NF4Linear, QLoRALinear
from .quant.blockwise import DOUBLE_QUANT_BLOCKSIZE, Quantized4bit
from .quant.groupwise import GroupwiseQuantized, pack_codes

FORMAT = "lora_from_scratch.gpt"
ADAPTER_FORMAT = "lora_from_scratch.adapter"
RESERVED = ("format", "config", "layers", "trainable", "quant_tables", CHECKSUM_KEY)  # metadata keys of the format
# the pre-trained base model that ships with the package (``python -m lora_from_scratch pretrain`` makes it)
BASE_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "base.safetensors")


# ------------------------------------------------------------ layer structure (the metadata's "layers")
# A checkpoint stores the arrays apart (safetensors tensors); what it needs besides them to rebuild a layer of
# the same kind, shapes and dtypes is that layer's structure, a small JSON object. The layers hold no knowledge
# of it: each kind has its branch in ``layer_spec`` (layer -> structure) and ``layer_from_spec`` (structure ->
# an empty layer of zeros, which ``Module.load_state_dict`` then fills). ``files`` checks a stored one.
def adapter_spec(adapter: LowRankAdapter) -> dict:
    """One adapter's structure: rank r, A's columns k', B's rows d, its hyperparameters and dtype."""
    return {"r": adapter.r, "k": int(adapter.A.shape[1]), "d": int(adapter.B.shape[0]), "alpha": adapter.alpha,
            "use_rslora": adapter.use_rslora, "group_size": adapter.group_size, "init": adapter.init,
            "dropout": float(adapter.dropout.p), "dropout_seed": adapter.dropout.seed, "dtype": str(adapter.A.dtype)}


def adapter_from_spec(spec: dict) -> LowRankAdapter:
    """An adapter of ``spec``'s shape holding zeros, ready for ``load_state_dict``."""
    xp = get_xp()
    A = xp.zeros((spec["r"], spec["k"]), dtype=spec["dtype"])  # (r, k')
    B = xp.zeros((spec["d"], spec["r"]), dtype=spec["dtype"])  # (d, r)
    return LowRankAdapter(A, B, spec["alpha"], dropout=spec["dropout"], use_rslora=spec["use_rslora"],
                          group_size=spec["group_size"], init=spec["init"], dropout_seed=spec["dropout_seed"])


def _size(layer) -> dict:
    return {"in": layer.in_features, "out": layer.out_features, "bias": layer.bias is not None}


def _bias_dtype(layer) -> str | None:
    return str(layer.bias.dtype) if layer.bias is not None else None


def layer_spec(layer) -> dict:
    """The structure of a float, NF4, group-wise or adapted layer (its arrays are stored apart); ValueError for
    any other layer."""
    if isinstance(layer, AdaptedLinear):  # its kind ("lora", "qlora", "qalora"), its base and its named adapters
        return {"kind": layer.kind, "base": layer_spec(layer.base), "active": layer.active, "merged": layer.merged,
                "adapters": {name: adapter_spec(a) for name, a in layer.adapters.items()}}
    if isinstance(layer, Linear):
        return {"kind": "Linear", **_size(layer), "dtype": str(layer.weight.dtype)}
    if isinstance(layer, NF4Linear):
        return {"kind": "NF4Linear", **_size(layer), "bias_dtype": _bias_dtype(layer), "blocksize": layer.blocksize,
                "quant_type": layer.quant_type, "double_quant": layer.double_quant, "weight_dtype": layer.weight_dtype}
    if isinstance(layer, GroupwiseLinear):
        return {"kind": "GroupwiseLinear", **_size(layer), "bias_dtype": _bias_dtype(layer), "bits": layer.bits,
                "group_size": layer.group_size, "dtype": layer.weight_dtype, "scale_dtype": str(layer.scales.dtype),
                "zero_dtype": str(layer.zeros.dtype)}
    raise ValueError(f"a {type(layer).__name__} is not a layer a checkpoint can describe (a Linear, an NF4Linear, "
                     "a GroupwiseLinear or an adapted layer)")


ADAPTED_KINDS = {"lora": LoRALinear, "qlora": QLoRALinear, "qalora": QALoRALinear}
BASE_KINDS = ("Linear", "NF4Linear", "GroupwiseLinear")


def layer_from_spec(spec: dict):
    """An empty layer (zeros of the right shapes and dtypes) of the structure ``spec`` describes."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind in ADAPTED_KINDS:
        adapters = {name: adapter_from_spec(a) for name, a in spec["adapters"].items()}
        return ADAPTED_KINDS[kind].assemble(layer_from_spec(spec["base"]), adapters, spec["active"], spec["merged"])
    if kind == "Linear":
        return _linear_from_spec(spec)
    if kind == "NF4Linear":
        return _nf4_from_spec(spec)
    if kind == "GroupwiseLinear":
        return _groupwise_from_spec(spec)
    raise ValueError(f"unknown layer kind {kind!r}; known kinds: {sorted([*BASE_KINDS, *ADAPTED_KINDS])}")


def _linear_from_spec(spec: dict) -> Linear:
    xp = get_xp()
    W = xp.zeros((spec["out"], spec["in"]), dtype=spec["dtype"])  # (out, in)
    b = xp.zeros((spec["out"],), dtype=spec["dtype"]) if spec["bias"] else None  # (out,)
    return Linear.from_weight(W, b)


def _nf4_from_spec(spec: dict) -> NF4Linear:
    """Zeros in the stored layout of the 4-bit codes and block constants (no quantization)."""
    xp = get_xp()
    n = spec["out"] * spec["in"]
    nblocks = -(-n // spec["blocksize"])
    q = Quantized4bit(packed=xp.zeros((n + 1) // 2, dtype=xp.uint8), absmax=None, shape=(spec["out"], spec["in"]),
                      dtype=spec["weight_dtype"], blocksize=spec["blocksize"], quant_type=spec["quant_type"])
    if spec["double_quant"]:
        q.qabsmax = xp.zeros(nblocks, dtype=xp.uint8)  # (nblocks,)
        q.offset = xp.zeros(1, dtype=xp.float32)  # (1,)
        q.absmax2 = xp.zeros(-(-nblocks // DOUBLE_QUANT_BLOCKSIZE), dtype=xp.float32)  # (nblocks / 256,)
    else:
        q.absmax = xp.zeros(nblocks, dtype=xp.float32)  # (nblocks,)
    bias = xp.zeros(spec["out"], dtype=spec["bias_dtype"]) if spec["bias"] else None  # (out,)
    return NF4Linear(q, bias)


def _groupwise_from_spec(spec: dict) -> GroupwiseLinear:
    """Zero codes, unit scales and zero points in the stored dtypes (float32 zero points once merged)."""
    xp = get_xp()
    L = spec["in"] // spec["group_size"]
    q = GroupwiseQuantized(codes=xp.zeros((spec["out"], spec["in"]), dtype=xp.uint8),
                           scales=xp.ones((spec["out"], L), dtype=spec["scale_dtype"]),
                           zeros=xp.zeros((spec["out"], L), dtype=spec["scale_dtype"]),
                           bits=spec["bits"], group_size=spec["group_size"], dtype=spec["dtype"])
    bias = xp.zeros(spec["out"], dtype=spec["bias_dtype"]) if spec["bias"] else None  # (out,)
    layer = GroupwiseLinear(q, bias)
    layer.zeros.data = layer.zeros.data.astype(spec["zero_dtype"])  # (out, L) as stored (float32 once merged)
    return layer


def layer_specs(model) -> dict:
    """dotted path -> structure, for every matrix of a GPT that is not a plain ``Linear`` (see ``layer_spec``)."""
    specs = {}
    for i, target in resolve_targets(model.config.n_layer, list(TARGETS)):
        path = target.path(i)
        layer = model.get_submodule(path)
        if type(layer) is not Linear:
            try:
                specs[path] = layer_spec(layer)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
    return specs


# ------------------------------------------------------------ whole models
def save_checkpoint(model: GPT, path: str, metadata: dict | None = None) -> None:
    """Write every parameter and buffer of ``model`` as held, its config and its structure to ``path``.

    Any adapter kind, merged or not. Refuses (ValueError, nothing written) a floating array with NaN or inf.
    """
    from safetensors.numpy import save_file

    tensors = host_tensors({name: holder.data for name, holder in model.named_arrays()},
                           "refusing to save a checkpoint")
    specs = layer_specs(model)
    meta = {"format": FORMAT, "config": json.dumps(model.config.to_dict()), "layers": json.dumps(specs),
            "trainable": json.dumps([n for n, p in model.named_parameters() if p.trainable])}
    if quant_tables(specs):
        meta["quant_tables"] = json.dumps(quant_tables(specs))
    for k, v in (metadata or {}).items():
        if str(k) in RESERVED:
            raise ValueError(f"metadata key {k!r} is reserved by the checkpoint format")
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    meta = with_checksum(tensors, meta)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_checkpoint(path: str, dtype=None) -> GPT:
    """Rebuild the model saved by ``save_checkpoint``: same layer kinds, arrays, flags and logits.

    ``dtype`` (``"float16"``, ``"float32"`` or ``"float64"``) casts the floating parameters after
    loading; by default they stay as stored. Before anything is built, every claim of the file is
    checked against the shapes and dtypes in its header (config, layer kinds, quantization
    settings, adapter hyperparameters: ``files``); after reading, its values (finite floats, codes
    within their bit width) and its checksum (files written before it existed have none). Every
    error names the file (``files.FileFormatError``, a ValueError).
    """
    dtype = None if dtype is None else check_float_dtype(dtype)
    meta, header = read_header(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a lora_from_scratch GPT checkpoint (metadata keys: {sorted(meta)})")
    config = gpt_config(meta, header, path)
    specs = stored_layer_specs(meta, config, path)
    model = GPT(config, seed=0, dtype=header["wte.weight"][1])
    for layer_path, spec in specs.items():
        model.set_submodule(layer_path, layer_from_spec(spec))
    grouped = {n: m for n, m in model.named_modules() if isinstance(m, GroupwiseLinear)}
    byte_codes = _byte_codes(grouped, header, path)
    arrays = dict(model.named_arrays())
    check_arrays({k: (a.shape, a.dtype) for k, a in arrays.items()}, header, path)
    for key in (f"{n}.{b}" for n in grouped for b in ("scales", "zeros")):  # stored as held: never cast
        if header[key][1] != str(arrays[key].dtype):
            raise FileFormatError(path, f"holds {header[key][1]}; the layer's structure says {arrays[key].dtype}",
                                  tensor=key)
    trainable = set(trainable_names(meta, path, default=[p for p, _ in model.named_parameters()]))
    named = dict(model.named_parameters())
    unknown = sorted(trainable - set(named))
    if unknown:
        raise FileFormatError(path, f"names parameters the model does not have: {unknown[:3]}", field="trainable")
    tensors, _ = read_checkpoint(path)
    packed = {f"{n}.packed": m.bits * m.weight_count for n, m in grouped.items() if f"{n}.codes" not in byte_codes}
    check_values(tensors, path, {k: bits for k, (_, bits) in byte_codes.items()}, packed_bits=packed)
    verify_checksum(tensors, meta, path)
    for key, (packed_key, bits) in byte_codes.items():
        tensors[packed_key] = pack_codes(tensors.pop(key), bits)  # (out, in) -> (ceil(out * in * bits / 8),)
    model.load_state_dict(tensors)
    for name, p in named.items():
        p.trainable = name in trainable
    if dtype is not None:
        model.astype(dtype)
    return model


def _byte_codes(grouped: dict, header: dict, path) -> dict:
    """QA-LoRA bases stored with one byte per code (files from before the packed layout): {codes key: (packed
    key, bits)}. Their header entries are replaced by the packed stream's, which ``load_checkpoint`` makes."""
    found = {}
    for n, m in grouped.items():
        if f"{n}.codes" in header and f"{n}.packed" not in header:
            if header[f"{n}.codes"] != ((m.out_features, m.in_features), "uint8"):
                raise FileFormatError(path, f"holds {header[f'{n}.codes']}; one byte per code of this layer is "
                                            f"{(m.out_features, m.in_features)} uint8", tensor=f"{n}.codes")
            header[f"{n}.packed"] = (tuple(m.packed.shape), "uint8")
            del header[f"{n}.codes"]
            found[f"{n}.codes"] = (f"{n}.packed", m.bits)
    return found


def checkpoint_metadata(path: str) -> dict:
    """The JSON-decoded metadata of a checkpoint (config, training command, seed, scores); the data is not read."""
    meta, _ = read_header(path)
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

    state = lora_state_dict(model, adapter)
    layers = lora_layers(model)
    name = adapter if adapter is not None else active_adapter(model)
    specs = {p: {"kind": layer.kind, **adapter_spec(_adapter_of(p, layer, adapter))} for p, layer in layers.items()}
    tensors = host_tensors(state, "refusing to save the adapter")
    meta = with_checksum(tensors, {"format": ADAPTER_FORMAT, "name": str(name), "layers": json.dumps(specs)})
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_adapter(model, path: str, name: str | None = None, activate: bool = True) -> str:
    """Add the adapter stored at ``path`` to ``model`` under ``name`` (default: its stored name); returns the name.

    The model must have adapted layers of the same kinds at the same paths (the base model the
    adapter was trained on, adapted with any first adapter). If an adapter of that name exists it
    is overwritten (same shapes required); ``activate`` makes it the active one. Everything is
    checked before the model changes.
    """
    meta, header = read_header(path)
    if meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path} is not a lora_from_scratch adapter file (metadata keys: {sorted(meta)})")
    specs = json_field(meta, "layers", path)
    name = meta.get("name", "default") if name is None else name
    layers = lora_layers(model)
    refuse_while_disabled(layers, "load_adapter")  # before anything changes: set_adapter at the end would refuse
    if not isinstance(specs, dict):
        raise FileFormatError(path, f"expected a JSON object {{layer path: adapter}}, got {type(specs).__name__}",
                              field="layers")
    if sorted(specs) != sorted(layers):
        raise ValueError(f"{path}: the adapter is for layers {sorted(specs)[:4]}..., the model has adapted layers "
                         f"{sorted(layers)[:4]}...")
    for p, spec in specs.items():  # everything the file claims, before anything is read or made
        layer = layers[p]
        if not isinstance(spec, dict) or spec.get("kind") != layer.kind:
            raise FileFormatError(path, f"{p} was a {spec.get('kind') if isinstance(spec, dict) else spec!r} layer, "
                                        f"the model's is {layer.kind}", field=f"layers.{p}.kind")
        if layer.merged:
            raise ValueError(f"{p} is merged; unmerge_lora before loading an adapter")
        spec = {k: v for k, v in spec.items() if k != "kind"}
        check_adapter_spec(spec, path, f"layers.{p}", (layer.out_features, layer.in_features), layer.group_size)
        for key, shape in ((f"{p}.lora_A", (spec["r"], spec["k"])), (f"{p}.lora_B", (spec["d"], spec["r"]))):
            if key not in header:
                raise FileFormatError(path, "missing", tensor=key)
            if header[key][0] != shape:
                raise FileFormatError(path, f"shape {header[key][0]} does not match the stored rank {spec['r']}: "
                                            f"{shape}", tensor=key)
        if name in layer.adapters and layer.adapters[name].r != spec["r"]:
            raise ValueError(f"{p} has an adapter {name!r} of rank {layer.adapters[name].r}, the file's is "
                             f"rank {spec['r']}")
    tensors, _ = read_checkpoint(path)
    check_values(tensors, path, floats_only=True)  # as lora.load_lora_state_dict checks
    verify_checksum(tensors, meta, path)
    plan = []
    for p, spec in specs.items():
        new = adapter_from_spec(spec)
        ref = next(iter(layers[p].adapters.values())).A.data
        new.A.data = like_of(ref, tensors[f"{p}.lora_A"])  # (r, k')
        new.B.data = like_of(ref, tensors[f"{p}.lora_B"])  # (d, r)
        plan.append((layers[p], new))
    for layer, new in plan:
        for q in new.parameters():
            q.trainable = False
        layer.adapters[name] = new
    if activate:
        set_adapter(model, name)
    return name
