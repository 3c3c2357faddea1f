"""Which weight matrices to adapt at a fixed parameter budget (the LoRA paper's Table 5, at our scale).

LoRA (Hu et al., 2021), section 7.1 and Table 5: with a budget of 18M trainable parameters on
GPT-3 175B, the adapter goes on one attention matrix with r = 8 (Wq, Wk, Wv or Wo), on two with
r = 4 (Wq+Wk, Wq+Wv) or on all four with r = 2; "adapting both Wq and Wv gives the best
performance overall" (Wq+Wv and all four tie on WikiSQL, 73.7; all four is best on MultiNLI),
and putting the whole budget into Wq or Wk alone is clearly worse. The paper leaves the MLP out
(section 4.2: "we leave the empirical investigation of adapting the MLP layers ... to future
work").

Here the same comparison runs on the shipped base model (4 blocks, width 128) fine-tuned on the
new task "desc". The budget is the paper's in rank units: r x (number of matrices) = 8 on the
square 128 x 128 attention matrices, i.e. 8 * 2 * 128 = 2,048 parameters per block, 8,192 in all
(1% of the model). The MLP matrices are 128 x 512, so a rank costs 640 parameters there: their
configurations get the rank whose parameter count comes nearest the budget (``budget_rank``):
W_up or W_down alone r = 3 (0.94 x the budget), both r = 2 (1.25 x), all six matrices r = 1
(1.125 x, the smallest there is). Every configuration trains with the same alpha, steps and
batches, at each learning rate of the settings, with several seeds (one seed draws both the
adapter's initial A and the batches); a configuration is scored at its best learning rate by its
held-out loss (cross-entropy on held-out "desc" rows after training, lower is better), with exact
match on the same rows next to it.

The helpers here (``budget_rank``, ``label``, ``held_out_loss``, ``lora_model``, ``train_and_score``) are shared with
the ``rank_sweep`` and ``update_subspaces`` experiments and notebook 6.
"""

from __future__ import annotations

import numpy as np

from .. import data, train
from ..adapter import TARGETS
from ..lora import count_parameters
from ..memory import PRESETS, lora_trainable_parameters
from ..methods import adapt
from ..train import held_out_loss
from .common import base_model, eval_sets, finetune, progress_bar, spread

TITLE = "Which matrices to adapt at a fixed parameter budget: Wq, Wk, Wv, Wo, pairs, all four, the MLP"
PAPER = "LoRA (Hu et al., 2021), section 7.1 and Table 5 (which weight matrices, at a fixed budget)"

BASE_SIZE = PRESETS["lfs-base"]  # the shipped base model: 4 blocks, width 128, MLP 512
PAPER_BUDGET_RANKS = 8  # Table 5: r = 8 on one 12288 x 12288 matrix per block (18.9M on GPT-3 175B)
BUDGET = lora_trainable_parameters(BASE_SIZE, PAPER_BUDGET_RANKS, ("q",))  # 4 * 8 * (128 + 128) = 8,192

CONFIGS = [["q"], ["k"], ["v"], ["o"], ["q", "k"], ["q", "v"], ["q", "k", "v", "o"],
           ["fc"], ["proj"], ["fc", "proj"], list(TARGETS)]
PAPER_CONFIGS = CONFIGS[:7]  # the seven columns of Table 5; the paper does not adapt the MLP
# Table 5, validation accuracy (%) of GPT-3 175B at 18M trainable parameters (WikiSQL +-0.5, MultiNLI +-0.1)
PAPER_TABLE5 = {"q": (70.4, 91.0), "k": (70.0, 90.8), "v": (73.0, 91.0), "o": (73.2, 91.3),
                "q+k": (71.4, 91.3), "q+v": (73.7, 91.3), "q+k+v+o": (73.7, 91.7)}

