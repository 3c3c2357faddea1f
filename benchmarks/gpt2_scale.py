"""At GPT-2 size: ours against PyTorch, PEFT and bitsandbytes, in time and memory.

GPT-2 small (Radford et al., 2019: 12 layers, width 768, 12 heads, vocabulary 50,257, 124M
parameters) with random weights of the real shape, float32, on the CPU. The weights come from
transformers' ``GPT2LMHeadModel(GPT2Config())`` and are loaded into ours with
``hf_io.load_hf_gpt2``, so both sides compute with the same numbers. LoRA (Hu et al., 2021) r = 8,
alpha 16 on all six matrices of every block (PEFT: rank 24 on the fused c_attn with alpha 48, so
s = 2 everywhere, as in ``lora_step.py``); QLoRA (Dettmers et al., 2023) with NF4 and double
quantization (PEFT over bitsandbytes' ``Linear4bit``, float32 compute); QA-LoRA (Xu et al., 2023)
INT4 with groups of 32.

Printed:

1. time ratios at batch 4 x 128 and 1 x 512 (ours and the reference alternating in one run,
   medians after a warm-up): forward (ours / torch under ``no_grad``), one training step
   (forward, cross-entropy, backward, AdamW) of LoRA (ours / PyTorch + PEFT), full fine-tuning
   (ours / torch), QLoRA (ours / PEFT over bitsandbytes), QLoRA / our LoRA and QA-LoRA / our
   LoRA; a forward at T = 1,024; dequantizing all 72 NF4 block matrices (ours /
   bitsandbytes' ``dequantize_4bit``);
2. the double-quantized NF4 storage of all 72 matrices against bitsandbytes'
   ``quantize_4bit(..., compress_statistics=True)``: how many packed codes, 8-bit block
   constants, nested absmax and offsets differ;
3. each step kind's peak resident memory (RSS), ours and the reference, each in its own process
   (``--child``: the peak is reset after loading, so it is the peak of a step with the model and
   its optimizer state in memory);
4. memory: what each of our methods holds (weights, gradients, AdamW moments, measured from the
   arrays) against what ``memory.paper`` calculates, and a step's traced peak against the
   calculator's activation term.

    python benchmarks/gpt2_scale.py [--reps 3] [--quick] [--timing | --memory]

``--quick`` runs the same at a reduced size (2 layers, width 128, vocabulary 2,048) in seconds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from lora_step import peft_step as torch_step  # noqa: E402  (a torch training step, any model)
from timing import alternate, alternate_rounds, load_average, ratio_spread  # noqa: E402

from lora_from_scratch.adapter import TARGETS  # noqa: E402
from lora_from_scratch.hf_io import load_hf_gpt2  # noqa: E402
from lora_from_scratch.lora import apply_lora  # noqa: E402
from lora_from_scratch.memory import format_bytes  # noqa: E402
from lora_from_scratch.optim import AdamW  # noqa: E402
from lora_from_scratch.qalora import apply_qalora  # noqa: E402
from lora_from_scratch.qlora import apply_qlora  # noqa: E402
from lora_from_scratch.train import train_step  # noqa: E402

RANK, ALPHA, BITS, GROUP = 8, 16, 4, 32
DEQUANT_ROUNDS = 9  # rounds of the NF4 dequantize timing (at least): bitsandbytes' time moves from round to round
FULL = dict(sizes=dict(), shapes=((4, 128), (1, 512)), long_t=1024)  # GPT2Config() defaults: GPT-2 small
QUICK = dict(sizes=dict(n_layer=2, n_embd=128, n_head=4, vocab_size=2048, n_positions=256),
             shapes=((2, 64), (1, 128)), long_t=256)
OURS_KINDS = ("full", "lora", "qlora", "qalora")
REF_KINDS = ("torch", "peft", "bnb")


# ---------------------------------------------------------------- building both sides
def save_random_gpt2(sizes: dict, folder: str) -> None:
    """A randomly initialized GPT2LMHeadModel of ``sizes`` (GPT2Config defaults otherwise), saved to ``folder``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # ours has none: both compute the same
    GPT2LMHeadModel(GPT2Config(**sizes, **no_dropout)).save_pretrained(folder)


