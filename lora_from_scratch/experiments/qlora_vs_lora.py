"""QLoRA against 16-bit-style LoRA: the same adapters on a float32 and on an NF4 base, trained alike (QLoRA section 4).

QLoRA (Dettmers et al., 2023), section 3, eq. 5-6: the frozen W0 is stored in NF4 (the storage
type) and dequantized to the computation type whenever the forward or the backward needs it;
section 4 ("QLoRA vs. standard finetuning", Table 3 and Figure 3 there): 4-bit NF4 with double
quantization "replicates 16-bit LoRA" quality. Here the shipped base model is fine-tuned on
"desc" twice per seed, with LoRA (float32 W0) and with QLoRA (NF4 W0, blocksize 64, double
quantization): the same r, alpha, learning rate, schedule, batches and adapter draws, so the base
weights' format is the only difference. Measured per run: the loss curve, exact match on held-out
"desc" rows and on the four pre-training tasks, the bytes the model holds, and (QLoRA) how often
each layer dequantized W0.

Then the QLoRA model is deployed two ways (``qlora_vs_qalora.deploy_qlora``): merged in float, dequant(W0) +
s B A in a float32 Linear, and re-quantized, that sum rounded onto the NF4 grid again
(``requantize=True``, QLoRA's deployment weakness that QA-LoRA, Xu et al., 2023, section 1 and
3.3, sets out to remove). For each: exact match, the loss on "desc", the relative change of the
logits from the unmerged model, and for re-quantization the share of the learned update s B A
that the rounding changed, ||(W_rq - dequant(W0)) - s B A|| / ||s B A|| over all adapted layers.

Helpers for notebook 8 live here too: ``resident_breakdown`` (what the held bytes are made of)
and ``cached_arrays`` (what every layer keeps from a forward for its backward).
"""

from __future__ import annotations

import numpy as np

from .. import data
from ..backend import to_numpy
from ..lora import lora_layers
from ..memory import resident_bytes
from ..qlora import NF4Linear
from ..qlora_vs_qalora import deploy_qlora
from .common import eval_sets, finetune, measure, pretrain_mean, progress_bar, spread

TITLE = "QLoRA vs LoRA: the same adapters on an NF4 and a float32 base, and the cost of re-quantizing the merge"
PAPER = ("QLoRA (Dettmers et al., 2023), section 3 (eq. 5-6, storage and computation type) and section 4 "
         "(QLoRA replicates 16-bit LoRA); deployment: merge in float vs re-quantize")

SCALES = {
    "full": {"methods": ["lora", "qlora"], "seeds": [0, 1, 2], "r": 8, "alpha": 16, "lr": 3e-3, "steps": 300,
             "batch_size": 32, "eval_rows": 256, "pretrain_rows": 128},
    "slice": {"methods": ["lora", "qlora"], "seeds": [0], "r": 8, "alpha": 16, "lr": 3e-3, "steps": 40,
              "batch_size": 16, "eval_rows": 64, "pretrain_rows": 32},
    "test": {"methods": ["lora", "qlora"], "seeds": [0], "r": 8, "alpha": 16, "lr": 3e-3, "steps": 25,
             "batch_size": 16, "eval_rows": 32, "pretrain_rows": 16},
}

NAMES = {"lora": "LoRA (float32 W0)", "qlora": "QLoRA (NF4 W0)"}


# ---------------------------------------------------------------- measuring a model
def all_eval_sets(eval_rows: int, pretrain_rows: int) -> dict:
    """Held-out rows of "desc" and of the four pre-training tasks (one stream, apart from every training seed)."""
    return {**eval_sets(eval_rows), **eval_sets(pretrain_rows, tasks=data.PRETRAIN_TASKS)}


def update_lost(model) -> dict:
    """How much of each learned update s B A re-quantizing dequant(W0) + s B A to NF4 changes (QLoRA layers).

    Returns ``{"lost": ||(W_rq - W0~) - s B A|| / ||s B A||, "update": ||s B A|| / ||W0~||}``, each over
    all adapted layers together (Frobenius norms, float64 on the host).
    """
    lost = upd = norm_w = 0.0
    layers = lora_layers(model)
    if not layers or not all(isinstance(layer.base, NF4Linear) for layer in layers.values()):
        raise ValueError("update_lost needs a QLoRA model: adapted layers on NF4 bases")
    for layer in layers.values():
        W0 = to_numpy(layer.base.dequantized_weight()).astype(np.float64)  # (out, in)
        dW = to_numpy(layer.delta_weight()).astype(np.float64)  # (out, in)
        rq = NF4Linear.from_weight((W0 + dW).astype(np.float32), None, layer.base.blocksize, layer.base.double_quant)
        W_rq = to_numpy(rq.dequantized_weight()).astype(np.float64)  # (out, in) back on the NF4 grid
        lost += float((((W_rq - W0) - dW) ** 2).sum())
        upd += float((dW**2).sum())
        norm_w += float((W0**2).sum())
    return {"lost": float(np.sqrt(lost / upd)), "update": float(np.sqrt(upd / norm_w))}


