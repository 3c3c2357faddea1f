"""The learning rate x rank grid: does the best learning rate stay put as r changes, with alpha/r and with rsLoRA?

LoRA (Hu et al., 2021), section 4.1: "We then scale dW x by alpha/r, where alpha is a constant in
r. When optimizing with Adam, tuning alpha is roughly the same as tuning the learning rate if we
scale the initialization appropriately." Kalajdzievski (2023, "A Rank Stabilization Scaling
Factor for Fine-Tuning with LoRA", rsLoRA) argues that alpha/r makes the learning of large ranks
collapse (the adapter's output and gradients shrink as r grows, so large ranks learn no better
than small ones), and that only s = alpha/sqrt(r) keeps them rank-stable; one consequence is that
with alpha/r the learning rate that works best should move with r, with rsLoRA it should not.

Here both scalings are put to the test on the shipped base model: LoRA on all six matrices,
fine-tuned on "desc" for every rank and learning rate of the grid, with the same alpha, batches
and init seed. A run is scored by its held-out loss (cross-entropy on held-out "desc" rows after
training; lower is better), with exact match and the final size of the update ||s B A||_F
(summed over the adapted matrices) recorded next to it. The best learning rate of each rank is
the grid's lowest held-out loss in that rank's row. At r = 1 both scalings are s = alpha, so that
row is trained once per learning rate and entered in both grids (the same scores and seconds).

Used live by notebook 5: ``update_sizes`` measures the size of the update over the first steps
for the three scalings alpha/r, alpha/sqrt(r) and none (s = 1), at one learning rate, and
``size_slope`` fits its power of r; ``finetune_curve`` shows that with Adam (alpha, lr, A) and
(c alpha, lr / sqrt(c), A / sqrt(c)) are the same run (section 4.1: "tuning alpha is roughly the
same as tuning the learning rate if we scale the initialization appropriately").
"""

from __future__ import annotations

import numpy as np

from .. import data, train
from ..adapter import TARGETS, lora_scaling
from ..backend import to_numpy
from ..lora import lora_layers
from ..methods import adapt
from ..train import held_out_loss
from .common import base_model, desc_config, eval_sets, progress_bar
from .init_curves import train_and_watch

TITLE = "Learning rate x rank: the best learning rate per rank with alpha/r and with rsLoRA's alpha/sqrt(r)"
PAPER = ("LoRA (Hu et al., 2021), section 4.1 (the alpha/r scaling); rsLoRA (Kalajdzievski, 2023, "
         "'A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA')")

SCALINGS = {"alpha/r": False, "alpha/sqrt(r)": True}  # name -> use_rslora

SCALES = {
    "full": {"ranks": [1, 2, 4, 8, 16, 32, 64], "lrs": [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2],
             "scalings": ["alpha/r", "alpha/sqrt(r)"], "alpha": 16, "steps": 150, "batch_size": 32, "seed": 0,
             "eval_rows": 256},
    "slice": {"ranks": [1, 64], "lrs": [5e-4, 8e-3], "scalings": ["alpha/r", "alpha/sqrt(r)"], "alpha": 16,
              "steps": 20, "batch_size": 16, "seed": 0, "eval_rows": 64},
    "test": {"ranks": [1, 64], "lrs": [5e-4, 8e-3], "scalings": ["alpha/r", "alpha/sqrt(r)"], "alpha": 16,
             "steps": 20, "batch_size": 16, "seed": 0, "eval_rows": 32},
}


def update_norm(model) -> float:
    """||s B A||_F over every adapted matrix of the model: sqrt(sum of squares), in float64."""
    return float(np.sqrt(sum(np.sum(to_numpy(layer.delta_weight()).astype(np.float64) ** 2)  # (d, k) -> scalar
                             for layer in lora_layers(model).values())))


def grid_run(r: int, lr: float, use_rslora: bool, settings: dict, evals: dict) -> dict:
    """One cell of the grid: fine-tune LoRA at rank r and learning rate lr; its scores."""
    model = base_model()
    adapt(model, "lora", r, settings["alpha"], TARGETS, seed=settings["seed"], use_rslora=use_rslora)
    cfg = desc_config(settings["steps"], settings["batch_size"], lr, settings["seed"])
    hist = train.train(model, cfg, progress=False, eval_sets=evals)
    tail = hist["loss"][-10:]
    loss = held_out_loss(model, evals)
    return {"held_out_loss": loss if np.isfinite(loss) else None, "final_train_loss": float(np.mean(tail)),
            "exact_match": hist["eval"][-1][1][data.FINETUNE_TASK], "update_norm": update_norm(model),
            "seconds": round(hist["seconds"], 2)}