def n_head_of(folder: str) -> int:
    import json

    with open(os.path.join(folder, "config.json")) as f:
        return int(json.load(f)["n_head"])


def ours(kind: str, folder: str):
    """Our GPT with the saved weights, adapted as ``kind``, and its AdamW."""
    from safetensors.numpy import load_file

    model = load_hf_gpt2(load_file(os.path.join(folder, "model.safetensors")), n_head_of(folder))
    if kind == "lora":
        apply_lora(model, RANK, ALPHA, TARGETS, seed=1)
    elif kind == "qlora":
        apply_qlora(model, RANK, ALPHA, TARGETS, seed=1)
    elif kind == "qalora":
        apply_qalora(model, RANK, ALPHA, TARGETS, bits=BITS, group_size=GROUP, seed=1)
    elif kind != "full":
        raise ValueError(kind)
    return model, AdamW(model.trainable_parameters(), lr=1e-4, weight_decay=0.0)


def reference(kind: str, folder: str):
    """The reference: torch (full fine-tuning), PEFT (LoRA) or PEFT over bitsandbytes 4-bit (QLoRA)."""
    import torch
    from transformers import BitsAndBytesConfig, GPT2LMHeadModel

    if kind == "bnb":
        qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32)
        model = GPT2LMHeadModel.from_pretrained(folder, quantization_config=qcfg, dtype=torch.float32)
    else:
        model = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32)
    if kind in ("peft", "bnb"):
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["c_attn", "c_proj", "c_fc"], lora_dropout=0.0,
                          rank_pattern={"c_attn": 3 * RANK}, alpha_pattern={"c_attn": 3 * ALPHA})
        model = get_peft_model(model, lcfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    return model, opt


def batch(vocab: int, b: int, t: int):
    rng = np.random.default_rng(b * 1000 + t)
    return rng.integers(0, vocab, size=(b, t)), rng.integers(0, vocab, size=(b, t))  # (B, T) each


def ours_step(model, opt, idx, tgt):
    return train_step(model, opt, idx, tgt)[0]


def no_grad_logits(model, idx):
    import torch

    with torch.no_grad():
        return model(input_ids=idx).logits  # (B, T, V)


# ---------------------------------------------------------------- timing
def time_full(folder: str, idx, tgt, reps: int) -> dict:
    """Forward (ours / torch no_grad) and a full fine-tuning step (ours / torch), alternating."""
    import torch

    t_idx, t_tgt = torch.tensor(idx), torch.tensor(tgt)
    full, full_opt = ours("full", folder)
    tm, topt = reference("torch", folder)

    med = alternate({"ours": lambda: full(idx, check=False), "torch": lambda: no_grad_logits(tm, t_idx)}, reps)
    full._drop_caches()
    ratios = {"forward, ours / torch no_grad": med["ours"] / med["torch"]}
    first = (ours_step(full, full_opt, idx, tgt), torch_step(tm, topt, t_idx, t_tgt))
    assert abs(first[0] - first[1]) < 1e-3, f"ours and torch should start at one loss: {first}"
    med = alternate({"full": lambda: ours_step(full, full_opt, idx, tgt),
                     "torch": lambda: torch_step(tm, topt, t_idx, t_tgt)}, reps)
    ratios["full fine-tuning, ours / torch"] = med["full"] / med["torch"]
    return ratios, med


def time_shape(folder: str, vocab: int, b: int, t: int, reps: int) -> dict:
    """The step ratios at one batch shape (see the module docstring), and the median seconds."""
    import torch

    idx, tgt = batch(vocab, b, t)
    ratios, seconds = time_full(folder, idx, tgt, reps)
    t_idx, t_tgt = torch.tensor(idx), torch.tensor(tgt)
    runs = {kind: ours(kind, folder) for kind in ("lora", "qlora", "qalora")}
    refs = {kind: reference(kind, folder) for kind in ("peft", "bnb")}
    fns = {kind: (lambda k=kind: ours_step(*runs[k], idx, tgt)) for kind in runs}
    fns.update({kind: (lambda k=kind: torch_step(*refs[k], t_idx, t_tgt)) for kind in refs})
    med = alternate(fns, reps)
    ratios["LoRA r=8 six matrices, ours / PyTorch + PEFT"] = med["lora"] / med["peft"]
    ratios["QLoRA NF4+DQ, ours / PEFT over bitsandbytes"] = med["qlora"] / med["bnb"]
    ratios["QLoRA / our LoRA"] = med["qlora"] / med["lora"]
    ratios["QA-LoRA INT4 g32 / our LoRA"] = med["qalora"] / med["lora"]
    return ratios, {**seconds, **med}


def time_long_forward(folder: str, vocab: int, t: int, reps: int) -> float:
    import torch

    idx, _ = batch(vocab, 1, t)
    t_idx = torch.tensor(idx)
    model, _ = ours("full", folder)
    tm, _ = reference("torch", folder)

    med = alternate({"ours": lambda: model(idx, check=False), "torch": lambda: no_grad_logits(tm, t_idx)}, reps)
    return med["ours"] / med["torch"]


def nf4_parity_and_dequantize(folder: str, reps: int) -> dict:
    """Our double-quantized NF4 against bitsandbytes' on every block matrix: differences, and dequantize time."""
    import bitsandbytes.functional as bnbf
    import torch

    from lora_from_scratch.quant import dequantize_4bit, quantize_4bit

    model, _ = ours("full", folder)
    weights = [lin.weight.data for blk in model.blocks for lin in
               (blk.attn.q, blk.attn.k, blk.attn.v, blk.attn.o, blk.mlp.fc, blk.mlp.proj)]  # 72 x (out, in)
    counts = dict(matrices=len(weights), codes=0, codes_total=0, qabsmax=0, qabsmax_total=0, absmax2=0,
                  offset=0, max_dequant_diff=0.0)
    qs, bs = [], []
    for w in weights:
        q = quantize_4bit(w, 64, "nf4", double_quant=True)
        packed, st = bnbf.quantize_4bit(torch.from_numpy(w), blocksize=64, compress_statistics=True,
                                        quant_type="nf4")
        counts["codes"] += int((q.packed != packed.numpy().reshape(-1)).sum())
        counts["codes_total"] += q.packed.size
        counts["qabsmax"] += int((q.qabsmax != st.absmax.numpy()).sum())
        counts["qabsmax_total"] += q.qabsmax.size
        counts["absmax2"] += int((q.absmax2 != st.state2.absmax.numpy()).sum())
        counts["offset"] += int(np.float32(st.offset.item()) != q.offset[0])
        diff = np.abs(dequantize_4bit(q) - bnbf.dequantize_4bit(packed, st).numpy()).max()
        counts["max_dequant_diff"] = max(counts["max_dequant_diff"], float(diff))
        qs.append(q)
        bs.append((packed, st))
    # bitsandbytes' CPU dequantize varies from run to run (its threads): more rounds, and the spread
    times = alternate_rounds({"ours": lambda: [dequantize_4bit(q) for q in qs],
                              "bnb": lambda: [bnbf.dequantize_4bit(p, s) for p, s in bs]}, max(reps, DEQUANT_ROUNDS))
    med = {name: float(np.median(v)) for name, v in times.items()}
    counts["dequantize ours / bitsandbytes"] = med["ours"] / med["bnb"]
    counts["dequantize seconds ours, bnb"] = (med["ours"], med["bnb"])
    counts["dequantize per-round ratio spread"] = ratio_spread(times, "ours", "bnb")
    return counts


# ---------------------------------------------------------------- memory
def child(kind: str, folder: str, b: int, t: int) -> None:
    """In its own process: build ``kind``, take one step, reset the peak RSS, take another; print the peak,
    and the second step's minor page faults and system CPU seconds (what fetching fresh memory pages cost it)."""
    import resource

    side = "ref" if kind in REF_KINDS else "ours"
    if side == "ours":
        model, opt = ours(kind, folder)
        idx, tgt = batch(model.config.vocab_size, b, t)

        def step():
            return ours_step(model, opt, idx, tgt)
    else:
        import torch

        model, opt = reference(kind, folder)
        idx, tgt = (torch.tensor(a) for a in batch(model.config.vocab_size, b, t))

        def step():
            return torch_step(model, opt, idx, tgt)
    step()  # the optimizer state now exists
    with open("/proc/self/clear_refs", "w") as f:  # Linux: reset the peak resident set size (VmHWM)
        f.write("5")
    before = resource.getrusage(resource.RUSAGE_SELF)
    step()
    after = resource.getrusage(resource.RUSAGE_SELF)
    status = open("/proc/self/status").read()
    hwm = int(status.split("VmHWM:")[1].split()[0]) * 1024
    print(f"RSS_PEAK {hwm} FAULTS {after.ru_minflt - before.ru_minflt} SYS {after.ru_stime - before.ru_stime:.3f}")


def rss_peaks(folder: str, b: int, t: int) -> dict:
    out = {}
    for kind in OURS_KINDS + REF_KINDS:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, "--folder", folder,
                               "--batch", str(b), "--seq", str(t)], capture_output=True, text=True, timeout=1200)
        if proc.returncode:
            raise RuntimeError(f"child {kind} failed:\n{proc.stderr[-3000:]}")
        words = proc.stdout.split("RSS_PEAK")[1].split()  # peak, "FAULTS", count, "SYS", seconds
        out[kind] = dict(peak=int(words[0]), faults=int(words[2]), sys=float(words[4]))
    return out


