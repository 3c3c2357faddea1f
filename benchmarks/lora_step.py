"""A LoRA training step against full fine-tuning, against PyTorch + PEFT, and QLoRA against LoRA.

Hu et al. (2021), section 4.2 ("Practical Benefits and Limitations"): freezing W0 removes its
gradient and its optimizer state, which "reduces the VRAM usage by up to 2/3". This script
measures, on one GPT (n_layer 4, n_head 8, n_embd 512, block 128, vocab 96, float32), with LoRA
r = 8 (alpha 16) on all six matrices of every block:

- memory: the peak traced memory of one training step (``memory.step_memory``: tracemalloc sees
  the weights, the gradients, the AdamW moments, the activations and every temporary), LoRA
  against full fine-tuning, after a first step so that both already hold their optimizer state.
  Activations cost both methods the same, so the ratio depends on how many tokens a step holds
  next to the weights. At 256 tokens a step's activations are about the size of the weights (as in
  the paper's regime, where the state of a 175B model dwarfs everything else; target <= 0.5);
  at 2048 tokens they are seven times the weights and the ratio rises toward 1;
- time, all four timed alternately in one run, medians after a warm-up:
  ours LoRA / ours full fine-tuning, ours LoRA / PyTorch eager + PEFT on the same model and
  the same adapters (target <= 1.0), ours QLoRA (NF4, double quantization: W0 dequantized in
  the forward and again in the backward) / ours LoRA (target <= 1.2);
- the trainable state (gradients + AdamW moments) of LoRA as a fraction of full fine-tuning's.

PEFT's model is GPT-2 built from our weights (``checkpoint.to_hf_gpt2_state_dict``) with the adapter
layout ``checkpoint.save_peft_adapter`` writes: rank 24 on the fused c_attn (our q, k, v at 8 each,
alpha scaled so s = 2 everywhere) and rank 8 on c_proj, c_fc and mlp.c_proj. Both sides train
the same number of adapters with the same products; PEFT's c_attn B is dense where ours is
block-diagonal (3 x 8 columns), which costs it nothing measurable.

    python benchmarks/lora_step.py [--reps 7] [--quick]
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
from lora_from_scratch.checkpoint import to_hf_gpt2_state_dict  # noqa: E402
from lora_from_scratch.hf_io import hf_gpt2_config_dict  # noqa: E402
from lora_from_scratch.lora import apply_lora, count_parameters, lora_layers  # noqa: E402
from lora_from_scratch.memory import format_bytes, step_memory, trainable_state_bytes  # noqa: E402
from lora_from_scratch.model import GPT, GPTConfig  # noqa: E402
from lora_from_scratch.optim import AdamW  # noqa: E402
from lora_from_scratch.qlora import apply_qlora  # noqa: E402
from lora_from_scratch.train import train_step  # noqa: E402

CONFIG = dict(vocab_size=96, block_size=128, n_layer=4, n_head=8, n_embd=512)
BATCH = 8  # for the timings
MEMORY_BATCHES = (2, 16)  # the memory ratio: state-dominated (256 tokens) and activation-dominated (2048)
RANK, ALPHA = 8, 16
TARGETS = ["q", "k", "v", "o", "fc", "proj"]


def _sync():
    xp = get_xp()
    if xp.__name__ == "cupy":  # GPU work is asynchronous: wait for it before reading the clock
        xp.cuda.Stream.null.synchronize()


def make(method, cfg):
    model = GPT(cfg, seed=0)
    if method == "lora":
        apply_lora(model, RANK, ALPHA, TARGETS, seed=1)
    elif method == "qlora":
        apply_qlora(model, RANK, ALPHA, TARGETS, seed=1)
    return model, AdamW(model.trainable_parameters(), lr=1e-4, weight_decay=0.0)


def ours_step(model, opt, idx, tgt):
    """``train.train_step`` (forward, loss, backward, AdamW; no clipping), then wait for the GPU; the loss."""
    loss, _ = train_step(model, opt, idx, tgt)
    _sync()  # train_step reads the loss before the optimizer step: the clock must also wait for that step
    return loss


def peft_model(ours, cfg):
    """GPT-2 + PEFT holding our base weights and our adapters' layout (see the module docstring)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(**hf_gpt2_config_dict(cfg)))  # cfg.dropout 0: no dropout on either side
    state = {k: torch.tensor(v) for k, v in to_hf_gpt2_state_dict(ours).items()}
    hf.load_state_dict(state, strict=False)
    lcfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["c_attn", "c_proj", "c_fc"], lora_dropout=0.0,
                      fan_in_fan_out=True, rank_pattern={"c_attn": 3 * RANK}, alpha_pattern={"c_attn": 3 * ALPHA})
    model = get_peft_model(hf, lcfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    return model, opt


def peft_step(model, opt, idx, tgt):
    import torch

    logits = model(input_ids=idx).logits  # (B, T, V)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss)


def memory_ratio(cfg, batch):
    """Peak traced memory of a second step (state already allocated) for full fine-tuning and LoRA."""
    rng = np.random.default_rng(1)
    idx = rng.integers(0, cfg.vocab_size, size=(batch, cfg.block_size))  # (B, T)
    tgt = rng.integers(0, cfg.vocab_size, size=(batch, cfg.block_size))  # (B, T)
    out = {}
    for method in ("full", "lora"):
        model, opt = make(method, cfg)
        step_memory(model, opt, (idx, tgt))  # the first step allocates the AdamW moments
        out[method] = step_memory(model, opt, (idx, tgt))
        del model, opt
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="3 repetitions")
    args = ap.parse_args()
    reps = 3 if args.quick else args.reps
    cfg = GPTConfig(**CONFIG)
    xp = get_xp()
    threads = os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))
    print(f"config: {CONFIG}, float32, backend {xp.__name__}, {threads} threads; LoRA r={RANK}, alpha={ALPHA}, "
          f"targets {TARGETS} in every block")

    # ---------------------------------------------------------------- memory
    print("\npeak traced memory of one training step (weights + gradients + AdamW moments + activations):")
    for batch in MEMORY_BATCHES:
        m = memory_ratio(cfg, batch)
        f, lo = m["full"], m["lora"]
        print(f"  batch {batch:>2} x {cfg.block_size} tokens: full {format_bytes(f['peak']):>10} "
              f"(state {format_bytes(f['held_before'])}, activations {format_bytes(f['activations'])}); "
              f"LoRA {format_bytes(lo['peak']):>10} (state {format_bytes(lo['held_before'])}, "
              f"activations {format_bytes(lo['activations'])});  LoRA / full {lo['peak'] / f['peak']:.3f}"
              + ("   (target <= 0.5)" if batch == MEMORY_BATCHES[0] else ""))

    # ---------------------------------------------------------------- time
    import torch

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    idx_host = rng.integers(0, cfg.vocab_size, size=(BATCH, cfg.block_size))  # (B, T)
    tgt_host = rng.integers(0, cfg.vocab_size, size=(BATCH, cfg.block_size))  # (B, T)
    idx, tgt = xp.asarray(idx_host), xp.asarray(tgt_host)
    runs = {name: make(name, cfg) for name in ("full", "lora", "qlora")}
    pm, popt = peft_model(runs["lora"][0], cfg)
    t_idx, t_tgt = torch.tensor(idx_host), torch.tensor(tgt_host)
    steps = {name: (lambda n=name: ours_step(*runs[n], idx, tgt)) for name in runs}
    steps["peft"] = lambda: peft_step(pm, popt, t_idx, t_tgt)
    first = {name: fn() for name, fn in steps.items()}  # warm-up; B = 0, so LoRA and PEFT start at the base loss
    assert abs(first["lora"] - first["peft"]) < 1e-3, f"ours and PEFT should start at one loss: {first}"
    assert abs(first["lora"] - first["full"]) < 1e-5, first
    for _ in range(2):
        for fn in steps.values():
            fn()
    times = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    for _ in range(reps):
        for name, fn in steps.items():
            s, c = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - s)
            cpu[name].append(time.process_time() - c)
    med = {n: statistics.median(v) for n, v in times.items()}
    cmed = {n: statistics.median(v) for n, v in cpu.items()}
    lora_model, lora_opt = runs["lora"]
    frozen_grads = [n for n, p in lora_model.named_parameters() if not p.trainable and p.grad is not None]
    assert not frozen_grads, f"frozen parameters received gradients: {frozen_grads}"
    assert any(float(np.abs(to_numpy(layer.lora_B.data)).sum()) > 0 for layer in lora_layers(lora_model).values())

    print(f"\nmedian step, batch {BATCH} x {cfg.block_size} tokens, {reps} repetitions, timed alternately:")
    labels = {"full": "ours, full fine-tuning", "lora": "ours, LoRA", "qlora": "ours, QLoRA (NF4, double quant)",
              "peft": "PyTorch eager + PEFT, LoRA"}
    for name, label in labels.items():
        print(f"  {label:<34} {med[name] * 1e3:8.1f} ms wall {cmed[name] * 1e3:8.1f} ms CPU")
    print(f"  LoRA / full fine-tuning            {med['lora'] / med['full']:6.3f} wall "
          f"{cmed['lora'] / cmed['full']:6.3f} CPU")
    print(f"  ours LoRA / PyTorch + PEFT         {med['lora'] / med['peft']:6.3f} wall "
          f"{cmed['lora'] / cmed['peft']:6.3f} CPU   (target <= 1.0)")
    print(f"  QLoRA / LoRA                       {med['qlora'] / med['lora']:6.3f} wall "
          f"{cmed['qlora'] / cmed['lora']:6.3f} CPU   (target <= 1.2)")

    full_model, full_opt = runs["full"]
    (tr_full, tot), (tr_lora, _) = count_parameters(full_model), count_parameters(lora_model)
    s_full, s_lora = trainable_state_bytes(full_model, full_opt), trainable_state_bytes(lora_model, lora_opt)
    print(f"\ntrainable parameters: full {tr_full:,} / {tot:,}; LoRA {tr_lora:,} ({tr_lora / tr_full:.2%})")
    print(f"trainable state (gradients + AdamW moments): full {format_bytes(s_full)}, LoRA {format_bytes(s_lora)} "
          f"({s_lora / s_full:.2%})")


if __name__ == "__main__":
    main()
