"""``python -m lora_from_scratch demo``: the whole story in two tables.

Starting from the shipped base model (pre-trained on copy / reverse / sort /
upper, 0% on the new task "desc", sort descending), the demo adapts it to
"desc" four ways and measures, side by side, what each costs and what it
gets:

- full fine-tuning: every parameter trains; gradients and AdamW moments for all;
- LoRA (Hu et al., 2021): W0 frozen, r = 8 adapters on Wq, Wk, Wv, Wo, fc, proj;
- QLoRA (Dettmers et al., 2023): the same adapters over an NF4 (4.127-bit) base;
- QA-LoRA (Xu et al., 2023): pooled adapters over a group-wise INT4 base.

The second table deploys the two quantized methods at 4, 3 and 2 bits
(``compare.compare_deployment``): QLoRA must merge in float and re-quantize,
QA-LoRA folds its adapter into the zero points and keeps its integer codes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from . import data, train
from .io import BASE_CHECKPOINT, load_checkpoint
from .lora import TARGETS, apply_lora, count_parameters
from .memory import format_bytes, resident_bytes

# Measured on the shipped base model (2 CPU cores): LoRA reaches ~96% on desc in 300 steps of 64.
FULL = {"steps": 300, "batch_size": 64, "eval_per_task": 256, "bits": (4, 3, 2)}
QUICK = {"steps": 100, "batch_size": 32, "eval_per_task": 128, "bits": (2,)}
LEARNING_RATES = {"full": 1e-3, "lora": 3e-3, "qlora": 3e-3, "qalora": 2e-2}
RANK, ALPHA = 8, 16


def _adapt(method: str, model):
    """Prepare ``model`` (a fresh copy of the base) for one method, in place."""
    if method == "lora":
        return apply_lora(model, RANK, ALPHA, list(TARGETS), seed=0)
    if method == "qlora":
        from .qlora import apply_qlora

        return apply_qlora(model, RANK, ALPHA, list(TARGETS))
    if method == "qalora":
        from .qalora import apply_qalora

        return apply_qalora(model, RANK, ALPHA, list(TARGETS), bits=4, group_size=32, seed=0)
    return model  # full fine-tuning: everything stays trainable


NAMES = {"full": "full fine-tuning", "lora": "LoRA r=8", "qlora": "QLoRA NF4 r=8", "qalora": "QA-LoRA INT4 r=8"}


def finetune_table(base: str = BASE_CHECKPOINT, steps: int = 300, batch_size: int = 64, eval_per_task: int = 256,
                   methods=("full", "lora", "qlora", "qalora"), seed: int = 0, progress: bool = True) -> list[dict]:
    """Fine-tune a copy of the base model on desc with each method; one row of measurements per method."""
    tasks = (data.FINETUNE_TASK,) + data.PRETRAIN_TASKS
    probe = load_checkpoint(base)
    eval_sets = data.eval_set(tasks, eval_per_task, seed=seed + 1, block_size=probe.config.block_size)
    rows = []
    base_scores = train.evaluate(probe, eval_sets)
    rows.append({"method": "base model (no tuning)", "trainable": 0, "total": probe.num_parameters(),
                 "state_bytes": 0, "weight_bytes": resident_bytes(probe), "task_bytes": 0, "seconds": 0.0,
                 "desc": base_scores[data.FINETUNE_TASK],
                 "pretrain": sum(base_scores[t] for t in data.PRETRAIN_TASKS) / len(data.PRETRAIN_TASKS)})
    for method in methods:
        model = _adapt(method, load_checkpoint(base))
        trainable, total = count_parameters(model)
        cfg = train.TrainConfig(steps=steps, batch_size=batch_size, lr=LEARNING_RATES[method],
                                warmup_steps=max(1, steps // 10), tasks=(data.FINETUNE_TASK,), eval_every=0,
                                seed=seed)
        if progress:
            print(f"{NAMES[method]}: {trainable:,} trainable parameters, {steps} steps", flush=True)
        hist = train.train(model, cfg, progress=progress,
                           eval_sets={data.FINETUNE_TASK: eval_sets[data.FINETUNE_TASK]})
        scores = train.evaluate(model, eval_sets)
        task_bytes = sum(int(p.data.nbytes) for p in model.trainable_parameters())
        rows.append({"method": NAMES[method], "trainable": trainable, "total": total,
                     "state_bytes": hist["gradient_bytes"] + hist["optimizer_state_bytes"],
                     "weight_bytes": resident_bytes(model), "task_bytes": task_bytes, "seconds": hist["seconds"],
                     "desc": scores[data.FINETUNE_TASK],
                     "pretrain": sum(scores[t] for t in data.PRETRAIN_TASKS) / len(data.PRETRAIN_TASKS)})
    return rows


def format_finetune_table(rows) -> str:
    """The rows of ``finetune_table`` as fixed-width text."""
    head = (f"{'method':<24} {'trainable':>10} {'grads+AdamW':>12} {'weights held':>13} {'per-task file':>14} "
            f"{'train s':>8} {'desc':>7} {'pretrain tasks':>15}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['method']:<24} {r['trainable']:>10,} {format_bytes(r['state_bytes']):>12} "
            f"{format_bytes(r['weight_bytes']):>13} {format_bytes(r['task_bytes']):>14} {r['seconds']:>8.1f} "
            f"{100 * r['desc']:>6.1f}% {100 * r['pretrain']:>14.1f}%")
    return "\n".join(lines)


def run_demo(quick: bool = False, progress: bool = True) -> int:
    """Print both tables; ``quick`` shortens training (a couple of minutes) and deploys at 2 bits only."""
    from .compare import compare_deployment, format_table

    s = QUICK if quick else FULL
    t0 = time.perf_counter()
    print(f"lora_from_scratch demo: adapting the shipped base model to {data.FINETUNE_TASK!r} (sort descending)"
          f"{' [quick]' if quick else ''}\n")
    rows = finetune_table(steps=s["steps"], batch_size=s["batch_size"], eval_per_task=s["eval_per_task"],
                          progress=progress)
    print("\n1. What each method trains, holds and gets (exact match on held-out examples)\n")
    print(format_finetune_table(rows))
    print("\n   grads+AdamW: gradients and AdamW moments, measured from the arrays after training;"
          "\n   weights held: every array the model keeps (4-bit codes and constants for QLoRA / QA-LoRA);"
          "\n   per-task file: the trainable parameters, what one more task costs to store;"
          "\n   pretrain tasks: copy/reverse/sort/upper with the tuned weights in place. Training on desc alone"
          "\n   overwrites them; full fine-tuning loses them for good, the adapters leave W0 untouched.\n")
    print("2. Deploying at low bit width: QLoRA merges in float and re-quantizes, QA-LoRA merges into "
          "the zero points\n")
    deploy = compare_deployment(bits=s["bits"], quick=quick, progress=progress)  # compare's own settings
    print(format_table(deploy))
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="a shorter run")


def main(args) -> int:
    return run_demo(quick=args.quick)


def run_benchmarks(quick: bool = False) -> int:
    """Run every script in benchmarks/ (they print their own medians and ratios)."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    if not os.path.isdir(root):
        print("benchmarks/ is not next to the package (run from a source checkout)")
        return 1
    status = 0
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            print(f"== {name}", flush=True)
            res = subprocess.run([sys.executable, os.path.join(root, name)] + (["--quick"] if quick else []))
            status |= res.returncode
    return status
