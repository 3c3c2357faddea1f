"""``python -m lora_from_scratch demo``: the whole story in two tables, each run trained once and measured.

Starting from the shipped base model (pre-trained on copy / reverse / sort / upper, 0% on the
new task "desc", sort descending), the demo adapts it to "desc" four ways:

- full fine-tuning: every parameter trains, with a gradient and two AdamW moments each (the
  baseline of Hu et al., 2021, section 2);
- LoRA (Hu et al., 2021, section 4.1): W0 frozen, r = 8 adapters on Wq, Wk, Wv, Wo, fc, proj;
- QLoRA (Dettmers et al., 2023, section 3): the same adapters over an NF4 base (blocks of 64,
  double quantization: 4.127 bits per weight);
- QA-LoRA (Xu et al., 2023, section 3.3): pooled adapters over a group-wise INT4 base.

Table 1 shows, for each: what trains (parameters), what training holds (gradients and AdamW
moments, the weights), the per-task file (section 4.2), the traced peak of one training step
with its parts (weights, gradients, optimizer state, activations: ``memory.step_memory``), the
median step time, the score on "desc", and the pre-training tasks' score twice: with the tuned
weights, and with the adapter switched off (``lora.disable_adapters``). Switched off, an adapted
model computes its frozen base again, bit for bit: the demo compares those logits with the
frozen base's before tuning. Full fine-tuning has no adapter to switch off: its pre-training
tasks are gone.

Table 2 deploys the two quantized methods at low bit width (QA-LoRA section 3.3;
``qlora_vs_qalora.deploy``): QLoRA, trained once on its NF4 base (its row in table 1), must merge in
float and re-quantize group-wise to INT-N; QA-LoRA, trained once per N (its 4-bit run *is* table
1's row), folds its adapter into the zero points and keeps its integer codes, so its deployed
model scores what it scored in training. Every number comes from one run and appears once.

``--json PATH`` writes every number of both tables (and the loss curves); ``--figures DIR`` draws
the loss curves of every run on one plot and the step memory of each method as stacked bars.
Every output path is checked before any training (an existing file is refused unless ``--force``);
the files are written only after the run, as one set (``outputs.write_set``), so Ctrl-C leaves all
of them or none, and the previous ones as they were.

The settings were measured on the shipped base model (``experiments.common.finetune``, 300 steps of
32, 256 held-out desc rows, one BLAS thread): LoRA r = 8 reached 94.9% at lr 3e-3 and 96.5% at
5e-3; QLoRA 93.8% and 97.3%; full fine-tuning 99.6% at 1e-3. QA-LoRA INT4, whose pooled adapter
sees in / group_size features per input (4 at group size 32 on width 128): group size 32 at lr
2e-2 reached 66.8%; group size 16 reached 75.0% at lr 1e-2, 87.1% at 2e-2, 90.6% at 3e-2, 88.3%
at 5e-2; group size 8 reached 90.2% at lr 1e-2, 93.8% at 2e-2, 91.8% at 3e-2 (and 92.2% at INT3,
94.9% at INT2, both at 2e-2). So: group size 8, lr 2e-2, within 5 points of LoRA at 5e-3 in the
same 300 steps (each fine-tune about 12 s on two idle cores, 14 s CPU on one).
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import textwrap
import time

import numpy as np

from . import data, train
from .adapter import TARGETS, resolve_targets
from .backend import get_backend_name, to_numpy
from .checkpoint import BASE_CHECKPOINT, load_checkpoint
from .checks import check_choice, check_int, check_number
from .experiments.common import desc_config, finetune
from .experiments.common import percent as _pct
from .files import json_writer
from .lora import count_parameters, disable_adapters
from .memory import format_bytes, parameter_bytes, resident_bytes, step_memory
from .methods import METHODS, adapt
from .nn import Linear
from .outputs import check_output_path, write_set

# eval_per_task: held-out rows of desc; each pretrain task gets half as many
FULL = {"steps": 300, "batch_size": 32, "eval_per_task": 256, "bits": (4, 3, 2)}
QUICK = {"steps": 100, "batch_size": 32, "eval_per_task": 128, "bits": (2,)}
LEARNING_RATES = {"full": 1e-3, "lora": 5e-3, "qlora": 5e-3, "qalora": 2e-2}
RANK, ALPHA, GROUP_SIZE = 8, 16, 8
TIMED_STEPS, WARMUP_STEPS = 5, 1  # the median step time: 5 timed steps after an untimed one
FIGURES = ("demo_loss.png", "demo_memory.png")


def run_name(method: str, r: int, bits: int | None = None) -> str:
    """The row label: "LoRA r=8", "QLoRA NF4 r=8", "QA-LoRA INT4 r=8"."""
    if method == "full":
        return "full fine-tuning"
    if method == "lora":
        return f"LoRA r={r}"
    if method == "qlora":
        return f"QLoRA NF4 r={r}"
    return f"QA-LoRA INT{bits} r={r}"


# ---------------------------------------------------------------------------------------- checks
def check_methods(methods) -> tuple:
    """The methods in order, each once; an unknown one is a ValueError naming it."""
    methods = (methods,) if isinstance(methods, str) else tuple(methods)
    out = []
    for m in methods:
        check_choice("method", m, METHODS)
        if m not in out:
            out.append(m)
    if not out:
        raise ValueError(f"name at least one method: {', '.join(METHODS)}")
    return tuple(out)


def check_bits(bits) -> tuple:
    """The bit widths in the order given, each once; each must be an integer from 2 to 8."""
    bits = tuple(bits) if isinstance(bits, (list, tuple, np.ndarray)) else (bits,)
    out = []
    for b in bits:
        b = check_int("bits", b, 2, 8)
        if b not in out:
            out.append(b)
    if not out:
        raise ValueError("name at least one bit width between 2 and 8")
    return tuple(out)


def load_base(path: str):
    """The base model at ``path``, refused (ValueError naming the file) unless it fits the demo's tasks."""
    model = load_checkpoint(path)  # FileNotFoundError / ValueError name the file and the problem
    cfg = model.config
    if cfg.vocab_size != data.VOCAB_SIZE:
        raise ValueError(f"{path}: the model has a vocabulary of {cfg.vocab_size} tokens; the demo's tasks use "
                         f"{data.VOCAB_SIZE} characters ({data.VOCAB!r})")
    for i, target in resolve_targets(cfg.n_layer, list(TARGETS)):
        layer = model.get_submodule(target.path(i))
        if type(layer) is not Linear:
            raise ValueError(f"{path}: {target.path(i)} is a {type(layer).__name__}; --base needs a plain base "
                             "model, not an adapted or quantized one")
    try:
        data.eval_set((data.FINETUNE_TASK,) + data.PRETRAIN_TASKS, 1, seed=0, block_size=cfg.block_size)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return model


