"""LoRA (r=8 on Wq, Wk, Wv, Wo, MLP up, MLP down) against full fine-tuning: step time and trainable state.

Hu et al. (2021), section 4.2 ("Practical Benefits and Limitations"): freezing W0 removes its
gradient and its optimizer state. This script measures both effects on one GPT (n_layer=4, n_head=4,
n_embd=128, block_size=128, batch 16, vocab 96, float32, the config of ``train_step.py``):

- step time (forward, cross-entropy, backward, AdamW step), the two models timed alternately in one
  run after a warm-up, medians over the repetitions; ratio LoRA / full (target <= 0.8: every frozen
  weight skips its (out, N) @ (N, in) gradient product, the frozen tied embedding skips the LM head's
  weight gradient and the embeddings' scatter-add);
- trainable-state bytes: the gradients plus AdamW's two moment arrays, summed from the arrays' nbytes
  after a step; ratio LoRA / full (target <= 5 %). Every trainable parameter costs the same three
  arrays' worth, so this ratio is the trainable-parameter ratio; it is also measured for r = 4.

Step times are reported as wall-clock medians and as process CPU-time medians; on a machine shared
with other work the CPU time is the steadier of the two (``OMP_NUM_THREADS=1`` steadier still).

    python benchmarks/lora_step.py [--reps 15] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from lora_from_scratch.backend import get_xp, to_numpy  # noqa: E402
from lora_from_scratch.functional import cross_entropy  # noqa: E402
from lora_from_scratch.lora import apply_lora, count_parameters  # noqa: E402
from lora_from_scratch.model import GPT, GPTConfig  # noqa: E402
from lora_from_scratch.optim import AdamW  # noqa: E402

CONFIG = dict(vocab_size=96, block_size=128, n_layer=4, n_head=4, n_embd=128)
BATCH = 16
RANK, ALPHA = 8, 16
TARGETS = ["q", "k", "v", "o", "fc", "proj"]


def trainable_state_bytes(model, opt) -> int:
    """Bytes of every trainable parameter's gradient plus the optimizer's moment arrays."""
    grads = sum(int(p.grad.nbytes) for p in model.parameters() if p.trainable and p.grad is not None)
    return grads + opt.state_nbytes()


def _sync():
    xp = get_xp()
    if xp.__name__ == "cupy":  # GPU work is asynchronous: wait for it before reading the clock
        xp.cuda.Stream.null.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="5 repetitions")
    args = ap.parse_args()
    reps = 5 if args.quick else args.reps

    cfg = GPTConfig(**CONFIG)
    rng = np.random.default_rng(0)
    xp = get_xp()
    idx = xp.asarray(rng.integers(0, cfg.vocab_size, size=(BATCH, cfg.block_size)))  # (B, T)
    tgt = xp.asarray(rng.integers(0, cfg.vocab_size, size=(BATCH, cfg.block_size)))  # (B, T)

    full = GPT(cfg, seed=0)
    lora = apply_lora(GPT(cfg, seed=0), RANK, ALPHA, TARGETS, seed=1)
    opts = {"full": AdamW(full.parameters(), lr=1e-4), "lora": AdamW(lora.parameters(), lr=1e-4)}
    models = {"full": full, "lora": lora}

    def step(name):
        model, opt = models[name], opts[name]
        logits = model(idx)  # (B, T, V)
        loss, dlogits = cross_entropy(logits, tgt)
        opt.zero_grad()
        model.backward(dlogits)
        opt.step()
        _sync()
        return float(loss)

    l_full, l_lora = step("full"), step("lora")  # warm-up; B = 0, so both start from the same loss
    assert abs(l_full - l_lora) < 1e-5, f"LoRA with B = 0 should start at the base loss: {l_lora} vs {l_full}"
    for _ in range(2):
        step("full")
        step("lora")
    times = {"full": [], "lora": []}
    cpu = {"full": [], "lora": []}
    for _ in range(reps):
        for name in ("full", "lora"):
            s, c = time.perf_counter(), time.process_time()
            step(name)
            times[name].append(time.perf_counter() - s)
            cpu[name].append(time.process_time() - c)

    state = {name: trainable_state_bytes(models[name], opts[name]) for name in models}
    t_full, t_lora = statistics.median(times["full"]), statistics.median(times["lora"])
    c_full, c_lora = statistics.median(cpu["full"]), statistics.median(cpu["lora"])
    lora4 = apply_lora(GPT(cfg, seed=0), 4, ALPHA, TARGETS, seed=1)  # one step at r = 4, for its state
    models["lora4"], opts["lora4"] = lora4, AdamW(lora4.parameters(), lr=1e-4)
    step("lora4")
    state4 = trainable_state_bytes(lora4, opts["lora4"])
    (tr_full, tot), (tr_lora, _) = count_parameters(full), count_parameters(lora)
    frozen_grads = [n for n, p in lora.named_parameters() if not p.trainable and p.grad is not None]
    assert not frozen_grads, f"frozen parameters received gradients: {frozen_grads}"
    assert float(np.abs(to_numpy(lora.blocks[0].attn.q.lora_B.data)).sum()) > 0  # the adapters did train

    threads = os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))
    print(f"config: {CONFIG}, batch {BATCH}, float32, backend {xp.__name__}, {threads} threads, {reps} reps")
    print(f"LoRA: r={RANK}, alpha={ALPHA}, targets {TARGETS} in every block")
    print(f"trainable parameters: full {tr_full:,} / {tot:,}; LoRA {tr_lora:,} ({tr_lora / tr_full:.2%} of full)")
    print(f"full fine-tuning median step: {t_full * 1e3:8.1f} ms wall, {c_full * 1e3:8.1f} ms CPU")
    print(f"LoRA             median step: {t_lora * 1e3:8.1f} ms wall, {c_lora * 1e3:8.1f} ms CPU")
    print(f"step-time ratio LoRA / full:        {t_lora / t_full:6.3f} wall, {c_lora / c_full:6.3f} CPU"
          f"   (target <= 0.8)")
    print(f"trainable state (grads + AdamW moments): full {state['full'] / 2**20:.2f} MiB, "
          f"LoRA {state['lora'] / 2**20:.3f} MiB")
    print(f"trainable-state ratio LoRA / full:  {state['lora'] / state['full']:6.2%}   (target <= 5%)")
    print(f"  the same at r=4:                  {state4 / state['full']:6.2%}")


if __name__ == "__main__":
    main()
