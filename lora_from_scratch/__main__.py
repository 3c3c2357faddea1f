"""Command line: ``python -m lora_from_scratch COMMAND``.

- ``demo``: the main job: the shipped base model adapted four ways, measured side by side, and
  the two quantized methods deployed at low bit width (``demo.py``);
- ``verify``: the evidence without pytest: every layer and model against the reference libraries;
- ``experiment NAME``: one of the papers' experiments at classroom scale (``experiments/``);
- ``pretrain``: re-train the small base model (4 layers, 4 heads, width 128, block 32) on the
  uniform mix of copy / reverse / sort / upper and save it as safetensors; the package ships the
  result (``io.BASE_CHECKPOINT``) so every other command starts from it in seconds;
- ``figures``: regenerate the figures in ``figures/`` that need no training;
- ``student-notebooks``: write the student copies of the tutorial (solutions taken out);
- ``bench``: run the benchmark scripts.

Bad input gets one line that names the problem and exit code 2, not a traceback (``LFS_DEBUG=1``
shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .io import BASE_CHECKPOINT  # noqa: F401  (re-exported: the shipped base model)

BASE_CONFIG = dict(n_layer=4, n_head=4, n_embd=128, block_size=32)
PRETRAIN_SEED = 0


class UsageError(Exception):
    """Bad input on the command line: printed as one line, exit code 2."""


def pretrain(out: str, steps: int, seed: int, batch_size: int, progress: bool = True) -> dict:
    """Train the base model from scratch with the documented recipe and save it to ``out``."""
    from . import data
    from .io import save_checkpoint
    from .model import GPT, GPTConfig
    from .train import TrainConfig, train

    cfg = GPTConfig(vocab_size=data.VOCAB_SIZE, **BASE_CONFIG)
    model = GPT(cfg, seed=seed)
    tcfg = TrainConfig(steps=steps, batch_size=batch_size, seed=seed, eval_every=max(1, steps // 8))
    print(f"pre-training a {model.num_parameters() / 1e6:.2f}M-parameter GPT on {list(tcfg.tasks)} "
          f"for {steps} steps (batch {batch_size}, seed {seed})")
    hist = train(model, tcfg, progress=progress)
    step, scores = hist["eval"][-1]
    command = f"python -m lora_from_scratch pretrain --steps {steps} --seed {seed} --batch-size {batch_size}"
    save_checkpoint(model, out, metadata={
        "command": command, "seed": seed, "steps": step, "exact_match": scores,
        "final_loss": hist["loss"][-1], "train": tcfg.to_dict(), "seconds": round(hist["seconds"], 1),
    })
    print(f"saved {out}  ({hist['seconds']:.0f} s)")
    print("exact match: " + "  ".join(f"{t} {s:.1%}" for t, s in scores.items()))
    return {"exact_match": scores, "seconds": hist["seconds"], "final_loss": hist["loss"][-1]}


def _parser() -> argparse.ArgumentParser:
    from . import demo, experiments, gpt2_cli, verify

    parser = argparse.ArgumentParser(prog="python -m lora_from_scratch", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["numpy", "cupy"], default=None,
                        help="array backend (default: $LFS_BACKEND or numpy)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo.add_arguments(sub.add_parser("demo", help="the whole story: four ways to adapt, measured; deployment"))
    verify.add_arguments(sub.add_parser("verify", help="every layer and model against the reference libraries"))
    experiments.add_arguments(sub.add_parser("experiment", help="run one of the papers' experiments (omit NAME "
                                                                "to list them)"))
    gpt2_cli.add_arguments(sub)  # generate, finetune: a GPT-2 folder in, text out

    p = sub.add_parser("pretrain", help="train the base model and save it as safetensors")
    p.add_argument("--out", default=BASE_CHECKPOINT)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=PRETRAIN_SEED)
    p.add_argument("--no-progress", action="store_true")

    q = sub.add_parser("figures", help="regenerate the figures that need no training")
    q.add_argument("--out", default="figures")
    s = sub.add_parser("student-notebooks", help="write notebooks/student/ (the solutions taken out)")
    s.add_argument("--out", default=None, help="folder (default: notebooks/student)")
    b = sub.add_parser("bench", help="run the benchmark scripts")
    b.add_argument("--quick", action="store_true", help="shorter runs")
    return parser


def _run(args) -> int:
    if args.backend:
        from .backend import set_backend

        set_backend(args.backend)
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(args)
    if args.command == "verify":
        from .verify import main as verify_main

        return verify_main(args)
    if args.command == "experiment":
        from .experiments import main as experiment_main

        return experiment_main(args)
    if args.command in ("generate", "finetune"):
        from .gpt2_cli import main as gpt2_main

        return gpt2_main(args)
    if args.command == "pretrain":
        result = pretrain(args.out, args.steps, args.seed, args.batch_size, progress=not args.no_progress)
        print(json.dumps({k: v for k, v in result.items() if k != "seconds"}, indent=None))
        return 0
    if args.command == "figures":
        from .plots import make_all_figures

        for path in make_all_figures(args.out):
            print(path)
        return 0
    if args.command == "student-notebooks":
        from .exercises.students import STUDENT, write_student_notebooks

        for path in write_student_notebooks(out=args.out or STUDENT):
            print(path)
        return 0
    if args.command == "bench":
        from .demo import run_benchmarks

        return run_benchmarks(quick=args.quick)
    return 2  # pragma: no cover


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (UsageError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
        if os.environ.get("LFS_DEBUG"):
            raise  # the full traceback, for developers
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing half-written was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
