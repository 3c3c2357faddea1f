"""The model-level tools of LoRA (Hu et al., 2021), shared by LoRA, QLoRA and QA-LoRA.

What one training step runs, making the adapted layers and putting them into a model, lives in
``adapter.py`` (``LoRALinear``, the PiSSA start, ``apply_lora``, ``replace_targets``,
``mark_only_lora_as_trainable``); those names are importable from here too. This file holds what
comes around training: several adapters on one base, switching them off, storing them, merging.

Everything here takes a model and works for every adapter kind (an adapted layer is a base plus
adapters, whatever the base), or raises a ValueError that says why:

- ``apply_lora`` (and ``qlora.apply_qlora``, ``qalora.apply_qalora``, through ``replace_targets``):
  put adapters on the targeted matrices (``adapter.TARGETS``: Wq, Wk, Wv, Wo, MLP up and down;
  section 4.2 and 7.1 study which to adapt) and freeze everything else (``adapter.py``).
- ``lora_state_dict`` / ``load_lora_state_dict``: one adapter's A and B, the per-task file of
  section 4.2 ("we only need to store and load ... the LoRA weights").
- ``add_adapter`` / ``set_adapter`` / ``delete_adapter``: several task adapters on one shared base,
  and the switch between them.
- ``disable_adapters``: a context in which the model computes its base model's outputs. Inside
  it, every call that changes the adapters (add, set, delete, merge, unmerge, unload, apply,
  ``mark_only_lora_as_trainable``) is refused with a ValueError: the context restores, on exit,
  the active adapters it saved, and a change made meanwhile would be undone by half (a deleted
  adapter still active, a new active adapter frozen).
- ``merge_lora`` / ``unmerge_lora`` / ``merge_and_unload``: section 4.1, "No Additional Inference
  Latency": W = W0 + s B A, and back.
- ``count_parameters``: trainable and total, quantized weights counted by how many they encode.
"""

from __future__ import annotations

import contextlib

# the path of one training step lives in adapter.py; its public names are also this module's: the notebooks,
# experiments and benchmarks call lora.apply_lora, lora.lora_layers, lora.LoRALinear, lora.TARGETS
from .adapter import (
    _DISABLED,
    INITS,
    TARGETS,
    AdaptedLinear,
    LoRALinear,
    LowRankAdapter,
    QuantizedLinear,
    apply_lora,
    check_lora_args,
    is_adapter,
    lora_layers,
    lora_scaling,
    mark_only_lora_as_trainable,
    refuse_while_disabled,
    replace_targets,
)
from .backend import global_rng, like_of, xp_of
from .backend import rng as host_rng
from .nn import _check_name

__all__ = [
    "INITS", "TARGETS", "AdaptedLinear", "LoRALinear", "LowRankAdapter", "active_adapter", "adapter_names",
    "add_adapter", "apply_lora", "check_lora_args", "count_parameters", "delete_adapter", "disable_adapters",
    "is_adapter", "load_lora_state_dict", "lora_layers", "lora_scaling", "lora_state_dict",
    "mark_only_lora_as_trainable", "merge_and_unload", "merge_lora", "replace_targets", "set_adapter", "unmerge_lora",
]


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts. The total includes the frozen base weights, and a quantized
    weight counts as the out * in weights it encodes (its codes are buffers, not parameters)."""
    params = model.parameters()
    quantized = sum(m.weight_count for _, m in model.named_modules() if isinstance(m, QuantizedLinear))
    return sum(p.size for p in params if p.trainable), sum(p.size for p in params) + quantized


def _layers(model, what: str, changes: bool = False) -> dict:
    """The adapted layers of ``model`` (ValueError if none). ``changes``: ``what`` changes the adapters, which
    is refused inside ``disable_adapters`` (see ``refuse_while_disabled``)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{what}: the model has no adapter layers (use apply_lora, qlora.apply_qlora or "
                         "qalora.apply_qalora first)")
    if changes:
        refuse_while_disabled(layers, what)
    return layers



# ---------------------------------------------------------------- named adapters
def adapter_names(model) -> list[str]:
    """The adapter names every adapted layer has, in the order they were added."""
    layers = _layers(model, "adapter_names")
    names = None
    for layer in layers.values():
        own = layer.adapters.keys()
        names = own if names is None else [n for n in names if n in own]
    return names


def active_adapter(model) -> str | None:
    """The name of the adapter the layers use (None while disabled); ValueError if the layers disagree."""
    actives = {layer.active for layer in _layers(model, "active_adapter").values()}
    if len(actives) > 1:
        raise ValueError(f"the layers have different active adapters: {sorted(map(str, actives))}")
    return actives.pop()