# ---------------------------------------------------------------------------------------- measuring
def _evaluate(model, eval_sets: dict) -> tuple[dict, dict]:
    """({task: exact match}, {task: logits}) in eval mode, one forward per task."""
    was_training = model.training
    model.eval()
    try:
        logits = {task: model(idx) for task, (idx, _) in eval_sets.items()}  # {task: (N, T, V)}
        return {task: data.exact_match(logits[task], eval_sets[task][1]) for task in eval_sets}, logits
    finally:
        model.train(was_training)


def _pretrain_mean(scores: dict) -> float:
    return sum(scores[t] for t in data.PRETRAIN_TASKS) / len(data.PRETRAIN_TASKS)


def _same_logits(a: dict, b: dict) -> bool:
    """Bit for bit the same logits on every task."""
    return all(np.array_equal(to_numpy(a[t]), to_numpy(b[t])) for t in a)


def _median(values) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64)))  # (n,) -> ()


def probe_step(model, cfg: train.TrainConfig, seed: int) -> dict:
    """Time and trace training steps of a copy of ``model`` (the run itself is not touched).

    ``WARMUP_STEPS`` untimed steps (they also make the AdamW moments), ``TIMED_STEPS`` timed
    ones (``train.train_step``, wall and CPU seconds), then one step under ``memory.step_memory``:
    its traced peak and what it is made of. All on the same batch of ``cfg.batch_size`` rows, so
    every method is measured on the same tokens. On CuPy, tracemalloc cannot see the arrays: no
    memory numbers.
    """
    clone = copy.deepcopy(model)
    opt = train.make_optimizer(clone, cfg)
    idx, targets = train._batch(np.random.default_rng(seed), cfg, clone.config.block_size, clone.config.vocab_size,
                                opt.params[0].data)  # (B, T) each, made and checked on the host, then moved
    clone.train()
    wall, cpu = [], []
    for i in range(WARMUP_STEPS + TIMED_STEPS):
        t0, c0 = time.perf_counter(), time.process_time()
        train.train_step(clone, opt, idx, targets, cfg.grad_clip)
        if i >= WARMUP_STEPS:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    out = {"step_ms": 1000 * _median(wall), "step_cpu_ms": 1000 * _median(cpu), "memory": None}
    if get_backend_name() == "numpy":
        m = step_memory(clone, opt, (idx, targets))
        parts = m["weights"] + m["gradients"] + m["optimizer"] + m["activations"]
        out["memory"] = {"peak": m["peak"], "weights": m["weights"], "gradients": m["gradients"],
                         "optimizer": m["optimizer"], "activations": m["activations"],
                         "temporaries": max(0, m["peak"] - parts), "batch_tokens": int(idx.size)}
    return out


