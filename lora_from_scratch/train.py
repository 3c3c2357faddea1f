"""The training loop: batches from ``data``, AdamW, clipping, warm-up + cosine, evaluation.

One loop serves every stage of the tutorial: pre-training the base model
(all parameters trainable), LoRA / QLoRA / QA-LoRA fine-tuning (only the
adapters trainable; the optimizer is built from ``trainable_parameters()``
so frozen weights never get state) and full fine-tuning for comparison.

It is deterministic for a seed (the batches come from a seeded host
generator), shows a tqdm progress bar, evaluates exact match per task every
``eval_every`` steps, and stops with ``TrainingDiverged`` on a NaN or inf
loss, keeping the last good checkpoint on disk untouched.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from . import data
from .functional import cross_entropy
from .optim import AdamW, clip_grad_norm, warmup_cosine


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
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError(f"steps and batch_size must be positive, got {self.steps}, {self.batch_size}")
        unknown = [t for t in self.tasks if t not in data.TASKS]
        if unknown:
            raise ValueError(f"unknown task {unknown[0]!r}; valid tasks: {list(data.TASKS)}")

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


def make_optimizer(model, cfg: TrainConfig) -> AdamW:
    """AdamW over the trainable parameters; weight decay on matrices only (not biases, gains or 1-D vectors)."""
    params = model.trainable_parameters()
    decay = [p for p in params if len(p.shape) >= 2]
    no_decay = [p for p in params if len(p.shape) < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def train(model, cfg: TrainConfig, progress: bool = True, eval_sets: dict | None = None,
          on_eval=None) -> dict:
    """Train ``model`` in place; returns the history (losses, learning rates, evaluations, seconds).

    ``on_eval(step, scores)`` is called after each evaluation (for notebooks).
    """
    from tqdm.auto import tqdm

    from .io import save_checkpoint

    rng = np.random.default_rng(cfg.seed)
    block = model.config.block_size
    if eval_sets is None:
        eval_sets = data.eval_set(cfg.tasks, cfg.eval_per_task, seed=cfg.seed, block_size=block)
    opt = make_optimizer(model, cfg)
    history = {"step": [], "loss": [], "lr": [], "eval": [], "config": cfg.to_dict()}
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), disable=not progress, desc="train", unit="step", dynamic_ncols=True)
    last_good = None
    for step in bar:
        lr = warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.lr, cfg.min_lr_ratio)
        opt.lr = lr
        idx, targets = data.make_batch(rng, cfg.batch_size, cfg.tasks, block_size=block)  # (B, T) each
        logits = model(idx)  # (B, T) -> (B, T, V)
        loss, dlogits = cross_entropy(logits, targets)
        loss_value = float(loss)
        if not math.isfinite(loss_value):
            where = f"; the last good checkpoint (step {last_good}) is at {cfg.checkpoint}" if last_good else ""
            bar.close()
            raise TrainingDiverged(f"loss became {loss_value} at step {step} (lr {lr:.3g}){where}")
        model.zero_grad()
        model.backward(dlogits)
        if cfg.grad_clip:
            clip_grad_norm(opt.params, cfg.grad_clip)
        opt.step()
        history["step"].append(step)
        history["loss"].append(loss_value)
        history["lr"].append(lr)
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