SCALES = {
    "full": {"configs": CONFIGS, "budget": BUDGET, "alpha": 16, "lrs": [3e-3, 6e-3, 1.2e-2, 2.4e-2], "seeds": [0, 1, 2],
             "steps": 150, "batch_size": 32, "eval_rows": 256},
    "slice": {"configs": [["q"], ["q", "v"], ["q", "k", "v", "o"]], "budget": BUDGET, "alpha": 16, "lrs": [1e-2],
              "seeds": [0], "steps": 30, "batch_size": 16, "eval_rows": 64},
    "test": {"configs": [["q"], ["q", "k", "v", "o"]], "budget": BUDGET, "alpha": 16, "lrs": [1e-2], "seeds": [0],
             "steps": 40, "batch_size": 16, "eval_rows": 64},
}

_NAMES = {"q": "Wq", "k": "Wk", "v": "Wv", "o": "Wo", "fc": "W_up", "proj": "W_down"}


def label(targets) -> str:
    """'Wq+Wv', 'W_up+W_down', 'all six': how a configuration is called in tables and figures."""
    targets = list(targets)
    if sorted(targets) == sorted(TARGETS):
        return "all six"
    return "+".join(_NAMES[t] for t in targets)


def key(targets) -> str:
    """'q+v': the configuration's key in a result."""
    return "+".join(targets)


