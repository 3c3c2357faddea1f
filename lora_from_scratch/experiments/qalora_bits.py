"""QLoRA deployed after re-quantization vs QA-LoRA, at INT4, INT3 and INT2 (the QA-LoRA paper's Table 1, our scale).

QA-LoRA (Xu et al., 2023), section 3.3 and Table 1: QLoRA fine-tunes on an NF4 base, but its
update s B A is a full float matrix, so a low-bit deployment has to merge in float and quantize the
sum again (the paper's "QLoRA w/ GPTQ"); QA-LoRA fine-tunes on a group-wise INT-N base with a
pooled adapter whose update is constant within each quantization group, folds it into the zero
points, and deploys the INT-N model it trained. Table 1 compares the two at 4, 3 and 2 bits.

Here, on the shipped base model and the new task "desc", per seed:

- QLoRA: trained once (NF4 base, blocksize 64, double quantization), then deployed at each INT-N by
  ``qalora.quantize_model_groupwise`` (dequant(W0) + s B A re-quantized with QA-LoRA's own group-wise
  min-max scheme, round to nearest; the paper uses GPTQ, a stronger quantizer);
- QA-LoRA: trained at each INT-N (group size ``group_size``), deployed by ``lora.merge_and_unload``
  (same codes, same scales, merged zero points).

Measured: exact match on held-out "desc" rows and on the four pre-training tasks, trained (adapter
unmerged) and deployed; the relative change of the logits that the deployment causes; the bits per
weight of the deployed format (codes packed, float16 scale and zero per group); what storing
QA-LoRA's merged zero points in float16 would change (``float16_zeros``); and, as the baseline each
method starts from, the base model itself quantized that way (before fine-tuning). Each method's
learning rate comes from a short sweep (``lr_sweep``, at the "full" scale): the pooled adapter learns
far more slowly per step than LoRA's and needs a larger one.

The helpers are shared with ``qalora_group_size`` and notebook 9.
"""

from __future__ import annotations

import copy

import numpy as np

from .. import data
from ..adapter import TARGETS
from ..backend import to_numpy
from ..lora import lora_layers, merge_and_unload
from ..methods import NAMES
from ..qalora import GroupwiseLinear, quantize_model_groupwise
from ..qlora_vs_qalora import deploy_qlora
from .common import base_model, finetune, measure, pretrain_mean, progress_bar
from .qlora_vs_lora import all_eval_sets

TITLE = "QLoRA re-quantized vs QA-LoRA merged, deployed at INT4 / INT3 / INT2"
PAPER = "QA-LoRA (Xu et al., 2023), section 3.3 and Table 1 (QLoRA w/ GPTQ vs QA-LoRA at 4, 3 and 2 bits)"

SCALES = {
    "full": {"bits": [4, 3, 2], "group_size": 32, "seeds": [0, 1], "r": 8, "alpha": 16, "steps": 600,
             "batch_size": 64, "lr_qlora": None, "lr_qalora": None, "eval_rows": 256, "pretrain_rows": 128,
             "lr_sweep": {"steps": 200, "batch_size": 32, "bits": 4, "seed": 0, "qlora": [1e-3, 3e-3, 1e-2],
                          "qalora": [1e-2, 2e-2, 4e-2, 8e-2]}},
    "slice": {"bits": [4, 2], "group_size": 32, "seeds": [0], "r": 8, "alpha": 16, "steps": 40, "batch_size": 16,
              "lr_qlora": 1e-2, "lr_qalora": 8e-2, "eval_rows": 64, "pretrain_rows": 32, "lr_sweep": None},
    "test": {"bits": [4, 2], "group_size": 32, "seeds": [0], "r": 8, "alpha": 16, "steps": 20, "batch_size": 16,
             "lr_qlora": 1e-2, "lr_qalora": 8e-2, "eval_rows": 32, "pretrain_rows": 16, "lr_sweep": None},
}


# ---------------------------------------------------------------- shared helpers
def deployed_bits(model) -> float:
    """Stored bits per weight of the model's group-wise layers: codes packed, float16 scale and zero per group."""
    bits = n = 0.0
    for _, m in model.named_modules():
        if isinstance(m, GroupwiseLinear):
            bits += m.quantized.bits_per_parameter("float16") * m.weight_count
            n += m.weight_count
    return float(bits / n)


