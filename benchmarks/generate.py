"""Generation at GPT-2 small: tokens/s ours vs transformers, LoRA unmerged vs merged, and no_grad's memory.

GPT-2 small's shape (Radford et al., 2019: 12 layers, width 768, 12 heads, vocabulary 50,257,
context 1,024), random weights from transformers' ``GPT2Config()`` default, loaded into our GPT
with ``checkpoint.load_hf_gpt2``. Measured, side by side in one run:

- tokens/s of greedy decoding, 32 new tokens after an 8-token prompt, batch 1, timed alternately
  (medians): ours (``GPT.generate``, KV cache) against transformers' ``generate(use_cache=True,
  do_sample=False)``, for the base model, for LoRA unmerged (r = 8, alpha 16 on q, k, v, o, fc and
  proj of every block; PEFT over transformers on the other side, the same adapters written by
  ``save_peft_adapter``) and for the merged model (``merge_lora``: W0 + s B A in place). Target:
  ours >= transformers' tokens/s for the base model. LoRA, section 4.1 ("No Additional Inference
  Latency"): merged, the adapted model runs at the base model's speed; unmerged, every adapted
  matrix adds two thin products per token. The tokens are checked equal (ours = transformers,
  ours LoRA = PEFT, merged = unmerged) before anything is timed;
- memory: the traced peak (``memory.traced_peak``) of one forward at batch 4 x 128 inside
  ``no_grad()`` against the same forward outside it (training keeps every layer's cache for the
  backward). Target: <= 0.4;
- the tokenizer: ``benchmarks/tokenizer.py``'s ratio (ours / transformers' GPT2Tokenizer, 158 KB).

Threads: both sides get the same number (``--threads``, default 1: the CPU is shared; NumPy's
BLAS and torch are both set before they start).

    python benchmarks/generate.py [--reps 5] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))


def _threads_from_argv() -> int:
    """``--threads N`` read before NumPy loads: its BLAS takes the thread count when it starts."""
    argv = sys.argv[1:]
    return int(argv[argv.index("--threads") + 1]) if "--threads" in argv else 1


for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(_threads_from_argv())

import numpy as np  # noqa: E402
from timing import alternate  # noqa: E402

from lora_from_scratch import no_grad  # noqa: E402
from lora_from_scratch.backend import asarray, get_xp, to_numpy  # noqa: E402
from lora_from_scratch.checkpoint import load_hf_gpt2  # noqa: E402
from lora_from_scratch.lora import apply_lora, lora_layers, merge_lora  # noqa: E402
from lora_from_scratch.memory import format_bytes, traced_peak  # noqa: E402

TARGETS = ["q", "k", "v", "o", "fc", "proj"]
RANK, ALPHA = 8, 16
FULL = dict(shape={}, prompt=8, new=32, memory_batch=(4, 128))  # {}: GPT2Config()'s defaults, GPT-2 small
QUICK = dict(shape=dict(n_layer=2, n_embd=128, n_head=4, vocab_size=2000, n_positions=128), prompt=8, new=8,
             memory_batch=(2, 32))


def hf_model(shape: dict):
    """transformers' GPT2LMHeadModel with random weights (its own init), float32, eval mode, dropout off."""
    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = GPT2Config(**shape, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    model.generation_config.eos_token_id = None  # exactly the tokens asked for, as ours
    model.generation_config.pad_token_id = 0
    return model


def hf_generate(model, idx, n):
    import torch

    with torch.no_grad():
        return model.generate(idx, max_new_tokens=n, do_sample=False, use_cache=True,
                              attention_mask=torch.ones_like(idx)).numpy()


def randomize_adapters(model, seed=1, scale=0.05):
    """B non-zero (as after training), so that the unmerged adapters compute something and merging changes W."""
    g = np.random.default_rng(seed)
    for layer in lora_layers(model).values():
        layer.lora_B.data = asarray(g.standard_normal(layer.lora_B.shape) * scale, dtype=layer.lora_B.dtype)


def tokens_per_second(setup: dict, reps: int, threads: int):
    import torch
    from peft import PeftModel

    from lora_from_scratch.peft_io import save_peft_adapter

    torch.set_num_threads(threads)
    hf = hf_model(setup["shape"])
    sd = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    ours = load_hf_gpt2(sd, hf.config.n_head)
    lora = apply_lora(load_hf_gpt2(sd, hf.config.n_head), RANK, ALPHA, TARGETS, seed=1)
    randomize_adapters(lora)
    with tempfile.TemporaryDirectory() as directory:
        save_peft_adapter(lora, directory)
        peft = PeftModel.from_pretrained(hf_model(setup["shape"]), directory).eval()
    merged = apply_lora(load_hf_gpt2(sd, hf.config.n_head), RANK, ALPHA, TARGETS, seed=1)
    randomize_adapters(merged)  # the same A (seed 1) and B (seed 1) as ``lora``
    merge_lora(merged)  # W0 + s B A in every adapted layer

    n, T = setup["new"], setup["prompt"]
    idx_host = np.random.default_rng(0).integers(0, hf.config.vocab_size, size=(1, T))  # (1, T)
    idx, t_idx = asarray(idx_host), torch.tensor(idx_host)
    runs = {
        "ours base": lambda: to_numpy(ours.generate(idx, n)),
        "transformers base": lambda: hf_generate(hf, t_idx, n),
        "ours LoRA unmerged": lambda: to_numpy(lora.generate(idx, n)),
        "transformers + PEFT LoRA unmerged": lambda: hf_generate(peft, t_idx, n),
        "ours LoRA merged": lambda: to_numpy(merged.generate(idx, n)),
    }
    tokens = {name: fn() for name, fn in runs.items()}
    assert (tokens["ours base"] == tokens["transformers base"]).all(), "ours and transformers disagree"
    assert (tokens["ours LoRA unmerged"] == tokens["transformers + PEFT LoRA unmerged"]).all(), "ours and PEFT differ"
    assert (tokens["ours LoRA merged"] == tokens["ours LoRA unmerged"]).all(), "merged and unmerged differ"
    assert (tokens["ours LoRA unmerged"] != tokens["ours base"]).any(), "the adapters change no token: vacuous"
    med = alternate(runs, reps)
    return {name: n / s for name, s in med.items()}, hf.config


def forward_peaks(config, batch):
    """Traced peak of one forward at ``batch`` = (B, T) outside no_grad (training mode) and inside."""
    from lora_from_scratch.model import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=config.vocab_size, block_size=config.n_positions, n_layer=config.n_layer,
                    n_head=config.n_head, n_embd=config.n_embd)
    model = GPT(cfg, seed=0).train()
    idx = asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, size=batch))  # (B, T)
    model(idx[:, :8])  # warm-up
    model._drop_caches()
    _, outside, _ = traced_peak(model, idx)
    model._drop_caches()
    with no_grad():
        _, inside, _ = traced_peak(model, idx)
    return outside, inside


