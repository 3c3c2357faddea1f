"""One full training step (forward, cross-entropy, backward, AdamW) here and in PyTorch eager, side by side.

Same config for both (n_layer=4, n_head=4, n_embd=128, block_size=128,
batch 16, vocab 96, float32), same number of CPU threads, the two timed
alternately in one run so that machine noise hits both alike. Prints the
median step time of each, the ratio ours / torch, and the peak memory of ours
(measured by tracemalloc over NumPy's allocations during one step).

    python benchmarks/train_step.py [--reps 15] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from lora_from_scratch.checkpoint import to_hf_gpt2_state_dict  # noqa: E402
from lora_from_scratch.functional import cross_entropy  # noqa: E402
from lora_from_scratch.model import GPT, GPTConfig  # noqa: E402
from lora_from_scratch.optim import AdamW  # noqa: E402

CONFIG = dict(vocab_size=96, block_size=128, n_layer=4, n_head=4, n_embd=128)
BATCH = 16


def torch_gpt(sd: dict, cfg: GPTConfig):
    """A plain PyTorch GPT-2 (the usual eager code: nn.Linear, F.layer_norm, scaled_dot_product_attention)."""
    import torch
    import torch.nn.functional as F

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            C = cfg.n_embd
            self.ln_1, self.ln_2 = torch.nn.LayerNorm(C), torch.nn.LayerNorm(C)
            self.c_attn, self.c_proj = torch.nn.Linear(C, 3 * C), torch.nn.Linear(C, C)
            self.c_fc, self.mlp_proj = torch.nn.Linear(C, 4 * C), torch.nn.Linear(4 * C, C)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T, cfg.n_head, C // cfg.n_head).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
            x = x + self.c_proj(y)
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = torch.nn.Embedding(cfg.vocab_size, cfg.n_embd)
            self.wpe = torch.nn.Embedding(cfg.block_size, cfg.n_embd)
            self.h = torch.nn.ModuleList([Block() for _ in range(cfg.n_layer)])
            self.ln_f = torch.nn.LayerNorm(cfg.n_embd)

        def forward(self, idx):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for b in self.h:
                x = b(x)
            return self.ln_f(x) @ self.wte.weight.T

    net = Net()
    with torch.no_grad():
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        net.wte.weight.copy_(t(sd["transformer.wte.weight"]))
        net.wpe.weight.copy_(t(sd["transformer.wpe.weight"]))
        net.ln_f.weight.copy_(t(sd["transformer.ln_f.weight"]))
        net.ln_f.bias.copy_(t(sd["transformer.ln_f.bias"]))
        for i, b in enumerate(net.h):
            h = f"transformer.h.{i}."
            for mine, theirs in (("ln_1", "ln_1"), ("ln_2", "ln_2")):
                getattr(b, mine).weight.copy_(t(sd[h + theirs + ".weight"]))
                getattr(b, mine).bias.copy_(t(sd[h + theirs + ".bias"]))
            for mine, theirs in (("c_attn", "attn.c_attn"), ("c_proj", "attn.c_proj"), ("c_fc", "mlp.c_fc"),
                                 ("mlp_proj", "mlp.c_proj")):
                getattr(b, mine).weight.copy_(t(sd[h + theirs + ".weight"].T))
                getattr(b, mine).bias.copy_(t(sd[h + theirs + ".bias"]))
    return net


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="5 repetitions")
    args = ap.parse_args()
    reps = 5 if args.quick else args.reps

    import torch

    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    cfg = GPTConfig(**CONFIG)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, cfg.vocab_size, size=(BATCH, cfg.block_size))  # (B, T)
    tgt = rng.integers(0, cfg.vocab_size, size=(BATCH, cfg.block_size))  # (B, T)

    ours = GPT(cfg, seed=0)
    opt = AdamW(ours.parameters(), lr=1e-4, weight_decay=0.01)
    net = torch_gpt(to_hf_gpt2_state_dict(ours), cfg)
    topt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.01)
    tidx, ttgt = torch.from_numpy(idx), torch.from_numpy(tgt)

    def step_ours():
        logits = ours(idx)  # (B, T, V)
        loss, dlogits = cross_entropy(logits, tgt)
        ours.zero_grad()
        ours.backward(dlogits)
        opt.step()
        return float(loss)

    def step_torch():
        logits = net(tidx)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), ttgt.reshape(-1))
        topt.zero_grad(set_to_none=True)
        loss.backward()
        topt.step()
        return float(loss)

    l0, t0 = step_ours(), step_torch()  # warm-up (and a sanity check: same starting loss)
    assert abs(l0 - t0) < 1e-4, f"the two models disagree before training: {l0} vs {t0}"
    for _ in range(2):
        step_ours()
        step_torch()
    times = {"ours": [], "torch": []}
    for _ in range(reps):
        for name, fn in (("ours", step_ours), ("torch", step_torch)):
            s = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - s)

    tracemalloc.start()
    step_ours()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    mo, mt = statistics.median(times["ours"]), statistics.median(times["torch"])
    print(f"config: {CONFIG}, batch {BATCH}, float32, {threads} threads (numpy BLAS and torch), {reps} reps")
    print(f"ours   median step: {mo * 1e3:8.1f} ms")
    print(f"torch  median step: {mt * 1e3:8.1f} ms")
    print(f"ratio ours/torch:   {mo / mt:8.2f}   (target <= 1.25, aim <= 1.0)")
    print(f"peak memory of ours during one step (NumPy allocations): {peak / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
