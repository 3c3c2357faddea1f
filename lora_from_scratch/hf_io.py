"""Hugging Face GPT-2 in and out: our GPT from a folder written by ``save_pretrained`` or from a
``GPT2LMHeadModel`` state dict, and a folder that ``transformers.GPT2LMHeadModel.from_pretrained``
reads, in float or in bitsandbytes' 4-bit layout.

``load_hf_gpt2(directory)`` reads ``config.json`` and the safetensors weights (one file or shards)
without transformers and without pickle (``hf_folder`` reads the files), and builds the model from
the file's tensors one at a time, with no random model drawn first: loading GPT-2 small peaks at
about the model's own bytes (``benchmarks/hf_load.py`` measures it).

GPT-2 (Radford et al., 2019) stores its linear layers as ``Conv1D`` with weights of shape (in, out),
so each is transposed to the paper's (out, in) on the way in and back on the way out; the fused
attention projection ``c_attn`` (C, 3C) is Wq, Wk, Wv side by side (``adapter.TARGET_TABLE`` says
which third is which, and which GPT-2 module each of our six matrices belongs to).

``save_hf_gpt2(model, directory)`` writes ``config.json`` (a ``GPT2Config``: model_type "gpt2",
the sizes, activation "gelu_new", layer_norm_epsilon 1e-5, tied embeddings) and
``model.safetensors``, with NumPy, safetensors and json only. What goes in depends on the layers:

- float weights: a plain model, or a merged one (``lora.merge_lora`` / ``lora.merge_and_unload``);
- a model with unmerged adapters: refused unless ``base_only=True``, which writes the frozen base
  weights. That is the base PEFT needs: the adapters go to ``peft_io.save_peft_adapter``
  (LoRA, section 4.2: one shared base, a small file per task);
- NF4 bases (QLoRA, Dettmers et al., 2023, section 3; ``qlora.NF4Linear``, adapted or left by
  ``merge_and_unload(requantize=True)``): bitsandbytes' serialized 4-bit layout, read back by
  ``from_pretrained(directory)`` as ``bnb.nn.Linear4bit`` layers without quantizing again;
- group-wise bases (QA-LoRA, Xu et al., 2023, section 3.3): transformers reads no group-wise INT-N
  format that matches ours, so this is refused unless ``dequantize=True``, which writes the
  dequantized float weights (what the layers compute with, exactly).

The bitsandbytes layout, found by loading a tiny random ``GPT2LMHeadModel`` with
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=...)``
on the CPU (transformers 5.24, bitsandbytes 0.50.2) and reading what ``save_pretrained`` wrote.
For each of ``transformer.h.{i}.attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``:

- ``<m>.weight``: uint8 (out * in / 2, 1), two NF4 codes per byte, first in the high nibble;
- ``<m>.weight.absmax``: float32 (nblocks,) without double quantization; with it, uint8 (nblocks,),
  the 8-bit codes of absmax - offset;
- ``<m>.weight.quant_map``: float32 (16,), the NF4 levels;
- with double quantization also ``<m>.weight.nested_absmax`` float32 (ceil(nblocks / 256),) and
  ``<m>.weight.nested_quant_map`` float32 (256,), the dynamic 8-bit map;
- ``<m>.weight.quant_state.bitsandbytes__nf4``: uint8 bytes of the JSON
  ``{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [out, in]}`` plus, with
  double quantization, ``"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": <float>``;
- ``<m>.bias``: float32 (out,), as are the embeddings and layer norms; no ``lm_head.weight`` (tied).

and in ``config.json`` a ``quantization_config`` entry (``QUANTIZATION_CONFIG`` below, with
``bnb_4bit_quant_type`` and ``bnb_4bit_use_double_quant`` filled in).

Orientation: transformers replaces each ``Conv1D`` by a ``Linear4bit`` and quantizes its weight
*transposed*, as (out, in) (the JSON says shape [3C, C] for c_attn): the flattening order is the
row-major (out, in) order this package quantizes in, so our packed codes and block constants go
in unchanged, without any transposing or re-quantizing.

GPT-2's c_attn is one (3C, C) tensor to bitsandbytes, quantized as one flat vector: its codes and
block constants are q's, then k's, then v's, exactly, provided each (C, C) part fills whole blocks
(C * C divisible by the block size, true for C divisible by 8 and blocksize 64; else ValueError).
With double quantization the nested constants are one offset (the mean of all block constants)
and one 8-bit scale per 256 of them over the fused vector, while our q, k and v each have their
own: their 8-bit constants are dequantized to float32, concatenated, and re-quantized over the
whole fused vector (``quant.quantize_blockwise_8bit``). That rounds c_attn's block constants a
second time, moving each by up to about one step of the dynamic 8-bit map times its 256-block
scale, so the exported c_attn is not bit for bit ours (the 4-bit codes are); every other
module's constants are exported as stored.

A float ``Linear`` among the block matrices of a model that has NF4 bases is quantized here with
the model's NF4 settings: bitsandbytes' file has every block matrix in 4 bits, as
``load_in_4bit`` would make them from the same float weights (bit for bit without double
quantization). Such a layer then computes in 4 bits in transformers but in float here.

Found on the way (bitsandbytes 0.50.2, CPU): its native ``dequantize_4bit`` kernel is right only
when a weight's row length (in_features) is a multiple of the block size; for GPT-2 with
blocksize 64 that means n_embd divisible by 64. With n_embd = 32 or 96 it scales blocks by the
wrong constants (errors of the size of the weights), in its own quantize -> dequantize round trip
as much as in files written here. The file layout does not depend on it. And on CPUs with
avx512_bf16, ``Linear4bit`` in eval mode without gradients repacks its weight and computes in
bfloat16 (``support_avx512bf16_for_cpu = False`` on the module keeps float32).
"""