def best_lrs(cells: dict, ranks, lrs, key: str = "held_out_loss") -> list[float]:
    """The learning rate with the lowest ``key`` for each rank (cells: "r,lr" -> scores)."""
    out = []
    for r in ranks:
        scores = [cells[f"{r},{lr:g}"][key] for lr in lrs]
        scores = [np.inf if s is None else s for s in scores]
        out.append(float(lrs[int(np.argmin(scores))]))
    return out


def run(scale: str = "full", progress: bool = True) -> dict:
    settings = SCALES[scale]
    evals = eval_sets(settings["eval_rows"])
    jobs = [(name, r, lr) for name in settings["scalings"] for r in settings["ranks"] for lr in settings["lrs"]]
    grids = {name: {} for name in settings["scalings"]}
    done = {}  # (r, s, lr) -> scores; at r = 1 alpha / r = alpha / sqrt(r): the two scalings share one run
    for name, r, lr in progress_bar(jobs, progress, "lr x rank"):
        run_key = (r, lora_scaling(r, settings["alpha"], SCALINGS[name]), lr)
        if run_key not in done:
            try:
                done[run_key] = grid_run(r, lr, SCALINGS[name], settings, evals)
            except train.TrainingDiverged:
                done[run_key] = {"held_out_loss": None, "final_train_loss": None, "exact_match": 0.0,
                                 "update_norm": None, "seconds": None, "diverged": True}
        grids[name][f"{r},{lr:g}"] = dict(done[run_key])  # a shared run: its scores and seconds in each grid
    best = {name: best_lrs(grids[name], settings["ranks"], settings["lrs"]) for name in grids}
    return {"grids": grids, "best_lr": best, "findings": findings(grids, best, settings)}


def learning_lrs(grids: dict, ranks, lrs) -> list[float]:
    """The learning rates at which every run of every scaling learned something (exact match > 0)."""
    return [lr for lr in lrs if all(grid[f"{r},{lr:g}"]["exact_match"] > 0 for grid in grids.values() for r in ranks)]


def largest_working_lr(grid: dict, ranks, lrs, exact_match: float = 0.5) -> float | None:
    """The largest learning rate at which every rank reaches at least ``exact_match`` (None if there is none)."""
    ok = [lr for lr in lrs if all(grid[f"{r},{lr:g}"]["exact_match"] >= exact_match for r in ranks)]
    return max(ok) if ok else None


def findings(grids: dict, best: dict, settings: dict) -> list[str]:
    ranks, lrs = settings["ranks"], settings["lrs"]
    out = [f"alpha = {settings['alpha']}, {settings['steps']} steps of batch {settings['batch_size']} on 'desc', "
           f"LoRA on all six matrices; ranks {ranks}; learning rates {[f'{lr:g}' for lr in lrs]}"]
    out.append("; ".join(f"best lr per rank with {name}: " + ", ".join(f"r={r}: {lr:g}" for r, lr in zip(ranks, b))
                         for name, b in best.items()))
    for name, grid in grids.items():
        at_best = [grid[f"{r},{lr:g}"] for r, lr in zip(ranks, best[name])]
        spread = np.log2(max(best[name]) / min(best[name]))
        out.append(f"{name}: the best lr spans a factor {2 ** spread:g} over the ranks; held-out loss at the best lr "
                   + ", ".join(f"r={r}: {c['held_out_loss']:.3f}" for r, c in zip(ranks, at_best))
                   + "; exact match " + ", ".join(f"{c['exact_match']:.0%}" for c in at_best))
    shared = learning_lrs(grids, ranks, lrs)
    lo, hi = ranks[min(2, len(ranks) - 1)], ranks[-1]
    if shared and lo != hi:
        parts = []
        for name, grid in grids.items():
            ratios = [grid[f"{hi},{lr:g}"]["held_out_loss"] / grid[f"{lo},{lr:g}"]["held_out_loss"] for lr in shared]
            parts.append(f"{name} {min(ratios):.2f} to {max(ratios):.2f}")
        where = ", ".join(f"{lr:g}" for lr in shared)
        out.append(f"at every lr where all runs learned ({where}), the held-out loss at r={hi} divided by that at "
                   f"r={lo}: " + "; ".join(parts))
        lr = shared[-1]
        out.append(f"final ||s B A||_F at lr {lr:g} from r={ranks[0]} to r={hi}: " + "; ".join(
            f"{name} " + ", ".join(f"{grid[f'{r},{lr:g}']['update_norm']:.1f}" for r in ranks)
            for name, grid in grids.items()))
    working = {name: largest_working_lr(grid, ranks, lrs) for name, grid in grids.items()}
    out.append("the largest lr at which every rank reaches 50% exact match: "
               + "; ".join(f"{name} {'none' if lr is None else f'{lr:g}'}" for name, lr in working.items()))
    lowest = {}
    for name, grid in grids.items():
        key = min((k for k in grid if grid[k]["held_out_loss"] is not None), key=lambda k: grid[k]["held_out_loss"])
        r, lr = key.split(",")
        lowest[name] = f"{name} {grid[key]['held_out_loss']:.3f} (r={r}, lr {lr})"
    out.append("lowest held-out loss of the grid: " + "; ".join(lowest.values()))
    return out


