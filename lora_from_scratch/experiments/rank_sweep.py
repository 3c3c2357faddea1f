"""What rank r does LoRA need? The rank sweep of the LoRA paper's Table 6, at our scale.

LoRA (Hu et al., 2021), section 7.2 and Table 6: GPT-3 175B adapted on {Wq}, {Wq, Wv} and
{Wq, Wk, Wv, Wo} with r = 1, 2, 4, 8 and 64. "To our surprise, a rank as small as one suffices for
adapting both Wq and Wv on these datasets while training Wq alone needs a larger r": on WikiSQL
Wq+Wv scores 73.4 at r = 1 and 73.5 at r = 64 (+-0.5), Wq alone 68.8 at r = 1 and 70.4 at r = 8.

Here: the shipped base model fine-tuned on "desc" with LoRA on the paper's three sets of matrices
and on all six, for r in {1, 2, 4, 8, 16, 64}, with the same alpha (so s = alpha / r, the paper's
scaling), steps and batches. A learning rate that suits r = 1 (s = 16) need not suit r = 64
(s = 0.25), so every (matrices, r) trains at each learning rate of the settings and is scored at
its best one, by held-out loss (cross-entropy on held-out "desc" rows; lower is better), with
exact match next to it. Our task is new to the model (the base model scores 0% on it), which
asks more of the update than the paper's tasks did of GPT-3; how much rank that takes is what
is measured.
"""

from __future__ import annotations

import numpy as np

from ..adapter import TARGETS
from ..memory import lora_trainable_parameters
from .common import eval_sets, progress_bar
from .which_matrices import BASE_SIZE, best_lr, key, label, summarize, train_and_score

TITLE = "The rank sweep: r = 1 ... 64 on Wq, Wq+Wv, the four attention matrices and all six"
PAPER = "LoRA (Hu et al., 2021), section 7.2 and Table 6 (validation accuracy for r = 1, 2, 4, 8, 64)"

SCALES = {
    "full": {"target_sets": [["q"], ["q", "v"], ["q", "k", "v", "o"], list(TARGETS)], "ranks": [1, 2, 4, 8, 16, 64],
             "alpha": 16, "lrs": [3e-3, 6e-3, 1.2e-2, 2.4e-2], "seeds": [0], "steps": 150, "batch_size": 32,
             "eval_rows": 256},
    "slice": {"target_sets": [["q", "v"]], "ranks": [1, 8], "alpha": 16, "lrs": [1e-2], "seeds": [0],
              "steps": 40, "batch_size": 16, "eval_rows": 64},
    "test": {"target_sets": [["q", "v"]], "ranks": [1, 8], "alpha": 16, "lrs": [1e-2], "seeds": [0], "steps": 30,
             "batch_size": 16, "eval_rows": 32},
}


def run(scale: str = "full", progress: bool = True) -> dict:
    settings = SCALES[scale]
    evals = eval_sets(settings["eval_rows"])
    jobs = [(tuple(t), r, lr, seed) for t in settings["target_sets"] for r in settings["ranks"]
            for lr in settings["lrs"] for seed in settings["seeds"]]
    runs = {}
    for targets, r, lr, seed in progress_bar(jobs, progress, "rank sweep"):
        scores, _ = train_and_score(targets, r, lr, seed, settings, evals)
        runs.setdefault(key(targets), {}).setdefault(str(r), {}).setdefault(f"{lr:g}", []).append(
            {"seed": seed, **scores})
    sweeps = {}
    for targets in settings["target_sets"]:
        k = key(targets)
        per_rank = {}
        for r in settings["ranks"]:
            by_lr = {lr: summarize(rows) for lr, rows in runs[k][str(r)].items()}
            lr = best_lr(by_lr)
            per_rank[str(r)] = {"r": r, "parameters": lora_trainable_parameters(BASE_SIZE, r, targets),
                                "best_lr": float(lr), **by_lr[lr], "by_lr": by_lr}
        sweeps[k] = {"label": label(targets), "targets": list(targets), "ranks": per_rank}
    return {"runs": runs, "sweeps": sweeps, "findings": findings(sweeps, settings)}


def curve(sweep: dict, what: str = "held_out_loss") -> tuple[list[int], list[float]]:
    """(ranks, the mean of ``what`` at each rank's best learning rate) of one set of matrices."""
    ranks = sorted(sweep["ranks"].values(), key=lambda row: row["r"])
    return [row["r"] for row in ranks], [row[what]["mean"] for row in ranks]


def findings(sweeps: dict, settings: dict) -> list[str]:
    out = [f"alpha = {settings['alpha']} (s = alpha / r), lr in {settings['lrs']} (best per rank), "
           f"{settings['steps']} steps of batch {settings['batch_size']} on 'desc', seeds {settings['seeds']}; "
           "scored by held-out loss"]
    for sweep in sweeps.values():
        ranks, loss = curve(sweep)
        _, em = curve(sweep, "exact_match")
        lrs = [sweep["ranks"][str(r)]["best_lr"] for r in ranks]
        cells = ", ".join(f"r={r}: {v:.3f} ({e:.0%}, lr {lr:g})" for r, v, e, lr in zip(ranks, loss, em, lrs))
        out.append(f"{sweep['label']}: held-out loss (exact match, best lr) {cells}")
        best = int(np.argmin(loss))
        out.append(f"{sweep['label']}: best r = {ranks[best]}; r = {ranks[0]} reaches held-out loss {loss[0]:.3f} "
                   f"against {loss[best]:.3f} at the best rank")
    if "q" in sweeps and "q+v" in sweeps:
        rq, lq = curve(sweeps["q"])
        rqv, lqv = curve(sweeps["q+v"])
        common = [r for r in rq if r in rqv]
        wins = sum(lqv[rqv.index(r)] < lq[rq.index(r)] for r in common)
        out.append(f"Wq+Wv beats Wq alone at {wins} of {len(common)} ranks (the paper: at every rank)")
    return out


def curves(result: dict) -> dict:
    """Per set of matrices, in the order of the settings: {"label", "r", "held_out_loss", "exact_match"} (``curve``)."""
    sweeps = result["sweeps"]
    order = ["+".join(t) for t in result.get("settings", {}).get("target_sets", [])] or list(sweeps)
    out = {}
    for k in order:
        ranks, loss = curve(sweeps[k])
        out[k] = {"label": sweeps[k]["label"], "r": ranks, "held_out_loss": loss,
                  "exact_match": curve(sweeps[k], "exact_match")[1]}
    return out


def plot(result: dict):
    from ..plots.transformer import plot_rank_sweep

    return plot_rank_sweep(curves(result))
