"""LoRA adapters in Hugging Face PEFT's file layout (LoRA, Hu et al., 2021, section 4.1: only A and B
are stored per task; the base model is shared).

A PEFT LoRA adapter is a folder with two files:

- ``adapter_config.json``: ``peft_type`` "LORA", the default rank ``r`` and
  ``lora_alpha``, per-module ``rank_pattern`` / ``alpha_pattern``,
  ``use_rslora`` (s = alpha / sqrt(r) instead of alpha / r), ``target_modules``
  and ``fan_in_fan_out``;
- ``adapter_model.safetensors``: for each adapted module of the Hugging Face
  model, ``base_model.model.<module>.lora_A.weight`` of shape (r, in) and
  ``base_model.model.<module>.lora_B.weight`` of shape (out, r).

GPT-2 keeps its linear layers as ``Conv1D`` with weights (in, out), so PEFT
sets ``fan_in_fan_out`` for them; that flag only tells PEFT how to add B A
to the stored base weight when merging: A and B themselves are (r, in) and
(out, r) either way, the orientation this package uses. We write it as true.

GPT-2 fuses Wq, Wk, Wv into one ``c_attn`` (C -> 3C); this package keeps them
separate. The two describe the same function exactly:

- saving: the adapters of q, k, v (ranks r_q, r_k, r_v; those not adapted are
  left out) become one adapter of rank R = r_q + r_k + r_v on ``c_attn`` with
  A = [A_q; A_k; A_v] stacked (R, C) and B block-structured (3C, R): rows
  0..C of B hold B_q in the columns of A_q and zeros elsewhere, and so on.
  Then B A = [B_q A_q; B_k A_k; B_v A_v], each block of the fused output is
  the separate layer's update. ``rank_pattern`` / ``alpha_pattern`` give
  c_attn rank R and an alpha with alpha / R (or alpha / sqrt(R)) equal to
  the layers' scaling s, so nothing is rescaled. (Should q, k, v have
  different scalings, each block of B is multiplied by s_i / s.) The split is
  also noted in the safetensors metadata so that our loader can restore the
  separate ranks.
- loading a fused adapter of rank R without that note: each of q, k, v gets
  A (a copy, rank R) and its row block of B; x A^T B_i^T is exactly block i
  of x A^T B^T.

The attention output projection and the MLP down projection are both named
``c_proj`` in GPT-2 (``attn.c_proj`` = our ``o``, ``mlp.c_proj`` = our
``proj``), so modules are always written with their full names.

``load_peft_adapter`` adds LoRA layers where the file has adapters and the
model has none (and freezes all else, as ``apply_lora``); layers that
already have one must have the file's rank. Adapted layers the file does not
mention keep their adapters: load into a fresh base model to reproduce a PEFT
model exactly. Everything is read and checked before the model changes.

Files are written to a temporary folder beside the target and moved into
place by rename, so a crash never leaves a half-written adapter.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter

import numpy as np

from .backend import like, to_numpy
from .lora import LoRALinear, apply_lora, lora_layers, lora_scaling

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
SPLIT_KEY = "lora_from_scratch.c_attn_split"
# our layer -> (GPT-2 module suffix, in-width factor, out-width factor) in units of n_embd
_HF_MODULE = {"o": ("attn.c_proj", 1, 1), "fc": ("mlp.c_fc", 1, 4), "proj": ("mlp.c_proj", 4, 1)}
_HF_SHAPES = {"attn.c_attn": (1, 3), "attn.c_proj": (1, 1), "mlp.c_fc": (1, 4), "mlp.c_proj": (4, 1)}
_OURS = {"attn.c_proj": "attn.o", "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}
_OUR_LAYER = re.compile(r"^blocks\.(\d+)\.(?:attn\.(q|k|v|o)|mlp\.(fc|proj))$")
_KEY = re.compile(r"^base_model\.model\.(transformer\.h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj))"
                  r"\.lora_([AB])\.weight$")


def _denominator(r: int, use_rslora: bool) -> float:
    return math.sqrt(r) if use_rslora else float(r)


def _clean(x: float):
    """An alpha for JSON: an int when it is one (PEFT's configs usually hold ints)."""
    return int(x) if float(x).is_integer() else float(x)


# -------------------------------------------------------------------- saving
def _fused_modules(model) -> dict:
    """GPT-2 module name -> (A (R, in), B (out, R), scaling, split) for every adapted layer of ``model``."""
    C = model.config.n_embd
    groups: dict[str, dict] = {}
    for name, layer in lora_layers(model).items():
        m = _OUR_LAYER.match(name)
        if m is None:
            raise ValueError(f"LoRA layer {name!r} has no counterpart in GPT-2's module names")
        i, which = int(m.group(1)), m.group(2) or m.group(3)
        if which in "qkv":
            groups.setdefault(f"transformer.h.{i}.attn.c_attn", {})[which] = layer
        else:
            groups[f"transformer.h.{i}.{_HF_MODULE[which][0]}"] = {which: layer}
    out = {}
    for module, parts in sorted(groups.items()):
        if module.endswith("c_attn"):
            names = [n for n in "qkv" if n in parts]
            s = parts[names[0]].scaling
            R = sum(parts[n].r for n in names)
            A = np.concatenate([to_numpy(parts[n].lora_A.data) for n in names], axis=0)  # (R, C) stacked
            B = np.zeros((3 * C, R), dtype=A.dtype)  # (3C, R), block-structured
            split, col = {}, 0
            for n in names:
                layer, j = parts[n], "qkv".index(n)
                Bn = to_numpy(layer.lora_B.data)  # (C, r_n)
                if layer.scaling != s:
                    Bn = Bn * (layer.scaling / s)  # (C, r_n), fold the different scaling into B
                B[j * C:(j + 1) * C, col:col + layer.r] = Bn  # (C, r_n) into rows of n, columns of A_n
                split[n] = [col, col + layer.r]
                col += layer.r
            out[module] = (A, B, s, split)
        else:
            (layer,) = parts.values()
            A, B = to_numpy(layer.lora_A.data), to_numpy(layer.lora_B.data)  # (r, in), (out, r)
            out[module] = (A, B, layer.scaling, None)
    return out


def save_peft_adapter(model, directory: str) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` for a GPT with LoRA layers.

    ``peft.PeftModel.from_pretrained(GPT2LMHeadModel holding the same base weights, directory)``
    then computes the same logits. With ``init="pissa"`` the base weights to use are the residual
    ones now held by the layers (``layer.base.weight``), not the original W0.
    """
    from safetensors.numpy import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save (call apply_lora first)")
    first = next(iter(layers.values()))
    use_rslora = first.use_rslora
    modules = _fused_modules(model)
    tensors, ranks, alphas, splits = {}, {}, {}, {}
    for module, (A, B, s, split) in modules.items():
        for tag, arr in (("A", A), ("B", B)):
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"refusing to save: the lora_{tag} of {module} holds NaN or inf")
        tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(A)  # (R, in)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(B)  # (out, R)
        R = A.shape[0]
        ranks[module] = R
        alphas[module] = _clean(s * _denominator(R, use_rslora))  # alpha with alpha / R (or sqrt R) = s
        if split is not None:
            splits[module] = split
    r_default = Counter(ranks.values()).most_common(1)[0][0]
    a_default = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": r_default,
        "lora_alpha": a_default,
        "rank_pattern": {k: v for k, v in ranks.items() if v != r_default},
        "alpha_pattern": {k: v for k, v in alphas.items() if v != a_default},
        "use_rslora": use_rslora,
        "target_modules": sorted(modules),
        "fan_in_fan_out": True,
        "lora_dropout": float(first.dropout.p),
        "bias": "none",
        "lora_bias": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }
    metadata = {"format": "pt", SPLIT_KEY: json.dumps(splits)}
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-adapter-", dir=parent)
    try:
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata=metadata)
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        if not os.path.exists(directory):
            os.replace(tmp, directory)  # the whole folder appears at once
        else:
            for name in (WEIGHTS_NAME, CONFIG_NAME):  # each file replaced at once
                os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)


# -------------------------------------------------------------------- loading
def _pattern_value(pattern: dict, module: str, default):
    """PEFT's rule: the first key k with ``re.match(rf"(.*\\.)?({k})$", module)`` wins."""
    for k, v in (pattern or {}).items():
        if re.match(rf"(.*\.)?({k})$", module):
            return v
    return default


def _check_config(config: dict, path: str) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not 'LORA'")
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag):
            raise ValueError(f"{path}: {flag}=true is not supported (plain LoRA only)")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={config.get('bias')!r} is not supported (only 'none')")
    for field in ("modules_to_save", "target_parameters", "trainable_token_indices"):
        if config.get(field):
            raise ValueError(f"{path}: {field}={config.get(field)!r} is not supported")


def _read(directory: str):
    from safetensors import safe_open

    cpath, wpath = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    for p in (cpath, wpath):
        if not os.path.exists(p):
            raise FileNotFoundError(f"no {os.path.basename(p)} in {directory}")
    with open(cpath) as f:
        config = json.load(f)
    _check_config(config, cpath)
    with safe_open(wpath, framework="numpy") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return config, tensors, metadata


def _plan(model, config: dict, tensors: dict, metadata: dict) -> list:
    """Check every tensor; return [(our layer path, A, B, rank, alpha)] without touching the model."""
    C, n_layer = model.config.n_embd, model.config.n_layer
    use_rslora = bool(config.get("use_rslora", False))
    pairs: dict[str, dict] = {}
    for key, arr in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"unexpected key {key!r} in the adapter (expected GPT-2 lora_A / lora_B weights)")
        module, i, kind, ab = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        if i >= n_layer:
            raise ValueError(f"{key}: block {i} does not exist; the model has {n_layer} blocks")
        pairs.setdefault(module, {"i": i, "kind": kind})[ab] = (key, np.asarray(arr))  # (r, in) or (out, r)
    if not pairs:
        raise ValueError("the adapter holds no lora_A / lora_B weights")
    try:
        splits = json.loads(metadata.get(SPLIT_KEY, "{}"))
    except json.JSONDecodeError:
        splits = {}
    if not isinstance(splits, dict):
        splits = {}
    plan = []
    for module, p in sorted(pairs.items()):
        for ab in "AB":
            if ab not in p:
                raise ValueError(f"adapter for {module} has no lora_{ab} weight")
        (ka, A), (kb, B) = p["A"], p["B"]
        fin, fout = _HF_SHAPES[p["kind"]]
        rank = int(_pattern_value(config.get("rank_pattern"), module, config.get("r", 8)))
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
        if A.ndim != 2 or A.shape[1] != fin * C:
            raise ValueError(f"{ka}: adapter has shape {tuple(A.shape)}, model expects {(A.shape[0], fin * C)}")
        if tuple(B.shape) != (fout * C, A.shape[0]):
            raise ValueError(f"{kb}: adapter has shape {tuple(B.shape)}, model expects {(fout * C, A.shape[0])}")
        if A.shape[0] != rank:
            raise ValueError(f"{ka}: adapter has shape {tuple(A.shape)}, but adapter_config.json gives {module} "
                             f"rank {rank}, i.e. shape {(rank, fin * C)}")
        for key, arr in ((ka, A), (kb, B)):
            if arr.dtype.kind != "f" or not np.all(np.isfinite(arr)):
                raise ValueError(f"{key}: expected finite floating-point values (dtype {arr.dtype})")
        s = lora_scaling(rank, alpha, use_rslora)
        i = p["i"]
        if p["kind"] != "attn.c_attn":
            plan.append((f"blocks.{i}.{_OURS[p['kind']]}", ka, A, B, rank, alpha))
            continue
        split = _valid_split(splits.get(module), B, C, rank)
        for j, n in enumerate("qkv"):
            Bn = B[j * C:(j + 1) * C]  # (C, R): the rows of the fused output that belong to n
            if split is None:
                plan.append((f"blocks.{i}.attn.{n}", ka, A, Bn, rank, alpha))
            elif n in split:
                a, b = split[n]
                rn = b - a
                alpha_n = s * _denominator(rn, use_rslora)  # keeps scaling s at rank rn
                plan.append((f"blocks.{i}.attn.{n}", ka, A[a:b], Bn[:, a:b], rn, alpha_n))
    return plan


def _valid_split(split, B, C: int, R: int):
    """The q/k/v column ranges noted by ``save_peft_adapter``, if B really is block-structured that way."""
    if not isinstance(split, dict) or not split or any(n not in ("q", "k", "v") for n in split):
        return None
    used = np.zeros(R, dtype=bool)  # (R,) columns claimed by q, k or v
    for cols in split.values():
        if not (isinstance(cols, list) and len(cols) == 2 and all(type(c) is int for c in cols)
                and 0 <= cols[0] < cols[1] <= R):
            return None
        if used[cols[0]:cols[1]].any():  # two matrices claiming the same columns
            return None
        used[cols[0]:cols[1]] = True
    if not used.all():
        return None
    for j, n in enumerate("qkv"):
        rows = B[j * C:(j + 1) * C]  # (C, R)
        keep = np.zeros(R, dtype=bool)  # (R,) the columns that belong to n
        if n in split:
            keep[split[n][0]:split[n][1]] = True
        if np.any(rows[:, ~keep] != 0):  # something outside the block: fall back to the exact full split
            return None
    return {n: tuple(v) for n, v in split.items()}


def _get_layer(model, path: str):
    obj = model
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def load_peft_adapter(model, directory: str):
    """Load a PEFT LoRA adapter for GPT-2 (saved by PEFT or by ``save_peft_adapter``) into our GPT.

    Adds LoRA layers (``apply_lora``) where the file has an adapter and the model none; an
    existing LoRA layer must have the file's rank and must not be merged. Sets each layer's
    alpha and rsLoRA flag from the config, so s is PEFT's. Any key or shape that does not fit
    raises ValueError naming the key and both shapes; then nothing has changed. Returns the model.
    """
    config, tensors, metadata = _read(directory)
    plan = _plan(model, config, tensors, metadata)
    use_rslora = bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    for path, key, A, _, rank, _ in plan:
        layer = _get_layer(model, path)
        if isinstance(layer, LoRALinear):
            if layer.merged:
                raise ValueError(f"{path} is merged; unmerge it before loading {key}")
            if layer.lora_A.shape != tuple(A.shape):
                raise ValueError(f"{key}: adapter has shape {tuple(A.shape)}, but {path}.lora_A has shape "
                                 f"{layer.lora_A.shape}")
        elif rank > min(layer.in_features, layer.out_features):
            raise ValueError(f"{key}: adapter has shape {tuple(A.shape)}; rank {rank} exceeds "
                             f"min(in, out) = {min(layer.in_features, layer.out_features)} of {path}")
    for path, _, A, B, rank, alpha in plan:
        layer = _get_layer(model, path)
        if not isinstance(layer, LoRALinear):
            i, name = path.split(".")[1], path.split(".")[-1]
            apply_lora(model, rank, alpha, [f"blocks.{i}.{name}"], dropout=dropout, use_rslora=use_rslora,
                       seed=0)
            layer = _get_layer(model, path)
        layer.alpha, layer.use_rslora = float(alpha), use_rslora
        layer.lora_A.data = like(layer.lora_A.data, A).astype(layer.lora_A.dtype)  # (r, in)
        layer.lora_B.data = like(layer.lora_B.data, B).astype(layer.lora_B.dtype)  # (out, r)
        layer.lora_A.grad = layer.lora_B.grad = None
    return model
