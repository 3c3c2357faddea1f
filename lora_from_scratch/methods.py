"""The four ways to adapt a pre-trained model, by name: full fine-tuning, LoRA, QLoRA, QA-LoRA.

- ``"full"``: every parameter trains (the baseline of Hu et al., 2021, section 2);
- ``"lora"``: W0 frozen in float, adapters s B A (Hu et al., 2021, section 4.1);
- ``"qlora"``: W0 frozen in 4-bit NF4 with double quantization, the same adapters
  (Dettmers et al., 2023, section 3);
- ``"qalora"``: W0 frozen in group-wise INT-N, adapters that see the group means of the input
  (Xu et al., 2023, section 3.3).

``adapt(model, method, ...)`` applies one of them in place, so the demo, the experiments and the
notebooks all make a method's model the same way. Then every method trains alike, only the set of
trainable parameters differs: ``make_optimizer`` (AdamW over the trainable parameters, so a frozen
W0 gets no optimizer state) and ``train_step`` (forward, cross-entropy, backward, gradient clipping,
the AdamW step). ``train.train`` runs that step in its loop (batches, evaluation, checkpoints).

Host synchronization: one per step. The batch is checked on the host before it is moved
(``train.train``), so the forward, the loss, the backward, clipping and the AdamW step run with no
host sync; the loss and the gradient norm are then read in a single transfer, and a NaN or inf in
either holds the optimizer step back.
"""

from __future__ import annotations

import math

from .adapter import TARGETS, apply_lora
from .backend import xp_of
from .optim import AdamW, clip_grad_norm
from .qalora import apply_qalora
from .qlora import apply_qlora

METHODS = ("full", "lora", "qlora", "qalora")
NAMES = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA", "qalora": "QA-LoRA"}


def adapt(model, method: str, r: int = 8, alpha: float = 16, targets=TARGETS, *, seed: int | None = 0,
          dropout: float = 0.0, init: str = "kaiming", use_rslora: bool = False, bits: int = 4,
          group_size: int = 32, blocksize: int = 64, double_quant: bool = True):
    """Prepare ``model`` for ``method`` in place and return it (``"full"`` leaves every parameter trainable).

    ``bits`` and ``group_size`` are QA-LoRA's; ``blocksize`` and ``double_quant`` QLoRA's. The
    adapters are drawn from a generator seeded with ``seed`` (LoRA and QLoRA get the same draws).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {list(METHODS)}")
    if method == "full":
        return model.unfreeze()  # every parameter trains
    adapter = dict(dropout=dropout, init=init, use_rslora=use_rslora, seed=seed)  # the same for every method
    if method == "lora":
        return apply_lora(model, r, alpha, targets, **adapter)
    if method == "qlora":
        return apply_qlora(model, r, alpha, targets, blocksize=blocksize, double_quant=double_quant, **adapter)
    return apply_qalora(model, r, alpha, targets, bits=bits, group_size=group_size, **adapter)


# ---------------------------------------------------------------- one training step, the same for every method
def make_optimizer(model, cfg) -> AdamW:
    """AdamW over the trainable parameters; weight decay on matrices only (not biases, gains or 1-D vectors).

    ``cfg``: a ``train.TrainConfig`` (its ``lr``, ``betas`` and ``weight_decay``).
    """
    params = model.trainable_parameters()
    groups = [{"params": [p for p in params if p.data.ndim >= 2]},  # matrices: cfg.weight_decay
              {"params": [p for p in params if p.data.ndim < 2], "weight_decay": 0.0}]  # biases, gains (may be none)
    return AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def train_step(model, opt, idx, targets, grad_clip: float = 0.0):
    """One training step on a batch whose ids and targets were already checked; returns (loss, grad norm).

    Forward, cross-entropy, backward, clipping (if ``grad_clip``) and the
    optimizer step, with exactly one host synchronization: the loss and the
    gradient norm before clipping come back together as two Python floats.
    Without clipping (``grad_clip=0``) no norm is computed (None), but a NaN or
    inf gradient under a finite loss must still be caught: the sum of every
    gradient, in its own dtype (one read of each, no temporary), is NaN or inf
    exactly when one is, and is then returned in the norm's place. When the
    loss or that value is NaN or inf the optimizer step is skipped, so the
    weights stay as they were; the caller decides what to do (``train``
    raises ``TrainingDiverged``).
    """
    loss = model.loss(idx, targets, check=False)  # (); the LM head and the loss in chunks, checked by the caller
    model.zero_grad()
    model.backward()
    norm = clip_grad_norm(opt.params, grad_clip) if grad_clip else _gradient_sum(opt.params, loss)  # (), on device
    xp = xp_of(loss, norm)
    loss_value, norm_value = xp.stack((loss.astype("float64"), norm)).tolist()  # (2,): the one transfer
    if not grad_clip and math.isfinite(norm_value):
        norm_value = None  # a sum, not a norm: reported only when it shows a NaN or inf gradient
    if math.isfinite(loss_value) and (norm_value is None or math.isfinite(norm_value)):
        opt.step()
    return loss_value, norm_value


def _gradient_sum(params, loss):
    """The sum of every gradient, (): NaN or inf exactly when one entry is (``train_step`` without clipping).

    No clipping, but a NaN or inf gradient must still hold the step back; one read of each gradient, in its
    own dtype, with no temporary, shows it.
    """
    total = xp_of(loss).zeros((), dtype="float64")  # ()
    for p in params:
        if p.grad is not None:
            total = total + p.grad.sum()  # (shape of p) -> (), NaN or inf if any entry is
    return total