def memory_account(folder: str, b: int, t: int) -> dict:
    """For each of our methods: held bytes measured against calculated, and a step's traced peak against the
    calculator's state + activation term."""
    from lora_from_scratch import memory

    out = {}
    for kind in OURS_KINDS:
        model, opt = ours(kind, folder)
        idx, tgt = batch(model.config.vocab_size, b, t)
        ours_step(model, opt, idx, tgt)  # the AdamW moments exist, as in any later step
        measured = memory.step_memory(model, opt, (idx, tgt))
        held = measured["weights"] + measured["gradients"] + measured["optimizer"]
        calc = calculated(model, kind, b, t)
        out[kind] = dict(held=held, held_calc=calc.get("held"), peak=measured["peak"], peak_calc=calc.get("peak"))
        del model, opt
    return out


def calculated(model, kind: str, b: int, t: int) -> dict:
    """What ``memory.paper`` says a step of ``kind`` holds, and its peak (held + activations + temporaries)."""
    from lora_from_scratch.memory import paper

    size = paper.TransformerSize.from_config(model.config)
    est = paper.training_memory(size, kind, r=RANK, targets=TARGETS, weight_bytes=4, bits=BITS, group_size=GROUP)
    held = est.total  # the bases' bytes from the layouts the layers store (NF4, quant.GroupwiseLayout)
    moments_and_weights = held - est.gradients  # what is held when a step begins (no gradients yet)
    act = paper.activation_bytes(size, b, t, embedding_trains=kind == "full",
                                 group_size=GROUP if kind == "qalora" else None, targets=TARGETS)
    return {"held": held, "peak": moments_and_weights + act + paper.step_transient_bytes(size, b, t)}