def adapted_models(base, methods, r: int, alpha: float, seed: int, bits, group_size: int = GROUP_SIZE) -> dict:
    """{(method, bit width): a copy of ``base`` adapted with ``method``} for every run of the demo.

    QA-LoRA gets one model per width of ``bits``, every other method one at ``bits[0]``. Made before
    any training, so a rank or group size that does not fit is refused first: a ValueError naming the run.
    """
    models = {}
    for m in methods:
        for b in (bits if m == "qalora" else (bits[0],)):
            try:
                models[(m, b)] = adapt(copy.deepcopy(base), m, r, alpha, seed=seed, bits=b, group_size=group_size)
            except ValueError as e:
                raise ValueError(f"{run_name(m, r, b)}: {e}") from None
    return models


def fine_tune(model, method: str, r: int, steps: int, batch_size: int, seed: int, eval_sets: dict,
              bits: int = 4, group_size: int = GROUP_SIZE, progress: bool = True, say=print,
              probe: bool = True) -> tuple[dict, object, object]:
    """Measure a step of ``model`` (``probe``), train it in place on "desc", measure the result.

    ``model``: the base model adapted with ``method`` (``adapted_models``; r, bits and group_size
    as it was adapted: they name the row). Returns ``(row, model, desc_logits)``: the row of table 1
    (see ``run_demo``), the trained model and its logits on the held-out desc rows.
    """
    name = run_name(method, r, bits)
    trainable, total = count_parameters(model)
    cfg = desc_config(steps, batch_size, LEARNING_RATES[method], seed)
    say(f"{name}: {trainable:,} of {total:,} parameters train; {steps} steps of {batch_size}, lr {cfg.lr:g}")
    adapted = method != "full"
    before = None
    if adapted:  # B = 0: the adapter adds nothing yet; switched off, the model is its frozen base
        with disable_adapters(model):
            before = _evaluate(model, {t: eval_sets[t] for t in data.PRETRAIN_TASKS})
    step = probe_step(model, cfg, seed + 1) if probe else {"step_ms": None, "step_cpu_ms": None, "memory": None}
    desc = {data.FINETUNE_TASK: eval_sets[data.FINETUNE_TASK]}  # the progress line's score
    out = finetune(method, steps=steps, batch_size=batch_size, lr=cfg.lr, seed=seed, evals=desc, model=model,
                   adapted=True, progress=progress)
    scores, logits = _evaluate(model, eval_sets)  # every task, the logits kept for table 2
    off_scores = off_same = None
    if adapted:
        with disable_adapters(model):
            off_scores, off_logits = _evaluate(model, {t: eval_sets[t] for t in data.PRETRAIN_TASKS})
        off_same = _same_logits(off_logits, before[1])
    row = {
        "method": method, "name": name, "bits": bits if method == "qalora" else None,
        "group_size": group_size if method == "qalora" else None, "lr": cfg.lr,
        "trainable": int(trainable), "total": int(total),
        "state_bytes": out["state_bytes"],
        "weight_bytes": int(resident_bytes(model)),
        "task_bytes": int(parameter_bytes(model, trainable=True)),
        "step_memory": step["memory"], "step_ms": step["step_ms"], "step_cpu_ms": step["step_cpu_ms"],
        "train_seconds": out["seconds"], "final_loss": out["final_loss"],
        "desc": scores[data.FINETUNE_TASK],
        "pretrain": {t: scores[t] for t in data.PRETRAIN_TASKS}, "pretrain_mean": _pretrain_mean(scores),
        "pretrain_frozen_base": before[0] if adapted else None,
        "pretrain_adapter_off": off_scores,
        "pretrain_adapter_off_mean": _pretrain_mean(off_scores) if adapted else None,
        "adapter_off_is_frozen_base": off_same,
        "loss": out["loss"],
    }
    say(f"  {out['seconds']:.1f} s; desc {row['desc']:.1%}; pretrain tasks {row['pretrain_mean']:.1%}"
        + (f", adapter off {row['pretrain_adapter_off_mean']:.1%}" if adapted else ""))
    return row, model, logits[data.FINETUNE_TASK]