from __future__ import annotations

import json
import os

import numpy as np

from .adapter import HF_MODULES, TARGET_TABLE, AdaptedLinear, QuantizedLinear
from .backend import asarray, to_numpy
from .files import host_tensors, json_writer, write_folder
from .hf_folder import folder_tensors, read_gpt2_config, read_tensor
from .model import GPT, GPTConfig
from .nn import Linear
from .qalora import GroupwiseLinear
from .qlora import NF4Linear
from .quant import Quantized4bit, dequantize_blockwise_8bit, quantize_4bit, quantize_blockwise_8bit
from .quant.blockwise import DOUBLE_QUANT_BLOCKSIZE
from .quant.tables import CODES, DYNAMIC_MAP

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
BNB_QUANT_TYPES = ("nf4", "fp4")  # the 4-bit types bitsandbytes has (it has no INT4)
# what transformers writes into config.json for a GPT2LMHeadModel loaded in 4 bits and saved
QUANTIZATION_CONFIG = {
    "_load_in_4bit": True,
    "_load_in_8bit": False,
    "bnb_4bit_compute_dtype": "float32",
    "bnb_4bit_quant_storage": "uint8",
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": False,
    "llm_int8_enable_fp32_cpu_offload": False,
    "llm_int8_has_fp16_weight": False,
    "llm_int8_skip_modules": None,
    "llm_int8_threshold": 6.0,
    "load_in_4bit": True,
    "load_in_8bit": False,
    "quant_method": "bitsandbytes",
}

# GPT-2 module -> our targets in it, in the order of its output rows (q, k, v for c_attn)
MODULE_TARGETS = {m: sorted((t for t in TARGET_TABLE.values() if t.hf_module == m),
                            key=lambda t: t.fused_index or 0) for m in HF_MODULES}


def module_shape(hf_module: str, n_embd: int) -> tuple[int, int]:
    """(out, in) of a GPT-2 module's weight in the paper's orientation: c_attn (3C, C), c_fc (4C, C), ..."""
    parts = MODULE_TARGETS[hf_module]
    return sum(t.out_mult for t in parts) * n_embd, parts[0].in_mult * n_embd


def target_rows(target, n_embd: int) -> slice:
    """The output rows of its GPT-2 module that one of our matrices is (a third of c_attn, or all)."""
    if target.fused_index is None:
        return slice(None)
    width = target.out_mult * n_embd
    return slice(target.fused_index * width, (target.fused_index + 1) * width)