def with_float16_zeros(model):
    """A copy of a deployed model whose group-wise zero points went through float16 and back, and what that changed.

    Returns (model, stats): ``max_shift`` (the largest |zero16 - zero|, in quantization steps),
    ``weight_rel`` (||W~16 - W~|| / ||W~|| over the group-wise layers) and ``integer_zeros`` (whether
    the zeros were all integers, which float16 holds exactly up to 2048).
    """
    out = copy.deepcopy(model)
    shift = num = den = 0.0
    integer = True
    for _, m in out.named_modules():
        if isinstance(m, GroupwiseLinear):
            z = m.zeros.data  # (out, L)
            z16 = z.astype("float16").astype(z.dtype)  # (out, L) rounded to float16 and back
            integer = integer and bool((to_numpy(z) == np.round(to_numpy(z))).all())  # (out, L) -> one bool
            W = to_numpy(m.dequantized_weight()).astype(np.float64)  # (out, in)
            m.zeros.data = z16  # (out, L)
            W16 = to_numpy(m.dequantized_weight()).astype(np.float64)  # (out, in)
            shift = max(shift, float(np.abs(to_numpy(z16) - to_numpy(z)).max()))
            num += float(((W16 - W) ** 2).sum())
            den += float((W**2).sum())
    return out, {"max_shift": shift, "weight_rel": float(np.sqrt(num / den)), "integer_zeros": integer}


def quantized_base(bits: int, group_size: int, evals: dict) -> dict:
    """The pre-trained base model with its six block matrices quantized group-wise to INT-``bits``, measured."""
    model = quantize_model_groupwise(base_model(), bits, group_size, list(TARGETS))
    m, _ = measure(model, evals)
    return {"bits": bits, "group_size": group_size, "exact_match": m["exact_match"],
            "pretrain_mean": m["pretrain_mean"], "deployed_bits": deployed_bits(model)}


def train_qlora(s: dict, seed: int, evals: dict) -> tuple[dict, object, dict]:
    """QLoRA fine-tuned on "desc": (measurements, model, its logits)."""
    out = finetune("qlora", s["r"], s["alpha"], steps=s["steps"], batch_size=s["batch_size"], lr=s["lr_qlora"],
                   seed=seed, evals=evals)
    model = out.pop("model")
    trained, logits = measure(model, evals)
    return {"loss": out["loss"], "final_loss": out["final_loss"], "seconds": round(out["seconds"], 2),
            "trained": trained}, model, logits


def measure_qlora_deployed(model, logits: dict, bits: int, group_size: int, evals: dict) -> dict:
    """The QLoRA model merged in float and re-quantized group-wise to INT-``bits`` (``deploy_qlora``, on a copy),
    measured against its trained ``logits``."""
    deployed = deploy_qlora(model, f"int{bits}", group_size, TARGETS)
    m, _ = measure(deployed, evals, logits)
    return {**m, "deployed_bits": deployed_bits(deployed)}


def train_and_deploy_qalora(s: dict, seed: int, bits: int, group_size: int, evals: dict, lr=None) -> dict:
    """QA-LoRA fine-tuned at INT-``bits`` and deployed by ``merge_and_unload``; float16 zero points tried too."""
    lr = s["lr_qalora"] if lr is None else lr
    out = finetune("qalora", s["r"], s["alpha"], steps=s["steps"], batch_size=s["batch_size"], lr=lr, seed=seed,
                   evals=evals, bits=bits, group_size=group_size)
    model = out.pop("model")
    codes = {name: to_numpy(layer.codes).copy() for name, layer in lora_layers(model).items()}
    trained, logits = measure(model, evals)
    deployed_model = merge_and_unload(copy.deepcopy(model))
    same_codes = all(np.array_equal(to_numpy(deployed_model.get_submodule(name).codes), c)
                     for name, c in codes.items())
    deployed, dep_logits = measure(deployed_model, evals, logits)
    fp16_model, fp16 = with_float16_zeros(deployed_model)
    fp16_measured, _ = measure(fp16_model, evals, dep_logits)
    return {"method": "qalora", "seed": seed, "bits": bits, "group_size": group_size, "lr": lr, "loss": out["loss"],
            "final_loss": out["final_loss"], "seconds": round(out["seconds"], 2), "trained": trained,
            "deployed": {**deployed, "deployed_bits": deployed_bits(deployed_model)}, "same_codes": same_codes,
            "float16_zeros": {**fp16, **fp16_measured}}


def em(row: dict, stage: str, task: str = "desc") -> float:
    """Exact match of a result row at ``stage`` ("trained" or "deployed"): "desc" or "pretrain" (the mean of four)."""
    m = row[stage]
    return m["pretrain_mean"] if task == "pretrain" else m["exact_match"][task]


def select(rows: list, method: str, **keys) -> list:
    """The result rows of ``method`` whose entries equal ``keys`` (e.g. bits=2, group_size=8): one per seed."""
    return [r for r in rows if r["method"] == method and all(r[k] == v for k, v in keys.items())]


def mean_over_seeds(rows: list, method: str, stage: str, task: str = "desc", **keys) -> float:
    """The mean ``em`` over the rows that ``select`` picks (KeyError if there is none)."""
    sel = select(rows, method, **keys)
    if not sel:
        raise KeyError((method, keys))
    return float(np.mean([em(r, stage, task) for r in sel]))