def run_demo(methods=METHODS, r: int = RANK, alpha: float = ALPHA, steps: int | None = None, bits=None,
             seed: int = 0, base: str = BASE_CHECKPOINT, quick: bool = False, batch_size: int | None = None,
             eval_per_task: int | None = None, group_size: int = GROUP_SIZE, progress: bool = True,
             say=print) -> dict:
    """Train every (method, bit width) once and return every number of both tables.

    ``methods``: table 1's rows (after the base model), any of "full", "lora", "qlora", "qalora";
    table 2 deploys those of "qlora" and "qalora" that are listed. ``bits``: table 2's widths
    (default 4, 3, 2; quick: 2); QA-LoRA trains once per width, and its run at the first
    width is its row in table 1; QLoRA trains once (NF4) and deploys at every width. ``steps``,
    ``batch_size``, ``eval_per_task``: default ``FULL`` (or ``QUICK``). ``seed``: the adapters'
    initialization, the training batches and the held-out rows (a separate stream).

    The result: ``settings``; ``base`` (the base model's scores); ``table1`` (one row per method:
    ``trainable``, ``total``, ``state_bytes`` (gradients + AdamW moments), ``weight_bytes``,
    ``task_bytes``, ``step_memory`` (``peak`` and its parts), ``step_ms``, ``step_cpu_ms``,
    ``train_seconds``, ``desc``, ``pretrain`` per task and ``pretrain_mean``,
    ``pretrain_adapter_off`` and ``pretrain_frozen_base`` per task, ``adapter_off_is_frozen_base``,
    ``loss``); ``extra_runs`` (QA-LoRA at the other widths, the same fields); ``table2`` (one row
    per (method, width), as ``qlora_vs_qalora.deploy``); ``seconds`` (wall and CPU).
    """
    from . import qlora_vs_qalora

    t0, c0 = time.perf_counter(), time.process_time()
    s = QUICK if quick else FULL
    methods = check_methods(methods)
    r = check_int("the rank r", r, 1)
    alpha = check_number("alpha", alpha, above=0.0)
    steps = check_int("steps", s["steps"] if steps is None else steps, 1)
    batch_size = check_int("batch_size", s["batch_size"] if batch_size is None else batch_size, 1)
    eval_per_task = check_int("eval_per_task", s["eval_per_task"] if eval_per_task is None else eval_per_task, 1)
    bits = check_bits(s["bits"] if bits is None else bits)
    seed = check_int("seed", seed, 0)
    base_model = load_base(base)
    models = adapted_models(base_model, methods, r, alpha, seed, bits, group_size)  # before any training

    block = base_model.config.block_size
    eval_pretrain = max(1, eval_per_task // 2)  # four tasks whose mean is reported: half the rows each
    eval_sets = {**data.eval_set((data.FINETUNE_TASK,), eval_per_task, seed=seed, block_size=block),
                 **data.eval_set(data.PRETRAIN_TASKS, eval_pretrain, seed=seed, block_size=block)}
    base_scores, _ = _evaluate(base_model, eval_sets)
    result = {
        "settings": {"methods": list(methods), "r": r, "alpha": alpha, "steps": steps, "batch_size": batch_size,
                     "bits": list(bits), "group_size": group_size, "seed": seed, "eval_per_task": eval_per_task,
                     "eval_pretrain_per_task": eval_pretrain,
                     "learning_rates": {m: LEARNING_RATES[m] for m in methods}, "quick": quick,
                     "base": os.path.abspath(base), "backend": get_backend_name(), "targets": list(TARGETS),
                     "timed_steps": TIMED_STEPS},
        "base": {"name": "base model", "total": base_model.num_parameters(),
                 "weight_bytes": int(resident_bytes(base_model)), "desc": base_scores[data.FINETUNE_TASK],
                 "pretrain": {t: base_scores[t] for t in data.PRETRAIN_TASKS},
                 "pretrain_mean": _pretrain_mean(base_scores)},
        "table1": [], "extra_runs": [], "table2": [],
    }
    n_runs = len([m for m in methods if m != "qalora"]) + (len(bits) if "qalora" in methods else 0)
    say(f"lora_from_scratch demo: adapting the base model to {data.FINETUNE_TASK!r} (sort descending)"
        f"{' [quick]' if quick else ''}")
    say(f"{n_runs} fine-tunes on {data.FINETUNE_TASK!r}, {steps} steps of {batch_size} each "
        f"(held-out rows: {eval_per_task} of desc, {eval_pretrain} of each pretrain task)\n")

    def run(method, b=bits[0], probe=True):  # each adapted model is trained once, then let go
        return fine_tune(models.pop((method, b)), method, r, steps, batch_size, seed, eval_sets, bits=b,
                         group_size=group_size, progress=progress, say=say, probe=probe)

    def deploy(row, model, desc_logits, method, b):
        trained = (row["desc"], row["pretrain_mean"], desc_logits)  # the run's own measurement, not a new one
        result["table2"].append(qlora_vs_qalora.deploy(model, method, b, group_size, eval_sets, TARGETS, trained))

    for method in methods:
        row, model, desc_logits = run(method)
        result["table1"].append(row)
        if method == "qlora":
            for b in bits:
                deploy(row, model, desc_logits, "qlora", b)
        elif method == "qalora":
            deploy(row, model, desc_logits, "qalora", bits[0])
            for b in bits[1:]:  # table 1 shows the first width; the others are runs of table 2 only
                extra, model, desc_logits = run("qalora", b, probe=False)
                result["extra_runs"].append(extra)
                deploy(extra, model, desc_logits, "qalora", b)
        del model, desc_logits
    # table 2 in reading order: QLoRA's widths, then QA-LoRA's
    result["table2"].sort(key=lambda d: (d["method"] != "QLoRA", bits.index(d["bits"])))
    result["seconds"] = {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}
    return result


# ---------------------------------------------------------------------------------------- printing
def _mem(row, key="peak") -> str:
    m = row.get("step_memory")
    return "n/a" if not m else format_bytes(m[key])


def format_table1(result: dict) -> str:
    """Table 1 as fixed-width text: the base model, then one row per method."""
    head = (f"{'method':<17} {'trainable':>9} {'grads+AdamW':>11} {'weights':>10} {'task file':>10} "
            f"{'step peak':>10} {'ms/step':>7} {'train s':>7} {'desc':>6} {'pretrain':>8} {'adapter off':>11}")
    lines = [head, "-" * len(head)]
    b = result["base"]
    lines.append(f"{b['name']:<17} {0:>9,} {format_bytes(0):>11} {format_bytes(b['weight_bytes']):>10} "
                 f"{'-':>10} {'-':>10} {'-':>7} {'-':>7} {_pct(b['desc']):>6} {_pct(b['pretrain_mean']):>8} "
                 f"{'-':>11}")
    for r in result["table1"]:
        lines.append(
            f"{r['name']:<17} {r['trainable']:>9,} {format_bytes(r['state_bytes']):>11} "
            f"{format_bytes(r['weight_bytes']):>10} {format_bytes(r['task_bytes']):>10} {_mem(r):>10} "
            f"{r['step_ms']:>7.1f} {r['train_seconds']:>7.1f} {_pct(r['desc']):>6} {_pct(r['pretrain_mean']):>8} "
            f"{_pct(r['pretrain_adapter_off_mean']):>11}")
    return "\n".join(lines)


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=100, initial_indent="   ", subsequent_indent="   ")


