"""Deploying a fine-tuned model at low bit width: QLoRA (re-quantize) against QA-LoRA (merge into zeros).

QA-LoRA (Xu et al., 2023), Section 1 and Section 3.3; QLoRA (Dettmers et al., 2023). After QLoRA
training the adapter s B A is a full (out, in) float matrix: to serve a low-bit model it must be
added to the dequantized NF4 weight and the sum quantized again, and that second rounding is a
new error the adapter was never trained against. QA-LoRA's adapter is constant within each
quantization group, so it folds into the zero points and the deployed model is *exactly* the
trained one.

``deploy`` deploys one fine-tuned model at one width and measures it before and after (the demo's
table 2 calls it on the runs of its table 1); ``compare_deployment`` trains both methods on the
same base model and the same task and deploys them:

- QLoRA: base weights in NF4 (blocksize 64, double quantization), LoRA on the targeted layers,
  fine-tuned once; deployed at each bit width N by ``qalora.quantize_model_groupwise``
  (dequantized NF4 W0 + s B A, re-quantized group-wise asymmetric INT-N, the same scheme as
  QA-LoRA's base);
- QA-LoRA: base weights in group-wise INT-N, pooled adapters, fine-tuned once per N; deployed
  by ``lora.merge_and_unload`` (codes kept, zero points updated).

For each it reports the fine-tuning task's exact match with the adapter unmerged ("trained") and
after deployment ("deployed"), the pre-training tasks' mean exact match before and after, and
the relative change of the logits on the evaluation set caused by the deployment.
"""

from __future__ import annotations

import copy
import inspect
import os
import time
from numbers import Integral

from . import data, train
from .backend import global_rng, manual_seed, xp_of
from .io import BASE_CHECKPOINT, load_checkpoint
from .lora import TARGETS, lora_layers, merge_and_unload
from .methods import NAMES
from .qalora import apply_qalora, quantize_model_groupwise

__all__ = ["BASE_CHECKPOINT", "FULL", "QUICK", "compare_deployment", "deploy", "format_table", "measure"]

# Settings for the shipped base model (4 layers, width 128), timed on 2 CPU cores. FULL: about a minute
# per fine-tune, about 4.5 minutes for bits (4, 3, 2) (four fine-tunes). QUICK: about 15 s per fine-tune;
# the pooled adapter (4 features per input at group size 32) learns slowly, so its short run takes a
# larger learning rate.
FULL = {"steps": 600, "batch_size": 64, "eval_per_task": 256, "lr_qlora": 3e-3, "lr_qalora": 2e-2}
QUICK = {"steps": 300, "batch_size": 32, "eval_per_task": 128, "lr_qlora": 3e-3, "lr_qalora": 3e-2}
METHODS = ("qlora", "qalora")


def _fresh_model(base):
    """A new copy of the base model: loaded from a path, or deep-copied from a GPT."""
    if base is None:
        return load_checkpoint(BASE_CHECKPOINT)
    if isinstance(base, (str, os.PathLike)):
        return load_checkpoint(os.fspath(base))
    if hasattr(base, "blocks") and hasattr(base, "config"):
        return copy.deepcopy(base)
    raise ValueError(f"base must be a checkpoint path or a GPT model, got {type(base).__name__}")


def _check_bits_list(bits) -> tuple:
    if isinstance(bits, Integral):
        bits = (bits,)
    bits = tuple(bits)
    if not bits:
        raise ValueError("bits must name at least one bit width between 2 and 8")
    for b in bits:
        if isinstance(b, bool) or not isinstance(b, Integral) or not 2 <= int(b) <= 8:
            raise ValueError(f"every bit width must be an integer between 2 and 8, got {b!r}")
    return tuple(int(b) for b in bits)


def _rel(a, b) -> float:
    """||a - b|| / ||b|| over the whole array."""
    xp = xp_of(a, b)
    a64, b64 = a.astype(xp.float64), b.astype(xp.float64)  # same shapes, float64
    return float(xp.linalg.norm(a64 - b64) / max(float(xp.linalg.norm(b64)), 1e-300))


def measure(model, eval_sets: dict) -> tuple[float, float | None, object]:
    """(exact match on the fine-tuning task, mean exact match on the other tasks or None, its logits)."""
    model.eval()
    scores, kept = {}, None
    for task, (idx, targets) in eval_sets.items():
        logits = model(idx)  # (N, T) -> (N, T, V)
        scores[task] = data.exact_match(logits, targets)
        if task == data.FINETUNE_TASK:
            kept = logits  # (N, T, V)
    others = [v for k, v in scores.items() if k != data.FINETUNE_TASK]
    return scores[data.FINETUNE_TASK], (sum(others) / len(others) if others else None), kept