def add_adapter(model, name: str, r: int, alpha: float, dropout: float = 0.0, init: str = "kaiming",
                use_rslora: bool = False, seed: int | None = None, rng=None):
    """Add a new adapter called ``name`` to every adapted layer (same base, another task), inactive and frozen.

    It is made like the first one (pooled for QA-LoRA, in the same dtype), from ``rng`` / ``seed`` /
    ``backend.global_rng()``. ``set_adapter(model, name)`` makes it the one that computes and trains.
    Everything is checked before the model changes. Returns the model.
    """
    layers = _layers(model, "add_adapter", changes=True)
    for path, layer in layers.items():
        if name in layer.adapters:
            raise ValueError(f"{path} already has an adapter named {name!r}")
        if layer.merged:
            raise ValueError(f"{path} is merged; unmerge_lora before adding adapters")
        try:
            layer.check_args(r, alpha, dropout, init)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    _check_name(name, "adapter")
    if rng is None:
        rng = host_rng(seed) if seed is not None else global_rng()
    for layer in layers.values():
        adapter = layer.new_adapter(r, alpha, dropout=dropout, init=init, use_rslora=use_rslora, rng=rng)
        for p in adapter.parameters():
            p.trainable = False  # inactive adapters do not train
        layer.adapters[name] = adapter
    return model


def set_adapter(model, name: str):
    """Make ``name`` the active adapter of every adapted layer: it computes, and only it trains. Returns the model."""
    layers = _layers(model, "set_adapter", changes=True)
    for path, layer in layers.items():
        if name not in layer.adapters:
            raise ValueError(f"{path} has no adapter named {name!r}; it has {layer.adapters.keys()}")
        if layer.merged:
            raise ValueError(f"{path} is merged with adapter {layer.active!r}; unmerge_lora before switching")
    for layer in layers.values():
        layer.active = name
    return mark_only_lora_as_trainable(model)


def delete_adapter(model, name: str):
    """Remove the adapter ``name`` from every adapted layer (not the active one, nor a layer's last)."""
    layers = _layers(model, "delete_adapter", changes=True)
    for path, layer in layers.items():
        if name not in layer.adapters:
            raise ValueError(f"{path} has no adapter named {name!r}; it has {layer.adapters.keys()}")
        if len(layer.adapters) == 1:
            raise ValueError(f"{name!r} is the only adapter of {path}; an adapted layer keeps at least one "
                             "(merge_and_unload removes the adapters altogether)")
        if layer.active == name:
            raise ValueError(f"{name!r} is the active adapter of {path}; set_adapter to another one first")
    for layer in layers.values():
        del layer.adapters[name]
    return model


@contextlib.contextmanager
def disable_adapters(model):
    """Inside this context every adapted layer computes its base alone: the model is its base model again.

    For a float base the logits are bit for bit the base model's (the base path is the same
    computation). Refused (ValueError) on a merged model, whose bases hold the update. Inside,
    the adapters cannot be changed (``add_adapter``, ``set_adapter``, ``delete_adapter``, the merges,
    ``apply_lora``: a ValueError), so the exit restores a state that still exists.
    """
    layers = _layers(model, "disable_adapters")
    merged = [path for path, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"cannot disable merged adapters ({merged[0]} holds W0 + s B A); unmerge_lora first")
    saved = {path: layer.active for path, layer in layers.items()}
    for layer in layers.values():
        layer.active, layer._cache = None, None
        _DISABLED[layer] = _DISABLED.get(layer, 0) + 1
    try:
        yield model
    finally:
        for path, layer in layers.items():
            layer.active, layer._cache = saved[path], None
            _DISABLED[layer] -= 1
            if not _DISABLED[layer]:
                del _DISABLED[layer]


# ---------------------------------------------------------------- per-task files
def _adapter_of(path: str, layer: AdaptedLinear, adapter: str | None) -> LowRankAdapter:
    name = layer.active if adapter is None else adapter
    if name is None:
        raise ValueError(f"{path} has no active adapter (adapters are disabled); name one with adapter=...")
    if name not in layer.adapters:
        raise ValueError(f"{path} has no adapter named {name!r}; it has {layer.adapters.keys()}")
    return layer.adapters[name]


def lora_state_dict(model, adapter: str | None = None) -> dict:
    """One adapter's arrays: ``{"blocks.0.attn.q.lora_A": A, "blocks.0.attn.q.lora_B": B, ...}`` (live arrays).

    ``adapter``: its name (default: the active one). For QA-LoRA, A is (r, in / group_size).
    """
    out = {}
    for path, layer in _layers(model, "lora_state_dict").items():
        a = _adapter_of(path, layer, adapter)
        out[f"{path}.lora_A"] = a.A.data  # (r, k')
        out[f"{path}.lora_B"] = a.B.data  # (out, r)
    return out