def _notes1(result: dict) -> str:
    rows = result["table1"]
    s = result["settings"]
    notes = [_wrap(
        "grads+AdamW: the gradients and AdamW moments training holds; weights: every array the model keeps "
        "(QLoRA: NF4 codes and block constants; QA-LoRA: INT codes packed into a bit stream and a float16 scale and "
        f"zero point per group of {s['group_size']}); task file: the trainable parameters, what "
        f"one more task costs to store; step peak: the most host memory one training step of {s['batch_size']} "
        "rows had allocated at once (tracemalloc: weights, gradients, optimizer state, activations); ms/step: the "
        f"median of {TIMED_STEPS} timed steps (wall); desc: exact match on held-out rows; pretrain: "
        "copy/reverse/sort/upper with the tuned weights; adapter off: the same with lora.disable_adapters.")]
    adapted = [r for r in rows if r["method"] != "full"]
    if adapted:
        verdicts = ", ".join(f"{r['name']} {'yes' if r['adapter_off_is_frozen_base'] else 'NO'}" for r in adapted)
        text = f"Adapter off, the pretrain tasks' logits are bit for bit the frozen base's before tuning: {verdicts}."
        lora = next((r for r in adapted if r["method"] == "lora"), None)
        if lora is not None:
            same = lora["pretrain_adapter_off"] == result["base"]["pretrain"]
            text += (f" LoRA's frozen base is the base model itself: {_pct(lora['pretrain_adapter_off_mean'])} "
                     f"{'=' if same else '!='} the base model's {_pct(result['base']['pretrain_mean'])}.")
        notes.append(_wrap(text))
    full = next((r for r in rows if r["method"] == "full"), None)
    if full is not None:
        notes.append(_wrap(f"Full fine-tuning has no adapter to switch off (n/a): its pretrain tasks went from "
                           f"{_pct(result['base']['pretrain_mean'])} to {_pct(full['pretrain_mean'])} for good."))
    return "\n".join(notes)


