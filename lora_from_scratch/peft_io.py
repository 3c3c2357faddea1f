"""LoRA adapters in Hugging Face PEFT's file layout (LoRA, Hu et al., 2021, section 4.1: only A and B
are stored per task; the base model is shared), for LoRA, QLoRA and QA-LoRA models.

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

Which of our matrices is which GPT-2 module comes from ``adapter.TARGET_TABLE``.
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

The three adapter kinds:

- LoRA (``lora.LoRALinear``) and QLoRA (``qlora.QLoRALinear``): a QLoRA adapter *is* a LoRA
  adapter (QLoRA, Dettmers et al., 2023, eq. 5: only the base is stored in NF4), written and
  read the same way. PEFT computes the same logits over a base that holds the same weights: the
  float W0 (``hf_io.save_hf_gpt2(model, dir, base_only=True)``), or for QLoRA the NF4 base in
  bitsandbytes' 4-bit layout (the same call writes it), loaded as ``bnb.nn.Linear4bit``.
- QA-LoRA (``qalora.QALoRALinear``, Xu et al., 2023, section 3.3): its adapter sees the input
  mean-pooled over groups of ``group_size`` channels, with A of shape (r, L), L = in / group_size.
  PEFT has no pooled adapter, but pooling is linear, so the plain LoRA factor

      A_full[:, i] = A[:, g(i)] / group_size          (r, in),  g(i) = i // group_size

  gives x A_full^T = sum_i x_i A[:, g(i)] / group_size = pool(x) A^T exactly (and with dropout,
  pool(dropout(x)) A^T = dropout(x) A_full^T). ``save_peft_adapter`` writes A_full and the same B
  and scaling; PEFT then reproduces our logits over a base holding the dequantized group-wise
  weights (``hf_io.save_hf_gpt2(model, dir, base_only=True, dequantize=True)``). Reading back,
  an A whose columns are constant within each group folds back, A = A_full[:, ::group_size] *
  group_size (bit for bit when group_size is a power of two); any other A (a PEFT-trained one)
  cannot be expressed by a pooled adapter and is refused with a ValueError.

``load_peft_adapter`` loads into the active adapter of existing adapted layers (same rank
required; a merged layer is refused: new A, B would leave the old update inside W), and where
the model has a plain layer it adds an adapter of the matching kind (``Linear`` -> LoRA,
``NF4Linear`` -> QLoRA, ``GroupwiseLinear`` -> QA-LoRA), freezing all else as ``apply_lora``.
Every created adapter draws its own dropout seed from one generator, so no two layers share a
mask stream. Adapted layers the file does not mention keep their adapters: load into a fresh
base model to reproduce a PEFT model exactly. Everything is read and checked before the model
changes.

Files are written to a temporary folder beside the target and swapped in whole
(``files.write_folder``), so a crash never leaves a half-written adapter, nor new
weights beside an old config. Every field of ``adapter_config.json`` is checked
before any weight is read (``files.validate_peft_config``): the same checks for a
plain model and for one that already has adapters. The files carry no checksum of
ours: PEFT writes and reads this layout and knows nothing of it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter

import numpy as np

from .adapter import (
    FUSED,
    HF_MODULES,
    AdaptedLinear,
    LoRALinear,
    check_adapter_args,
    lora_layers,
    lora_scaling,
    mark_only_lora_as_trainable,
    parse_path,
)
from .backend import global_rng, like_of, to_numpy
from .backend import rng as host_rng
from .files import (
    FileFormatError,
    check_values,
    host_tensors,
    json_writer,
    read_json_object,
    read_safetensors,
    validate_peft_config,
    write_folder,
)
from .hf_io import MODULE_TARGETS, module_shape, target_rows
from .lora import _adapter_of
from .nn import Linear
from .qalora import GroupwiseLinear, QALoRALinear
from .qlora import NF4Linear, QLoRALinear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
SPLIT_KEY = "lora_from_scratch.c_attn_split"
_MODULE = re.compile(r"^transformer\.h\.(\d+)\.(" + "|".join(re.escape(m) for m in HF_MODULES) + r")$")


def _denominator(r: int, use_rslora: bool) -> float:
    return math.sqrt(r) if use_rslora else float(r)


def _clean(x: float):
    """An alpha for JSON: an int when it is one (PEFT's configs usually hold ints)."""
    return int(x) if float(x).is_integer() else float(x)


# -------------------------------------------------------------------- QA-LoRA <-> plain LoRA factors
def expand_pooled_A(A: np.ndarray, group_size: int) -> np.ndarray:
    """A_full (r, L * group_size) with x A_full^T = pool(x) A^T: each column of A / group_size, repeated."""
    return np.repeat(A / A.dtype.type(group_size), group_size, axis=1)  # (r, L) -> (r, L * group_size)


def fold_pooled_A(A_full: np.ndarray, group_size: int, key: str) -> np.ndarray:
    """The inverse of ``expand_pooled_A``: (r, in) -> (r, in / group_size); ValueError unless it is one."""
    r, k = A_full.shape
    if k % group_size:
        raise ValueError(f"{key}: A has {k} columns, not a multiple of the QA-LoRA group size {group_size}")
    grouped = A_full.reshape(r, k // group_size, group_size)  # (r, in) -> (r, L, group_size)
    if not np.all(grouped == grouped[:, :, :1]):
        raise ValueError(f"{key}: this A varies within groups of {group_size} input channels, so no QA-LoRA "
                         "adapter (which sees only the group means of x) computes it; load it into a LoRA or "
                         "QLoRA model instead")
    return grouped[:, :, 0] * A_full.dtype.type(group_size)  # (r, L)


# -------------------------------------------------------------------- saving
def _plain_factors(path: str, layer: AdaptedLinear, adapter: str | None):
    """(A (r, in), B (out, r), scaling, adapter) of one layer as plain LoRA factors (QA-LoRA's A expanded)."""
    if layer.merged:
        raise ValueError(f"{path} is merged (its base holds W0 + s B A); unmerge_lora before saving its adapter, "
                         "or the update would be applied twice")
    a = _adapter_of(path, layer, adapter)
    A, B = to_numpy(a.A.data), to_numpy(a.B.data)  # (r, k'), (out, r)
    if a.group_size:
        A = expand_pooled_A(A, a.group_size)  # (r, L) -> (r, in)
    return A, B, a.scaling, a


def _fused_modules(model, adapter: str | None) -> tuple[dict, list]:
    """GPT-2 module name -> (A (R, in), B (out, R), scaling, split) for every adapted layer; and the adapters."""
    C = model.config.n_embd
    groups: dict[str, dict] = {}
    for path, layer in lora_layers(model).items():
        try:
            i, target = parse_path(path)
        except ValueError:
            raise ValueError(f"adapted layer {path!r} has no counterpart in GPT-2's module names") from None
        groups.setdefault(target.hf_path(i), {})[target.name] = _plain_factors(path, layer, adapter)
    out, adapters = {}, []
    for module, parts in sorted(groups.items()):
        hf_module = module.split(".", 3)[3]  # "transformer.h.0.attn.c_attn" -> "attn.c_attn"
        names = [t.name for t in MODULE_TARGETS[hf_module] if t.name in parts]
        adapters += [parts[n][3] for n in names]
        if len(MODULE_TARGETS[hf_module]) == 1:
            A, B, s, _ = parts[names[0]]
            out[module] = (A, B, s, None)
            continue
        s = parts[names[0]][2]
        A = np.concatenate([parts[n][0] for n in names], axis=0)  # (R, C) stacked
        out_f, _ = module_shape(hf_module, C)
        B = np.zeros((out_f, A.shape[0]), dtype=A.dtype)  # (3C, R), block-structured
        split, col = {}, 0
        targets = {t.name: t for t in MODULE_TARGETS[hf_module]}
        for n in names:
            _, Bn, sn, _ = parts[n]  # Bn (C, r_n)
            r_n = Bn.shape[1]
            if sn != s:
                Bn = Bn * (sn / s)  # (C, r_n), fold the different scaling into B
            B[target_rows(targets[n], C), col:col + r_n] = Bn  # (C, r_n) into rows of n, columns of A_n
            split[n] = [col, col + r_n]
            col += r_n
        out[module] = (A, B, s, split)
    return out, adapters


def save_peft_adapter(model, directory: str, adapter: str | None = None) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` for a GPT with LoRA, QLoRA or QA-LoRA layers.

    ``adapter``: which adapter of each layer (default: the active one). ``peft.PeftModel.from_pretrained(
    GPT2LMHeadModel holding the same base weights, directory)`` then computes the same logits; the
    base is what ``hf_io.save_hf_gpt2(model, dir, base_only=True)`` writes (QA-LoRA: with
    ``dequantize=True``). With ``init="pissa"`` the base weights are the residual ones now held by
    the layers. A QA-LoRA adapter is written as the equivalent plain factors (module docstring).
    A merged layer or one without an active adapter is refused (ValueError).
    """
    from safetensors.numpy import save_file

    if not lora_layers(model):
        raise ValueError("the model has no LoRA layers to save (use apply_lora, qlora.apply_qlora or "
                         "qalora.apply_qalora first)")
    modules, adapters = _fused_modules(model, adapter)
    use_rslora = adapters[0].use_rslora  # one flag per file; each module's alpha still gives its own scaling
    factors, ranks, alphas, splits = {}, {}, {}, {}
    for module, (A, B, s, split) in modules.items():
        factors[f"{PREFIX}{module}.lora_A.weight"] = A  # (R, in)
        factors[f"{PREFIX}{module}.lora_B.weight"] = B  # (out, R)
        R = A.shape[0]
        ranks[module] = R
        alphas[module] = _clean(s * _denominator(R, use_rslora))  # alpha with alpha / R (or sqrt R) = s
        if split is not None:
            splits[module] = split
    tensors = host_tensors(factors, "refusing to save the PEFT adapter")  # (R, in), (out, R), C order
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
        "lora_dropout": float(adapters[0].dropout.p),
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
    write_folder(directory, {WEIGHTS_NAME: lambda path: save_file(tensors, path, metadata=metadata),
                             CONFIG_NAME: json_writer(config, indent=2)}, prefix=".tmp-adapter-")


# -------------------------------------------------------------------- loading
def _pattern_value(pattern: dict, module: str, default):
    """PEFT's rule: the first key k with ``re.match(rf"(.*\\.)?({k})$", module)`` wins."""
    for k, v in (pattern or {}).items():
        if re.match(rf"(.*\.)?({k})$", module):
            return v
    return default


def _read(directory: str):
    """(checked config with PEFT's defaults, tensors, metadata) of a PEFT adapter folder; errors name the file."""
    cpath, wpath = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    for p in (cpath, wpath):
        if not os.path.exists(p):
            raise FileNotFoundError(f"no {os.path.basename(p)} in {directory}")
    config = validate_peft_config(read_json_object(cpath), cpath)
    tensors, metadata = read_safetensors(wpath)  # ValueError naming the file if it is truncated or corrupt
    return config, tensors, metadata


def _parse_key(key: str):
    """(module, block, GPT-2 module, "A" or "B") of ``base_model.model.transformer.h.{i}.<module>.lora_X.weight``."""
    for ab in "AB":
        suffix = f".lora_{ab}.weight"
        if key.startswith(PREFIX) and key.endswith(suffix):
            m = _MODULE.match(key[len(PREFIX):-len(suffix)])
            if m is not None:
                return m.group(0), int(m.group(1)), m.group(2), ab
    raise ValueError(f"unexpected key {key!r} in the adapter (expected GPT-2 lora_A / lora_B weights of "
                     f"{list(HF_MODULES)})")


def _plan(model, config: dict, tensors: dict, metadata: dict) -> list:
    """Check every tensor against the checked ``config``; return [(our layer path, key, A, B, rank, alpha)].

    The model is not touched."""
    C, n_layer = model.config.n_embd, model.config.n_layer
    use_rslora = config["use_rslora"]
    pairs: dict[str, dict] = {}
    for key, arr in tensors.items():
        module, i, hf_module, ab = _parse_key(key)
        if i >= n_layer:
            raise ValueError(f"{key}: block {i} does not exist; the model has {n_layer} blocks")
        pairs.setdefault(module, {"i": i, "hf_module": hf_module})[ab] = (key, np.asarray(arr))  # (r, in) | (out, r)
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
        out_f, in_f = module_shape(p["hf_module"], C)
        rank = int(_pattern_value(config["rank_pattern"], module, config["r"]))
        alpha = float(_pattern_value(config["alpha_pattern"], module, config["lora_alpha"]))
        if A.ndim != 2 or A.shape[1] != in_f:
            raise ValueError(f"{ka}: adapter has shape {tuple(A.shape)}, model expects {(A.shape[0], in_f)}")
        if tuple(B.shape) != (out_f, A.shape[0]):
            raise ValueError(f"{kb}: adapter has shape {tuple(B.shape)}, model expects {(out_f, A.shape[0])}")
        if A.shape[0] != rank:
            raise ValueError(f"{ka}: adapter has shape {tuple(A.shape)}, but adapter_config.json gives {module} "
                             f"rank {rank}, i.e. shape {(rank, in_f)}")
        s = lora_scaling(rank, alpha, use_rslora)
        i, targets = p["i"], MODULE_TARGETS[p["hf_module"]]
        if len(targets) == 1:
            plan.append((targets[0].path(i), ka, A, B, rank, alpha))
            continue
        split = _valid_split(splits.get(module), B, C, rank)
        for t in targets:
            Bn = B[target_rows(t, C)]  # (C, R): the rows of the fused output that belong to t
            if split is None:
                plan.append((t.path(i), ka, A, Bn, rank, alpha))
            elif t.name in split:
                a, b = split[t.name]
                rn = b - a
                alpha_n = s * _denominator(rn, use_rslora)  # keeps scaling s at rank rn
                plan.append((t.path(i), ka, A[a:b], Bn[:, a:b], rn, alpha_n))  # (rn, C), (C, rn)
    return plan


def _valid_split(split, B, C: int, R: int):
    """The q/k/v column ranges noted by ``save_peft_adapter``, if B really is block-structured that way."""
    if not isinstance(split, dict) or not split or any(n not in FUSED for n in split):
        return None
    used = np.zeros(R, dtype=bool)  # (R,) columns claimed by q, k or v
    for cols in split.values():
        if not (isinstance(cols, list) and len(cols) == 2 and all(type(c) is int for c in cols)
                and 0 <= cols[0] < cols[1] <= R):
            return None
        if used[cols[0]:cols[1]].any():  # two matrices claiming the same columns
            return None
        used[cols[0]:cols[1]] = True  # (R,) mark this matrix's columns
    if not used.all():
        return None
    for t in MODULE_TARGETS["attn.c_attn"]:
        rows = B[target_rows(t, C)]  # (C, R)
        keep = np.zeros(R, dtype=bool)  # (R,) the columns that belong to t
        if t.name in split:
            keep[split[t.name][0]:split[t.name][1]] = True  # (R,)
        if np.any(rows[:, ~keep] != 0):  # something outside the block: fall back to the exact full split
            return None
    return {n: tuple(v) for n, v in split.items()}


def _target_A(layer, path: str, key: str, A: np.ndarray) -> np.ndarray:
    """The A that the layer (existing or about to be made) holds for the file's A: QA-LoRA's folded."""
    if isinstance(layer, AdaptedLinear):
        if layer.merged:
            raise ValueError(f"{path} is merged (its base holds W0 + s B A); unmerge_lora before loading {key}, "
                             "or the old update would stay inside W")
        if layer.active is None:
            raise ValueError(f"{path} has no active adapter (adapters are disabled) to load {key} into")
    elif not isinstance(layer, (Linear, NF4Linear, GroupwiseLinear)):
        raise ValueError(f"{key}: {path} is a {type(layer).__name__}, which cannot take a LoRA adapter")
    if isinstance(layer, (QALoRALinear, GroupwiseLinear)):  # a pooled adapter: A must fold back
        A = fold_pooled_A(A, layer.group_size, key)  # (r, in) -> (r, in / group_size)
    if isinstance(layer, AdaptedLinear) and layer.lora_A.shape != tuple(A.shape):
        raise ValueError(f"{key}: adapter has shape {tuple(A.shape)}, but {path}.lora_A has shape "
                         f"{layer.lora_A.shape}")
    return A


def _new_layer(base, rank: int, alpha: float, dropout: float, use_rslora: bool, rng):
    """An adapted layer of the kind that fits ``base``: LoRA (Linear), QLoRA (NF4Linear), QA-LoRA (GroupwiseLinear)."""
    if isinstance(base, NF4Linear):
        return QLoRALinear(base, rank, alpha, dropout=dropout, use_rslora=use_rslora, rng=rng)
    if isinstance(base, GroupwiseLinear):
        return QALoRALinear(base, rank, alpha, bits=base.bits, group_size=base.group_size, dropout=dropout,
                            use_rslora=use_rslora, rng=rng)
    return LoRALinear(base, rank, alpha, dropout=dropout, use_rslora=use_rslora, rng=rng)


def load_peft_adapter(model, directory: str, seed: int | None = None):
    """Load a PEFT LoRA adapter for GPT-2 (saved by PEFT or by ``save_peft_adapter``) into our GPT.

    Existing adapted layers (LoRA, QLoRA; QA-LoRA when A is constant within each group) take the
    file's A and B into their active adapter, which must have the file's rank and must not be
    merged. Plain layers get a new adapter of the matching kind (see the module docstring), whose
    dropout (the file's ``lora_dropout``) draws its own seed from one generator: ``seed``, or
    ``backend.global_rng()``. Each loaded adapter takes alpha and the rsLoRA flag from the config,
    so s is PEFT's. Any key or shape that does not fit raises ValueError naming the key and both
    shapes; then nothing has changed. Returns the model.
    """
    config, tensors, metadata = _read(directory)
    check_values(tensors, os.path.join(directory, WEIGHTS_NAME), floats_only=True)
    try:
        plan = _plan(model, config, tensors, metadata)
    except ValueError as e:
        raise FileFormatError(os.path.join(directory, WEIGHTS_NAME), str(e)) from None
    use_rslora, dropout = config["use_rslora"], config["lora_dropout"]
    checked = []
    for path, key, A, B, rank, alpha in plan:
        layer = model.get_submodule(path)
        A_held = _target_A(layer, path, key, A)  # (r, k'): folded for QA-LoRA
        pooled = isinstance(layer, (GroupwiseLinear, QALoRALinear))  # a pooled adapter's rank may exceed in / group
        try:  # the same checks for a new adapter and for one loaded into an existing adapted layer
            check_adapter_args(rank, alpha, dropout, "kaiming", (layer.out_features, layer.in_features), pooled=pooled)
        except ValueError as e:
            raise ValueError(f"{key}: adapter has shape {tuple(A.shape)}; {path}: {e}") from None
        checked.append((path, layer, A_held, B, rank, alpha))
    rng = host_rng(seed) if seed is not None else global_rng()
    created = False
    for path, layer, A, B, rank, alpha in checked:
        if not isinstance(layer, AdaptedLinear):
            layer = _new_layer(layer, rank, alpha, dropout, use_rslora, rng)  # one generator: own dropout seeds
            model.set_submodule(path, layer)
            created = True
        a = layer.adapter
        a.alpha, a.use_rslora = float(alpha), use_rslora
        a.A.data = like_of(a.A.data, A)  # (r, k')
        a.B.data = like_of(a.B.data, B)  # (out, r)
        a.A.grad = a.B.grad = None
    if created:
        mark_only_lora_as_trainable(model)
    return model