# ---------------------------------------------------------------- in
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # GPT-2's causal-mask buffers: older files hold them


def _take(sd: dict, key: str, shape: tuple) -> np.ndarray:
    if key not in sd:
        raise KeyError(f"GPT-2 state dict is missing key {key!r}")
    arr = np.asarray(sd[key])  # the stored array, as is
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(
            f"shape mismatch for {key!r}: state dict has {tuple(arr.shape)}, expected {tuple(shape)}"
        )
    return arr


def hf_gpt2_config(sd: dict, n_head: int) -> GPTConfig:
    """Infer the GPTConfig from the shapes of a GPT-2 state dict (the head count is not in it)."""
    for key in ("transformer.wte.weight", "transformer.wpe.weight"):
        if key not in sd:
            raise KeyError(f"GPT-2 state dict is missing key {key!r}")
    V, C = np.shape(sd["transformer.wte.weight"])
    P = np.shape(sd["transformer.wpe.weight"])[0]
    n_layer = 0
    while f"transformer.h.{n_layer}.ln_1.weight" in sd:
        n_layer += 1
    if n_layer == 0:
        raise KeyError("GPT-2 state dict has no blocks (missing 'transformer.h.0.ln_1.weight')")
    return GPTConfig(vocab_size=int(V), block_size=int(P), n_layer=n_layer, n_head=n_head, n_embd=int(C))


def gpt2_shapes(cfg: GPTConfig, prefix: str = "transformer.") -> dict:
    """GPT-2 tensor name -> shape in GPT-2's own layout (Conv1D weights (in, out)): every tensor our GPT needs."""
    C = cfg.n_embd
    shapes = {prefix + "wte.weight": (cfg.vocab_size, C), prefix + "wpe.weight": (cfg.block_size, C),
              prefix + "ln_f.weight": (C,), prefix + "ln_f.bias": (C,)}
    for i in range(cfg.n_layer):
        h = f"{prefix}h.{i}."
        for ln in ("ln_1", "ln_2"):
            shapes[h + ln + ".weight"] = shapes[h + ln + ".bias"] = (C,)
        for hf_module in MODULE_TARGETS:
            out_f, in_f = module_shape(hf_module, C)
            shapes[h + hf_module + ".weight"] = (in_f, out_f)
            shapes[h + hf_module + ".bias"] = (out_f,)
    return shapes


def gpt_from_gpt2_tensors(cfg: GPTConfig, get, dtype="float32", prefix: str = "transformer.") -> GPT:
    """Our GPT holding GPT-2's weights, built from them without drawing a single large random weight.

    ``get(name)`` returns GPT-2's tensor ``name`` (NumPy, GPT-2's layout, shape already checked, a
    fresh array this function may keep). Each is asked for once and converted before the next:
    Conv1D weights (in, out) transposed to (out, in), ``c_attn`` (C, 3C) split into Wq, Wk, Wv.
    So the memory in use is the model so far plus one tensor in flight, never a second model.

    The modules are those of ``GPT`` itself: a GPT of the same depth and head count is made at
    width n_head, vocabulary 1 and context 1 (a few hundred numbers), given ``cfg``, and every
    array is then put in place: the embeddings and layer norms into their Parameters, each matrix
    as a new ``Linear.from_weight``.
    """
    model = GPT(GPTConfig(vocab_size=1, block_size=1, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_head),
                seed=0, dtype=dtype)
    model.config = cfg

    def put(param, name):
        param.data = asarray(get(prefix + name), dtype=dtype)  # on the backend; no copy on NumPy

    put(model.wte.weight, "wte.weight")  # (V, C)
    put(model.wpe.weight, "wpe.weight")  # (P, C)
    for i, block in enumerate(model.blocks):
        for ln in ("ln_1", "ln_2"):
            put(getattr(block, ln).weight, f"h.{i}.{ln}.weight")  # (C,)
            put(getattr(block, ln).bias, f"h.{i}.{ln}.bias")  # (C,)
        for hf_module, parts in MODULE_TARGETS.items():
            W = get(f"{prefix}h.{i}.{hf_module}.weight").T  # Conv1D (in, out) -> (out, in), a view
            bias = get(f"{prefix}h.{i}.{hf_module}.bias")  # (out,)
            for t in parts:
                rows = target_rows(t, cfg.n_embd)
                model.set_submodule(t.path(i), Linear.from_weight(
                    asarray(np.ascontiguousarray(W[rows]), dtype=dtype),  # (out_t, in), its own array
                    asarray(np.array(bias[rows]), dtype=dtype)))  # (out_t,)
            del W, bias  # the file's layout is let go before the next module is read
    put(model.ln_f.weight, "ln_f.weight")  # (C,)
    put(model.ln_f.bias, "ln_f.bias")  # (C,)
    return model