def _apply_qlora_seeded(model, r, alpha, targets, seed):
    """``qlora.apply_qlora`` with the adapters drawn reproducibly for ``seed``."""
    from .qlora import apply_qlora  # noqa: PLC0415  (QLoRA is only needed when it is compared)

    if "seed" in inspect.signature(apply_qlora).parameters:
        return apply_qlora(model, r, alpha, targets, blocksize=64, double_quant=True, seed=seed)
    state = global_rng().bit_generator.state  # restored afterwards: the package generator is left as it was
    manual_seed(seed)
    try:
        return apply_qlora(model, r, alpha, targets, blocksize=64, double_quant=True)
    finally:
        global_rng().bit_generator.state = state


def deploy(model, method: str, bits: int, group_size: int, eval_sets: dict, targets=TARGETS,
           trained=None) -> dict:
    """Deploy a fine-tuned ``model`` at ``bits`` and measure it before and after: one row of the table.

    ``method`` "qlora": the float merge dequant(W0) + s B A of every targeted layer, re-quantized
    group-wise to INT-``bits`` with ``group_size`` (``qalora.quantize_model_groupwise``, on a copy:
    ``model`` is unchanged, so one QLoRA run deploys at every width). "qalora": the model's own
    INT-``bits`` base with the adapters folded into its zero points (``lora.merge_and_unload``, in
    place: ``model`` becomes the deployed model; ``bits`` must be the width it was trained at).
    ``trained``: ``measure(model, eval_sets)`` when already measured (else measured here).

    The row: ``method``, ``bits``, ``group_size``, ``train_base``, ``trained``, ``deployed``,
    ``difference``, ``pretrain_trained``, ``pretrain_deployed``, ``logits_rel`` (as in
    ``compare_deployment``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {list(METHODS)}")
    (b,) = _check_bits_list(bits)
    t_ft, t_pre, t_logits = measure(model, eval_sets) if trained is None else trained
    if method == "qlora":
        deployed = quantize_model_groupwise(copy.deepcopy(model), b, group_size, list(targets))
    else:
        held = {layer.bits for layer in lora_layers(model).values()}
        if held != {b}:
            raise ValueError(f"a QA-LoRA model deploys at the width it was trained at ({sorted(held)}), not {b}")
        deployed = merge_and_unload(model)
    d_ft, d_pre, d_logits = measure(deployed, eval_sets)
    return {"method": NAMES[method], "bits": b, "group_size": group_size,
            "train_base": "NF4" if method == "qlora" else f"INT{b}", "trained": t_ft,
            "deployed": d_ft, "difference": d_ft - t_ft, "pretrain_trained": t_pre,
            "pretrain_deployed": d_pre, "logits_rel": _rel(d_logits, t_logits)}


def compare_deployment(base=None, bits=(4, 3, 2), steps=None, batch_size=None, lr_qlora=None,
                       lr_qalora=None, r=8, alpha=16, group_size=32, targets=TARGETS, seed=0,
                       eval_per_task=None, warmup_steps=None, methods=METHODS, pretrain_eval=True,
                       quick=False, progress=True) -> list[dict]:
    """Fine-tune with QLoRA and QA-LoRA, deploy each at ``bits``, return one row per (method, bits).

    ``base``: a checkpoint path or a GPT (copied, never changed); default the shipped base model.
    ``steps``, ``batch_size``, ``eval_per_task``, ``lr_qlora``, ``lr_qalora``: default from ``FULL``
    (600 steps of 64, learning rates 3e-3 and 2e-2), or ``QUICK`` with ``quick=True`` (300 steps
    of 32, 3e-3 and 3e-2). Fine-tuning is on ``data.FINETUNE_TASK`` alone, AdamW with warm-up
    (``warmup_steps``, default steps // 10) and cosine decay, from ``seed``. QLoRA is trained
    once (its NF4 base does not depend on N) and deployed at every N; QA-LoRA is trained once per
    N. ``methods`` picks a subset of ("qlora", "qalora"). ``pretrain_eval`` also scores the
    pre-training tasks.

    Each row: ``method``, ``bits``, ``group_size``, ``train_base`` (the frozen base's format during
    fine-tuning: "NF4" or "INT<bits>"), ``trained`` and ``deployed`` (exact match on
    the fine-tuning task, adapter unmerged / deployed model), ``difference`` (deployed - trained),
    ``pretrain_trained`` and ``pretrain_deployed`` (mean exact match on the pre-training tasks,
    None without ``pretrain_eval``), ``logits_rel`` (relative change of the fine-tuning task's
    logits caused by the deployment) and ``train_seconds``.
    """
    setting = QUICK if quick else FULL
    steps = setting["steps"] if steps is None else steps
    batch_size = setting["batch_size"] if batch_size is None else batch_size
    eval_per_task = setting["eval_per_task"] if eval_per_task is None else eval_per_task
    lr_qlora = setting["lr_qlora"] if lr_qlora is None else lr_qlora
    lr_qalora = setting["lr_qalora"] if lr_qalora is None else lr_qalora
    bits = _check_bits_list(bits)
    methods = (methods,) if isinstance(methods, str) else tuple(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown method {unknown[0] if unknown else None!r}; valid methods: {list(METHODS)}")
    if warmup_steps is None:
        warmup_steps = steps // 10 if isinstance(steps, Integral) else 0
    targets = list(targets)

    first = _fresh_model(base)
    block = first.config.block_size
    tasks = (data.FINETUNE_TASK,) + (data.PRETRAIN_TASKS if pretrain_eval else ())
    eval_sets = data.eval_set(tasks, eval_per_task, seed=seed, block_size=block)

    def config(lr):
        return train.TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                                 tasks=(data.FINETUNE_TASK,), eval_every=0, seed=seed)

    def say(msg):
        if progress:
            print(msg, flush=True)

    rows = []
    if "qlora" in methods:
        say(f"QLoRA: fine-tuning on {data.FINETUNE_TASK!r} with an NF4 base ({steps} steps, lr {lr_qlora:g})")
        model = _apply_qlora_seeded(first, r, alpha, targets, seed)
        first = None
        t0 = time.perf_counter()
        train.train(model, config(lr_qlora), progress=progress, eval_sets={data.FINETUNE_TASK: eval_sets[
            data.FINETUNE_TASK]})
        seconds = time.perf_counter() - t0
        trained = measure(model, eval_sets)
        for b in bits:
            say(f"QLoRA: deploying at INT{b} (merge in float, re-quantize, group size {group_size})")
            rows.append({**deploy(model, "qlora", b, group_size, eval_sets, targets, trained),
                         "train_seconds": seconds})
    if "qalora" in methods:
        for b in bits:
            say(f"QA-LoRA: fine-tuning on {data.FINETUNE_TASK!r} with an INT{b} base, group size {group_size} "
                f"({steps} steps, lr {lr_qalora:g})")
            model = first if first is not None else _fresh_model(base)
            first = None
            apply_qalora(model, r, alpha, targets, bits=b, group_size=group_size, seed=seed)
            t0 = time.perf_counter()
            train.train(model, config(lr_qalora), progress=progress, eval_sets={data.FINETUNE_TASK: eval_sets[
                data.FINETUNE_TASK]})
            seconds = time.perf_counter() - t0
            say(f"QA-LoRA: deploying at INT{b} (adapter folded into the zero points)")
            rows.append({**deploy(model, "qalora", b, group_size, eval_sets, targets), "train_seconds": seconds})
    return rows


def _pct(v) -> str:
    return "   -  " if v is None else f"{100 * v:5.1f}%"


def format_table(rows) -> str:
    """The rows of ``compare_deployment`` as a fixed-width text table ("base": the format trained on)."""
    rows = list(rows)
    if not rows:
        raise ValueError("format_table needs at least one row")
    head = (f"{'method':<8} {'base':>4} {'bits':>4} {'group':>5} {'trained':>8} {'deployed':>8} {'diff (pp)':>9} "
            f"{'pretrain trained':>16} {'pretrain deployed':>17} {'logits rel':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['method']:<8} {r.get('train_base', '-'):>4} {r['bits']:>4} {r['group_size']:>5} "
            f"{_pct(r['trained']):>8} {_pct(r['deployed']):>8} "
            f"{100 * r['difference']:>+9.1f} {_pct(r['pretrain_trained']):>16} {_pct(r['pretrain_deployed']):>17} "
            f"{r['logits_rel']:>10.2e}"
        )
    return "\n".join(lines)