def budget_rank(budget: int, targets, size=BASE_SIZE) -> int:
    """The rank whose LoRA parameter count on ``targets`` (every block) comes nearest ``budget`` (at least 1).

    A rank costs n_layer * sum over the targets of (d_out + d_in) parameters (B is d_out x r, A is
    r x d_in): 4 * 256 = 1,024 on one of our attention matrices, 4 * 640 = 2,560 on an MLP matrix.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget <= 0:
        raise ValueError(f"the budget must be a positive number of parameters, got {budget!r}")
    per_rank = lora_trainable_parameters(size, 1, tuple(targets))
    return max(1, int(round(budget / per_rank)))


def lora_model(targets, r: int, alpha: float, init_seed: int):
    """A fresh base model with LoRA at rank r on ``targets`` (every block), A drawn with ``init_seed``."""
    return adapt(base_model(), "lora", r, alpha, list(targets), seed=init_seed)


def train_and_score(targets, r: int, lr: float, seed: int, settings: dict, evals: dict, init_seed: int | None = None,
                    model=None):
    """LoRA on ``targets`` with rank r, fine-tuned on "desc"; returns (scores, model).

    ``seed`` draws the batches, ``init_seed`` (default: ``seed``) the adapters' initial A. ``model``:
    train this LoRA model instead (as ``lora_model(targets, r, settings["alpha"], init_seed)`` makes
    it, e.g. to look at its adapters before training); ``init_seed`` is then not used. Scores:
    held-out loss, exact match (on ``evals``' "desc" rows), the final training loss (mean of the
    last 10 steps), the trainable parameter count and the seconds; a run whose loss becomes NaN or
    inf (``train.TrainingDiverged``) gets held-out loss None and exact match 0.
    """
    if model is None:
        model = lora_model(targets, r, settings["alpha"], seed if init_seed is None else init_seed)
    try:
        out = finetune("lora", steps=settings["steps"], batch_size=settings["batch_size"], lr=lr, seed=seed,
                       evals=evals, model=model, adapted=True)
    except train.TrainingDiverged:  # a NaN or inf loss: the run is scored as failed, the sweep goes on
        return {"held_out_loss": None, "exact_match": 0.0, "final_train_loss": None,
                "parameters": count_parameters(model)[0], "seconds": None}, model
    loss = held_out_loss(model, evals)
    scores = {"held_out_loss": loss if np.isfinite(loss) else None,
              "exact_match": out["exact_match"][data.FINETUNE_TASK],
              "final_train_loss": out["final_loss"],
              "parameters": count_parameters(model)[0],
              "seconds": round(out["seconds"], 2)}
    return scores, model


def summarize(rows: list[dict]) -> dict:
    """mean / min / max over seeds of the held-out loss and exact match (a diverged run counts as inf loss)."""
    return {name: spread([np.inf if row[name] is None else row[name] for row in rows])
            for name in ("held_out_loss", "exact_match")}


def best_lr(by_lr: dict) -> str:
    """The learning rate (a key of ``by_lr``: lr -> summary) with the lowest mean held-out loss."""
    return min(by_lr, key=lambda lr: by_lr[lr]["held_out_loss"]["mean"])


def run(scale: str = "full", progress: bool = True) -> dict:
    settings = SCALES[scale]
    evals = eval_sets(settings["eval_rows"])
    budget = settings["budget"]
    jobs = [(tuple(t), lr, seed) for t in settings["configs"] for lr in settings["lrs"] for seed in settings["seeds"]]
    runs = {}
    for targets, lr, seed in progress_bar(jobs, progress, "which matrices"):
        r = budget_rank(budget, targets)
        scores, _ = train_and_score(targets, r, lr, seed, settings, evals)
        runs.setdefault(key(targets), {}).setdefault(f"{lr:g}", []).append({"seed": seed, **scores})
    configs = {}
    for targets in settings["configs"]:
        k = key(targets)
        r = budget_rank(budget, targets)
        by_lr = {lr: summarize(rows) for lr, rows in runs[k].items()}
        lr = best_lr(by_lr)
        params = lora_trainable_parameters(BASE_SIZE, r, tuple(targets))
        configs[k] = {"label": label(targets), "targets": list(targets), "r": r, "parameters": params,
                      "budget_ratio": params / budget, "best_lr": float(lr), **by_lr[lr], "by_lr": by_lr}
    ranking = sorted(configs, key=lambda k: configs[k]["held_out_loss"]["mean"])
    return {"runs": runs, "configs": configs, "ranking": ranking, "findings": findings(configs, ranking, settings)}


def findings(configs: dict, ranking: list, settings: dict) -> list[str]:
    def line(k):
        c = configs[k]
        loss, em = c["held_out_loss"], c["exact_match"]
        seeds = f" (seeds {loss['min']:.3f}-{loss['max']:.3f})" if len(settings["seeds"]) > 1 else ""
        return (f"{c['label']} (r = {c['r']}, {c['parameters']:,d} parameters = {c['budget_ratio']:.2f} x the budget): "
                f"held-out loss {loss['mean']:.3f}{seeds}, exact match {em['mean']:.1%}, best lr {c['best_lr']:g}")

    out = [f"budget {settings['budget']:,d} LoRA parameters (r x matrices = 8 on the attention matrices), "
           f"alpha = {settings['alpha']}, lr in {settings['lrs']} (best per configuration), {settings['steps']} steps "
           f"of batch {settings['batch_size']} on 'desc', seeds {settings['seeds']}; scored by held-out loss"]
    out += [line(k) for k in ranking]
    out.append("best to worst (held-out loss): " + ", ".join(configs[k]["label"] for k in ranking))
    paper = [k for k in ranking if k in PAPER_TABLE5]
    if len(paper) > 1:
        out.append("among the paper's seven attention configurations, best to worst here: "
                   + ", ".join(configs[k]["label"] for k in paper)
                   + "; the paper (Table 5, GPT-3): Wq+Wv and all four best, Wq or Wk alone worst")
    if "q" in configs and "q+k+v+o" in configs:
        q, four = configs["q"]["held_out_loss"]["mean"], configs["q+k+v+o"]["held_out_loss"]["mean"]
        verdict = "lower: better, as in the paper" if four < q else "not lower: unlike the paper"
        out.append(f"the budget spread over Wq, Wk, Wv, Wo at r = 2 vs all of it in Wq at r = 8: held-out loss "
                   f"{four:.3f} vs {q:.3f} ({verdict})")
    return out


def plot(result: dict):
    from ..plots.transformer import plot_which_matrices

    return plot_which_matrices(result)
