"""The training loop: batches from ``data``, the step of ``methods.py`` (AdamW, clipping), warm-up + cosine, evaluation.

One loop serves every stage of the tutorial: pre-training the base model
(all parameters trainable), LoRA / QLoRA / QA-LoRA fine-tuning (only the
adapters trainable; the optimizer is built from ``trainable_parameters()``
so frozen weights never get state) and full fine-tuning for comparison.

It is deterministic for a seed (the batches come from a seeded host
generator), shows a tqdm progress bar, evaluates exact match per task every
``eval_every`` steps, and stops with ``TrainingDiverged`` on a NaN or inf
loss, keeping the last good checkpoint on disk untouched.

Host synchronization: one per step. Each batch is made and checked on the
host (ids in range, targets valid: ``functional.check_ids`` and
``check_targets`` on NumPy arrays, before they are moved), so the forward,
the loss, the backward, clipping and the AdamW step run with no host sync
(``methods.train_step``); the loss and the gradient norm are then read in a single
transfer, and a NaN or inf in either stops training (``TrainingDiverged``)
before the optimizer step could spread it into the weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from . import data
from .backend import like
from .checks import check_choice, check_int, check_number
from .functional import check_ids, check_targets, cross_entropy
from .methods import make_optimizer, train_step  # one step of any method (methods.py); the loop is here
from .optim import warmup_cosine


class TrainingDiverged(RuntimeError):
    """Raised when the loss becomes NaN or inf; the message names the step and the last good checkpoint."""


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (defaults: the base model's pre-training recipe)."""

    steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    betas: tuple = (0.9, 0.98)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_per_task: int = 256
    seed: int = 0
    tasks: tuple = data.PRETRAIN_TASKS
    checkpoint: str | None = None  # where to save the model after each evaluation (atomically)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        """Every field checked now, before a model is touched (``checks``): a ValueError naming the field."""
        for name, low in (("steps", 1), ("batch_size", 1), ("warmup_steps", 0), ("eval_every", 0),
                          ("eval_per_task", 1), ("seed", 0)):
            setattr(self, name, check_int(name, getattr(self, name), low))
        self.lr = check_number("lr", self.lr, above=0.0)
        self.min_lr_ratio = check_number("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        self.weight_decay = check_number("weight_decay", self.weight_decay, 0.0)
        self.grad_clip = check_number("grad_clip", self.grad_clip, 0.0)  # 0: no clipping
        if not self.tasks:
            raise ValueError(f"tasks must name at least one task; valid tasks: {list(data.TASKS)}")
        for t in self.tasks:
            check_choice("task", t, data.TASKS)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tasks"] = list(self.tasks)
        d["betas"] = list(self.betas)
        return d


def evaluate(model, eval_sets: dict) -> dict:
    """Exact match per task (one forward pass per task, dropout off)."""
    was_training = model.training
    model.eval()
    try:
        return data.per_task_exact_match(model, eval_sets)
    finally:
        model.train(was_training)


def held_out_loss(model, eval_sets: dict) -> float:
    """Cross-entropy on held-out rows (dropout off), the mean over the tasks of ``eval_sets``."""
    was_training = model.training
    model.eval()
    try:
        losses = [float(cross_entropy(model(idx), targets)[0]) for idx, targets in eval_sets.values()]  # scalars
        return sum(losses) / len(losses)
    finally:
        model.train(was_training)


def _batch(rng, cfg: TrainConfig, block: int, vocab: int, reference):
    """A training batch made and checked on the host, then moved to the backend of ``reference`` (a weight)."""
    idx, targets = data.make_batch(rng, cfg.batch_size, cfg.tasks, block_size=block, xp=np)  # (B, T) each, host
    check_ids(idx, vocab)  # host reductions: no device synchronization
    check_targets(targets, vocab)
    return like(reference, idx), like(reference, targets)  # (B, T) each, on the model's backend


def train(model, cfg: TrainConfig, progress: bool = True, eval_sets: dict | None = None,
          on_eval=None) -> dict:
    """Train ``model`` in place; returns the history (losses, learning rates, evaluations, seconds).

    ``on_eval(step, scores)`` is called after each evaluation (for notebooks).
    """
    from tqdm.auto import tqdm

    from .checkpoint import save_checkpoint

    if cfg.checkpoint:  # a path that cannot be written fails now, not at the first evaluation
        from .outputs import check_output_path

        check_output_path(cfg.checkpoint, "TrainConfig.checkpoint")
    rng = np.random.default_rng(cfg.seed)
    block = model.config.block_size
    vocab = model.config.vocab_size
    if eval_sets is None:
        eval_sets = data.eval_set(cfg.tasks, cfg.eval_per_task, seed=cfg.seed, block_size=block)
    opt = make_optimizer(model, cfg)
    history = {"step": [], "loss": [], "lr": [], "grad_norm": [], "eval": [], "config": cfg.to_dict()}
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), disable=not progress, desc="train", unit="step", dynamic_ncols=True)
    last_good = None
    for step in bar:
        lr = warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.lr, cfg.min_lr_ratio)
        opt.lr = lr
        idx, targets = _batch(rng, cfg, block, vocab, opt.params[0].data)  # (B, T) each
        loss_value, norm_value = train_step(model, opt, idx, targets, cfg.grad_clip)
        bad = None
        if not math.isfinite(loss_value):
            bad = f"loss became {loss_value}"
        elif norm_value is not None and not math.isfinite(norm_value):
            what = "gradient norm" if cfg.grad_clip else "sum of the gradients"  # see train_step
            bad = f"{what} became {norm_value} (loss {loss_value:.4g})"
        if bad is not None:  # train_step skipped the optimizer step: the weights are those of the step before
            where = f"; the last good checkpoint (step {last_good}) is at {cfg.checkpoint}" if last_good else ""
            bar.close()
            raise TrainingDiverged(f"{bad} at step {step} (lr {lr:.3g}){where}")
        history["step"].append(step)
        history["loss"].append(loss_value)
        history["lr"].append(lr)
        history["grad_norm"].append(norm_value)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        last = step == cfg.steps - 1
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last:
            scores = evaluate(model, eval_sets)
            history["eval"].append((step + 1, scores))
            if progress:
                bar.write(f"step {step + 1}: loss {loss_value:.4f}  exact match "
                          + "  ".join(f"{t} {s:.1%}" for t, s in scores.items()))
            if cfg.checkpoint:
                save_checkpoint(model, cfg.checkpoint, metadata={"step": step + 1, "exact_match": scores})
                last_good = step + 1
            if on_eval is not None:
                on_eval(step + 1, scores)
    bar.close()
    history["seconds"] = time.perf_counter() - t0
    # what training had to hold besides the weights: gradients and AdamW moments, measured
    history["gradient_bytes"] = sum(int(p.grad.nbytes) for p in opt.params if p.grad is not None)
    history["optimizer_state_bytes"] = opt.state_nbytes()
    return history
