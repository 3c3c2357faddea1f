"""Command line: ``python -m lora_from_scratch COMMAND``.

- ``demo``: the main job: the shipped base model adapted four ways, measured side by side, and
  the two quantized methods deployed at low bit width (``demo.py``);
- ``verify``: the evidence without pytest: every layer and model against the reference libraries;
- ``experiment NAME``: one of the papers' experiments at classroom scale (``experiments/``);
- ``pretrain``: re-train the small base model (4 layers, 4 heads, width 128, block 32) on the
  uniform mix of copy / reverse / sort / upper and save it as safetensors, by default to
  ``runs/base.safetensors`` under the current folder (never over the shipped model,
  ``checkpoint.BASE_CHECKPOINT``, unless ``--out`` names it and ``--force`` is given);
- ``figures``: regenerate the figures in ``figures/`` that need no training;
- ``student-notebooks``: write the student copies of the tutorial (solutions taken out);
- ``bench``: run the benchmark scripts.

Bad input (arguments, paths, a backend that cannot run here) gets one line that names the problem
and exit code 2, checked before any work; output paths included, and an existing output file is
refused unless ``--force``. Training that diverges: one line, exit code 1. Ctrl-C: one line, exit
code 130, and a command's outputs are written as one set at the end (``outputs.write_set``), so an
interrupted run leaves all of them or none. ``LFS_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .checkpoint import BASE_CHECKPOINT  # noqa: F401  (re-exported: the shipped base model)

BASE_CONFIG = dict(n_layer=4, n_head=4, n_embd=128, block_size=32)
PRETRAIN_SEED = 0
PRETRAIN_OUT = os.path.join("runs", "base.safetensors")  # relative to the current folder


class UsageError(Exception):
    """Bad input on the command line: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (``error: ...``) and exit code 2, like every other refusal."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message}\n")


