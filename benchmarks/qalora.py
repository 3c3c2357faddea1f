"""QA-LoRA layer timing: a training step against LoRA's, and merged against unmerged inference.

QA-LoRA (Xu et al., 2023), Section 3.3: the adapter acts on the input mean-pooled per group of
input channels, so its A is (r, in / group_size) instead of (r, in), and after training it folds
into the zero points, leaving one quantized matrix product at inference. Measured on one layer,
in = out = 1024, 2048 tokens, r = 16, alpha = 32, INT4 with group size 32, float32:

- training step (forward + backward, dy fixed): ``QALoRALinear`` over ``LoRALinear`` of the same
  shape (both hold a frozen base; QA-LoRA's is dequantized from its codes on every forward);
- inference (forward only): the merged layer (``QALoRALinear.merged_base()``, a ``GroupwiseLinear``)
  over the unmerged ``QALoRALinear``; and, for reference, the merged layer over a float
  ``nn.Linear`` (the price of dequantizing on the fly in NumPy, with no low-bit kernel).

The layers are timed alternately in one run after a warm-up; medians over the repetitions, as
wall-clock and as process CPU time (on a shared machine the CPU time is the steadier).

    python benchmarks/qalora.py [--reps 21] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from lora_from_scratch.backend import asarray, get_xp, to_numpy  # noqa: E402
from lora_from_scratch.lora import LoRALinear  # noqa: E402
from lora_from_scratch.nn import Linear  # noqa: E402
from lora_from_scratch.qalora import QALoRALinear  # noqa: E402

IN = OUT = 1024
TOKENS = 2048
RANK, ALPHA, BITS, GROUP = 16, 32, 4, 32


def _sync():
    xp = get_xp()
    if xp.__name__ == "cupy":  # GPU work is asynchronous: wait for it before reading the clock
        xp.cuda.Stream.null.synchronize()


def _timed_alternately(fns: dict, reps: int) -> tuple[dict, dict]:
    """name -> (median wall seconds, median CPU seconds), the functions called in turn, rep after rep."""
    for fn in fns.values():  # warm-up
        fn()
        fn()
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            s, c = time.perf_counter(), time.process_time()
            fn()
            _sync()
            wall[name].append(time.perf_counter() - s)
            cpu[name].append(time.process_time() - c)
    return ({k: statistics.median(v) for k, v in wall.items()}, {k: statistics.median(v) for k, v in cpu.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--quick", action="store_true", help="5 repetitions")
    args = ap.parse_args()
    reps = 5 if args.quick else args.reps

    rng = np.random.default_rng(0)
    base = Linear(IN, OUT, rng=rng)
    base.bias.data = asarray(rng.standard_normal(OUT) * 0.1, dtype="float32")  # (OUT,)
    lora = LoRALinear(base, RANK, ALPHA, rng=rng)
    qalora = QALoRALinear(base, RANK, ALPHA, bits=BITS, group_size=GROUP, rng=rng)
    # give B values, as after training (B = 0 would make the merge trivial)
    lora.lora_B.data = asarray(rng.standard_normal((OUT, RANK)) * 0.01, dtype="float32")  # (OUT, r)
    qalora.lora_B.data = asarray(rng.standard_normal((OUT, RANK)) * 0.01, dtype="float32")  # (OUT, r)
    x = asarray(rng.standard_normal((TOKENS, IN)), dtype="float32")  # (N, in)
    dy = asarray(rng.standard_normal((TOKENS, OUT)), dtype="float32")  # (N, out)
    merged = qalora.merged_base()  # a new GroupwiseLinear: same codes, merged zero points

    y_unmerged = qalora(x)  # (N, out)
    rel = float(np.linalg.norm(to_numpy(merged(x)) - to_numpy(y_unmerged)) / np.linalg.norm(to_numpy(y_unmerged)))
    assert rel < 1e-5, f"merged and unmerged outputs differ: rel {rel:.2e}"
    assert np.array_equal(to_numpy(merged.packed.data), to_numpy(qalora.base.packed.data))

    def train_step(layer):
        def step():
            layer.lora_A.grad = layer.lora_B.grad = None
            layer(x)
            layer.backward(dy)
        return step

    train_wall, train_cpu = _timed_alternately({"lora": train_step(lora), "qalora": train_step(qalora)}, reps)
    inf_wall, inf_cpu = _timed_alternately(
        {"unmerged": lambda: qalora(x), "merged": lambda: merged(x), "float": lambda: base(x)}, reps)

    threads = os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))
    print(f"layer in={IN} out={OUT}, {TOKENS} tokens, r={RANK}, alpha={ALPHA}, INT{BITS} group {GROUP}, float32, "
          f"backend {get_xp().__name__}, {threads} threads, {reps} reps (medians)")
    print(f"merged vs unmerged outputs: rel {rel:.2e}; codes unchanged by the merge")
    print("training step (forward + backward):")
    for name in ("lora", "qalora"):
        print(f"  {name:<8} {train_wall[name] * 1e3:8.1f} ms wall {train_cpu[name] * 1e3:8.1f} ms CPU")
    print(f"  ratio QA-LoRA / LoRA:        {train_wall['qalora'] / train_wall['lora']:6.3f} wall "
          f"{train_cpu['qalora'] / train_cpu['lora']:6.3f} CPU")
    print("inference (forward only):")
    for name in ("unmerged", "merged", "float"):
        print(f"  {name:<8} {inf_wall[name] * 1e3:8.1f} ms wall {inf_cpu[name] * 1e3:8.1f} ms CPU")
    print(f"  ratio merged / unmerged:     {inf_wall['merged'] / inf_wall['unmerged']:6.3f} wall "
          f"{inf_cpu['merged'] / inf_cpu['unmerged']:6.3f} CPU")
    print(f"  ratio merged / float Linear: {inf_wall['merged'] / inf_wall['float']:6.3f} wall "
          f"{inf_cpu['merged'] / inf_cpu['float']:6.3f} CPU")


if __name__ == "__main__":
    main()
