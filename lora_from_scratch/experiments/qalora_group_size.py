"""The quantization group size: QLoRA re-quantized vs QA-LoRA merged at 2 and 3 bits (QA-LoRA's group-size ablation).

QA-LoRA (Xu et al., 2023), section 3.3: the group size sets both sides of the method's trade-off.
A smaller group gives the quantizer more (scale, zero) pairs, so a finer fit of W0, and gives the
pooled adapter more input features (L = D_in / group_size columns of A), so more freedom; it costs
storage (one float16 scale and zero per group). The paper's ablation of the group size (section 4)
finds the smaller groups better, most of all at low bit widths.

Here, on the shipped base model and "desc" (learning rates: those ``qalora_bits``'s sweep chose, QLoRA
1e-2 and QA-LoRA 8e-2): QLoRA is trained once (NF4 base; its training does not
depend on the group size) and deployed at each (bits, group size) by ``qalora.quantize_model_groupwise``;
QA-LoRA is trained and deployed (``lora.merge_and_unload``) at each (bits, group size). Measured as in
``qalora_bits``: exact match on "desc" and the pre-training tasks, trained and deployed, the logits'
change at deployment, the stored bits per weight, and the base model quantized each way before
fine-tuning.

The learning rates were chosen at group size 32. The pooled input is larger at small groups (the mean
of 8 channels varies about twice as much as the mean of 32), so the same learning rate takes larger
steps there; ``lr_checks`` re-trains QA-LoRA at group 8 with half the learning rate to see how much of
a result is the learning rate's.
"""

from __future__ import annotations

import numpy as np

from .common import base_model, measure
from .qalora_bits import (
    mean_over_seeds,
    per_seed,
    quantized_base,
    select,
    train_and_deploy_all,
    train_and_deploy_qalora,
)
from .qlora_vs_lora import all_eval_sets

TITLE = "Group size: QLoRA re-quantized vs QA-LoRA merged at INT2 / INT3, groups of 8 to 64 input channels"
PAPER = "QA-LoRA (Xu et al., 2023), section 3.3 (group-wise quantization, L = D_in / group size) and section 4 " \
        "(ablation of the group size)"

SCALES = {
    "full": {"group_sizes": [8, 16, 32, 64], "bits": [2, 3], "seeds": [0], "r": 8, "alpha": 16, "steps": 600,
             "batch_size": 64, "lr_qlora": 1e-2, "lr_qalora": 8e-2, "eval_rows": 256, "pretrain_rows": 128,
             "lr_checks": [{"bits": 2, "group_size": 8, "lr": 4e-2}, {"bits": 3, "group_size": 8, "lr": 4e-2}]},
    "slice": {"group_sizes": [8, 64], "bits": [2], "seeds": [0], "r": 8, "alpha": 16, "steps": 40, "batch_size": 16,
              "lr_qlora": 1e-2, "lr_qalora": 8e-2, "eval_rows": 64, "pretrain_rows": 32, "lr_checks": []},
    "test": {"group_sizes": [8, 64], "bits": [2], "seeds": [0], "r": 8, "alpha": 16, "steps": 20, "batch_size": 16,
             "lr_qlora": 1e-2, "lr_qalora": 8e-2, "eval_rows": 32, "pretrain_rows": 16, "lr_checks": []},
}


def run(scale: str = "full", progress: bool = True) -> dict:
    s = SCALES[scale]
    evals = all_eval_sets(s["eval_rows"], s["pretrain_rows"])
    cells = [(b, g) for b in s["bits"] for g in s["group_sizes"]]
    rows, curves = train_and_deploy_all(s, cells, evals, curve_stride=5, curve_keys=("bits", "group_size"),
                                        desc=f"qalora_group_size ({scale})", progress=progress)
    checks = []
    for c in s["lr_checks"]:
        row = train_and_deploy_qalora(s, s["seeds"][0], c["bits"], c["group_size"], evals, lr=c["lr"])
        row["loss"] = row["loss"][::5]
        checks.append(row)
    bases = [quantized_base(b, g, evals) for b, g in cells]
    base_float, _ = measure(base_model(), evals)
    result = {"rows": rows, "curves": curves, "curve_stride": 5, "quantized_base": bases, "base_float": base_float,
              "lr_checks": checks}
    result["findings"] = findings(result, s)
    return result


