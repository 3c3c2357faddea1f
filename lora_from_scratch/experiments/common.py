"""What the experiments share: a fine-tune of the shipped base model on the new task, measured.

``finetune(method, ...)`` loads the pre-trained base model (copy / reverse / sort / upper; 0% on
"desc"), adapts it with ``methods.adapt``, trains on "desc" with the library's training loop
(AdamW, warm-up and cosine decay, gradient clipping) and returns the numbers an experiment
reports: the loss curve, exact match on held-out "desc" rows (and, if asked, on the pre-training
tasks), the seconds, and the model itself.
"""

from __future__ import annotations

import numpy as np

from .. import data, train
from ..io import BASE_CHECKPOINT, load_checkpoint
from ..methods import adapt
from ..targets import TARGETS


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
             evals=None, model=None, progress: bool = False, **adapt_kwargs) -> dict:
    """Adapt the base model with ``method`` and fine-tune it on "desc"; returns the measurements.

    ``evals``: the evaluation sets (default: 128 held-out "desc" rows); ``model``: start from this
    model instead of a fresh base model; ``adapt_kwargs`` go to ``methods.adapt`` (init, use_rslora,
    bits, group_size, dropout, ...). Returns ``{"loss": [...], "exact_match": {task: score},
    "final_loss": mean of the last 10 losses, "seconds", "model"}`` (drop "model" before saving).
    """
    model = base_model() if model is None else model
    adapt(model, method, r, alpha, targets, seed=seed, **adapt_kwargs)
    evals = eval_sets() if evals is None else evals
    cfg = desc_config(steps, batch_size, lr, seed, warmup_steps=warmup_steps)
    hist = train.train(model, cfg, progress=progress, eval_sets=evals)
    scores = hist["eval"][-1][1]
    tail = hist["loss"][-10:]
    return {"loss": [round(v, 5) for v in hist["loss"]], "exact_match": scores,
            "final_loss": sum(tail) / len(tail), "seconds": hist["seconds"], "model": model}


def progress_bar(items, progress: bool, desc: str):
    """A tqdm bar over ``items`` (or the items themselves when ``progress`` is False)."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=not progress, dynamic_ncols=True)
