"""QLoRA against QA-LoRA at deployment: a fine-tuned model served at low bit width (re-quantize vs merge into zeros).

QA-LoRA (Xu et al., 2023), Section 1 and Section 3.3; QLoRA (Dettmers et al., 2023). After QLoRA
training the adapter s B A is a full (out, in) float matrix: to serve a low-bit model it must be
added to the dequantized NF4 weight and the sum quantized again, and that second rounding is a
new error the adapter was never trained against. QA-LoRA's adapter is constant within each
quantization group, so it folds into the zero points and the deployed model is *exactly* the
trained one.

``deploy_qlora`` makes the deployed copy of a QLoRA model, in float, in NF4 or in group-wise
INT-N (every experiment that deploys QLoRA calls it); ``deploy`` deploys one fine-tuned model of
either method at one width and measures it before and after (the demo's table 2 calls it on the
runs of its table 1); ``compare_deployment`` fine-tunes both methods on the same base model and
the same task (``experiments.common.finetune``) and deploys them:

- QLoRA: base weights in NF4 (blocksize 64, double quantization), LoRA on the targeted layers,
  fine-tuned once; deployed at each bit width N by ``qalora.quantize_model_groupwise``
  (dequantized NF4 W0 + s B A, re-quantized group-wise asymmetric INT-N, the same scheme as
  QA-LoRA's base);
- QA-LoRA: base weights in group-wise INT-N, pooled adapters, fine-tuned once per N; deployed
  by ``lora.merge_and_unload`` (codes kept, zero points updated).

For each it reports the fine-tuning task's exact match with the adapter unmerged ("trained") and
after deployment ("deployed"), the pre-training tasks' mean exact match before and after, and
the relative change of the logits on the evaluation set caused by the deployment
(``experiments.common.measure``).
"""

from __future__ import annotations

import copy
import os
from numbers import Integral

from . import data
from .backend import to_numpy
from .checkpoint import BASE_CHECKPOINT, load_checkpoint
from .experiments.common import finetune, measure, percent
from .lora import TARGETS, lora_layers, merge_and_unload, merge_lora
from .methods import NAMES
from .qalora import quantize_model_groupwise

__all__ = ["BASE_CHECKPOINT", "FULL", "QUICK", "compare_deployment", "deploy", "deploy_qlora", "format_table",
           "trained_scores"]

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


def deploy_qlora(model, fmt: str = "float", group_size: int = 32, targets=TARGETS):
    """A deployed copy of a fine-tuned QLoRA model (``model`` is not changed), every adapted layer merged.

    ``fmt`` "float": dequant(W0) + s B A in a float Linear (``lora.merge_lora``): the trained model,
    unquantized; "nf4": that sum quantized to NF4 again (``merge_lora(requantize=True)``); "int2" to
    "int8": that sum quantized group-wise to INT-N with ``group_size`` on ``targets``
    (``qalora.quantize_model_groupwise``: QA-LoRA's own format, round to nearest).
    """
    if fmt == "float":
        return merge_lora(copy.deepcopy(model))
    if fmt == "nf4":
        return merge_lora(copy.deepcopy(model), requantize=True)
    if isinstance(fmt, str) and fmt.startswith("int") and fmt[3:].isdigit():
        (bits,) = _check_bits_list(int(fmt[3:]))
        return quantize_model_groupwise(copy.deepcopy(model), bits, group_size, list(targets))
    raise ValueError(f"unknown deployment format {fmt!r}; valid: 'float', 'nf4', 'int2' .. 'int8'")


def trained_scores(model, eval_sets: dict) -> tuple:
    """(exact match on the fine-tuning task, mean exact match on the pre-training tasks or None, the fine-tuning
    task's logits): what ``deploy`` compares a deployed model with (``experiments.common.measure``)."""
    m, logits = measure(model, eval_sets)
    return m["exact_match"][data.FINETUNE_TASK], m["pretrain_mean"], logits[data.FINETUNE_TASK]