def load_lora_state_dict(model, state: dict, adapter: str | None = None) -> None:
    """Copy adapter arrays (as made by ``lora_state_dict``) into the named (default: active) adapter.

    Every key, shape and value is checked before anything is copied; a merged layer is refused
    (loading new A, B into it would leave the old update inside W).
    """
    params = {}
    for path, layer in _layers(model, "load_lora_state_dict").items():
        if layer.merged:
            raise ValueError(f"{path} is merged; unmerge_lora before loading adapter weights")
        a = _adapter_of(path, layer, adapter)
        params[f"{path}.lora_A"], params[f"{path}.lora_B"] = a.A, a.B
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"LoRA state dict mismatch: missing keys {missing}, unexpected keys {unexpected}")
    for k, p in params.items():
        arr = state[k]
        if tuple(arr.shape) != p.shape:
            raise ValueError(f"shape mismatch for {k!r}: state dict has {tuple(arr.shape)}, model expects {p.shape}")
        if arr.dtype.kind != "f" or not bool(xp_of(arr).isfinite(arr).all()):
            raise ValueError(f"{k!r}: expected finite floating-point values (dtype {arr.dtype})")
    for k, p in params.items():
        p.data = like_of(p.data, state[k])  # a copy on the parameter's backend
        p.grad = None


# ---------------------------------------------------------------- merging
def merge_lora(model, requantize: bool = False):
    """Fold every layer's active adapter into its base (LoRA section 4.1), in place. Returns the model.

    - LoRA: W0 <- W0 + s B A; the layer stays a LoRALinear, ``merged``, and ``unmerge_lora`` undoes it.
    - QA-LoRA: the group-constant update moves the zero points (same codes, same scales); also undoable.
    - QLoRA: the 4-bit W0 cannot hold the update, so the layer is *replaced* by a frozen float
      ``Linear`` of dequant(W0) + s B A, or with ``requantize=True`` by an ``NF4Linear`` of that sum
      quantized again (QLoRA's deployment weakness: the update is partly rounded away). Not undoable.

    Every merge is computed and checked (finite) before any layer changes.
    """
    layers = _layers(model, "merge_lora", changes=True)
    pending = [(path, layer) for path, layer in layers.items() if not layer.merged]
    if not pending:
        raise ValueError("merge_lora: every adapted layer is already merged")
    if requantize:
        _check_requantize("merge_lora", [layer for _, layer in pending])
    plan = []
    for path, layer in pending:
        try:  # a layer with adapters disabled refuses here ("no active adapter")
            plan.append((path, layer, layer.merged_base(requantize=requantize)))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    for path, layer, new in plan:
        if layer.merges_in_place:
            layer.set_merged_base(new)
        else:  # QLoRA: the layer leaves the 4-bit world
            model.set_submodule(path, new)
    return model


def _check_requantize(what: str, layers) -> None:
    """``requantize=True`` is for QLoRA layers (an NF4 base, which cannot hold the update): refuse a model without."""
    if all(layer.merges_in_place for layer in layers):
        raise ValueError(f"{what}(requantize=True) re-quantizes QLoRA layers (NF4 bases); this model has none")


def unmerge_lora(model):
    """Undo ``merge_lora`` where it can be undone (LoRA and QA-LoRA layers). Returns the model."""
    layers = lora_layers(model)
    refuse_while_disabled(layers, "unmerge_lora")
    merged = [layer for layer in layers.values() if layer.merged]
    if not merged:
        raise ValueError("unmerge_lora: the model has no merged adapter layers (a QLoRA merge replaces its layers "
                         "by float or re-quantized ones and cannot be undone: reload the adapted model instead)")
    for layer in merged:
        layer.unmerge()
    return model


def merge_and_unload(model, requantize: bool = False):
    """Deploy: replace every adapted layer by a plain frozen layer that computes base + update. Returns the model.

    LoRA -> ``nn.Linear`` (W0 + s B A); QLoRA -> ``nn.Linear`` (dequant(W0) + s B A) or, with
    ``requantize=True``, ``qlora.NF4Linear``; QA-LoRA -> ``qalora.GroupwiseLinear`` with the merged
    zero points (the deployed model stays quantized). ``requantize=True`` on a model without QLoRA
    layers is refused, as by ``merge_lora``. Checked before anything changes.
    """
    layers = _layers(model, "merge_and_unload", changes=True)
    if requantize:
        _check_requantize("merge_and_unload", layers.values())
    plan = []
    for path, layer in layers.items():
        try:
            plan.append((path, layer.base if layer.merged else layer.merged_base(requantize=requantize)))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    for path, new in plan:
        model.set_submodule(path, new)
    return model