def load_hf_gpt2(source, n_head: int | None = None, dtype="float32") -> GPT:
    """Our GPT holding the weights of a Hugging Face GPT-2: a folder, or a ``GPT2LMHeadModel`` state dict.

    - ``source`` a folder (str or path): what ``save_pretrained`` writes, read without transformers
      or pickle (``load_hf_gpt2_folder``); ``n_head`` comes from its ``config.json``.
    - ``source`` a state dict (name -> array): ``n_head`` is needed, since the shapes do not hold it.
      Every expected key must be present with its expected shape; buffers (``attn.bias`` masks) and
      the tied ``lm_head.weight`` are accepted and ignored (the head must equal wte).

    Either way Conv1D weights (in, out) are transposed to (out, in) and ``c_attn`` (C, 3C) is split
    column-wise into Wq, Wk, Wv, and no random model is drawn first (``gpt_from_gpt2_tensors``).
    """
    if isinstance(source, (str, os.PathLike)):
        return load_hf_gpt2_folder(source, n_head=n_head, dtype=dtype)
    if n_head is None:
        raise ValueError("a GPT-2 state dict does not say how many heads it has: pass n_head")
    sd = {k: to_numpy(v) for k, v in source.items()}
    cfg = hf_gpt2_config(sd, n_head)
    for key, shape in gpt2_shapes(cfg).items():  # every key and shape checked before anything is built
        _take(sd, key, shape)
    if "lm_head.weight" in sd:
        head = _take(sd, "lm_head.weight", (cfg.vocab_size, cfg.n_embd))
        if not np.array_equal(head, sd["transformer.wte.weight"]):
            raise ValueError("lm_head.weight differs from transformer.wte.weight; this GPT ties the two")
    return gpt_from_gpt2_tensors(cfg, lambda key: np.array(sd[key], dtype=dtype), dtype)  # copies: the caller's
    # arrays stay the caller's


def load_hf_gpt2_folder(directory, n_head: int | None = None, dtype="float32") -> GPT:
    """Our GPT from a folder written by ``save_pretrained``, for any GPT-2 size (see ``hf_folder``).

    ``config.json`` gives the sizes (checked field by field, ``hf_folder.gpt2_config``); the weights
    come from ``model.safetensors`` or the shards of ``model.safetensors.index.json``, with or
    without the ``transformer.`` prefix (``GPT2LMHeadModel`` or ``GPT2Model``), in F32, F16, BF16 or
    F64, cast to ``dtype``. Every tensor's name, shape and dtype is checked against the config in
    the files' headers before any weight is read; then one tensor at a time is read and put in
    place, so the peak memory stays near the model's own bytes (measured in ``benchmarks/``).
    A folder with only ``pytorch_model.bin`` is refused (no pickle is ever read).
    """
    cfg = read_gpt2_config(directory)
    if n_head is not None and n_head != cfg.n_head:
        raise ValueError(f"n_head={n_head} was passed, but {directory}/config.json says n_head={cfg.n_head}")
    entries = folder_tensors(directory)
    prefix = "transformer." if any(k.startswith("transformer.") for k in entries) else ""
    shapes = gpt2_shapes(cfg, prefix)
    missing = [k for k in shapes if k not in entries]
    extra = [k for k in entries if k not in shapes and k != "lm_head.weight" and not k.endswith(IGNORED_SUFFIXES)]
    if missing or extra:
        raise ValueError(f"{directory}: the weights do not match config.json's GPT-2 (missing tensors "
                         f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected tensors "
                         f"{extra[:3]}{'...' if len(extra) > 3 else ''})")
    head = entries.get("lm_head.weight")
    for key, shape in [*shapes.items(), *([("lm_head.weight", shapes[prefix + "wte.weight"])] if head else [])]:
        entry = entries[key]
        entry.check_dtype()
        if entry.shape != shape:
            raise ValueError(f"{entry.path}: tensor {key!r} has shape {list(entry.shape)}, config.json's sizes "
                             f"give {list(shape)}")
    model = gpt_from_gpt2_tensors(cfg, lambda key: read_tensor(entries[key], dtype), dtype, prefix)
    if head is not None:  # a tied head stored anyway must be the embedding: compared a slice at a time
        for start in range(0, cfg.vocab_size, 4096):
            rows = slice(start, start + 4096)
            if not np.array_equal(read_tensor(head, dtype, rows), to_numpy(model.wte.weight.data[rows])):
                raise ValueError(f"{head.path}: lm_head.weight differs from wte.weight; this GPT ties the two "
                                 "(tie_word_embeddings)")
    return model