def findings(result: dict, s: dict) -> list[str]:
    rows = result["rows"]
    n = len(s["seeds"])
    lines = [f"r = {s['r']}, alpha = {s['alpha']}, {s['steps']} steps of batch {s['batch_size']} on 'desc', learning "
             f"rates QLoRA {s['lr_qlora']:g} and QA-LoRA {s['lr_qalora']:g}, mean of {n} seed{'s' if n > 1 else ''}; "
             f"QLoRA trained once: desc {mean_over_seeds(rows, 'qlora', 'trained'):.1%}"]
    for b in s["bits"]:
        parts = []
        for g in s["group_sizes"]:
            qd = mean_over_seeds(rows, "qlora", "deployed", bits=b, group_size=g)
            ad = mean_over_seeds(rows, "qalora", "deployed", bits=b, group_size=g)
            dep_bits = next(r["deployed"]["deployed_bits"] for r in rows if r["bits"] == b and r["group_size"] == g)
            parts.append(f"g{g} ({dep_bits:.2f} bits) QLoRA {qd:.1%} / QA-LoRA {ad:.1%}")
        lines.append(f"INT{b}, desc exact match deployed: " + "; ".join(parts))
        a_equal = all(r["deployed"]["exact_match"] == r["trained"]["exact_match"]
                      for r in select(rows, "qalora", bits=b))
        q_rel = [float(np.mean([r["deployed"]["logits_rel"] for r in select(rows, "qlora", bits=b, group_size=g)]))
                 for g in s["group_sizes"]]
        lines.append(f"INT{b}: QA-LoRA deployed = trained at every group size ({a_equal}); QLoRA's logits change "
                     "at deployment: " + ", ".join(f"g{g} {v:.2e}" for g, v in zip(s["group_sizes"], q_rel)))
        bases = [q for q in result["quantized_base"] if q["bits"] == b]
        lines.append(f"INT{b}, the base model before fine-tuning, pre-training tasks: " + ", ".join(
            f"g{q['group_size']} {q['pretrain_mean']:.1%}" for q in bases)
            + f" (float32 {result['base_float']['pretrain_mean']:.1%})")
    for c in result.get("lr_checks", []):
        b, g = c["bits"], c["group_size"]
        at = mean_over_seeds(rows, "qalora", "deployed", bits=b, group_size=g)
        lines.append(f"QA-LoRA INT{b} g{g} at learning rate {c['lr']:g} instead of {s['lr_qalora']:g}: desc "
                     f"{c['deployed']['exact_match']['desc']:.1%} (vs {at:.1%}), final loss {c['final_loss']:.4f}")
    return lines


def figure_data(result: dict) -> dict:
    """What ``plots.qalora.plot_qalora_group_size`` draws: per bit width and method the mean deployed exact match on
    "desc" (%) at each group size, QLoRA's trained score, the learning-rate checks and the stored bits per weight."""
    rows = result["rows"]
    if not rows:
        raise ValueError("the qalora_group_size result holds no rows")
    bits = sorted({r["bits"] for r in rows}, reverse=True)
    sizes = sorted({r["group_size"] for r in rows})
    return {"bits": bits, "group_sizes": sizes,
            "qlora_trained": float(np.mean([100 * r["trained"]["exact_match"]["desc"] for r in rows
                                            if r["method"] == "qlora"])),
            "deployed": {m: {b: [float(np.mean(per_seed(rows, m, "deployed", bits=b, group_size=g))) for g in sizes]
                             for b in bits} for m in ("qlora", "qalora")},
            "lr_checks": [{"bits": c["bits"], "group_size": c["group_size"], "lr": c["lr"],
                           "desc": 100 * c["deployed"]["exact_match"]["desc"]}
                          for c in result.get("lr_checks", []) if c["group_size"] in sizes],
            "deployed_bits": {b: [next(r["deployed"]["deployed_bits"] for r in rows
                                       if r["bits"] == b and r["group_size"] == g) for g in sizes] for b in bits}}


def plot(result: dict):
    from ..plots.qalora import plot_qalora_group_size

    return plot_qalora_group_size(figure_data(result))