# ---------------------------------------------------------------- the update's size, live in notebook 5
UPDATE_SCALINGS = ("alpha/r", "alpha/sqrt(r)", "none (s = 1)")


def scaled_model(r: int, alpha: float, scaling: str, seed: int = 0):
    """The base model with LoRA at rank r and the scaling named ``scaling`` (s = 1 is alpha = r under alpha/r)."""
    if scaling not in UPDATE_SCALINGS:
        raise ValueError(f"unknown scaling {scaling!r}; scalings: {list(UPDATE_SCALINGS)}")
    model = base_model()
    if scaling == "none (s = 1)":
        return adapt(model, "lora", r, float(r), TARGETS, seed=seed)
    return adapt(model, "lora", r, alpha, TARGETS, seed=seed, use_rslora=scaling == "alpha/sqrt(r)")


def finetune_curve(r: int, alpha: float, lr: float, *, a_scale: float = 1.0, steps: int = 20, batch_size: int = 16,
                   exact_adam: bool = False, seed: int = 0) -> dict:
    """The training history of LoRA at (r, alpha, lr) with A's random start multiplied by ``a_scale``.

    ``exact_adam=True`` turns weight decay and gradient clipping off, leaving plain Adam, for which
    (alpha, lr, A) and (c alpha, lr / sqrt(c), A / sqrt(c)) give the same training run up to rounding.
    """
    model = adapt(base_model(), "lora", r, alpha, TARGETS, seed=seed)
    for layer in lora_layers(model).values():
        layer.lora_A.data = layer.lora_A.data * a_scale  # (r, k)
    extra = {"weight_decay": 0.0, "grad_clip": 0.0} if exact_adam else {}
    cfg = desc_config(steps, batch_size, lr, seed, **extra)
    return train.train(model, cfg, progress=False, eval_sets=eval_sets(8))


def update_sizes(ranks, alpha: float = 16, lr: float = 2e-3, steps: int = 20, every: int = 5, batch_size: int = 16,
                 scalings=UPDATE_SCALINGS, seed: int = 0) -> dict:
    """||s B A||_F (all adapted matrices) after each ``every`` steps of fine-tuning, per scaling and rank.

    Returns {scaling: {r: [(step, norm), ...]}}; every run has the same init seed, batches and
    learning-rate schedule.
    """
    out = {}
    for scaling in scalings:
        out[scaling] = {}
        for r in ranks:
            model = scaled_model(r, alpha, scaling, seed)
            _, seen = train_and_watch(model, steps, batch_size, lr, every, update_norm, seed=seed)
            out[scaling][r] = seen
    return out


def size_slope(sizes: dict, scaling: str, step: int) -> float:
    """The exponent p of ||s B A|| ~ r^p at one step: the least-squares slope of log norm against log r."""
    per_rank = sizes[scaling]
    ranks = sorted(per_rank)
    if len(ranks) < 2:
        raise ValueError(f"a slope needs at least two ranks, got {ranks}")
    norms = [dict(per_rank[r])[step] for r in ranks]
    return float(np.polyfit(np.log(ranks), np.log(norms), 1)[0])  # (n,), (n,) -> (slope, intercept)


def plot(result: dict):
    from ..plots.scaling import plot_lr_rank_grid

    return plot_lr_rank_grid(result)