# ---------------------------------------------------------------- out: which layer holds each matrix
def frozen_layers(model, base_only: bool) -> dict:
    """our path -> the plain frozen layer (``Linear``, ``NF4Linear`` or ``GroupwiseLinear``) to export.

    A merged adapted layer gives its base (which holds W0 + s B A); an unmerged one gives its
    frozen base when ``base_only``, else ValueError (the update would be silently left out).
    """
    out = {}
    for i in range(model.config.n_layer):
        for t in TARGET_TABLE.values():
            path = t.path(i)
            layer = model.get_submodule(path)
            if isinstance(layer, AdaptedLinear):
                if not layer.merged and not base_only:
                    raise ValueError(
                        f"{path} has unmerged adapters ({type(layer).__name__}): a GPT-2 file holds no adapter, "
                        "so they would be silently left out. Merge them first (lora.merge_lora or "
                        "lora.merge_and_unload), or pass base_only=True to write the frozen base weights (what "
                        "PEFT loads the adapter onto; write the adapter with peft_io.save_peft_adapter)")
                layer = layer.base
            if not isinstance(layer, (Linear, QuantizedLinear)):
                raise ValueError(f"{path} is a {type(layer).__name__}, which has no GPT-2 counterpart")
            out[path] = layer
    return out


def _float_weight(layer, path: str, dequantize: bool) -> np.ndarray:
    """The (out, in) float weight a plain layer computes with (dequantized for a quantized one)."""
    if isinstance(layer, Linear):
        return to_numpy(layer.weight.data)  # (out, in)
    if not dequantize:
        raise ValueError(f"{path} is a {type(layer).__name__} with no float weight; pass dequantize=True to "
                         "write its dequantized weight")
    return to_numpy(layer.dequantized_weight())  # (out, in) float32, exactly what the layer computes with


def _bias(layer, out_features: int, dtype) -> np.ndarray:
    if layer.bias is None:  # GPT-2's Conv1D always has a bias: a layer without one adds zeros
        return np.zeros(out_features, dtype=dtype)  # (out,)
    return to_numpy(layer.bias.data)  # (out,)


def _shared_tensors(model) -> dict:
    """Embeddings and layer norms under their GPT-2 names (no lm_head: it is tied to wte)."""
    out = {"transformer.wte.weight": to_numpy(model.wte.weight.data),  # (V, C)
           "transformer.wpe.weight": to_numpy(model.wpe.weight.data),  # (P, C)
           "transformer.ln_f.weight": to_numpy(model.ln_f.weight.data),  # (C,)
           "transformer.ln_f.bias": to_numpy(model.ln_f.bias.data)}  # (C,)
    for i, block in enumerate(model.blocks):
        for ln in ("ln_1", "ln_2"):
            norm = getattr(block, ln)
            out[f"transformer.h.{i}.{ln}.weight"] = to_numpy(norm.weight.data)  # (C,)
            out[f"transformer.h.{i}.{ln}.bias"] = to_numpy(norm.bias.data)  # (C,)
    return out


