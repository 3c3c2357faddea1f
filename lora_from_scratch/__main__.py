"""Command line: ``python -m lora_from_scratch {pretrain, demo, figures, bench}``.

``pretrain`` trains the small base model (4 layers, 4 heads, width 128,
block 32) on the uniform mix of copy / reverse / sort / upper and saves it
as safetensors; the package ships the result (``BASE_CHECKPOINT``) so later
stages start from it in seconds.
"""

from __future__ import annotations

import argparse
import json
import sys

from .io import BASE_CHECKPOINT  # noqa: E402,F401  (re-exported: the shipped base model)

BASE_CONFIG = dict(n_layer=4, n_head=4, n_embd=128, block_size=32)
PRETRAIN_SEED = 0


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_from_scratch", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["numpy", "cupy"], default=None,
                        help="array backend (default: $LFS_BACKEND or numpy)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="train the base model and save it as safetensors")
    p.add_argument("--out", default=BASE_CHECKPOINT)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=PRETRAIN_SEED)
    p.add_argument("--no-progress", action="store_true")

    for name, helptext in (("demo", "the whole story in one table"), ("figures", "regenerate figures/"),
                           ("bench", "run the benchmark scripts")):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("--quick", action="store_true", help="a shorter run")
        if name == "figures":
            q.add_argument("--out", default="figures")

    args = parser.parse_args(argv)
    if args.backend:
        from .backend import set_backend

        set_backend(args.backend)
    if args.command == "pretrain":
        result = pretrain(args.out, args.steps, args.seed, args.batch_size, progress=not args.no_progress)
        print(json.dumps({k: v for k, v in result.items() if k != "seconds"}, indent=None))
        return 0
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(quick=args.quick)
    if args.command == "figures":
        from .plots import make_all_figures

        for path in make_all_figures(args.out):
            print(path)
        return 0
    if args.command == "bench":
        from .demo import run_benchmarks

        return run_benchmarks(quick=args.quick)
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