def tokenizer_figures(quick: bool) -> dict:
    spec = importlib.util.spec_from_file_location("tokenizer_benchmark", os.path.join(HERE, "tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.measure(n_bytes=16_000, vocab_size=2_000, reps=2) if quick else module.measure(reps=3)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="threads for NumPy's BLAS and for torch (default 1)")
    ap.add_argument("--quick", action="store_true", help="a 2-layer, width-128 GPT-2, 8 new tokens, 2 repetitions")
    args = ap.parse_args()
    setup = QUICK if args.quick else FULL
    reps = 2 if args.quick else args.reps
    if get_xp().__name__ != "numpy":
        raise SystemExit("run this benchmark on the NumPy backend: it compares against transformers on the CPU")

    tps, config = tokens_per_second(setup, reps, args.threads)
    print(f"GPT-2 shape: {config.n_layer} layers, width {config.n_embd}, {config.n_head} heads, vocabulary "
          f"{config.vocab_size:,}, context {config.n_positions}; float32, {args.threads} thread(s) each side")
    print(f"greedy decoding, {setup['new']} new tokens after a {setup['prompt']}-token prompt, batch 1, "
          f"{reps} repetitions timed alternately (medians); LoRA r={RANK} alpha={ALPHA} on {TARGETS}:")
    for name, rate in tps.items():
        print(f"  {name:<36} {rate:8.1f} tokens/s")
    ratio = tps["ours base"] / tps["transformers base"]
    print(f"ratio ours/transformers tokens/s (base): {ratio:.2f}  (target >= 1: {'ok' if ratio >= 1 else 'BELOW'})")
    print(f"ratio ours/transformers+PEFT tokens/s (LoRA unmerged): "
          f"{tps['ours LoRA unmerged'] / tps['transformers + PEFT LoRA unmerged']:.2f}")
    print(f"LoRA section 4.1, ours: merged / base {tps['ours LoRA merged'] / tps['ours base']:.2f}, "
          f"unmerged / base {tps['ours LoRA unmerged'] / tps['ours base']:.2f} (tokens/s)")

    B, T = setup["memory_batch"]
    outside, inside = forward_peaks(config, (B, T))
    r = inside / outside
    print(f"forward at {B} x {T}, traced peak: training (caches kept) {format_bytes(outside)}, no_grad "
          f"{format_bytes(inside)}; ratio no_grad/training {r:.2f}  (target <= 0.4: {'ok' if r <= 0.4 else 'OVER'})")

    tok = tokenizer_figures(args.quick)
    print(f"tokenizer, {tok['bytes'] / 1000:.0f} KB: ratio ours/transformers time {tok['ratio_cold']:.2f}x cold "
          f"word cache, {tok['ratio_warm']:.2f}x warm (target <= 10x)")


if __name__ == "__main__":
    main()