def _float_modules(model, layers: dict, dequantize: bool) -> dict:
    """GPT-2's Conv1D tensors: ``<module>.weight`` (in, out) and ``<module>.bias`` (out,) for every block."""
    C, out = model.config.n_embd, {}
    for i in range(model.config.n_layer):
        for hf_module, parts in MODULE_TARGETS.items():
            paths = [t.path(i) for t in parts]
            W = np.concatenate([_float_weight(layers[p], p, dequantize) for p in paths], axis=0)  # (out, in)
            dtype = W.dtype
            b = np.concatenate([_bias(layers[p], layers[p].out_features, dtype) for p in paths])  # (out,)
            if W.shape != module_shape(hf_module, C):
                raise ValueError(f"transformer.h.{i}.{hf_module}: the weights of {paths} stack to {W.shape}, "
                                 f"GPT-2 needs {module_shape(hf_module, C)}")
            out[f"transformer.h.{i}.{hf_module}.weight"] = np.ascontiguousarray(W.T)  # (out, in) -> (in, out)
            out[f"transformer.h.{i}.{hf_module}.bias"] = b.astype(dtype, copy=False)  # (out,)
    return out


def to_hf_gpt2_state_dict(model: GPT, dequantize: bool = True) -> dict:
    """The inverse of ``load_hf_gpt2``: a GPT-2 state dict (NumPy) with fused ``c_attn`` and Conv1D layout.

    Adapted layers contribute their frozen base weights (merged ones: W0 + s B A), never their
    unmerged adapters (those go to ``save_peft_adapter``). Quantized bases (NF4, group-wise) are
    written as their dequantized float weights (exactly what they compute with); with
    ``dequantize=False`` they raise ValueError instead. ``lm_head.weight`` is included (= wte).
    """
    layers = frozen_layers(model, base_only=True)
    out = _shared_tensors(model)
    out["lm_head.weight"] = out["transformer.wte.weight"]
    out.update(_float_modules(model, layers, dequantize))
    return out


# ---------------------------------------------------------------- out: bitsandbytes' 4-bit layout
def _nf4_settings(layers: dict) -> tuple[int, str, bool]:
    """(blocksize, quant_type, double_quant) shared by every NF4 base; ValueError if they differ."""
    nf4 = {p: layer for p, layer in layers.items() if isinstance(layer, NF4Linear)}
    settings = {(layer.blocksize, layer.quant_type, layer.double_quant) for layer in nf4.values()}
    types = {s[1] for s in settings}
    if not types <= set(BNB_QUANT_TYPES):
        bad = next(p for p, layer in nf4.items() if layer.quant_type not in BNB_QUANT_TYPES)
        raise ValueError(f"{bad} is quantized as {nf4[bad].quant_type!r}; bitsandbytes' 4-bit format has only "
                         f"{list(BNB_QUANT_TYPES)}")
    if len(types) > 1 or len({s[2] for s in settings}) > 1:
        raise ValueError(f"the NF4 bases do not share one quant type and double-quantization setting "
                         f"({sorted(settings)}); transformers' quantization_config holds one of each")
    return min(s[0] for s in settings), types.pop(), settings.pop()[2]


def _quantized(layer, path: str, blocksize: int, quant_type: str, double_quant: bool) -> Quantized4bit:
    if isinstance(layer, Linear):  # what load_in_4bit does to a float block matrix
        return quantize_4bit(to_numpy(layer.weight.data), blocksize=blocksize, quant_type=quant_type,
                             double_quant=double_quant)
    if not isinstance(layer, NF4Linear):
        raise ValueError(f"{path} is a {type(layer).__name__}; bitsandbytes' 4-bit layout holds NF4 weights only "
                         "(pass dequantize=True to write float weights)")
    q = layer.quantized
    return Quantized4bit(packed=to_numpy(q.packed), absmax=None if q.absmax is None else to_numpy(q.absmax),
                         shape=q.shape, dtype=q.dtype, blocksize=q.blocksize, quant_type=q.quant_type,
                         qabsmax=None if q.qabsmax is None else to_numpy(q.qabsmax),
                         offset=None if q.offset is None else to_numpy(q.offset),
                         absmax2=None if q.absmax2 is None else to_numpy(q.absmax2))