def per_seed(rows: list, method: str, stage: str, key: str = "desc", **keys) -> list:
    """Per seed (the rows ``select`` picks): exact match in % (``em`` of ``key``: "desc" or "pretrain") at ``stage``,
    or the logits' change there with ``key="logits_rel"``."""
    sel = select(rows, method, **keys)
    if key == "logits_rel":
        return [r[stage]["logits_rel"] for r in sel]
    return [100 * em(r, stage, key) for r in sel]


def train_and_deploy_all(s: dict, cells: list, evals: dict, *, curve_stride: int, curve_keys: tuple, desc: str,
                         progress: bool) -> tuple[list, list]:
    """Per seed, QLoRA trained once and deployed at every (bits, group size) of ``cells``; QA-LoRA trained and
    deployed at each. Returns (rows, curves): one row per seed, method and cell (``train_qlora`` with
    ``measure_qlora_deployed``, ``train_and_deploy_qalora``), one loss curve per training run, every ``curve_stride``-th
    step, labelled by ``curve_keys`` (of "bits", "group_size"; None for QLoRA's).
    """
    rows, curves = [], []
    jobs = [(seed, None) for seed in s["seeds"]] + [(seed, cell) for seed in s["seeds"] for cell in cells]
    for seed, cell in progress_bar(jobs, progress, desc):
        where = dict(zip(("bits", "group_size"), cell or (None, None)))
        label = {"seed": seed, **{k: where[k] for k in curve_keys}}
        if cell is None:
            q, model, logits = train_qlora(s, seed, evals)
            curves.append({"method": "qlora", **label, "loss": q["loss"][::curve_stride]})
            for b, g in cells:
                rows.append({"method": "qlora", "seed": seed, "bits": b, "group_size": g, "trained": q["trained"],
                             "deployed": measure_qlora_deployed(model, logits, b, g, evals),
                             "final_loss": q["final_loss"], "seconds": q["seconds"]})
        else:
            row = train_and_deploy_qalora(s, seed, *cell, evals)
            curves.append({"method": "qalora", **label, "loss": row.pop("loss")[::curve_stride]})
            rows.append(row)
    return rows, curves


# ---------------------------------------------------------------- the experiment
def lr_sweep(sw: dict, s: dict, evals: dict) -> dict:
    """Short runs of each method over its learning rates (QA-LoRA at INT-``sw["bits"]``); the lowest final loss wins.

    The final loss is the mean training loss of the last 10 steps: every batch is freshly generated, so it
    is measured on rows the adapter has not seen before.
    """
    runs = {"qlora": [], "qalora": []}
    for method in runs:
        extra = {"bits": sw["bits"], "group_size": s["group_size"]} if method == "qalora" else {}
        for lr in sw[method]:
            out = finetune(method, s["r"], s["alpha"], steps=sw["steps"], batch_size=sw["batch_size"], lr=lr,
                           seed=sw["seed"], evals={data.FINETUNE_TASK: evals[data.FINETUNE_TASK]}, **extra)
            runs[method].append({"lr": lr, "final_loss": out["final_loss"],
                                 "desc": out["exact_match"][data.FINETUNE_TASK]})
    best = {m: min(rows, key=lambda row: row["final_loss"])["lr"] for m, rows in runs.items()}
    return {"runs": runs, "best": best}


def run(scale: str = "full", progress: bool = True) -> dict:
    s = SCALES[scale]
    gs = s["group_size"]
    evals = all_eval_sets(s["eval_rows"], s["pretrain_rows"])
    sweep = lr_sweep(s["lr_sweep"], s, evals) if s["lr_sweep"] else None
    if sweep is not None:  # the full runs take each method's learning rate from the sweep
        s = {**s, "lr_qlora": sweep["best"]["qlora"], "lr_qalora": sweep["best"]["qalora"]}
    rows, curves = train_and_deploy_all(s, [(b, gs) for b in s["bits"]], evals, curve_stride=2, curve_keys=("bits",),
                                        desc=f"qalora_bits ({scale})", progress=progress)
    bases = [quantized_base(b, gs, evals) for b in s["bits"]]
    base_float, _ = measure(base_model(), evals)
    result = {"rows": rows, "curves": curves, "curve_stride": 2, "quantized_base": bases, "base_float": base_float,
              "learning_rates": {"qlora": s["lr_qlora"], "qalora": s["lr_qalora"]}, "lr_sweep": sweep}
    result["findings"] = findings(result, s)
    return result