# ---------------------------------------------------------------- helpers for notebook 8
CATEGORIES = ("float W0", "NF4 codes", "NF4 constants", "biases of adapted layers", "adapters A, B",
              "embeddings and layer norms")


def resident_breakdown(model) -> dict:
    """What the model holds, in bytes, by kind of array (``CATEGORIES``); the sum is ``memory.resident_bytes``.

    Sorted by the name of each array from ``named_arrays`` (of a model or of one adapted layer): the
    adapted layers' bases (``base.weight``: a float W0; ``base.packed``: NF4 codes; the block
    constants), their biases, the adapters and everything else (embeddings, layer norms).
    """
    out = dict.fromkeys(CATEGORIES, 0)
    seen = set()
    for name, holder in model.named_arrays():
        if id(holder.data) in seen:
            continue
        seen.add(id(holder.data))
        name = f".{name}"  # a layer's own arrays ("base.packed") read like a model's (".base.packed")
        if ".adapters." in name:
            key = "adapters A, B"
        elif name.endswith(".base.weight"):
            key = "float W0"
        elif name.endswith(".base.packed"):
            key = "NF4 codes"
        elif name.endswith((".base.absmax", ".base.qabsmax", ".base.offset", ".base.absmax2")):
            key = "NF4 constants"
        elif name.endswith(".base.bias"):
            key = "biases of adapted layers"
        else:
            key = "embeddings and layer norms"
        out[key] += int(holder.data.nbytes)
    return out


def _arrays_in(value, path: str):
    """(path, array) for every array inside a cache: nested tuples, lists and dicts."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _arrays_in(v, f"{path}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _arrays_in(v, f"{path}[{i}]")
    elif hasattr(value, "shape") and hasattr(value, "dtype") and hasattr(value, "nbytes"):
        yield path, value


def cached_arrays(module, prefix: str = "") -> list[tuple[str, object]]:
    """Every array that ``module`` and its submodules keep in their ``_cache`` (what a forward leaves for the backward).

    Returns (where, array) pairs, ``where`` naming the submodule and the position inside its cache,
    e.g. ``"base._cache[1]"``.
    """
    found = []
    for name, m in module.named_modules(prefix):
        cache = vars(m).get("_cache")
        if cache is not None:
            found.extend(_arrays_in(cache, f"{name + '.' if name else ''}_cache"))
    return found


# ---------------------------------------------------------------- the experiment
def one_run(method: str, seed: int, s: dict, evals: dict) -> tuple[dict, object]:
    """One fine-tune on "desc"; returns (measurements, the trained model)."""
    out = finetune(method, s["r"], s["alpha"], steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"], seed=seed,
                   evals=evals)
    model = out.pop("model")
    layers = lora_layers(model)
    row = {"method": method, "seed": seed, "loss": out["loss"], "final_loss": out["final_loss"],
           "exact_match": out["exact_match"], "pretrain_mean": pretrain_mean(out["exact_match"]),
           "seconds": round(out["seconds"], 2), "resident_bytes": resident_bytes(model),
           "breakdown": resident_breakdown(model)}
    if method == "qlora":
        counts = sorted({layer.base.dequantizations for layer in layers.values()})
        row["dequantizations_per_layer"] = counts  # one value: every layer the same
        row["evaluation_forwards"] = len(evals)
    return row, model


def measure_merges(model, evals: dict) -> dict:
    """The trained QLoRA model unmerged, merged in float and merged + re-quantized to NF4 (``deploy_qlora``),
    measured."""
    unmerged, ref = measure(model, evals)
    float_merge, _ = measure(deploy_qlora(model, "float"), evals, ref)
    requant, _ = measure(deploy_qlora(model, "nf4"), evals, ref)
    return {"unmerged": unmerged, "float": float_merge, "requantized": requant, **update_lost(model)}


def run(scale: str = "full", progress: bool = True) -> dict:
    s = SCALES[scale]
    evals = all_eval_sets(s["eval_rows"], s["pretrain_rows"])
    runs, deployments = [], []
    jobs = [(seed, method) for seed in s["seeds"] for method in s["methods"]]
    for seed, method in progress_bar(jobs, progress, f"qlora_vs_lora ({scale})"):
        row, model = one_run(method, seed, s, evals)
        runs.append(row)
        if method == "qlora":
            deployments.append({"seed": seed, **measure_merges(model, evals)})
    result = {"runs": runs, "deployments": deployments, "summary": summarize(runs)}
    result["findings"] = findings(result, s)
    return result


def summarize(runs: list) -> dict:
    """Per method: mean, min and max over seeds of the final loss, desc exact match and pre-training exact match."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        rows = [r for r in runs if r["method"] == method]
        vals = {"final_loss": [r["final_loss"] for r in rows],
                "desc": [r["exact_match"][data.FINETUNE_TASK] for r in rows],
                "pretrain_mean": [r["pretrain_mean"] for r in rows]}
        out[method] = {k: spread(v) for k, v in vals.items()}
        out[method]["resident_bytes"] = rows[0]["resident_bytes"]
    return out