def format_result(result: dict) -> str:
    """Both tables and their notes, as the demo prints them."""
    from .qlora_vs_qalora import format_table

    s = result["settings"]
    out = ["1. What each method trains, holds and gets\n", format_table1(result), "", _notes1(result), ""]
    if result["table2"]:
        out += [f"2. Deploying at {', '.join(map(str, s['bits']))} bits, group size {s['group_size']}: QLoRA merges in "
                "float and re-quantizes,\n   QA-LoRA folds its adapter into the zero points\n",
                format_table(result["table2"]), "",
                _wrap(f"trained: desc as trained (QLoRA's and QA-LoRA INT{s['bits'][0]}'s are table 1's; QA-LoRA "
                      "trains once per width); deployed: after the merge; pretrain: copy/reverse/sort/upper; "
                      "logits rel: ||deployed - trained|| / ||trained|| on the desc rows.")]
    else:
        out.append("2. Deployment: skipped (neither qlora nor qalora in --methods)")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------- files
_COLORS = {"full": "#555555", "lora": "#f28e2b", "qlora": "#e15759"}
_QALORA_COLORS = ("#4e79a7", "#76b7b2", "#59a14f", "#9c755f", "#b07aa1", "#edc948", "#bab0ac")


def _runs(result: dict) -> list:
    return result["table1"] + result["extra_runs"]


def _color(row, result) -> str:
    if row["method"] in _COLORS:
        return _COLORS[row["method"]]
    return _QALORA_COLORS[result["settings"]["bits"].index(row["bits"]) % len(_QALORA_COLORS)]


