"""Files in and out: safetensors checkpoints, Hugging Face GPT-2 import, PEFT adapters.

- ``save_checkpoint`` / ``load_checkpoint``: the model's parameters in a
  safetensors file (never pickle: a pickle can run code when loaded), with
  the GPTConfig as JSON in the file's metadata. Writing is atomic: the file
  goes to a temporary name in the same folder and is renamed over the
  target only when complete, so a crash never leaves half a checkpoint.
- ``load_hf_gpt2``: builds our GPT from a Hugging Face ``GPT2LMHeadModel``
  state dict given as NumPy arrays. GPT-2 stores its linear layers as
  ``Conv1D`` with weights of shape (in, out), so each is transposed to the
  paper's (out, in); the fused attention projection ``c_attn`` of shape
  (C, 3C) is split into Wq, Wk, Wv.
- ``save_peft_adapter`` / ``load_peft_adapter`` (in ``peft_io``): LoRA
  adapters in the file layout of Hugging Face PEFT.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from .backend import to_numpy
from .model import GPT, GPTConfig

FORMAT = "lora_from_scratch.gpt"
# the pre-trained base model that ships with the package (``python -m lora_from_scratch pretrain`` makes it)
BASE_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "base.safetensors")


def atomic_write(path: str, write_fn) -> None:
    """Call ``write_fn(tmp_path)`` then rename the temporary file onto ``path`` (same folder, so atomic)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(model: GPT, path: str, metadata: dict | None = None) -> None:
    """Write every parameter of ``model`` (float32 or float64, as held) and its config to ``path``."""
    from safetensors.numpy import save_file

    tensors = {}
    for name, p in model.named_parameters():
        arr = np.ascontiguousarray(to_numpy(p.data))
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"refusing to save a checkpoint: parameter {name!r} holds NaN or inf")
        tensors[name] = arr
    meta = {"format": FORMAT, "config": json.dumps(model.config.to_dict())}
    for k, v in (metadata or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_checkpoint(path: str) -> tuple[dict, dict]:
    """(tensors as NumPy arrays, metadata dict) of a safetensors file."""
    from safetensors import safe_open

    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    with safe_open(path, framework="numpy") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


def load_checkpoint(path: str, dtype="float32") -> GPT:
    """Rebuild the GPT saved by ``save_checkpoint`` (config from the metadata; keys and shapes checked)."""
    tensors, meta = read_checkpoint(path)
    if meta.get("format") != FORMAT or "config" not in meta:
        raise ValueError(f"{path} is not a lora_from_scratch GPT checkpoint (metadata: {sorted(meta)})")
    config = GPTConfig(**json.loads(meta["config"]))
    model = GPT(config, seed=0, dtype=dtype)
    model.load_state_dict(tensors)
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


# ------------------------------------------------------------ Hugging Face GPT-2
def _take(sd: dict, key: str, shape: tuple) -> np.ndarray:
    if key not in sd:
        raise KeyError(f"GPT-2 state dict is missing key {key!r}")
    arr = np.asarray(sd[key])
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


def load_hf_gpt2(state_dict: dict, n_head: int, dtype="float32") -> GPT:
    """Our GPT holding the weights of a Hugging Face ``GPT2LMHeadModel`` state dict (NumPy arrays).

    Conv1D weights (in, out) are transposed to (out, in); ``c_attn`` (C, 3C)
    is split column-wise into Wq, Wk, Wv. Every expected key must be present
    with its expected shape; buffers (``attn.bias`` masks) and the tied
    ``lm_head.weight`` are accepted and ignored (the head must equal wte).
    """
    sd = {k: to_numpy(v) for k, v in state_dict.items()}
    cfg = hf_gpt2_config(sd, n_head)
    C, V, P = cfg.n_embd, cfg.vocab_size, cfg.block_size
    ours: dict[str, np.ndarray] = {
        "wte.weight": _take(sd, "transformer.wte.weight", (V, C)),
        "wpe.weight": _take(sd, "transformer.wpe.weight", (P, C)),
        "ln_f.weight": _take(sd, "transformer.ln_f.weight", (C,)),
        "ln_f.bias": _take(sd, "transformer.ln_f.bias", (C,)),
    }
    for i in range(cfg.n_layer):
        h, b = f"transformer.h.{i}.", f"blocks.{i}."
        for ln in ("ln_1", "ln_2"):
            ours[b + ln + ".weight"] = _take(sd, h + ln + ".weight", (C,))
            ours[b + ln + ".bias"] = _take(sd, h + ln + ".bias", (C,))
        Wqkv = _take(sd, h + "attn.c_attn.weight", (C, 3 * C)).T  # (C, 3C) -> (3C, C)
        bqkv = _take(sd, h + "attn.c_attn.bias", (3 * C,))  # (3C,)
        for j, name in enumerate(("q", "k", "v")):
            ours[b + f"attn.{name}.weight"] = Wqkv[j * C:(j + 1) * C]  # (C, C) rows of the fused matrix
            ours[b + f"attn.{name}.bias"] = bqkv[j * C:(j + 1) * C]  # (C,)
        ours[b + "attn.o.weight"] = _take(sd, h + "attn.c_proj.weight", (C, C)).T  # (C, C) transposed
        ours[b + "attn.o.bias"] = _take(sd, h + "attn.c_proj.bias", (C,))
        ours[b + "mlp.fc.weight"] = _take(sd, h + "mlp.c_fc.weight", (C, 4 * C)).T  # (C, 4C) -> (4C, C)
        ours[b + "mlp.fc.bias"] = _take(sd, h + "mlp.c_fc.bias", (4 * C,))
        ours[b + "mlp.proj.weight"] = _take(sd, h + "mlp.c_proj.weight", (4 * C, C)).T  # (4C, C) -> (C, 4C)
        ours[b + "mlp.proj.bias"] = _take(sd, h + "mlp.c_proj.bias", (C,))
    if "lm_head.weight" in sd:
        head = _take(sd, "lm_head.weight", (V, C))
        if not np.array_equal(head, ours["wte.weight"]):
            raise ValueError("lm_head.weight differs from transformer.wte.weight; this GPT ties the two")
    model = GPT(cfg, seed=0, dtype=dtype)
    model.load_state_dict(ours)
    return model


def to_hf_gpt2_state_dict(model: GPT) -> dict:
    """The inverse of ``load_hf_gpt2``: a GPT-2 state dict (NumPy) with fused ``c_attn`` and Conv1D layout.

    On a model with LoRA adapters this exports the frozen base weights (``...q.base.weight``)
    and leaves the adapters out: they go to PEFT's own file (``save_peft_adapter``).
    """
    params = {k.replace(".base.", "."): to_numpy(v) for k, v in model.state_dict().items() if "lora_" not in k}
    out = {
        "transformer.wte.weight": params["wte.weight"],
        "transformer.wpe.weight": params["wpe.weight"],
        "transformer.ln_f.weight": params["ln_f.weight"],
        "transformer.ln_f.bias": params["ln_f.bias"],
        "lm_head.weight": params["wte.weight"],
    }
    for i in range(model.config.n_layer):
        h, b = f"transformer.h.{i}.", f"blocks.{i}."
        for ln in ("ln_1", "ln_2"):
            out[h + ln + ".weight"] = params[b + ln + ".weight"]
            out[h + ln + ".bias"] = params[b + ln + ".bias"]
        W = np.concatenate([params[b + f"attn.{n}.weight"] for n in "qkv"], axis=0)  # (3C, C)
        out[h + "attn.c_attn.weight"] = np.ascontiguousarray(W.T)  # (C, 3C)
        out[h + "attn.c_attn.bias"] = np.concatenate([params[b + f"attn.{n}.bias"] for n in "qkv"])  # (3C,)
        out[h + "attn.c_proj.weight"] = np.ascontiguousarray(params[b + "attn.o.weight"].T)  # (C, C)
        out[h + "attn.c_proj.bias"] = params[b + "attn.o.bias"]
        out[h + "mlp.c_fc.weight"] = np.ascontiguousarray(params[b + "mlp.fc.weight"].T)  # (C, 4C)
        out[h + "mlp.c_fc.bias"] = params[b + "mlp.fc.bias"]
        out[h + "mlp.c_proj.weight"] = np.ascontiguousarray(params[b + "mlp.proj.weight"].T)  # (4C, C)
        out[h + "mlp.c_proj.bias"] = params[b + "mlp.proj.bias"]
    return out


def save_peft_adapter(model, directory: str) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` that PEFT loads (see ``peft_io``)."""
    from .peft_io import save_peft_adapter as _save

    _save(model, directory)


def load_peft_adapter(model, directory: str):
    """Read an adapter saved by PEFT (or by ``save_peft_adapter``) into ``model`` (see ``peft_io``)."""
    from .peft_io import load_peft_adapter as _load

    return _load(model, directory)