def _mean(deployments: list, *keys) -> float:
    vals = []
    for d in deployments:
        v = d
        for k in keys:
            v = v[k]
        vals.append(v)
    return float(np.mean(vals))


def findings(result: dict, s: dict) -> list[str]:
    sm, deps = result["summary"], result["deployments"]
    n = len(s["seeds"])
    lines = [f"r = {s['r']}, alpha = {s['alpha']}, lr = {s['lr']:g}, {s['steps']} steps of batch {s['batch_size']} "
             f"on 'desc', adapters on all six matrices, {n} seed{'s' if n > 1 else ''} ({s['seeds']})"]
    for m in s["methods"]:
        x = sm[m]
        lines.append(f"{NAMES[m]}: final loss {x['final_loss']['mean']:.4f} (seeds {x['final_loss']['min']:.4f} to "
                     f"{x['final_loss']['max']:.4f}), desc exact match {x['desc']['mean']:.1%} (seeds "
                     f"{x['desc']['min']:.1%} to {x['desc']['max']:.1%}), pre-training tasks "
                     f"{x['pretrain_mean']['mean']:.1%}; holds {x['resident_bytes'] / 2**10:.1f} KiB")
    if "lora" in sm and "qlora" in sm:
        gap = sm["qlora"]["desc"]["mean"] - sm["lora"]["desc"]["mean"]
        lines.append(f"QLoRA - LoRA: desc exact match {100 * gap:+.1f} points, final loss "
                     f"{sm['qlora']['final_loss']['mean'] - sm['lora']['final_loss']['mean']:+.4f}; memory held "
                     f"{sm['lora']['resident_bytes'] / sm['qlora']['resident_bytes']:.2f}x smaller with QLoRA")
    q = [r for r in result["runs"] if r["method"] == "qlora"]
    if q:
        lines.append(f"every QLoRA layer dequantized W0 {q[0]['dequantizations_per_layer']} times: 2 per training "
                     f"step x {s['steps']} + 1 per evaluation forward x {q[0]['evaluation_forwards']}")
    if deps:
        lines.append(f"deployment (mean of {len(deps)} QLoRA run{'s' if len(deps) > 1 else ''}): desc exact match "
                     f"unmerged {_mean(deps, 'unmerged', 'exact_match', 'desc'):.1%}, merged in float "
                     f"{_mean(deps, 'float', 'exact_match', 'desc'):.1%} (logits change "
                     f"{_mean(deps, 'float', 'logits_rel'):.1e}), re-quantized to NF4 "
                     f"{_mean(deps, 'requantized', 'exact_match', 'desc'):.1%} (logits change "
                     f"{_mean(deps, 'requantized', 'logits_rel'):.1e})")
        lines.append(f"desc loss: unmerged {_mean(deps, 'unmerged', 'desc_loss'):.4f}, float merge "
                     f"{_mean(deps, 'float', 'desc_loss'):.4f}, re-quantized "
                     f"{_mean(deps, 'requantized', 'desc_loss'):.4f}"
                     f"; the re-quantization changed the learned update s B A by {_mean(deps, 'lost'):.1%} of its size "
                     f"(||s B A|| / ||W0|| = {_mean(deps, 'update'):.3f})")
    return lines


def plot(result: dict):
    from ..plots.qlora import plot_qlora_vs_lora

    return plot_qlora_vs_lora(result)