def plot_losses(result: dict, smooth: int | None = None):
    """Every run's training loss on one plot (log scale): faint per step, solid its moving average
    (over ``smooth`` steps, default a thirtieth of the run)."""
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    from .plots import STYLE, moving_average

    if smooth is None:
        smooth = max(1, result["settings"]["steps"] // 30)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(9, 5.2))
        for row in _runs(result):
            loss = np.asarray(row["loss"], dtype=np.float64)  # (steps,)
            step = np.arange(1, loss.size + 1)  # (steps,)
            color = _color(row, result)
            ax.plot(step, loss, color=color, alpha=0.2, lw=0.8)
            ax.plot(step, moving_average(loss, smooth), color=color, lw=2.0,
                    label=f"{row['name']}: desc {row['desc']:.1%}")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("step")
        ax.set_ylabel("training loss on desc (log scale)")
        s = result["settings"]
        ax.set_title(f"Fine-tuning on desc: {s['steps']} steps of {s['batch_size']} "
                     f"(solid: {smooth}-step average)")
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
        fig.tight_layout()
    return fig


_PARTS = (("weights", "weights", "#9fb3c8"), ("gradients", "gradients", "#f28e2b"),
          ("optimizer", "AdamW moments", "#e15759"), ("activations", "activations", "#59a14f"),
          ("temporaries", "other temporaries", "#d0d0d0"))


def plot_step_memory(result: dict):
    """The traced peak of one training step per method, stacked: weights, gradients, AdamW, activations."""
    import matplotlib.pyplot as plt

    from .plots import STYLE

    rows = [r for r in result["table1"] if r.get("step_memory")]
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(9, 5.2))
        if not rows:
            ax.text(0.5, 0.5, "no traced memory (tracemalloc sees host arrays only)", ha="center", va="center")
            ax.set_axis_off()
            return fig
        x = np.arange(len(rows))  # (n,)
        bottom = np.zeros(len(rows))  # (n,)
        for key, label, color in _PARTS:
            mib = np.array([r["step_memory"][key] / 2**20 for r in rows])  # (n,) MiB
            ax.bar(x, mib, 0.6, bottom=bottom, color=color, edgecolor="white", label=label)
            bottom = bottom + mib  # (n,)
        for xi, r, top in zip(x, rows, bottom):
            ax.text(xi, top, format_bytes(r["step_memory"]["peak"]), ha="center", va="bottom", fontsize=10.5)
        ax.set_xticks(x)
        ax.set_xticklabels([r["name"] for r in rows])
        ax.set_ylabel("MiB at the step's peak")
        s = result["settings"]
        ax.set_title(f"One training step ({s['batch_size']} rows), traced with tracemalloc")
        ax.legend(frameon=False, loc="upper right")
        ax.set_ylim(0, bottom.max() * 1.15)
        fig.tight_layout()
    return fig


def figure_writers(result: dict, folder: str) -> dict:
    """``{folder/demo_loss.png: write_fn, folder/demo_memory.png: write_fn}`` for ``outputs.write_set``."""
    import matplotlib.pyplot as plt

    def writer(make):
        def write(tmp):
            fig = make(result)
            try:
                fig.savefig(tmp, dpi=130, format="png", facecolor="white")
            finally:
                plt.close(fig)
        return write

    return {os.path.join(folder, name): writer(make) for name, make in zip(FIGURES, (plot_losses, plot_step_memory))}


def write_figures(result: dict, folder: str) -> list:
    """``demo_loss.png`` and ``demo_memory.png`` in ``folder``, written as a set (both or neither); the paths."""
    return write_set(figure_writers(result, folder))


# ---------------------------------------------------------------------------------------- command line
def _words(values) -> list:
    """``--methods lora qlora`` and ``--methods lora,qlora`` alike."""
    return [w for v in values for w in str(v).replace(",", " ").split()]


def _int(value: str, what: str, low: int | None = None, high: int | None = None) -> int:
    """A command-line integer, ``low <= value <= high`` (``checks.check_int``), or a ValueError naming ``what``."""
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None
    return check_int(what, number, low, high)