def findings(result: dict, s: dict) -> list[str]:
    rows, gs = result["rows"], s["group_size"]
    n = len(s["seeds"])
    lines = [f"r = {s['r']}, alpha = {s['alpha']}, {s['steps']} steps of batch {s['batch_size']} on 'desc', "
             f"group size {gs}, learning rates QLoRA {s['lr_qlora']:g} and QA-LoRA {s['lr_qalora']:g}, "
             f"mean of {n} seed{'s' if n > 1 else ''}"]
    sweep = result.get("lr_sweep")
    if sweep:
        sw = s["lr_sweep"]
        lines.append(f"learning rates chosen by a sweep ({sw['steps']} steps of batch {sw['batch_size']}, QA-LoRA at "
                     f"INT{sw['bits']}; final loss, desc exact match): " + "; ".join(
                         f"{NAMES[m]} " + ", ".join(f"{r['lr']:g}: {r['final_loss']:.3f}, {r['desc']:.0%}"
                                                    for r in sweep["runs"][m]) for m in ("qlora", "qalora")))
    for b in s["bits"]:
        qt, qd = (mean_over_seeds(rows, "qlora", st, bits=b) for st in ("trained", "deployed"))
        at, ad = (mean_over_seeds(rows, "qalora", st, bits=b) for st in ("trained", "deployed"))
        q_rel = np.mean([r["deployed"]["logits_rel"] for r in select(rows, "qlora", bits=b)])
        a_rel = np.mean([r["deployed"]["logits_rel"] for r in select(rows, "qalora", bits=b)])
        dep_bits = next(r["deployed"]["deployed_bits"] for r in rows if r["bits"] == b)
        lines.append(f"INT{b} ({dep_bits:.2f} bits/weight): QLoRA trained {qt:.1%} -> deployed {qd:.1%} "
                     f"({100 * (qd - qt):+.1f} points, logits change {q_rel:.1e}); QA-LoRA trained {at:.1%} -> "
                     f"deployed {ad:.1%} ({100 * (ad - at):+.1f} points, logits change {a_rel:.1e})")
    lines.append("pre-training tasks (mean exact match), deployed: " + ", ".join(
        f"INT{b} QLoRA {mean_over_seeds(rows, 'qlora', 'deployed', 'pretrain', bits=b):.1%} / QA-LoRA "
        f"{mean_over_seeds(rows, 'qalora', 'deployed', 'pretrain', bits=b):.1%}" for b in s["bits"])
        + f" (the base model before fine-tuning: float32 {result['base_float']['pretrain_mean']:.1%}, "
        + ", ".join(f"INT{q['bits']} {q['pretrain_mean']:.1%}" for q in result["quantized_base"])
        + "; fine-tuning on 'desc' alone overwrites them)")
    a = [r for r in rows if r["method"] == "qalora"]
    lines.append(f"QA-LoRA's merge kept every code ({all(r['same_codes'] for r in a)}); float16 zero points moved them "
                 f"by at most {max(r['float16_zeros']['max_shift'] for r in a):.1e} steps, the dequantized weights "
                 f"by {max(r['float16_zeros']['weight_rel'] for r in a):.1e} (relative), the logits by "
                 f"{max(r['float16_zeros']['logits_rel'] for r in a):.1e}, and desc exact match by at most "
                 f"{100 * max(abs(em(r, 'float16_zeros') - em(r, 'deployed')) for r in a):.1f} points")
    return lines


def figure_data(result: dict) -> dict:
    """What ``plots.qalora.plot_qalora_bits`` draws, at each bit width of the result (widest first): per method the
    per-seed exact match on "desc" trained and deployed, the logits' change and the pre-training tasks deployed; the
    quantized and the float32 base model on the pre-training tasks; the loss curves."""
    rows = result["rows"]
    if not rows:
        raise ValueError("the qalora_bits result holds no rows")
    bits = sorted({r["bits"] for r in rows}, reverse=True)
    methods = ("qlora", "qalora")
    base = {q["bits"]: 100 * q["pretrain_mean"] for q in result["quantized_base"]}
    return {"bits": bits,
            "desc": {m: {st: [per_seed(rows, m, st, bits=b) for b in bits] for st in ("trained", "deployed")}
                     for m in methods},
            "logits_rel": {m: [per_seed(rows, m, "deployed", "logits_rel", bits=b) for b in bits] for m in methods},
            "pretrain": {m: [per_seed(rows, m, "deployed", "pretrain", bits=b) for b in bits] for m in methods},
            "pretrain_base": [base.get(b, float("nan")) for b in bits],
            "pretrain_float": 100 * result["base_float"]["pretrain_mean"],
            "curves": result["curves"], "curve_stride": result.get("curve_stride", 1)}


def plot(result: dict):
    from ..plots.qalora import plot_qalora_bits

    return plot_qalora_bits(figure_data(result))


__all__ = ["SCALES", "deployed_bits", "em", "figure_data", "mean_over_seeds", "per_seed",
           "pretrain_mean", "quantized_base", "run", "select", "train_and_deploy_all", "train_and_deploy_qalora",
           "measure_qlora_deployed", "train_qlora", "with_float16_zeros"]