def pretrain(out: str, steps: int, seed: int, batch_size: int, progress: bool = True) -> dict:
    """Train the base model from scratch with the documented recipe and save it to ``out`` (replacing a file)."""
    from . import data
    from .checkpoint import save_checkpoint
    from .model import GPT, GPTConfig
    from .outputs import write_set
    from .train import TrainConfig, train

    cfg = GPTConfig(vocab_size=data.VOCAB_SIZE, **BASE_CONFIG)
    model = GPT(cfg, seed=seed)
    tcfg = TrainConfig(steps=steps, batch_size=batch_size, seed=seed, eval_every=max(1, steps // 8))
    print(f"pre-training a {model.num_parameters() / 1e6:.2f}M-parameter GPT on {list(tcfg.tasks)} "
          f"for {steps} steps (batch {batch_size}, seed {seed})")
    hist = train(model, tcfg, progress=progress)
    step, scores = hist["eval"][-1]
    command = f"python -m lora_from_scratch pretrain --steps {steps} --seed {seed} --batch-size {batch_size}"
    metadata = {"command": command, "seed": seed, "steps": step, "exact_match": scores,
                "final_loss": hist["loss"][-1], "train": tcfg.to_dict(), "seconds": round(hist["seconds"], 1)}
    write_set({out: lambda tmp: save_checkpoint(model, tmp, metadata=metadata)})
    print(f"saved {os.path.abspath(out)}  ({hist['seconds']:.0f} s)")
    print("exact match: " + "  ".join(f"{t} {s:.1%}" for t, s in scores.items()))
    return {"exact_match": scores, "seconds": hist["seconds"], "final_loss": hist["loss"][-1]}


def _parser() -> argparse.ArgumentParser:
    from . import demo, experiments, gpt2_cli, verify

    parser = _Parser(prog="python -m lora_from_scratch", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["numpy", "cupy"], default=None,
                        help="array backend (default: $LFS_BACKEND or numpy)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo.add_arguments(sub.add_parser("demo", help="the whole story: four ways to adapt, measured; deployment"))
    verify.add_arguments(sub.add_parser("verify", help="every layer and model against the reference libraries"))
    experiments.add_arguments(sub.add_parser("experiment", help="run one of the papers' experiments (omit NAME "
                                                                "to list them)"))
    gpt2_cli.add_arguments(sub)  # generate, finetune: a GPT-2 folder in, text out

    p = sub.add_parser("pretrain", help="train the base model and save it as safetensors")
    p.add_argument("--out", default=PRETRAIN_OUT,
                   help=f"the checkpoint to write (default: {PRETRAIN_OUT} under the current folder; the shipped "
                        "model is never replaced unless named here, with --force)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=PRETRAIN_SEED)
    p.add_argument("--no-progress", action="store_true")

    q = sub.add_parser("figures", help="regenerate the figures that need no training")
    q.add_argument("--out", default="figures", help="folder (default: figures); its figures are replaced, as a set")
    s = sub.add_parser("student-notebooks", help="write notebooks/student/ (the solutions taken out)")
    s.add_argument("--out", default=None, help="folder (default: notebooks/student); its notebooks are replaced, "
                                               "as a set")
    b = sub.add_parser("bench", help="run the benchmark scripts")
    b.add_argument("--quick", action="store_true", help="shorter runs")
    return parser


def _choose_backend(args) -> None:
    """Set the backend now, before any work: one that cannot run here (or an unknown name) is a UsageError."""
    from .backend import CUPY_NEEDS, BackendUnavailable, get_backend_name, set_backend

    source = f"--backend {args.backend}" if args.backend else f"LFS_BACKEND={os.environ.get('LFS_BACKEND', '')}"
    try:
        if args.backend:
            set_backend(args.backend)
        else:
            get_backend_name()  # reads LFS_BACKEND
    except BackendUnavailable as e:
        raise UsageError(f"{source} {CUPY_NEEDS} ({e.why})") from None
    except ValueError as e:
        raise UsageError(f"{source}: {e}") from None


def _check_pretrain(args) -> None:
    from .checks import check_int
    from .outputs import check_output_path

    check_int("--steps", args.steps, 1)
    check_int("--batch-size", args.batch_size, 1)
    check_int("--seed", args.seed, 0)
    package = os.path.dirname(os.path.abspath(__file__))
    if args.out == PRETRAIN_OUT and os.path.abspath(args.out).startswith(package + os.sep):
        raise UsageError(f"the default --out {PRETRAIN_OUT} is inside the package here ({package}); run from "
                         "another folder, or name the file with --out")
    check_output_path(args.out, "--out", force=args.force)


def _run(args) -> int:
    _choose_backend(args)
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
        _check_pretrain(args)
        result = pretrain(args.out, args.steps, args.seed, args.batch_size, progress=not args.no_progress)
        print(json.dumps({k: v for k, v in result.items() if k != "seconds"}, indent=None))
        return 0
    if args.command in ("figures", "student-notebooks"):
        from .outputs import check_output_path, staged_folder

        if args.command == "figures":
            from .plots import make_all_figures

            write_into = make_all_figures
        else:
            from .exercises.students import STUDENT, write_student_notebooks

            args.out = args.out or STUDENT

            def write_into(folder):
                return write_student_notebooks(out=folder)
        check_output_path(args.out, "--out", folder=True)
        with staged_folder(args.out) as staging:  # all the files, or none
            write_into(staging.folder)
        for path in staging.paths:
            print(path)
        return 0
    if args.command == "bench":
        from .demo import run_benchmarks

        return run_benchmarks(quick=args.quick)
    return 2  # pragma: no cover


# refused input: exit code 2
_BAD_INPUT = (UsageError, ValueError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
              NotADirectoryError)


def main(argv=None) -> int:
    """Run one command; returns the exit code (0 done, 1 failed or diverged, 2 refused input, 130 Ctrl-C)."""
    from .outputs import interrupted_message
    from .train import TrainingDiverged

    try:
        args = _parser().parse_args(argv)  # argparse's refusals: one line, exit code 2 (_Parser.error)
        return _run(args)
    except KeyboardInterrupt:
        if os.environ.get("LFS_DEBUG"):
            raise
        print(interrupted_message(), file=sys.stderr)
        return 130
    except (*_BAD_INPUT, TrainingDiverged, OSError) as e:
        if os.environ.get("LFS_DEBUG"):
            raise  # the full traceback, for developers
        if isinstance(e, TrainingDiverged):
            print(f"error: training diverged: {e}", file=sys.stderr)
            return 1
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, _BAD_INPUT) else 1


if __name__ == "__main__":
    sys.exit(main())