# ---------------------------------------------------------------- report
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a reduced size, 1 repetition")
    ap.add_argument("--memory", action="store_true", help="only the memory account (measured against calculated)")
    ap.add_argument("--timing", action="store_true", help="only the time ratios and the NF4 comparison (no memory)")
    ap.add_argument("--child", choices=OURS_KINDS + REF_KINDS, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.folder, args.batch, args.seq)
        return
    plan = QUICK if args.quick else FULL
    reps = 1 if args.quick else args.reps
    with tempfile.TemporaryDirectory() as folder:
        save_random_gpt2(plan["sizes"], folder)
        if args.memory:
            print_memory_account(folder, *plan["shapes"][0])
            return
        vocab = ours("full", folder)[0].config.vocab_size
        cfg = ours("full", folder)[0].config
        print(f"GPT-2 shape: {cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} heads, vocabulary {vocab}; "
              f"float32, {os.cpu_count()} cores; medians of {reps} alternating rounds after a warm-up; "
              f"{load_average()}")
        table, secs = {}, {}
        for b, t in plan["shapes"]:
            table[(b, t)], secs[(b, t)] = time_shape(folder, vocab, b, t, reps)
            print(f"at {b} x {t}: " + "; ".join(f"{k} {v:.2f}" for k, v in table[(b, t)].items()), flush=True)
        (b0, t0), (b1, t1) = plan["shapes"]
        print(f"\n| step | ours / reference, batch {b0} x {t0} | batch {b1} x {t1} |")
        print("| --- | --- | --- |")
        for name in table[(b0, t0)]:
            print(f"| {name} | {table[(b0, t0)][name]:.2f} | {table[(b1, t1)][name]:.2f} |")
        long_ratio = time_long_forward(folder, vocab, plan["long_t"], reps)
        print(f"| forward at T = {plan['long_t']}, ours / torch no_grad | {long_ratio:.2f} | |")
        nf4 = nf4_parity_and_dequantize(folder, reps)
        lo, mid, hi = nf4["dequantize per-round ratio spread"]
        print(f"| NF4 dequantize of all {nf4['matrices']} matrices, ours / bitsandbytes | "
              f"{nf4['dequantize ours / bitsandbytes']:.2f} (per round {lo:.2f} to {hi:.2f}, median {mid:.2f}) | |")
        print(load_average())
        for shape, s in secs.items():
            print(f"seconds per step at {shape[0]} x {shape[1]}: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in s.items()))
        print(f"\nNF4 + double quantization against bitsandbytes, {nf4['matrices']} matrices: "
              f"packed bytes differing {nf4['codes']} of {nf4['codes_total']:,}; 8-bit block constants "
              f"{nf4['qabsmax']} of {nf4['qabsmax_total']:,}; nested absmax {nf4['absmax2']}; offsets "
              f"{nf4['offset']} of {nf4['matrices']}; dequantized weights at most {nf4['max_dequant_diff']:.3g} "
              "apart")

        if args.timing:
            return
        b, t = plan["shapes"][0]
        peaks = rss_peaks(folder, b, t)
        print(f"\npeak RSS of a training step at {b} x {t}, each in its own process (with the step's minor page "
              "faults and system CPU time):")

        def rss(m):
            return f"{format_bytes(m['peak']):>10} ({m['faults']:,} faults, {m['sys']:.2f} s)"

        for kind, label in (("lora", "peft"), ("qlora", "bnb"), ("full", "torch"), ("qalora", None)):
            ref = f"; reference ({label}) {rss(peaks[label])}" if label else ""
            print(f"  ours {kind:<7} {rss(peaks[kind])}{ref}")

        print_memory_account(folder, b, t)


def print_memory_account(folder: str, b: int, t: int) -> None:
    acct = memory_account(folder, b, t)
    print(f"\nmemory of our methods at {b} x {t}: held (weights + gradients + AdamW moments) and a step's "
          "traced peak, measured against calculated")
    for kind, m in acct.items():
        print(f"  {kind:<7} held {m['held']:>13,d} B calculated {int(m['held_calc']):>13,d} B "
              f"({format_bytes(m['held'])}, difference {m['held'] - int(m['held_calc']):+,d} B); traced step peak "
              f"{format_bytes(m['peak']):>10} calculated {format_bytes(m['peak_calc']):>10} "
              f"({m['peak'] / m['peak_calc'] - 1:+.1%})")


if __name__ == "__main__":
    main()