def add_arguments(parser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Adapt the shipped base model to 'desc' (sort descending) four ways and measure each: table 1\n"
        "(what trains, what training holds, one step's traced peak memory and time, the score, the\n"
        "pretrain tasks with the adapter on and off), then table 2 (QLoRA and QA-LoRA deployed at low\n"
        "bit width). Every (method, bit width) is trained once; both tables use that run.")
    parser.add_argument("--quick", action="store_true",
                        help=f"a short run: {QUICK['steps']} steps, {QUICK['eval_per_task']} held-out desc rows "
                             f"(instead of {FULL['eval_per_task']}), bits {' '.join(map(str, QUICK['bits']))}")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), metavar="METHOD",
                        help="table 1's rows, any of full, lora, qlora, qalora (space- or comma-separated; "
                             "default all four); table 2 deploys those of qlora and qalora that are listed, "
                             "and is skipped without them")
    parser.add_argument("--rank", default=str(RANK), metavar="R", help=f"adapter rank r > 0 (default {RANK})")
    parser.add_argument("--alpha", default=str(ALPHA), metavar="ALPHA",
                        help=f"adapter alpha, scaling alpha / r (default {ALPHA})")
    parser.add_argument("--steps", default=None, metavar="N",
                        help=f"training steps of every fine-tune (default {FULL['steps']}; quick {QUICK['steps']}), "
                             f"batches of {FULL['batch_size']}")
    parser.add_argument("--bits", nargs="+", default=None, metavar="N",
                        help="table 2's bit widths, each 2..8 (default 4 3 2; quick 2). QA-LoRA trains once "
                             "per width and its run at the first width is its row in table 1; QLoRA trains once "
                             "on NF4 and deploys at every width")
    parser.add_argument("--seed", default="0", metavar="S",
                        help="adapter initialization, training batches and held-out rows (default 0)")
    parser.add_argument("--base", default=BASE_CHECKPOINT, metavar="PATH",
                        help="the base model checkpoint (default: the shipped one)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="write every number of both tables (and the loss curves) to PATH")
    parser.add_argument("--figures", default=None, metavar="DIR",
                        help=f"write {FIGURES[0]} (every run's loss curve) and {FIGURES[1]} (one step's memory "
                             "per method: weights, gradients, optimizer state, activations) into DIR")
    parser.add_argument("--backend", choices=["numpy", "cupy"], default=argparse.SUPPRESS,
                        help="array backend, as the global option (step memory is traced on numpy only)")
    parser.add_argument("--force", action="store_true",
                        help="replace the --json file and the figures in --figures if they exist")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args) -> int:
    """The demo from parsed arguments: checks everything, runs, prints both tables, then writes the files."""
    methods = check_methods(_words(args.methods))
    r = _int(args.rank, "--rank", 1)
    try:
        alpha = float(args.alpha)
    except ValueError:
        raise ValueError(f"--alpha must be a number, got {args.alpha!r}") from None
    alpha = check_number("--alpha", alpha, above=0.0)
    steps = None if args.steps is None else _int(args.steps, "--steps", 1)
    bits = None if args.bits is None else [_int(b, "--bits", 2, 8) for b in _words(args.bits)]
    seed = _int(args.seed, "--seed", 0)
    if args.json is not None:
        check_output_path(args.json, "--json", force=args.force)
    if args.figures is not None:
        check_output_path(args.figures, "--figures", folder=True)
        for name in FIGURES:
            check_output_path(os.path.join(args.figures, name), "--figures", force=args.force)
    quick = args.quick

    def say(msg):
        print(msg, flush=True)

    result = run_demo(methods=methods, r=r, alpha=alpha, steps=steps, bits=bits, seed=seed, base=args.base,
                      quick=quick, progress=not args.no_progress, say=say)
    print("\n" + format_result(result))
    wall, cpu = result["seconds"]["wall"], result["seconds"]["cpu"]
    print(f"\n(total {wall:.0f} s wall, {cpu:.0f} s CPU; {len(_runs(result))} fine-tunes)")
    files = figure_writers(result, args.figures) if args.figures is not None else {}
    if args.json is not None:
        files[args.json] = json_writer(result, indent=1, end="\n")  # every number of both tables and the loss curves
    for path in write_set(files):  # the figures and the JSON: all of them or none
        print(f"wrote {path}")
    return 0


def run_benchmarks(quick: bool = False) -> int:
    """Run every script in benchmarks/ (they print their own medians and ratios)."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    if not os.path.isdir(root):
        raise ValueError(f"bench runs the scripts in {root}, which is not there (run from a source checkout)")
    status = 0
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            print(f"== {name}", flush=True)
            res = subprocess.run([sys.executable, os.path.join(root, name)] + (["--quick"] if quick else []))
            status |= res.returncode
    return status