def fused_4bit(parts: list, module: str) -> dict:
    """One bitsandbytes 4-bit tensor from ``Quantized4bit`` parts stacked along the rows (q, k, v of c_attn).

    Returns ``packed`` (n / 2,) uint8 and either ``absmax`` (nblocks,) float32, or ``qabsmax``
    (nblocks,) uint8, ``offset`` (float) and ``absmax2`` (ceil(nblocks / 256),) float32. A single
    part's arrays are taken as stored; several parts' 8-bit constants are dequantized, concatenated
    and quantized again over the fused vector (one offset, one scale per 256 constants).
    """
    first = parts[0]
    for j, q in enumerate(parts):
        if (q.blocksize, q.quant_type, q.double_quant) != (first.blocksize, first.quant_type, first.double_quant):
            raise ValueError(f"{module}: its parts are quantized differently ({q.blocksize}, {q.quant_type}, "
                             f"double_quant={q.double_quant} vs {first.blocksize}, {first.quant_type}, "
                             f"double_quant={first.double_quant}); bitsandbytes quantizes it as one tensor")
        if j < len(parts) - 1 and q.numel % q.blocksize:
            raise ValueError(f"{module}: a part of {q.numel} weights does not fill whole blocks of {q.blocksize}, "
                             "so its blocks are not those of the fused tensor bitsandbytes quantizes")
    out = {"packed": np.concatenate([q.packed.reshape(-1) for q in parts])}  # (n / 2,) uint8, rows in order
    if not first.double_quant:
        out["absmax"] = np.concatenate([q.absmax for q in parts]).astype(np.float32)  # (nblocks,)
        return out
    if len(parts) == 1:
        out.update(qabsmax=first.qabsmax, offset=float(first.offset[0]), absmax2=first.absmax2)
        return out
    constants = np.concatenate([dequantize_blockwise_8bit(q.qabsmax, q.absmax2, DOUBLE_QUANT_BLOCKSIZE)
                                + q.offset for q in parts])  # (nblocks,) float32, each part's own offset added
    offset = np.float32(np.mean(constants, dtype=np.float64))  # the mean over the fused vector
    qabsmax, absmax2 = quantize_blockwise_8bit(constants - offset, DOUBLE_QUANT_BLOCKSIZE)  # (nblocks,), (nb2,)
    out.update(qabsmax=qabsmax, offset=float(offset), absmax2=absmax2)
    return out


def _quant_state_bytes(quant_type: str, blocksize: int, dtype: str, shape: tuple, offset) -> np.ndarray:
    """bitsandbytes' packed quant state: the JSON of its non-tensor fields as uint8 bytes."""
    state = {"quant_type": quant_type, "blocksize": int(blocksize), "dtype": dtype, "shape": [int(s) for s in shape]}
    if offset is not None:
        state.update(nested_blocksize=DOUBLE_QUANT_BLOCKSIZE, nested_dtype="float32", nested_offset=float(offset))
    return np.frombuffer(json.dumps(state).encode("utf-8"), dtype=np.uint8).copy()  # (len,) uint8


def _bnb_modules(model, layers: dict, settings: tuple, dtype: str) -> dict:
    """Every block matrix in bitsandbytes' serialized 4-bit layout (see the module docstring)."""
    blocksize, quant_type, double_quant = settings
    C, out = model.config.n_embd, {}
    for i in range(model.config.n_layer):
        for hf_module, parts in MODULE_TARGETS.items():
            key = f"transformer.h.{i}.{hf_module}"
            paths = [t.path(i) for t in parts]
            qs = [_quantized(layers[p], p, blocksize, quant_type, double_quant) for p in paths]
            fused = fused_4bit(qs, key)
            shape = module_shape(hf_module, C)
            w = key + ".weight"
            out[w] = fused["packed"].reshape(-1, 1)  # (n / 2,) -> (n / 2, 1), bitsandbytes' storage shape
            out[w + ".quant_map"] = np.asarray(CODES[quant_type], dtype=np.float32)  # (16,)
            if double_quant:
                out[w + ".absmax"] = fused["qabsmax"].astype(np.uint8)  # (nblocks,) 8-bit codes
                out[w + ".nested_absmax"] = fused["absmax2"].astype(np.float32)  # (ceil(nblocks / 256),)
                out[w + ".nested_quant_map"] = np.asarray(DYNAMIC_MAP, dtype=np.float32)  # (256,)
            else:
                out[w + ".absmax"] = fused["absmax"]  # (nblocks,) float32
            out[w + ".quant_state.bitsandbytes__" + quant_type] = _quant_state_bytes(
                quant_type, qs[0].blocksize, dtype, shape, fused.get("offset"))  # (len,) uint8
            out[key + ".bias"] = np.concatenate(
                [_bias(layers[p], layers[p].out_features, dtype) for p in paths]).astype(dtype)  # (out,)
    return out