def deploy(model, method: str, bits: int, group_size: int, eval_sets: dict, targets=TARGETS,
           trained=None) -> dict:
    """Deploy a fine-tuned ``model`` at ``bits`` and measure it before and after: one row of the table.

    ``method`` "qlora": ``deploy_qlora(model, f"int{bits}", group_size, targets)`` (on a copy: ``model``
    is unchanged, so one QLoRA run deploys at every width). "qalora": the model's own INT-``bits``
    base with the adapters folded into its zero points (``lora.merge_and_unload``, in place: ``model``
    becomes the deployed model; ``bits`` must be the width it was trained at). ``trained``:
    ``trained_scores(model, eval_sets)`` when already measured (else measured here).

    The row: ``method``, ``bits``, ``group_size``, ``train_base``, ``trained``, ``deployed``,
    ``difference``, ``pretrain_trained``, ``pretrain_deployed``, ``logits_rel`` (as in
    ``compare_deployment``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {list(METHODS)}")
    (b,) = _check_bits_list(bits)
    task = data.FINETUNE_TASK
    t_ft, t_pre, t_logits = trained_scores(model, eval_sets) if trained is None else trained
    if method == "qlora":
        deployed = deploy_qlora(model, f"int{b}", group_size, targets)
    else:
        held = {layer.bits for layer in lora_layers(model).values()}
        if held != {b}:
            raise ValueError(f"a QA-LoRA model deploys at the width it was trained at ({sorted(held)}), not {b}")
        deployed = merge_and_unload(model)
    d, _ = measure(deployed, eval_sets, reference={task: to_numpy(t_logits).astype("float64")})  # (N, T, V)
    d_ft = d["exact_match"][task]
    return {"method": NAMES[method], "bits": b, "group_size": group_size,
            "train_base": "NF4" if method == "qlora" else f"INT{b}", "trained": t_ft,
            "deployed": d_ft, "difference": d_ft - t_ft, "pretrain_trained": t_pre,
            "pretrain_deployed": d["pretrain_mean"], "logits_rel": d["logits_rel"]}


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
    desc_rows = {data.FINETUNE_TASK: eval_sets[data.FINETUNE_TASK]}

    def fine_tune(method, model, lr, **kw):
        """``experiments.common.finetune`` of ``model`` on desc; (the trained model, the seconds)."""
        out = finetune(method, r, alpha, targets, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                       warmup_steps=warmup_steps, evals=desc_rows, model=model, progress=progress, **kw)
        return out["model"], out["seconds"]

    def say(msg):
        if progress:
            print(msg, flush=True)

    rows = []
    if "qlora" in methods:
        say(f"QLoRA: fine-tuning on {data.FINETUNE_TASK!r} with an NF4 base ({steps} steps, lr {lr_qlora:g})")
        model, seconds = fine_tune("qlora", first, lr_qlora, blocksize=64, double_quant=True)
        first = None
        trained = trained_scores(model, eval_sets)
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
            model, seconds = fine_tune("qalora", model, lr_qalora, bits=b, group_size=group_size)
            say(f"QA-LoRA: deploying at INT{b} (adapter folded into the zero points)")
            rows.append({**deploy(model, "qalora", b, group_size, eval_sets, targets), "train_seconds": seconds})
    return rows


def format_table(rows) -> str:
    """The rows of ``compare_deployment`` or ``deploy`` as a fixed-width text table ("base": the format trained on)."""
    rows = list(rows)
    if not rows:
        raise ValueError("format_table needs at least one row")
    head = (f"{'method':<8} {'base':>4} {'bits':>4} {'group':>5} {'trained':>8} {'deployed':>8} {'diff (pp)':>9} "
            f"{'pretrain trained':>16} {'pretrain deployed':>17} {'logits rel':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['method']:<8} {r.get('train_base', '-'):>4} {r['bits']:>4} {r['group_size']:>5} "
            f"{percent(r['trained']):>8} {percent(r['deployed']):>8} "
            f"{100 * r['difference']:>+9.1f} {percent(r['pretrain_trained']):>16} "
            f"{percent(r['pretrain_deployed']):>17} {r['logits_rel']:>10.2e}"
        )
    return "\n".join(lines)
