"""What the experiments and the demo share: a fine-tune of the shipped base model on the new task, measured.

``finetune(method, ...)`` loads the pre-trained base model (copy / reverse / sort / upper; 0% on
"desc"), adapts it with ``methods.adapt`` (or takes a model already adapted), trains on "desc"
with the library's training loop (AdamW, warm-up and cosine decay, gradient clipping) and returns
the numbers an experiment reports: the loss curve, exact match on held-out "desc" rows (and, if
asked, on the pre-training tasks), the seconds, what training held, and the model itself.

``measure(model, evals, reference)`` scores a model on held-out rows: exact match per task, the
mean over the pre-training tasks, the loss on "desc" and, given another model's logits, how far
this model's logits moved from them (how a deployment is judged).
"""

from __future__ import annotations

import math

import numpy as np

from .. import data, train
from ..adapter import TARGETS
from ..backend import to_numpy
from ..checkpoint import BASE_CHECKPOINT, load_checkpoint
from ..functional import cross_entropy
from ..methods import adapt


def base_model(path: str = BASE_CHECKPOINT):
    """A fresh copy of the pre-trained base model (float32)."""
    return load_checkpoint(path)


def eval_sets(n_per_task: int = 128, seed: int = 1, tasks=(data.FINETUNE_TASK,)):
    """Held-out rows per task (a stream apart from every training seed)."""
    return data.eval_set(tuple(tasks), n_per_task, seed=seed)


def desc_config(steps: int, batch_size: int, lr: float, seed: int = 0, *, warmup_steps: int | None = None,
                eval_every: int = 0, **extra) -> train.TrainConfig:
    """The training recipe of a fine-tune on "desc": warm-up over the first tenth (at least one step), no evaluation
    during training unless ``eval_every`` says so; ``extra`` sets any other field of ``train.TrainConfig``."""
    return train.TrainConfig(steps=steps, batch_size=batch_size, lr=lr,
                             warmup_steps=max(1, steps // 10) if warmup_steps is None else warmup_steps,
                             tasks=(data.FINETUNE_TASK,), eval_every=eval_every, seed=seed, **extra)


def spread(values) -> dict:
    """{"mean", "min", "max"} of ``values`` (over seeds), as Python floats."""
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values))}


def finetune(method: str = "lora", r: int = 8, alpha: float = 16, targets=TARGETS, *, steps: int = 200,
             batch_size: int = 32, lr: float = 3e-3, seed: int = 0, warmup_steps: int | None = None,
             evals=None, model=None, adapted: bool = False, progress: bool = False, **adapt_kwargs) -> dict:
    """Adapt the base model with ``method`` and fine-tune it on "desc"; returns the measurements.

    ``evals``: the evaluation sets (default: 128 held-out "desc" rows); ``model``: start from this
    model instead of a fresh base model; ``adapted=True``: ``model`` is already adapted with
    ``method`` (r, alpha, targets and ``adapt_kwargs`` are then not used); else ``adapt_kwargs`` go
    to ``methods.adapt`` (init, use_rslora, bits, group_size, dropout, ...). Returns ``{"loss":
    [...], "exact_match": {task: score}, "final_loss": mean of the last 10 losses, "seconds",
    "state_bytes": the gradients and AdamW moments training held, "model"}`` (drop "model" before saving).
    """
    if adapted and model is None:
        raise ValueError("adapted=True needs the adapted model: pass model=")
    model = base_model() if model is None else model
    if not adapted:
        adapt(model, method, r, alpha, targets, seed=seed, **adapt_kwargs)
    evals = eval_sets() if evals is None else evals
    cfg = desc_config(steps, batch_size, lr, seed, warmup_steps=warmup_steps)
    hist = train.train(model, cfg, progress=progress, eval_sets=evals)
    return {"loss": [round(v, 5) for v in hist["loss"]], "exact_match": hist["eval"][-1][1],
            "final_loss": float(np.mean(hist["loss"][-10:])), "seconds": hist["seconds"],
            "state_bytes": int(hist["gradient_bytes"] + hist["optimizer_state_bytes"]), "model": model}


# ---------------------------------------------------------------- measuring a model
def logits_of(model, evals: dict) -> dict:
    """task -> logits (B, T, V) on the host in float64, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        return {task: to_numpy(model(idx)).astype(np.float64) for task, (idx, _) in evals.items()}  # (B, T, V)
    finally:
        model.train(was_training)


def relative_change(before: dict, after: dict) -> float:
    """||after - before|| / ||before|| over the logits of every task of ``before`` together (Frobenius norms)."""
    num = sum(float(np.linalg.norm(after[t] - before[t])) ** 2 for t in before)
    den = sum(float(np.linalg.norm(before[t])) ** 2 for t in before)
    return math.sqrt(num) / max(math.sqrt(den), 1e-300)  # one task: exactly ||a - b|| / ||b||


def desc_loss(logits: dict, evals: dict) -> float:
    """The mean cross-entropy per answer token on the held-out "desc" rows."""
    task = data.FINETUNE_TASK
    loss, _ = cross_entropy(logits[task], to_numpy(evals[task][1]))  # (), (B, T, V)
    return float(loss)


def pretrain_mean(scores: dict) -> float | None:
    """The mean exact match over the pre-training tasks in ``scores`` (None when there is none)."""
    values = [scores[t] for t in data.PRETRAIN_TASKS if t in scores]
    return sum(values) / len(values) if values else None


def measure(model, evals: dict, reference: dict | None = None) -> tuple[dict, dict]:
    """(measurements, logits) of ``model`` on the held-out rows ``evals`` (task -> (ids, targets)), in eval mode.

    The measurements: ``exact_match`` per task (as ``train.evaluate``), ``pretrain_mean`` (``pretrain_mean``),
    ``desc_loss`` (None without "desc" rows) and, given ``reference`` (task -> logits of another model, as this
    function returns them), ``logits_rel``: ``relative_change`` over the reference's tasks. The logits:
    task -> (B, T, V) float64 on the host.
    """
    lg = logits_of(model, evals)
    scores = {task: data.exact_match(lg[task], to_numpy(evals[task][1])) for task in evals}
    out = {"exact_match": scores, "pretrain_mean": pretrain_mean(scores),
           "desc_loss": desc_loss(lg, evals) if data.FINETUNE_TASK in evals else None}
    if reference is not None:
        out["logits_rel"] = relative_change(reference, lg)
    return out, lg


def percent(v) -> str:
    """A score in [0, 1] as a percentage with one decimal ("97.3%"), or "n/a" for None."""
    return "n/a" if v is None else f"{100 * v:.1f}%"


def progress_bar(items, progress: bool, desc: str):
    """A tqdm bar over ``items`` (or the items themselves when ``progress`` is False)."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=not progress, dynamic_ncols=True)