# ---------------------------------------------------------------- out: the folder
def hf_gpt2_config_dict(config: GPTConfig, dtype: str = "float32", quantization_config: dict | None = None) -> dict:
    """A ``config.json`` that ``transformers.GPT2Config`` reads for our GPTConfig.

    Our one dropout rate goes to GPT-2's three (embd, attn, resid). GPT-2's token ids 50256 exist
    only in its own vocabulary, so a smaller one gets no bos / eos ids.
    """
    special = 50256 if config.vocab_size > 50256 else None
    out = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_embd": config.n_embd,
        "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "embd_pdrop": config.dropout, "attn_pdrop": config.dropout, "resid_pdrop": config.dropout,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "use_cache": True, "bos_token_id": special, "eos_token_id": special,
        "pad_token_id": None, "dtype": dtype,
    }
    if quantization_config is not None:
        out["quantization_config"] = quantization_config
    return out


def save_hf_gpt2(model: GPT, directory: str, base_only: bool = False, dequantize: bool = False) -> None:
    """Write ``config.json`` + ``model.safetensors`` that ``GPT2LMHeadModel.from_pretrained(directory)`` loads.

    - float weights for a plain or merged model;
    - unmerged adapters: ValueError unless ``base_only=True`` (then the frozen base is written);
    - NF4 bases (QLoRA): bitsandbytes' 4-bit layout and a ``quantization_config``, loaded back as
      ``bnb.nn.Linear4bit`` layers (float block matrices are quantized alongside, see above);
    - group-wise bases (QA-LoRA): ValueError unless ``dequantize=True``, which writes every
      quantized base (NF4 too) as its dequantized float weight.

    Every check runs before anything is written; the folder is written all or nothing
    (``files.write_folder``: an existing folder is replaced whole, its other files kept). The files
    carry no checksum of ours: transformers writes and reads this layout and knows nothing of it.
    """
    from safetensors.numpy import save_file

    if directory == "":
        raise ValueError("empty path: give the name of the folder to write")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"{directory} exists and is not a directory")
    layers = frozen_layers(model, base_only)
    grouped = [p for p, layer in layers.items() if isinstance(layer, GroupwiseLinear)]
    if grouped and not dequantize:
        raise ValueError(f"{grouped[0]} is group-wise quantized (QA-LoRA): transformers reads no group-wise INT-N "
                         "format with our codes, scales and zero points, so it cannot be written as such; pass "
                         "dequantize=True to write the dequantized float weights")
    dtype = str(model.wte.weight.data.dtype)  # the array's own dtype: no copy to the host
    tensors = _shared_tensors(model)
    has_nf4 = any(isinstance(layer, NF4Linear) for layer in layers.values())
    qconfig = None
    if has_nf4 and not dequantize:
        settings = _nf4_settings(layers)
        tensors.update(_bnb_modules(model, layers, settings, dtype))
        qconfig = dict(QUANTIZATION_CONFIG, bnb_4bit_quant_type=settings[1], bnb_4bit_use_double_quant=settings[2])
    else:
        tensors.update(_float_modules(model, layers, dequantize))
    tensors = host_tensors(tensors, "refusing to save")  # same shapes, C order for safetensors
    config = hf_gpt2_config_dict(model.config, dtype, qconfig)
    write_folder(directory, {WEIGHTS_NAME: lambda path: save_file(tensors, path, metadata={"format": "pt"}),
                             CONFIG_NAME: json_writer(config, indent=2)}, prefix=".tmp-hf-")
